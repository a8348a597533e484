"""Tests of the built-in model zoo: shape generator, pretrained shapes model, benchmark models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from inferd.daemon.models import zoo
from inferd.daemon.pipeline.preprocess import to_input
from inferd.daemon.models.zoo import shapes
from inferd.daemon.models.zoo.noop import NoopNet
from inferd.daemon.models.zoo.resnet import resnet18_style, resnet50_style

pytestmark = pytest.mark.timeout(60)

# Not the training seed (0) nor the training script's evaluation seed (1000).
FRESH_SEED = 424242


def test_render_shape_dtype_and_every_class() -> None:
    rng = np.random.default_rng(1)
    for label in range(len(shapes.CLASSES)):
        img = shapes.render(rng, label)
        assert img.shape == (shapes.SIZE, shapes.SIZE, 3)
        assert img.dtype == np.uint8
        assert img.std() > 10, f"{shapes.CLASSES[label]} rendered as a flat image"
    assert shapes.render(rng, 0, size=40).shape == (40, 40, 3)


def test_render_rejects_bad_label() -> None:
    with pytest.raises(ValueError):
        shapes.render(np.random.default_rng(0), len(shapes.CLASSES))


def test_make_dataset_deterministic_and_balanced() -> None:
    a_img, a_lab = shapes.make_dataset(32, seed=7)
    b_img, b_lab = shapes.make_dataset(32, seed=7)
    c_img, _ = shapes.make_dataset(32, seed=8)
    assert a_img.shape == (32, shapes.SIZE, shapes.SIZE, 3) and a_img.dtype == np.uint8
    assert a_lab.dtype == np.int64
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert np.bincount(a_lab, minlength=len(shapes.CLASSES)).tolist() == [4] * len(shapes.CLASSES)


def test_pretrained_shapes_accuracy_on_fresh_images() -> None:
    images, labels = shapes.make_dataset(200, seed=FRESH_SEED)
    model, spec = zoo.build("shapes")
    assert not model.training
    x = to_input(torch.from_numpy(images), torch.tensor(spec.mean), torch.tensor(spec.std))
    with torch.no_grad():
        predicted = model(x).argmax(dim=1).numpy()
    accuracy = float(np.mean(predicted == labels))
    assert accuracy >= 0.90, f"accuracy {accuracy:.3f} on fresh images"


def test_shapes_spec() -> None:
    _, spec = zoo.build("shapes")
    assert (spec.input_height, spec.input_width) == (shapes.SIZE, shapes.SIZE)
    assert spec.labels == shapes.CLASSES and len(spec.labels) == 8
    with pytest.raises(ValueError):
        zoo.build("shapes", input_size=128)


@pytest.mark.slow
@pytest.mark.parametrize("factory", [resnet18_style, resnet50_style])
def test_resnet_deterministic_per_seed(factory) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)  # the global RNG state must not matter
    a = factory(seed=1)
    torch.manual_seed(12)
    b = factory(seed=1)
    c = factory(seed=2)
    assert not a.training
    with torch.no_grad():
        out_a, out_b, out_c = a(x), b(x), c(x)
    assert out_a.shape == (2, 1000)
    assert torch.isfinite(out_a).all()
    assert torch.equal(out_a, out_b)
    assert not torch.allclose(out_a, out_c)


def test_resnet_accepts_small_and_odd_inputs() -> None:
    model = resnet18_style(num_classes=5)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
        assert model(torch.zeros(1, 3, 37, 50)).shape == (1, 5)


def test_build_resnet_spec_and_size_override() -> None:
    model, spec = zoo.build("resnet18", input_size=96)
    assert (spec.input_height, spec.input_width) == (96, 96)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert len(spec.labels) == 1000 and spec.labels[0] == "class_0" and spec.labels[-1] == "class_999"
    assert not model.training
    assert zoo.build("resnet18")[1].input_height == 64
    with pytest.raises(ValueError):
        zoo.build("resnet50", input_size=16)


def test_noop_output_depends_on_input() -> None:
    model, spec = zoo.build("noop")
    assert (spec.input_height, spec.input_width) == (32, 32)
    assert spec.labels == tuple(f"noop_{k}" for k in range(10))
    x = torch.zeros(3, 3, 32, 32)
    x[1] += 1.0
    out = model(x)
    assert out.shape == (3, 10)
    assert torch.equal(out[0], torch.arange(10, dtype=torch.float32))
    assert torch.equal(out[1], out[0] + 1.0)
    assert NoopNet(num_classes=4)(x).shape == (3, 4)


def test_build_unknown_name() -> None:
    with pytest.raises(ValueError, match="shapes"):
        zoo.build("nope")


def test_builtin_names_all_build() -> None:
    for name in zoo.BUILTIN_NAMES:
        model, spec = zoo.build(name)
        assert spec.name == name and not model.training
