"""A device's queue of admitted requests, and the rule that decides when its next batch leaves.

DeviceQueue is an order (daemon/fairness.py: first come first served, or a fair share between uids)
under one lock: the event loop puts requests in (admission) and drains it (a device taken out of
rotation); the device's batching thread takes batches from the front of the order; an idle peer's
batching thread steals from its back. Nobody holds two queue locks at once, so there is no lock
order to get wrong.

NOTE [ batch planning ]

``plan_batch(now, queued, ...)`` returns ``(n, 0.0)``: take the first n now, or ``(0, t)``: wait
until t (or until another request arrives) and ask again. With L(b) the device's measured latency
for a batch of b (daemon/profile.py), B = max_batch, W = max_delay, a0 the arrival of the first
queued request, D(m) the earliest deadline among the first m, and g the smoothed gap between
arrivals at this device ("first" is in the order the device serves: fair share, below):

  1. Full. If n >= B, go now with B. Under a backlog a full batch is what keeps the device at its
     best throughput (admission counted on it); a request in it that cannot finish within the
     batch's time is answered deadline_exceeded by the batching thread without being computed,
     rather than let it shrink the batch: shrinking to save the oldest requests lowers throughput
     and makes every later request later still (a collapse seen in bench/devices.py at 3x load).
  2. Deadline cap (n < B, spare capacity). m = the largest size <= n with now + L(m) <= D(m): the
     batch size at which the oldest frames still meet their deadlines (in the spirit of Clipper's
     adaptive batching, with the measured profile in place of AIMD probing). If m < n, go now
     with m: more frames could only make the batch later.
  3. Worth waiting? A batch of n < B waits for one more frame only if it is expected inside the
     window, now + g <= a0 + W, and the larger batch would still meet the deadlines,
     now + g + L(n+1) <= D(n). Otherwise it goes now: at low load (g large) a frame does not sit
     through a window that will not bring company.
  4. Else wait until min(a0 + W, D(n) - L(n+1)), and decide again when a request arrives.

Before the profile knows anything, L = 0 and g = infinity: requests go at once, and the first
batches teach both. With ``adaptive`` off the rule is the plain window of issue 2: go when
n >= B or now >= a0 + W.

Fair share. The queue's order, front first, is deficit round robin between uids (daemon/fairness.py
states the algorithm and its bounds), so "the first n" above are the next n of the fair order:

    put(request) -> flow of its uid -> FIFO of its session      take(plan): plan_batch reads
                                                                  the fair order front-first
    ring:  [uid 0: s1 s1 s1 s1 | s2 s2]  [uid 1000: s3]  ...      (len = all queued; items only
           each turn: deficit += weight;  1 request per 1 of       as far as it reads), then the
           deficit; a uid's sessions take turns                    first n are popped

  - A uid's share of a device is its weight (dispatch.weights, per uid or @group; others 1) over
    the weights of the uids with queued requests; a uid's sessions split its share. Batches still
    fill to B under a backlog (rule 1): the order only decides which requests fill them, so a
    flooding uid gets its share and no more, and a client that waits on each answer finds at most
    one turn of each other uid ahead of it. dispatch.fair_share = false: first come, first served.
  - Admission (daemon/scheduler.py) reads the same order: a request's deadline is checked at its
    place in it (``ahead``: its uid's queued requests plus one turn of every other uid per request
    of its own), not behind the whole queue; a device holding batching.queue_limit requests still
    admits a uid below its share of that limit (up to twice the limit in all), so a flood cannot
    shut other uids out of the queue either.
  - Requests re-dispatched from a failed device go before every uid (``put_front``: they keep their
    age); a peer steals the newest requests of the longest flow (what the order serves last).
"""
from __future__ import annotations

import math
import threading
import time
from typing import Callable

from .fairness import Fifo


def plan_batch(now: float, queued, latency: Callable[[int], float], max_batch: int,
               max_delay: float, gap: float, adaptive: bool = True) -> tuple[int, float]:
    """See NOTE [ batch planning ]. ``queued`` is the queue front-first (needs ``arrived`` and
    ``deadline`` on each item); it is not modified."""
    n = min(len(queued), max_batch)
    window_end = queued[0].arrived + max_delay
    if n == max_batch:
        return n, 0.0
    if not adaptive:
        return (n, 0.0) if now >= window_end else (0, window_end)
    deadlines = []
    earliest = math.inf
    for i in range(n):
        earliest = min(earliest, queued[i].deadline)
        deadlines.append(earliest)
    m = n
    while m > 1 and now + latency(m) > deadlines[m - 1]:
        m -= 1
    if m < n:
        return m, 0.0
    next_at = now + gap
    if next_at >= window_end or next_at + latency(n + 1) > deadlines[n - 1]:
        return n, 0.0
    return 0, min(window_end, deadlines[n - 1] - latency(n + 1))


class _Ahead:
    """The first items of an order as ``plan_batch`` reads them: ``len`` is the whole queue, items
    are fetched from ``upcoming()`` only as far as they are read (a batch, not the queue)."""

    __slots__ = ("_len", "_next", "_seen")

    def __init__(self, order):
        self._len = len(order)
        self._next = order.upcoming().__next__
        self._seen: list = []

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        if not 0 <= i < self._len:
            raise IndexError(i)
        while len(self._seen) <= i:
            self._seen.append(self._next())
        return self._seen[i]


class DeviceQueue:
    """Requests admitted to one device, in the order it serves them. Thread-safe; see the module
    docstring."""

    GAP_ALPHA = 0.1      # weight of the newest inter-arrival gap in the smoothed gap

    def __init__(self, clock: Callable[[], float] = time.monotonic, order=None):
        self._items = order if order is not None else Fifo()
        self._cond = threading.Condition(threading.Lock())
        self._clock = clock
        self._last_put = None
        self.gap = math.inf          # smoothed seconds between arrivals; read without the lock
        self._stopped = False
        self._woken = False

    def __len__(self) -> int:
        return len(self._items)

    def use(self, order) -> None:
        """Serve in ``order`` (daemon/fairness.py) from now on; only while empty (at start-up)."""
        with self._cond:
            if len(self._items):
                raise RuntimeError("a device queue's order can change only while it is empty")
            self._items = order

    def put(self, item) -> None:
        with self._cond:
            now = self._clock()
            if self._last_put is not None:
                dt = now - self._last_put
                self.gap = dt if self.gap == math.inf else self.gap + self.GAP_ALPHA * (dt - self.gap)
            self._last_put = now
            self._items.push(item)
            self._cond.notify()

    def put_front(self, items: list) -> None:
        """Put requests back at the front, oldest first (re-dispatched work keeps its age)."""
        with self._cond:
            self._items.push_front(items)
            self._cond.notify()

    def drain(self) -> list:
        """Take every queued request (the device leaves rotation), in serving order."""
        with self._cond:
            return self._items.clear()

    def steal(self, count: int) -> list:
        """Take up to ``count`` requests from the back (newest; under fair share, of the longest
        flow), oldest of them first."""
        with self._cond:
            return self._items.take_newest(count)

    def ahead(self, flow) -> int:
        """Requests expected to be served before one more of ``flow`` (a uid): for admission."""
        with self._cond:
            return self._items.ahead(flow)

    def over_share(self, flow, limit: int) -> bool:
        """``flow`` holds at least its share of ``limit`` queued requests (fair share off: always)."""
        with self._cond:
            return self._items.over_share(flow, limit)

    def wake(self) -> None:
        """Make a waiting ``take`` return at once ([] if nothing is ready), so the batching thread
        looks at what the loop asked of it (daemon/batcher.py: stage / activate a model)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def take(self, plan: Callable[[float, object], tuple[int, float]],
             idle_timeout: float) -> list | None:
        """Block until ``plan`` says go, and return that many requests from the front of the
        order (``plan`` reads them front-first: ``len`` and indexing). Returns [] when the queue
        stayed empty for ``idle_timeout`` (the caller may steal or beat its heartbeat), None once
        stopped and empty."""
        with self._cond:
            idle_until = self._clock() + idle_timeout
            while True:
                if self._woken:
                    self._woken = False
                    return []
                if not self._items:
                    if self._stopped:
                        return None
                    left = idle_until - self._clock()
                    if left <= 0:
                        return []
                    self._cond.wait(left)
                    continue
                count, until = plan(self._clock(), _Ahead(self._items))
                if count:
                    return [self._items.pop() for _ in range(count)]
                self._cond.wait(max(until - self._clock(), 0.0))
