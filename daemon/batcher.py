"""One pipeline per device: a collector thread plans and stages batches, an executor runs them.

NOTE [ request path ]

    event loop thread                  collector thread (one per device)   executor thread (one per device)
    -----------------                  ---------------------------------   --------------------------------
    Session.data_received ->           wait for a free staging buffer      wait for a staged batch
      Scheduler.submit: checks every   DeviceQueue.take(plan): wait until  (or a model stage/activate asked
      field, admits against the        the plan says go (NOTE [ batch        by daemon/reload.py)
      deadline, picks a device         planning ], daemon/queues.py: it    note running_since/size (health
      (daemon/policy.py),              knows when the running batch will     and the watchdog read them)
      device.queue.put(request) --->   end); idle: steal from a busy peer  Engine.launch(buffer) (preprocess,
                                       split off requests whose session      model, softmax, top-k on the
                                         closed (dropped) or whose deadline  device: daemon/engine.py)
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
rotation re-dispatches it with its queue (daemon/scheduler.py).

A ring is unmapped only after its last request came back, so no thread reads an unmapped slot.
Canary batches (daemon/health.py) are requests without a session: a blank frame.
"""
from __future__ import annotations

import collections
import logging
import queue as queues
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np

from . import threads
from .engine import Engine, Staging
from .model import LoadedModel, warmup_sizes
from .profile import LatencyProfile
from .policy import busy_until
from .queues import LEAD, plan_batch
from ..shm.ring import RingError

log = logging.getLogger("inferd.batcher")

IDLE_TIMEOUT = 0.1          # an idle collector looks for work to steal and beats this often
STAGING_BUFFERS = 2         # per device: one computing, one being filled (NOTE [ request path ])
_current = threading.local()


def current_device():
    """The Device whose executor thread is calling (None elsewhere). A hook for test models that
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
    upload: object = None    # its encoded upload being verified (NOTE [ encoded uploads ] in daemon/caching.py)


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
    finished: float = 0.0                          # ... and when it was done (daemon/stats.py)
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

    # the executor's, for the server and daemon/reload.py
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
            self.executor.submit(result, live, buffer)

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


class Executor(threading.Thread):
    """The thread that owns a device's model (daemon/engine.py): runs the staged batches in order,
    delivers each result the moment it is done, and loads, activates or discards models between two
    batches for a swap (NOTE [ model swap ] in daemon/reload.py)."""

    def __init__(self, device, model: LoadedModel, staging: Staging, free, deliver, warmup: int,
                 keep_k: int, max_batch: int, clock):
        super().__init__(name=f"inferd-batch-{device.label}", daemon=True)
        self.device = device
        self._model = model
        self._staging = staging
        self._free = free
        self._deliver = deliver
        self._warmup = warmup
        self._keep_k = keep_k
        self._max_batch = max_batch
        self._clock = clock
        self._inbox: queues.SimpleQueue = queues.SimpleQueue()
        self.embedding_dim = 0
        self.store = None                  # the EmbeddingStore, set by the server once it is open
        self._active: _Runner | None = None     # the model this thread serves
        self._staged: _Runner | None = None     # a model loaded beside it, waiting to be activated
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None

    def submit(self, result: "BatchResult", live: list, buffer: int) -> None:
        self._inbox.put(("batch", result, live, buffer))

    def stop(self) -> None:
        self._inbox.put(("stop", None, None, None))

    def run(self) -> None:
        _current.device = self.device
        try:
            self._prepare()
        except BaseException as exc:  # reported to the server, which stops start-up with it
            self.startup_error = exc
            self.ready.set()
            return
        self.ready.set()
        ahead = None                    # a launched batch not yet collected (asynchronous devices)
        while True:
            if ahead is not None and self._inbox.empty():
                ahead = self._land(ahead)
                continue
            what, a, b, c = self._inbox.get()
            if what == "batch":
                # an asynchronous device (CUDA) gets batch k+1 queued before batch k is collected,
                # so it computes k+1 while this thread unpacks and delivers k
                flight = self._launch(a, b, c)
                if ahead is not None:
                    self._land(ahead)
                ahead = flight if flight is not None and flight.asynchronous else self._land(flight)
            else:
                if ahead is not None:
                    ahead = self._land(ahead)
                if what == "stop":
                    return
                self._serve(what, a, b, c)

    def _land(self, flight: "_Flight | None") -> None:
        """Collect ``flight`` (None: nothing left to do), deliver its result, beat."""
        if flight is not None:
            result = self._collect(flight)
            queue = self.device.queue
            if self._inbox.empty() and len(queue) >= self._max_batch:
                # free sooner than the plan thought (rule 0) with a full batch waiting; a partial
                # one is planned again by the loop, once it has heard who is coming back
                # (Scheduler.on_batch_done): planned now, it would not know
                queue.poke()
            self._deliver(result)
            self.device.beat = self._clock()
        return None

    def _prepare(self) -> None:
        threads.enter_device_thread(self.device)    # NOTE [ thread pools ] in daemon/threads.py
        self._active = self._load(self._model, self._keep_k, self.device.profile)
        self.embedding_dim = self._active.engine.embedding_dim

    def _load(self, model: LoadedModel, keep_k: int, profile: LatencyProfile) -> "_Runner":
        """Put ``model`` on this thread's device, check its output, warm it up (teaching
        ``profile``). Runs on this thread: the embedding hook is per thread (daemon/engine.py)."""
        engine = Engine(self.device.torch_device, model, keep_k)
        engine.load()
        # graphs captured, sizes compiled, CUDA initialised: never inside a timed warm-up batch,
        # which would teach the profile seconds of compilation as a batch time
        engine.prepare(self._max_batch)
        frames = self._staging.tensors[0]
        for _ in range(self._warmup):               # warm up, and seed the latency profile
            for size in warmup_sizes(self._max_batch, padded=engine.options.padded,
                                     asynchronous=engine.streams.asynchronous):
                t0 = time.perf_counter()
                engine.launch(frames, size, 1).result()
                profile.observe(size, time.perf_counter() - t0)
        engine.synchronize()
        return _Runner(engine, profile)

    # model swap (NOTE [ model swap ] in daemon/reload.py) ---------------------------------------
    def stage(self, model: LoadedModel, keep_k: int) -> Future:
        """Load and warm ``model`` beside the one served, between two batches. The future gets the
        embedding width, or the exception that stopped it."""
        future: Future = Future()
        self._inbox.put(("stage", model, keep_k, future))
        return future

    def activate(self, gen: int, store) -> Future:
        """Serve the staged model of generation ``gen`` (with embedding ``store``) from the next
        batch on; the batch running now finishes with the old one. The future is done once this
        thread has let go of the old model."""
        future: Future = Future()
        self._inbox.put(("activate", gen, store, future))
        return future

    def discard(self, gen: int) -> None:
        """Forget a staged model of generation ``gen`` (the swap failed elsewhere)."""
        self._inbox.put(("discard", gen, None, None))

    def _serve(self, what: str, a, b, future) -> None:
        if what == "stage":
            if future.set_running_or_notify_cancel():
                try:
                    self._staged = self._load(a, b, LatencyProfile())
                except BaseException as exc:  # reported to the reload, which keeps the old model
                    self._staged = None
                    future.set_exception(exc)
                else:
                    future.set_result(self._staged.engine.embedding_dim)
        elif what == "activate":
            if self._staged is not None and self._staged.engine.model.gen == a:
                self._active, self._staged = self._staged, None
                self.store = b
                self.embedding_dim = self._active.engine.embedding_dim
                self.device.profile = self._active.profile
            if future.set_running_or_notify_cancel():
                future.set_result(self._active.engine.model.gen)
        elif what == "discard" and self._staged is not None and self._staged.engine.model.gen == a:
            self._staged = None

    # batches ----------------------------------------------------------------------------------
    def _launch(self, result: "BatchResult", live: list, buffer: int) -> "_Flight | None":
        """Start computing a staged batch. Returns its flight; None when nothing was left to
        compute or the launch raised (then ``result`` has been delivered already)."""
        dev = self.device
        engine = self._active.engine
        result.gen = engine.model.gen
        now = result.started = self._clock()
        live = self._recheck(result, live, buffer, now)
        if not live:
            self._free.put(buffer)
            dev.staged = []
            result.finished = now
            self._deliver(result)
            return None
        flight = _Flight(result, live, self._active, [], dev.outs, time.perf_counter(),
                         engine.streams.asynchronous)
        noted = {id(r): attempt for r, attempt in result.running}
        running = [(r, noted[id(r)]) for r in live]
        dev.running, dev.staged = dev.running + running, []
        dev.running_size += len(live)
        if dev.running_since is None:
            dev.running_since = now
        labels = len(engine.model.spec.labels)
        # a request admitted under the previous model may ask for more classes than this one has
        flight.keep = [min(max(r.top_k, engine.keep_k), labels) for r in live]
        try:
            # embeddings only when a store keeps them: otherwise normalising and copying them out
            # is work on every batch that nothing reads
            flight.pending = engine.launch(self._staging.tensors[buffer], len(live), max(flight.keep),
                                           want_embedding=self.store is not None,
                                           wait_copy=not flight.asynchronous)
            if flight.asynchronous:
                flight.pending.wait_staged()    # the frames are on the device: the buffer is free
        except Exception as exc:  # a model failure reaches every request of the batch, typed
            flight.error = exc
        finally:
            self._free.put(buffer)
        return flight

    def _collect(self, flight: "_Flight") -> "BatchResult":
        """Wait for a launched batch, and turn its answers into its BatchResult."""
        dev, result, live = self.device, flight.result, flight.live
        try:
            if flight.error is not None:
                raise flight.error
            indices, scores, vectors = flight.pending.result()
            seconds = flight.pending.device_seconds() or (time.perf_counter() - flight.t0)
            result.top = [[[i, s] for i, s in zip(idx[:k], sc[:k])]
                          for k, idx, sc in zip(flight.keep, indices, scores)]
            result.embeddings, result.seconds, result.done = vectors, seconds, live
            if dev.outs == flight.outs:
                # a batch its device was taken out during (stuck) says nothing about its speed;
                # learning from it would stretch the next watchdog bound by its whole hang
                flight.runner.profile.observe(len(live), seconds)
            if self.store is not None and vectors is not None:
                # searches hold the store's lock for milliseconds at 100k rows: here, off the loop
                # ... among the rows its uid may see (daemon/embeddings.py: per uid unless shared)
                result.matches = {i: self.store.search(vectors[i], *r.args, uid=r.session.peer[1])
                                  for i, r in enumerate(live) if r.op == "near"}
        except Exception as exc:  # a model failure reaches every request of the batch, typed
            log.error("batch of %d on %s failed: %s: %s", len(live), dev.label, type(exc).__name__, exc)
            result.failed, result.error = live, f"{type(exc).__name__}: {exc}"
        finally:
            result.finished = self._clock()
            # the batch behind it (asynchronous devices) has been computing since this one ended
            result.started = max(result.started, dev.last_finished)
            dev.last_finished = result.finished
            left = dev.running[len(live):]
            dev.running, dev.running_size = left, len(left)
            dev.running_since = result.finished if left else None
        return result

    def _recheck(self, result: "BatchResult", live: list, buffer: int, now: float) -> list:
        """The staged requests still worth computing now that the device is free: a session closed,
        a request re-dispatched (its device left rotation) or a deadline passed while the batch
        waited behind the running one (the profile did not foresee a slow-down) splits them off,
        and the rows of the rest close up."""
        keep, rows = [], self._staging.arrays[buffer]
        noted = {id(r): attempt for r, attempt in result.running}
        for i, r in enumerate(live):
            if (r.session is not None and (r.session.closed or r.done)) or r.attempt != noted[id(r)]:
                result.dropped.append(r)            # closed, or re-dispatched while it waited
            elif r.deadline < now:
                result.expired.append(r)
            else:
                if len(keep) < i:
                    rows[len(keep)] = rows[i]
                keep.append(r)
        return keep

@dataclass(slots=True, eq=False)
class _Runner:
    """One model as an executor runs it: its engine and its latency profile."""

    engine: Engine
    profile: LatencyProfile


@dataclass(slots=True, eq=False)
class _Flight:
    """A launched batch: its result to fill, the requests computed, what ran it."""

    result: BatchResult
    live: list
    runner: _Runner
    keep: list                  # top-k kept per request
    outs: int                   # the device's ``outs`` at launch (daemon/health.py)
    t0: float                   # perf_counter at launch
    asynchronous: bool          # the device computes after launch returns (CUDA)
    pending: object = None      # daemon/engine.py Pending
    error: Exception | None = None


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
