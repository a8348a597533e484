"""The one definition of how a uint8 frame becomes a model input.

The daemon's batching threads, the training script of the built-in model and the exactness tests
all call :func:`to_input`, so "the same preprocessed tensor" means the same bytes everywhere.
"""
from __future__ import annotations

import torch


def to_input(frames: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (RGB, 0..255) -> float32 NCHW, scaled to 0..1 then normalised per channel.

    ``frames`` may live on any device; ``mean`` and ``std`` are float32 tensors of shape (3,) on
    the same device. Returns a new contiguous tensor; ``frames`` is not modified.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[3] != 3:
        raise ValueError(f"expected uint8 NHWC frames with 3 channels, got {frames.dtype} {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))
    return x.contiguous()
