"""The collector's staging of one batch, in process: ``python -m bench.feed.stage [--size 224]
[--batch 40] [--rounds 60] [--alt-path TREE/.pkg]`` prints microseconds a frame (wall and thread CPU).

What a collector does to a batch it took (daemon/pipeline/collector.py ``Collector._stage``): each
frame copied out of its ring slot into the staging buffer, hashed (content hash and cache key),
claimed among its session's leaders and looked up in a real result cache file (a miss), here for
``--batch`` frames spread over four memfd rings of random frames, one thread, no daemon, no other
thread taking the GIL. With ``--alt-path`` the other tree's ``collector.py`` is loaded beside this
one (as a module of this tree's package: only the collector's code differs, the hashing and the
rings are this tree's) and the two are timed in turns, four times, each first in two: a change to
the staging judged where the machine's noise reaches least (docs/benchmarks.md, Feed rate).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
import time

import numpy as np

from inferd.daemon.front.session import Leaders
from inferd.daemon.pipeline import collector as this_collector
from inferd.daemon.pipeline.records import BatchEntry, BatchResult, Request
from inferd.shm import cache as cachefile
from inferd.shm.ring import Ring, RingGeometry

RINGS = 4
SLOTS = 64
KEYING = ("d" * 64, "uint8_nhwc")


class _Caches:
    """What a collector asks of Caches (daemon/caching/results.py), over a real cache file."""

    keying = KEYING

    def __init__(self, path: str):
        self.cache = cachefile.ResultCache.open_writer(path, 64 << 20)

    def hash_row(self, row, keying=None):
        content = cachefile.content_hash(row)
        return content, cachefile.cache_key(*(keying or self.keying), content)

    def peek(self, key, top_k):
        hit = self.cache.lookup(key)
        return hit if hit is not None and len(hit) >= top_k else None


class _Session(Leaders):
    def __init__(self):
        self._init_leaders()


def _load_alt(pkg: str):
    path = os.path.join(pkg, "inferd", "daemon", "pipeline", "collector.py")
    spec = importlib.util.spec_from_file_location("inferd.daemon.pipeline._alt_collector", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _time(module, caches, rings, rows, batch: int, rounds: int) -> tuple[float, float]:
    """(wall, thread CPU) microseconds a frame of ``module``'s ``Collector._stage``."""
    col = object.__new__(module.Collector)
    col._caches = caches
    wall = cpu = 0.0
    for k in range(rounds):
        sessions = [_Session() for _ in rings]
        live = []
        for i in range(batch):
            ring = i * len(rings) // batch
            r = Request(sessions[ring], rings[ring], i, (i * 7 + k) % SLOTS, 5, 0.0, 1e9, hash=True)
            live.append(BatchEntry(r, 0))
        t0, c0 = time.perf_counter(), time.thread_time()
        staged = col._stage(BatchResult(None, live), list(live), rows)
        wall += time.perf_counter() - t0
        cpu += time.thread_time() - c0
        assert len(staged) == batch
    return 1e6 * wall / rounds / batch, 1e6 * cpu / rounds / batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--alt-path", default="", help="another tree's .pkg: its collector.py timed beside")
    a = p.parse_args(argv)
    nbytes = a.size * a.size * 3
    work = tempfile.mkdtemp(prefix="inferd-stage-")
    rings, fds = [], []
    try:
        rng = np.random.default_rng(0)
        for _ in range(RINGS):
            ring, fd = Ring.create(RingGeometry(SLOTS, nbytes))
            rings.append(ring)
            fds.append(fd)
            for s in range(SLOTS):
                ring.slot(s, nbytes)[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
        caches = _Caches(os.path.join(work, "cache"))
        rows = np.zeros((SLOTS, a.size, a.size, 3), np.uint8)
        if hasattr(this_collector, "slot_copy"):
            this_collector.slot_copy.warm()
        trees = [("this", this_collector)] + ([("alt", _load_alt(a.alt_path))] if a.alt_path else [])
        for turn in range(4):
            # in turns, first one then the other first: the second reads slots the first left in
            # the last-level cache (a batch of 224x224 frames is 6 MB), which alone gave it 5-10 %
            cells = {}
            for name, module in (trees if turn % 2 == 0 else trees[::-1]):
                wall, cpu = _time(module, caches, rings, rows, a.batch, a.rounds)
                cells[name] = f"{name} {wall:6.1f} us a frame (CPU {cpu:6.1f})"
            print(f"{a.size}x{a.size}, batch {a.batch}: " + "   ".join(cells[n] for n, _ in trees)
                  + ("   (alt first)" if turn % 2 and len(trees) > 1 else ""))
        caches.cache.close()
    finally:
        for ring in rings:
            ring.close()
        for fd in fds:
            os.close(fd)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
