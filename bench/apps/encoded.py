"""Applications, encoded images (uploads of JPEG or PNG bytes): the measurements ``python -m bench.apps`` runs as
``--only jpeg`` and ``--only repeat``. Each prints ratios against a baseline of the same run.

- ``jpeg_throughput``: classify-from-JPEG (640x480 photos, quality 85, ~60-90 KB: a typical
  upload) with N client processes decoding, against one process decoding; the built-in shapes
  model on one 1-thread device, cache off, so every request is decoded and computed. Also the
  one-process throughput of the same frames sent as arrays (what decoding costs a process).
- ``repeat_upload``: latency of ``classify(jpeg_bytes)`` for a repeat (answered from the result
  cache by the hash of the bytes, no decode: the target is <= 50 us) against a first upload
  (decode, round trip, model) and against a repeat of the decoded array (content hash of the
  frame); plus the daemon's CPU per first upload with its bytes sent (verified: one decode on its
  decode thread) against the same frames sent without them, and what hashing alone costs for
  a larger file.
- ``repeat_large_upload`` (``python -m bench.apps.encoded --large``): the same for a ~90 KB file
  that spans a run of ring slots, against a client whose ring is too small to send it.
"""
from __future__ import annotations

import io
import os
import statistics
import time

import numpy as np

from ..lib.daemons import daemon
from ..lib.measure import cpu_seconds, sleep_until, time_calls
from ..lib.procs import counts_per_second, report_ready

SHAPES = ["--model", "shapes", "--device", "cpu:1"]
CACHED = [*SHAPES, "--set", "cache.enabled=true", "--set", "embeddings.enabled=false"]


def photo(seed: int, h: int, w: int) -> np.ndarray:
    """A photo-like RGB image (smooth gradients and texture, so JPEG sizes are realistic)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / rng.uniform(8, 40) + rng.uniform(0, 6))
                    * np.cos(y / rng.uniform(8, 40)) for _ in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(array: np.ndarray, quality: int = 85) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, "JPEG", quality=quality)
    return out.getvalue()


# -- jpeg_throughput --------------------------------------------------------------------------------
def _jpeg_client(q, index: int, socket_path: str, seconds: float, kind: str, start, go, stop) -> None:
    """Classify 8 JPEGs (``kind`` "jpeg": as bytes, decoded here each time; "array": their frames)
    round robin until the shared window ends; the count of answers inside it."""
    try:
        from inferd.client import Client
        from inferd.client import decode

        files = [jpeg(photo(os.getpid() * 10 + i, 480, 640)) for i in range(8)]
        with Client(socket_path, cache=False) as c:
            h, w, _ = c.model.input_shape
            items = files if kind == "jpeg" else [decode.decode(f, h, w) for f in files]
            c.classify(items[0])
            report_ready(q, index, go)
            sleep_until(start.value)
            n, end = 0, start.value + seconds
            while time.monotonic() < end:
                c.classify(items[n % len(items)])
                n += 1
        q.put(("ok", ("done", index, n)))
    except Exception:                                     # noqa: reported to the parent
        import traceback
        q.put(("error", traceback.format_exc()))


def _round(socket_path: str, processes: int, kind: str, seconds: float) -> float:
    """``processes`` clients of ``kind`` over one shared window: answers/s."""
    return counts_per_second([(_jpeg_client, (socket_path, seconds, kind))] * processes, seconds,
                             name="bench-jpeg")


def jpeg_throughput(processes: tuple = (2, 4), seconds: float = 4.0, rounds: int = 2) -> dict:
    """Images/s classified from JPEG bytes by N processes against one; rounds interleaved (1 array,
    1 JPEG, 2, 4, then again), each figure the mean of its rounds (each round's kept too)."""
    kinds = [("one_array", 1, "array"), ("one_jpeg", 1, "jpeg"), *((f"{n}_jpeg", n, "jpeg") for n in processes)]
    out = {"seconds": seconds, "cpus": os.cpu_count(), "rounds": {name: [] for name, _, _ in kinds}}
    with daemon(SHAPES) as d:
        for _ in range(rounds):
            for name, n, kind in kinds:
                out["rounds"][name].append(round(_round(d["socket"], n, kind, seconds), 1))
    for name, _, _ in kinds:
        out[name] = sum(out["rounds"][name]) / rounds
    print(f"[jpeg] 1 process: {out['one_jpeg']:.0f} img/s from JPEG, {out['one_array']:.0f} img/s from "
          f"arrays (ratio {out['one_jpeg'] / out['one_array']:.2f}); " + ", ".join(
              f"{n} processes {out[f'{n}_jpeg']:.0f} img/s ({out[f'{n}_jpeg'] / out['one_jpeg']:.2f}x one)"
              for n in processes) + f"; {out['cpus']} CPUs; rounds {out['rounds']}", flush=True)
    return out


# -- repeat_upload ----------------------------------------------------------------------------------
def _us(seconds: list[float]) -> dict:
    return {"p50_us": round(1e6 * statistics.median(seconds), 1),
            "p99_us": round(1e6 * float(np.percentile(seconds, 99)), 1), "n": len(seconds)}


def repeat_upload(first: int = 100, repeats: int = 2000) -> dict:
    """Repeat-upload latency against a first upload; the daemon's CPU per verified first upload."""
    from inferd.client import Client
    from inferd.client import decode

    out = {}
    with daemon(CACHED) as d:
        with Client(d["socket"]) as c:
            h, w, _ = c.model.input_shape
            slot = h * w * 3
            # uploads that fit the default ring's slot (h*w*3 bytes), so their bytes are sent
            small = [jpeg(photo(1000 + i, 120, 160), 80) for i in range(2 * first + 1)]
            assert max(map(len, small)) <= slot, (max(map(len, small)), slot)
            frames = [decode.decode(f, h, w) for f in small[first:2 * first]]
            pid = d["proc"].pid
            c.classify(jpeg(photo(999, 120, 160), 80))     # the daemon's decode thread and Pillow, loaded
            cpu = {"upload": 0.0, "array": 0.0}
            firsts = []
            for block in range(0, first, 10):              # interleaved: same hit rate, same load
                t = cpu_seconds(pid)
                for f in small[block:block + 10]:
                    firsts += time_calls(lambda f=f: c.classify(f), 1)
                t, cpu["upload"] = cpu_seconds(pid), cpu["upload"] + cpu_seconds(pid) - t
                for f in frames[block:block + 10]:
                    c.classify(f)
                cpu["array"] += cpu_seconds(pid) - t
            out["first_upload"] = _us(firsts)
            info = c.info()["cache"]
            out["daemon_cpu_us_per_upload"] = round(1e6 * cpu["upload"] / first, 1)
            out["daemon_cpu_us_per_array"] = round(1e6 * cpu["array"] / first, 1)
            out["uploads"] = {k: info[k] for k in info if k.startswith("uploads_")}
            data = small[-1]
            c.classify(data)                               # the entry is made off the daemon's loop:
            t_end = time.monotonic() + 10                  # wait for it (cache_hits counts the hit)
            while c.cache_hits == 0 and time.monotonic() < t_end:
                c.classify(data)
            hits = c.cache_hits
            out["repeat_upload"] = _us(time_calls(lambda: c.classify(data), repeats))
            out["repeat_hits"] = c.cache_hits - hits
            frame = decode.decode(data, h, w)
            out["repeat_array"] = _us(time_calls(lambda: c.classify(frame), repeats))
            out["decode_only"] = _us(time_calls(lambda: decode.decode(data, h, w), 200))
            out["upload_bytes"] = len(data)
            big = jpeg(photo(7, 480, 640))
            out["hash_only_big"] = {"bytes": len(big), **_us(time_calls(lambda: decode.prepare(big, h, w), 500))}
            out["decode_only_big"] = _us(time_calls(lambda: decode.decode(big, h, w), 100))
    r, f = out["repeat_upload"]["p50_us"], out["first_upload"]["p50_us"]
    print(f"[repeat] classify(jpeg bytes, {out['upload_bytes']} B): repeat p50 {r} us (p99 "
          f"{out['repeat_upload']['p99_us']}), first upload p50 {f} us: ratio {r / f:.3f}; repeat of the "
          f"decoded array p50 {out['repeat_array']['p50_us']} us; decode alone {out['decode_only']['p50_us']} us; "
          f"{out['hash_only_big']['bytes']} B file: read+hash {out['hash_only_big']['p50_us']} us, decode "
          f"{out['decode_only_big']['p50_us']} us; daemon CPU per first upload {out['daemon_cpu_us_per_upload']} us "
          f"against {out['daemon_cpu_us_per_array']} us per array; {out['uploads']}", flush=True)
    return out


def repeat_large_upload(first: int = 40, repeats: int = 1000) -> dict:
    """A 640x480 JPEG (~90 KB, a run of 8 slots of the default ring): the repeat answered by the
    hash of its bytes against the baseline of a client whose ring is too small for the run (2
    slots: the bytes are not sent, so a repeat is decoded and found by the frame's hash, as every
    upload over one slot was before runs); and the daemon's CPU per verified first upload of it
    against the same frames sent as arrays, interleaved in blocks of 10."""
    from inferd.client import Client
    from inferd.client import decode

    out = {}
    with daemon(CACHED) as d:
        pid = d["proc"].pid
        with Client(d["socket"]) as c, Client(d["socket"], ring_slots=2) as small_ring:
            h, w, _ = c.model.input_shape
            files = [jpeg(photo(3000 + i, 480, 640)) for i in range(2 * first + 2)]
            out["bytes"], out["slots"] = len(files[-1]), -(-len(files[-1]) // (h * w * 3))
            frames = [decode.decode(f, h, w) for f in files[first:2 * first]]
            c.classify(jpeg(photo(2999, 480, 640)))        # the daemon's decode thread, loaded
            cpu = {"upload": 0.0, "array": 0.0}
            for block in range(0, first, 10):
                t = cpu_seconds(pid)
                for f in files[block:block + 10]:
                    c.classify(f)
                t, cpu["upload"] = cpu_seconds(pid), cpu["upload"] + cpu_seconds(pid) - t
                for f in frames[block:block + 10]:
                    c.classify(f)
                cpu["array"] += cpu_seconds(pid) - t
            out["daemon_cpu_us_per_upload"] = round(1e6 * cpu["upload"] / first, 1)
            out["daemon_cpu_us_per_array"] = round(1e6 * cpu["array"] / first, 1)
            for client, data, name in ((c, files[-1], "repeat_run"), (small_ring, files[-2], "repeat_not_sent")):
                client.classify(data)
                t_end, hits = time.monotonic() + 10, client.cache_hits
                while client.cache_hits == hits and time.monotonic() < t_end:   # the entry, off the loop
                    client.classify(data)
                hits = client.cache_hits
                out[name] = _us(time_calls(lambda: client.classify(data), repeats))
                out[name]["hits"] = client.cache_hits - hits
            out["uploads"] = {k: v for k, v in c.info()["cache"].items() if k.startswith("uploads_")}
    r, b = out["repeat_run"]["p50_us"], out["repeat_not_sent"]["p50_us"]
    print(f"[repeat-large] {out['bytes']} B JPEG, {out['slots']} slots: repeat p50 {r} us (p99 "
          f"{out['repeat_run']['p99_us']}) against {b} us with its bytes not sent: ratio {r / b:.3f}; daemon "
          f"CPU per first upload {out['daemon_cpu_us_per_upload']} us against {out['daemon_cpu_us_per_array']} "
          f"us per array; {out['uploads']}", flush=True)
    return out


if __name__ == "__main__":
    import json
    import sys

    quick = "--quick" in sys.argv
    if "--large" in sys.argv:
        print(json.dumps(repeat_large_upload(), indent=1))
        sys.exit(0)
    print(json.dumps({"repeat": repeat_upload(), "jpeg": jpeg_throughput(seconds=3.0 if quick else 4.0)}, indent=1))
