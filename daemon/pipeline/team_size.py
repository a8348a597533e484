"""How many intra-op threads each CPU batch runs with, chosen by what the executor measured.

NOTE [ team size per batch ]

A CPU device has a share of the cores (daemon/pipeline/thread_pools.py, :func:`plan`), but the
fastest team for a batch is not always the whole share: a batch of one 64x64 frame runs faster on
one thread than on two (the second thread's wake-ups and the split of small convolutions cost more
than they save), large batches faster on two; and when other processes want the same cores (the
clients of a busy host, another service), a team of two waits for its slower member at every op,
while one thread just runs. Which of these holds depends on the model, the frame size, the batch
and the load of the machine, so it is measured, per batch size, while serving:

    batch of n frames -> bucket b = n.bit_length()       (1 | 2-3 | 4-7 | 8-15 | 16-31 | ...)
    per bucket, per candidate team size t (1, 2, 4, ..., the share):
        seconds per frame, smoothed (EWMA, ALPHA) over the batches it ran
    choose:  each candidate runs TRIALS batches first (interleaved),
             then the fastest, the whole share unless a smaller team is MARGIN faster (what
             torch does by default wins a tie of noisy measurements), except exploring batches:
             8, 16, 32, ... batches after the trials, then one in EXPLORE_EVERY, each runs the
             candidate measured longest ago, whose estimate that one fresh batch replaces (the
             load may have changed since), so a change of load is followed within a few hundred
             batches and a choice made on a few noisy trials is checked again soon
             and at once when the chosen team's own estimate has moved by more than STALE
             times since another was measured: that one was measured under another load
             (a team smaller than the share measured COSTLY times slower than the chosen one
             skips the early schedule: one batch in EXPLORE_EVERY, or at once when STALE)

The chosen team runs most batches, so its estimate is always fresh: a wrong switch (one noisy
exploring batch) costs a few batches before its own times send it back. The others' estimates
are as old as their last batch, and a bucket's batches may come from very different loads: batches
of one are what a lone client sends, and also what a straggler of sixteen busy clients runs alone
under their load. Measured so (``python -m bench.load.policy``, rounds of 1, 4 and 16 clients on
one daemon), both estimates of batches of one stood at 34-37 ms a frame after the 16-client
rounds; with one client back, the team chosen fell to its real 10-12 ms within a few batches and
the other kept its 35 ms until its next exploring batch, up to 200 batches later: one thread ran
a lone client's batches at 1.2x the time two take, for most of a 3 s window, in two rounds of
three. So an estimate taken when the chosen team ran at more than STALE times its speed now (or
less than 1/STALE) is measured again at once. An exploring batch may be
slower: at one in EXPLORE_EVERY it stays out of the 99th percentile of request latency. The early
schedule (after 8, 16, 32, ... batches) is denser, and an exploring batch of sixteen frames on one
thread where two take half the time made the 99th percentile of sixteen clients in 3 s windows
(78 ms against a p50 of 46; docs/benchmarks.md, "Thread pools and the CPU layout"): so a team
smaller than the share that measured COSTLY times slower than the chosen one waits for the steady
schedule. The early schedule is kept for the share (a noisy trial that made the whole share look
slow is what it is for), and a load that makes the smaller team the faster shows in the chosen
team's own times first (STALE).

Changing the team costs ``torch.set_num_threads`` (microseconds; the OpenMP pool keeps its
threads, and the ones not used sleep after their spin: threads.omp_wait_policy). ``threads.per_batch
= "fixed"`` keeps the whole share for every batch. The executor thread calls :meth:`TeamSize.pick`
before a batch and :meth:`TeamSize.observe` after it (daemon/pipeline/engine.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

TRIALS = 3             # batches each candidate runs in a bucket before the choice is made
EXPLORE_FIRST = 8      # the first exploring batch this many after the trials, then twice as far ...
EXPLORE_EVERY = 200    # ... until one batch in this many re-measures a candidate not chosen
ALPHA = 0.2            # weight of a new batch in the smoothed seconds per frame
MARGIN = 0.1           # a team smaller than the share is chosen only when this much faster
COSTLY = 1.5           # a smaller team measured this many times slower is explored only one batch
                       # in EXPLORE_EVERY, not on the early schedule
STALE = 2.0            # the chosen team this many times faster or slower than when another was
                       # measured: that other one is measured again at once


def candidates(share: int) -> tuple[int, ...]:
    """Team sizes worth measuring for a device of ``share`` threads: 1, 2, 4, ... and ``share``."""
    out, t = [], 1
    while t < share:
        out.append(t)
        t *= 2
    out.append(max(1, share))
    return tuple(out)


@dataclass
class _Bucket:
    """One bucket's measurements: per team size, smoothed seconds per frame and batches run."""

    per_frame: dict = field(default_factory=dict)    # team size -> EWMA seconds per frame
    runs: dict = field(default_factory=dict)         # team size -> batches measured
    last: dict = field(default_factory=dict)         # team size -> batch number of its last run
    batches: int = 0
    exploring: int | None = None                     # the team size of a batch exploring now
    basis: dict = field(default_factory=dict)        # team size -> the other sizes' estimates when it ran last
    next_explore: int = 0                            # batch number of the next exploring batch
    gap: int = EXPLORE_FIRST                         # batches to the one after it


class TeamSize:
    """The team size of each batch for one executor thread (NOTE [ team size per batch ]). Not
    thread-safe: its executor alone calls it. ``share`` is the device's threads; with one, every
    batch runs on one thread and nothing is measured."""

    def __init__(self, share: int, *, trials: int = TRIALS, explore_every: int = EXPLORE_EVERY,
                 explore_first: int = EXPLORE_FIRST, alpha: float = ALPHA, margin: float = MARGIN):
        self.share = share
        self.candidates = candidates(share)
        self.trials, self.explore_every, self.alpha = trials, explore_every, alpha
        self.explore_first, self.margin = min(explore_first, explore_every), margin
        self._buckets: dict[int, _Bucket] = {}

    def pick(self, n: int) -> int:
        """The team size to run a batch of ``n`` frames with."""
        if len(self.candidates) == 1:
            return self.candidates[0]
        b = self._buckets.get(n.bit_length())
        if b is None:
            b = self._buckets[n.bit_length()] = _Bucket(gap=self.explore_first)
        b.batches += 1
        b.exploring = None
        untried = [t for t in self.candidates if b.runs.get(t, 0) < self.trials]
        if untried:                                  # interleave the first trials
            b.next_explore = b.batches + b.gap
            return min(untried, key=lambda t: (b.runs.get(t, 0), t))
        best = self.best(n)
        stale = self._stale(b, best)
        if b.batches >= b.next_explore or stale:
            b.gap = min(2 * b.gap, self.explore_every)
            b.next_explore = b.batches + b.gap
            others = [t for t in self.candidates if t != best]
            explore = min(others, key=lambda t: b.last.get(t, 0))
            if stale or not self._costly(b, explore, best):
                b.exploring = explore
                return explore
        return best

    def observe(self, n: int, threads: int, seconds: float) -> None:
        """A batch of ``n`` frames ran on ``threads`` threads in ``seconds``."""
        if len(self.candidates) == 1 or n < 1:
            return
        b = self._buckets.setdefault(n.bit_length(), _Bucket())
        sample = seconds / n
        old = b.per_frame.get(threads)
        fresh = old is None or threads == b.exploring          # an estimate from long ago is replaced
        b.per_frame[threads] = sample if fresh else (1.0 - self.alpha) * old + self.alpha * sample
        b.runs[threads] = b.runs.get(threads, 0) + 1
        b.last[threads] = b.batches
        b.basis[threads] = dict(b.per_frame)
        b.exploring = None

    def _costly(self, b: _Bucket, team: int, best: int) -> bool:
        """Exploring ``team`` now would cost a batch at COSTLY times the chosen one's time or more,
        and it is a team smaller than the share, last measured less than ``explore_every`` batches
        ago: it waits for the steady schedule (or for STALE)."""
        est = b.per_frame
        return (team < self.share and team in est and best in est and est[team] >= COSTLY * est[best]
                and b.batches - b.last.get(team, 0) < self.explore_every)

    def _stale(self, b: _Bucket, best: int) -> bool:
        """The chosen team's own estimate moved by more than STALE times since another team was
        last measured: the load that other estimate was taken under has gone; measure it again."""
        now = b.per_frame.get(best)
        for t in self.candidates:
            then = b.basis.get(t, {}).get(best) if t != best else None
            if now and then and not 1.0 / STALE < now / then < STALE:
                return True
        return False

    def best(self, n: int) -> int:
        """The team size measured fastest for batches like ``n`` (the share before any measurement)."""
        b = self._buckets.get(n.bit_length())
        return self.share if b is None else self._best(b)

    def _best(self, b: _Bucket) -> int:
        est = b.per_frame
        if self.share not in est:
            return self.share
        fastest = min(est, key=lambda t: (est[t], -t))
        return fastest if est[fastest] < (1.0 - self.margin) * est[self.share] else self.share

    def snapshot(self) -> dict:
        """Per bucket (its smallest batch size): each team size's smoothed microseconds per frame,
        and the one chosen; for the admin ``stats`` reply."""
        return {str(1 << (k - 1)): {"us_per_frame": {str(t): round(v * 1e6, 1) for t, v in sorted(b.per_frame.items())},
                                    "chosen": self._best(b)}
                for k, b in sorted(self._buckets.items()) if b.per_frame}
