"""One model on one device: its replica, preprocessing, and the forward pass of a staged batch.

The batching pipeline (NOTE [ request path ] in daemon/pipeline/collector.py) stages uint8 frames into one of
a device's ``Staging`` buffers and hands the buffer to its executor, which calls
``Engine.launch(buffer, n, k, want_embedding, logits_rows)`` and later ``Pending.result()``.
``launch`` returns once the work is queued on the device; ``result()`` waits for it and returns
plain Python lists (top-k indices and scores) and the embeddings as a numpy array; then
``logits()`` gives the raw float32 output rows of the rows that asked for them (``logits_rows``),
copied back in the same device->host copy as the top-k. A batch where no row asked packs exactly
what it did before: the logits cost only the batches that want them.

NOTE [ engine streams ]

    host (executor thread)           copy stream                  compute stream
    ----------------------           -----------                  --------------
    launch(staging rows, n, k)
      pick a device input buffer --> wait: its last reader done
                                     rows -> device (uint8,
                                       non_blocking)  [copied]
                                                           -----> wait [copied]  [started]
                                                                  preprocess (uint8 -> float, on
                                                                    the device), model (autocast,
                                                                    channels_last, graph replay)
                                                                  [consumed: the input may be reused]
                                                                  softmax, top-k, pack indices +
                                                                    scores (+ embeddings) in one
                                                                    int32 tensor (+ the logits rows
                                                                    asked for, flattened after it)
                                                                  one copy -> pinned host  [done]
      wait_copy: wait [copied] only
      return Pending
    Pending.staged():  [copied] done: the staging buffer may be written again
    Pending.result():  wait [done] only (never the whole device); unpack
    Pending.device_seconds(): [started] to [done], the batch's own device time

Events are per launch, so nothing waits for more than its own batch. The streams and events come
from daemon/pipeline/streams.py: on a CPU they are no-ops (every step has finished when its call returns,
the model reads the staging rows themselves and nothing is packed: ``launch`` returns a ``Done``,
the same bytes as before the GPU path existed), and tests/unit/test_engine.py checks the order above
with a fake whose events complete only when waited on.

Two device input buffers alternate, so the copy of batch k+1 may overlap the compute of batch k;
with ``model.compile`` each prepared size has its own (the graph's static input), guarded the same
way by the event of its last reader. With today's executor (launch, free the staging buffer,
result) ``wait_copy=True`` keeps the staging buffer safe: launch returns once the frames are on the
device. An executor that frees the buffer on ``Pending.staged()`` passes ``wait_copy=False``.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..models.loading import LoadedModel, check_output, logits_of
from .engine_options import CudaGraphs, EngineOptions, batch_sizes, compiled, frozen, size_for
from ..models.embedding_pooling import MEAN, Pool
from . import thread_pools
from .preprocess import Preprocess
from .streams import streams_for
from .team_size import TeamSize

_current = threading.local()
log = logging.getLogger("inferd.engine")
INPUT_BUFFERS = 2           # device input buffers of the unpadded path (see NOTE [ engine streams ])


class Staging:
    """A device's ``count`` uint8 staging buffers of ``max_batch`` frames each (pinned host memory
    on CUDA, so the copy to the device can be asynchronous). Owned by the executor, filled by the
    collector; a buffer is never written while a launch reads it (the two hand them over through
    the executor's queue of free buffers: NOTE [ request path ] in daemon/pipeline/collector.py)."""

    def __init__(self, torch_device: torch.device, max_batch: int, frame_shape: tuple, count: int = 2):
        pin = torch_device.type == "cuda"
        self.tensors = [torch.zeros((max_batch, *frame_shape), dtype=torch.uint8, pin_memory=pin)
                        for _ in range(count)]
        self.arrays = [t.numpy() for t in self.tensors]

    def __len__(self) -> int:
        return len(self.tensors)


class Pending:
    """A launched batch of ``n`` rows. ``staged()``: its frames have left the staging buffer.
    ``result()``: (indices lists, scores lists, float32 vectors numpy or None); waits for this
    batch's own copy back only, and may be called once."""

    __slots__ = ("_host", "_done", "_copied", "_k", "_dim", "_started", "_shape", "_logits")

    def __init__(self, host: torch.Tensor, done, copied, k: int, dim: int, started=None,
                 shape: tuple[int, int, int] | None = None):
        self._host, self._done, self._copied, self._k, self._dim = host, done, copied, k, dim
        self._started = started
        self._shape = shape          # (n, columns, classes) when logits rows follow the packed rows
        self._logits = None

    def staged(self) -> bool:
        return self._copied.query()

    def wait_staged(self) -> None:
        self._copied.synchronize()

    def result(self):
        self._done.synchronize()
        host = self._host
        if self._shape is not None:
            n, cols, classes = self._shape
            host, self._logits = split_logits(host, n, cols, classes)
        return unpack(host, self._k, self._dim)

    def logits(self):
        """After ``result()``: float32 numpy [rows asked, classes] in the order of ``logits_rows``,
        or None when no row asked."""
        return self._logits

    def device_seconds(self) -> float | None:
        """After ``result()``: how long the device worked on this batch, from the moment its
        compute stream reached it to its copy back (CUDA timing events), without the time it
        queued behind an earlier batch; None where the device has no timing events."""
        elapsed = getattr(self._started, "elapsed_time", None)
        return None if elapsed is None else elapsed(self._done) / 1000.0


class Done:
    """A batch computed before ``launch`` returned (a synchronous device): the Pending of CPUs."""

    __slots__ = ("_result", "_logits")

    def __init__(self, logits: torch.Tensor, vectors: torch.Tensor | None, k: int, logits_rows=None):
        scores, indices = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
        self._result = (indices.tolist(), scores.tolist(), None if vectors is None else vectors.numpy())
        # a copy: the model's output buffer may be reused by the next batch
        self._logits = None if not logits_rows else \
            logits[list(logits_rows)].to(torch.float32, copy=True).numpy()

    def logits(self):
        return self._logits

    def staged(self) -> bool:
        return True

    def wait_staged(self) -> None:
        return None

    def result(self):
        return self._result

    def device_seconds(self) -> None:
        return None


@dataclass(eq=False)
class _Input:
    """A device input buffer and the event of the last compute that read it (None: never read)."""

    tensor: torch.Tensor | None
    consumed: object = None


class Engine:
    """``model`` on ``device`` (a torch.device), run as ``options`` say (default: the model's
    ``options``, set by daemon/models/loading.py from the configuration, else fp32 eager), through
    ``streams`` (default: daemon/pipeline/streams.py's for the device). ``load()`` must run on the thread
    that will call ``launch`` (a forward hook writes the embedding to a thread-local slot)."""

    def __init__(self, device: torch.device, model: LoadedModel, keep_k: int, streams=None,
                 options: EngineOptions | None = None):
        self.device = device
        self.model = model
        self.keep_k = keep_k
        self.options = options or getattr(model, "options", None) or EngineOptions()
        self.streams = streams
        self.replica = None
        self.preprocess = None
        self.embedding_dim = 0
        self.pool = Pool()                  # model.embedding_pool (daemon/models/embedding_pooling.py)
        self._run = None                    # the module a forward pass calls (compiled or not)
        self._graphs: CudaGraphs | None = None
        self._sizes: tuple[int, ...] = ()   # prepared sizes of padded batches; () until prepare()
        self._inputs: dict = {}             # key -> _Input (NOTE [ engine streams ])
        self._turn = 0
        self.team: TeamSize | None = None   # CPU, threads.per_batch = auto: each batch's team size
        self._threads = 0                   # the team size set last (torch.set_num_threads)

    def load(self) -> None:
        """Put the model on the device as the options say, hook its embedding layer, check its
        output. ConfigError when the device cannot run the options or the model's output is wrong."""
        spec, opts = self.model.spec, self.options
        opts.check(self.device)
        if self.streams is None:
            self.streams = streams_for(self.device)
        replica = self.model.replica(self.device)
        if opts.channels_last:
            if replica is self.model.module:     # CPU devices share the module: never convert it
                replica = copy.deepcopy(replica)
            replica = replica.to(memory_format=torch.channels_last)
        self.replica = replica
        # reuse: one input buffer for every batch of this thread (the CPU's, NOTE [ preprocessing
        # on a CPU ] in daemon/pipeline/preprocess.py): Done has read the batch's output before
        # launch returns
        self.preprocess = Preprocess.of(spec, self.device, channels_last=opts.channels_last, reuse=True)
        if opts.compile == "freeze":            # the embedding layer's output traced as a second one
            one = torch.zeros((1, *spec.frame_shape), dtype=torch.uint8, device=self.device)
            example = Preprocess.of(spec, self.device, channels_last=opts.channels_last)(one)
            self.replica = frozen(self.replica, example, spec.embedding_layer)
            log.info("%s: the model in channels_last, traced and frozen (model.compile = freeze)",
                     self.device)
        elif spec.embedding_layer:
            _hook(dict(self.replica.named_modules())[spec.embedding_layer], spec.embedding_layer)
        self.pool = Pool.parse(getattr(spec, "embedding_pool", "") or MEAN)
        blank = torch.zeros((2, *spec.frame_shape), dtype=torch.uint8, device=self.device)
        self.embedding_dim = check_output(spec, self.replica, self.device,
                                          embed=lambda raw: embedding_of(raw, blank, self.pool))
        if spec.embedding_layer and not self.embedding_dim:
            raise ConfigError(f"model.embedding_layer: {spec.embedding_layer!r} never ran in a forward pass "
                              f"(a torch.export program's module() keeps the names of its layers but "
                              f"not their calls); return (logits, embedding) from forward instead")
        self.streams.follow_default()
        # the calling thread is the executor: its torch threads are the device's share (NOTE [ thread
        # pools ]); with per_batch = auto each batch size runs on the team measured fastest
        self._threads = torch.get_num_threads()
        if self.device.type == "cpu" and thread_pools.per_batch() == "auto" and self._threads > 1:
            self.team = TeamSize(self._threads)
            thread_pools.record_team(self.team)       # the admin stats show its choices
        self._run = compiled(self.replica) if opts.compile == "compile" else self.replica
        if opts.compile == "graphs":
            self._graphs = CudaGraphs(self._forward)

    def synchronize(self) -> None:
        """Wait for everything this engine queued (its own streams, not the whole device)."""
        self.streams.synchronize()

    def launch(self, frames: torch.Tensor, n: int, k: int, want_embedding: bool = False,
               logits_rows: list[int] | None = None, *, wait_copy: bool = True) -> Pending:
        """Queue the forward pass of the first ``n`` rows of ``frames`` (a Staging tensor): top-k
        (indices, scores) of the softmax and, when asked and the model has them, embeddings
        (float32 unit rows), and the raw float32 logits of the rows ``logits_rows`` (indices
        below ``n``; ``Pending.logits()``). With ``wait_copy`` it returns once the rows are on the
        device, so ``frames`` may be rewritten at once; else only after ``Pending.staged()``."""
        if not 0 < n <= frames.shape[0]:
            raise ValueError(f"a batch of {n} rows from a staging buffer of {frames.shape[0]}")
        if self.options.padded and not self._sizes:
            self.prepare(frames.shape[0])
        size = size_for(n, self._sizes) if self._sizes else n
        s = self.streams
        slot = self._input_for(size, tuple(frames.shape))
        dst = None if slot.tensor is None else slot.tensor[:n]
        _, copied = s.copy_in(dst, frames[:n], after=slot.consumed)
        rows = (frames if slot.tensor is None else slot.tensor)[:size]   # padded: stale rows past n
        team = self.team
        if team is not None:            # NOTE [ team size per batch ] in daemon/pipeline/team_size.py
            threads = team.pick(n)
            if threads != self._threads:
                torch.set_num_threads(threads)
                self._threads = threads
            t0 = time.perf_counter()
        with s.compute(after=copied), torch.inference_mode():
            started = s.record()
            logits, vectors = self._graphs.replay(size) if self._graphs else self._forward(rows, want_embedding)
            slot.consumed = s.record()
            vectors = vectors[:n] if want_embedding and vectors is not None else None
            if not s.asynchronous:      # nothing to copy back: no packing (a no-op model's batch
                done = Done(logits[:n], vectors, k, logits_rows)    # costs 80 us less)
                if team is not None:
                    team.observe(n, threads, time.perf_counter() - t0)
                return done
            packed = pack(logits[:n], vectors, k)
            shape = None
            if logits_rows:             # one copy still: the rows asked for, flattened after it
                shape = (n, packed.shape[1], logits.shape[1])
                packed = with_logits(packed, logits, logits_rows)
            host, done = s.copy_out(packed)
        if wait_copy:
            copied.synchronize()
        return Pending(host, done, copied, k, 0 if vectors is None else vectors.shape[1], started, shape)

    def _forward(self, rows: torch.Tensor, want_embedding: bool = True):
        """uint8 rows on the device -> (logits, unit embeddings or None), under the options'
        autocast; call in inference mode. Traced whole into a CUDA graph when ``model.compile =
        graphs``."""
        x = self.preprocess(rows)
        with self.options.autocast(self.device):
            raw = self._run(x)
        vectors = embedding_of(raw, rows, self.pool) if want_embedding and self.embedding_dim else None
        return logits_of(raw), vectors

    def _input_for(self, size: int, staging_shape: tuple) -> _Input:
        """The device input buffer of this launch: the graph's static input of ``size``, else the
        next of INPUT_BUFFERS (None tensor where the device reads host memory itself)."""
        if self._graphs is not None:
            key = size
        else:
            key, self._turn = self._turn % INPUT_BUFFERS, self._turn + 1
        slot = self._inputs.get(key)
        if slot is None:
            tensor = self._graphs.inputs[size] if self._graphs else self.streams.input_buffer(staging_shape)
            slot = self._inputs[key] = _Input(tensor)
        return slot

    def prepare(self, max_rows: int) -> None:
        """Make batches of up to ``max_rows`` ready before the first one is timed: with
        ``model.compile`` every padded size captured or compiled; on an asynchronous device (CUDA)
        one blank batch of 1 and of ``max_rows`` (lazy initialisation, kernel choice). Nothing on
        a CPU without compile. ``launch`` calls it itself for padded sizes if nobody did (then the
        first launch carries minutes of compilation)."""
        shape = self.model.spec.frame_shape
        sizes = batch_sizes(max_rows) if self.options.padded else tuple(sorted({1, max_rows}))
        if self._graphs is not None:
            self.streams.synchronize()
            self._graphs.capture(sizes, shape, self.device)
        elif self.options.padded or self.streams.asynchronous:
            with self.streams.compute(), torch.inference_mode():
                blank = torch.zeros((max_rows, *shape), dtype=torch.uint8, device=self.device)
                for size in sizes:
                    self._forward(blank[:size])
            self.streams.synchronize()
        if self.options.padded:
            self._sizes = sizes


def pack(logits: torch.Tensor, vectors: torch.Tensor | None, k: int) -> torch.Tensor:
    """Top-k of the softmax of ``logits`` (and ``vectors``) as one int32 tensor, so one copy brings
    a batch back: columns [indices (k) | float32 scores as bits (k) | float32 vectors as bits]."""
    scores, indices = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
    parts = [indices.to(torch.int32), scores.contiguous().view(torch.int32)]
    if vectors is not None:
        parts.append(vectors.float().contiguous().view(torch.int32))
    return torch.cat(parts, dim=1)


def with_logits(packed: torch.Tensor, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``packed`` (:func:`pack`) flattened, then the float32 ``logits`` of ``rows`` as bits,
    flattened: one 1-D int32 tensor, so the same single copy brings them back."""
    first, last = rows[0], rows[-1]
    if last - first + 1 == len(rows):            # a run of rows (every row, often): a slice
        chosen = logits[first:last + 1]
    else:   # the index goes over from pinned memory: a pageable copy would wait for the forward pass
        index = torch.tensor(rows, dtype=torch.long)
        if logits.device.type == "cuda":
            index = index.pin_memory().to(logits.device, non_blocking=True)
        chosen = logits.index_select(0, index)
    chosen = chosen.float().contiguous().view(torch.int32)
    return torch.cat((packed.reshape(-1), chosen.reshape(-1)))


def split_logits(host: torch.Tensor, n: int, cols: int, classes: int):
    """:func:`with_logits`'s tensor on the host -> (the packed [n, cols] part, logits numpy
    [rows, classes] float32)."""
    head = host[:n * cols].view(n, cols)
    tail = host[n * cols:].view(torch.float32).view(-1, classes).numpy()
    return head, tail


def unpack(host: torch.Tensor, k: int, dim: int):
    """:func:`pack`'s tensor, on the host -> (indices lists, scores lists, vectors numpy or None)."""
    indices = host[:, :k].tolist()
    scores = host[:, k:2 * k].contiguous().view(torch.float32).tolist()
    vectors = host[:, 2 * k:2 * k + dim].contiguous().view(torch.float32).numpy() if dim else None
    return indices, scores, vectors


def _capture(module, inputs, output) -> None:
    _current.embedding = output


def _hook(module, name: str = "") -> None:
    """Capture ``module``'s output in the calling thread's slot. Registered once per module: CPU
    devices share one module, and each executor thread reads only what its own forward wrote.
    ConfigError for a TorchScript module, which takes no hooks."""
    if isinstance(module, torch.jit.ScriptModule):
        raise ConfigError(f"model.embedding_layer: {name!r} is a TorchScript module, and TorchScript "
                          f"takes no forward hooks; return (logits, embedding) from forward (the "
                          f"embedding is pooled by model.embedding_pool all the same)")
    if not getattr(module, "_inferd_hooked", False):
        module.register_forward_hook(_capture)
        module._inferd_hooked = True


def embedding_of(output, frames: torch.Tensor | None = None, pool: Pool = Pool()):
    """The embedding of a forward pass: the second element of a (logits, embedding) output, else
    what the hooked layer produced in this thread; pooled by ``pool`` (``model.embedding_pool``,
    NOTE [ near-duplicate embeddings ] in daemon/models/embedding_pooling.py: the default averages a 4-D output
    over H, W) from it and the batch's uint8 ``frames``; unit rows, float32."""
    vectors = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else \
        getattr(_current, "embedding", None)
    if vectors is None:
        return None
    _current.embedding = None
    return pool(vectors, frames)
