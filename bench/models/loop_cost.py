"""The event loop's own work per request for one model, in process: ``python -m bench.models.loop_cost
[BATCHES] [BATCH]`` prints one JSON line.

A Scheduler (daemon/dispatch/scheduler.py) is driven by hand, as the unit tests drive it: a fake
session submits BATCH classify requests, the device's queue is drained into one BatchResult whose
entries are all answered, and ``on_batch_done`` replies to them, BATCHES times; no model, no
socket, no thread. What is timed (CPU seconds of this process per request) is admission, the
queue, the replies and the statistics: the part of the request path that runs on the loop and
that a many-models daemon reworked (catalog resolution, lanes, per-model statistics). Beside the
CPU time, which a shared machine blurs by tens of percent from run to run, it counts the Python
function calls per request (a second pass under cProfile): deterministic, the same on any machine,
so a difference in the work per request shows even where the times cannot resolve it. It runs on
whichever ``inferd`` package PYTHONPATH names, so bench/models/single.py runs it on two trees.
"""
from __future__ import annotations

import cProfile
import json
import pstats
import sys
import time
from types import SimpleNamespace


class FakeSession:
    """What the scheduler touches of a Session (tests/helpers.py FakeSession, replies dropped)."""

    def __init__(self, uid: int, frame_bytes: int, slots: int):
        from inferd.daemon.dispatch.queues import ThinkTime
        from inferd.shm.ring import RingGeometry

        self.peer = (4242, uid, uid)
        self.ring = SimpleNamespace(geometry=RingGeometry(slots, frame_bytes))
        self.inflight, self.pending = {}, {}
        self.closed, self.told_gen, self.batches = False, 0, True
        self.think = ThinkTime()

    def send(self, message):
        pass

    def write(self, data):
        pass

    def claim(self, key, request):
        return request

    def unclaim(self, key, request):
        pass

    def release_ring(self):
        pass


def measure(batches: int, batch: int) -> dict:
    from inferd.daemon.config import Config
    from inferd.daemon.dispatch.device import Device
    from inferd.daemon.dispatch.scheduler import Scheduler
    from inferd.daemon.models.loading import ModelSpec
    from inferd.daemon.pipeline.records import BatchResult, Outcome

    spec = ModelSpec("shapes", 64, 64, (0.5,) * 3, (0.25,) * 3, tuple("abcdefgh"), 5)
    cfg = Config()
    cfg.cache.enabled = False
    cfg.batching.queue_limit = 4 * batch
    now = [10.0]
    dev = Device(0, "cpu", 1)
    sched = Scheduler(cfg, SimpleNamespace(spec=spec, digest="digest", gen=0), [dev], lambda: now[0])
    session = FakeSession(1000, spec.frame_bytes, batch)
    msgs = [{"op": "classify", "slot": i, "nbytes": spec.frame_bytes, "dtype": "uint8",
             "shape": list(spec.frame_shape), "top_k": 1} for i in range(batch)]
    top = [[0, 1.0]]
    rid = 0

    def one_batch() -> None:
        nonlocal rid
        for m in msgs:
            sched.submit(session, rid, m)
            rid += 1
        result = BatchResult.taking(dev, dev.queue.drain())
        for e in result.entries:
            e.outcome, e.top = Outcome.DONE, top
        now[0] += 0.001
        result.started, result.finished = now[0] - 0.0008, now[0] - 0.0001
        sched.on_batch_done(result)

    for _ in range(max(batches // 10, 10)):            # warm-up
        one_batch()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(batches):
        one_batch()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    n = batches * batch
    assert sched.stats.outcomes["ok"] >= n, dict(sched.stats.outcomes)
    counted = max(batches // 10, 10)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(counted):
        one_batch()
    profile.disable()
    calls = pstats.Stats(profile).total_calls / (counted * batch)
    return {"requests": n, "cpu_us_per_request": cpu / n * 1e6, "wall_us_per_request": wall / n * 1e6,
            "calls_per_request": calls}


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    print(json.dumps(measure(*(args or [2000]), *([] if len(args) > 1 else [16]))))
