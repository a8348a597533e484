"""Measurements every benchmark takes: percentiles, timed calls, test frames, CPU time, clocks.

No torch and no matplotlib here: the client processes the benchmarks spawn import this module.
"""
from __future__ import annotations

import os
import time

import numpy as np


def latency_stats(seconds: list[float] | np.ndarray) -> dict:
    """p50, p99, mean, min and max of a list of durations in seconds, as milliseconds, plus n."""
    a = np.asarray(seconds, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None, "min_ms": None, "max_ms": None}
    p50, p99 = np.percentile(a, [50, 99])
    return {"n": int(a.size), "p50_ms": float(p50), "p99_ms": float(p99), "mean_ms": float(a.mean()),
            "min_ms": float(a.min()), "max_ms": float(a.max())}


def us_stats(seconds) -> dict:
    """p50, p99, mean, min of durations in seconds, as microseconds, plus n."""
    a = np.asarray(seconds, dtype=np.float64) * 1e6
    if a.size == 0:
        return {"n": 0, "p50_us": None, "p99_us": None, "mean_us": None, "min_us": None}
    p50, p99 = np.percentile(a, [50, 99])
    return {"n": int(a.size), "p50_us": float(p50), "p99_us": float(p99), "mean_us": float(a.mean()),
            "min_us": float(a.min())}


def time_calls(fn, count: int, warmup: int = 0) -> list[float]:
    """``fn()`` called ``warmup`` times untimed, then ``count`` times, each timed with perf_counter."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` random uint8 RGB frames of ``size`` x ``size`` (NHWC), reproducible by ``seed``."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all threads) so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> dict:
    """Whole-machine CPU seconds so far from /proc/stat: busy (all but idle and iowait) and steal
    (time the hypervisor gave our vCPUs to someone else)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    return {"busy_s": (sum(fields[:8]) - idle) / tick, "steal_s": steal / tick}


def delta(before: dict, after: dict) -> dict:
    """after - before for every key in after."""
    return {k: after[k] - before.get(k, 0) for k in after}


def sleep_until(t: float) -> None:
    """Sleep until monotonic time ``t`` (at once if it has passed)."""
    time.sleep(max(0.0, t - time.monotonic()))


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds so far of each thread of process ``pid``, by thread id (from
    /proc/PID/task/TID/stat; a thread that ends between the listing and the read is left out).
    The main thread's id is ``pid``."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def thread_sched(pid: int) -> dict[int, tuple[str, float, float]]:
    """Each thread of process ``pid``: ``tid -> (name, cpu seconds, run-queue wait seconds)`` so far,
    from /proc/PID/task/TID/comm and schedstat (the wait is time spent runnable but not running:
    what a thread lost to the others on its cores). A thread that ends meanwhile is left out."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as fh:
                name = fh.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                run_ns, wait_ns, _ = (int(x) for x in fh.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        out[int(tid)] = (name, run_ns / 1e9, wait_ns / 1e9)
    return out


def thread_groups(pid: int, before: dict, after: dict, seconds: float, model_prefix: str) -> dict:
    """``thread_sched`` deltas of process ``pid`` over ``seconds``, summed per group: ``loop`` (the
    main thread), ``model`` (threads named ``model_prefix``...: the devices' executors and their
    OpenMP teams) and ``other``; each ``{"cpu": cores, "wait": run-queue wait, threads waiting on
    average}``."""
    groups = {g: {"cpu": 0.0, "wait": 0.0} for g in ("loop", "model", "other")}
    for tid, (name, run, wait) in after.items():
        _, run0, wait0 = before.get(tid, (name, 0.0, 0.0))
        g = "loop" if tid == pid else "model" if name.startswith(model_prefix) else "other"
        groups[g]["cpu"] += (run - run0) / seconds
        groups[g]["wait"] += (wait - wait0) / seconds
    return groups


def bytecodes(run) -> int:
    """Bytecodes Python runs in ``run()``, every frame of its call tree (an opcode trace): the
    deterministic measure of a code path's Python, which no other load on the machine moves."""
    import sys

    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return tracer
    sys.settrace(tracer)
    try:
        run()
    finally:
        sys.settrace(None)
    return count
