"""The daemon's figures per served model (NOTE [ stats per model ]), kept by daemon/ops/stats.py.

NOTE [ stats per model ]

With several models (``catalog.single`` false) every figure a model owns is kept a second time in
that model's ModelStats (keyed by its Served): the outcomes of the requests that named it
(refusals before its name was resolved, such as unknown_model, stay the daemon's alone), the
queue, compute, reply and total latency of its answers, its rate ring, and per device the seconds
the device spent running its batches (the device share an operator checks against ``share``), its
frames, batches and batch sizes. A one-model daemon keeps none of it: its one model's figures are
the daemon's, read off them when asked (``alone``), so a one-model request pays for nothing here.
When a second model arrives at run time (daemon/ops/model_ops.py) the first one's record is forked
from the daemon's figures (everything so far was that model's), then every model's is kept from
the next event on, also after an unload leaves one model (the daemon's figures then hold others').
An unloaded model's row stays, ``served`` false (the metrics leave it out).

    event                                   kept, several models only
    -----                                   -------------------------
    Stats.outcome(name, served=...)         ModelStats.outcomes[name]
    Stats.batch (its BatchResult.mid)       ModelStats.batch: device seconds, frames, batches,
                                            sizes (per device), latency phases, rate ring, ok

Reading (``summaries``) is O(models x devices + buckets), on the event loop like the rest.
"""
from __future__ import annotations

import collections

from .histograms import LATENCY_BOUNDS, PHASES, Histogram, SizeHistogram, Window

#: Outcomes that answer a request (the rest are errors: refused, expired, failed, dropped).
ANSWERS = ("ok", "cached", "cached_l2", "coalesced")


class ModelDeviceStats:
    """What one device did for one model: seconds running its batches, frames, batches, sizes."""

    __slots__ = ("seconds", "frames", "batches", "sizes")

    def __init__(self, max_batch: int):
        self.seconds = 0.0
        self.frames = self.batches = 0
        self.sizes = SizeHistogram(max_batch)


class ModelStats:
    """What one served model (name, version) was asked and did."""

    __slots__ = ("served", "outcomes", "late", "latency", "window", "devices")

    def __init__(self, served):
        self.served = served
        self.outcomes = collections.Counter()
        self.late = 0
        self.latency = {phase: Histogram(LATENCY_BOUNDS) for phase in PHASES}
        self.window = Window()                     # frames answered, device seconds (all devices)
        self.devices: dict = {}                    # Device -> ModelDeviceStats

    def batch(self, result, answered: list, frames: int, now: float, timing: bool, max_batch: int) -> None:
        """One of its batches back on the loop (Stats.batch's figures, for this model alone)."""
        started, finished = result.started, result.finished
        dev = self.devices.get(result.device)
        if dev is None:
            dev = self.devices[result.device] = ModelDeviceStats(max_batch)
        dev.seconds += finished - started
        self.window.add(started, finished, frames)
        if frames:
            dev.frames += frames
            dev.batches += 1
        n = len(answered)
        if n:
            self.outcomes["ok"] += n
        if not timing:
            self.late += sum(now > r.deadline for r in answered)
            return
        if frames:
            dev.sizes.observe(frames)
        if n:
            lat = self.latency
            lat["compute"].observe(finished - started, n)
            lat["reply"].observe(now - finished, n)
            queue, total = lat["queue"], lat["total"]
            for r in answered:
                queue.observe(started - r.arrived)
                total.observe(now - r.arrived)
                if now > r.deadline:
                    self.late += 1


def alone(stats, served) -> ModelStats:
    """The record of the one model of a one-model daemon: ``stats``' own figures, copied."""
    rec = ModelStats(served)
    rec.outcomes.update(stats.outcomes)
    rec.late = stats.late
    for phase in PHASES:
        h, mine = stats.latency[phase], rec.latency[phase]
        mine.counts[:], mine.sum = h.counts, h.sum
    for dev, d in stats.devices.items():
        mine = rec.devices[dev] = ModelDeviceStats(len(d.sizes.counts) - 1)
        mine.seconds, mine.frames, mine.batches = d.busy, d.frames, d.batches
        mine.sizes.counts[:], mine.sizes.sum = d.sizes.counts, d.sizes.sum
    w = rec.window                      # the devices' rings summed, slot by slot
    for d in stats.devices.values():
        for i, second in enumerate(d.window.sec):
            if second > w.sec[i]:
                w.sec[i], w.frames[i], w.busy[i] = second, 0, 0.0
            if second == w.sec[i]:
                w.frames[i] += d.window.frames[i]
                w.busy[i] += d.window.busy[i]
    return rec


def summaries(stats, now: float) -> list[dict]:
    """A row per served model: requests by outcome, answers, errors, latency split, batch sizes,
    its rates, and per device its seconds there, its share of the device's time spent on models,
    and the share configured for it (its ``share`` over those of the models the device runs)."""
    catalog = stats.catalog
    live = list(getattr(catalog, "live", catalog.by_id))
    if not live:
        return []
    if catalog.single and not stats.models:
        records = [alone(stats, live[0])]
    else:
        records = [stats.model(s) for s in live]
        records += [r for s, r in stats.models.items() if s not in live]   # unloaded since
    spent: dict = collections.Counter()         # device -> seconds on every model
    for rec in records:
        for dev, d in rec.devices.items():
            spent[dev] += d.seconds
    weights = {dev: sum(s.share for s in live if s.runs_on(dev.index)) for dev in stats.devices}
    default = catalog.default.stable if getattr(catalog, "default", None) is not None else None
    return [_row(stats, rec, now, spent, weights, rec.served is default, live) for rec in records]


def _row(stats, rec: ModelStats, now: float, spent: dict, weights: dict, default: bool, live: list) -> dict:
    served = rec.served
    devices = []
    for dev in stats.devices:           # every device it runs on, and any it ran on before
        if dev not in rec.devices and not served.runs_on(dev.index):
            continue
        d = rec.devices.get(dev) or ModelDeviceStats(stats.max_batch)
        devices.append({"index": dev.index, "label": dev.label, "seconds": round(d.seconds, 6),
                        "share": round(d.seconds / spent[dev], 4) if spent[dev] else None,
                        "share_configured": (round(served.share / weights[dev], 4)
                                             if served in live and weights[dev] else None),
                        "frames": d.frames, "batches": d.batches, "batch_sizes": d.sizes.pairs()})
    sizes = collections.Counter()
    for d in rec.devices.values():
        for size, n in d.sizes.pairs():
            sizes[size] += n
    batches = sum(sizes.values())
    fps, busy = rec.window.rates(now, stats.started, cap=float(len(rec.devices) or 1))
    outcomes = dict(rec.outcomes)
    requests = sum(outcomes.values())
    answers = sum(outcomes.get(k, 0) for k in ANSWERS)
    return {
        "name": served.name, "version": served.version, "mid": served.mid, "digest": served.digest,
        "gen": served.gen, "default": default, "served": served in live, "share": served.share,
        "requests": requests, "answers": answers, "errors": requests - answers, "outcomes": outcomes,
        "late": rec.late, "frames": sum(d.frames for d in rec.devices.values()),
        "batches": sum(d.batches for d in rec.devices.values()),
        "device_seconds": round(sum(d.seconds for d in rec.devices.values()), 6),
        "frames_per_s": {f"{w}s": round(v, 3) for w, v in fps.items()},
        "device_seconds_per_s": {f"{w}s": round(v, 4) for w, v in busy.items()},
        "batch_sizes": [[k, v] for k, v in sorted(sizes.items())],
        "batch_mean": round(sum(k * v for k, v in sizes.items()) / batches, 3) if batches else 0.0,
        "latency": {phase: h.summary() for phase, h in rec.latency.items()},
        "devices": devices}
