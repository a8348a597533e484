"""Which model a device serves next when several have work: the policy over a device's lanes.

A DeviceQueue (daemon/dispatch/queues.py) holds one lane per model (the mechanism: orders, lock,
blocking take); this module only decides which lane the next batch comes from. Pure bookkeeping,
no lock, no clock, no threads: the queue calls it under its lock, and tests drive it batch by batch
(tests/unit/test_model_share.py).

NOTE [ model share ]

Weighted deficit round robin over the lanes with work, in device seconds (Shreedhar and Varghese's
DRR with a batch's expected time as its cost)::

    ring of lanes with work      head                   tail
                                 [model 0] -> [model 2] -> (head)
    the head is granted          deficit += quantum_m = RUN_S * share_m / min(shares)
    and serves batches           while deficit > 0: a batch of n, deficit -= L_m(n)
                                 (its expected seconds on this device, from the lane's profile)
    then goes to the tail        keeping what it overdrew (deficit <= 0), so an overrun is paid back
    a lane that runs empty       leaves the ring, deficit = 0: idle time is never saved up

While lanes stay backlogged, model m gets share_m / sum(shares) of the device's time (each turn's
overrun is carried, so the error stays within one batch per turn whatever the batch times are).
Switching cost. A device that alternates models pays for it: a CPU's caches hold the last model's
weights and activations, a GPU may hold another model's CUDA graphs, and batches form from half
the arrivals. The quantum makes each turn a run of batches: RUN_S (8 ms) of one model before the
next, so a switch happens at most every RUN_S x share while both have work. Measured here
(bench/models, a CPU device, shapes at 64x64 against resnet18 at 64x64 in turns, batch 8): one
batch of A after a batch of B costs within noise of A after A on this 2-core host (the models'
weights, 0.1-45 MB, do not fit the L2 either way), so RUN_S is kept short for latency; a GPU's
switch (graphs, allocator) is what it is for. A deadline overrides the turn: a lane whose front
request would miss its deadline if it waited for one more batch of the current lane goes first
(``urgent``), and pays for it from its deficit as any other batch.
"""
from __future__ import annotations

#: seconds of device time one turn of a model with the smallest share runs, at least one batch
RUN_S = 0.008


class ModelShare:
    """Deficit round robin over lanes ``0 .. len(shares) - 1`` (NOTE [ model share ])."""

    __slots__ = ("quantum", "deficit", "ring", "turns", "served")

    def __init__(self, shares: list[float], run_s: float = RUN_S):
        low = min(shares) if shares else 1.0
        self.quantum = [run_s * s / low for s in shares]
        self.deficit = [0.0] * len(shares)
        self.ring: list[int] = []          # lanes with work, head first (a few: a list is fine)
        self.turns = 0                     # turns granted (stats)
        self.served = [0.0] * len(shares)  # device seconds charged per lane (stats, the share test)

    def active(self, lane: int) -> None:
        """``lane`` got work while it had none: it joins the tail."""
        if lane not in self.ring:
            self.ring.append(lane)

    def idle(self, lane: int) -> None:
        """``lane`` ran out of work: it leaves the ring and forgets its deficit."""
        if lane in self.ring:
            if self.ring[0] == lane:
                self.deficit[lane] = 0.0
            self.ring.remove(lane)
        self.deficit[lane] = min(self.deficit[lane], 0.0)

    def head(self) -> int:
        """The lane to serve next (the ring is not empty): its turn begins if it had none."""
        ring = self.ring
        lane = ring[0]
        while self.deficit[lane] <= 0.0:
            self.deficit[lane] += self.quantum[lane]
            self.turns += 1
            if self.deficit[lane] > 0.0:
                break
            ring.append(ring.pop(0))       # still paying back an overrun: the next one
            lane = ring[0]
        return lane

    def charge(self, lane: int, seconds: float) -> None:
        """A batch of ``lane`` expected to take ``seconds`` was taken; its turn ends once spent."""
        self.served[lane] += seconds
        ring = self.ring
        if len(ring) <= 1:                 # alone: nobody to pay an overrun back to
            self.deficit[lane] = 0.0
            return
        self.deficit[lane] -= seconds
        if self.deficit[lane] <= 0.0 and ring and ring[0] == lane and len(ring) > 1:
            ring.append(ring.pop(0))

    def shares(self) -> list[float]:
        """Each lane's part of the device seconds charged so far."""
        total = sum(self.served) or 1.0
        return [s / total for s in self.served]
