"""The one definition of how a uint8 frame becomes a model input.

The daemon's batching threads (through :class:`Preprocess`), the training script of the built-in
model and the exactness tests (through :func:`to_input`) compute the same thing, so "the same
preprocessed tensor" means the same bytes everywhere.
"""
from __future__ import annotations

import torch


class Preprocess:
    """uint8 NHWC (RGB, 0..255) -> float32 NCHW: ``(x / 255 - mean) / std`` per channel.

    Computed as one multiply-add, ``x * (1 / (255 std)) + (-mean / std)``, with both factors made
    once here: on small batches torch's per-op overhead dominates, and this is two ops per batch
    where the textbook form takes five.
    """

    def __init__(self, mean, std, device: torch.device | str = "cpu", channels_last: bool = False):
        mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device)
        std_t = torch.as_tensor(std, dtype=torch.float32, device=device)
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1)
        self.bias = (-mean_t / std_t).view(1, 3, 1, 1)
        # channels_last: NHWC in memory, as the frames arrive, so the permute below costs no copy
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames`` on the same device as this Preprocess; returns a new tensor, contiguous in
        this Preprocess's memory format (NCHW, or NHWC in memory with ``channels_last``)."""
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[3] != 3:
            raise ValueError(f"expected uint8 NHWC frames with 3 channels, got {frames.dtype} {tuple(frames.shape)}")
        x = frames.permute(0, 3, 1, 2).to(torch.float32)
        return torch.addcmul(self.bias, x, self.scale).contiguous(memory_format=self.memory_format)


def to_input(frames: torch.Tensor, mean, std) -> torch.Tensor:
    """:class:`Preprocess` in one call (mean and std: 3 floats or tensors of shape (3,))."""
    return Preprocess(mean, std, frames.device)(frames)
