"""Loading the served model: a built-in one from inferd.daemon.models.zoo, or a file named in the configuration.

Files load only from ``model.path`` in the daemon's configuration (clients never name a file):
``torchscript`` files through ``torch.jit.load``, ``export`` files (``torch.export.save`` output,
usually ``.pt2``) through ``torch.export.load``. ``auto`` picks by suffix: ``.pt2`` is export,
anything else TorchScript.

Input: ``forward(x)`` takes the model's input form (``model.input``, see
:mod:`inferd.daemon.pipeline.preprocess`): float32 NCHW normalised by the daemon with ``model.mean`` /
``model.std`` (required for a file model: no silent default), or the uint8 NHWC frames as they
are, for a model that normalises inside. An exported program is checked against the form at load
(input dtype and layout, height and width, a batch dimension exported as dynamic).

Output convention: logits of shape (N, number of classes), or a tuple whose first element is those
logits (the second, where present, is an embedding, kept for near-duplicate search). Labels are
optional (daemon/models/labels.py): without a labels file the classes are numbered, and their number is
the output width, read without running the model (:func:`output_width`). The spec and the output
width are checked once more by a forward pass on each device (:func:`check_output`), so a labels
file that does not match the model stops start-up, not a request.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import zoo
from ..config import ConfigError, ModelConfig, check_input_form
from ..pipeline.engine_options import EngineOptions, batch_sizes

from . import embedding_pooling
from .labels import labels_id, numbered, read_labels
from .embedding_pooling import MEAN
from ..pipeline.preprocess import FLOAT_NCHW, UINT8_NHWC, Preprocess

log = logging.getLogger("inferd.loading")


@dataclass(frozen=True)
class ModelSpec:
    """What a client must know to send frames, and what the executor threads need to prepare them."""

    name: str
    input_height: int
    input_width: int
    mean: tuple
    std: tuple
    labels: tuple
    top_k: int
    embedding_layer: str = ""     # submodule whose output is the embedding; "" for none
    input_form: str = FLOAT_NCHW  # what forward() is given (daemon/pipeline/preprocess.py)
    numbered: bool = False        # labels are the class numbers "0", "1", ... (no labels file)
    embedding_pool: str = "mean"  # how the embedding is pooled (daemon/models/embedding_pooling.py)

    @property
    def preprocess_id(self) -> str:
        """Everything that decides the model input besides the frame bytes: part of the cache key.
        (float_nchw keeps the id it had before input forms existed, so caches stay valid.)"""
        size = f"{self.input_height}x{self.input_width}"
        if self.input_form == UINT8_NHWC:
            return f"rgb-u8 {size} as-is uint8-nhwc inferd-preprocess-1"
        return f"rgb-u8 {size} mean={list(self.mean)} std={list(self.std)} inferd-preprocess-1"

    @property
    def labels_id(self) -> str:
        """Identifies the labels in hello (daemon/models/labels.py): "numbered" or a digest of the names."""
        return labels_id(self.labels, self.numbered)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.input_height, self.input_width, 3)

    @property
    def frame_bytes(self) -> int:
        return self.input_height * self.input_width * 3


class LoadedModel:
    """The model as loaded once, with its spec and a digest that changes whenever the weights do."""

    def __init__(self, module, spec: ModelSpec, digest: str, source: Path | None):
        self.module = module
        self.spec = spec
        self.digest = digest
        self.gen = 1                 # model generation: 1 at start, +1 per reload (daemon/ops/reload.py)
        self._source = source

    def replica(self, device: torch.device):
        """The module to run on ``device``. CPU devices share one module (inference does not
        mutate it); each CUDA device gets its own copy."""
        if device.type == "cpu":
            return self.module
        if isinstance(self.module, torch.jit.ScriptModule) and self._source is not None:
            return torch.jit.load(str(self._source), map_location=device).eval()
        return copy.deepcopy(self.module).to(device).eval()

    def describe(self) -> dict:
        """The model part of the hello reply (and of info, and of the first reply of a new
        generation): small whatever the number of classes; the names come with :meth:`labels`."""
        s = self.spec
        return {"name": s.name, "digest": self.digest, "input": list(s.frame_shape),
                "dtype": "uint8", "input_form": s.input_form, "classes": len(s.labels),
                "labels_id": s.labels_id, "top_k": s.top_k, "gen": self.gen}

    def labels(self) -> dict:
        """The reply of the ``labels`` request (docs/protocol.md): every class name, in index order."""
        s = self.spec
        return {"gen": self.gen, "labels_id": s.labels_id, "labels": list(s.labels)}


def _state_digest(module: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_file(cfg: ModelConfig):
    """(module, digest, output width or None) of the configured file."""
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError(f"model.path: {path} is not a file")
    fmt = cfg.format if cfg.format != "auto" else ("export" if path.suffix == ".pt2" else "torchscript")
    try:
        if fmt == "export":
            program = torch.export.load(str(path))
        else:
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises many types for a bad file; all mean "cannot load this"
        raise ConfigError(f"model.path: cannot load {path} as {fmt}: {exc}") from None
    if fmt == "export":
        width = _check_program(program, cfg)
        # a named embedding layer must exist as a submodule whose forward runs, so its hook fires:
        # unflatten keeps the module tree (a few percent slower), module() inlines it
        module = torch.export.unflatten(program) if cfg.embedding_layer else program.module()
    else:
        module.eval()          # an exported program is traced in eval mode and refuses eval()
        width = None
    return module, _file_digest(path), width


def _check_program(program, cfg: ModelConfig) -> int | None:
    """An exported program states its input and output shapes: check the input against
    model.input / input_height / input_width (and that the batch dimension is dynamic) before
    anything runs. Returns the output width (None when the program does not say)."""
    names = set(program.graph_signature.user_inputs)
    inputs = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.target in names]
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        raise ConfigError(f"model.path: the exported program takes {len(inputs)} inputs; inferd gives "
                          f"it one batch tensor")
    x, h, w = inputs[0], cfg.input_height, cfg.input_width
    want_dtype, want_shape = ((torch.uint8, (h, w, 3)) if cfg.input == UINT8_NHWC
                              else (torch.float32, (3, h, w)))
    shape = tuple(x.shape)
    got = tuple(int(d) if isinstance(d, int) else -1 for d in shape[1:])
    if x.dtype != want_dtype or x.dim() != 4 or got != want_shape:
        # the same form (dtype, channels where the form puts them) with another size: the size
        # keys are wrong, not model.input
        size_only = (x.dtype == want_dtype and x.dim() == 4
                     and (got[2] == 3 if cfg.input == UINT8_NHWC else got[0] == 3))
        key = "model.input_height / model.input_width" if size_only else "model.input"
        fix = ""
        if size_only:
            ph, pw = got[:2] if cfg.input == UINT8_NHWC else got[1:]
            fix = f"; set model.input_height = {ph} and model.input_width = {pw}" if ph > 0 and pw > 0 else ""
        raise ConfigError(f"{key}: the exported program takes {x.dtype} {_shape_text(shape)}; "
                          f"model.input = \"{cfg.input}\" with input_height {h} and input_width {w} "
                          f"gives it {want_dtype} (N, {', '.join(map(str, want_shape))}){fix}")
    if isinstance(shape[0], int):
        raise ConfigError(f"model.path: the program was exported with a fixed batch size of {shape[0]}; "
                          f"export it with dynamic_shapes={{\"x\": {{0: torch.export.Dim(\"batch\")}}}} "
                          f"(docs/operations.md, Your own model)")
    outputs = next(n for n in program.graph.nodes if n.op == "output").args[0]
    first = outputs[0] if isinstance(outputs, (tuple, list)) and outputs else outputs
    val = getattr(first, "meta", {}).get("val")
    if isinstance(val, torch.Tensor) and val.dim() == 2 and isinstance(val.shape[1], int):
        return int(val.shape[1])
    return None


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "N" for d in shape) + ")"


def output_width(module, spec: ModelSpec, source: Path | None = None) -> int:
    """The number of classes a model's logits have (the width of its output).

    Found without a forward pass in this process, where one would start a thread pool on the main
    thread (see :func:`check_output`): one frame through the model under FakeTensorMode (shapes
    only, no kernels); a model that pass cannot follow (a traced TorchScript file holds scalar
    constants that it must read) runs one blank frame in a child process instead (``source``,
    about two seconds once at start-up). ConfigError naming model.labels when neither works."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    frames = torch.zeros((1, *spec.frame_shape), dtype=torch.uint8)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            shape = tuple(logits_of(module(Preprocess.of(spec)(mode.from_tensor(frames)))).shape)
    except Exception as exc:  # a model the shape pass cannot follow: ask a child process
        if source is None or not isinstance(module, torch.jit.ScriptModule):
            raise _unknown_width(f"{type(exc).__name__}: {exc}") from None
        shape = _child_output_shape(spec, source)
    if len(shape) != 2:
        raise ConfigError(f"model: output shape {shape} for 1 frame is not (1, classes)")
    return int(shape[1])


_PROBE = """
import ast, sys, torch
from inferd.daemon.pipeline.preprocess import Preprocess
path, form, h, w, mean, std = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), ast.literal_eval(sys.argv[5]), ast.literal_eval(sys.argv[6])
torch.set_num_threads(1)
module = torch.jit.load(path, map_location="cpu").eval()
with torch.inference_mode():
    out = module(Preprocess(mean, std, form=form)(torch.zeros((1, h, w, 3), dtype=torch.uint8)))
out = out[0] if isinstance(out, (tuple, list)) else out
print(tuple(out.shape))
"""


def _child_output_shape(spec: ModelSpec, source: Path) -> tuple:
    """The output shape of one blank frame through the TorchScript file ``source``, in a child."""
    args = [sys.executable, "-c", _PROBE, str(source), spec.input_form, str(spec.input_height),
            str(spec.input_width), repr(spec.mean), repr(spec.std)]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise _unknown_width("one frame took over 300 s") from None
    if done.returncode != 0:
        raise _unknown_width((done.stderr.strip().splitlines() or ["no output"])[-1])
    return tuple(int(d) for d in done.stdout.strip().strip("()").split(",") if d.strip())


def _unknown_width(why: str) -> ConfigError:
    return ConfigError(f"model.labels: the number of classes could not be read from the model ({why}); "
                       f"give a labels file")


def load(cfg: ModelConfig) -> LoadedModel:
    """Load the configured model on the CPU and check its spec. Raises ConfigError with the key at
    fault. Runs no forward pass: see :func:`check_output`."""
    width = None
    if cfg.path:
        module, digest, width = _load_file(cfg)
        name = cfg.name or Path(cfg.path).stem
        labels = read_labels(cfg.labels) if cfg.labels else ()
        check_input_form(cfg)     # at start-up config.py did; a reload to a file path did not
        mean, std = (cfg.mean, cfg.std) if cfg.input == FLOAT_NCHW else ((), ())
        height, width_px, source = cfg.input_height, cfg.input_width, Path(cfg.path)
    else:
        if cfg.builtin not in zoo.BUILTIN_NAMES:
            raise ConfigError(f"model.builtin: {cfg.builtin!r} is not one of {', '.join(zoo.BUILTIN_NAMES)}")
        if cfg.input_height != cfg.input_width:
            raise ConfigError("model.input_height / input_width: built-in models take square inputs")
        module, bspec = zoo.build(cfg.builtin, input_size=cfg.input_height or None)
        digest = _state_digest(module)
        # a [[models]] entry with no name is called by its built-in's name (config.entry_name)
        name = cfg.name or (cfg.builtin if hasattr(cfg, "version") else bspec.name)
        source = None
        labels = read_labels(cfg.labels) if cfg.labels else bspec.labels
        mean, std = cfg.mean or bspec.mean, cfg.std or bspec.std
        height, width_px = bspec.input_height, bspec.input_width
    # the built-ins' own embedding unless the configuration names one (NOTE [ near-duplicate embeddings ])
    default_layer, default_pool = ("", MEAN) if cfg.path else (bspec.embedding_layer, bspec.embedding_pool)
    embedding_layer = cfg.embedding_layer or default_layer
    embedding_pool = str(embedding_pooling.parse(getattr(cfg, "embedding_pool", "") or default_pool))
    if embedding_layer and embedding_layer not in dict(module.named_modules()):
        raise ConfigError(f"model.embedding_layer: the model has no submodule {embedding_layer!r}")
    spec = ModelSpec(name, height, width_px, tuple(map(float, mean)), tuple(map(float, std)), labels,
                     cfg.top_k, embedding_layer, cfg.input if cfg.path else FLOAT_NCHW, not labels,
                     embedding_pool=embedding_pool)
    if not labels:
        spec = dataclasses.replace(spec, labels=numbered(width or output_width(module, spec, source)))
    if cfg.top_k > len(spec.labels):
        raise ConfigError(f"model.top_k: {cfg.top_k} is more than the model's {len(spec.labels)} classes")
    options = EngineOptions.of(cfg)         # how each device runs it (daemon/pipeline/engine_options.py)
    digest += options.digest_tag
    version = getattr(cfg, "version", None)
    if version is not None:
        # a [[models]] entry: its name and version in its digest, so two versions of one file key
        # the caches apart (daemon/models/catalog.py); [model] alone keeps the model's own digest
        digest += f"-{spec.name}.v{version}"
    model = LoadedModel(module, spec, digest, source)
    model.options = options
    log.info("model %s loaded: %s input %dx%d, %d %s, digest %s", name, spec.input_form, height, width_px,
             len(spec.labels), "numbered classes" if spec.numbered else "labels", digest)
    return model


def warmup_sizes(max_batch: int, *, padded: bool = False, asynchronous: bool = False) -> list[int]:
    """The batch sizes a device's warm-up runs, so that no batch the planner chooses is the first
    of its size (first calls at a shape choose kernels: cuDNN autotuning, oneDNN primitives) and
    the latency profile (daemon/dispatch/profile.py) is seeded across the range, not at its two ends.

    padded (model.compile): the prepared sizes (daemon/pipeline/engine_options.py batch_sizes), the only ones run.
    asynchronous (CUDA, eager): every size 1..max_batch, since any may be chosen and a pass costs
    milliseconds. CPU (eager): 1, 2, 4, ... and max_batch: a CPU pass at max_batch can take a
    second and oneDNN's per-shape set-up is small beside it, so log-spaced sizes seed the profile
    (it interpolates between them) at about twice the frames of max_batch alone.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch {max_batch} < 1")
    if asynchronous and not padded:
        return list(range(1, max_batch + 1))
    return list(batch_sizes(max_batch))


def check_output(spec: ModelSpec, module, device: torch.device = torch.device("cpu"),
                 embed=None) -> int:
    """Run two blank frames through ``module`` on ``device``; ConfigError unless the output is
    (2, number of labels). Returns the embedding width (0 without one); ``embed(output)`` extracts
    the embedding (daemon/pipeline/engine.py ``embedding_of``).

    Called by each executor thread before its warm-up, never on the main thread: a forward pass
    there, at torch's default thread count, left every later pass in a 2-thread executor thread
    about 1.5x slower for the life of the process (ResNet-18 at batch 1: 11.3-12.0 ms instead of
    7.0-8.0 ms on this 2-core host; an OpenMP thread-pool interaction not pinned down further).
    """
    frames = torch.zeros((2, *spec.frame_shape), dtype=torch.uint8, device=device)
    x = Preprocess.of(spec, device)(frames)
    try:
        with torch.inference_mode():
            raw = module(x)
            out = logits_of(raw)
            vectors = embed(raw) if embed is not None else None
    except Exception as exc:  # any failure of a user model on a well-formed input stops start-up
        raise ConfigError(f"model: a {tuple(x.shape)} input fails: {exc}") from None
    if out.dim() != 2 or out.shape != (2, len(spec.labels)):
        what = "numbered classes)" if spec.numbered else "labels); check model.labels"
        raise ConfigError(f"model: output shape {tuple(out.shape)} for 2 frames does not match "
                          f"(2, {len(spec.labels)} {what}")
    return 0 if vectors is None else int(vectors.shape[1])


def logits_of(output) -> torch.Tensor:
    """The logits of a model's output (the first element when it returns a tuple)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"model returned {type(output).__name__}, expected a tensor of logits")
    return output
