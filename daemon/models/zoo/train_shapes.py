"""Train the built-in "shapes" model and check it on freshly generated images.

Usage::

    python -m inferd.daemon.models.zoo.train_shapes [--epochs E] [--train-size N] [--seed S] [--out PATH]

Contract:

* The training set is ``make_dataset(train_size, seed)``; the evaluation set is
  ``make_dataset(eval_size, eval_seed)`` with a different seed, so every evaluation image is new.
* Every frame goes through :func:`inferd.daemon.pipeline.preprocess.to_input` with the model spec's
  ``MEAN``/``STD``, exactly as the daemon does, so the weights match what the daemon feeds them.
* The run is deterministic given ``--seed`` (seeded torch RNG, seeded shuffling, deterministic
  algorithms, a fixed thread count).
* The saved file is the float32 ``state_dict`` of the model in eval() mode (BatchNorm running
  statistics included), loadable with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import argparse
import pathlib
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ...pipeline.preprocess import to_input
from .shapes import CLASSES, MEAN, STD, WEIGHTS, ShapesNet, make_dataset

_BATCH = 128
_THREADS = 2
_MEAN = torch.tensor(MEAN, dtype=torch.float32)
_STD = torch.tensor(STD, dtype=torch.float32)


def _inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC numpy frames -> model input, via the daemon's own preprocessing."""
    return to_input(torch.from_numpy(images), _MEAN, _STD)


def train(images: np.ndarray, labels: np.ndarray, epochs: int, seed: int) -> ShapesNet:
    """Train a fresh ShapesNet with Adam and a one-cycle learning-rate schedule; returns it in eval()."""
    torch.manual_seed(seed)  # weight init
    shuffle = torch.Generator().manual_seed(seed)  # batch order, independent of the init draws
    model = ShapesNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (len(images) + _BATCH - 1) // _BATCH
    # One-cycle converges well in few epochs, which keeps CPU training short.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, epochs=epochs, steps_per_epoch=steps_per_epoch)
    targets = torch.from_numpy(labels)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        started, total_loss, correct = time.perf_counter(), 0.0, 0
        for batch in torch.randperm(len(images), generator=shuffle).split(_BATCH):
            idx = batch.numpy()
            x, y = _inputs(images[idx]), targets[batch]
            logits = model(x)
            loss = loss_fn(logits, y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(dim=1) == y).sum())
        print(f"epoch {epoch + 1}/{epochs}: loss {total_loss / len(images):.4f}, "
              f"train accuracy {correct / len(images):.3f}, {time.perf_counter() - started:.1f} s", flush=True)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """Predicted class indices for uint8 NHWC frames (model must already be in eval())."""
    out = [model(_inputs(images[i:i + 256])).argmax(dim=1) for i in range(0, len(images), 256)]
    return torch.cat(out).numpy()


def report_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Print accuracy per class and overall; return the overall accuracy."""
    predicted = predict(model, images)
    for k, name in enumerate(CLASSES):
        of_class = labels == k
        print(f"  {name:<10} {np.mean(predicted[of_class] == k):.3f}  ({int(of_class.sum())} images)")
    overall = float(np.mean(predicted == labels))
    print(f"accuracy on {len(images)} fresh images: {overall:.3f}")
    return overall


def save(model: nn.Module, out: pathlib.Path) -> None:
    """Save the eval-mode state_dict; floating tensors as float32, contiguous, detached."""
    state = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).contiguous().clone()
             for k, v in model.eval().state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the built-in shapes model.")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the training set, init and shuffling")
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--eval-seed", type=int, default=None, help="seed of the fresh evaluation set (default: seed + 1000)")
    parser.add_argument("--out", type=pathlib.Path, default=WEIGHTS, help=f"weights file (default: {WEIGHTS})")
    args = parser.parse_args(argv)
    eval_seed = args.seed + 1000 if args.eval_seed is None else args.eval_seed
    if eval_seed == args.seed:
        parser.error("--eval-seed must differ from --seed, or the evaluation images are not fresh")

    torch.set_num_threads(_THREADS)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    images, labels = make_dataset(args.train_size, args.seed)
    print(f"generated {len(images)} training images in {time.perf_counter() - started:.1f} s", flush=True)
    model = train(images, labels, args.epochs, args.seed)
    save(model, args.out)
    print(f"saved {args.out.resolve()} ({args.out.stat().st_size} bytes)")
    eval_images, eval_labels = make_dataset(args.eval_size, eval_seed)
    report_accuracy(model, eval_images, eval_labels)
    print(f"total wall time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
