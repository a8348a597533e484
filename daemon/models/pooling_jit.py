"""The grid (+ thumbnail) embedding of a CPU batch in one compiled pass (NOTE [ fused pooling ]).

NOTE [ fused pooling ]

daemon/models/embedding_pooling.py defines the embedding as about twenty torch ops (adaptive
average pools, centring, three normalisations, a concatenation). On a CPU device each op is a
dispatch and a pass of its own over the layer's output, and at the small batches of a CPU host
that was 0.2-0.3 ms a frame of a ~2.5 ms forward pass of the built-in model (features.0: 16 x
64 x 64 floats a frame; docs/benchmarks.md, "Near-duplicate index"): most of what storing
embeddings cost the device thread. Here the same arithmetic runs as one numba kernel per batch,
with the GIL released:

    per frame i:
      cells[c, gy, gx] = mean of features[i, c, rows of gy, columns of gx]   (adaptive bins:
                          floor(k * H / G) .. ceil((k + 1) * H / G), as torch's)
      grid  = cells - mean over (gy, gx) of cells[c], then / max(norm, 1e-12)
      thumb = mean of frames[i, rows, columns, ch] over T x T cells, minus its overall mean,
              / max(norm, 1e-12), in (ch, ty, tx) order
      out[i] = [grid, thumb, BLANK] / its norm

Sums are float32 as torch's are (reassociated for vector instructions: the result differs from
the torch ops' in the last bits, ~1e-7; tests/unit/test_pooling_jit.py checks 1e-5), so a vector
stored by either matches the other's at any threshold. Used only for what it covers (CPU,
float32 C-contiguous (N, C, H, W) features, grid pooling, uint8 NHWC frames); anything else,
and a process without numba, takes the torch ops. It compiles at the first CPU batch (the load's
check of the model, not a request) and numba's on-disk cache keeps it.
"""
from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:                     # optional: embedding_pooling.py keeps its torch ops
    numba = None


def available() -> bool:
    """Whether numba imports (the fused pass can run)."""
    return numba is not None


def _jit(fn):
    flags = dict(nogil=True, boundscheck=False, fastmath={"reassoc", "contract", "nsz"})
    try:
        return numba.njit(cache=True, **flags)(fn)
    except RuntimeError:                # "cannot cache function ...: no locator available"
        return numba.njit(**flags)(fn)


if numba is not None:
    @_jit
    def _embed(features, frames, grid, thumb, blank, out):
        n, c, h, w = features.shape
        gsize = c * grid * grid
        acc = np.empty(w, np.float32)
        for i in range(n):
            o = out[i]
            f = features[i]
            for ch in range(c):
                plane = f[ch]
                total = np.float32(0.0)
                for gy in range(grid):
                    y0, y1 = (gy * h) // grid, -((-(gy + 1) * h) // grid)
                    for x in range(w):          # the bin's rows summed column-wise: elementwise
                        acc[x] = plane[y0, x]   # adds over contiguous rows, which vectorise
                    for y in range(y0 + 1, y1):
                        for x in range(w):
                            acc[x] += plane[y, x]
                    for gx in range(grid):
                        x0, x1 = (gx * w) // grid, -((-(gx + 1) * w) // grid)
                        s = np.float32(0.0)
                        for x in range(x0, x1):
                            s += acc[x]
                        s /= np.float32((y1 - y0) * (x1 - x0))
                        o[ch * grid * grid + gy * grid + gx] = s
                        total += s
                mean = total / np.float32(grid * grid)
                for k in range(ch * grid * grid, (ch + 1) * grid * grid):
                    o[k] -= mean
            _unit(o, 0, gsize)
            at = gsize
            if thumb:
                fh, fw = frames.shape[1], frames.shape[2]
                img = frames[i]
                total = np.float32(0.0)
                for ty in range(thumb):
                    y0, y1 = (ty * fh) // thumb, -((-(ty + 1) * fh) // thumb)
                    for tx in range(thumb):
                        x0, x1 = (tx * fw) // thumb, -((-(tx + 1) * fw) // thumb)
                        s0 = s1 = s2 = np.int64(0)
                        for y in range(y0, y1):
                            for x in range(x0, x1):
                                s0 += img[y, x, 0]
                                s1 += img[y, x, 1]
                                s2 += img[y, x, 2]
                        area = np.float32((y1 - y0) * (x1 - x0))
                        k = ty * thumb + tx
                        o[at + k] = np.float32(s0) / area
                        o[at + thumb * thumb + k] = np.float32(s1) / area
                        o[at + 2 * thumb * thumb + k] = np.float32(s2) / area
                        total += o[at + k] + o[at + thumb * thumb + k] + o[at + 2 * thumb * thumb + k]
                mean = total / np.float32(3 * thumb * thumb)
                for k in range(at, at + 3 * thumb * thumb):
                    o[k] -= mean
                _unit(o, at, at + 3 * thumb * thumb)
                at += 3 * thumb * thumb
            o[at] = blank
            _unit(o, 0, at + 1)

    @_jit
    def _unit(o, a, b):
        s = np.float32(0.0)
        for k in range(a, b):
            s += o[k] * o[k]
        norm = max(np.float32(np.sqrt(s)), np.float32(1e-12))
        for k in range(a, b):
            o[k] /= norm


def covers(features, frames, grid: int, thumb: int) -> bool:
    """Whether the fused pass computes this batch (else the torch ops do)."""
    return (numba is not None and grid > 0 and features.device.type == "cpu" and features.dim() == 4
            and features.dtype.is_floating_point and features.element_size() == 4 and features.is_contiguous()
            and (not thumb or (frames is not None and frames.device.type == "cpu" and frames.dim() == 4
                               and frames.shape[3] == 3 and frames.element_size() == 1 and frames.is_contiguous())))


def embed(features, frames, grid: int, thumb: int, blank: float):
    """The embedding rows (float32, (N, width)) of a batch :func:`covers` accepts."""
    import torch

    n, c = features.shape[0], features.shape[1]
    out = np.empty((n, c * grid * grid + (3 * thumb * thumb + 1 if thumb else 1)), np.float32)
    pixels = frames[:n].numpy() if thumb else np.zeros((n, 1, 1, 3), np.uint8)
    _embed(features.numpy(), pixels, grid, thumb, np.float32(blank), out)
    return torch.from_numpy(out)
