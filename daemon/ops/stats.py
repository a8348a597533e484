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
    several models (NOTE [ stats per model ])       per model: outcomes, queue / compute / total
                                                    histograms, its rate window, and per device
                                                    device seconds, frames, batches, batch sizes
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

NOTE [ stats per model ]

With several models (``catalog.single`` false) every figure above that a model owns is kept a
second time in that model's ModelStats (keyed by its Served): the outcomes of the requests that
named it (refusals before its name was resolved, such as unknown_model, stay the daemon's alone),
the queue, compute and total latency of its answers, and per device the seconds the device spent
running its batches (the device share an operator checks against ``share``), its frames, batches
and batch sizes. A one-model daemon keeps none of it: its one model's figures are the daemon's,
read off them when asked, so a one-model request pays for nothing here. When a second model
arrives at run time the first record is forked from the daemon's figures (everything so far was
that model's), then both are kept from the next event on.

Time is monotonic seconds from an injected ``clock`` (tests drive it); wall-clock time is used
only to show operators when something happened (``wall``, also injectable).
"""
from __future__ import annotations

import bisect
import collections
import time
from typing import TYPE_CHECKING, Callable

from ..pipeline.records import Outcome

if TYPE_CHECKING:
    from ..pipeline.records import BatchResult, Request

#: Upper bounds (seconds) of the latency buckets: 5 per decade from 10 us to 100 s, so a quantile
#: read off them is within a factor 10**0.2 = 1.58 of the truth before interpolation.
LATENCY_BOUNDS = tuple(float(f"{10 ** (k / 5):.3g}") for k in range(-25, 11))
#: The windows of the per-device rates, seconds.
WINDOWS = (1, 10, 60)
PHASES = ("queue", "compute", "reply", "total")
#: Slots of the per-second ring: the longest window, the second in progress, and spare.
_RING = 64


class Histogram:
    """Counts per bucket (``counts[i]``: bounds[i-1] < value <= bounds[i]; the last: above every
    bound) and the sum of the values. Prometheus semantics: a bucket's bound is inclusive."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1), interpolated linearly inside its bucket as Prometheus'
        histogram_quantile does; None when empty. Above the last bound: the last bound."""
        return quantile(self.bounds, self.counts, q)

    def buckets(self) -> list:
        """[[upper bound or None (above the last), count], ...] of the non-empty buckets."""
        bounds = (*self.bounds, None)
        return [[bounds[i], n] for i, n in enumerate(self.counts) if n]

    def summary(self, scale: float = 1000.0, suffix: str = "_ms") -> dict:
        """count, sum (unscaled), mean, p50, p90, p99 (times ``scale``), the non-empty buckets."""
        n = self.count
        out = {"count": n, "sum_s": self.sum, f"mean{suffix}": round(self.sum / n * scale, 4) if n else None}
        for q in (0.5, 0.9, 0.99):
            v = self.quantile(q)
            out[f"p{round(q * 100)}{suffix}"] = None if v is None else round(v * scale, 4)
        out["buckets"] = self.buckets()
        return out


def quantile(bounds, counts, q: float) -> float | None:
    """q-quantile of bucket ``counts`` over upper ``bounds`` (len(counts) == len(bounds) + 1); the
    first bucket starts at 0. Also for a client that diffs two readings of ``buckets()``."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(bounds):
                return float(bounds[-1])
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * max(rank - seen, 0.0) / n
        seen += n
    return float(bounds[-1])


class SizeHistogram:
    """Batch sizes 1..max_batch counted exactly (an index, no search)."""

    __slots__ = ("counts", "sum")

    def __init__(self, max_batch: int):
        self.counts = [0] * (max_batch + 1)
        self.sum = 0

    def observe(self, size: int) -> None:
        self.counts[min(size, len(self.counts) - 1)] += 1
        self.sum += size

    def pairs(self) -> list:
        """[[size, batches], ...] of the sizes seen."""
        return [[size, n] for size, n in enumerate(self.counts) if n]

    def buckets(self) -> list:
        """Cumulative (bound, count) at 1, 2, 4, ... and max_batch, for Prometheus ``le``."""
        top = len(self.counts) - 1
        bounds = sorted({*(2 ** i for i in range(top.bit_length()) if 2 ** i <= top), top})
        out, seen, i = [], 0, 0
        for b in bounds:
            while i <= b:
                seen += self.counts[i]
                i += 1
            out.append((b, seen))
        return out


class Window:
    """A device's work per second in a ring of ``_RING`` one-second slots: frames answered (at the
    second its batch finished) and busy seconds (a batch's run split over the seconds it spans).
    A slot is claimed by writing its second into ``sec``; a stale slot reads as empty."""

    __slots__ = ("sec", "frames", "busy")

    def __init__(self):
        self.sec = [-1] * _RING
        self.frames = [0] * _RING
        self.busy = [0.0] * _RING

    def _slot(self, second: int) -> int:
        i = second % _RING
        if self.sec[i] != second:
            self.sec[i], self.frames[i], self.busy[i] = second, 0, 0.0
        return i

    def add(self, started: float, finished: float, frames: int) -> None:
        """One batch. Batches of a device finish in order, so no slot written here is newer than
        ``finished``; a batch longer than the ring counts only its last _RING - 1 seconds."""
        self.frames[self._slot(int(finished))] += frames
        t = max(started, finished - (_RING - 1))
        second = int(t)
        while t < finished:
            end = min(finished, second + 1.0)
            self.busy[self._slot(second)] += end - t
            t, second = end, second + 1

    def rates(self, now: float, since: float, cap: float = 1.0) -> tuple[dict, dict]:
        """({window: frames/s}, {window: busy ratio}) over each of WINDOWS, measured from the
        start of the second ``window`` seconds before ``now`` (or ``since``, if later) to ``now``;
        the busy ratio at most ``cap`` (a model's ring sums several devices: no cap)."""
        s = int(now)
        frames = dict.fromkeys(WINDOWS, 0)
        busy = dict.fromkeys(WINDOWS, 0.0)
        for back in range(WINDOWS[-1] + 1):
            i = (s - back) % _RING
            if self.sec[i] != s - back:
                continue
            for w in WINDOWS:
                if back <= w:
                    frames[w] += self.frames[i]
                    busy[w] += self.busy[i]
        fps, ratio = {}, {}
        for w in WINDOWS:
            span = now - max(s - w, since)
            fps[w] = frames[w] / span if span > 0 else 0.0
            ratio[w] = min(busy[w] / span, cap) if span > 0 else 0.0
        return fps, ratio


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


class ModelDeviceStats:
    """What one device did for one model: seconds running its batches, frames, batches, sizes."""

    __slots__ = ("seconds", "frames", "batches", "sizes")

    def __init__(self, max_batch: int):
        self.seconds = 0.0
        self.frames = self.batches = 0
        self.sizes = SizeHistogram(max_batch)


class ModelStats:
    """What one served model (name, version) was asked and did (NOTE [ stats per model ])."""

    __slots__ = ("served", "outcomes", "late", "latency", "window", "devices")

    def __init__(self, served):
        self.served = served
        self.outcomes = collections.Counter()
        self.late = 0
        self.latency = {phase: Histogram(LATENCY_BOUNDS) for phase in MODEL_PHASES}
        self.window = Window()                     # frames answered, device seconds (all devices)
        self.devices: dict = {}                    # Device -> ModelDeviceStats


#: The phases kept per model: every one the daemon keeps (a per-batch add for compute and reply).
MODEL_PHASES = PHASES


class _NoCatalog:
    """Stats made without a catalog (unit tests of the daemon's figures): no model rows."""

    single = True
    by_id: list = []
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
        self._max_batch = cfg.batching.max_batch
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
        rec = self.devices[dev] = DeviceStats(dev, self._max_batch, self._clock(), self._wall())
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

    def admitted(self, uid: int) -> None:
        """A request of ``uid`` holds a slot until ``finished`` (coalesced ones too)."""
        rec = self._uid(uid)
        rec.in_flight += 1
        rec.requests += 1

    def finished(self, uid: int, n: int = 1) -> None:
        self._uid(uid).in_flight -= n

    def outcome(self, name: str, n: int = 1, served=None) -> None:
        """``n`` requests answered as ``name``; ``served``: the model they named, once resolved."""
        if served is not None and not self.catalog.single:
            self._model(served).outcomes[name] += n     # (first: a fork copies the daemon's before it)
        self.outcomes[name] += n

    # per model (NOTE [ stats per model ]) ----------------------------------------------------
    def _model(self, served) -> ModelStats:
        rec = self.models.get(served)
        if rec is None:
            if self._alone_so_far:          # the daemon goes from one model to several
                self._alone_so_far = False
                first = self.catalog.by_id[0]
                self.models[first] = self._alone(first)
            rec = self.models.get(served) or self.models.setdefault(served, ModelStats(served))
        return rec

    def _alone(self, served) -> ModelStats:
        """The record of the one model of a one-model daemon: the daemon's own figures, copied."""
        rec = ModelStats(served)
        rec.outcomes.update(self.outcomes)
        rec.late = self.late
        for phase in MODEL_PHASES:
            h, mine = self.latency[phase], rec.latency[phase]
            mine.counts[:], mine.sum = h.counts, h.sum
        for dev, d in self.devices.items():
            mine = rec.devices[dev] = ModelDeviceStats(self._max_batch)
            mine.seconds, mine.frames, mine.batches = d.busy, d.frames, d.batches
            mine.sizes.counts[:], mine.sizes.sum = d.sizes.counts, d.sizes.sum
        w = rec.window                      # the devices' rings summed, slot by slot
        for d in self.devices.values():
            for i, second in enumerate(d.window.sec):
                if second > w.sec[i]:
                    w.sec[i], w.frames[i], w.busy[i] = second, 0, 0.0
                if second == w.sec[i]:
                    w.frames[i] += d.window.frames[i]
                    w.busy[i] += d.window.busy[i]
        return rec

    def _model_batch(self, result: BatchResult, answered: list, frames: int, now: float) -> None:
        """A batch's figures in its model's record (several models only)."""
        if result.mid >= 0:
            served = self.catalog.by_id[result.mid]
        elif result.entries and result.entries[0].request.served is not None:
            served = result.entries[0].request.served
        else:
            return
        rec = self._model(served)
        started, finished = result.started, result.finished
        dev = rec.devices.get(result.device)
        if dev is None:
            dev = rec.devices[result.device] = ModelDeviceStats(self._max_batch)
        dev.seconds += finished - started
        rec.window.add(started, finished, frames)
        if frames:
            dev.frames += frames
            dev.batches += 1
        n = len(answered)
        if n:
            rec.outcomes["ok"] += n
        if not self.timing:
            rec.late += sum(now > r.deadline for r in answered)
            return
        if frames:
            dev.sizes.observe(frames)
        if n:
            lat = rec.latency
            lat["compute"].observe(finished - started, n)
            lat["reply"].observe(now - finished, n)
            queue, total = lat["queue"], lat["total"]
            for r in answered:
                queue.observe(started - r.arrived)
                total.observe(now - r.arrived)
                if now > r.deadline:
                    rec.late += 1

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
        if not self.catalog.single:
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
            for r in answered:
                queue.observe(started - r.arrived)
                dev_queue.observe(started - r.arrived)
                seconds = now - r.arrived
                total.observe(seconds)
                dev_total.observe(seconds)
                if now > r.deadline:
                    self.late += 1

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
                "histograms": self.timing, "max_batch": self._max_batch,
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


    # reading per model ----------------------------------------------------------------------
    def model_summaries(self, now: float) -> list[dict]:
        """A row per served model (NOTE [ stats per model ]): requests by outcome, answers,
        errors, latency split, batch sizes, and per device its seconds there, its share of the
        device's time spent on models, and the share configured for it. O(models x devices +
        buckets)."""
        catalog = self.catalog
        if not catalog.by_id:
            return []
        if catalog.single:
            records = [self._alone(catalog.by_id[0])]
        else:
            records = [self.models.get(s) or self._model(s) for s in catalog.by_id]
            records += [r for s, r in self.models.items() if s not in catalog.by_id]   # left since
        spent: dict = collections.Counter()         # device -> seconds on every model
        for rec in records:
            for dev, d in rec.devices.items():
                spent[dev] += d.seconds
        default = catalog.default.stable if getattr(catalog, "default", None) is not None else None
        rows = []
        for rec in records:
            served = rec.served
            weights = {dev: sum(s.share for s in catalog.by_id if s.runs_on(dev.index)) for dev in self.devices}
            devices = []
            for dev in self.devices:        # every device it runs on, and any it ran on before
                if dev not in rec.devices and not served.runs_on(dev.index):
                    continue
                d = rec.devices.get(dev) or ModelDeviceStats(self._max_batch)
                devices.append({"index": dev.index, "label": dev.label, "seconds": round(d.seconds, 6),
                                "share": round(d.seconds / spent[dev], 4) if spent[dev] else None,
                                "share_configured": (round(served.share / weights[dev], 4)
                                                     if served in catalog.by_id and weights[dev] else None),
                                "frames": d.frames, "batches": d.batches, "batch_sizes": d.sizes.pairs()})
            sizes = collections.Counter()
            for d in rec.devices.values():
                for size, n in d.sizes.pairs():
                    sizes[size] += n
            batches = sum(sizes.values())
            fps, busy = rec.window.rates(now, self.started, cap=float(len(rec.devices) or 1))
            outcomes = dict(rec.outcomes)
            answers = sum(outcomes.get(k, 0) for k in ANSWERS)
            rows.append({
                "name": served.name, "version": served.version, "mid": served.mid,
                "digest": served.digest, "gen": served.gen,
                "default": served is default, "served": served in catalog.by_id, "share": served.share,
                "requests": sum(outcomes.values()), "answers": answers,
                "errors": sum(outcomes.values()) - answers, "outcomes": outcomes, "late": rec.late,
                "frames": sum(d.frames for d in rec.devices.values()),
                "batches": sum(d.batches for d in rec.devices.values()),
                "device_seconds": round(sum(d.seconds for d in rec.devices.values()), 6),
                "frames_per_s": {f"{w}s": round(v, 3) for w, v in fps.items()},
                "device_seconds_per_s": {f"{w}s": round(v, 4) for w, v in busy.items()},
                "batch_sizes": [[k, v] for k, v in sorted(sizes.items())],
                "batch_mean": round(sum(k * v for k, v in sizes.items()) / batches, 3) if batches else 0.0,
                "latency": {phase: h.summary() for phase, h in rec.latency.items()},
                "devices": devices})
        return rows


#: Outcomes that answer a request (the rest are errors: refused, expired, failed, dropped).
ANSWERS = ("ok", "cached", "cached_l2", "coalesced")
