"""Registry of the built-in models the daemon can serve without any model file.

``build(name, input_size=None)`` returns a fresh ``(model, spec)`` pair; the model is in eval()
mode on the CPU, and the :class:`BuiltinSpec` says what the daemon must feed it: frames of
``input_height`` x ``input_width`` preprocessed by :func:`inferd.daemon.pipeline.preprocess.to_input` with
``mean``/``std``; logit ``k`` means ``labels[k]``.

Built-ins (:data:`BUILTIN_NAMES`):

* ``shapes``   -- trained 8-class CNN on synthetic shapes (:mod:`.shapes`), 64x64 only.
* ``resnet18`` -- ResNet-18 layout, random weights, 1000 classes, 64x64 by default.
* ``resnet50`` -- ResNet-50 layout, random weights, 1000 classes, 64x64 by default.
* ``noop``     -- near-zero compute (:mod:`.noop`), 10 classes, 32x32 by default.
* ``synthetic`` -- known cost per device and injectable faults (:mod:`.synthetic`), for tests and
  benchmarks of device pools; 10 grey levels, 16x16 by default.

``input_size`` overrides the default square size where the model allows it (resnets: >= 32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The model modules (and torch) are imported inside build(): importing this package stays cheap,
# and ``python -m inferd.daemon.models.zoo.shapes`` does not find its module already imported by us.

BUILTIN_NAMES = ("shapes", "resnet18", "resnet50", "noop", "synthetic")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGENET_LABELS = tuple(f"class_{k}" for k in range(1000))
_NOOP_LABELS = tuple(f"noop_{k}" for k in range(10))
_RESNET_MIN_SIZE = 32  # five stride-2 stages; smaller inputs would pool to nothing


@dataclass(frozen=True)
class BuiltinSpec:
    """What a built-in model expects and what its outputs mean."""

    name: str
    input_height: int
    input_width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    labels: tuple[str, ...]
    embedding_layer: str = ""       # submodule kept for near-duplicate search ("" for none)
    embedding_pool: str = "mean"    # how it is pooled (daemon/models/embedding_pooling.py)


def _square_size(name: str, input_size: int | None, default: int, minimum: int) -> int:
    """The input side length: ``default`` unless overridden; ValueError below ``minimum``."""
    size = default if input_size is None else input_size
    if size < minimum:
        raise ValueError(f"built-in model {name!r} needs input_size >= {minimum}, got {size}")
    return size


def build(name: str, input_size: int | None = None) -> tuple[torch.nn.Module, BuiltinSpec]:
    """A new instance of built-in model ``name`` (eval() mode) and its spec.

    Raises ValueError for an unknown name, for an ``input_size`` the model cannot take, and for
    any ``input_size`` other than 64 for ``shapes`` (it was trained at that size only).
    """
    from . import shapes
    from .noop import NoopNet
    from .resnet import resnet18_style, resnet50_style

    if name == "shapes":
        if input_size is not None and input_size != shapes.SIZE:
            raise ValueError(f"built-in model 'shapes' takes only {shapes.SIZE}x{shapes.SIZE} input, got {input_size}")
        spec = BuiltinSpec(name, shapes.SIZE, shapes.SIZE, shapes.MEAN, shapes.STD, shapes.CLASSES,
                           shapes.EMBEDDING_LAYER, shapes.EMBEDDING_POOL)
        return shapes.load_pretrained(), spec
    if name in ("resnet18", "resnet50"):
        size = _square_size(name, input_size, default=64, minimum=_RESNET_MIN_SIZE)
        model = resnet18_style() if name == "resnet18" else resnet50_style()
        return model, BuiltinSpec(name, size, size, _IMAGENET_MEAN, _IMAGENET_STD, _IMAGENET_LABELS, "avgpool")
    if name == "synthetic":
        from . import synthetic

        size = _square_size(name, input_size, default=synthetic.SIZE, minimum=1)
        spec = BuiltinSpec(name, size, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), synthetic.LABELS)
        return synthetic.SyntheticNet().eval(), spec
    if name == "noop":
        size = _square_size(name, input_size, default=32, minimum=1)
        spec = BuiltinSpec(name, size, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), _NOOP_LABELS)
        return NoopNet(len(_NOOP_LABELS)).eval(), spec
    raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_NAMES)}")
