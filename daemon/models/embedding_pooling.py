"""How a forward pass becomes the embedding kept for near-duplicate search (``model.embedding_pool``).

NOTE [ near-duplicate embeddings ]

A near-duplicate is the same picture changed on its way: resized, re-encoded (JPEG), slightly
cropped, made brighter or darker. A classifier's last pooled features are the wrong tool for it:
they are trained to ignore position, size and colour, so every star looks like every other star
(cosine 0.95 between two different stars of the built-in model) and a changed copy is no closer
to its original than its classmates are. What tells copies apart is *where* things are and what
colour they are, which early layers still know. So the embedding is built from

    the hooked layer's output (N, C, H, W)
      grid:G   average over G x G cells (adaptive), each channel minus its mean over the cells,
               flattened, unit length                      [layout of the layer's features]
      mean     average over H, W, unit length              [what the classifier sees]
    + thumbnail:T (optional)
               the uint8 frame averaged over T x T cells (RGB), minus the thumbnail's overall
               mean, unit length                           [coarse layout and colour]
    parts concatenated (+ one tiny constant), unit length

Why these steps. Averaging over a few cells tolerates the shifts of a slight crop and the pixel
noise of resizing and JPEG, yet keeps layout. Centring removes what every image has in common
(the features are ReLU outputs, all positive, so raw cosines crowd near 1 and a threshold cannot
separate anything); with the unit length it also makes both parts indifferent to brightness: a
brighter copy scales the centred values, and the scale is divided out. The thumbnail is centred by
one scalar over all channels, so it keeps hue (red on blue stays unlike blue on red). Each part has
unit length before they are joined, so each weighs the same in the cosine (the cosine of the whole
is the mean of the parts' cosines). The constant (1e-3) keeps a featureless frame (one flat
colour, whose centred parts are all zero) a unit vector instead of zero: all such frames embed
alike.

The built-in ``shapes`` model uses its first conv block, ``grid:4+thumbnail:4`` (daemon/models/zoo/shapes.py;
the figures behind it are in docs/benchmarks.md, "Near-duplicates"). A file model chooses its
layer with ``model.embedding_layer`` (an early or middle convolution block) and this pooling with
``model.embedding_pool``. ``mean`` alone is exactly what inferd did before this option existed.

The pooling runs on the device, inside the forward pass (daemon/pipeline/engine.py ``embedding_of``), so
only the pooled rows are copied back, and a CUDA graph captures it with the model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.nn import functional as F

pooling_jit = None          # daemon/models/pooling_jit.py, once a pool has run (Pool.__call__)
MEAN = "mean"
MAX_CELLS = 16              # grid and thumbnail sides: 16 x 16 x C floats is plenty for layout
BLANK = 1e-3                # the constant column of grid / thumbnail embeddings (see the NOTE)
_TERM = re.compile(r"^(mean|grid:(\d+)|thumbnail:(\d+))$")


@dataclass(frozen=True)
class Pool:
    """A parsed ``model.embedding_pool``: ``grid`` 0 means the mean over H, W; ``thumbnail`` 0
    means none. ``str()`` gives the canonical text (what keys the embedding store)."""

    grid: int = 0
    thumbnail: int = 0

    @classmethod
    def parse(cls, text: str) -> "Pool":
        """``mean`` or ``grid:G``, optionally ``+thumbnail:T`` (G, T in 1..16); ``thumbnail:T``
        alone means ``mean+thumbnail:T``. ValueError saying what is allowed."""
        grid = thumb = None
        for term in str(text).replace(" ", "").split("+"):
            m = _TERM.match(term)
            if m is None or (m.group(3) is None and grid is not None) or (m.group(3) and thumb is not None):
                raise ValueError(f"{text!r} is not a pooling: write mean or grid:G, optionally "
                                 f"+thumbnail:T (G, T from 1 to {MAX_CELLS}), e.g. grid:4+thumbnail:4")
            n = int(m.group(2) or m.group(3) or 0)
            if m.group(1) != MEAN and not 1 <= n <= MAX_CELLS:
                raise ValueError(f"{term!r}: the side must be 1 to {MAX_CELLS}, got {n}")
            if m.group(3):
                thumb = n
            else:
                grid = n
        return cls(grid or 0, thumb or 0)

    def __str__(self) -> str:
        base = f"grid:{self.grid}" if self.grid else MEAN
        return base + (f"+thumbnail:{self.thumbnail}" if self.thumbnail else "")

    def __call__(self, features: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
        """Unit rows (float32) from a layer's output (N, C, H, W or N, D) and the batch's uint8
        NHWC ``frames`` (read only with a thumbnail; its rows past N are ignored). ValueError
        when grid pooling meets an output that is not 4-D. On a CPU, one compiled pass
        (NOTE [ fused pooling ] in daemon/models/pooling_jit.py) where it covers the batch."""
        global pooling_jit
        if pooling_jit is None:             # imported at the first call: it imports numba (a
            from . import pooling_jit as loaded     # second), which only models that keep
            pooling_jit = loaded            # embeddings need, never beside every start's warm-up
        if pooling_jit.covers(features, frames, self.grid, self.thumbnail):
            return pooling_jit.embed(features, frames, self.grid, self.thumbnail, BLANK)
        v = features.float()                  # a no-op in fp32; under autocast, pool in fp32
        if v.dim() == 4:
            if self.grid:
                cells = F.adaptive_avg_pool2d(v, self.grid)
                v = cells - cells.mean(dim=(2, 3), keepdim=True)
            else:
                v = v.mean(dim=(2, 3))
        elif self.grid:
            raise ValueError(f"model.embedding_pool {self}: grid pooling needs a 4-D (N, C, H, W) "
                             f"layer output, got {tuple(v.shape)}; choose a convolution layer or mean")
        v = F.normalize(v.flatten(1), dim=1)
        if not (self.grid or self.thumbnail):
            return v                          # mean: the embedding as it always was
        parts = [v]
        if self.thumbnail:
            parts.append(thumbnail(frames[:v.shape[0]], self.thumbnail))
        parts.append(v.new_full((v.shape[0], 1), BLANK))
        return F.normalize(torch.cat(parts, dim=1), dim=1)

    def width(self, features_width: int) -> int:
        """The embedding's width for a layer part of ``features_width`` floats (C x G x G or D)."""
        if not (self.grid or self.thumbnail):
            return features_width
        return features_width + 3 * self.thumbnail ** 2 + 1


def thumbnail(frames: torch.Tensor, side: int) -> torch.Tensor:
    """(N, 3 x side x side) unit rows: uint8 NHWC ``frames`` averaged over side x side cells,
    minus the overall mean (one scalar per frame, so hue stays); zero rows for flat frames."""
    cells = F.adaptive_avg_pool2d(frames.permute(0, 3, 1, 2).float(), side)
    centred = cells - cells.mean(dim=(1, 2, 3), keepdim=True)
    return F.normalize(centred.flatten(1), dim=1)


def parse(text: str, key: str = "model.embedding_pool") -> Pool:
    """:meth:`Pool.parse` with the configuration key named in the error (a ConfigError)."""
    from ..config import ConfigError

    try:
        return Pool.parse(text)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def embedding_id(spec) -> str:
    """What decides a model's embedding besides its weights (a ModelSpec's layer and pooling):
    kept in the embedding store's header and its file name (daemon/caching/embedding_store.py), so vectors of
    two definitions never mix."""
    pool = Pool.parse(getattr(spec, "embedding_pool", "") or MEAN)
    return f"layer={spec.embedding_layer or '(output)'} pool={pool} inferd-embedding-2"
