"""A device's queue when it serves several models: one lane (a fair order of its own) per model.

The mechanism is DeviceQueue's (daemon/dispatch/queues.py: one lock, a blocking ``take``, steal,
wake, expected arrivals); what changes is that requests wait in their model's lane, and a batch
is taken from one lane only, so a batch never mixes models. Which lane the next batch comes from
is the policy's, daemon/dispatch/model_share.py (NOTE [ model share ]), except that a lane whose
front request would miss its deadline behind one more batch of that lane goes first. The planner
(NOTE [ batch planning ]) plans the chosen lane's batch with that model's latency profile on this
device (``plan(now, queued, expected, mid)``).

A one-model daemon never builds one: its DeviceQueue holds one order and pays for nothing here.

    put(r)          -> lane r.mid (the model it resolved to, daemon/models/catalog.py)
    take(plan)      -> the lane ModelShare names (or an urgent one), planned, its batch popped, the
                       batch's expected seconds charged to that lane
    steal(n, serves)-> the newest of the longest lane among the models the thief runs
    ahead(uid, mid) -> its lane's fair order, plus the other lanes' work served meanwhile by share
"""
from __future__ import annotations

import math
import time
from typing import Callable

from .model_share import ModelShare
from .queues import DeviceQueue, _Ahead


class ModelLanes(DeviceQueue):
    """One lane per model id ``0 .. len(shares) - 1``, each an order ``make_order()`` makes,
    shared by ModelShare by ``shares``; ``latency(mid, n)``: a batch's expected seconds on this
    device. Thread-safe, as DeviceQueue."""

    def __init__(self, make_order: Callable[[], object], shares: list[float],
                 latency: Callable[[int, int], float], max_batch: int,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(clock, make_order())
        self._lanes = [self._items, *(make_order() for _ in shares[1:])]
        self._share = ModelShare(shares)
        self._latency = latency
        self._max_batch = max_batch

    def __len__(self) -> int:
        return sum(map(len, self._lanes))

    def use(self, order) -> None:
        raise RuntimeError("a device queue of several models takes its orders at construction")

    def add_lane(self, mid: int, order, share: float) -> None:
        """A lane for model ``mid`` in ``order``, weighted ``share`` (a model loaded live,
        daemon/ops/model_ops.py): a new id, or one an unloaded model left, whose lane is empty.
        Every device gets a lane for every id (empty where the model does not run), so lane i
        stays model id i."""
        with self._cond:
            if mid < len(self._lanes):
                if len(self._lanes[mid]):
                    raise RuntimeError(f"lane {mid} still holds requests")
                self._lanes[mid] = order
            elif mid == len(self._lanes):
                self._lanes.append(order)
            else:
                raise RuntimeError(f"lane {mid} after {len(self._lanes)} lanes: every device has a lane per model id")
            self._share.add(mid, share)

    def set_share(self, mid: int, share: float) -> None:
        """Model ``mid``'s weight from now on (SIGHUP changed its ``share``)."""
        with self._cond:
            self._share.weight[mid] = share / self._share.low

    def lane_len(self, mid: int) -> int:
        return len(self._lanes[mid])

    def share_served(self) -> list[float]:
        """Device seconds charged to each model's lane so far."""
        return list(self._share.served)

    def put(self, item) -> None:
        with self._cond:
            self._arrivals(getattr(item, "session", None), 1)
            lane = self._lanes[item.mid]
            if not len(lane):
                self._share.active(item.mid)
            lane.push(item)
            if self._listening:
                self._cond.notify()

    def _push_all(self, items) -> None:
        """Requests of one model into its lane (``put_many``: one message's, all of one model)."""
        mid = items[0].mid
        lane = self._lanes[mid]
        if not len(lane):
            self._share.active(mid)
        lane.push_many(items)

    def put_front(self, items: list) -> None:
        with self._cond:
            for mid in sorted({r.mid for r in items}):
                lane = self._lanes[mid]
                if not len(lane):
                    self._share.active(mid)
                lane.push_front([r for r in items if r.mid == mid])
            self._cond.notify()

    def drain(self) -> list:
        """Every queued request, lane by lane (the device leaves rotation)."""
        with self._cond:
            out = []
            for mid, lane in enumerate(self._lanes):
                out += lane.clear()
                self._share.idle(mid)
            return out

    def steal(self, count: int, serves: Callable[[int], bool] | None = None) -> list:
        """Up to ``count`` of the newest requests of the longest lane among the models
        ``serves(mid)`` allows (a batch is one model's), oldest of them first."""
        with self._cond:
            lanes = [(len(lane), mid) for mid, lane in enumerate(self._lanes)
                     if len(lane) and (serves is None or serves(mid))]
            if not lanes:
                return []
            mid = max(lanes)[1]
            taken = self._lanes[mid].take_newest(count)
            if not len(self._lanes[mid]):
                self._share.idle(mid)
            return taken

    def ahead(self, flow, mid: int = 0, extra: int = 0) -> int:
        """Its lane's fair order, plus the other lanes' work the device serves meanwhile by their
        shares (NOTE [ model share ]), at most what they hold; ``extra``: as DeviceQueue.ahead."""
        with self._cond:
            share = self._share
            lane = self._lanes[mid]
            mine = lane.ahead(flow, extra) if extra else lane.ahead(flow)
            others = [(len(lane), share.weight[i]) for i, lane in enumerate(self._lanes) if i != mid and len(lane)]
            if not others:
                return mine
            ratio = sum(w for _, w in others) / share.weight[mid]
            return mine + min(sum(n for n, _ in others), math.ceil((mine + 1) * ratio))

    def over_share(self, flow, limit: int, mid: int = 0) -> bool:
        with self._cond:
            return self._lanes[mid].over_share(flow, limit)

    def _empty(self) -> bool:
        return not any(map(len, self._lanes))

    def _next(self, plan, now: float) -> tuple[list | None, float, bool]:
        mid = self._choose(now)
        lane = self._lanes[mid]
        count, until, *listen = plan(now, _Ahead(lane), self._expected_times(now), mid)
        if count:
            batch = [lane.pop() for _ in range(count)]
            self._share.charge(mid, self._latency(mid, count))
            if not len(lane):
                self._share.idle(mid)
            return batch, 0.0, True
        return None, until, not listen or listen[0]

    def _choose(self, now: float) -> int:
        """The lane the next batch comes from: ModelShare's run, unless another lane's front
        request would miss its deadline behind one more batch of that lane. Under the lock."""
        share = self._share
        ring = share.ring
        if len(ring) == 1:
            return ring[0]
        lane = share.head()
        B, latency = self._max_batch, self._latency
        after = now + latency(lane, min(len(self._lanes[lane]), B))
        urgent, soonest = lane, math.inf
        for mid in ring:
            if mid == lane:
                continue
            order = self._lanes[mid]
            due = next(order.upcoming()).deadline
            if due < soonest and due < after + latency(mid, min(len(order), B)):
                urgent, soonest = mid, due
        return urgent
