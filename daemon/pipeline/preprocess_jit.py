"""The fused CPU pass of the preprocessing: uint8 NHWC frames -> normalised float32, one pass.

NOTE [ fused preprocessing ]

What daemon/pipeline/preprocess.py defines, ``fma(x, scale[c], bias[c])`` per value, rounded once,
computed in one pass that writes each float once:

    frames (n, H*W*3) uint8, channels interleaved          out, float32
      NCHW: for each channel c, each pixel p:                out[c, p] = fma(byte 3p+c, scale[c], bias[c])
      NHWC: for each pixel p, each channel c:                out[3p+c] = fma(byte 3p+c, scale[c], bias[c])
      (NCHW a plane at a time: one output stream per loop, and the frame, a quarter of the
       output's bytes, read three times from cache)

compiled by numba (LLVM) for the machine it runs on, with the GIL released. LLVM vectorises the
stride-3 byte loads (interleaved access groups) and the fused multiply-add (``llvm.fma``, one
rounding, as torch's vectorised addcmul), so the pass runs at about the speed of a memory copy of
its output: bench/load/preprocess.py.

Exactness. The output is a function of (channel, byte value) alone: 768 floats. :class:`Fused`
computes them with the compiled fma and with torch's ops (the definition) and uses the fma loop
only when all 768 are equal bit for bit; else (a machine where torch does not use a fused
multiply-add) it uses the same loop reading a 3 x 256 table of torch's own values, exact by
construction and still one pass. Either way the bytes are those of the definition, so the model
digest and the cache keys do not change.

numba is optional: without it (:func:`available` is False) daemon/pipeline/preprocess.py keeps its
torch passes. A kernel compiles at its first call (the first CPU Preprocess of a frame size: at
model load, not in a request's path), about two seconds, once: numba's on-disk cache keeps it for
the next start (``_jit``).
"""
from __future__ import annotations

import threading

import numpy as np

try:
    import numba
    from llvmlite import ir
    from numba.extending import intrinsic
except ImportError:                     # optional: preprocess.py keeps its torch passes
    numba = None

_lock = threading.Lock()
_checked: dict = {}                     # (scale bits, bias bits) -> "fma" or "table"


def available() -> bool:
    """Whether numba imports (the fused pass can run)."""
    return numba is not None


def _jit(fn):
    """Compiled lazily at its first call (only the kernels a process uses), with the GIL released;
    kept in numba's on-disk cache (__pycache__ beside this file, else the user's cache folder) so a
    daemon start costs a load, not a compile (seconds). Without a writable cache location it
    compiles at each start."""
    try:
        return numba.njit(nogil=True, boundscheck=False, cache=True)(fn)
    except RuntimeError:                # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, boundscheck=False)(fn)


if numba is not None:
    @intrinsic
    def _fma32(typingctx, a, b, c):
        """llvm.fma.f32: a * b + c rounded once (a vfmadd where the CPU has one)."""
        sig = numba.types.float32(numba.types.float32, numba.types.float32, numba.types.float32)

        def codegen(context, builder, signature, args):
            f = ir.FloatType()
            fn = builder.module.declare_intrinsic("llvm.fma", [f], ir.FunctionType(f, [f, f, f]))
            return builder.call(fn, args)

        return sig, codegen

    @_jit
    def _nchw_fma(src, out, scale, bias):
        # a plane at a time: one output stream per loop vectorises (three interleaved ones, which
        # LLVM must check against each other, ran 2-3x slower); the frame's bytes stay in cache
        n, hw = src.shape[0], src.shape[1] // 3
        for i in range(n):
            s, o = src[i], out[i]
            for c in range(3):
                sc, bc, base = scale[c], bias[c], c * hw
                for p in range(hw):
                    o[base + p] = _fma32(np.float32(s[3 * p + c]), sc, bc)

    @_jit
    def _nhwc_fma(src, out, scale, bias):
        n, hw = src.shape[0], src.shape[1] // 3
        s0, s1, s2, b0, b1, b2 = scale[0], scale[1], scale[2], bias[0], bias[1], bias[2]
        for i in range(n):
            s, o = src[i], out[i]
            for p in range(hw):
                o[3 * p] = _fma32(np.float32(s[3 * p]), s0, b0)
                o[3 * p + 1] = _fma32(np.float32(s[3 * p + 1]), s1, b1)
                o[3 * p + 2] = _fma32(np.float32(s[3 * p + 2]), s2, b2)

    @_jit
    def _nchw_table(src, out, table, unused):
        n, hw = src.shape[0], src.shape[1] // 3
        for i in range(n):
            s, o = src[i], out[i]
            for c in range(3):
                base = c * hw
                for p in range(hw):
                    o[base + p] = table[256 * c + s[3 * p + c]]

    @_jit
    def _nhwc_table(src, out, table, unused):
        n, hw = src.shape[0], src.shape[1] // 3
        for i in range(n):
            s, o = src[i], out[i]
            for p in range(hw):
                o[3 * p] = table[s[3 * p]]
                o[3 * p + 1] = table[256 + s[3 * p + 1]]
                o[3 * p + 2] = table[512 + s[3 * p + 2]]

    _KERNELS = {"nchw_fma": _nchw_fma, "nhwc_fma": _nhwc_fma, "nchw_table": _nchw_table,
                "nhwc_table": _nhwc_table}


def warm() -> None:
    """Import numba and load (or compile) every kernel, as their first calls would: for
    preprocess.FUSED_LOADER's thread, so a device thread never pays for it."""
    if numba is None:
        raise ImportError("numba is not installed")
    src = np.zeros((1, 3), dtype=np.uint8)
    out = np.empty((1, 3), dtype=np.float32)
    ones, table = np.ones(3, dtype=np.float32), np.zeros(768, dtype=np.float32)
    for name, kernel in _KERNELS.items():
        kernel(src, out, *((ones, ones) if name.endswith("fma") else (table, ones)))


def reference_table(scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The 768 values of the definition, by torch's ops: ``addcmul(bias, x, scale)`` for every
    byte value x of each channel, as float32 (3 * 256,), channel-major."""
    import torch

    x = torch.arange(256, dtype=torch.float32).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    s = torch.from_numpy(scale).view(1, 3, 1, 1)         # as the definition broadcasts them
    b = torch.from_numpy(bias).view(1, 3, 1, 1)
    return torch.addcmul(b, x, s).contiguous().reshape(-1).numpy().copy()


class Fused:
    """One fused pass for given per-channel ``scale`` and ``bias`` (float32, 3 each): call with
    the frames as a (n, H*W*3) C-contiguous uint8 array and the output as a (n, H*W*3) C-contiguous
    float32 array (NCHW planes or NHWC, by ``channels_last``). ``arithmetic`` is "fma" or "table"
    (NOTE [ fused preprocessing ]), checked here; tests force one with ``arithmetic``."""

    def __init__(self, scale, bias, channels_last: bool, arithmetic: str | None = None):
        self.scale = np.ascontiguousarray(scale, dtype=np.float32).reshape(3)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32).reshape(3)
        k = _KERNELS
        key = (self.scale.tobytes(), self.bias.tobytes())
        table = reference_table(self.scale, self.bias)
        if arithmetic is None:
            with _lock:
                arithmetic = _checked.get(key)
        if arithmetic is None:
            got = np.empty((1, 768), dtype=np.float32)
            every = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(1, 768)  # pixel v = (v, v, v)
            k["nhwc_fma"](every, got, self.scale, self.bias)
            fma_values = got.reshape(256, 3).T.reshape(-1)
            arithmetic = "fma" if np.array_equal(fma_values.view(np.int32), table.view(np.int32)) else "table"
            with _lock:
                _checked[key] = arithmetic
        self.arithmetic = arithmetic
        layout = "nhwc" if channels_last else "nchw"
        if arithmetic == "fma":
            self._kernel, self._a, self._b = k[f"{layout}_fma"], self.scale, self.bias
        else:
            self._kernel, self._a, self._b = k[f"{layout}_table"], table, self.scale

    def __call__(self, src: np.ndarray, out: np.ndarray) -> None:
        self._kernel(src, out, self._a, self._b)
