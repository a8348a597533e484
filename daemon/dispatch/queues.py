"""A device's queue of admitted requests, and the rule that decides when its next batch leaves.

DeviceQueue is an order (daemon/dispatch/fairness.py: first come first served, or a fair share between uids)
under one lock: the event loop puts requests in (admission) and drains it (a device taken out of
rotation); the device's collector (daemon/pipeline/collector.py) takes batches from the front of
the order; an idle peer's collector steals from its back. Nobody holds two queue locks at once, so
there is no lock order to get wrong.

NOTE [ batch planning ]

``plan_batch(now, queued, ...)`` returns ``(n, 0.0)``: take the first n now, or ``(0, t)``: wait
until t (or until another request arrives) and ask again. Its aim is goodput: the most frames per
second that still meet their deadlines. With L(b) the device's measured latency for a batch of b
(daemon/dispatch/profile.py), B = max_batch, D(m) the earliest deadline among the first m, F the time the
device is free for this batch (the end of the batch it runs and of the one staged behind it:
``busy_until`` in daemon/dispatch/policy.py; now when idle), S = max(now, F) the batch's start, and the
window a0 + W: W = max_delay, a0 = the later of the first queued request's arrival and the time the
device became free (``idle_since``), so W bounds what the planner adds by choice, not the time a
request spent behind a busy device ("first" is in the order the device serves: fair share, below):

  0. The device is busy. If now < F - LEAD, wait until F - LEAD, whatever is queued: company is
     free while the device works, and the batch is closed and staged just before the device needs
     it, so it is the freshest batch the fair order can make: a request arriving while a full
     batch computes goes into the next one, not the one after. No arrival changes this answer, so
     arrivals do not wake the planner meanwhile; the executor wakes it when a batch ends early.
     LEAD (``StagingLead``) covers what happens between the planner's wake-up and the device
     taking the batch: the collector thread waking and getting the GIL, the copy into the staging
     buffer, and the error of F. It starts at the larger of 0.5 ms and a tenth of the running
     batch's time and is learnt from the handovers: a full batch handed over after the device
     went idle with its requests already queued (the device waited on its own collector) moves it
     up, one in time moves it down nine times more slowly, so about one handover in ten is late,
     and never more than half the running batch's time. Where fewer than one in ten is late at
     the floor (a quiet host) it stays there; on a loaded host (the collector woken milliseconds
     late) it is what keeps a fast device from idling a tenth of its time between batches
     (docs/benchmarks.md, "The saturated pool when the daemon's own work shows").
  1. Full. If n >= B, go now with B. Under a backlog a full batch is what keeps the device at its
     best throughput (admission counted on it); a request in it that cannot finish within the
     batch's time is answered deadline_exceeded without being computed, rather than let it shrink
     the batch: shrinking to save the oldest requests lowers throughput and makes every later
     request later still (a collapse seen in bench/pool/run.py at 3x load).
  2. Deadline cap (n < B). m = the largest size <= n with S + L(m) <= D(m). If m < n, go now with
     m: more frames could only make the batch later (in the spirit of Clipper's adaptive batching,
     with the measured profile in place of AIMD probing).
  3. Goodput. The device is free: going now runs n frames in L(n). Waiting until t for the k
     arrivals expected by then runs n + k frames in (t - S) + L(n + k). Wait for the k with the best
     rate (n + k) / ((t - S) + L(n + k)) if it beats n / L(n), t is inside the window (t <= a0 + W)
     and the batch still meets its deadlines (t + L(n + k) <= D(n)); else go now.
     That is the fixed window (``batching.window = "fixed"``). The default, the measured window,
     keeps it only for arrivals predicted from the gap; for sessions expected back it waits while
     one batch of n + k would end sooner than n now and k after, however long that is, and no
     longer: NOTE [ measured window ] in daemon/dispatch/formation.py.

Expected arrivals. Most clients wait for an answer before they send the next frame (closed loop:
one or a few requests in flight each). The scheduler learns each session's think time, from a reply
to its next request (smoothed), and when it answers k of a session's requests it tells the device
queue to expect k requests from that session at reply + think (``DeviceQueue.expect``); a request
of that session arriving takes one off. An expectation overdue by GRACE is dropped (that client is
not coming soon), so a wait for it ends at most GRACE after it was due, and never past the window
(the fixed window; the measured one keeps it for one full batch's time and prices the wait).
The sessions of the running batch count too: they are expected back at F + think (the collector
adds them, daemon/pipeline/collector.py), so when two half batches alternate on a busy device (eight clients
queued at F while the other eight compute) the planner sees the eight about to come back, and waits
for them if one batch of sixteen beats two of eight (it usually does: batching amortises).
Without expectations (open-loop clients, sessions whose think time exceeds the window), the next
arrivals are expected one smoothed gap g apart (the gap between arrivals at this device). This is
what lets four closed-loop clients form batches of four: their four requests come back together a
few hundred microseconds after the replies, while the smoothed gap (a batch time over four) says
company is too far off to wait for, and batches of 1.7 left early.

Before the profile knows anything, L = 0: requests go at once, and the first batches teach it.
With ``adaptive`` off the rule is the plain window: go when n >= B or now >= a0 + W.

Fair share. The queue's order, front first, is deficit round robin between uids (daemon/dispatch/fairness.py
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
  - Admission (daemon/dispatch/scheduler.py) reads the same order: a request's deadline is checked at its
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
from .formation import GRACE, wait_for_company     # GRACE: an expected arrival overdue by this much is not waited for


LEAD = 0.0005      # seconds before the device is free that the next batch is closed (rule 0)


def plan_batch(now: float, queued, latency: Callable[[int], float], max_batch: int,
               max_delay: float, gap: float, adaptive: bool = True, free_at: float = 0.0,
               expected=(), idle_since: float = 0.0, lead: float = LEAD,
               window: str = "fixed") -> tuple[int, float]:
    """See NOTE [ batch planning ]. ``queued`` is the queue front-first (needs ``arrived`` and
    ``deadline`` on each item); it is not modified. ``expected``: the times more requests are
    expected at, ascending (overdue ones already dropped). A third element False in the answer
    (rule 0) says that no arrival can change it: the queue need not wake the planner for one.
    ``window``: "fixed", rule 3 waits only inside a0 + max_delay; "measured", rule 3 as NOTE
    [ measured window ] in daemon/dispatch/formation.py says (batching.window)."""
    if now < free_at - lead:
        return 0, free_at - lead, False
    n = min(len(queued), max_batch)
    window_end = max(queued[0].arrived, idle_since) + max_delay
    if n == max_batch:
        return n, 0.0
    if not adaptive:
        return (n, 0.0) if now >= window_end else (0, window_end)
    start = max(now, free_at)
    deadlines = []
    earliest = math.inf
    for i in range(n):
        earliest = min(earliest, queued[i].deadline)
        deadlines.append(earliest)
    m = n
    while m > 1 and start + latency(m) > deadlines[m - 1]:
        m -= 1
    if m < n:
        return m, 0.0
    if window == "measured" and expected:
        # from when these n could first have gone: the device free, the last of them arrived
        ready = max(free_at, idle_since, max(queued[i].arrived for i in range(n)))
        return wait_for_company(now, start, ready, n, latency, max_batch, deadlines[-1], expected)
    return _goodput(now, start, n, latency, max_batch, window_end, deadlines[-1], gap, expected)


def _goodput(now: float, start: float, n: int, latency, max_batch: int, window_end: float,
             deadline: float, gap: float, expected) -> tuple[int, float]:
    """Rule 3: go now with n, or wait until the expected arrival that gives the best rate."""
    base = latency(n)
    if base <= 0.0:                         # the profile knows nothing yet
        return n, 0.0
    best, until = n / base, None
    if not expected and gap != math.inf:    # open loop: one arrival per smoothed gap
        expected = [now + gap * k for k in range(1, max_batch - n + 1)]
    for k, t in enumerate(expected[:max_batch - n], 1):
        at = max(t, now)
        seconds = latency(n + k)
        if at > window_end or max(at, start) + seconds > deadline:
            break
        # an overdue arrival is waited for until it is given up on (GRACE), never polled for
        wait_until = min(t if t > now else t + GRACE, window_end)
        rate = (n + k) / (max(at, start) - start + seconds)
        if rate > best and wait_until > now:
            best, until = rate, wait_until
    if until is None:
        return n, 0.0
    return 0, until


class StagingLead:
    """How long before its device is free the collector closes the next batch (rule 0 of NOTE
    [ batch planning ]): a floor, plus what late handovers taught. Collector thread only; read by
    stats (``describe``) without a lock, one float replaced whole."""

    Q = 0.9            # the share of handovers to be in time: a late one counts Q, one in time 1 - Q
    STEP = 0.05        # of the batch's time: the size of one unit of learning (at least LEAD)
    CAP = 0.5          # of the running batch's time: the most the lead grows to

    __slots__ = ("extra", "late", "in_time")

    def __init__(self):
        self.extra = 0.0          # seconds learnt above the floor
        self.late = 0             # handovers after the device went idle waiting for them
        self.in_time = 0

    def seconds(self, running: float) -> float:
        """The lead while a batch of ``running`` seconds computes (0: none)."""
        floor = max(LEAD, 0.1 * running)
        return floor + min(self.extra, max(self.CAP * running - floor, 0.0))

    def handed(self, busy: bool, free_since: float, queued_by: float, batch: float, now: float) -> None:
        """A batch of ``batch`` seconds handed to its device at ``now``: ``busy`` when the device
        still had a batch to run (in time), else idle since ``free_since``; ``queued_by`` is when
        the last of its requests arrived. Idle before the batch was complete is no lesson (the
        planner waited for company, or there was no work): only idle with the work queued is late."""
        step = max(LEAD, self.STEP * batch)
        if busy:
            self.in_time += 1
            self.extra = max(self.extra - (1.0 - self.Q) * step, 0.0)
        elif free_since and queued_by <= free_since < now:
            self.late += 1
            self.extra = min(self.extra + self.Q * step, max(self.CAP * batch - max(LEAD, 0.1 * batch), 0.0))


class ThinkTime:
    """One session's think time: from a reply to its next request, smoothed (expected arrivals in
    NOTE [ batch planning ]). Loop thread only."""

    ALPHA = 0.2

    __slots__ = ("seconds", "_replied_at", "_expected_on")

    def __init__(self):
        self.seconds: float | None = None
        self._replied_at: float | None = None
        self._expected_on = None               # the DeviceQueue told to expect this session

    def submitted(self, session, now: float, queue: "DeviceQueue", n: int = 1) -> None:
        """``n`` requests of ``session`` are going to ``queue`` at ``now``."""
        at = self._replied_at
        if at is not None:
            dt = now - at
            self.seconds = dt if self.seconds is None else self.seconds + self.ALPHA * (dt - self.seconds)
            self._replied_at = None
        if self._expected_on is not None and self._expected_on is not queue:
            self._expected_on.arrived(session, n)   # ``queue.put`` counts them where they go

    def replied(self, session, now: float, count: int, queue: "DeviceQueue", horizon: float) -> None:
        """``count`` replies went to ``session`` at ``now`` from ``queue``'s device: expect as many
        requests back after the think time, when that is within ``horizon`` seconds."""
        self._replied_at = now
        if self.seconds is not None and self.seconds <= horizon:
            queue.expect(session, count, now + self.seconds)
            self._expected_on = queue


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
        self._expected: dict = {}    # session -> [requests expected, at] (NOTE [ batch planning ])
        self._listening = True       # a waiting take wants to hear of arrivals (not in rule 0)
        self.grace = GRACE           # overdue expectations are dropped after this (formation.horizon)

    def __len__(self) -> int:
        return len(self._items)

    def use(self, order) -> None:
        """Serve in ``order`` (daemon/dispatch/fairness.py) from now on; only while empty (at start-up)."""
        with self._cond:
            if len(self._items):
                raise RuntimeError("a device queue's order can change only while it is empty")
            self._items = order

    def put(self, item) -> None:
        with self._cond:
            self._arrivals(getattr(item, "session", None), 1)
            self._items.push(item)
            if self._listening:
                self._cond.notify()

    def put_many(self, items: list) -> None:
        """Put the requests of one message (one session, one model) at once: one lock, one wake,
        the same order, gap and expectations as ``put`` of each in turn (NOTE [ group admission ]
        in daemon/dispatch/scheduler.py)."""
        with self._cond:
            self._arrivals(items[0].session, len(items))
            self._push_all(items)
            if self._listening:
                self._cond.notify()

    def _push_all(self, items: list) -> None:
        self._items.push_many(items)

    def _arrivals(self, session, n: int) -> None:
        """``n`` requests of ``session`` arrive now: the smoothed gap (the first after the last
        arrival, the others 0 apart) and the expectations."""
        now = self._clock()
        if self._last_put is not None:
            dt = now - self._last_put
            self.gap = dt if self.gap == math.inf else self.gap + self.GAP_ALPHA * (dt - self.gap)
            if n > 1:
                self.gap *= (1.0 - self.GAP_ALPHA) ** (n - 1)
        elif n > 1:
            self.gap = 0.0
        self._last_put = now
        self._arrived(session, n)

    def expect(self, session, count: int, at: float) -> None:
        """``count`` more requests of ``session`` are expected at ``at`` (expected arrivals in
        NOTE [ batch planning ]); replaces what was expected of it."""
        with self._cond:
            self._expected[session] = [count, at]

    def arrived(self, session, n: int = 1) -> None:
        """``n`` requests of ``session`` went to another device: as many less expected here."""
        with self._cond:
            self._arrived(session, n)

    def _arrived(self, session, n: int = 1) -> None:
        entry = self._expected.get(session)
        if entry is not None:
            entry[0] -= n
            if entry[0] <= 0:
                del self._expected[session]

    def _expected_times(self, now: float) -> list:
        """The expected arrivals, ascending, one time per request; drops those overdue by
        ``grace`` (GRACE; the collector widens it under the measured window)."""
        if not self._expected:
            return []
        times, gone = [], []
        grace = self.grace
        for session, (count, at) in self._expected.items():
            if at + grace < now:
                gone.append(session)
            else:
                times.extend([at] * count)
        for session in gone:
            del self._expected[session]
        times.sort()
        return times

    def put_front(self, items: list) -> None:
        """Put requests back at the front, oldest first (re-dispatched work keeps its age)."""
        with self._cond:
            self._items.push_front(items)
            self._cond.notify()

    def drain(self) -> list:
        """Take every queued request (the device leaves rotation), in serving order."""
        with self._cond:
            return self._items.clear()

    def steal(self, count: int, serves: Callable[[int], bool] | None = None) -> list:
        """Take up to ``count`` requests from the back (newest; under fair share, of the longest
        flow), oldest of them first. (``serves``: the models the thief runs; one model here.)"""
        with self._cond:
            return self._items.take_newest(count)

    def ahead(self, flow, mid: int = 0, extra: int = 0) -> int:
        """Requests expected to be served before one more of ``flow`` (a uid): for admission;
        ``extra``: once that many more of ``flow`` are queued (the last of a group). (``mid``: the
        request's model; one model here, daemon/dispatch/lanes.py for several.)"""
        with self._cond:
            return self._items.ahead(flow, extra) if extra else self._items.ahead(flow)

    def over_share(self, flow, limit: int, mid: int = 0) -> bool:
        """``flow`` holds at least its share of ``limit`` queued requests (fair share off: always)."""
        with self._cond:
            return self._items.over_share(flow, limit)

    def poke(self) -> None:
        """Make a waiting ``take`` plan again now (its device became free sooner than expected)."""
        with self._cond:
            self._listening = True
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def lane_len(self, mid: int) -> int:
        return len(self._items)

    def share_served(self) -> list[float]:
        """Device seconds charged to each model (several models: daemon/dispatch/lanes.py)."""
        return []

    def take(self, plan: Callable[[float, object, list], tuple[int, float]],
             idle_timeout: float) -> list | None:
        """Block until ``plan`` says go, and return that many requests from the front of the
        order (``plan`` reads them front-first: ``len`` and indexing; its third argument is the
        expected arrivals; ModelLanes passes a fourth, the model of the lane it plans, and the
        batch is that lane's alone). Returns [] when the queue
        stayed empty for ``idle_timeout`` (the caller may steal or beat its heartbeat), None once
        stopped and empty."""
        with self._cond:
            idle_until = self._clock() + idle_timeout
            while True:
                if self._empty():
                    if self._stopped:
                        return None
                    left = idle_until - self._clock()
                    if left <= 0:
                        return []
                    self._cond.wait(left)
                    continue
                batch, until, listen = self._next(plan, self._clock())
                if batch:
                    return batch
                self._listening = listen
                self._cond.wait(max(until - self._clock(), 0.0))
                self._listening = True

    # what ModelLanes (daemon/dispatch/lanes.py) changes: under the lock, once per batch ----------
    def _empty(self) -> bool:
        return not self._items

    def _next(self, plan, now: float) -> tuple[list | None, float, bool]:
        """The batch ``plan`` says go with now, or (None, when to ask again, whether an arrival
        should wake the wait)."""
        count, until, *listen = plan(now, _Ahead(self._items), self._expected_times(now))
        if count:
            return [self._items.pop() for _ in range(count)], 0.0, True
        return None, until, not listen or listen[0]
