"""What hashing frames in parallel can gain here: ``python -m bench.feed.hashing [--size 224]
[--count 2000]`` prints the BLAKE3 of one frame (``inferd.shm.cache.content_hash``, the daemon's own
call) in microseconds a hash and frames/s for one thread, two threads of one process and two
processes, all in the same run.

BLAKE3 lets go of the GIL over the frame, so two threads of one process could hash two frames at
once; but each call takes the GIL back after it (and holds it for the call's Python), so two
threads hand the GIL over around every hash, and on a machine whose thread wake-ups are slow
those hand-overs eat what the second core adds. Two processes share nothing and show what the
cores themselves allow. This bounds any in-process parallel staging of a device's batch (the
collector's copy and hash of each frame, daemon/pipeline/collector.py); docs/benchmarks.md, Feed
rate, says what was tried.
"""
from __future__ import annotations

import argparse
import multiprocessing
import threading
import time

import numpy as np

from inferd.shm.cache import content_hash


def _hash_us(frame: np.ndarray, count: int) -> float:
    content_hash(frame)
    t0 = time.perf_counter()
    for _ in range(count):
        content_hash(frame)
    return 1e6 * (time.perf_counter() - t0) / count


def _threads(frames: list[np.ndarray], count: int) -> list[float]:
    out = [0.0] * len(frames)
    start = threading.Barrier(len(frames))

    def run(i: int) -> None:
        start.wait()
        out[i] = _hash_us(frames[i], count)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(len(frames))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return out


def _child(size: int, count: int, start, results) -> None:
    frame = np.random.default_rng().integers(0, 256, (size, size, 3), dtype=np.uint8)
    start.wait()
    results.put(_hash_us(frame, count))


def _processes(size: int, count: int, n: int) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(size, count, start, results)) for _ in range(n)]
    for p in procs:
        p.start()
    out = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224, help="frame side: size x size x 3 uint8")
    p.add_argument("--count", type=int, default=2000, help="hashes per thread or process")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (a.size, a.size, 3), dtype=np.uint8) for _ in range(2)]
    rows = [("one thread", [_hash_us(frames[0], a.count)]),
            ("two threads, one process", _threads(frames, a.count)),
            ("two processes", _processes(a.size, a.count, 2))]
    one = 1e6 / rows[0][1][0]
    print(f"BLAKE3 of a {a.size}x{a.size}x3 frame ({a.size * a.size * 3:,} bytes), {a.count} hashes each:")
    for name, us in rows:
        fps = sum(1e6 / u for u in us)
        print(f"  {name:26s} {' / '.join(f'{u:5.1f}' for u in us):>13s} us a hash   "
              f"{fps:9,.0f} frames/s   {fps / one:4.2f}x one thread")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
