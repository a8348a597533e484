"""The order in which a device serves the requests queued on it: first come first served, or a
fair share between uids and between the sessions of each uid.

A DeviceQueue (daemon/dispatch/queues.py) is the mechanism: one lock, a blocking ``take``, steal, wake. An
order is the policy it holds: pure bookkeeping, no lock, no clock, no threads, so tests drive it
request by request (tests/unit/test_fair_share.py). Both orders offer the same operations:

    push(item)          admitted: joins the order
    push_front(items)   re-dispatched from a failed device: served before anything else, oldest
                        first (they already waited their turn once)
    pop()               the next item to serve
    upcoming()          every item in the order pop() would return them, changing nothing
    take_newest(n)      up to n items that would be served last (an idle peer steals them)
    clear()             every item, in serving order; the order is empty after
    ahead(flow)         how many items would be served before one more of ``flow``
    over_share(flow, limit)   ``flow`` holds at least its share of ``limit`` queued items

``Fifo`` (dispatch.fair_share = false) serves in order of arrival.

``DeficitRoundRobin`` (the default) is deficit round robin (Shreedhar and Varghese, 1996) over one
flow per uid, each request costing 1::

    ring of flows with queued requests       head                          tail
                                             [uid 0] -> [uid 1000] -> [uid 65534] -> (head)
    the head flow is granted its quantum:    deficit += quantum
    and served one request at a time         while deficit >= 1: serve, deficit -= 1
    then it goes to the tail                 keeping the rest of its deficit (< 1)
    a flow that runs empty leaves the ring   deficit = 0: idle time is never saved up for a burst
    inside a flow, one FIFO per session      served in plain round robin, one request each turn

A flow's quantum is its uid's weight divided by the smallest weight (dispatch.weights: the uid's
own entry, else the largest entry of a group it belongs to, else 1), so every quantum is at least 1
and every turn serves at least one request. While flows stay backlogged, flow i gets w_i / sum(w)
of the requests served, give or take one quantum; a flow that is not backlogged (a client waiting
on each answer) joins the tail and is served once the flows before it have had one turn each: at
most one quantum of each. The sessions of one uid split that uid's part evenly, so opening more
sessions buys a uid nothing against other uids.

``ahead`` assumes every other flow stays backlogged (an upper bound on the wait): before one more
request of flow f, holding q_f, the ring serves about (q_f + 1) * sum(quanta) / quantum_f requests,
and never more than the queue holds.
"""
from __future__ import annotations

import collections
import grp
import math
import pwd
from typing import Callable, Hashable, Iterator

from ..config import ConfigError


class Fifo:
    """Order of arrival. ``ahead`` is the whole queue; every flow's share is the whole queue."""

    def __init__(self):
        self._items: collections.deque = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item) -> None:
        self._items.append(item)

    def push_many(self, items) -> None:
        self._items.extend(items)

    def push_front(self, items: list) -> None:
        self._items.extendleft(reversed(items))

    def pop(self):
        return self._items.popleft()

    def upcoming(self) -> Iterator:
        return iter(self._items)

    def take_newest(self, count: int) -> list:
        taken = [self._items.pop() for _ in range(min(count, len(self._items)))]
        taken.reverse()
        return taken

    def clear(self) -> list:
        items = list(self._items)
        self._items.clear()
        return items

    def ahead(self, flow, extra: int = 0) -> int:
        return len(self._items) + extra

    def over_share(self, flow, limit: int) -> bool:
        return True


class _Session:
    __slots__ = ("key", "items")

    def __init__(self, key):
        self.key = key
        self.items: collections.deque = collections.deque()     # oldest first


class _Flow:
    __slots__ = ("key", "quantum", "deficit", "sessions", "by_key", "size")

    def __init__(self, key, quantum: float):
        self.key = key
        self.quantum = quantum
        self.deficit = 0.0
        self.sessions: collections.deque = collections.deque()   # those with items, in turn
        self.by_key: dict = {}
        self.size = 0


class DeficitRoundRobin:
    """Deficit round robin across flows (uids), round robin across each flow's sessions; see the
    module docstring. ``flow_of(item)`` -> (flow key, session key); ``quantum_of(flow key)`` ->
    a quantum >= 1."""

    def __init__(self, flow_of: Callable[[object], tuple[Hashable, Hashable]],
                 quantum_of: Callable[[Hashable], float]):
        self._flow_of = flow_of
        self._quantum_of = quantum_of
        self._front: collections.deque = collections.deque()   # re-dispatched: before every flow
        self._ring: collections.deque = collections.deque()    # _Flows with items; the head has
        self._flows: dict = {}                                   #   been granted its turn's quantum
        self._quanta = 0.0                                       # sum of the ring's quanta
        self._size = 0                                           # items in flows

    def __len__(self) -> int:
        return len(self._front) + self._size

    def push(self, item) -> None:
        key, session_key = self._flow_of(item)
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = _Flow(key, self._quantum_of(key))
            if not self._ring:
                flow.deficit = flow.quantum     # it is the head at once: its turn begins now
            self._ring.append(flow)
            self._quanta += flow.quantum
        session = flow.by_key.get(session_key)
        if session is None:
            session = flow.by_key[session_key] = _Session(session_key)
            flow.sessions.append(session)
        session.items.append(item)
        flow.size += 1
        self._size += 1

    def push_many(self, items) -> None:
        """``push`` of each of ``items``, all of one session (a message's requests): one look-up."""
        self.push(items[0])
        if len(items) > 1:
            rest = items[1:]
            key, session_key = self._flow_of(items[0])
            flow = self._flows[key]
            flow.by_key[session_key].items.extend(rest)
            flow.size += len(rest)
            self._size += len(rest)

    def push_front(self, items: list) -> None:
        self._front.extendleft(reversed(items))

    def pop(self):
        if self._front:
            return self._front.popleft()
        ring = self._ring
        while ring[0].deficit < 1.0:            # the head's turn is over: next flow's turn
            ring.rotate(-1)
            ring[0].deficit += ring[0].quantum
        flow = ring[0]
        flow.deficit -= 1.0
        return self._remove(flow, flow.sessions[0], newest=False)

    def upcoming(self) -> Iterator:
        """Mirrors ``pop`` on copies of the deficits and cursors into the sessions' queues. Valid
        until the order changes (DeviceQueue reads it under its lock, within one batch plan)."""
        yield from self._front
        ring = collections.deque([flow, flow.deficit] for flow in self._ring)
        turns: dict = {}                        # flow -> deque of [session, items served]
        while ring:
            head = ring[0]
            if head[1] < 1.0:
                ring.rotate(-1)
                ring[0][1] += ring[0][0].quantum
                continue
            head[1] -= 1.0
            sessions = turns.get(head[0])
            if sessions is None:
                sessions = turns[head[0]] = collections.deque([s, 0] for s in head[0].sessions)
            cursor = sessions[0]
            yield cursor[0].items[cursor[1]]
            cursor[1] += 1
            if cursor[1] < len(cursor[0].items):
                sessions.rotate(-1)
                continue
            sessions.popleft()
            if not sessions:                    # the flow ran empty: it leaves the ring
                ring.popleft()
                if ring:
                    ring[0][1] += ring[0][0].quantum

    def take_newest(self, count: int) -> list:
        """The newest items of the longest session of the longest flow, one at a time (what DRR
        would serve last), then of the front; oldest of them first."""
        taken = []
        while len(taken) < count and self._size:
            flow = max(self._ring, key=lambda f: f.size)
            session = max(flow.sessions, key=lambda s: len(s.items))
            taken.append(self._remove(flow, session, newest=True))
        while len(taken) < count and self._front:
            taken.append(self._front.pop())
        taken.reverse()
        return taken

    def clear(self) -> list:
        items = list(self.upcoming())
        self._front.clear()
        self._ring.clear()
        self._flows.clear()
        self._quanta, self._size = 0.0, 0
        return items

    def ahead(self, key, extra: int = 0) -> int:
        """Items served before one more of flow ``key``; ``extra``: once ``extra`` more of it are
        queued (a group admitted at once judges its last by it)."""
        flow = self._flows.get(key)
        mine, quantum = (flow.size, flow.quantum) if flow else (0, self._quantum_of(key))
        quanta = self._quanta + (0.0 if flow else quantum)
        mine += extra
        return len(self._front) + min(self._size + extra, math.ceil((mine + 1) * quanta / quantum) - 1)

    def over_share(self, key, limit: int) -> bool:
        flow = self._flows.get(key)
        return flow is not None and flow.size >= limit * flow.quantum / self._quanta

    def _remove(self, flow: _Flow, session: _Session, newest: bool):
        """Take the oldest (or newest) item of ``session``; the session leaves its flow's turn
        when empty, and the flow leaves the ring when empty."""
        if newest:
            item = session.items.pop()
        else:
            item = session.items.popleft()
        flow.size -= 1
        self._size -= 1
        if not session.items:
            flow.sessions.remove(session)       # the head when popping: O(1)
            del flow.by_key[session.key]
        elif not newest:
            flow.sessions.rotate(-1)            # the flow's next session goes next
        if not flow.size:
            was_head = self._ring[0] is flow
            self._ring.remove(flow)
            del self._flows[flow.key]
            self._quanta = self._quanta - flow.quantum if self._ring else 0.0
            if was_head and self._ring:
                self._ring[0].deficit += self._ring[0].quantum
        return item


def quanta(weights: dict | None, *, groups=grp, users=pwd) -> Callable[[Hashable], float]:
    """uid -> quantum, from ``dispatch.weights`` ({"uid": w, "@group": w}), resolved once now:
    a uid's own entry, else the largest entry among the groups it belongs to (as member in
    /etc/group or as primary group in /etc/passwd), else 1; divided by the smallest weight so
    every quantum is >= 1. Anything not a uid (a canary's None) weighs 1. Raises ConfigError
    for a group that does not exist. ``groups`` / ``users``: the grp / pwd modules (tests)."""
    weights = weights or {}
    by_uid: dict[int, float] = {}
    members: dict[int, float] = {}
    accounts = None
    for who, weight in weights.items():
        if not who.startswith("@"):
            by_uid[int(who)] = float(weight)
            continue
        name = who[1:]
        try:
            group = groups.getgrgid(int(name)) if name.isdigit() else groups.getgrnam(name)
        except KeyError:
            raise ConfigError(f"dispatch.weights: no group {name!r} (key {who!r}); name a group of "
                              "/etc/group, by name or number") from None
        if accounts is None:
            accounts = users.getpwall()
        uids = {a.pw_uid for a in accounts if a.pw_name in group.gr_mem or a.pw_gid == group.gr_gid}
        for uid in uids:
            members[uid] = max(members.get(uid, 0.0), float(weight))
    table = {**members, **by_uid}
    unit = min(1.0, *table.values()) if table else 1.0
    table = {uid: w / unit for uid, w in table.items()}
    default = 1.0 / unit
    return lambda uid: table.get(uid, default)
