"""Which model a device serves next when several have work: the policy over a device's lanes.

A device of several models queues in ModelLanes (daemon/dispatch/lanes.py: one lane per model,
the lock, the blocking take); this module only decides which lane the next batch comes from. Pure bookkeeping,
no lock, no clock, no threads: the queue calls it under its lock, and tests drive it batch by batch
(tests/unit/test_model_share.py).

NOTE [ model share ]

Weighted fair queueing in device seconds over the lanes with work: each lane has a virtual time
``vt`` (the device seconds charged to it, divided by its weight share / min(shares)); the next
batch comes from the lane with the smallest ``vt``, in runs::

    a batch of n of lane m is taken        vt[m] += L_m(n) / weight[m]
                                           (its expected seconds on this device, the lane's profile)
    the current lane goes on               while vt[cur] < min(vt of the other lanes with work) + RUN_S
    then the lane furthest behind          (smallest vt) starts its run
    a lane that gets work after none       vt = max(vt, now_vt - RUN_S): its lead is kept, and at
                                           most RUN_S of credit is kept while it had nothing queued

While lanes stay backlogged, model m gets share_m / sum(shares) of the device's time, within one
run either way whatever the batch times are. This is the fairness of a weighted deficit round
robin (a DRR quantum is a run here) with one difference that matters for closed-loop clients: a
DRR lane that runs empty leaves the ring and loses its turn and deficit, and a model whose
clients wait for their answers empties its lane at every batch (its requests are in the device),
so under DRR two models of shares 2:1 were served 1:1 (bench/models, measured). Here such a lane
keeps its virtual time, so it is served first when its clients come back.

Switching cost. A device that alternates models pays for it: a CPU's caches hold the last model's
weights and activations, a GPU may hold another model's CUDA graphs, and batches form from half
the arrivals. Runs bound the switches: a lane's run lasts until it is RUN_S (8 ms, in its
weighted seconds) ahead of the lane furthest behind, so while two models both have work a switch
happens about every 2 x RUN_S x weight of device time, never every batch (when a batch is longer,
every batch; then a switch is a small part of it anyway). Measured here (bench/models, a CPU
device, one thread, batch 8 at 64x64, three runs): a batch of shapes after a batch of resnet18
took 1.02-1.08x a batch of shapes after shapes, resnet18 after shapes 0.92-1.02x of resnet18 after
resnet18: within this shared host's noise (the weights, 0.1 and 45 MB, and the activations do not
stay in this CPU's caches between batches either way), so RUN_S is kept short, for latency. A deadline overrides the run: a lane
whose front request would miss its deadline if it waited for one more batch of the current lane
goes first (ModelLanes._choose, daemon/dispatch/lanes.py) and is charged as any other batch.
"""
from __future__ import annotations

#: how far (weighted device seconds) the current lane may run ahead of the one furthest behind
RUN_S = 0.008


class ModelShare:
    """Weighted fair queueing over lanes ``0 .. len(shares) - 1`` (NOTE [ model share ])."""

    __slots__ = ("weight", "vt", "ring", "current", "now_vt", "run_s", "turns", "served", "low")

    def __init__(self, shares: list[float], run_s: float = RUN_S):
        low = self.low = min(shares) if shares else 1.0
        self.weight = [s / low for s in shares]
        self.vt = [0.0] * len(shares)      # weighted device seconds charged to each lane
        self.ring: list[int] = []          # lanes with queued work, in the order they got it
        self.current = -1                  # the lane of the run going on (-1: none)
        self.now_vt = 0.0                  # the virtual time of the last batch taken
        self.run_s = run_s
        self.turns = 0                     # runs begun (stats)
        self.served = [0.0] * len(shares)  # device seconds charged per lane (stats, the share test)

    def add(self, lane: int, share: float) -> None:
        """Lane ``lane`` (a new one, or an idle one whose model was unloaded) serves a model of
        ``share`` from now on (a model loaded live): it starts level with the lanes served now."""
        if lane == len(self.weight):
            self.weight.append(0.0)
            self.vt.append(0.0)
            self.served.append(0.0)
        self.weight[lane] = share / self.low
        self.vt[lane], self.served[lane] = self.now_vt, 0.0

    def active(self, lane: int) -> None:
        """``lane`` got work while it had none; at most ``run_s`` of credit is kept."""
        if lane not in self.ring:
            self.ring.append(lane)
            self.vt[lane] = max(self.vt[lane], self.now_vt - self.run_s)

    def idle(self, lane: int) -> None:
        """``lane`` has no queued work (its virtual time stays: NOTE [ model share ])."""
        if lane in self.ring:
            self.ring.remove(lane)

    def head(self) -> int:
        """The lane to serve next (the ring is not empty)."""
        vt, cur = self.vt, self.current
        if cur in self.ring:
            behind = min((vt[m] for m in self.ring if m != cur), default=vt[cur])
            if vt[cur] < behind + self.run_s:
                return cur
        lane = min(self.ring, key=vt.__getitem__)
        if lane != cur:
            self.current = lane
            self.turns += 1
        return lane

    def charge(self, lane: int, seconds: float) -> None:
        """A batch of ``lane`` expected to take ``seconds`` was taken."""
        self.served[lane] += seconds
        self.now_vt = max(self.now_vt, self.vt[lane])
        self.vt[lane] += seconds / self.weight[lane]
        self.current = lane

    def shares(self) -> list[float]:
        """Each lane's part of the device seconds charged so far."""
        total = sum(self.served) or 1.0
        return [s / total for s in self.served]
