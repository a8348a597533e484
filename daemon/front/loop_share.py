"""The event loop's work shared between uids, as the devices are (daemon/dispatch/fairness.py).

NOTE [ loop share ]

Frames are read, checked and (for cache hits, info, malformed frames) answered on the loop. A
session handling at most ``server.max_frames_per_turn`` frames per turn bounds one client, not one
uid: a uid with many sessions got one turn each, so four flooding sessions made every other
client wait for 4 x 32 frames per loop iteration. Here the budget belongs to the uid::

    loop iteration N            loop iteration N+1
    ... data_received(s) ...    tick: epoch += 1                     then I/O events of N+1:
      uid has budget left?        for each uid with waiting sessions   data_received(s) as in N
        yes: s handles <= left      (ring, round robin): a fresh
             frames now             budget (TURN_S of frames), spent
        no:  s waits (reading       on its sessions in turn; those
             paused), uid joins     still holding frames wait again
             the ring; tick is      another tick if anything was spent
             scheduled (call_soon)  or anything waits

- A uid's sessions together handle at most one budget of frames per epoch; an epoch ends at the
  tick, which runs once per loop iteration while there is work (a callback queued with
  ``call_soon`` runs in the next iteration, before that iteration's I/O callbacks, in asyncio's
  loop and in uvloop). The budget is the frames that TURN_S (1 ms) of loop time buys at the uid's
  recent cost per frame (the loop thread's CPU time around its turns, two clock reads a turn: wall
  time also counts waits for the GIL, which the device threads hold in turn: with it, four
  pipelining sessions' share of the device beside another uid's flood fell from 52 % to 36 % in
  bench/isolation.py (c), their budget shrunk to a frame or two), at least one and at
  most ``server.max_frames_per_turn``; times the uid's ``quantum`` of the device share
  (dispatch.weights, 1 for every uid by default), so a uid weighted 2 gets twice the loop, as it
  gets twice the devices. Counting time rather than frames makes costly frames (a cache hit
  copies and hashes its frame on the loop; info builds a reply) cost their uid accordingly.
- So a client of another uid waits at most for one budget of each busy uid (about TURN_S, plus
  one frame) before its own frames are handled, whatever those frames are (cache hits, misses,
  malformed, info), and however many sessions each busy uid opens.
- The share bounds each uid's loop time per iteration, not the loop's time as a whole: one busy
  uid may keep the loop busy all the time. The device threads, which take the GIL back after
  every torch op, then wait for it at most the switch interval (threads.switch_interval_ms, NOTE
  [ thread pools ] in daemon/pipeline/thread_pools.py): at Python's 5 ms another uid's classify
  behind an info flood took over a second.
- A session that waits has reading paused (its ``backlog`` hold, NOTE [ session flow control ] in
  daemon/front/session.py): the kernel's socket buffer fills and the client blocks. Nothing waits
  unbounded in the daemon.
- Costs: O(1) per frame (a counter); a tick costs O(waiting uids + sessions served), never a scan
  of all sessions. A session is queued at most once (its ``waiting`` flag); one that closed or
  stopped wanting a turn is dropped when its turn comes.

The session side offers two calls: ``wants_turn()`` (whole frames buffered, nothing holds it) and
``take_turn(limit)`` (handle up to ``limit`` frames, return how many). Budget and epochs are pure
counting; the tick's ``call_soon`` and the clock are injected (tests drive ``tick()`` by hand).
"""
from __future__ import annotations

import asyncio
import collections
import time
from typing import Callable, Hashable


TURN_S = 0.001          # the loop time a uid's budget per iteration buys (times its quantum)
KEEP_UIDS = 256         # records of idle uids kept for their cost estimate, at most
_EWMA = 0.25            # weight of the newest turn in a uid's cost per frame


class _Uid:
    __slots__ = ("key", "quantum", "cost", "left", "epoch", "waiting")

    def __init__(self, key, quantum: float):
        self.key = key
        self.quantum = quantum
        self.cost = 0.0                     # seconds of loop per frame, recent turns (0: unknown)
        self.left = 0                       # frames left in ``epoch``
        self.epoch = -1
        self.waiting: collections.deque = collections.deque()   # sessions, in turn


class LoopShare:
    """Per-uid frame budget per loop iteration; see NOTE [ loop share ]. ``quantum_of(uid)`` >= 1
    (daemon/dispatch/fairness.py ``quanta``); ``call_soon``: the loop's, found at first use when
    not given."""

    def __init__(self, frames_per_turn: int, quantum_of: Callable[[Hashable], float] = lambda uid: 1.0,
                 call_soon: Callable | None = None, turn_s: float = TURN_S, clock=time.thread_time):
        self._frames = max(1, int(frames_per_turn))
        self._quantum_of = quantum_of
        self._call_soon = call_soon
        self._turn_s = turn_s
        self._clock = clock
        self._uids: dict = {}               # uid -> _Uid (their cost estimates; KEEP_UIDS idle ones)
        self._ring: collections.deque = collections.deque()   # _Uids with waiting sessions
        self._epoch = 0
        self._tick_due = False

    def offer(self, session) -> None:
        """``session`` has whole frames to handle (data arrived, or its replies drained): handle
        them now within its uid's budget, and queue it for the next tick if frames remain."""
        if session.waiting:
            return                          # its turn comes in a tick
        uid = self._uid(session.peer[1])
        if uid.left > 0 and not uid.waiting:
            uid.left -= self._turn(uid, session, uid.left)
            self._schedule()
        if session.wants_turn():
            self._wait(uid, session)

    def tick(self) -> None:
        """A new epoch: every waiting uid, in turn, spends a fresh budget on its waiting sessions."""
        self._tick_due = False
        self._epoch += 1
        ring, spent = self._ring, False
        for _ in range(len(ring)):
            uid = ring.popleft()
            left = self._budget(uid)
            while left > 0 and uid.waiting:
                session = uid.waiting.popleft()
                session.waiting = False
                if not session.wants_turn():
                    continue                # closed, or its replies went unread meanwhile
                handled = self._turn(uid, session, left)
                left -= handled
                spent = spent or handled > 0
                if session.wants_turn():
                    session.waiting = True
                    uid.waiting.append(session)
                    if not handled:         # a bug, never a spin: try again next tick
                        break
            uid.left, uid.epoch = left, self._epoch
            if uid.waiting:
                ring.append(uid)
        if len(self._uids) > KEEP_UIDS:     # forget idle uids' estimates (memory bounded)
            self._uids = {u.key: u for u in ring}
        if spent or ring:
            self._schedule()

    def _budget(self, uid: _Uid) -> int:
        """Frames for one epoch: TURN_S of loop time at the uid's recent cost per frame, at most
        max_frames_per_turn, at least one; times its quantum."""
        frames = self._frames if uid.cost <= 0 else min(self._frames, max(1, round(self._turn_s / uid.cost)))
        return max(1, round(frames * uid.quantum))

    def _turn(self, uid: _Uid, session, limit: int) -> int:
        t0 = self._clock()
        handled = session.take_turn(limit)
        if handled:
            per_frame = (self._clock() - t0) / handled
            uid.cost = per_frame if uid.cost <= 0 else uid.cost + _EWMA * (per_frame - uid.cost)
        return handled

    def _uid(self, key) -> _Uid:
        uid = self._uids.get(key)
        if uid is None:
            uid = self._uids[key] = _Uid(key, self._quantum_of(key))
        if uid.epoch != self._epoch:
            uid.left, uid.epoch = self._budget(uid), self._epoch
        return uid

    def _wait(self, uid: _Uid, session) -> None:
        session.waiting = True
        if not uid.waiting:
            self._ring.append(uid)
        uid.waiting.append(session)
        self._schedule()

    def _schedule(self) -> None:
        if not self._tick_due:
            self._tick_due = True
            if self._call_soon is None:
                self._call_soon = asyncio.get_running_loop().call_soon
            self._call_soon(self.tick)

    def waiting(self) -> int:
        """Sessions waiting for a turn (stats, tests)."""
        return sum(len(u.waiting) for u in self._ring)
