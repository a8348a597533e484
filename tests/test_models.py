"""Models from files: TorchScript and torch.export programs serve the same answers as the built-in,
and a file that cannot serve stops start-up with the key at fault."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import sample_images, short_dir, spawn_daemon
from inferd.client import Client
from inferd.daemon import model as model_mod
from inferd.daemon import zoo
from inferd.daemon.config import ConfigError, ModelConfig

pytestmark = pytest.mark.timeout(180)


def _save(kind: str, directory: str) -> str:
    model, spec = zoo.build("shapes")
    example = torch.zeros(4, 3, 64, 64)
    if kind == "torchscript":
        path = os.path.join(directory, "shapes.pt")
        torch.jit.trace(model, example).save(path)
    else:
        path = os.path.join(directory, "shapes.pt2")
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), path)
    with open(os.path.join(directory, "labels.txt"), "w") as fh:
        fh.write("\n".join(spec.labels) + "\n")
    return path


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_model_file_serves_the_same_answers_as_the_builtin(tmp_path, daemon, kind):
    path = _save(kind, str(tmp_path))
    d = spawn_daemon("--set", "model.input_height=64", "--set", "model.input_width=64",
                     "--set", f'model.labels="{tmp_path}/labels.txt"',
                     "--set", "model.mean=[0.5, 0.5, 0.5]", "--set", "model.std=[0.25, 0.25, 0.25]",
                     model=path)
    try:
        images = [img for _, img in sample_images()]
        with Client(d.socket_path) as from_file, Client(daemon.socket_path) as builtin:
            assert from_file.model.name == "shapes" and from_file.model.digest != builtin.model.digest
            got, want = from_file.classify_many(images, top_k=3), builtin.classify_many(images, top_k=3)
        for g, w in zip(got, want):
            assert [p.index for p in g] == [p.index for p in w]
            np.testing.assert_allclose([p.score for p in g], [p.score for p in w], atol=1e-5)
        assert d.stop() == 0
    finally:
        d.cleanup()


def test_labels_that_do_not_match_the_output_stop_start_up(tmp_path):
    path = _save("torchscript", str(tmp_path))
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    cfg = ModelConfig(path=path, input_height=64, input_width=64, labels=str(tmp_path / "three.txt"), top_k=2)
    model = model_mod.load(cfg)
    with pytest.raises(ConfigError, match=r"output shape \(2, 8\) for 2 frames does not match \(2, 3 labels\)"):
        model_mod.check_output(model.spec, model.module)
    workdir = short_dir()
    out = subprocess.run([sys.executable, "-m", "inferd.daemon", "--socket", f"{workdir}/d.sock",
                          "--set", f'cache.path="{workdir}/results.cache"',
                          "--model", path, "--set", "model.input_height=64", "--set", "model.input_width=64",
                          "--set", f'model.labels="{tmp_path}/three.txt"', "--set", "model.top_k=2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 78 and "check model.labels" in out.stderr, out.stderr


def test_a_file_that_is_not_a_model_is_named(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    (tmp_path / "l.txt").write_text("a\n")
    cfg = ModelConfig(path=str(tmp_path / "junk.pt"), input_height=8, input_width=8, labels=str(tmp_path / "l.txt"))
    with pytest.raises(ConfigError, match="model.path: cannot load .*junk.pt as torchscript"):
        model_mod.load(cfg)
    with pytest.raises(ConfigError, match="model.path: .*missing.pt2 is not a file"):
        model_mod.load(ModelConfig(path=str(tmp_path / "missing.pt2"), input_height=8, input_width=8, labels="x"))


def test_digest_follows_the_weights():
    cfg = ModelConfig(builtin="resnet18")
    a, b = model_mod.load(cfg), model_mod.load(cfg)
    assert a.digest == b.digest
    with torch.no_grad():
        next(b.module.parameters()).add_(1e-3)
    assert model_mod._state_digest(b.module) != a.digest
