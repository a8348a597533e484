"""Part (c), the thread hand-offs alone: what one hop between the event loop and a worker thread
costs on this machine, without sockets, protocol or model.

One spawned process runs a uvloop event loop and worker threads and passes a timestamp around a
ring of hops, one at a time, the way the daemon passes a request (NOTE [ request path ] in
daemon/pipeline/collector.py):

    loop --Condition.notify--> thread 1 [--queue.SimpleQueue--> thread 2] --call_soon_threadsafe--> loop

Each hop is the wake of a thread blocked on a lock (a futex) plus its wait for the GIL. Measured:

- ``cond``: loop -> thread by a Condition-guarded list (the daemon's DeviceQueue), and back by
  ``call_soon_threadsafe`` (the daemon's deliver): the two hops of a one-thread batcher;
- ``simple``: the same with a ``queue.SimpleQueue`` (C, no Python-level Condition) loop -> thread;
- ``two_threads``: loop -> collector -> executor -> loop, the three hops of a collector +
  executor pipeline.

A no-op round trip through the daemon cannot be shorter than the bare socket round trip plus
these hops; bench/load/transport.py reports them beside it.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback

from ..lib.measure import latency_stats
from ..lib.procs import RESULT_GRACE_S, run_in_child


class _CondQueue:
    """A list under a Condition, as daemon/dispatch/queues.py's DeviceQueue keeps its requests."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._items: list = []

    def put(self, item) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def get(self):
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._items.pop(0)


def _chain(kind: str, count: int, warmup: int) -> dict:
    """``count`` timed trips around the ring of hops named by ``kind``; per-hop latency stats."""
    loop = asyncio.new_event_loop()
    first = _CondQueue() if kind != "simple" else queue.SimpleQueue()
    second = queue.SimpleQueue() if kind == "two_threads" else None
    hops: list[list[float]] = []
    done = loop.create_future()

    def back(stamps: list) -> None:                      # on the loop
        stamps.append(time.perf_counter())
        hops.append(stamps)
        if len(hops) >= warmup + count:
            done.set_result(None)
        else:
            first.put([time.perf_counter()])

    def collector() -> None:
        while (stamps := first.get()) is not None:
            stamps.append(time.perf_counter())
            if second is not None:
                second.put(stamps)
            else:
                loop.call_soon_threadsafe(back, stamps)

    def executor() -> None:
        while (stamps := second.get()) is not None:
            stamps.append(time.perf_counter())
            loop.call_soon_threadsafe(back, stamps)

    threads = [threading.Thread(target=collector, daemon=True)]
    if second is not None:
        threads.append(threading.Thread(target=executor, daemon=True))
    for t in threads:
        t.start()
    loop.call_soon(first.put, [time.perf_counter()])
    loop.run_until_complete(done)
    first.put(None)
    if second is not None:
        second.put(None)
    for t in threads:
        t.join(5.0)
    loop.close()
    timed = hops[warmup:]
    names = ["loop_to_thread", "thread_to_thread", "thread_to_loop"] if second is not None \
        else ["loop_to_thread", "thread_to_loop"]
    out = {name: latency_stats([h[i + 1] - h[i] for h in timed]) for i, name in enumerate(names)}
    out["all_hops"] = latency_stats([h[-1] - h[0] for h in timed])
    return out


def _child(q, count: int, warmup: int) -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        q.put(("ok", {kind: _chain(kind, count, warmup) for kind in ("cond", "simple", "two_threads")}))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def measure(count: int, warmup: int = 200) -> dict:
    """The hop latencies of each kind, measured in one spawned process."""
    return run_in_child(_child, (count, warmup), RESULT_GRACE_S, "bench-handoff")
