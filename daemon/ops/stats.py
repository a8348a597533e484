"""The daemon's statistics: counters, histograms and rate windows, kept as events happen.

Every figure an operator reads (``Server.stats_snapshot``, the Prometheus text of daemon/ops/metrics.py,
``info`` on the client socket) is read off what is kept here; nothing is found by a scan at read
time, so asking is O(devices + uids + buckets) whatever the traffic, the cache size or the uptime.

NOTE [ stats ]

    event (event loop thread)                      kept as
    -------------------------                      -------
    Scheduler.submit: refused / cached / coalesced outcomes[outcome] += 1
      admitted                                      uid.in_flight += 1, uid.requests += 1
    Scheduler.on_batch_done (one call per batch)    device: frames, batches, busy seconds, per-second
      BatchResult.started / finished (the executor's  ring (frames/s and busy ratio over 1, 10, 60 s),
      clock around the compute), replies written     batch-size and request-latency histograms,
      at ``now``                                      queue wait, stalls (idle while work waited:
                                                      started - max(previous finished, first arrival));
                                                    per request: queue = started - arrived,
                                                    compute = finished - started,
                                                    reply = now - finished, total = now - arrived
                                                    (log-spaced histograms), outcomes, late replies
    Scheduler._finish                               uid.in_flight -= 1 + followers
    HealthMonitor._transition                       device state, since (monotonic and wall), count
    Server.session_opened / session_closed          uid.sessions +- 1
    the door (daemon/front/door.py): a connection   its own counters (refused by reason, accept
      refused, evicted, an accept that failed       errors by errno) and connections waiting for
                                                    hello, read by its snapshot() (``door``)
    Caches (daemon/caching/results.py): lookups, inserts,   cache counters in ``counters``; entries used kept
      a client's report of its own hits             by the cache file itself (insert / flush)
    the model reload: Stats.reload_done(ok)         counters: reloads, reloads_failed
    several models (NOTE [ stats per model ] in     per model: outcomes, latency phases, its rate
      daemon/ops/model_stats.py)                    window, and per device seconds, frames,
                                                    batches, batch sizes
    the fleet cache (daemon/caching/fleet/cache.py): lookups by      its own ``counts``, ``wait`` histograms and
      verdict, writes, breaker moves               breaker, read by Caches.stats (``cache.l2``)

Everything is written on the event loop thread, and read there too (an HTTP scrape hops onto the
loop: daemon/ops/metrics.py), so there are no locks and a reading is one consistent moment. The
pipeline threads write nothing here: the two times they take per batch travel in the BatchResult
(daemon/pipeline/records.py).

Cost on the request path: a histogram observe is one ``bisect`` and two additions; per request
the scheduler makes three (queue, total, and total again for its device), per batch three more
(compute, reply, batch size) and one per-second ring update. ``metrics.enabled = false`` skips the histograms; counters, gauges and
rates are always kept (they cost an addition each).

Per model (several models only): daemon/ops/model_stats.py, NOTE [ stats per model ]; a
one-model daemon pays one attribute test per batch and per outcome for it.

Time is monotonic seconds from an injected ``clock`` (tests drive it); wall-clock time is used
only to show operators when something happened (``wall``, also injectable).
"""
from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Callable

from ..pipeline.records import Outcome
from . import model_stats
# the containers (daemon/ops/histograms.py), also importable from here as before
from .histograms import (LATENCY_BOUNDS, PHASES, WINDOWS, Histogram, SizeHistogram,  # noqa: F401
                         Window, quantile)
from .model_stats import ModelStats

if TYPE_CHECKING:
    from ..pipeline.records import BatchResult, Request


class DeviceStats:
    """What one device did: totals, its rate window, batch sizes, health transitions."""

    __slots__ = ("device", "frames", "batches", "failed_batches", "busy", "window", "sizes", "latency",
                 "queue", "stall", "stalls", "last_finished", "state", "since", "since_wall", "transitions")

    def __init__(self, device, max_batch: int, now: float, wall: float):
        self.device = device
        self.frames = self.batches = self.failed_batches = 0
        self.busy = 0.0
        self.window = Window()
        self.sizes = SizeHistogram(max_batch)
        self.latency = Histogram(LATENCY_BOUNDS)   # total latency of the requests it computed
        self.queue = Histogram(LATENCY_BOUNDS)     # ... of which waiting for their batch to start
        # idle while work waited: from the end of a batch (or a request's arrival, if later) to
        # the start of the next batch, the bubbles a pipeline exists to remove
        self.stall = 0.0
        self.stalls = Histogram(LATENCY_BOUNDS)
        self.last_finished = 0.0
        self.state = device.state
        self.since, self.since_wall = now, wall
        self.transitions = collections.Counter()


class _NoCatalog:
    """Stats made without a catalog (unit tests of the daemon's figures): no model rows."""

    single = True
    by_id: list = []
    live: list = []
    default = None


_NO_CATALOG = _NoCatalog()


class UidStats:
    __slots__ = ("sessions", "in_flight", "requests")

    def __init__(self):
        self.sessions = self.in_flight = self.requests = 0


class Stats:
    """All of it, for one daemon. ``counters`` is the raw store other modules also bump by name
    (daemon/caching/results.py, daemon/dispatch/health.py, the scheduler's batch counters); the rest has methods."""

    def __init__(self, cfg, devices: list, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, catalog=None):
        self.timing = cfg.metrics.enabled          # keep the histograms
        self.counters = collections.Counter()
        self.outcomes = collections.Counter()      # requests by how they were answered
        self.late = 0                              # answered ok, but after their deadline
        self.latency = {phase: Histogram(LATENCY_BOUNDS) for phase in PHASES}
        self.uids: dict[int, UidStats] = {}
        self._clock, self._wall = clock, wall
        self.started, self.started_wall = clock(), wall()
        self.max_batch = cfg.batching.max_batch
        self.devices: dict = {}                    # Device -> DeviceStats
        self.door = None                           # the client socket's (daemon/front/door.py): snapshot()
        # what is served (daemon/models/catalog.py); its ``single`` says whether figures are kept
        # per model too (NOTE [ stats per model ]); None: no model rows at all (unit tests)
        self.catalog = catalog if catalog is not None else _NO_CATALOG
        self.models: dict = {}                     # Served -> ModelStats, several models only
        self._alone_so_far = self.catalog.single   # a second model arriving forks the first's record
        for dev in devices:
            self.add_device(dev)

    def add_device(self, dev) -> DeviceStats:
        rec = self.devices[dev] = DeviceStats(dev, self.max_batch, self._clock(), self._wall())
        return rec

    # sessions and requests ----------------------------------------------------------------------
    def _uid(self, uid: int) -> UidStats:
        rec = self.uids.get(uid)
        if rec is None:
            rec = self.uids[uid] = UidStats()
        return rec

    def session_opened(self, uid: int) -> None:
        self._uid(uid).sessions += 1

    def session_closed(self, uid: int) -> None:
        self._uid(uid).sessions -= 1

    def admitted(self, uid: int, n: int = 1) -> None:
        """``n`` requests of ``uid`` hold a slot each until ``finished`` (coalesced ones too)."""
        rec = self._uid(uid)
        rec.in_flight += n
        rec.requests += n

    def finished(self, uid: int, n: int = 1) -> None:
        self._uid(uid).in_flight -= n

    def outcome(self, name: str, n: int = 1, served=None) -> None:
        """``n`` requests answered as ``name``; ``served``: the model they named, once resolved."""
        if served is not None and (self.models or not self.catalog.single):
            self.model(served).outcomes[name] += n     # (first: a fork copies the daemon's before it)
        self.outcomes[name] += n

    # per model (NOTE [ stats per model ] in daemon/ops/model_stats.py) ------------------------
    def model(self, served) -> ModelStats:
        """``served``'s record (several models only); the first one asked for after a one-model
        daemon took a second model forks the first model's from the daemon's figures."""
        rec = self.models.get(served)
        if rec is None:
            if self._alone_so_far:          # the daemon goes from one model to several
                self._alone_so_far = False
                first = self.catalog.live[0]
                self.models[first] = model_stats.alone(self, first)
            rec = self.models.get(served) or self.models.setdefault(served, ModelStats(served))
        return rec

    def _model_batch(self, result: BatchResult, answered: list, frames: int, now: float) -> None:
        """A batch's figures in its model's record (several models only)."""
        if result.mid >= 0:
            served = self.catalog.by_id[result.mid]
        elif result.entries and result.entries[0].request.served is not None:
            served = result.entries[0].request.served
        else:
            return
        self.model(served).batch(result, answered, frames, now, self.timing, self.max_batch)

    def reload_done(self, ok: bool) -> None:
        """Called by the model reload, once per attempt (kept in ``counters``: reloads,
        reloads_failed)."""
        self.counters["reloads" if ok else "reloads_failed"] += 1

    # batches ------------------------------------------------------------------------------------
    def batch(self, result: BatchResult, answered: list[Request], now: float) -> None:
        """One BatchResult back on the loop, its replies written at ``now``; ``answered``: the live
        requests it answered ok (their latency is kept; stale and failed ones have none)."""
        rec = self.devices.get(result.device) or self.add_device(result.device)
        started, finished = result.started, result.finished
        frames = 0 if result.canary else result.count(Outcome.DONE)
        if self.models or not self.catalog.single:
            self._model_batch(result, answered, frames, now)
        rec.busy += finished - started
        rec.window.add(started, finished, frames)
        if answered:
            first = min(r.arrived for r in answered)
            stall = max(started - max(rec.last_finished, first), 0.0)
            rec.stall += stall
            if self.timing:
                rec.stalls.observe(stall)
        rec.last_finished = max(rec.last_finished, finished)
        if not result.canary and result.count(Outcome.FAILED):
            rec.failed_batches += 1
        if frames:
            rec.frames += frames
            rec.batches += 1
        n = len(answered)
        if n:
            self.outcomes["ok"] += n
        if not self.timing:
            self.late += sum(now > r.deadline for r in answered)
            return
        if frames:
            rec.sizes.observe(frames)
        if n:
            lat = self.latency
            lat["compute"].observe(finished - started, n)
            lat["reply"].observe(now - finished, n)
            queue, total, dev_total, dev_queue = lat["queue"], lat["total"], rec.latency, rec.queue
            # one observation (with its count) per run of requests that arrived together: a
            # classify_many's are admitted at one time, so a batch makes a few, not one a frame
            late, arrived, n_run = 0, None, 0
            for r in answered:
                if now > r.deadline:
                    late += 1
                if r.arrived == arrived:
                    n_run += 1
                    continue
                if n_run:
                    self._observe_run(queue, dev_queue, total, dev_total, started - arrived, now - arrived, n_run)
                arrived, n_run = r.arrived, 1
            self._observe_run(queue, dev_queue, total, dev_total, started - arrived, now - arrived, n_run)
            self.late += late

    @staticmethod
    def _observe_run(queue, dev_queue, total, dev_total, waited: float, seconds: float, n: int) -> None:
        """``n`` requests that waited ``waited`` before their batch and ``seconds`` in all."""
        queue.observe(waited, n)
        dev_queue.observe(waited, n)
        total.observe(seconds, n)
        dev_total.observe(seconds, n)

    def device_state(self, dev, state: str) -> None:
        """A health transition of ``dev`` into ``state`` (daemon/dispatch/health.py)."""
        rec = self.devices.get(dev) or self.add_device(dev)
        rec.state = state
        rec.since, rec.since_wall = self._clock(), self._wall()
        rec.transitions[state] += 1

    # reading ------------------------------------------------------------------------------------
    def rates(self, rec: DeviceStats, now: float | None = None) -> tuple[dict, dict]:
        return rec.window.rates(self._clock() if now is None else now, self.started)

    def device_summary(self, rec: DeviceStats, now: float) -> dict:
        dev = rec.device
        fps, ratio = self.rates(rec, now)
        return {"index": dev.index, "name": dev.name, "label": dev.label, "state": rec.state,
                "state_for_s": round(now - rec.since, 3), "state_since_unix": round(rec.since_wall, 3),
                "transitions": dict(rec.transitions), "queued": len(dev.queue),
                "outstanding": dev.outstanding, "frames": rec.frames, "batches": rec.batches,
                "failed_batches": rec.failed_batches, "busy_s": round(rec.busy, 6),
                "frames_per_s": {f"{w}s": round(v, 3) for w, v in fps.items()},
                "busy_ratio": {f"{w}s": round(v, 4) for w, v in ratio.items()},
                "idle_ratio": {f"{w}s": round(1.0 - v, 4) for w, v in ratio.items()},
                "stall_s": round(rec.stall, 6), "stall": rec.stalls.summary(), "queue_wait": rec.queue.summary(),
                "batch_sizes": rec.sizes.pairs(),
                "batch_mean": round(rec.sizes.sum / max(sum(rec.sizes.counts), 1), 3),
                "latency": rec.latency.summary(), "batch_ms": dev.profile.snapshot()}

    def snapshot(self) -> dict:
        """Everything above as plain data (str keys, ints, floats, lists): see Server.stats_snapshot."""
        now = self._clock()
        return {"uptime_s": round(now - self.started, 3), "started_unix": round(self.started_wall, 3),
                "histograms": self.timing, "max_batch": self.max_batch,
                "requests": {"outcomes": dict(self.outcomes), "late": self.late},
                "latency": {phase: h.summary() for phase, h in self.latency.items()},
                "uids": [{"uid": uid, "sessions": u.sessions, "in_flight": u.in_flight,
                          "requests": u.requests} for uid, u in sorted(self.uids.items())],
                "devices": [self.device_summary(rec, now) for rec in self.devices.values()],
                "models": self.model_summaries(now),
                "reloads": {"ok": self.counters["reloads"], "failed": self.counters["reloads_failed"]},
                "door": self.door.snapshot() if self.door is not None else None,
                "counters": {k: (round(v, 6) if isinstance(v, float) else v)
                             for k, v in self.counters.items()}}


    def model_summaries(self, now: float) -> list[dict]:
        """A row per served model (daemon/ops/model_stats.py ``summaries``)."""
        return model_stats.summaries(self, now)
