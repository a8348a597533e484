"""Part (b), the daemon under load: N client processes in closed loop against one ResNet-18 daemon.

Each client is a spawned process with its own ``inferd.client.Client``; it keeps ``depth`` frames in
flight (depth 1: ``classify``; depth > 1: ``classify_many`` on ``depth`` frames at a time) and times
every call with ``time.perf_counter``. The clients connect first, then the parent hands them one
shared start time (CLOCK_MONOTONIC is system-wide), so every client warms up until the same moment
and measures over the same window. A call counts when it *ends* inside the window; img/s is frames
counted / window length. The parent reads the daemon's counters (``info``), each device's busy
seconds (the admin socket's ``stats``: daemon/ops/stats.py) and the daemon's CPU time (/proc/PID/stat)
at the window's edges, to get the mean batch size, the daemon's own model time per batch, each
device's busy fraction and how much CPU the daemon used; each client reports its own CPU use, so
the report shows who used the two cores. Each row's ratio is against the in-process model at the
batch size its frames in flight allow (``min(clients x depth, max_batch)``): with only N frames in
flight no batch can be larger.
"""
from __future__ import annotations

import os
import time
import traceback

import numpy as np

from ..lib.daemons import counters, daemon
from ..lib.measure import (cpu_seconds, frames, latency_stats, machine_cpu, sleep_until, thread_groups,
                           thread_sched)
from ..lib.procs import RESULT_GRACE_S, children, report_ready

DEVICES = ("cpu:2",)
#: The OS name the daemon gives each device's executor thread and its OpenMP team
#: (daemon/pipeline/thread_pools.py THREAD_NAME; not imported: the parent never loads torch).
MODEL_THREADS = "inferd-dev"
MAX_BATCH = 16


def daemon_args(devices=DEVICES, max_delay_ms: float = 5.0, max_batch: int = MAX_BATCH) -> list[str]:
    """The daemon's command line for part (b): ResNet-18, batches up to ``max_batch``, the given
    devices (cache and embeddings off: bench/lib/daemons.py)."""
    args = ["--model", "resnet18", "--set", f"batching.max_batch={max_batch}",
            "--set", f"batching.max_delay_ms={max_delay_ms}",
            "--set", "server.max_sessions_per_uid=128"]     # 64 client processes of one uid
    for dev in devices:
        args += ["--device", dev]
    return args
#: (clients, frames in flight per client) of each row, in the order they run.
CASES = ((1, 1), (4, 1), (16, 1), (64, 1), (16, 4))
INPUT_SIZE = 64
START_LEAD_S = 0.2         # the shared start lies this far after the last client connected


def _closed_loop(client, batch: list, t_measure: float, t_end: float) -> tuple[list[float], float]:
    """Call ``client`` on ``batch`` back to back until ``t_end``. Returns the latencies of calls
    ending in the window [t_measure, t_end] and this process's CPU use (cores) while it looped."""
    call, arg = (client.classify, batch[0]) if len(batch) == 1 else (client.classify_many, batch)
    lat = []
    wall0, cpu0 = time.monotonic(), time.process_time()
    while time.monotonic() < t_end:
        t0 = time.perf_counter()
        call(arg)
        t1 = time.perf_counter()
        if t_measure <= time.monotonic() <= t_end:
            lat.append(t1 - t0)
    return lat, (time.process_time() - cpu0) / max(time.monotonic() - wall0, 1e-9)


def _client(q, index: int, socket_path: str, depth: int, warmup_s: float, seconds: float,
            start, go, stop) -> None:
    """Client process body: connect, report ready, wait for the shared start, run the closed loop."""
    try:
        from inferd.client import Client

        batch = list(frames(depth, INPUT_SIZE, seed=1000 + index))
        with Client(socket_path) as client:
            client.classify(batch[0])                  # the session works before anyone starts
            report_ready(q, index, go)
            t_measure = start.value + warmup_s
            sleep_until(start.value)
            lat, cpu = _closed_loop(client, batch, t_measure, t_measure + seconds)
        q.put(("ok", ("done", index, lat, cpu)))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def _busy_seconds(admin) -> tuple[dict, dict, dict]:
    """({device label: busy seconds so far}, the garbage collector's counts so far, {batch size:
    batches so far, all devices}) from the admin socket's stats (daemon/ops/stats.py; ``threads.gc``:
    daemon/pipeline/thread_pools.py GcWatch); empty dicts without an admin connection."""
    if not admin:
        return {}, {}, {}
    stats = admin.call("stats")
    sizes: dict = {}
    for d in stats["devices"]:
        for size, n in d.get("batch_sizes") or ():
            sizes[size] = sizes.get(size, 0) + n
    return ({d["label"]: d["busy_s"] for d in stats["devices"]},
            (stats.get("threads") or {}).get("gc") or {}, sizes)


def _window_counters(probe, admin, pid: int, t_measure: float, seconds: float) -> dict:
    """Daemon counter deltas over [t_measure, t_measure + seconds], read by the parent's ``probe``,
    plus the daemon process's CPU use over the window (``cpu_cores``), the whole machine's
    (``machine_busy_cores``, /proc/stat), each device's busy fraction (``device_busy``: busy
    seconds / window, from ``admin``) and the CPU and run-queue wait of the daemon's thread groups
    (``threads``: loop, model, other; bench/lib/measure.py thread_groups)."""
    sleep_until(t_measure)
    before, (busy0, gc0, sizes0), cpu0, m0 = counters(probe), _busy_seconds(admin), cpu_seconds(pid), machine_cpu()
    s0 = thread_sched(pid)
    sleep_until(t_measure + seconds)
    after, (busy1, gc1, sizes1), cpu1, m1 = counters(probe), _busy_seconds(admin), cpu_seconds(pid), machine_cpu()
    s1 = thread_sched(pid)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("frames", "batches", "model_seconds",
                                                               "expired", "overloaded", "failed")}
    delta["cpu_cores"] = (cpu1 - cpu0) / seconds
    delta["machine_busy_cores"] = (m1["busy_s"] - m0["busy_s"]) / seconds    # every process (/proc/stat)
    delta["machine_steal_cores"] = (m1["steal_s"] - m0["steal_s"]) / seconds
    # who in the daemon ran and who waited for a core: the loop, the model's threads, the rest
    delta["threads"] = thread_groups(pid, s0, s1, seconds, MODEL_THREADS)
    # batches by size in the window: whether N clients' requests form batches of N or split
    delta["batch_sizes"] = {k: v - sizes0.get(k, 0) for k, v in sorted(sizes1.items()) if v > sizes0.get(k, 0)}
    if gc1:     # collections by generation in the window, and the seconds they held the GIL
        delta["gc"] = {"collections": [b - a for a, b in zip(gc0["collections"], gc1["collections"])],
                       "seconds": sum(gc1["seconds"]) - sum(gc0["seconds"])}
    delta["device_busy"] = {label: (busy1.get(label, 0.0) - b) / seconds for label, b in busy0.items()}
    return delta


def _summarise(n: int, depth: int, done: list, seconds: float, delta: dict, ceiling) -> dict:
    """One table row from the clients' reports ``(latencies, cpu)`` and the daemon's
    deltas; ``ceiling(frames in flight)`` gives ``(batch, img/s)`` of the fair in-process ceiling."""
    lats = [d[0] for d in done]
    img_s = sum(len(x) for x in lats) * depth / seconds
    batch, ceil = ceiling(n * depth) if callable(ceiling) else (None, ceiling)
    row = {"case": f"{n}x{depth}" if depth > 1 else f"{n}", "clients": n, "depth": depth,
           "img_s": img_s, "ceiling_batch": batch, "ceiling_img_s": ceil,
           "ratio_to_ceiling": img_s / ceil if ceil else None,
           "device_busy": delta["device_busy"],
           "latency": latency_stats(np.concatenate([np.asarray(x) for x in lats])),
           "per_client_img_s": [len(x) * depth / seconds for x in lats], "daemon": delta,
           "clients_cpu_cores": sum(d[1] for d in done), "model_busy": delta["model_seconds"] / seconds}
    if delta["batches"]:
        row["mean_batch"] = delta["frames"] / delta["batches"]
        row["model_ms_per_batch"] = 1000.0 * delta["model_seconds"] / delta["batches"]
    return row


def run_case(socket_path: str, pid: int, probe, n: int, depth: int, warmup_s: float, seconds: float,
             ceiling, admin=None) -> dict:
    """One row of part (b): ``n`` client processes, ``depth`` frames in flight each, against the
    daemon process ``pid`` listening on ``socket_path``."""
    specs = [(_client, (socket_path, depth, warmup_s, seconds))] * n
    with children(specs, lead_s=START_LEAD_S, name="bench-client") as group:
        delta = _window_counters(probe, admin, pid, group.start + warmup_s, seconds)
        done = group.collect(warmup_s + seconds + RESULT_GRACE_S)
    return _summarise(n, depth, done, seconds, delta, ceiling)


def measure(ceiling, warmup_s: float, seconds: float, cases=CASES, env: dict | None = None,
            args: list[str] | None = None) -> dict:
    """Part (b): start one daemon (``env`` added to its environment), run every case against it,
    stop it. Rows in ``cases`` order; ``ceiling(frames in flight)`` -> ``(batch, img/s)``."""
    from inferd.client import Client
    from inferd.client.admin import AdminClient

    args = args or daemon_args()
    with daemon(args, env) as d:
        admin_path = os.path.join(os.path.dirname(d["socket"]), "admin.sock")
        with Client(d["socket"]) as probe, AdminClient(admin_path) as admin:
            rows = [run_case(d["socket"], d["proc"].pid, probe, n, depth, warmup_s, seconds, ceiling,
                             admin) for n, depth in cases]
            threads = admin.call("stats").get("threads")
    return {"daemon_args": args, "daemon_env": env or {}, "rows": rows, "threads": threads,
            "daemon_exit_code": d.get("exit_code"), "shm_leftovers": d["shm_leftovers"]}
