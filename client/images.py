"""Turning what an application holds into the uint8 HxWx3 frame the model takes.

Accepted: a numpy uint8 array HxWx3 (RGB), HxWx4 (alpha dropped) or HxW (grey, repeated to 3
channels); a torch tensor, uint8 or float in 0..1, laid out HxWxC or CxHxW (C of 1, 3 or 4).
Anything else raises InvalidInput naming what it got.

Resampling (:func:`inferd.shm.uploads.resize`, the one definition: encoded images, and the daemon's
verification of uploads, take it too): when the image is not the model's input size it is
stretched to exactly height x width with Pillow's bilinear filter (``Image.Resampling.BILINEAR``),
which on downscaling widens its support by the scale factor, so it antialiases rather than skipping
pixels. No cropping, no padding: the aspect ratio follows the model's.
"""
from __future__ import annotations

import numpy as np

from ..shm.uploads import resize
from .errors import InvalidInput


def _from_torch(tensor) -> np.ndarray:
    import torch  # only reached when the caller passed a tensor, so torch is already loaded

    t = tensor.detach().cpu()
    if t.dim() == 3 and t.shape[0] in (1, 3, 4) and t.shape[2] not in (1, 3, 4):
        t = t.permute(1, 2, 0)
    if t.is_floating_point():
        t = (t.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return t.contiguous().numpy()


def to_frame(image, height: int, width: int) -> np.ndarray:
    """A C-contiguous uint8 array of shape (height, width, 3). Raises InvalidInput."""
    if type(image).__module__.startswith("torch"):
        image = _from_torch(image)
    if not isinstance(image, np.ndarray):
        raise InvalidInput(f"expected a numpy array or torch tensor, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidInput(f"expected dtype uint8 (0..255), got {image.dtype}; convert with "
                           "np.clip(x, 0, 255).astype(np.uint8) or pass a float torch tensor in 0..1")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] in (1, 4):
        image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidInput(f"expected an image of shape HxWx3 (or HxW, HxWx4), got {image.shape}")
    if image.shape[:2] != (height, width):
        return resize(image, height, width)
    return np.ascontiguousarray(image)
