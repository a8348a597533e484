"""How an Engine runs its model: precision, memory format, and CUDA graphs or torch.compile.

``EngineOptions`` is read from the ``model.precision``, ``model.channels_last`` and ``model.compile``
keys (daemon/config.py) and checked against the device at load. With ``graphs`` or ``compile`` a
batch of n frames runs at the smallest prepared size >= n (``batch_sizes``: powers of two up to
max_batch, and max_batch), its extra rows padding; every size is prepared on the first launch, which
is a warm-up batch before READY, so no request pays for a capture or a compilation. Padding is
harmless: a model in eval() mode computes each row on its own.

When they pay (docs/operations.md, "GPU"):
- ``graphs``: replaying a captured CUDA graph removes the per-kernel launch cost of Python and the
  CUDA driver: a big share of small batches and small models (ResNet-18 at batch 1-16), little of a
  ResNet-50 at batch 64+, where the kernels themselves are long. Costs memory for each size.
- ``compile``: torch.compile (inductor) fuses the preprocessing, normalisation and activations;
  worth it for a long-running service, at the price of minutes of compilation at start-up (one per
  prepared size). Works on CPU too.
- ``freeze`` (CPU, fp32): a copy of the model with its weights in channels_last, traced once on
  one blank frame and frozen (``torch.jit.freeze``: weights become constants, batch norm is folded
  into the convolutions, and oneDNN runs the channels_last convolutions without reordering any
  tensor), then run at any batch size, with no padding. On this project's 2-core development VM it
  ran ResNet-18 at 64x64 1.6-1.8x faster than eager at batch 1 and 1.15-1.35x at batches of 4 to
  16, within 2e-6 of its outputs, with the input in either memory format (``python -m
  bench.load.prepared``); at 224x224, ResNet-50 1.5-1.9x and ResNet-18 1.55-1.7x at batches of 1
  to 16. ``torch.jit.optimize_for_inference`` on top was tried and is not used: its conversions
  to and from oneDNN's own layout cost as much as they save, 1.6x slower at batch 1 at 64x64 and
  no faster above but at ResNet-50's batch of 4 (docs/benchmarks.md, "The frozen form in
  channels_last"); torch.compile was slower than eager there. A trace records the ops of
  one pass, so a model whose forward branches on its input or does other work in Python must not
  use it. TorchScript takes no forward hooks, so the embedding layer's output is traced as a second
  output of the pass (``frozen``).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from ..config import COMPILE_MODES, PER_SIZE_MODES, PRECISIONS, ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EngineOptions:
    precision: str = "fp32"
    channels_last: bool = False
    compile: str = "none"

    @classmethod
    def of(cls, model_cfg) -> "EngineOptions":
        """The options a ModelConfig names (defaults where it predates them)."""
        return cls(getattr(model_cfg, "precision", "fp32"), getattr(model_cfg, "channels_last", False),
                   getattr(model_cfg, "compile", "none"))

    def check(self, device: torch.device) -> None:
        """ConfigError naming the key when ``device`` cannot run these options."""
        if self.precision not in PRECISIONS:
            raise ConfigError(f"model.precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"model.compile: {self.compile!r} is not one of {', '.join(COMPILE_MODES)}")
        if device.type != "cuda" and self.precision == "fp16":
            raise ConfigError(f"model.precision: fp16 needs a CUDA device ({device} has no fast fp16); "
                              f"use bf16 or fp32")
        if device.type == "cuda" and self.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"model.precision: {device} ({torch.cuda.get_device_name(device)}) has no "
                              f"bf16; use fp16 or fp32")
        if device.type != "cuda" and self.compile == "graphs":
            raise ConfigError(f"model.compile: graphs are CUDA graphs and {device} is no CUDA device; "
                              f"use none, compile or freeze")
        if self.compile == "freeze" and (device.type != "cpu" or self.precision != "fp32"):
            raise ConfigError(f"model.compile: freeze is for CPU devices at fp32 precision, not {device} "
                              f"at {self.precision}; use none, graphs or compile")

    @property
    def padded(self) -> bool:
        """Batches run at prepared sizes (padded up)."""
        return self.compile in PER_SIZE_MODES

    def autocast(self, device: torch.device):
        """The autocast context of the forward pass (none for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        # no cast cache: a CUDA graph must not capture casts cached outside it, and one forward
        # pass uses each weight once, so the cache saves nothing
        return torch.autocast(device_type=device.type, dtype=_DTYPES[self.precision], cache_enabled=False)

    @property
    def digest_tag(self) -> str:
        """Added to the model digest: answers computed at another precision are other answers, so
        the result cache and the embedding store must not mix them. fp32 adds nothing."""
        return "" if self.precision == "fp32" else f"+{self.precision}"


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The sizes prepared for padded batches: 1, 2, 4, ... below ``max_batch``, and ``max_batch``."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def size_for(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest of ``sizes`` (ascending) that holds ``n`` rows."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"a batch of {n} is above the largest prepared size {sizes[-1]}")


def compiled(module):
    """``module`` through torch.compile with static shapes; room in dynamo's cache for one
    graph per prepared size."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(module, dynamic=False)


class CudaGraphs:
    """One captured CUDA graph per prepared size: ``forward(static_input)`` recorded once, replayed
    per batch on the current (compute) stream. The graphs share one memory pool; the largest is
    captured first so the smaller ones fit in its blocks."""

    def __init__(self, forward):
        self._forward = forward
        self.sizes: tuple[int, ...] = ()
        self.inputs: dict[int, torch.Tensor] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, object] = {}

    @property
    def ready(self) -> bool:
        return bool(self.sizes)

    def capture(self, sizes: tuple[int, ...], frame_shape: tuple, device: torch.device) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)
        with torch.cuda.device(device):
            for size in sorted(sizes, reverse=True):
                static = torch.zeros((size, *frame_shape), dtype=torch.uint8, device=device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side), torch.inference_mode():   # kernels chosen first
                    for _ in range(2):
                        self._forward(static)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: another device's executor may be loading at the same time
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"), \
                        torch.inference_mode():
                    self._outputs[size] = self._forward(static)
                self.inputs[size], self._graphs[size] = static, graph
            side.synchronize()
        self.sizes = tuple(sorted(sizes))

    def replay(self, size: int):
        """Run the graph of ``size`` on the current stream; its (static) outputs."""
        self._graphs[size].replay()
        return self._outputs[size]


def frozen(module, example: torch.Tensor, layer: str = ""):
    """``module`` for ``model.compile = "freeze"``: a copy in channels_last, traced on ``example`` (a
    preprocessed batch, in either memory format) and frozen. With ``layer`` (the embedding layer, a
    submodule), the pass returns (its output, that layer's output): the tuple the engine reads an
    embedding from, since a TorchScript module takes no hook. A TorchScript module is frozen as it
    is (its own forward returns what it returns). ``module`` itself is left as it was: CPU devices
    share it."""
    if isinstance(module, torch.jit.ScriptModule) and layer:
        raise ConfigError(f"model.embedding_layer: {layer!r} is in a TorchScript module, which takes "
                          f"no forward hooks; return (logits, embedding) from forward instead")
    module = copy.deepcopy(module).to(memory_format=torch.channels_last).eval()   # this call's own
    if isinstance(module, torch.jit.ScriptModule):
        with torch.inference_mode():
            return torch.jit.freeze(module)
    seen: list = []

    class WithLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = module

        def forward(self, x):
            seen.clear()
            out = self.model(x)
            return out, seen[-1]

    if layer:                               # on the copy, which the trace records without it
        dict(module.named_modules())[layer].register_forward_hook(lambda _m, _i, output: seen.append(output))
    with torch.inference_mode():
        return torch.jit.freeze(torch.jit.trace(WithLayer().eval() if layer else module, example, check_trace=False))
