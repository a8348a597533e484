"""One batching thread per device: gather frames, run the model, hand results back to the loop.

NOTE [ request path ]

    event loop thread                              batching thread (one per device)
    -----------------                              -------------------------------
    Session.data_received -> Server.classify       collect(): block for the first Request, then
      checks every field, builds a Request,          take more until max_batch, or until
      device.queue.put(request)  ------------->      first.arrived + max_delay has passed
                                                   split off requests whose session closed
                                                     (dropped) or whose deadline passed (expired)
                                                   copy each slot into the private staging tensor
                                                   Preprocess on the device, model, softmax, top-k
    Server.on_batch_done(result)  <-------------   loop.call_soon_threadsafe(deliver, result):
      one reply per request, slot released,          one call per batch, every request accounted
      ring freed when a closed session's last        for (answered, expired, dropped or failed)
      request comes back

Every Request that enters a queue comes back exactly once in a BatchResult, so the loop's
bookkeeping (in-flight slots, per-device outstanding counts, ring lifetime) needs no locks: it
lives on the loop thread alone. A ring is unmapped only after its last request came back, so the
batching thread never reads an unmapped slot.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from inferd.daemon.model import LoadedModel, check_output, logits_of
from inferd.daemon.preprocess import Preprocess

log = logging.getLogger("inferd.batcher")

STOP = object()   # queue sentinel: the thread exits after the batch in hand


@dataclass(slots=True, eq=False)
class Request:
    """One classify request, from admission until its reply. Lives on the loop thread except while
    a batching thread holds it; ``session`` and ``ring`` are read-only there."""

    session: object          # inferd.daemon.session.Session
    ring: object             # the session's inferd.shm.ring.Ring
    id: int
    slot: int
    top_k: int
    arrived: float           # monotonic seconds
    deadline: float          # monotonic seconds
    device: object = None    # the Device it was queued on


@dataclass(slots=True)
class BatchResult:
    """What one batch hands back to the loop: every request it took, each in exactly one list."""

    device: object
    done: list = field(default_factory=list)       # Requests answered
    top: list = field(default_factory=list)        # per done request: [[index, score], ...]
    expired: list = field(default_factory=list)    # deadline passed while queued: not computed
    dropped: list = field(default_factory=list)    # session closed: not computed, no reply
    failed: list = field(default_factory=list)     # the batch raised: every request gets the error
    error: str = ""
    seconds: float = 0.0                           # model time of the batch


def collect(q: "queue.SimpleQueue", max_batch: int, max_delay: float,
            clock: Callable[[], float]) -> list | None:
    """Block for one request, then gather more until ``max_batch`` or until ``max_delay`` seconds
    after the first request *arrived at the daemon* (so time spent queued behind the previous batch
    counts). A full batch leaves at once; a lone request waits at most ``max_delay``.

    Returns None when STOP is taken before any request; a STOP met mid-batch is put back so the
    next call returns None after this batch runs.
    """
    first = q.get()
    if first is STOP:
        return None
    batch = [first]
    window_end = first.arrived + max_delay
    while len(batch) < max_batch:
        try:
            item = q.get_nowait()
        except queue.Empty:
            remaining = window_end - clock()
            if remaining <= 0:
                break
            try:
                item = q.get(timeout=remaining)
            except queue.Empty:
                break
        if item is STOP:
            q.put(STOP)
            break
        batch.append(item)
    return batch


class Device:
    """One device: its queue, its batching thread, and the loop-side count of requests it holds.

    ``outstanding`` is read and written on the loop thread only (queued plus running)."""

    def __init__(self, index: int, name: str, threads: int):
        self.index = index
        self.name = name
        self.torch_device = torch.device(name)
        self.threads = threads
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.outstanding = 0
        self.thread: BatchingThread | None = None

    def __repr__(self) -> str:
        return f"Device({self.name}#{self.index})"


class BatchingThread(threading.Thread):
    """Runs batches for one device until STOP. ``deliver(BatchResult)`` must be thread-safe
    (the server passes ``loop.call_soon_threadsafe`` bound to its handler)."""

    def __init__(self, device: Device, model: LoadedModel, *, max_batch: int, max_delay: float,
                 deliver: Callable[[BatchResult], None], warmup_batches: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(name=f"inferd-batch-{device.name}-{device.index}", daemon=True)
        self.device = device
        self._model = model
        self._max_batch = max_batch
        self._max_delay = max_delay
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
        staging = torch.empty((self._max_batch, *spec.frame_shape), dtype=torch.uint8,
                              pin_memory=dev.type == "cuda")
        self._staging = staging
        self._staging_np = staging.numpy()
        self._preprocess = Preprocess(spec.mean, spec.std, dev)
        check_output(spec, self._replica, dev)
        for _ in range(self._warmup):
            self._forward(self._max_batch, 1)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run(self) -> None:
        try:
            self._prepare()
        except BaseException as exc:  # reported to the server, which stops start-up with it
            self.startup_error = exc
            self.ready.set()
            return
        self.ready.set()
        q = self.device.queue
        while (batch := collect(q, self._max_batch, self._max_delay, self._clock)) is not None:
            self._deliver(self._run_batch(batch))

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
        result = BatchResult(self.device)
        now = self._clock()
        live = []
        for r in batch:
            if r.session.closed:
                result.dropped.append(r)
            elif r.deadline < now:
                result.expired.append(r)
            else:
                live.append(r)
        if not live:
            return result
        shape = self._model.spec.frame_shape
        nbytes = self._model.spec.frame_bytes
        t0 = time.perf_counter()
        try:
            for i, r in enumerate(live):
                np.copyto(self._staging_np[i], r.ring.slot(r.slot, nbytes).reshape(shape))
            indices, scores = self._forward(len(live), max(r.top_k for r in live))
        except Exception as exc:  # a model failure reaches every request of the batch, typed
            log.exception("batch of %d on %s failed", len(live), self.device.name)
            result.failed, result.error = live, f"{type(exc).__name__}: {exc}"
            return result
        result.seconds = time.perf_counter() - t0
        result.done = live
        result.top = [[[i, s] for i, s in zip(idx[:r.top_k], sc[:r.top_k])]
                      for r, idx, sc in zip(live, indices, scores)]
        return result
