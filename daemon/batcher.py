"""One batching thread per device: plan a batch, run the model, hand results back to the loop.

NOTE [ request path ]

    event loop thread                              batching thread (one per device)
    -----------------                              -------------------------------
    Session.data_received -> Scheduler.classify    DeviceQueue.take(plan): wait until the
      checks every field, admits against the         batch plan says go (NOTE [ batch planning ]
      deadline, picks a device (daemon/policy.py),   in daemon/queues.py); idle: steal from a
      device.queue.put(request)  ------------->      busy peer (policy.steal_from)
                                                   note each request's attempt; publish
                                                     running_since/size (the watchdog reads them)
                                                   split off requests whose session closed
                                                     (dropped) or whose deadline passed (expired)
                                                   copy each slot into the private staging tensor
                                                   Preprocess on the device, model, softmax, top-k
    Scheduler.on_batch_done(result)  <----------   loop.call_soon_threadsafe(deliver, result):
      one reply per live request, slot released,     one call per batch, every request taken
      ring freed when a closed session's last        accounted for (answered, expired, dropped or
      request comes back; failures re-dispatched     failed), with the attempts noted at take time

A ring is unmapped only after its last request came back, so a batching thread never reads an
unmapped slot. Canary batches (daemon/health.py) are requests without a session: a blank frame.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch

from inferd.daemon.model import LoadedModel, check_output, logits_of
from inferd.daemon.preprocess import Preprocess
from inferd.daemon.queues import plan_batch

log = logging.getLogger("inferd.batcher")

IDLE_TIMEOUT = 0.1          # an idle thread looks for work to steal and beats this often
_current = threading.local()


def current_device():
    """The Device whose batching thread is calling (None elsewhere). A hook for test models that
    must behave differently per device (inferd.daemon.zoo.synthetic)."""
    return getattr(_current, "device", None)


@dataclass(slots=True, eq=False)
class Request:
    """One classify request, from admission until its reply. Lives on the loop thread except while
    a batching thread holds it; there ``session``, ``ring`` and ``slot`` are read-only."""

    session: object          # inferd.daemon.session.Session; None for a canary
    ring: object             # the session's inferd.shm.ring.Ring
    id: int
    slot: int
    top_k: int
    arrived: float           # monotonic seconds
    deadline: float          # monotonic seconds
    device: object = None    # the Device whose ``outstanding`` counts it
    attempt: int = 0         # bumped by each re-dispatch (daemon/scheduler.py)
    done: bool = False       # answered


@dataclass(slots=True)
class BatchResult:
    """One batch, back to the loop: every request taken (with its attempt then), each also in
    exactly one of done / expired / dropped / failed."""

    device: object
    requests: list
    attempts: list
    canary: bool = False
    done: list = field(default_factory=list)       # Requests answered
    top: list = field(default_factory=list)        # per done request: [[index, score], ...]
    expired: list = field(default_factory=list)    # deadline passed while queued: not computed
    dropped: list = field(default_factory=list)    # session closed: not computed, no reply
    failed: list = field(default_factory=list)     # the batch raised: re-dispatched or failed
    error: str = ""
    seconds: float = 0.0                           # copy + model time of the batch


class BatchingThread(threading.Thread):
    """Runs batches for one device until its queue is stopped. ``deliver(BatchResult)`` must be
    thread-safe (the server passes a call_soon_threadsafe wrapper)."""

    def __init__(self, device, model: LoadedModel, *, batching, policy, peers: list,
                 deliver: Callable[[BatchResult], None], warmup_batches: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(name=f"inferd-batch-{device.label}", daemon=True)
        self.device = device
        self._model = model
        self._max_batch = batching.max_batch
        self._plan = partial(_plan, device, batching)
        self._policy = policy
        self._peers = peers
        self._deliver = deliver
        self._warmup = warmup_batches
        self._clock = clock
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None

    def _prepare(self) -> None:
        dev = self.device.torch_device
        if dev.type == "cpu" and self.device.threads:
            torch.set_num_threads(self.device.threads)
        spec = self._model.spec
        self._replica = self._model.replica(dev)
        staging = torch.zeros((self._max_batch, *spec.frame_shape), dtype=torch.uint8,
                              pin_memory=dev.type == "cuda")
        self._staging, self._staging_np = staging, staging.numpy()
        self._preprocess = Preprocess(spec.mean, spec.std, dev)
        check_output(spec, self._replica, dev)
        for _ in range(self._warmup):               # warm up, and seed the latency profile
            for size in sorted({1, self._max_batch}):
                t0 = time.perf_counter()
                self._forward(size, 1)
                self.device.profile.observe(size, time.perf_counter() - t0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run(self) -> None:
        _current.device = self.device
        try:
            self._prepare()
        except BaseException as exc:  # reported to the server, which stops start-up with it
            self.startup_error = exc
            self.ready.set()
            return
        self.ready.set()
        dev = self.device
        while (batch := dev.queue.take(self._plan, IDLE_TIMEOUT)) is not None:
            dev.beat = self._clock()
            if not batch:
                batch = self._steal()
                if not batch:
                    continue
            self._deliver(self._run_batch(batch))

    def _steal(self) -> list:
        dev = self.device
        if not (dev.healthy and self._policy.steals):
            return []
        victim, count = self._policy.steal_from(dev, self._peers, self._clock(), self._max_batch)
        return victim.queue.steal(count) if victim is not None else []

    def _forward(self, n: int, k: int) -> tuple[list, list]:
        frames = self._staging[:n]
        dev = self.device.torch_device
        if dev.type != "cpu":
            frames = frames.to(dev, non_blocking=True)
        with torch.inference_mode():
            logits = logits_of(self._replica(self._preprocess(frames)))
            scores, indices = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
        return indices.cpu().tolist(), scores.cpu().tolist()

    def _run_batch(self, batch: list) -> BatchResult:
        dev = self.device
        result = BatchResult(dev, batch, [r.attempt for r in batch], canary=batch[0].session is None)
        now = self._clock()
        live = []
        for r in batch:
            if r.session is not None and r.session.closed:
                result.dropped.append(r)
            elif r.deadline < now:
                result.expired.append(r)
            else:
                live.append(r)
        if not live:
            return result
        dev.running = list(zip(batch, result.attempts))
        dev.running_size, dev.running_since = len(live), now
        try:
            result.top, result.seconds = self._compute(live)
            result.done = live
            dev.profile.observe(len(live), result.seconds)
        except Exception as exc:  # a model failure reaches every request of the batch, typed
            log.error("batch of %d on %s failed: %s: %s", len(live), dev.label, type(exc).__name__, exc)
            result.failed, result.error = live, f"{type(exc).__name__}: {exc}"
        finally:
            dev.running_since, dev.running = None, []
        return result

    def _compute(self, live: list) -> tuple[list, float]:
        spec = self._model.spec
        shape, nbytes = spec.frame_shape, spec.frame_bytes
        t0 = time.perf_counter()
        for i, r in enumerate(live):
            if r.ring is None:                      # canary: a blank frame
                self._staging_np[i].fill(0)
            else:
                np.copyto(self._staging_np[i], r.ring.slot(r.slot, nbytes).reshape(shape))
        indices, scores = self._forward(len(live), max(r.top_k for r in live))
        seconds = time.perf_counter() - t0
        top = [[[i, s] for i, s in zip(idx[:r.top_k], sc[:r.top_k])]
               for r, idx, sc in zip(live, indices, scores)]
        return top, seconds


def _plan(device, batching, now: float, queued) -> tuple[int, float]:
    return plan_batch(now, queued, device.profile.latency, batching.max_batch,
                      batching.max_delay_ms / 1000.0, device.queue.gap, batching.adaptive)
