"""The figures' containers: latency and batch-size histograms, and a per-second rate ring.

What daemon/ops/stats.py keeps (per daemon, device and model) is made of these; each is O(1) to
update on the event loop and O(buckets) to read (NOTE [ stats ] in daemon/ops/stats.py).
"""
from __future__ import annotations

import bisect

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
