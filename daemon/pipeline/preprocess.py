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
"""
from __future__ import annotations

import torch

from ..config import INPUT_FORMS

FLOAT_NCHW, UINT8_NHWC = INPUT_FORMS


class Preprocess:
    """uint8 NHWC (RGB, 0..255) -> the model's input form.

    ``float_nchw`` (the default): float32 NCHW, ``(x / 255 - mean) / std`` per channel, computed
    as one multiply-add, ``x * (1 / (255 std)) + (-mean / std)``, with both factors made once
    here: on small batches torch's per-op overhead dominates, and this is two ops per batch where
    the textbook form takes five. ``uint8_nhwc``: the frames themselves (no copy; mean and std
    are ignored, and so is ``channels_last``: the frames are NHWC already).
    """

    def __init__(self, mean, std, device: torch.device | str = "cpu", channels_last: bool = False,
                 form: str = FLOAT_NCHW):
        if form not in INPUT_FORMS:
            raise ValueError(f"input form {form!r} is not one of {', '.join(INPUT_FORMS)}")
        self.form = form
        self.scale = self.bias = None
        if form == FLOAT_NCHW:
            mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device)
            std_t = torch.as_tensor(std, dtype=torch.float32, device=device)
            self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1)
            self.bias = (-mean_t / std_t).view(1, 3, 1, 1)
        # channels_last: NHWC in memory, as the frames arrive, so the permute below costs no copy
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @classmethod
    def of(cls, spec, device: torch.device | str = "cpu", channels_last: bool = False) -> "Preprocess":
        """The preprocessing of a model spec (inferd.daemon.models.loading.ModelSpec)."""
        return cls(spec.mean, spec.std, device, channels_last, spec.input_form)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames`` on the same device as this Preprocess. ``float_nchw``: returns a new tensor,
        contiguous in this Preprocess's memory format (NCHW, or NHWC in memory with
        ``channels_last``); ``uint8_nhwc``: returns ``frames`` itself."""
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[3] != 3:
            raise ValueError(f"expected uint8 NHWC frames with 3 channels, got {frames.dtype} {tuple(frames.shape)}")
        if self.scale is None:
            return frames
        x = frames.permute(0, 3, 1, 2).to(torch.float32)
        return torch.addcmul(self.bias, x, self.scale).contiguous(memory_format=self.memory_format)


def to_input(frames: torch.Tensor, mean, std, form: str = FLOAT_NCHW) -> torch.Tensor:
    """:class:`Preprocess` in one call (mean and std: 3 floats or tensors of shape (3,))."""
    return Preprocess(mean, std, frames.device, form=form)(frames)
