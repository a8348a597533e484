"""A device's executor: the thread that owns its model and its staging buffers, and runs the
batches its collector stages.

See NOTE [ request path ] in daemon/pipeline/collector.py for the pipeline it is the second half of:
it takes staged batches in order, screens each again now that the device is free
(daemon/pipeline/records.py ``screen``), launches it on its Engine (daemon/pipeline/engine.py),
gives the staging buffer back once the frames are on the device, settles each request's entry
with its answer and delivers the result the moment it is done, and between two batches loads,
activates or discards a model for a swap (NOTE [ model swap ] in daemon/ops/reload.py). On an
asynchronous device (CUDA) batch k+1 is launched before batch k is collected.
"""
from __future__ import annotations

import logging
import queue as queues
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from typing import TYPE_CHECKING, Callable

import torch

from . import device_thread, thread_pools
from .engine import Engine, Staging
from .records import BatchEntry, BatchResult, Outcome, screen
from ..models.loading import LoadedModel, warmup_sizes
from ..dispatch.profile import LatencyProfile
from ..caching.ann_index import EmbeddingIndexBusy
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..caching.embedding_store import EmbeddingStore
    from ..dispatch.device import Device

log = logging.getLogger("inferd.executor")

STAGING_BUFFERS = 2         # per device: one computing, one being filled (NOTE [ request path ])


class Executor(threading.Thread):
    """The thread that owns a device's model (daemon/pipeline/engine.py) and its ``staging``
    buffers: runs the staged batches in order, delivers each result the moment it is done, and
    loads, activates or discards models between two batches for a swap (NOTE [ model swap ] in
    daemon/ops/reload.py). Started and stopped by its collector (daemon/pipeline/collector.py).

    Its collector takes a buffer index from ``free``, fills ``staging.arrays[index]`` and hands it
    over with ``submit``; this thread puts the index back once the frames are on the device.
    ``ready`` is set once the model is warm, or once it failed (``startup_error``). ``deliver``
    must be thread-safe (the server passes a call_soon_threadsafe wrapper)."""

    def __init__(self, device: Device, model, *, deliver: Callable[[BatchResult], None],
                 max_batch: int, warmup_batches: int = 0, keep_k: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(name=f"inferd-batch-{device.label}", daemon=True)
        self.device = device
        # what it runs: a LoadedModel (model id 0), or the catalog's Served this device may run
        # (daemon/models/catalog.py): one runner (engine, staging, profile) per model id
        self._models = ([(0, model, keep_k, None)] if not isinstance(model, list)
                        else [(s.mid, s.model, s.keep_k, s.name) for s in model])
        self._model = self._models[0][1]
        count = max(mid for mid, *_ in self._models) + 1
        # staging buffer i of every model is one buffer index: the collector takes an index from
        # ``free`` before it knows which model its next batch is, then fills that model's
        self._stagings: list[Staging | None] = [None] * count
        for mid, m, _, _ in self._models:
            self._stagings[mid] = Staging(device.torch_device, max_batch, m.spec.frame_shape, STAGING_BUFFERS)
        self.staging = self._stagings[self._models[0][0]]
        self.free: queues.SimpleQueue = queues.SimpleQueue()       # indices of free staging buffers
        for i in range(STAGING_BUFFERS):
            self.free.put(i)
        self._deliver = deliver
        self._warmup = warmup_batches
        self._keep_k = keep_k
        self._max_batch = max_batch
        self._clock = clock
        self._inbox: queues.SimpleQueue = queues.SimpleQueue()
        self.embedding_dim = 0
        self._runners: list[_Runner | None] = [None] * count    # by model id: what this thread runs
        self._active: _Runner | None = None     # the first model's runner (a one-model daemon's)
        self._staged: _Runner | None = None     # a model loaded beside it, waiting to be activated
        self._staged_mid = 0
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None

    def submit(self, result: BatchResult, buffer: int) -> None:
        """Run the PENDING entries of ``result`` (staged in ``buffer``, one row each, in order)
        after the batches before it."""
        self._inbox.put(("batch", result, buffer, None))

    def stop(self) -> None:
        self._inbox.put(("stop", None, None, None))

    def run(self) -> None:
        device_thread.enter(self.device)
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
                flight = self._launch(a, b)
                if ahead is not None:
                    self._land(ahead)
                ahead = flight if flight is not None and flight.asynchronous else self._land(flight)
            else:
                if ahead is not None:
                    ahead = self._land(ahead)
                if what == "stop":
                    return
                self._serve(what, a, b, c)

    def _land(self, flight: _Flight | None) -> None:
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

    @property
    def store(self) -> EmbeddingStore | None:
        """The first model's embedding store (the server sets it once open; a swap replaces it)."""
        return self._active.store if self._active is not None else None

    @store.setter
    def store(self, store) -> None:
        self._active.store = store

    def set_store(self, mid: int, store) -> None:
        """Model ``mid``'s embedding store (several models: each its own, daemon/caching/results.py).
        Set before the collector starts taking batches, or between two of them."""
        self._runners[mid].store = store

    def embedding_dim_of(self, mid: int) -> int:
        runner = self._runners[mid] if mid < len(self._runners) else None
        return runner.engine.embedding_dim if runner is not None else 0

    def staging_of(self, mid: int) -> Staging:
        """Model ``mid``'s staging buffers (its frame shape)."""
        return self._stagings[mid]

    def runs(self, mid: int) -> bool:
        """This device runs model ``mid`` (a peer may steal its requests)."""
        return mid < len(self._runners) and self._stagings[mid] is not None

    def _prepare(self) -> None:
        thread_pools.enter_device_thread(self.device)    # NOTE [ thread pools ] in daemon/pipeline/thread_pools.py
        for mid, model, keep_k, name in self._models:
            try:
                self._runners[mid] = self._load(model, keep_k, self.device.profiles[mid], mid)
            except torch.cuda.OutOfMemoryError as exc:     # says which model did not fit where
                what = f"model {name}" if name else "the model"
                raise ConfigError(f"{what} does not fit {self.device.label}'s memory with the models "
                                  f"before it: {exc}".split("\n")[0]) from None
        self._active = self._runners[self._models[0][0]]
        self.embedding_dim = self._active.engine.embedding_dim

    def _load(self, model: LoadedModel, keep_k: int, profile: LatencyProfile, mid: int = 0) -> _Runner:
        """Put ``model`` on this thread's device, check its output, warm it up (teaching
        ``profile``). Runs on this thread: the embedding hook is per thread (daemon/pipeline/engine.py)."""
        engine = Engine(self.device.torch_device, model, keep_k)
        engine.load()
        # graphs captured, sizes compiled, CUDA initialised: never inside a timed warm-up batch,
        # which would teach the profile seconds of compilation as a batch time
        engine.prepare(self._max_batch)
        frames = self._stagings[mid].tensors[0]
        samples: dict[int, list[float]] = {}
        for _ in range(self._warmup):               # warm up, and seed the latency profile
            for size in warmup_sizes(self._max_batch, padded=engine.options.padded,
                                     asynchronous=engine.streams.asynchronous):
                t0 = time.perf_counter()
                engine.launch(frames, size, 1).result()
                samples.setdefault(size, []).append(time.perf_counter() - t0)
        for size, seconds in samples.items():
            profile.seed(size, seconds)
        engine.synchronize()
        return _Runner(engine, profile, mid)

    # model swap (NOTE [ model swap ] in daemon/ops/reload.py) ---------------------------------------
    def stage(self, model: LoadedModel, keep_k: int, mid: int = 0) -> Future:
        """Load and warm ``model`` beside model ``mid`` (the one it replaces), between two batches.
        The future gets the embedding width, or the exception that stopped it."""
        future: Future = Future()
        self._inbox.put(("stage", model, (keep_k, mid), future))
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

    # models loaded and unloaded live (daemon/ops/model_ops.py) -------------------------------------
    def add(self, model: LoadedModel, keep_k: int, mid: int) -> Future:
        """Put ``model`` on this device as model id ``mid`` (a new id, or one ``drop`` freed),
        between two batches: its staging buffers, its replica, warmed up, its latency profile the
        device's ``profiles[mid]``. Its requests may come once the future has the embedding width
        (or the exception that stopped it: nothing of it is kept)."""
        future: Future = Future()
        self._inbox.put(("add", model, (keep_k, mid), future))
        return future

    def drop(self, mid: int) -> Future:
        """Free model ``mid``'s replica and staging buffers after the batches handed over before
        (none of its requests may be queued any more). The future is done once they are let go."""
        future: Future = Future()
        self._inbox.put(("drop", mid, None, future))
        return future

    def _add(self, model: LoadedModel, keep_k: int, mid: int) -> int:
        while len(self._runners) <= mid:
            self._runners.append(None)
            self._stagings.append(None)
        try:
            self._stagings[mid] = Staging(self.device.torch_device, self._max_batch, model.spec.frame_shape,
                                          STAGING_BUFFERS)
            runner = self._load(model, keep_k, LatencyProfile(), mid)
        except BaseException:
            self._stagings[mid] = None
            raise
        self._runners[mid] = runner
        self.device.profiles[mid] = runner.profile
        return runner.engine.embedding_dim

    def _drop(self, mid: int) -> None:
        self._runners[mid] = self._stagings[mid] = None       # runs(mid) is False from now on
        if self.device.torch_device.type == "cuda":
            torch.cuda.empty_cache()        # its replica's memory back for the next model loaded

    def _serve(self, what: str, a, b, future) -> None:
        if what == "stage":
            if future.set_running_or_notify_cancel():
                keep_k, mid = b
                try:
                    self._staged_mid = mid
                    self._staged = self._load(a, keep_k, LatencyProfile(), mid)
                except BaseException as exc:  # reported to the reload, which keeps the old model
                    self._staged = None
                    future.set_exception(exc)
                else:
                    future.set_result(self._staged.engine.embedding_dim)
        elif what == "activate":
            if self._staged is not None and self._staged.engine.model.gen == a:
                mid = self._staged_mid
                self._runners[mid], self._staged = self._staged, None
                self.device.profiles[mid] = self._runners[mid].profile
                self._runners[mid].store = b
                if mid == self._models[0][0]:
                    self._active = self._runners[mid]
                    self.embedding_dim = self._active.engine.embedding_dim
                    if mid == 0:
                        self.device.profile = self._active.profile
            if future.set_running_or_notify_cancel():
                future.set_result(self._active.engine.model.gen)
        elif what in ("add", "drop"):
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self._add(a, *b) if what == "add" else self._drop(a))
                except BaseException as exc:  # reported to the load, which keeps nothing of it
                    future.set_exception(exc)
        elif what == "discard" and self._staged is not None and self._staged.engine.model.gen == a:
            self._staged = None

    # batches ----------------------------------------------------------------------------------
    def _launch(self, result: BatchResult, buffer: int) -> _Flight | None:
        """Start computing a staged batch. Returns its flight; None when nothing was left to
        compute or the launch raised (then ``result`` has been delivered already)."""
        dev = self.device
        pending = result.with_outcome(Outcome.PENDING)
        mid = pending[0].request.mid if pending else self._models[0][0]
        runner = self._runners[mid]
        if runner is None:          # unloaded: only a canary can be left in its lane (the loop
            for e in pending:       # frees a model once its last request was answered)
                e.outcome = Outcome.DROPPED
            self.free.put(buffer)
            dev.staged = []
            result.finished = self._clock()
            self._deliver(result)
            return None
        engine = runner.engine
        result.gen = engine.model.gen
        now = result.started = self._clock()
        live = self._recheck(pending, buffer, now, mid)
        if not live:
            self.free.put(buffer)
            dev.staged = []
            result.finished = now
            self._deliver(result)
            return None
        flight = _Flight(result, live, runner, [], dev.outs, time.perf_counter(),
                         engine.streams.asynchronous)
        dev.running_profile = runner.profile
        dev.running, dev.staged = dev.running + live, []
        dev.running_size += len(live)
        if dev.running_since is None:
            dev.running_since = now
        labels = len(engine.model.spec.labels)
        # a request admitted under the previous model may ask for more classes than this one has
        flight.keep = [min(max(e.request.top_k, engine.keep_k), labels) for e in live]
        result.mid = mid
        try:
            # a batch is one model's: the collector takes it from one lane (daemon/dispatch/queues.py);
            # were it not, its frames would be another model's shape: fail it, never answer it
            assert all(e.request.mid == mid for e in live), f"a batch of model {mid} holds another model's frames"
            # embeddings only when a store keeps them: otherwise normalising and copying them out
            # is work on every batch that nothing reads
            # the raw output rows only of the requests that asked (none: the batch costs the same)
            flight.logits = [i for i, e in enumerate(live) if e.request.logits]
            extra = {"logits_rows": flight.logits} if flight.logits else {}
            flight.pending = engine.launch(self._stagings[mid].tensors[buffer], len(live), max(flight.keep),
                                           want_embedding=runner.store is not None,
                                           wait_copy=not flight.asynchronous, **extra)
            if flight.asynchronous:
                flight.pending.wait_staged()    # the frames are on the device: the buffer is free
        except Exception as exc:  # a model failure reaches every request of the batch, typed
            flight.error = exc
        finally:
            self.free.put(buffer)
        return flight

    def _collect(self, flight: _Flight) -> BatchResult:
        """Wait for a launched batch, and settle each of its entries: DONE with its answer, or
        every one FAILED with the batch's error."""
        dev, result, live = self.device, flight.result, flight.live
        try:
            if flight.error is not None:
                raise flight.error
            indices, scores, vectors = flight.pending.result()
            if flight.logits:
                rows = flight.pending.logits()
                for j, i in enumerate(flight.logits):
                    live[i].logits = rows[j]
            result.seconds = flight.pending.device_seconds() or (time.perf_counter() - flight.t0)
            if dev.outs == flight.outs:
                # a batch its device was taken out during (stuck) says nothing about its speed;
                # learning from it would stretch the next watchdog bound by its whole hang
                flight.runner.profile.observe(len(live), result.seconds)
            for i, (e, k, idx, sc) in enumerate(zip(live, flight.keep, indices, scores)):
                e.outcome, e.top = Outcome.DONE, [[c, s] for c, s in zip(idx[:k], sc[:k])]
                if vectors is not None:
                    e.embedding = vectors[i]
                    store = flight.runner.store
                    if store is not None and e.request.op == "near":
                        # searches hold the store's lock for milliseconds at 100k rows: here, off
                        # the loop ... among the rows its uid may see
                        # (daemon/caching/embedding_store.py: per uid unless shared)
                        r = e.request
                        try:
                            e.matches = store.search(e.embedding, *r.args, uid=r.session.peer[1])
                        except EmbeddingIndexBusy as exc:   # this request only: answered overloaded
                            e.matches = exc
        except Exception as exc:  # a model failure reaches every request of the batch, typed
            log.error("batch of %d on %s failed: %s: %s", len(live), dev.label, type(exc).__name__, exc)
            for e in live:
                e.outcome = Outcome.FAILED
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            result.finished = self._clock()
            # the batch behind it (asynchronous devices) has been computing since this one ended
            result.started = max(result.started, dev.last_finished)
            dev.last_finished = result.finished
            left = dev.running[len(live):]
            dev.running, dev.running_size = left, len(left)
            dev.running_since = result.finished if left else None
        return result

    def _recheck(self, staged: list[BatchEntry], buffer: int, now: float, mid: int = 0) -> list[BatchEntry]:
        """The staged entries (one row of ``buffer`` each, in order) still worth computing now
        that the device is free: a session closed, a request re-dispatched (its device left
        rotation) or a deadline passed while the batch waited behind the running one (the profile
        did not foresee a slow-down) settles them (``screen``), and the rows of the rest close up."""
        live = screen(staged, now)
        if len(live) < len(staged):
            rows = self._stagings[mid].arrays[buffer]
            kept = (i for i, e in enumerate(staged) if e.outcome is Outcome.PENDING)
            for row, i in enumerate(kept):
                if row < i:
                    rows[row] = rows[i]
        return live


@dataclass(slots=True, eq=False)
class _Runner:
    """One model as an executor runs it: its engine and its latency profile."""

    engine: Engine
    profile: LatencyProfile
    mid: int = 0                # its model id (daemon/models/catalog.py)
    store: object = None        # its model's embedding store, when it keeps embeddings


@dataclass(slots=True, eq=False)
class _Flight:
    """A launched batch: its result to fill, the requests computed, what ran it."""

    result: BatchResult
    live: list[BatchEntry]      # the entries computed, in row order
    runner: _Runner
    keep: list[int]             # top-k kept per entry
    outs: int                   # the device's ``outs`` at launch (daemon/dispatch/health.py)
    t0: float                   # perf_counter at launch
    asynchronous: bool          # the device computes after launch returns (CUDA)
    pending: object = None      # daemon/pipeline/engine.py Pending
    logits: list | None = None  # indices in ``live`` of the requests that asked for their logits
    error: Exception | None = None
