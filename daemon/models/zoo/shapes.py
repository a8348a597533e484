"""Synthetic shape images and the small CNN behind the built-in default model ("shapes").

The model spec is fixed here and nowhere else: :data:`CLASSES` (label order = logit order),
:data:`SIZE` (input height and width), :data:`MEAN` and :data:`STD` (the per-channel normalisation
that :func:`inferd.daemon.pipeline.preprocess.to_input` applies). The trained weights live next to this file
in :data:`WEIGHTS`; ``python -m inferd.daemon.models.zoo.train_shapes`` regenerates them.

Generator contract: :func:`render` draws everything (position, size, rotation, colours, noise) from
the ``numpy.random.Generator`` it is given, so the same seed always yields the same pixels.
Rendering is vectorised over a coordinate grid (2x2 supersampled for anti-aliased edges); there are
no per-pixel Python loops.

Sample images: ``python -m inferd.daemon.models.zoo.shapes --samples DIR --count N --seed S``.
"""
from __future__ import annotations

import argparse
import math
import pathlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "stripes", "cross", "ring", "ellipse")
SIZE = 64
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.25, 0.25, 0.25)
WEIGHTS = pathlib.Path(__file__).with_name("shapes_cnn.pt")
# The embedding kept for near-duplicate search: the first conv block (64x64x16), pooled over a 4x4
# grid, plus a 4x4 colour thumbnail (NOTE [ near-duplicate embeddings ] in daemon/models/embedding_pooling.py). The
# pooled last block, which the classifier sees, ignores position, size and colour by training:
# there every star is like every other star. Measured: docs/benchmarks.md, "Near-duplicates".
EMBEDDING_LAYER = "features.0"
EMBEDDING_POOL = "grid:4+thumbnail:4"

_SUPERSAMPLE = 2          # sub-pixels per axis; edges get 5 grey levels instead of a hard step
_MIN_COLOUR_DISTANCE = 120.0  # Euclidean RGB distance between shape and background
_NOISE_SIGMA = 6.0        # per-pixel Gaussian noise, in uint8 units


def _polygon_mask(px: np.ndarray, py: np.ndarray, verts: Sequence[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test for every grid point at once (loop is over edges only)."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        if y1 == y2:  # a horizontal edge never crosses the horizontal ray
            continue
        crosses = (y1 > py) != (y2 > py)
        x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_at)
    return inside


def _regular_polygon(cx: float, cy: float, radii: Sequence[float], angle: float) -> list[tuple[float, float]]:
    """Vertices at equal angular steps; alternating radii give a star."""
    step = 2.0 * math.pi / len(radii)
    return [(cx + r * math.cos(angle + k * step), cy + r * math.sin(angle + k * step))
            for k, r in enumerate(radii)]


def _cross_polygon(cx: float, cy: float, r: float, half_width: float, angle: float) -> list[tuple[float, float]]:
    """A plus sign with arm length ``r`` (from the centre) and arm half-width ``half_width``."""
    w, c, s = half_width, math.cos(angle), math.sin(angle)
    local = [(w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r),
             (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r), (w, -r)]
    return [(cx + c * u - s * v, cy + s * u + c * v) for u, v in local]


def _shape_mask(rng: np.random.Generator, label: int, px: np.ndarray, py: np.ndarray, size: int) -> np.ndarray:
    """Boolean coverage of class ``label`` on the (supersampled) grid ``px``, ``py``."""
    r = rng.uniform(0.18, 0.38) * size          # outer radius of the shape
    cx, cy = rng.uniform(r + 1.0, size - r - 1.0, size=2)  # keep the whole shape in frame
    angle = rng.uniform(0.0, 2.0 * math.pi)
    # Coordinates in the shape's own rotated frame, for the analytic shapes.
    dx, dy = px - cx, py - cy
    u = math.cos(angle) * dx + math.sin(angle) * dy
    v = -math.sin(angle) * dx + math.cos(angle) * dy
    name = CLASSES[label]
    if name == "circle":
        return dx * dx + dy * dy <= r * r
    if name == "square":
        return _polygon_mask(px, py, _regular_polygon(cx, cy, [r] * 4, angle))
    if name == "triangle":
        return _polygon_mask(px, py, _regular_polygon(cx, cy, [r] * 3, angle))
    if name == "star":
        inner = r * rng.uniform(0.38, 0.5)
        return _polygon_mask(px, py, _regular_polygon(cx, cy, [r, inner] * 5, angle))
    if name == "stripes":
        # n bars inside a rotated square of half-side h; first and last bars are foreground.
        h, bars = r * 0.8, int(rng.integers(3, 5))
        period = 2.0 * h / (2 * bars - 1)
        in_square = (np.abs(u) <= h) & (np.abs(v) <= h)
        return in_square & (np.floor((u + h) / period).astype(np.int64) % 2 == 0)
    if name == "cross":
        half_width = r * rng.uniform(0.2, 0.32)
        return _polygon_mask(px, py, _cross_polygon(cx, cy, r, half_width, angle))
    if name == "ring":
        inner = r * rng.uniform(0.45, 0.65)
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= inner * inner)
    if name == "ellipse":
        minor = r * rng.uniform(0.4, 0.65)   # clearly non-circular
        return (u / r) ** 2 + (v / minor) ** 2 <= 1.0
    raise ValueError(f"label {label} out of range 0..{len(CLASSES) - 1}")


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB colours at least ``_MIN_COLOUR_DISTANCE`` apart."""
    while True:  # rejection sampling; roughly 3 in 4 pairs pass, so this ends quickly
        fg, bg = rng.uniform(0.0, 255.0, size=(2, 3))
        if np.linalg.norm(fg - bg) >= _MIN_COLOUR_DISTANCE:
            return fg, bg


def render(rng: np.random.Generator, label: int, size: int = SIZE) -> np.ndarray:
    """One image of class ``CLASSES[label]``: uint8 array of shape (size, size, 3), RGB.

    The shape gets a random position (fully inside the frame), size, rotation, colour and a
    contrasting random background colour, plus mild Gaussian noise. Deterministic given ``rng``.
    """
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label {label} out of range 0..{len(CLASSES) - 1}")
    ss = _SUPERSAMPLE
    # Sub-pixel centres in pixel units, so shape geometry is independent of the supersampling.
    coords = (np.arange(size * ss, dtype=np.float64) + 0.5) / ss
    py, px = np.meshgrid(coords, coords, indexing="ij")
    mask = _shape_mask(rng, label, px, py, size)
    coverage = mask.reshape(size, ss, size, ss).mean(axis=(1, 3))[:, :, None]
    fg, bg = _contrasting_colours(rng)
    img = coverage * fg + (1.0 - coverage) * bg
    img += rng.normal(0.0, _NOISE_SIGMA, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_dataset(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images, balanced over the classes (counts differ by at most one), in shuffled order.

    Returns (uint8 array N x size x size x 3, int64 labels of shape (N,)). Same seed, same arrays.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n, dtype=np.int64) % len(CLASSES))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i] = render(rng, int(label), size)
    return images, labels


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv (no bias: BatchNorm supplies it) + BatchNorm + ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ShapesNet(nn.Module):
    """Small CNN: five conv blocks (max-pool between them), global average pool, linear head.

    ``forward`` takes float32 NCHW (as produced by ``to_input`` with :data:`MEAN`/:data:`STD`) and
    returns logits of shape (N, len(CLASSES)). Global pooling makes it position invariant; the last
    block works on a 4x4 map at SIZE=64, so its receptive field covers the largest shape.
    """

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        widths = (3, 16, 32, 48, 64, 96)
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers.append(_block(widths[i], widths[i + 1]))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def load_pretrained() -> ShapesNet:
    """ShapesNet with the trained weights from :data:`WEIGHTS`, in eval() mode."""
    model = ShapesNet()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


def write_samples(out_dir: pathlib.Path, count: int, seed: int) -> list[pathlib.Path]:
    """Write ``count`` PNGs cycling through the classes, named ``<class>_<k>.png``.

    ``k`` counts images of that class, so ``count=len(CLASSES)`` gives one ``<class>_0.png`` each.
    """
    from PIL import Image  # only the sample writer needs Pillow

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        label = i % len(CLASSES)
        path = out_dir / f"{CLASSES[label]}_{i // len(CLASSES)}.png"
        Image.fromarray(render(rng, label)).save(path)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``--samples DIR --count N --seed S`` writes sample PNGs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=pathlib.Path, required=True, help="directory for the PNG files")
    parser.add_argument("--count", type=int, default=len(CLASSES), help="number of images (default: one per class)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args(argv)
    for path in write_samples(args.samples, args.count, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
