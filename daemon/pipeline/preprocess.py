"""The one definition of how a uint8 frame becomes a model input.

Clients always send uint8 RGB frames, NHWC (height x width x 3, 0..255). The model's input form
(``model.input``, :data:`INPUT_FORMS`) says what the model is given:

    float_nchw   float32 NCHW, ``(x / 255 - mean) / std`` per channel: the daemon normalises
                 (the built-in models, and file models trained on such tensors)
    uint8_nhwc   the frames as they are, uint8 NHWC: the model normalises inside, as most
                 exported production models do (no mean/std in the daemon)

The daemon's executor threads (through :class:`Preprocess`), the training script of the built-in
model and the exactness tests (through :func:`to_input`) compute the same thing, so "the same
preprocessed tensor" means the same bytes everywhere.

NOTE [ preprocessing on a CPU ]

Every float is ``fma(x, scale[c], bias[c])``, rounded once, with ``scale = 1 / (255 std)`` and
``bias = -mean / std`` made once per Preprocess: what torch's ``addcmul(bias, x, scale)`` computes
on the machine it runs on, and what this computed as three whole-batch ops (permute +
``to(float32)``, ``addcmul`` with per-channel (1, 3, 1, 1) factors, ``contiguous``). The model
digest and the cache keys (daemon/models/loading.py ``preprocess_id``) name that arithmetic, so
only how it runs may change, never a bit of what it gives: tests/unit/test_preprocess.py checks
every byte value of every channel, and random batches, against those three ops.

On a CPU those three ops cost 5-30x a memory copy of their float output: a conversion that read
with a stride of 3 bytes, an ``addcmul`` whose two broadcast factors kept torch on its scalar
loop, a transposing float copy, and two new tensors a batch (at 224x224, 0.6 MB a frame, page
faults on every call). Now, into one output buffer (kept between calls with ``reuse``: the
executor's Engine, and each measuring thread of daemon/pipeline/cpu_layout.py), one fused pass
where numba is installed (daemon/pipeline/preprocess_jit.py, NOTE [ fused preprocessing ]): each
float written once, the multiply-add vectorised; within 1.3x of a memory copy of the output at
224x224 (docs/benchmarks.md, "Preprocessing on a CPU"). Without
numba (``fused=False``), the torch passes:

    frames (uint8 NHWC) --np.copyto of the transposed view--> uint8 NCHW planes
                          (the one strided pass, a byte an element; numpy releases the GIL)
        --torch copy_--> float32 NCHW, the output    (contiguous: a vectorised conversion)
        --addcmul(bias plane, out, scale, out=out)   (in place; the bias as a full (3, H*W) plane
                                                      so that one operand alone is broadcast and
                                                      torch takes its vectorised fused
                                                      multiply-add, the same single rounding)

With ``channels_last`` the output is NHWC in memory, as the frames are: one contiguous
conversion, then the same ``addcmul`` with both factors laid out as one (W*3) row of alternating
channels. The uint8 transpose there is a scalar loop, about a cycle a byte, so the torch passes
cost 1.5-6x a copy. Frames on a GPU keep the three ops: kernels over device memory, not where a
GPU's time goes.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from typing import NamedTuple

import numpy as np
import torch

from ..config import INPUT_FORMS

log = logging.getLogger("inferd.preprocess")

FLOAT_NCHW, UINT8_NHWC = INPUT_FORMS
#: Whether the fused CPU pass can run (numba installed; daemon/pipeline/preprocess_jit.py).
NUMBA = importlib.util.find_spec("numba") is not None
#: ``Preprocess(fused=BACKGROUND)``, a daemon's default: the torch passes until the fused pass is loaded.
BACKGROUND = "background"


class _FusedLoader:
    """numba's import and the load of its kernels from the on-disk cache take about a second, a
    compile several: a daemon does it on a thread of its own, once a process, and preprocesses with
    the torch passes until then. Both give the same bits (NOTE [ fused preprocessing ]), so start-up
    never waits on the faster pass and no answer depends on when it arrived."""

    def __init__(self):
        self._lock = threading.Lock()
        self._started = False
        self.ready = threading.Event()          # set once the kernels are loaded
        self.failed: str = ""                   # why they will not be (the torch passes stay)

    def state(self) -> str:
        """"idle" (never asked for), "loading", "ready", or "failed: why" (admin stats)."""
        if self.ready.is_set():
            return "ready"
        if self.failed:
            return f"failed: {self.failed}"
        return "loading" if self._started else "idle"

    def ready_now(self) -> bool:
        """Whether the fused pass can be made now; starts loading it the first time it is not."""
        if self.ready.is_set():
            return True
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._load, name="inferd-jit-load", daemon=True).start()
        return False

    def _load(self) -> None:
        try:
            from .preprocess_jit import warm
            warm()
        except Exception as exc:               # noqa: BLE001 - any failure leaves the torch passes
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("fused CPU preprocessing unavailable, the torch passes stay: %s", self.failed)
            return
        self.ready.set()


FUSED_LOADER = _FusedLoader()


class Preprocess:
    """uint8 NHWC (RGB, 0..255) -> the model's input form.

    ``float_nchw`` (the default): float32 NCHW, ``(x / 255 - mean) / std`` per channel, computed
    as one multiply-add, ``x * (1 / (255 std)) + (-mean / std)``, with both factors made once
    here (NOTE [ preprocessing on a CPU ]). ``uint8_nhwc``: the frames themselves (no copy; mean
    and std are ignored, and so is ``channels_last``: the frames are NHWC already).

    ``reuse``: every call on CPU frames writes into one buffer kept for the next call (grown to
    the largest batch, and returns a view of its first rows), so each result is valid only until
    the next call and a reusing Preprocess belongs to one thread: the executor's, whose model has
    finished with a batch's input before the next batch is made. Without it each call returns a
    new tensor.
    """

    def __init__(self, mean, std, device: torch.device | str = "cpu", channels_last: bool = False,
                 form: str = FLOAT_NCHW, reuse: bool = False, fused: bool | None = None):
        if form not in INPUT_FORMS:
            raise ValueError(f"input form {form!r} is not one of {', '.join(INPUT_FORMS)}")
        self.form = form
        self.reuse = reuse
        self.scale = self.bias = None
        if form == FLOAT_NCHW:
            mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device)
            std_t = torch.as_tensor(std, dtype=torch.float32, device=device)
            self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1)
            self.bias = (-mean_t / std_t).view(1, 3, 1, 1)
        # channels_last: NHWC in memory, as the frames arrive, so the permute below costs no copy
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._cpu: _CpuPass | None = None      # the CPU pass of the last frame size (its buffers)
        # the fused pass (NOTE [ fused preprocessing ]) where numba is installed, loaded in the
        # background (FUSED_LOADER); True: loaded at the first call; False: the torch passes
        self.fused = (BACKGROUND if NUMBA else False) if fused is None else fused

    @classmethod
    def of(cls, spec, device: torch.device | str = "cpu", channels_last: bool = False,
           reuse: bool = False) -> "Preprocess":
        """The preprocessing of a model spec (inferd.daemon.models.loading.ModelSpec)."""
        return cls(spec.mean, spec.std, device, channels_last, spec.input_form, reuse)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames`` on the same device as this Preprocess. ``float_nchw``: a float32 tensor
        contiguous in this Preprocess's memory format (NCHW, or NHWC in memory with
        ``channels_last``): new, or this Preprocess's buffer with ``reuse``; ``uint8_nhwc``:
        returns ``frames`` itself."""
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[3] != 3:
            raise ValueError(f"expected uint8 NHWC frames with 3 channels, got {frames.dtype} {tuple(frames.shape)}")
        if self.scale is None:
            return frames
        if frames.device.type != "cpu":
            x = frames.permute(0, 3, 1, 2).to(torch.float32)
            return torch.addcmul(self.bias, x, self.scale).contiguous(memory_format=self.memory_format)
        n, h, w, _ = frames.shape
        cpu = self._cpu
        if cpu is None or (cpu.h, cpu.w) != (h, w):
            cpu = self._cpu = _CpuPass(self.scale, self.bias, h, w, self.channels_last, self.fused)
        return cpu(frames, self.reuse)


class _CpuPass:
    """The CPU passes of NOTE [ preprocessing on a CPU ] for frames of ``h`` x ``w``: the
    factors laid out for a vectorised ``addcmul``, and with ``reuse`` the buffers of the largest
    batch so far and their views per batch size (a torch view costs microseconds to make, about
    what a 64x64 frame's whole conversion costs)."""

    def __init__(self, scale: torch.Tensor, bias: torch.Tensor, h: int, w: int, channels_last: bool,
                 fused: bool | str = False):
        self.h, self.w, self.channels_last = h, w, channels_last
        self.fused = None
        self._waiting = None                # the fused pass's arguments while FUSED_LOADER loads it
        if fused == BACKGROUND and not FUSED_LOADER.ready_now():
            self._waiting = (scale.numpy(), bias.numpy(), channels_last)
        elif fused:                         # imported here: numba costs a second to load
            from .preprocess_jit import Fused
            self.fused = Fused(scale.numpy(), bias.numpy(), channels_last)
        if channels_last:                   # one (W*3) row, channels alternating as in the frame
            self.scale = scale.view(1, 3).repeat(w, 1).view(1, w * 3).contiguous()
            self.bias = bias.view(1, 3).repeat(w, 1).view(1, w * 3).contiguous()
        else:                               # (3, 1) scalars per channel, and a full bias plane
            self.scale = scale.view(3, 1).contiguous()
            self.bias = bias.view(3, 1).expand(3, h * w).contiguous()
        self._rows = 0                      # rows of the kept buffers (reuse)
        self._out: torch.Tensor | None = None
        self._planes: torch.Tensor | None = None
        self._views: dict[int, _Views] = {}

    def __call__(self, frames: torch.Tensor, reuse: bool) -> torch.Tensor:
        if self._waiting is not None and FUSED_LOADER.ready.is_set():
            from .preprocess_jit import Fused
            self.fused, self._waiting = Fused(*self._waiting), None
            self._rows, self._out, self._planes, self._views = 0, None, None, {}   # its own layout
        n = frames.shape[0]
        views = self._views.get(n) if reuse else None
        if views is None:
            views = self._make(n, reuse)
        if self.fused is not None:                  # one pass, GIL released
            self.fused(frames.contiguous().numpy().reshape(n, -1), views.flat)
            return views.out
        if views.planes is None:                    # channels_last: out is NHWC in memory
            views.convert.copy_(frames)
        else:
            np.copyto(views.planes, frames.numpy().transpose(0, 3, 1, 2))
            views.convert.copy_(views.source)
        torch.addcmul(self.bias, views.rows, self.scale, out=views.rows)
        return views.out

    def _make(self, n: int, reuse: bool) -> "_Views":
        """The views of a batch of ``n``: into the kept buffers with ``reuse`` (made again, and
        every view with them, where they are shorter), else into new ones."""
        if not reuse:
            out, planes = self._new(n)
        else:
            if n > self._rows:
                self._out, self._planes = self._new(n)
                self._rows, self._views = n, {}
            out, planes = self._out[:n], None if self._planes is None else self._planes[:n]
        h, w = self.h, self.w
        nhwc = out.permute(0, 2, 3, 1)              # contiguous NHWC with channels_last
        if self.fused is not None:
            views = _Views(out, None, None, None, None, (nhwc if self.channels_last else out).reshape(n, -1).numpy())
        elif planes is None:
            views = _Views(out, nhwc, None, None, nhwc.view(n * h, w * 3), None)
        else:
            views = _Views(out, out, planes.numpy(), planes, out.view(n, 3, h * w), None)
        if reuse:
            self._views[n] = views
        return views

    def _new(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A float32 output of ``n`` rows in this pass's memory format, and the uint8 NCHW planes
        (None with channels_last: the conversion reads the frames themselves)."""
        shape = (n, 3, self.h, self.w)
        if self.channels_last:
            return torch.empty(shape, dtype=torch.float32, memory_format=torch.channels_last), None
        if self.fused is not None:                  # no uint8 planes: the fused pass reads the frames
            return torch.empty(shape, dtype=torch.float32), None
        return torch.empty(shape, dtype=torch.float32), torch.empty(shape, dtype=torch.uint8)


class _Views(NamedTuple):
    """What one call writes: ``out`` (returned); ``convert``, the float view the uint8 values
    are converted into, from the frames (channels_last) or from ``source``, the uint8 NCHW
    ``planes`` (numpy) the frames are transposed into; ``rows``, ``out`` as the addcmul sees it."""

    out: torch.Tensor
    convert: torch.Tensor
    planes: np.ndarray | None
    source: torch.Tensor | None
    rows: torch.Tensor
    flat: np.ndarray | None                  # the fused pass: out as (n, H*W*3) numpy, what it writes


def to_input(frames: torch.Tensor, mean, std, form: str = FLOAT_NCHW) -> torch.Tensor:
    """:class:`Preprocess` in one call (mean and std: 3 floats or tensors of shape (3,))."""
    return Preprocess(mean, std, frames.device, form=form)(frames)
