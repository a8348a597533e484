"""When a batch stops waiting for company: the measured window (``batching.window = "measured"``).

NOTE [ measured window ]

Rule 3 of NOTE [ batch planning ] (daemon/dispatch/queues.py) weighs going now with the n queued
frames against waiting for k more. With ``batching.window = "fixed"`` a wait may not end past the
window a0 + max_delay: a fixed bound, blind to what the device and the clients cost. On a loaded
host that blind spot splits the batches of closed-loop clients: sixteen clients with one request
each in flight come back spread over more than 5 ms (each one's wake-up, the loop's turn, the
reply's write), so the first eight go without the rest, the rest wait a whole batch behind them,
and from then on two half batches alternate: the device always busy at the throughput of batches
of eight, and a request that lands behind the other half waits a batch more, which is the p99
(docs/benchmarks.md, "Thread pools and the CPU layout": mean batches of 11 with 16 clients, p99
1.5-1.9x p50; a 20 ms window gave batches of 12.4 and 0.93 of the model where 5 ms gave 0.76).

The measured window asks what the daemon measures instead of a constant: the device's latency
profile L(b) (daemon/dispatch/profile.py), the sessions with a request in flight and their think
times (``ThinkTime``: the k expected back, each at its own time), the batch's deadlines. With S the
batch's start (now, or when the busy device is free) and the k-th expected arrival at t:

    together(k) = max(t, S) + L(n + k)             wait for the k, run one batch of n + k
    apart(k)    = max(S + L(n), t) + L(k)          go now with n; the k run after them

Waiting for those k pays only if it finishes all n + k sooner: together(k) < apart(k), i.e. the
wait is shorter than what one batch of n + k saves over two batches, L(n) + L(k) - L(n + k) (the
fixed cost batching amortises), less nothing else. Among the k that pay, and whose batch still
meets the earliest deadline of the n (together(k) <= D(n)), the planner waits for the one with the
best rate (n + k) / (together(k) - S), as rule 3 does, with no bound but those: a client that is
late by more than GRACE is given up on (``DeviceQueue`` drops its expectation), and a session whose
think time exceeds one full batch's time is never expected at all (:func:`horizon`), since no
saving can cover such a wait. Sixteen clients then form batches of sixteen: when half of them are
queued just before the device is free and the other half are expected back a think time after
their replies, two batches of eight (2 L(8)) lose to a wait of the think time plus L(16) whenever
the think time is shorter than L(8) + L(8) - L(16) (about 8 ms for ResNet-18 @ 64x64 here), and the
first frame back after a full batch waits for the other fifteen by the same sum.

What stays as it was: rule 0 (a busy device's batch closes LEAD before it is free), rule 1 (a full
batch goes at once), rule 2 (the deadline cap), the fair order that decides which frames are "the
first n", and arrivals predicted from the smoothed gap where no session is expected (open-loop
clients, or every session already queued): those say nothing about who comes, and closed-loop
clients all queued will send nothing more, so that wait is rule 3 as it was, inside max_delay. A
lone client is never held: nobody else is expected.
"""
from __future__ import annotations

import math

WINDOWS = ("measured", "fixed")

GRACE = 0.002      # the fixed window: an expected arrival overdue by this much is not waited for


def horizon(batching, profile) -> float:
    """The longest think time worth expecting a session back after (``ThinkTime.replied``, the
    collector's running batch): ``max_delay`` with the fixed window; with the measured one, one
    full batch's time on this device as its profile says (no wait longer than that can pay, NOTE
    [ measured window ]), and never less than ``max_delay``."""
    max_delay = batching.max_delay_ms / 1000.0
    if getattr(batching, "window", "fixed") != "measured":
        return max_delay
    return max(max_delay, profile.latency(batching.max_batch))


def overdue_grace(batching, horizon: float) -> float:
    """How long an expected arrival stays expected once overdue: GRACE with the fixed window; with
    the measured one the ``horizon`` (:func:`horizon`), since the rule itself says how long a late
    one is worth waiting for (its break-even), and a shorter grace would cut that short."""
    return horizon if getattr(batching, "window", "fixed") == "measured" else GRACE


def wait_for_company(now: float, start: float, ready: float, n: int, latency, max_batch: int,
                     deadline: float, expected) -> tuple[int, float]:
    """Rule 3 with the measured window (NOTE [ measured window ]) for sessions ``expected`` back
    (the times, ascending; not empty): ``(n, 0.0)`` to go now with the ``n`` queued, ``(0, t)`` to
    wait until ``t`` and plan again. ``start``: when a batch going now would start (now, or when
    the busy device is free); ``ready``: when it could first have started (the device free and the
    n queued), from which going apart is counted, so that the wait as a whole, not each look at
    it, is bounded by what one batch saves."""
    base = latency(n)
    if base <= 0.0:                         # the profile knows nothing yet
        return n, 0.0
    best, until = 0.0, None
    for k, t in enumerate(expected[:max_batch - n], 1):
        if t > now:                         # due later: wait until it is due, then look again
            at = t
            together = max(at, start) + latency(n + k)
            if together >= max(ready + base, at) + latency(k):
                continue                    # one batch of n + k would end no sooner than two
        else:                               # overdue: worth waiting for until the break-even,
            at = ready + base + latency(k) - latency(n + k)   # where one batch ends as two would
            if at <= now:
                continue
            together = max(at, start) + latency(n + k)
        if together > deadline:
            break
        rate = (n + k) / (together - start)
        if rate > best:
            best, until = rate, at
    return (n, 0.0) if until is None else (0, until)
