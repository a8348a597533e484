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
batch's start if it went now (now, or when the busy device is free), R when the n could first have
gone (the device free and the last of them queued) and the k-th expected arrival at t:

    together(k) = max(t, S) + L(n + k)             wait for the k, run one batch of n + k
    apart(k)    = max(R + L(n), t) + L(k)          the n from R; the k after them

Waiting for those k pays only if it finishes all n + k sooner: together(k) < apart(k), i.e. the
wait since R is shorter than what one batch of n + k saves over two, L(n) + L(k) - L(n + k) (the
fixed cost batching amortises). Counted from R, not from now, so the wait as a whole is bounded
by that saving, not each look at it (from now, "a little longer" would always pay). An arrival
not yet due is waited for until it is due, then the plan is made again; one overdue is waited for
until the break-even R + L(n) + L(k) - L(n + k), where one batch would end as two would. Among
the k that pay, and whose batch still meets the earliest deadline of the n (together(k) <= D(n)),
the planner waits for the one with the best rate (n + k) / (together(k) - S), as rule 3 does. An
expectation stays while one full batch's time could still cover it (:func:`overdue_grace`), and a
session whose think time exceeds one full batch's time is never expected at all
(:func:`horizon`), since no saving can cover such a wait. Sixteen clients then form batches of
sixteen: when half of them are queued just before the device is free and the other half are
expected back a think time after their replies, two batches of eight (2 L(8)) lose to a wait of
the think time plus L(16) whenever the think time is shorter than L(8) + L(8) - L(16) (about 6 ms
for ResNet-18 @ 64x64 here), and the first frame back after a full batch waits for the other
fifteen by the same sum.

Where it loses. The comparison is of one batch against two back to back; it does not see that
with two halves alternating, each half's way back overlaps the other's batch. So when clients
come back later than the fixed cost (a loaded host, slow clients), keeping them together leaves
the device idle for their way back, where alternating halves would keep it busy: in
tests/unit/test_batch_planner_simulation.py (L(b) = 9.5 + 1.3 b ms, sixteen clients back 6-18 ms
after their replies) 336 img/s against the fixed window's 404, with p99/p50 1.18 against 1.22;
with clients back within the fixed cost it gains (2-6 ms: 444 against 418 img/s, p99/p50 1.07
against 2.02). Counting the wait from when the device went idle instead of from R switches to
alternating halves there, but flips between the two when the way back is near the fixed cost
(batches of 12.2, p99/p50 2.1 with clients back 4-12 ms), so it is not done.

A larger batch's time is read as no more per frame than the n's, L(n + k) <= L(n) (n + k) / n.
The profile keeps one estimate per size, learnt only from batches of that size: once a window
of load had made batches of four slow (35 ms, a one-thread team while another process took a
core), L(4) stayed there when the load went, the rule saw no saving in waiting for the fourth
client (L(1) + L(3) - L(4) < 0), batches of three and one formed, and L(4) was never measured
again (bench.load.policy at 13:01, 4 clients: batches of 3.0, 137 img/s, where the same window's
fixed-window daemon ran batches of 4.0 at 184). Batching does not make a frame dearer on these
devices, so the cap only removes such a stale estimate from the decision; the profile itself,
which admission and the capacity read, is left as measured.

What stays as it was: rule 0 (a busy device's batch closes LEAD before it is free), rule 1 (a full
batch goes at once), rule 2 (the deadline cap), the fair order that decides which frames are "the
first n", and arrivals predicted from the smoothed gap where no session is expected (open-loop
clients, or every session already queued): those say nothing about who comes, and closed-loop
clients all queued will send nothing more, so that wait is rule 3 as it was, inside max_delay. A
lone client is never held: nobody else is expected.
"""
from __future__ import annotations

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
        # a larger batch is taken as no dearer per frame than the n (NOTE: a stale estimate)
        bigger = min(latency(n + k), base * (n + k) / n)
        if t > now:                         # due later: wait until it is due, then look again
            at = t
            together = max(at, start) + bigger
            if together >= max(ready + base, at) + latency(k):
                continue                    # one batch of n + k would end no sooner than two
        else:                               # overdue: worth waiting for until the break-even,
            at = ready + base + latency(k) - bigger   # where one batch ends as two would
            if at <= now:
                continue
            together = max(at, start) + bigger
        if together > deadline:
            break
        rate = (n + k) / (together - start)
        if rate > best:
            best, until = rate, at
    return (n, 0.0) if until is None else (0, until)
