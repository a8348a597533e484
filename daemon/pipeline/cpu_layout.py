"""``--device cpu:auto``: how many CPU devices, with how many threads each, measured at start-up.

NOTE [ cpu layout ]

On a CPU host the same cores can serve as one device with C threads, C devices of one thread, or
anything between; which is best depends on the model, the batch sizes and the machine (on the
2-core development machine one thread runs ResNet-18 @ 64x64 at batch 1 faster than two, and two
1-thread runners beat one 2-thread runner at large batches, but not through the daemon at every
load). So ``cpu:auto`` measures instead of guessing:

    usable cores C (sched_getaffinity)
      -> candidates: k devices x C // k threads, k = 1, 2, 4, ... and C       (candidates)
      -> per candidate, the loaded model itself, k threads at once, each     (measure)
         its own torch team: batch 1, then batch max_batch, for
         threads.auto_measure_s each (at least one batch after a warm-up)
      -> the rule below picks one                                              (choose)
      -> k [[device]] name = "cpu", threads = C // k                           (expand)

The rule ("best"). A daemon is sized for load, so the first criterion is capacity: img/s with every
device running full batches (max_batch). Layouts within ``TOLERANCE`` (5%, about the noise of a
short measurement on a shared machine) of the best capacity count as equal; among them the one
whose batch-1 time (the latency of a lone request, measured with every device busy) is lowest wins,
then the one with fewer devices (larger batches at moderate load). The table and the choice are
logged and reported in the admin ``stats`` reply under ``threads.layout``.
"""
from __future__ import annotations

import logging
import threading
import time

from ..config import ConfigError, DeviceConfig
from .thread_pools import record_layout, usable_cores

log = logging.getLogger("inferd.cpu_layout")

TOLERANCE = 0.05


def candidates(cores: int) -> list[tuple[int, int]]:
    """(devices, threads each) layouts that use at most ``cores`` cores: 1 x C, 2 x C//2, 4 x
    C//4, ... and C x 1, in that order."""
    if cores < 1:
        raise ValueError(f"no usable cores ({cores})")
    counts, k = [], 1
    while k < cores:
        counts.append(k)
        k *= 2
    counts.append(cores)
    return [(k, cores // k) for k in counts]


def choose(table: list[dict], tolerance: float = TOLERANCE) -> dict:
    """The row of ``table`` the rule in NOTE [ cpu layout ] picks. Each row has ``devices``,
    ``threads``, ``batch1_ms`` and ``full_img_s``."""
    if not table:
        raise ValueError("no layout was measured")
    best = max(r["full_img_s"] for r in table)
    close = [r for r in table if r["full_img_s"] >= best * (1.0 - tolerance)]
    return min(close, key=lambda r: (r["batch1_ms"], r["devices"]))


def _run_batches(step, seconds: float, barrier: threading.Barrier, out: list, i: int) -> None:
    """One measuring thread: warm up once, wait for the others, run ``step`` for ``seconds``."""
    try:
        step()
        barrier.wait()
        count, t0 = 0, time.perf_counter()
        while True:
            step()
            count += 1
            if (elapsed := time.perf_counter() - t0) >= seconds:
                break
        out[i] = (count, elapsed)
    except BaseException as exc:     # reported by measure(), which raises it on the caller's thread
        out[i] = exc
        barrier.abort()


def _step(model, threads: int, batch: int):
    """A closure running one batch of ``batch`` blank frames as an executor thread does."""
    import torch

    from .preprocess import Preprocess

    spec = model.spec
    replica = model.replica(torch.device("cpu"))
    preprocess = Preprocess.of(spec, reuse=True)       # one per measuring thread, as per executor
    frames = torch.randint(0, 256, (batch, *spec.frame_shape), dtype=torch.uint8)
    k = min(5, len(spec.labels))
    state = {"threads_set": False}

    def step():
        if not state["threads_set"]:         # in the measuring thread: its own OpenMP team
            torch.get_num_threads()          # see enter_device_thread in daemon/pipeline/thread_pools.py
            torch.set_num_threads(threads)
            state["threads_set"] = True
        with torch.inference_mode():
            raw = replica(preprocess(frames))
            logits = raw[0] if isinstance(raw, (tuple, list)) else raw
            torch.softmax(logits.float(), dim=1).topk(k, dim=1)[0].tolist()

    return step


def measure(model, devices: int, threads: int, batch: int, seconds: float) -> dict:
    """``devices`` threads with ``threads`` torch threads each run ``batch``-frame batches at once
    for ``seconds``: total img/s and mean ms per batch. Raises what a forward pass raised."""
    out: list = [None] * devices
    barrier = threading.Barrier(devices)
    workers = [threading.Thread(target=_run_batches, name=f"inferd-layout-{i}", daemon=True,
                                args=(_step(model, threads, batch), seconds, barrier, out, i))
               for i in range(devices)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for r in out:
        if isinstance(r, BaseException) and not isinstance(r, threading.BrokenBarrierError):
            raise r
    done = [r for r in out if isinstance(r, tuple)]
    if len(done) != devices:
        raise RuntimeError("a layout measuring thread stopped without a result")
    return {"img_s": sum(c * batch / t for c, t in done),
            "batch_ms": 1000.0 * sum(t / c for c, t in done) / devices}


def profile(model, max_batch: int, seconds: float, cores: int) -> list[dict]:
    """The measured table: one row per candidate layout, batch 1 and batch ``max_batch``."""
    table = []
    for k, t in candidates(cores):
        one = measure(model, k, t, 1, seconds)
        full = measure(model, k, t, max_batch, seconds)
        table.append({"devices": k, "threads": t, "batch1_ms": round(one["batch_ms"], 3),
                      "batch1_img_s": round(one["img_s"], 1), "full_batch": max_batch,
                      "full_ms": round(full["batch_ms"], 3), "full_img_s": round(full["img_s"], 1)})
    return table


def expand(devices: list, model, cfg) -> list:
    """``devices`` with its one ``cpu:auto`` entry replaced by the measured layout's CPU devices
    (in its place; other entries kept). ConfigError if cpu:auto is listed beside another CPU device
    or twice."""
    autos = [i for i, d in enumerate(devices) if d.name == "cpu:auto"]
    others = [d for d in devices if d.name == "cpu"]
    if len(autos) > 1 or others:
        raise ConfigError("--device cpu:auto chooses every CPU device and its threads: list it once, "
                          "with no other cpu device (cuda:N devices may stand beside it)")
    cores = len(usable_cores())
    t0 = time.monotonic()
    table = profile(model, cfg.batching.max_batch, cfg.threads.auto_measure_s, cores)
    best = choose(table)
    for row in table:
        log.info("cpu:auto: %d x %d threads: batch 1 %.2f ms (%.1f img/s), batch %d %.2f ms "
                 "(%.1f img/s)%s", row["devices"], row["threads"], row["batch1_ms"], row["batch1_img_s"],
                 row["full_batch"], row["full_ms"], row["full_img_s"], "  <- chosen" if row is best else "")
    log.info("cpu:auto: %d CPU device(s) of %d thread(s) on %d usable cores (measured in %.1f s; "
             "rule: NOTE [ cpu layout ] in daemon/pipeline/cpu_layout.py)", best["devices"], best["threads"], cores,
             time.monotonic() - t0)
    record_layout({"chosen": {"devices": best["devices"], "threads": best["threads"]},
                   "usable_cores": cores, "tolerance": TOLERANCE, "table": table})
    i = autos[0]
    chosen = [DeviceConfig("cpu", best["threads"]) for _ in range(best["devices"])]
    return [*devices[:i], *chosen, *devices[i + 1:]]
