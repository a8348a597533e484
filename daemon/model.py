"""Loading the served model: a built-in one from inferd.daemon.zoo, or a file named in the configuration.

Files load only from ``model.path`` in the daemon's configuration (clients never name a file):
``torchscript`` files through ``torch.jit.load``, ``export`` files (``torch.export.save`` output,
usually ``.pt2``) through ``torch.export.load``. ``auto`` picks by suffix: ``.pt2`` is export,
anything else TorchScript.

Output convention: ``forward(x)`` takes float32 NCHW (see :mod:`inferd.daemon.preprocess`) and returns
logits of shape (N, number of labels), or a tuple whose first element is those logits (the second,
where present, is an embedding, kept for near-duplicate search). The spec and the output width are checked once
at load time, so a labels file that does not match the model stops start-up, not a request.
"""
from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from inferd.daemon import zoo
from inferd.daemon.config import ConfigError, ModelConfig
from inferd.daemon.modes import EngineOptions
from inferd.daemon.preprocess import to_input

log = logging.getLogger("inferd.model")


@dataclass(frozen=True)
class ModelSpec:
    """What a client must know to send frames, and what the batching threads need to prepare them."""

    name: str
    input_height: int
    input_width: int
    mean: tuple
    std: tuple
    labels: tuple
    top_k: int
    embedding_layer: str = ""     # submodule whose output is the embedding; "" for none

    @property
    def preprocess_id(self) -> str:
        """Everything that decides the model input besides the frame bytes: part of the cache key."""
        return (f"rgb-u8 {self.input_height}x{self.input_width} mean={list(self.mean)} "
                f"std={list(self.std)} inferd-preprocess-1")

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
        self.gen = 1                 # model generation: 1 at start, +1 per reload (daemon/reload.py)
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
        """The model part of the hello reply."""
        s = self.spec
        return {"name": s.name, "digest": self.digest, "input": list(s.frame_shape),
                "dtype": "uint8", "labels": list(s.labels), "top_k": s.top_k, "gen": self.gen}


# Where the built-ins keep a per-image feature vector (their last layer before the classifier).
_BUILTIN_EMBEDDING = {"shapes": "features", "resnet18": "avgpool", "resnet50": "avgpool"}


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


def _read_labels(path: str) -> tuple:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"model.labels: cannot read {path}: {exc.strerror}") from None
    labels = tuple(line.strip() for line in lines if line.strip())
    if not labels:
        raise ConfigError(f"model.labels: {path} has no labels")
    return labels


def _load_file(cfg: ModelConfig):
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError(f"model.path: {path} is not a file")
    fmt = cfg.format if cfg.format != "auto" else ("export" if path.suffix == ".pt2" else "torchscript")
    try:
        if fmt == "export":
            module = torch.export.load(str(path)).module()
        else:
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises many types for a bad file; all mean "cannot load this"
        raise ConfigError(f"model.path: cannot load {path} as {fmt}: {exc}") from None
    if fmt == "torchscript":
        module.eval()          # an exported program is traced in eval mode and refuses eval()
    return module, _file_digest(path)


def load(cfg: ModelConfig) -> LoadedModel:
    """Load the configured model on the CPU and check its spec. Raises ConfigError with the key at
    fault. Runs no forward pass: see :func:`check_output`."""
    if cfg.path:
        module, digest = _load_file(cfg)
        name = Path(cfg.path).stem
        labels = _read_labels(cfg.labels)
        mean, std = cfg.mean or (0.485, 0.456, 0.406), cfg.std or (0.229, 0.224, 0.225)
        height, width, source = cfg.input_height, cfg.input_width, Path(cfg.path)
    else:
        if cfg.builtin not in zoo.BUILTIN_NAMES:
            raise ConfigError(f"model.builtin: {cfg.builtin!r} is not one of {', '.join(zoo.BUILTIN_NAMES)}")
        if cfg.input_height != cfg.input_width:
            raise ConfigError("model.input_height / input_width: built-in models take square inputs")
        module, bspec = zoo.build(cfg.builtin, input_size=cfg.input_height or None)
        digest = _state_digest(module)
        name, source = bspec.name, None
        labels = _read_labels(cfg.labels) if cfg.labels else bspec.labels
        mean, std = cfg.mean or bspec.mean, cfg.std or bspec.std
        height, width = bspec.input_height, bspec.input_width
    embedding_layer = cfg.embedding_layer or ("" if cfg.path else _BUILTIN_EMBEDDING.get(cfg.builtin, ""))
    if embedding_layer and embedding_layer not in dict(module.named_modules()):
        raise ConfigError(f"model.embedding_layer: the model has no submodule {embedding_layer!r}")
    if cfg.top_k > len(labels):
        raise ConfigError(f"model.top_k: {cfg.top_k} is more than the model's {len(labels)} labels")
    spec = ModelSpec(name, height, width, tuple(map(float, mean)), tuple(map(float, std)), labels,
                     cfg.top_k, embedding_layer)
    options = EngineOptions.of(cfg)         # how each device runs it (daemon/modes.py)
    model = LoadedModel(module, spec, digest + options.digest_tag, source)
    model.options = options
    log.info("model %s loaded: input %dx%d, %d labels, digest %s", name, height, width, len(labels), digest)
    return model


def check_output(spec: ModelSpec, module, device: torch.device = torch.device("cpu"),
                 embed=None) -> int:
    """Run two blank frames through ``module`` on ``device``; ConfigError unless the output is
    (2, number of labels). Returns the embedding width (0 without one); ``embed(output)`` extracts
    the embedding (see inferd.daemon.batcher).

    Called by each batching thread before its warm-up, never on the main thread: a forward pass
    there, at torch's default thread count, left every later pass in a 2-thread batching thread
    about 1.5x slower for the life of the process (ResNet-18 at batch 1: 11.3-12.0 ms instead of
    7.0-8.0 ms on this 2-core host; an OpenMP thread-pool interaction not pinned down further).
    """
    frames = torch.zeros((2, *spec.frame_shape), dtype=torch.uint8, device=device)
    x = to_input(frames, spec.mean, spec.std)
    try:
        with torch.inference_mode():
            raw = module(x)
            out = logits_of(raw)
            vectors = embed(raw) if embed is not None else None
    except Exception as exc:  # any failure of a user model on a well-formed input stops start-up
        raise ConfigError(f"model: a {tuple(x.shape)} input fails: {exc}") from None
    if out.dim() != 2 or out.shape != (2, len(spec.labels)):
        raise ConfigError(f"model: output shape {tuple(out.shape)} for 2 frames does not match "
                          f"(2, {len(spec.labels)} labels); check model.labels")
    return 0 if vectors is None else int(vectors.shape[1])


def logits_of(output) -> torch.Tensor:
    """The logits of a model's output (the first element when it returns a tuple)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"model returned {type(output).__name__}, expected a tensor of logits")
    return output
