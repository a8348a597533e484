"""What loading and unloading a model live costs the model that stays:
``python -m bench.models.live [--quick] [--out bench/out]``.

One daemon, one CPU device (``cpu:1``), one ``[[models]]`` entry ("stay": the built-in shapes CNN
at 64x64). Client threads classify it in a closed loop, one frame in flight each, timing every
call. Three windows of the same length, in one run: steady; one that begins with an admin ``load``
of resnet18 at 64x64 ("guest": its CPU load, then its warm-up on the device between two of stay's
batches); one that begins with an admin ``unload`` of it. For each window: stay's frames/s, p50,
p99 and longest latency (the longest shows the device's pause for the guest's warm-up) and failed requests, as ratios to the steady window; the load's and the unload's
seconds. Nothing is asserted. Writes ``OUT/models_live.json``.
"""
from __future__ import annotations

import os
import statistics
import threading
import time

import numpy as np

from ..lib import daemons, report

SETTINGS = {"full": {"window_s": 12.0, "warmup_s": 3.0, "clients": 2},
            "quick": {"window_s": 5.0, "warmup_s": 2.0, "clients": 2}}
STAY = '[[models]]\nbuiltin = "shapes"\nname = "stay"\n'


def _clients(socket: str, count: int, stop: threading.Event, done: list, failed: list) -> list:
    from inferd.client import Client

    def run(seed: int) -> None:
        frame = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        with Client(socket, ring_slots=2, cache=False, timeout=30.0) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    c.classify(frame, top_k=1, model="stay")
                except Exception as exc:  # noqa: BLE001  counted: the figure is how many
                    failed.append((time.perf_counter(), repr(exc)))
                    continue
                t1 = time.perf_counter()
                done.append((t1, t1 - t0))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads


def _window(done: list, failed: list, start: float, end: float) -> dict:
    lat = sorted(d for t, d in done if start <= t < end)
    if not lat:
        return {"frames_per_s": 0.0, "p50_ms": None, "p99_ms": None, "max_ms": None, "failed": 0}
    return {"frames_per_s": len(lat) / (end - start), "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "max_ms": 1000 * lat[-1],
            "failed": sum(start <= t < end for t, _ in failed)}


def measure(window_s: float, warmup_s: float, clients: int, log=print) -> dict:
    from inferd.client import AdminClient
    from inferd.client.admin import default_admin_path

    work = daemons.short_workdir()
    config = os.path.join(work, "models.toml")
    with open(config, "w") as fh:
        fh.write(STAY)
    out: dict = {}
    with daemons.daemon(["--config", config, "--device", "cpu:1"]) as d:
        stop, done, failed = threading.Event(), [], []
        threads = _clients(d["socket"], clients, stop, done, failed)
        try:
            time.sleep(warmup_s)  # noqa: sleep-ok  a steady load before the first window
            with AdminClient(default_admin_path(d["socket"]), timeout=120.0) as admin:
                t0 = time.perf_counter()
                time.sleep(window_s)  # noqa: sleep-ok  the steady window
                t1 = time.perf_counter()
                loaded = admin.call("load", name="guest", model="resnet18", set={"input_height": 64,
                                                                                  "input_width": 64})
                t_loaded = time.perf_counter()
                time.sleep(max(0.0, t1 + window_s - t_loaded))  # noqa: sleep-ok  the rest of its window
                t2 = time.perf_counter()
                unloaded = admin.call("unload", name="guest")
                t_unloaded = time.perf_counter()
                time.sleep(max(0.0, t2 + window_s - t_unloaded))  # noqa: sleep-ok  the rest of its window
                t3 = time.perf_counter()
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        steady = _window(done, failed, t0, t1)
        for name, (a, b) in (("steady", (t0, t1)), ("load", (t1, t2)), ("unload", (t2, t3))):
            w = _window(done, failed, a, b)
            if name != "steady" and steady["p50_ms"]:
                w["p50_ratio"] = w["p50_ms"] / steady["p50_ms"] if w["p50_ms"] else None
                w["p99_ratio"] = w["p99_ms"] / steady["p99_ms"] if w["p99_ms"] else None
                w["fps_ratio"] = w["frames_per_s"] / steady["frames_per_s"]
            out[name] = w
            log(f"  {name:7s} stay: {w['frames_per_s']:.1f} frames/s, p50 {w['p50_ms']:.1f} ms, "
                f"p99 {w['p99_ms']:.1f} ms, max {w['max_ms']:.1f} ms, {w['failed']} failed"
                + (f" (p99 x{w['p99_ratio']:.2f} of steady)" if name != "steady" and w.get("p99_ratio") else ""))
        out["load_s"], out["unload_s"] = loaded["seconds"], unloaded["seconds"]
        out["unload_answered"] = unloaded["answered"]
        out["daemon"] = daemons.daemon_summary(d)
        log(f"  load of resnet18@64: {loaded['seconds']:.2f} s; unload: {unloaded['seconds']:.3f} s")
    return out


def render(results: dict) -> str:
    columns = [("window", "<8"), ("frames/s", ">9.1f"), ("p50 ms", ">7.1f"), ("p99 ms", ">7.1f"),
               ("max ms", ">7.1f"), ("failed", ">6"), ("p99/steady", ">10.2f")]
    rows = [[name, w["frames_per_s"], w["p50_ms"] or 0.0, w["p99_ms"] or 0.0, w["max_ms"] or 0.0, w["failed"],
             w.get("p99_ratio") or 1.0] for name, w in ((k, results[k]) for k in ("steady", "load", "unload"))]
    return "\n".join(["stay, the model that stays, per window:", *report.table(columns, rows),
                      f"load of resnet18@64 {results['load_s']:.2f} s, unload {results['unload_s']:.3f} s"])


def main(argv=None) -> int:
    return report.settings_main(argv, __doc__, "models_live.json", "about 20 s", SETTINGS,
                                lambda settings, log: measure(**settings, log=log), render)


if __name__ == "__main__":
    raise SystemExit(main())
