"""One device's record: identity, queue, measured profile, what it is running, and its health.

Who writes what: the event loop writes ``outstanding`` and the health fields; the device's pipeline
threads (its collector and executor, daemon/pipeline/) write ``running_*``, ``staged``, ``beat``,
its ``profile`` and (the collector) its ``lead``; the queue has its own lock. Readers on
the other side read single attributes, each replaced whole (see daemon/dispatch/policy.py on staleness).
"""
from __future__ import annotations

import torch

from .profile import LatencyProfile
from .lanes import ModelLanes
from .queues import DeviceQueue, StagingLead

HEALTHY, OUT, PROBING, DISABLED = "healthy", "out", "probing", "disabled"


class Device:
    def __init__(self, index: int, name: str, threads: int, clock=None):
        self.index = index
        self.name = name
        self.torch_device = torch.device(name)
        self.threads = threads
        self._clock = clock
        self.queue = DeviceQueue(clock) if clock else DeviceQueue()
        # the measured latency per batch size of each model (by model id, daemon/models/catalog.py);
        # ``profile`` is model 0's (the only one of a one-model daemon): readiness, stats, retry hints
        self.profiles = [LatencyProfile()]
        self.profile = self.profiles[0]
        self.running_profile = self.profile    # the profile of the running batch's model (its executor)
        self.staged_profile = self.profile     # ... and of the batch staged behind it (its collector)
        self.lead = StagingLead()          # rule 0's lead, learnt by its collector (queues.py)
        self.collector = None              # its pipeline's Collector thread (daemon/pipeline/collector.py)
        self.executor = None               # ... and Executor thread (daemon/pipeline/executor.py)
        self.outstanding = 0               # requests assigned to it, queued or running (loop only)
        self.frames = 0                    # frames it answered (loop only)
        # what the pipeline is running now
        self.running_since: float | None = None
        self.running_size = 0
        self.running: list = []            # the BatchEntry of each request of the running batch(es)
        self.staged: list = []             # ... of the batch staged behind them (daemon/pipeline/records.py)
        self.last_finished = 0.0           # when its executor last finished a batch
        self.beat = 0.0                    # monotonic time the thread last showed life
        # health (loop only): see daemon/dispatch/health.py
        self.state = HEALTHY
        self.failures = 0                  # batch failures in a row
        self.backoff = 0.0
        self.retry_at = 0.0
        self.canary_pending = False
        self.outs = 0                      # times taken out of rotation (its executor reads it)
        self.kept_since = None             # start of a batch kept past its bound (the only device)

    def use_models(self, shares: list[float], make_order, max_batch: int) -> None:
        """Several models (by id, ``shares`` their weights): a latency profile and a queue lane
        each (daemon/dispatch/lanes.py). At start-up, while the queue is empty."""
        self.profiles = [self.profile, *(LatencyProfile() for _ in shares[1:])]
        self.queue = ModelLanes(make_order, shares, lambda mid, n: self.profiles[mid].latency(n), max_batch,
                                *([self._clock] if self._clock else []))

    def add_model(self, mid: int, shares: list[float], make_order, max_batch: int) -> None:
        """Model ``mid`` loaded live (a new id, or one an unloaded model left; ``shares``: each
        id's weight): a fresh latency profile (its executor puts the one its warm-up taught in its
        place) and a lane. A one-model device's queue becomes lanes here: its queued requests move
        to lane 0 in their order, in one step on the loop (the only thread that puts), and its
        collector, waiting in the old queue's ``take``, comes to the new one within its idle timeout."""
        if mid > len(self.profiles):
            raise RuntimeError(f"model id {mid} after {len(self.profiles)}: every device has a lane per model id")
        if not isinstance(self.queue, ModelLanes):
            old = self.queue
            lanes = ModelLanes(make_order, shares[:mid], lambda m, n: self.profiles[m].latency(n), max_batch,
                               *([self._clock] if self._clock else []))
            moved = old.drain()
            if moved:
                lanes.put_front(moved)
            self.queue = lanes
            old.poke()
        self.queue.add_lane(mid, make_order(), shares[mid])
        if mid == len(self.profiles):
            self.profiles.append(LatencyProfile())
        else:
            self.profiles[mid] = LatencyProfile()

    def set_share(self, mid: int, share: float) -> None:
        """Model ``mid``'s weight of this device from now on (one model: nothing to share)."""
        if isinstance(self.queue, ModelLanes):
            self.queue.set_share(mid, share)

    def running_latency(self) -> float:
        """Expected seconds of the running batch (0: none)."""
        return self.running_profile.latency(self.running_size) if self.running_size else 0.0

    def stage_lead(self) -> float:
        """Seconds before this device is free that its collector closes the next batch (rule 0 of
        NOTE [ batch planning ] in daemon/dispatch/queues.py)."""
        return self.lead.seconds(self.running_latency())

    def handover(self, entries: list, now: float, full: bool, mid: int = 0) -> None:
        """Its collector hands ``entries`` (BatchEntry, daemon/pipeline/records.py) of a batch taken
        ``full`` (max_batch) of model ``mid`` to the executor at ``now``, before it sets ``staged``: was that in
        time? (``StagingLead.handed``). Only a full batch can be late: it goes at once on an idle
        device, while a partial one may have waited for company by choice. ``running`` is set
        before ``staged`` is cleared (daemon/pipeline/executor.py), so a batch moving from one to
        the other never looks like an idle device."""
        busy = bool(self.running or self.staged) or self.running_since is not None
        queued_by = max(e.request.arrived for e in entries) if full else now
        self.lead.handed(busy, self.last_finished, queued_by,
                         self.profiles[mid].latency(len(entries)), now)

    @property
    def healthy(self) -> bool:
        return self.state == HEALTHY

    @property
    def label(self) -> str:
        return f"{self.name}#{self.index}"

    def __repr__(self) -> str:
        return f"Device({self.label}, {self.state})"

    def describe(self) -> dict:
        return {"index": self.index, "name": self.name, "threads": self.threads, "state": self.state,
                "outstanding": self.outstanding, "queued": len(self.queue), "frames": self.frames,
                "failures": self.failures, "batch_ms": self.profile.snapshot(),
                **({"models_batch_ms": [p.snapshot() for p in self.profiles],
                    "model_seconds": [round(x, 6) for x in self.queue.share_served()]}
                   if len(self.profiles) > 1 else {}),
                "stage_lead_ms": round(self.stage_lead() * 1000, 3),
                "late_handovers": self.lead.late}
