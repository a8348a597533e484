"""One pipeline per device: a collector thread plans and stages batches, an executor runs them
(daemon/pipeline/executor.py).

NOTE [ request path ]

    event loop thread                  collector thread (one per device)   executor thread (one per device)
    -----------------                  ---------------------------------   --------------------------------
    Session.data_received ->           wait for a free staging buffer      wait for a staged batch
      Scheduler.submit: checks every   DeviceQueue.take(plan): wait until  (or a model stage/activate asked
      field, admits against the        the plan says go (NOTE [ batch        by daemon/ops/reload.py)
      deadline, picks a device         planning ], daemon/dispatch/queues.py: it    note running_since/size (health
      (daemon/dispatch/policy.py),              knows when the running batch will     and the watchdog read them)
      device.queue.put(request) --->   end); idle: steal from a busy peer  Engine.launch(buffer) (preprocess,
                                       split off requests whose session      model, softmax, top-k on the
                                         closed (dropped) or whose deadline  device: daemon/pipeline/engine.py)
                                         passes before it could run        free the buffer once its frames
                                         (expired): answered at once         are on the device
                                       copy each slot into the buffer      results, near-duplicate searches
                                       note each request's attempt         deliver(result) ------+
                                       hand (batch, buffer) over  --->                           |
    Scheduler.on_batch_done(result)  <-------------------------------------------------------- +
      one reply per live request, slot released, ring freed when a closed session's last
      request comes back; failures re-dispatched

Two buffers per device ("double-buffered staging"): while the executor computes batch k from one,
the collector plans batch k+1, waiting for company for free while the device is busy, and stages it
into the other, so the device goes from one batch to the next without waiting for the loop, the
clients or a copy. Replies go out the moment a batch is done: the executor delivers, the collector
never holds results. A handed-over batch not yet running is ``Device.staged``; a device taken out of
rotation re-dispatches it with its queue (daemon/dispatch/scheduler.py).

A ring is unmapped only after its last request came back, so no thread reads an unmapped slot.
Canary batches (daemon/dispatch/health.py) are requests without a session: a blank frame.
"""
from __future__ import annotations

import logging
import queue as queues
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np

from .engine import Staging
from .executor import Executor
from ..models.loading import LoadedModel
from ..dispatch.policy import busy_until
from ..dispatch.queues import LEAD, plan_batch
from ...shm.ring import RingError

log = logging.getLogger("inferd.batcher")

IDLE_TIMEOUT = 0.1          # an idle collector looks for work to steal and beats this often
STAGING_BUFFERS = 2         # per device: one computing, one being filled (NOTE [ request path ])


@dataclass(slots=True, eq=False)
class Request:
    """One classify request, from admission until its reply. Lives on the loop thread except while
    a batching thread holds it; there ``session``, ``ring`` and ``slot`` are read-only."""

    session: object          # inferd.daemon.front.session.Session; None for a canary
    ring: object             # the session's inferd.shm.ring.Ring
    id: int
    slot: int
    top_k: int
    arrived: float           # monotonic seconds
    deadline: float          # monotonic seconds
    device: object = None    # the Device whose ``outstanding`` counts it
    attempt: int = 0         # bumped by each re-dispatch (daemon/dispatch/scheduler.py)
    done: bool = False       # answered
    frame: object = None     # the daemon's private copy of the frame (hashed), or None: read the slot
    key: bytes = b""         # result-cache key of ``frame``
    content: bytes = b""     # content hash of ``frame`` (keys the embedding store)
    op: str = "classify"     # classify | embed | near
    tag: str | None = None   # client tag stored with the embedding
    args: object = None      # op-specific (near: (k, min_similarity))
    followers: list = field(default_factory=list)   # identical frames of the session: (id, slot, top_k)
    gen: int = 0             # model generation at admission: the digest ``key`` was made with
    upload: object = None    # its encoded upload being verified (NOTE [ encoded uploads ] in daemon/caching/results.py)


@dataclass(slots=True)
class BatchResult:
    """One batch, back to the loop: every request taken (with its attempt then), each also in
    exactly one of done / expired / dropped / failed / unreadable."""

    device: object
    requests: list
    attempts: list
    canary: bool = False
    done: list = field(default_factory=list)       # Requests answered
    top: list = field(default_factory=list)        # per done request: [[index, score], ...] (keep_k+)
    embeddings: object = None                      # float32 (len(done), dim) unit rows, or None
    matches: dict = field(default_factory=dict)    # done index -> near-duplicate search result
    expired: list = field(default_factory=list)    # deadline passed while queued: not computed
    dropped: list = field(default_factory=list)    # session closed: not computed, no reply
    failed: list = field(default_factory=list)     # the batch raised: re-dispatched or failed
    unreadable: list = field(default_factory=list) # (request, why): its slot could not be read
                                                   # whole (a posix ring its client shrank)
    error: str = ""
    seconds: float = 0.0                           # copy + model time of the batch
    started: float = 0.0                           # the executor's clock when the batch began computing
    finished: float = 0.0                          # ... and when it was done (daemon/ops/stats.py)
    gen: int = 0                                   # generation of the model that computed it
    running: list = field(default_factory=list)    # [(request, attempt)] handed to the executor


class BatchingThread(threading.Thread):
    """The collector of one device's pipeline (NOTE [ request path ]); it starts the executor,
    which owns the model. Runs until the device's queue is stopped. ``deliver(BatchResult)`` must
    be thread-safe (the server passes a call_soon_threadsafe wrapper)."""

    def __init__(self, device, model: LoadedModel, *, batching, policy, peers: list,
                 deliver: Callable[[BatchResult], None], warmup_batches: int = 0, keep_k: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(name=f"inferd-collect-{device.label}", daemon=True)
        self.device = device
        self._max_batch = batching.max_batch
        self._plan = partial(_plan, device, batching)
        self._policy = policy
        self._peers = peers
        self._deliver = deliver
        self._clock = clock
        self._staging = Staging(device.torch_device, batching.max_batch, model.spec.frame_shape, STAGING_BUFFERS)
        self._free: queues.SimpleQueue = queues.SimpleQueue()      # indices of free staging buffers
        for i in range(len(self._staging)):
            self._free.put(i)
        self.executor = Executor(device, model, self._staging, self._free, deliver, warmup_batches,
                                 keep_k, batching.max_batch, clock)
        self.ready = self.executor.ready

    # the executor's, for the server and daemon/ops/reload.py
    @property
    def startup_error(self) -> BaseException | None:
        return self.executor.startup_error

    @property
    def embedding_dim(self) -> int:
        return self.executor.embedding_dim

    @property
    def store(self):
        return self.executor.store

    @store.setter
    def store(self, value) -> None:
        self.executor.store = value

    def stage(self, model: LoadedModel, keep_k: int) -> Future:
        return self.executor.stage(model, keep_k)

    def activate(self, gen: int, store) -> Future:
        return self.executor.activate(gen, store)

    def discard(self, gen: int) -> None:
        self.executor.discard(gen)

    def alive(self) -> bool:
        """Both threads of the pipeline run (the watchdog's question)."""
        return self.is_alive() and self.executor.is_alive()

    def run(self) -> None:
        self.executor.start()
        self.ready.wait()
        dev = self.device
        try:
            if self.executor.startup_error is None:
                self._collect()
        finally:
            self.executor.stop()
            self.executor.join()

    def _collect(self) -> None:
        dev = self.device
        while True:
            buffer = self._free.get()               # at most one batch waits behind the running one
            while (batch := dev.queue.take(self._plan, IDLE_TIMEOUT)) == []:
                dev.beat = self._clock()
                if (batch := self._steal()):
                    break
            if batch is None:
                return
            dev.beat = self._clock()
            result, live = self._screen(batch)
            if live:
                live = self._stage(live, self._staging.arrays[buffer], result.unreadable)
            if not live:
                self._free.put(buffer)
                self._deliver(result)
                continue
            dev.staged = result.running = list(zip(live, (r.attempt for r in live)))
            self.executor.submit(result, buffer)

    def _steal(self) -> list:
        dev = self.device
        if not (dev.healthy and self._policy.steals):
            return []
        victim, count = self._policy.steal_from(dev, self._peers, self._clock(), self._max_batch)
        return victim.queue.steal(count) if victim is not None else []

    def _screen(self, batch: list) -> tuple[BatchResult, list]:
        """A BatchResult for ``batch`` with its dropped and expired requests split off, and the
        requests left to compute."""
        dev = self.device
        result = BatchResult(dev, batch, [r.attempt for r in batch], canary=batch[0].session is None)
        now = result.started = result.finished = self._clock()
        # the batch starts when the device is free; a full batch is never shrunk for its oldest
        # (NOTE [ batch planning ]): who cannot finish within it is not computed; otherwise only
        # who is already late
        cutoff = now
        if len(batch) == self._max_batch:
            cutoff = max(now, busy_until(dev, now)) + dev.profile.latency(len(batch))
        live = []
        for r in batch:
            if r.session is not None and (r.session.closed or r.done):
                result.dropped.append(r)    # closed, or answered meanwhile (a late fleet-cache hit)
            elif r.deadline < cutoff:
                result.expired.append(r)
            else:
                live.append(r)
        return result, live

    def _stage(self, live: list, rows, unreadable: list) -> list:
        """Copy each request's frame into ``rows``; a request whose slot cannot be read whole goes
        to ``unreadable`` (its own error; the others are computed). Returns those staged."""
        staged = []
        for r in live:
            row = rows[len(staged)]
            if r.frame is not None:                 # the daemon's private (hashed) copy
                np.copyto(row, r.frame.reshape(row.shape))
            elif r.ring is None:                    # canary: a blank frame
                row.fill(0)
            else:
                try:                                # never a mapped read of an unsealed ring
                    r.ring.read_slot(r.slot, row.nbytes, out=row)
                except RingError as exc:
                    unreadable.append((r, f"slot {r.slot} cannot be read: {exc}"))
                    continue
            staged.append(r)
        return staged


def _plan(device, batching, now: float, queued, expected) -> tuple[int, float]:
    free_at = busy_until(device, now)
    horizon = batching.max_delay_ms / 1000.0
    # the running batch's clients come back one think time after its replies (NOTE [ batch
    # planning ], expected arrivals)
    back = [free_at + t for t in (r.session.think.seconds for r, _ in device.running if r.session is not None)
            if t is not None and t <= horizon]
    if back:
        expected = sorted([*expected, *back])
    # stage early enough that a batch ending a little sooner than the profile says finds the next
    # one ready (a tenth of the batch), and never later than the copy needs (LEAD)
    lead = max(LEAD, 0.1 * device.profile.latency(device.running_size)) if device.running_size else LEAD
    return plan_batch(now, queued, device.profile.latency, batching.max_batch, batching.max_delay_ms / 1000.0,
                      device.queue.gap, batching.adaptive, free_at, expected,
                      free_at if free_at > now else device.last_finished, lead)
