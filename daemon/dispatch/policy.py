"""Dispatch policies: which healthy device takes a new request, and whether idle devices steal.

``weighted`` (default). A new request goes to the healthy device where it is expected to finish
first. For device d with measured latency profile L_d (daemon/dispatch/profile.py), B = max_batch:

    finish_d = now + running_d + drain_d(q_d + 1)
    running_d = time left of the batch it is running: max(0, started + L_d(size) - now), else 0,
                plus L_d(staged) for a batch staged behind it (daemon/pipeline/collector.py)
    drain_d(n) = floor(n / B) * L_d(B) + L_d(n mod B)      (n queued frames in batches of B)

so a device three times as fast gets about three times the work, and a device that slows down gets
less within a few batches. Ties (for instance before any measurement) go to the device holding
fewer requests, then to the lower index. An idle device also steals: when its queue is empty it
takes up to ceil(q_v / 2) (at most B) of the newest requests of the busy peer v with the longest
queue, but only as many k as it can finish before v would have reached them:
now + L_thief(k) < now + running_v + drain_v(q_v). Stealing can only move a request to where it
finishes sooner, so this push policy never does worse than a shared pull queue.

``round_robin``. Healthy devices in turn, whatever their speed or load; no stealing. Kept to
measure what weighting buys (bench/pool/run.py).

Both read the devices' state without locks: queue lengths and profile entries are single values
replaced whole, so a reading is at worst one batch stale, which an estimate tolerates.
"""
from __future__ import annotations

import itertools
import math

POLICIES = ("weighted", "round_robin")


def drain_time(latency, n: int, max_batch: int) -> float:
    """Seconds to run ``n`` queued frames in batches of ``max_batch``."""
    if n <= 0:
        return 0.0
    full, rest = divmod(n, max_batch)
    return full * latency(max_batch) + (latency(rest) if rest else 0.0)


def running_left(dev, now: float) -> float:
    """Seconds until ``dev`` is free: what is left of its running batch, plus the batch staged
    behind it (daemon/pipeline/collector.py), which has left the queue but not started."""
    return busy_until(dev, now) - now


def busy_until(dev, now: float) -> float:
    """When ``dev`` is expected to be free for its next batch (``now`` when idle)."""
    t = now
    started, size = dev.running_since, dev.running_size
    if started is not None:
        t = max(t, started + dev.running_profile.latency(size))
    staged = dev.staged
    if staged:
        t += dev.staged_profile.latency(len(staged))
    return t


def backlog(dev, now: float, max_batch: int, extra: int = 0, mid: int = 0) -> float:
    """Seconds until ``dev`` would finish what it holds now plus ``extra`` more frames (of model
    ``mid``: its profile times them all, an estimate when several models share the device)."""
    return finish_in(dev, now, max_batch, len(dev.queue) + extra, mid)


def finish_in(dev, now: float, max_batch: int, frames: int, mid: int = 0) -> float:
    """Seconds until ``dev`` would finish the batch it runs and the next ``frames`` it serves (a
    request's place in the fair order, for admission: NOTE [ batch planning ])."""
    return running_left(dev, now) + drain_time((dev.profiles[mid] if mid else dev.profile).latency, frames, max_batch)


class Weighted:
    name = "weighted"
    steals = True

    def choose(self, devices: list, now: float, max_batch: int, exclude=None, served=None):
        """The healthy device (not ``exclude``; one ``served`` may run on, when given) with the
        earliest expected finish for one more request, or None."""
        best, best_key = None, None
        mid = 0
        if served is not None:              # several models: its devices, its profile
            devices = [d for d in devices if served.runs_on(d.index)]
            mid = served.mid
        for dev in devices:
            if not dev.healthy or dev is exclude:
                continue
            key = (backlog(dev, now, max_batch, 1, mid), dev.outstanding, dev.index)
            if best_key is None or key < best_key:
                best, best_key = dev, key
        return best

    def steal_from(self, thief, peers: list, now: float, max_batch: int):
        """(victim, count) for an idle ``thief``, or (None, 0)."""
        busy = [p for p in peers if p is not thief and p.healthy and p.running_since is not None
                and len(p.queue)]
        if not busy:
            return None, 0
        victim = max(busy, key=lambda p: len(p.queue))
        victim_done = now + backlog(victim, now, max_batch)
        k = min(max_batch, math.ceil(len(victim.queue) / 2))
        while k > 0 and now + thief.profile.latency(k) >= victim_done:
            k -= 1
        return (victim, k) if k else (None, 0)


class RoundRobin:
    name = "round_robin"
    steals = False

    def __init__(self):
        self._turn = itertools.count()

    def choose(self, devices: list, now: float, max_batch: int, exclude=None, served=None):
        healthy = [d for d in devices if d.healthy and d is not exclude
                   and (served is None or served.runs_on(d.index))]
        return healthy[next(self._turn) % len(healthy)] if healthy else None

    def steal_from(self, thief, peers: list, now: float, max_batch: int):
        return None, 0


def make(name: str):
    if name == "weighted":
        return Weighted()
    if name == "round_robin":
        return RoundRobin()
    raise ValueError(f"dispatch policy {name!r} is not one of {', '.join(POLICIES)}")
