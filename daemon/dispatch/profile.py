"""A device's measured latency profile: how long a batch of b frames takes, per batch size, smoothed.

Every batch a device runs adds one observation (b, seconds). Each batch size keeps its own
exponentially weighted moving average (weight ``alpha`` on the newest), so a device that slows
down is seen within a few batches and one outlier moves the estimate by ``alpha`` at most.

``latency(b)`` for a size never observed is read off the observed ones: linear interpolation
between the nearest sizes below and above; beyond the largest (or below the smallest) a straight
line through the two nearest observed sizes, never below the nearest observation's per-frame cost
times b (batches are never cheaper per frame than the largest one measured); with one observed
size, proportional to b (a conservative guess: it ignores the fixed cost batching amortises).

Written by the device's executor thread, read by the event loop: one float per size, replaced whole,
so a reader sees either the old or the new average, which is all an estimate needs.
"""
from __future__ import annotations

import bisect
import statistics


class LatencyProfile:
    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self._sizes: list[int] = []              # sorted batch sizes observed
        self._seconds: dict[int, float] = {}     # batch size -> smoothed seconds

    def observe(self, batch: int, seconds: float) -> None:
        old = self._seconds.get(batch)
        if old is None:
            bisect.insort(self._sizes, batch)
            self._seconds[batch] = seconds
        else:
            self._seconds[batch] = old + self.alpha * (seconds - old)

    def seed(self, batch: int, samples: list[float]) -> None:
        """Start the size ``batch`` at the typical one of a warm-up's ``samples`` (the lower median),
        replacing what it held: a moving average started at the first warm-up batch, which pays for
        caches, allocator and threads still cold, keeps most of that outlier through a short warm-up
        (0.8^7 of it after 8 batches) and under-reports the device's capacity for as long."""
        if samples:
            self._seconds.pop(batch, None)
            self.observe(batch, statistics.median_low(samples))

    @property
    def known(self) -> bool:
        return bool(self._sizes)

    def latency(self, batch: int) -> float:
        """Estimated seconds for a batch of ``batch`` frames (0.0 before any observation)."""
        sizes, secs = self._sizes, self._seconds
        if not sizes:
            return 0.0
        if batch in secs:
            return secs[batch]
        if len(sizes) == 1:
            return secs[sizes[0]] * batch / sizes[0]
        i = bisect.bisect_left(sizes, batch)
        lo, hi = (sizes[i - 1], sizes[i]) if 0 < i < len(sizes) else \
                 ((sizes[0], sizes[1]) if i == 0 else (sizes[-2], sizes[-1]))
        slope = (secs[hi] - secs[lo]) / (hi - lo)
        estimate = secs[lo] + slope * (batch - lo)
        if batch > sizes[-1]:
            estimate = max(estimate, secs[sizes[-1]] / sizes[-1] * batch)
        return max(estimate, 1e-6)

    def throughput(self, batch: int) -> float:
        """Frames per second at batch size ``batch`` (0.0 before any observation)."""
        seconds = self.latency(batch)
        return batch / seconds if seconds > 0 else 0.0

    def snapshot(self) -> dict[int, float]:
        """Smoothed milliseconds per observed batch size (keys as strings), for stats."""
        return {str(b): round(self._seconds[b] * 1000, 3) for b in self._sizes}  # msgpack maps: str keys
