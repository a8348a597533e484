"""Part 4 of the cache benchmark: what hashing costs next to inference, for ResNet-50 at 224x224.

Hashing side: ``inferd.shm.cache.content_hash`` of one 224x224x3 uint8 frame, the cache key, and a
client-side lookup that misses (what a ``Client(cache=True)`` pays for every frame it then sends),
timed in a child process; and the daemon's own figure, ``info()["cache"]["hash_us_mean"]`` (copy of
the frame out of the ring + content hash + cache key, per request), from a real
``--model resnet50 --set model.input_height=224`` daemon that classifies a few dozen fresh frames.

Inference side (the baseline): in a child process with ``torch.set_num_threads(2)``, the built-in
``resnet50`` at 224x224, ``to_input`` + forward under ``torch.inference_mode``, batch 1 and batch 8,
per image; plus the same daemon's own model time per frame (its counters).
"""
from __future__ import annotations

import time
import traceback

import numpy as np

from ..lib.daemons import cache_daemon, daemon_summary
from ..lib.measure import frames, time_calls, us_stats
from ..lib.procs import run_in_child

SIZE = 224
THREADS = 2
DAEMON_ARGS = ["--model", "resnet50", "--set", f"model.input_height={SIZE}",
               "--set", f"model.input_width={SIZE}", "--set", "batching.max_batch=8"]


def hash_costs(count: int) -> dict:
    """content_hash, cache_key and a missing lookup for one 224x224x3 frame (in this process)."""
    import os
    import shutil
    import tempfile

    from inferd.shm import cache as cf

    f = frames(1, SIZE, seed=3)[0]
    tmp = tempfile.mkdtemp(prefix="inferd-cbh", dir="/tmp")
    try:
        w = cf.ResultCache.open_writer(os.path.join(tmp, "h.cache"), 64 * 2**20)
        r = cf.ResultCache.open_reader(os.path.join(tmp, "h.cache"))
        try:
            h = cf.content_hash(f)
            out = {"content_hash": us_stats(time_calls(lambda: cf.content_hash(f), count, 50)),
                   "cache_key": us_stats(time_calls(lambda: cf.cache_key("d" * 32, "p" * 80, h), count, 50)),
                   "client_lookup_miss": us_stats(time_calls(
                       lambda: r.lookup(cf.cache_key("d" * 32, "p" * 80, cf.content_hash(f))), count, 50)),
                   "frame_copy": us_stats(time_calls(lambda: f.copy(), count, 50))}
        finally:
            r.close()
            w.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["frame_bytes"] = int(f.nbytes)
    return out


def _inference_child(q, warmup_s: float, seconds: float) -> None:
    """Child: per-image time of resnet50 @ 224 at batch 1 and batch 8, 2 threads."""
    try:
        import torch

        torch.set_num_threads(THREADS)
        from inferd.daemon.models import zoo
        from inferd.daemon.pipeline.preprocess import to_input

        model, spec = zoo.build("resnet50", input_size=SIZE)
        rows = []
        for batch in (1, 8):
            x = torch.from_numpy(frames(batch, SIZE, seed=batch))

            def step():
                with torch.inference_mode():
                    return model(to_input(x, spec.mean, spec.std))

            for _ in range(3):                           # first calls build the kernels' plans
                step()
            end = time.perf_counter() + warmup_s
            while time.perf_counter() < end:
                step()
            times = []
            start = time.perf_counter()
            while time.perf_counter() - start < seconds or len(times) < 3:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            times = np.asarray(times)
            rows.append({"batch": batch, "batches": int(times.size),
                         "ms_per_image_p50": 1000.0 * float(np.median(times)) / batch,
                         "ms_per_image_mean": 1000.0 * float(times.mean()) / batch,
                         "ms_per_batch_min": 1000.0 * float(times.min()),
                         "ms_per_batch_max": 1000.0 * float(times.max())})
        q.put(("ok", {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads()}))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def daemon_hash(count: int) -> dict:
    """The daemon's hash_us_mean and model time per frame, resnet50 @ 224, ``count`` fresh frames
    sent one at a time and then as one pipelined ``classify_many``, through a cache=True client."""
    from inferd.client import Client

    fr = frames(2 * count, SIZE, seed=21)
    with cache_daemon(DAEMON_ARGS) as d:
        with Client(d["socket"], cache=True) as c:
            for f in fr[:count]:
                c.classify(f)
            c.classify_many(list(fr[count:]))
            info = c.info()
    cache, cnt = info["cache"], info["counters"]
    return {"hash_us_mean": cache["hash_us_mean"], "requests": cache["misses"] + cache["daemon_hits"],
            "model_ms_per_frame": 1000.0 * cnt["model_seconds"] / max(cnt["frames"], 1),
            "frames": cnt["frames"], "batches": cnt["batches"], "daemon": daemon_summary(d)}


def measure(count: int, warmup_s: float, seconds: float, daemon_frames: int) -> dict:
    """Part 4: hashing figures, inference baseline, ratios."""
    out = {"hash": hash_costs(count)}
    out["inference"] = run_in_child(_inference_child, (warmup_s, seconds), 4 * (warmup_s + seconds) + 120,
                                    "bench-cache-r50")
    out["daemon"] = daemon_hash(daemon_frames)
    h = out["hash"]
    costs = {"content_hash": h["content_hash"]["p50_us"],
             "client_hash_key_lookup": h["client_lookup_miss"]["p50_us"],
             "daemon_copy_hash_key": out["daemon"]["hash_us_mean"]}
    costs["both_sides"] = costs["client_hash_key_lookup"] + costs["daemon_copy_hash_key"]
    out["costs_us"] = costs
    out["ratios"] = {}
    for r in out["inference"]["rows"]:
        per_image_us = 1000.0 * r["ms_per_image_p50"]
        out["ratios"][f"batch{r['batch']}"] = {k: v / per_image_us for k, v in costs.items()}
    return out
