"""The one-model path's loop cost, in process: ``python -m bench.models.hotpath [--rounds N]``.

What the event loop does per frame for a daemon of one model, without sockets or threads: a
Scheduler with one device and the result cache off takes a ``classify_many`` of 16 frames
(admission, the model's resolution, queueing), the device queue gives them as one batch (the
take a collector makes), and ``on_batch_done`` answers them (replies, stamps, stats). Prints the
median microseconds per frame of ``--rounds`` rounds of 500 messages, and the Python bytecodes
executed per frame (counted with sys.settrace over 50 messages: deterministic, where the time on a
shared host moves by a quarter between runs of one tree). It uses only what the code before
several models had too, so the same file measures both sides of a change: run it with
``PYTHONPATH`` at each tree, alternating (docs/benchmarks.md, Many models).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

from ..lib.measure import bytecodes
from .loop_cost import FakeSession

FRAMES = 16
MESSAGES = 500


def setup():
    from inferd.daemon.config import Config
    from inferd.daemon.dispatch.device import Device
    from inferd.daemon.dispatch.scheduler import Scheduler
    from inferd.daemon.models.loading import ModelSpec
    from inferd.daemon.pipeline.records import BatchResult, Outcome

    spec = ModelSpec("shapes", 64, 64, (0.5,) * 3, (0.25,) * 3, tuple("abcdefgh"), 5)
    cfg = Config()
    cfg.cache.enabled = False
    cfg.metrics.enabled = True
    dev = Device(0, "cpu", 1)
    for b in (1, FRAMES):
        dev.profile.observe(b, 0.0001 * b)
    sched = Scheduler(cfg, SimpleNamespace(spec=spec, digest="digest", gen=1), [dev], time.monotonic)
    session = FakeSession(1000, spec.frame_bytes, 64)
    session.told_gen = 1                     # it knows generation 1
    msg = {"op": "classify_many", "slots": list(range(FRAMES)), "nbytes": spec.frame_bytes, "dtype": "uint8",
           "shape": list(spec.frame_shape), "top_k": 5}
    top = [[0, 0.9], [1, 0.05], [2, 0.03], [3, 0.01], [4, 0.01]]
    plan = lambda now, queued, expected=(), mid=0: (len(queued), 0.0)

    def one(i: int) -> None:
        sched.submit_many(session, i * FRAMES + 1, msg)
        batch = dev.queue.take(plan, 0.0)
        result = BatchResult.taking(dev, batch)
        result.gen = 1
        if hasattr(result, "mid"):          # (a tree before several models has no model id)
            result.mid = 0
        for e in result.entries:
            e.outcome, e.top = Outcome.DONE, top
        sched.on_batch_done(result)
    return one


def round_us() -> float:
    one = setup()
    t0 = time.perf_counter()
    for i in range(MESSAGES):
        one(i)
    return (time.perf_counter() - t0) / (MESSAGES * FRAMES) * 1e6


def bytecodes_per_frame(messages: int = 50) -> float:
    """Bytecodes the loop's Python runs per frame (every frame of the call tree, this file's too)."""
    one = setup()
    for i in range(10):
        one(i)
    return bytecodes(lambda: [one(i) for i in range(10, 10 + messages)]) / (messages * FRAMES)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    round_us()                               # warm
    rounds = [round_us() for _ in range(args.rounds)]
    print(json.dumps({"us_per_frame_median": statistics.median(rounds), "min": min(rounds),
                      "bytecodes_per_frame": bytecodes_per_frame(), "rounds": rounds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
