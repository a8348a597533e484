"""The feed-rate benchmark: ``python -m bench.feed [--quick] [--out bench/out]``.

How many frames a second the daemon takes in, and what each costs it, when the model costs nothing:
the uint8 no-op of model.py (no CPU preprocessing, as on a GPU) at 64x64 and 224x224 (12 KB and
150 KB frames), the result cache on and off, one and two CPU devices of one thread
(``--device cpu:1`` once or twice), unique frames and 30 % repeats. Each (size, cache, devices) has
a daemon of its own (bench/lib/daemons.py: fresh work folder, socket, ring prefix and cache file;
embeddings off; ``batching.max_batch`` 64); against it run the unique case, then the repeat case,
each with ``CLIENTS`` client processes keeping 16 frames in flight (clients.py). The parent reads,
at the edges of the shared window:

- the daemon's CPU time (psutil, every thread) and each thread's (/proc/PID/task/TID/stat): the
  event loop runs on the daemon's main thread (``uvloop.run`` in daemon/__main__.py), whose thread
  id is the pid, so its share is that thread's CPU time;
- the daemon's counters (frames computed, batches) and its cache's (hits, coalesced);
- the machine's busy CPU time (/proc/stat): how much of the cores everyone used.

Frames/s into the daemon is what the clients counted (their cache is off: every frame reached the
daemon, computed or answered from its cache). Each row's ratio is against the bare baseline of its
frame size measured in the same run (baseline.py: a ring write plus a Unix-socket ping-pong per
frame). Nothing is asserted: the report says which targets of the frame path were met. Writes
``OUT/feed.json``. See docs/benchmarks.md, "Feed rate".
"""
from __future__ import annotations

import os
import shutil
import time
from functools import partial

import numpy as np

from ..lib import report as lib_report
from ..lib.daemons import daemon, short_workdir, snapshot
from ..lib.measure import latency_stats, sleep_until, thread_cpu_seconds
from ..lib.procs import RESULT_GRACE_S, children
from . import baseline, model, report
from .clients import IN_FLIGHT, feeder

CLIENTS = 4
MAX_BATCH = 64
REPEAT = 0.3
START_LEAD_S = 0.3         # the shared start lies this far after the last client connected
#: (size, cache, devices) of each daemon, in the order they run; each serves every FRAMES case.
DAEMONS = tuple((size, cache, devices) for size in (64, 224) for cache in (False, True) for devices in (1, 2))
#: The frame mixes: name and share of repeats.
FRAMES = (("unique", 0.0), ("30% rep", REPEAT))
SETTINGS = {
    "full": {"warmup_s": 1.0, "seconds": 4.0, "bare_warmup": 300, "bare_count": 3000,
             "daemons": DAEMONS},
    # every value of every dimension once, and every row a target reads: 224x224 cache off and on
    # (one device), with two devices, 64x64 cache on
    "quick": {"warmup_s": 0.5, "seconds": 1.5, "bare_warmup": 100, "bare_count": 500,
              "daemons": ((224, False, 1), (224, True, 1), (224, True, 2), (64, True, 1))},
}


def _edge(probe, pid: int) -> dict:
    """Everything read at one edge of the window: the daemon's counters, its cache's, its CPU time
    (psutil) and each thread's, the machine's busy time, the monotonic clock."""
    import psutil

    out = snapshot(probe, pid)
    times = psutil.Process(pid).cpu_times()
    out.update(cpu_s=times.user + times.system, threads=thread_cpu_seconds(pid), t=time.monotonic())
    return out


def summarise(a: dict, b: dict, pid: int, done: list, seconds: float) -> dict:
    """One row from the two edges ``a``, ``b`` and the clients' reports ``(frames, repeats,
    latencies, cpu)``: frames/s, the daemon's CPU per frame, its event loop's, and what explains them."""
    span = b["t"] - a["t"]
    rate = lambda key: (b.get(key, 0) - a.get(key, 0)) / span
    fps = sum(c[0] for c in done) / seconds
    per_frame = lambda cores: 1e6 * cores / fps if fps else None
    cores = rate("cpu_s")
    threads = {tid: b["threads"][tid] - a["threads"][tid] for tid in b["threads"] if tid in a["threads"]}
    loop = threads.pop(pid, 0.0) / span                   # the main thread runs the event loop
    computed, batches = b.get("c_frames", 0) - a.get("c_frames", 0), b.get("c_batches", 0) - a.get("c_batches", 0)
    return {"frames_s": fps, "repeats_s": sum(c[1] for c in done) / seconds,
            "daemon_cores": cores, "cpu_us_per_frame": per_frame(cores),
            "loop_cores": loop, "loop_us_per_frame": per_frame(loop),
            "loop_share": loop / cores if cores else None,
            "busiest_other_thread_cores": max(threads.values(), default=0.0) / span,
            "threads": len(b["threads"]), "computed_s": computed / span,
            "daemon_hits_s": rate("daemon_hits"), "coalesced_s": rate("coalesced"),
            "mean_batch": computed / batches if batches else None,
            "overloaded": b.get("c_overloaded", 0) - a.get("c_overloaded", 0),
            "failed": b.get("c_failed", 0) - a.get("c_failed", 0),
            "machine_cores": rate("busy_s"), "steal_cores": rate("steal_s"),
            "clients_cores": sum(c[3] for c in done),
            "client_us_per_frame": per_frame(sum(c[3] for c in done)),
            "latency": latency_stats(np.concatenate([np.asarray(c[2]) for c in done]))}


def run_case(d: dict, probe, size: int, repeat: float, salt: int, warmup_s: float, seconds: float) -> dict:
    """``CLIENTS`` feeders against the daemon ``d`` over one window."""
    pid = d["proc"].pid
    specs = [(feeder, (d["socket"], size, repeat, salt, warmup_s, seconds))] * CLIENTS
    with children(specs, lead_s=START_LEAD_S, name="bench-feed") as group:
        sleep_until(group.start + warmup_s)
        a = _edge(probe, pid)
        sleep_until(group.start + warmup_s + seconds)
        b = _edge(probe, pid)
        done = group.collect(warmup_s + seconds + RESULT_GRACE_S)
    return summarise(a, b, pid, done, seconds)


def run_daemon(path: str, size: int, cache: bool, devices: int, s: dict, log, salt: int,
               alt_path: str = "") -> tuple[list, dict]:
    """One daemon, every frame mix against it in turn; its rows and how it ended. ``alt_path``: the
    daemon imports ``inferd`` from there (PYTHONPATH) instead, the other tree of a comparison."""
    from inferd.client import Client

    args = model.daemon_args(path, size, devices, cache, MAX_BATCH)
    rows = []
    with daemon(args, {"PYTHONPATH": alt_path} if alt_path else None) as d:
        with Client(d["socket"]) as probe:
            for n, (mix, repeat) in enumerate(FRAMES):
                row = run_case(d, probe, size, repeat, salt + n, s["warmup_s"], s["seconds"])
                row.update(size=size, cache=cache, devices=devices, frames=mix, repeat=repeat,
                           tree="alt" if alt_path else "this")
                rows.append(row)
                log(f"    {'alt  ' if alt_path else ''}{size}x{size} cache {'on ' if cache else 'off'} {devices} dev {mix:<8}"
                    f"{row['frames_s']:9.0f} frames/s  {row['cpu_us_per_frame'] or 0:6.1f} us/frame, "
                    f"loop {row['loop_us_per_frame'] or 0:5.1f} us ({row['loop_cores']:.0%} of a core), "
                    f"clients {row['client_us_per_frame'] or 0:5.1f} us/frame")
    ended = {k: d.get(k) for k in ("args", "exit_code", "shm_leftovers", "log_problems")}
    return rows, ended


def measure(s: dict, log, alt_path: str = "", only: tuple = ()) -> dict:
    """The bare baseline, then every daemon of ``s["daemons"]`` in order (those of ``only`` alone,
    when given); with ``alt_path``, each one also from the tree there, right after it (the
    clients are this tree's either way); rows, ratios, targets (this tree's rows)."""
    if only:
        s = {**s, "daemons": tuple(d for d in s["daemons"] if _case_name(*d) in only)}
    sizes = sorted({size for size, _, _ in s["daemons"]})
    results = {"machine": lib_report.machine(), "clients": CLIENTS, "in_flight": IN_FLIGHT,
               "max_batch": MAX_BATCH}
    log(f"bare baseline: ring write at {sizes} and socket ping-pong, {s['bare_count']} each ...")
    results["baseline"] = bare = baseline.measure(sizes, s["bare_warmup"], s["bare_count"])
    work = short_workdir()
    rows, daemons = [], []
    try:
        path = model.save(work)
        for k, (size, cache, devices) in enumerate(s["daemons"]):
            log(f"daemon {k + 1}/{len(s['daemons'])}: {size}x{size}, cache {'on' if cache else 'off'}, "
                f"{devices} x cpu:1 ...")
            got, ended = run_daemon(path, size, cache, devices, s, log, salt=2 * len(FRAMES) * k)
            rows += got
            daemons.append(ended)
            if alt_path:
                got, ended = run_daemon(path, size, cache, devices, s, log, len(FRAMES) * (2 * k + 1), alt_path)
                rows += got
                daemons.append(ended)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        r["x_bare"] = r["frames_s"] / bare["sizes"][str(r["size"])]["frames_s"]
        one = next((o for o in rows if (o["size"], o["cache"], o["frames"], o["devices"], o["tree"])
                    == (r["size"], r["cache"], r["frames"], 1, r["tree"])), None)
        r["x_one_device"] = r["frames_s"] / one["frames_s"] if one and one["frames_s"] else None
    results.update(rows=rows, daemons=daemons, alt_path=alt_path)
    results["targets"] = report.targets([r for r in rows if r["tree"] == "this"])
    results["machine"]["loadavg_end"] = os.getloadavg()
    return results


def _case_name(size: int, cache: bool, devices: int) -> str:
    """A daemon's name for ``--only``: ``224on1`` is 224x224, cache on, one device."""
    return f"{size}{'on' if cache else 'off'}{devices}"


def main(argv=None) -> int:
    """Parse the shared options and this family's own (``--alt-path TREE``: every daemon also run
    from the tree whose ``inferd`` package is at TREE, for a before/after in one run; ``--only
    NAME,...``: those daemons alone, e.g. ``64on1,224on1``), measure (or --replot), write
    OUT/feed.json, print the report."""
    import argparse
    import sys

    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--alt-path", default="")
    own.add_argument("--only", default="")
    mine, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    if mine.alt_path and not os.path.isdir(os.path.join(mine.alt_path, "inferd")):
        raise SystemExit(f"--alt-path {mine.alt_path}: no inferd package there (give the folder PYTHONPATH "
                         "would name, e.g. ../old-tree/.pkg)")
    only = tuple(n for n in mine.only.split(",") if n)
    return lib_report.settings_main(rest, __doc__, "feed.json", "about a minute", SETTINGS,
                                    partial(measure, alt_path=os.path.abspath(mine.alt_path) if mine.alt_path else "",
                                            only=only),
                                    report.render)
