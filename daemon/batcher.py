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

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch

from inferd.daemon.model import LoadedModel, check_output, logits_of
from inferd.daemon.preprocess import Preprocess
from inferd.daemon.profile import LatencyProfile
from inferd.daemon.queues import plan_batch
from inferd.shm.ring import RingError

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
    frame: object = None     # the daemon's private copy of the frame (hashed), or None: read the slot
    key: bytes = b""         # result-cache key of ``frame``
    content: bytes = b""     # content hash of ``frame`` (keys the embedding store)
    op: str = "classify"     # classify | embed | near
    tag: str | None = None   # client tag stored with the embedding
    args: object = None      # op-specific (near: (k, min_similarity))
    followers: list = field(default_factory=list)   # identical frames of the session: (id, slot, top_k)
    gen: int = 0             # model generation at admission: the digest ``key`` was made with


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
    started: float = 0.0                           # the thread's clock when it took the batch
    finished: float = 0.0                          # ... and when the batch was done (daemon/stats.py)
    gen: int = 0                                   # generation of the model that computed it


@dataclass(slots=True, eq=False)
class _Runner:
    """One model as this thread runs it: the device replica, its preprocessing, its profile."""

    model: LoadedModel
    replica: object
    preprocess: Preprocess
    embedding_dim: int
    keep_k: int
    profile: LatencyProfile


class BatchingThread(threading.Thread):
    """Runs batches for one device until its queue is stopped. ``deliver(BatchResult)`` must be
    thread-safe (the server passes a call_soon_threadsafe wrapper)."""

    def __init__(self, device, model: LoadedModel, *, batching, policy, peers: list,
                 deliver: Callable[[BatchResult], None], warmup_batches: int = 0, keep_k: int = 0,
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
        self._keep_k = keep_k
        self._clock = clock
        self.embedding_dim = 0
        self.store = None                  # the EmbeddingStore, set by the server once it is open
        self._active: _Runner | None = None     # the model this thread serves
        self._staged: _Runner | None = None     # a model loaded beside it, waiting to be activated
        self._requests: collections.deque = collections.deque()   # from the loop: stage/activate
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None

    def _prepare(self) -> None:
        dev = self.device.torch_device
        if dev.type == "cpu" and self.device.threads:
            torch.set_num_threads(self.device.threads)
        staging = torch.zeros((self._max_batch, *self._model.spec.frame_shape), dtype=torch.uint8,
                              pin_memory=dev.type == "cuda")
        self._staging, self._staging_np = staging, staging.numpy()
        self._active = self._load(self._model, self._keep_k, self.device.profile)
        self.embedding_dim = self._active.embedding_dim

    def _load(self, model: LoadedModel, keep_k: int, profile: LatencyProfile) -> "_Runner":
        """Put ``model`` on this thread's device, check its output, warm it up (teaching
        ``profile``). Runs on this thread: see check_output on why never on another."""
        dev = self.device.torch_device
        spec = model.spec
        runner = _Runner(model, model.replica(dev), Preprocess(spec.mean, spec.std, dev), 0, keep_k, profile)
        if spec.embedding_layer:
            _hook(dict(runner.replica.named_modules())[spec.embedding_layer])
        runner.embedding_dim = check_output(spec, runner.replica, dev, embed=_embedding)
        for _ in range(self._warmup):               # warm up, and seed the latency profile
            for size in sorted({1, self._max_batch}):
                t0 = time.perf_counter()
                self._forward(size, 1, runner=runner)
                profile.observe(size, time.perf_counter() - t0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return runner

    # model swap (NOTE [ model swap ] in daemon/reload.py) ---------------------------------------
    def stage(self, model: LoadedModel, keep_k: int) -> Future:
        """Ask this thread to load and warm ``model`` beside the one it serves, between two
        batches. The future gets the embedding width, or the exception that stopped it."""
        future: Future = Future()
        self._requests.append(("stage", model, keep_k, future))
        self.device.queue.wake()
        return future

    def activate(self, gen: int, store) -> Future:
        """Serve the staged model of generation ``gen`` (with embedding ``store``) from the next
        batch on; the batch running now finishes with the old one. The future is done once this
        thread has let go of the old model."""
        future: Future = Future()
        self._requests.append(("activate", gen, store, future))
        self.device.queue.wake()
        return future

    def discard(self, gen: int) -> None:
        """Forget a staged model of generation ``gen`` (the swap failed elsewhere)."""
        self._requests.append(("discard", gen, None, None))
        self.device.queue.wake()

    def _serve_requests(self) -> None:
        while self._requests:
            what, a, b, future = self._requests.popleft()
            if what == "stage":
                if future.set_running_or_notify_cancel():
                    try:
                        self._staged = self._load(a, b, LatencyProfile())
                    except BaseException as exc:  # reported to the reload, which keeps the old model
                        self._staged = None
                        future.set_exception(exc)
                    else:
                        future.set_result(self._staged.embedding_dim)
            elif what == "activate":
                if self._staged is not None and self._staged.model.gen == a:
                    self._active, self._staged = self._staged, None
                    self.store = b
                    self.embedding_dim = self._active.embedding_dim
                    self.device.profile = self._active.profile
                if future.set_running_or_notify_cancel():
                    future.set_result(self._active.model.gen)
            elif what == "discard" and self._staged is not None and self._staged.model.gen == a:
                self._staged = None

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
            if self._requests:
                self._serve_requests()
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

    def _forward(self, n: int, k: int, want_embedding: bool = False, runner: "_Runner | None" = None):
        """Top-k (indices, scores) lists of the first n staged frames, and their embeddings
        (float32 unit rows, numpy) when asked for and the model has them."""
        runner = runner or self._active
        frames = self._staging[:n]
        dev = self.device.torch_device
        if dev.type != "cpu":
            frames = frames.to(dev, non_blocking=True)
        with torch.inference_mode():
            raw = runner.replica(runner.preprocess(frames))
            scores, indices = torch.softmax(logits_of(raw).float(), dim=1).topk(k, dim=1)
            vectors = _embedding(raw) if want_embedding and runner.embedding_dim else None
        if vectors is not None:
            vectors = vectors.cpu().numpy()
        return indices.cpu().tolist(), scores.cpu().tolist(), vectors

    def _run_batch(self, batch: list) -> BatchResult:
        dev = self.device
        result = BatchResult(dev, batch, [r.attempt for r in batch], canary=batch[0].session is None,
                             gen=self._active.model.gen)
        now = result.started = result.finished = self._clock()
        # a full batch is never shrunk for its oldest (NOTE [ batch planning ]): who cannot finish
        # within it is not computed; otherwise only who is already late
        cutoff = now + (dev.profile.latency(len(batch)) if len(batch) == self._max_batch else 0.0)
        live = []
        for r in batch:
            if r.session is not None and r.session.closed:
                result.dropped.append(r)
            elif r.deadline < cutoff:
                result.expired.append(r)
            else:
                live.append(r)
        if not live:
            return result
        dev.running = list(zip(batch, result.attempts))
        dev.running_size, dev.running_since = len(live), now
        outs = dev.outs
        try:
            result.top, result.embeddings, result.seconds = self._compute(live, result.unreadable)
            result.done = live
            if dev.outs == outs and live:
                # a batch its device was taken out during (stuck) says nothing about its speed;
                # learning from it would stretch the next watchdog bound by its whole hang
                dev.profile.observe(len(live), result.seconds)
            if self.store is not None and result.embeddings is not None:
                # searches hold the store's lock for milliseconds at 100k rows: here, off the loop
                # ... among the rows its uid may see (daemon/embeddings.py: per uid unless shared)
                result.matches = {i: self.store.search(result.embeddings[i], *r.args, uid=r.session.peer[1])
                                  for i, r in enumerate(live) if r.op == "near"}
        except Exception as exc:  # a model failure reaches every request of the batch, typed
            log.error("batch of %d on %s failed: %s: %s", len(live), dev.label, type(exc).__name__, exc)
            result.failed, result.error = live, f"{type(exc).__name__}: {exc}"
        finally:
            dev.running_since, dev.running = None, []
            result.finished = self._clock()
        return result

    def _compute(self, live: list, unreadable: list) -> tuple[list, object, float]:
        """Stage and run ``live``. A request whose slot cannot be read whole leaves ``live`` for
        ``unreadable`` (its own error; the others of the batch are computed)."""
        runner = self._active
        spec = runner.model.spec
        shape, nbytes = spec.frame_shape, spec.frame_bytes
        t0 = time.perf_counter()
        staged = []
        for r in live:
            row = self._staging_np[len(staged)]
            if r.frame is not None:                 # the daemon's private (hashed) copy
                np.copyto(row, r.frame.reshape(shape))
            elif r.ring is None:                    # canary: a blank frame
                row.fill(0)
            else:
                try:                                # never a mapped read of an unsealed ring
                    r.ring.read_slot(r.slot, nbytes, out=row)
                except RingError as exc:
                    unreadable.append((r, f"slot {r.slot} cannot be read: {exc}"))
                    continue
            staged.append(r)
        live[:] = staged
        if not live:
            return [], None, time.perf_counter() - t0
        # a request admitted under the previous model may ask for more classes than this one has
        keep = [min(max(r.top_k, runner.keep_k), len(spec.labels)) for r in live]
        # embeddings only when a store keeps them: otherwise normalising and copying them out is
        # work on every batch that nothing reads
        indices, scores, vectors = self._forward(len(live), max(keep), want_embedding=self.store is not None)
        seconds = time.perf_counter() - t0
        top = [[[i, s] for i, s in zip(idx[:k], sc[:k])] for k, idx, sc in zip(keep, indices, scores)]
        return top, vectors, seconds


def _capture(module, inputs, output) -> None:
    _current.embedding = output


def _hook(module) -> None:
    """Capture ``module``'s output in the calling thread's slot. Registered once per module: CPU
    devices share one module, and each batching thread reads only what its own forward wrote."""
    if not getattr(module, "_inferd_hooked", False):
        module.register_forward_hook(_capture)
        module._inferd_hooked = True


def _embedding(output):
    """The embedding of a forward pass: the second element of a (logits, embedding) output, else
    what the hooked layer produced in this thread; averaged over H, W if 4-D; unit length."""
    vectors = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else \
        getattr(_current, "embedding", None)
    if vectors is None:
        return None
    _current.embedding = None
    if vectors.dim() == 4:
        vectors = vectors.mean(dim=(2, 3))
    return torch.nn.functional.normalize(vectors.flatten(1).float(), dim=1)


def _plan(device, batching, now: float, queued) -> tuple[int, float]:
    return plan_batch(now, queued, device.profile.latency, batching.max_batch,
                      batching.max_delay_ms / 1000.0, device.queue.gap, batching.adaptive)
