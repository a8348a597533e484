"""Shared pieces of the cache benchmark (``bench/cache.py``): daemons with their own cache file,
percentiles in microseconds, the daemon's counters and CPU time.

No torch and no matplotlib here: the client processes the benchmark spawns import this module.
"""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np

import common


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


@contextlib.contextmanager
def cache_daemon(args: list[str], *, cache: bool = True, embeddings: bool = False, device: str = "cpu:2",
                 env: dict | None = None):
    """common.daemon with the result cache (and the embedding store) on or off as asked; yields its
    dict; afterwards also ``log_warnings`` and, on a non-zero exit or logged errors, ``log_tail``."""
    full = [*args, "--device", device, "--set", f"cache.enabled={'true' if cache else 'false'}",
            "--set", f"embeddings.enabled={'true' if embeddings else 'false'}"]
    info = {}
    try:
        with common.daemon(full, env) as info:
            info.update(cache=cache, embeddings=embeddings)
            yield info
    finally:
        warned = [ln for ln in info.get("log", "").splitlines() if " WARNING " in ln]
        if warned:
            info["log_warnings"] = warned[:20]
        if info.get("exit_code") != 0 or info.get("log_problems"):
            info["log_tail"] = info.get("log", "")[-4000:]


def daemon_summary(d: dict) -> dict:
    """What the report keeps of a finished daemon: its command line and how it ended."""
    return {k: d.get(k) for k in ("args", "exit_code", "shm_leftovers", "log_tail", "log_warnings")
            if k in d}


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


def snapshot(probe, pid: int) -> dict:
    """The daemon's counters and cache counters (cumulative) and its CPU seconds, now."""
    info = probe.info()
    cache = info.get("cache") or {}
    out = {f"c_{k}": v for k, v in info["counters"].items() if isinstance(v, (int, float))}
    out.update({k: cache.get(k, 0) for k in ("daemon_hits", "client_hits", "misses", "inserts",
                                             "inserts_skipped", "evictions", "coalesced")})
    out["cpu_s"] = cpu_seconds(pid)
    out.update(machine_cpu())
    return out


def delta(before: dict, after: dict) -> dict:
    """after - before for every key in after."""
    return {k: after[k] - before.get(k, 0) for k in after}


def sleep_until(t: float) -> None:
    """Sleep until monotonic time ``t`` (at once if it has passed)."""
    time.sleep(max(0.0, t - time.monotonic()))
