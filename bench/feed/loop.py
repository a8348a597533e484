"""The event loop's own work per frame of a classify_many with the result cache on, in process:
``python -m bench.feed.loop [--rounds N] [--insert-all]`` prints one JSON line.

bench/models/hotpath.py measures the loop's Python with the cache off; this adds what the cache
costs the loop: a Scheduler with a real cache file (in a temporary folder) takes a 16-frame
``classify_many`` (group admission), the device queue gives them as one batch, every entry comes
back computed with the key and content hash a collector would have found for its row (so
``on_batch_done`` counts lookups, stores answers as a daemon does, and packs the answers), no
socket, no thread. With ``--insert-all`` the hit rate is held over ``cache.min_hit_rate``, so every
answer is inserted (as with repeats in bench.feed), and the pipeline thread's part that a daemon
runs before the loop (``Scheduler.seal_answers``, where the tree has it) is run but not timed:
that work is off the loop. Prints the median microseconds per frame of the rounds and the Python
bytecodes per frame (sys.settrace; this file's too). Runs on whichever ``inferd`` PYTHONPATH names,
so the same file measures two trees (docs/benchmarks.md, Feed rate).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from types import SimpleNamespace

from ..lib.measure import bytecodes
from ..models.loop_cost import FakeSession

FRAMES = 16
MESSAGES = 200


def setup(folder: str, insert_all: bool):
    from inferd.daemon.config import Config
    from inferd.daemon.dispatch.device import Device
    from inferd.daemon.dispatch.scheduler import Scheduler
    from inferd.daemon.models.loading import ModelSpec
    from inferd.daemon.pipeline.records import BatchResult, Outcome

    spec = ModelSpec("shapes", 64, 64, (0.5,) * 3, (0.25,) * 3, tuple("abcdefgh"), 5)
    cfg = Config()
    cfg.embeddings.enabled = False
    cfg.metrics.enabled = True
    dev = Device(0, "cpu", 1)
    for b in (1, FRAMES):
        dev.profile.observe(b, 0.0001 * b)
    sched = Scheduler(cfg, SimpleNamespace(spec=spec, digest="d" * 64, gen=1), [dev], time.monotonic)
    sched.caches.open_cache(os.path.join(folder, "results.cache"))
    session = FakeSession(1000, spec.frame_bytes, 64)
    session.told_gen, session.packed = 1, True
    msg = {"op": "classify_many", "slots": list(range(FRAMES)), "nbytes": spec.frame_bytes, "dtype": "uint8",
           "shape": list(spec.frame_shape), "top_k": 5}
    top = [[0, 0.9], [1, 0.05], [2, 0.03], [3, 0.01], [4, 0.01]]
    plan = lambda now, queued, expected=(), mid=0: (len(queued), 0.0)
    seal = getattr(sched, "seal_answers", None)
    state = {"n": 0, "off_loop": 0.0}

    def one(i: int) -> None:
        sched.submit_many(session, i * FRAMES + 1, msg)
        result = BatchResult.taking(dev, dev.queue.take(plan, 0.0))
        result.gen, result.mid = 1, 0
        for e in result.entries:
            state["n"] += 1
            e.outcome, e.top = Outcome.DONE, top
            e.content = state["n"].to_bytes(32, "little")
            e.key = (state["n"] + 7).to_bytes(32, "little")
            e.looked = not insert_all           # a miss counted (the hit rate falls: inserts sampled)
        result.hashed, result.hash_seconds = len(result.entries), 0.001
        if insert_all:
            sched.caches.hit_rate = 0.5
            if seal is not None:                # the delivering pipeline thread's part: not timed
                t0 = time.perf_counter()
                seal(result)
                state["off_loop"] += time.perf_counter() - t0
        sched.on_batch_done(result)
    return one, state


def measure(rounds: int, insert_all: bool) -> dict:
    folder = tempfile.mkdtemp(prefix="inferd-loop")
    try:
        one, state = setup(folder, insert_all)
        for i in range(20):
            one(i)
        per_frame = []
        for r in range(rounds):
            state["off_loop"] = 0.0
            t0 = time.perf_counter()
            for i in range(MESSAGES):
                one(1000 * (r + 1) + i)
            per_frame.append((time.perf_counter() - t0 - state["off_loop"]) / (MESSAGES * FRAMES) * 1e6)
        count = bytecodes(lambda: [one(100_000 + i) for i in range(50)])
        return {"us_per_frame_median": statistics.median(per_frame), "min": min(per_frame),
                "bytecodes_per_frame": count / (50 * FRAMES), "insert_all": insert_all, "rounds": per_frame}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--insert-all", action="store_true", help="every answer inserted (the hit rate held high)")
    args = p.parse_args()
    print(json.dumps(measure(args.rounds, args.insert_all)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
