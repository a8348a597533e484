"""Models from files: TorchScript and torch.export programs serve the same answers as the built-in,
and a file that cannot serve stops start-up with the key at fault."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import sample_images, short_dir, spawn_daemon
from inferd.client import Client
from inferd.daemon import config
from inferd.daemon.pipeline import engine_options as modes
from inferd.daemon.models import zoo
from inferd.daemon.models import loading as model_mod
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_labels_that_do_not_match_the_output_stop_start_up(tmp_path):
    path = _save("torchscript", str(tmp_path))
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    cfg = ModelConfig(path=path, input_height=64, input_width=64, labels=str(tmp_path / "three.txt"), top_k=2,
                      mean=[0.5] * 3, std=[0.25] * 3)
    model = model_mod.load(cfg)
    with pytest.raises(ConfigError, match=r"output shape \(2, 8\) for 2 frames does not match \(2, 3 labels\)"):
        model_mod.check_output(model.spec, model.module)
    workdir = short_dir()
    out = subprocess.run([sys.executable, "-m", "inferd.daemon", "--socket", f"{workdir}/d.sock",
                          "--set", f'cache.path="{workdir}/results.cache"',
                          "--model", path, "--set", "model.input_height=64", "--set", "model.input_width=64",
                          "--set", f'model.labels="{tmp_path}/three.txt"', "--set", "model.top_k=2",
                          "--set", "model.mean=[0.5, 0.5, 0.5]", "--set", "model.std=[0.25, 0.25, 0.25]"],
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


def _start(*args: str) -> subprocess.CompletedProcess:
    """A daemon start-up that is expected to stop before serving."""
    workdir = short_dir()
    return subprocess.run([sys.executable, "-m", "inferd.daemon", "--socket", f"{workdir}/d.sock",
                           "--set", f'cache.path="{workdir}/results.cache"', *args],
                          capture_output=True, text=True, timeout=120)


def test_a_float_file_model_without_mean_and_std_stops_start_up(tmp_path):
    """No silent ImageNet default: the error names both keys and the way out."""
    path = _save("torchscript", str(tmp_path))
    base = {"path": path, "input_height": 64, "input_width": 64}
    for given in ({}, {"mean": [0.5] * 3}, {"std": [0.25] * 3}):
        with pytest.raises(ConfigError, match=r"model.mean / model.std: required for a float_nchw file model"):
            config.from_dict({"model": {**base, **given}})
    with pytest.raises(ConfigError, match=r"model.mean / model.std: required .* model.input = \"uint8_nhwc\""):
        model_mod.load(ModelConfig(**base))      # as a reload to a file path does: the same check
    out = _start("--model", path, "--set", "model.input_height=64", "--set", "model.input_width=64")
    assert out.returncode == 78, out.stderr
    assert "model.mean / model.std: required" in out.stderr and "uint8_nhwc" in out.stderr, out.stderr
    # the same file with both keys and no labels file starts: labels are optional
    cfg = config.from_dict({"model": {**base, "mean": [0.5] * 3, "std": [0.25] * 3}})
    model = model_mod.load(cfg.model)
    assert model.spec.numbered and model.spec.labels == tuple(str(i) for i in range(8))


_FILE = {"path": __file__, "input_height": 8, "input_width": 8}     # exists; never loaded here


@pytest.mark.parametrize("model, message", [
    ({**_FILE, "input": "uint8_nhwc", "mean": [0.5] * 3}, "model.mean: a uint8_nhwc model normalises inside"),
    ({**_FILE, "input": "uint8_nhwc", "std": [0.5] * 3}, "model.std: a uint8_nhwc model normalises inside"),
    ({"input": "uint8_nhwc"}, "model.input: uint8_nhwc is for file models"),
    ({"input": "nhwc"}, "model.input: 'nhwc' is not one of float_nchw, uint8_nhwc"),
])
def test_input_form_mistakes_name_the_key(model, message):
    with pytest.raises(ConfigError) as err:
        config.from_dict({"model": model})
    assert message in str(err.value)


def test_an_exported_program_is_checked_against_the_input_form(tmp_path):
    """Dtype, layout, size and a dynamic batch are read off the program before anything runs."""
    model, _ = zoo.build("shapes")
    example = torch.zeros(4, 3, 64, 64)
    fixed, dynamic = str(tmp_path / "fixed.pt2"), str(tmp_path / "dynamic.pt2")
    torch.export.save(torch.export.export(model, (example,)), fixed)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), dynamic)
    float_form = dict(input_height=64, input_width=64, mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(ConfigError, match=r"fixed batch size of 4; export it with dynamic_shapes"):
        model_mod.load(ModelConfig(path=fixed, **float_form))
    with pytest.raises(ConfigError, match=r"model.input: the exported program takes torch.float32 \(N, 3, 64, 64\); "
                                          r"model.input = \"uint8_nhwc\""):
        model_mod.load(ModelConfig(path=dynamic, input="uint8_nhwc", input_height=64, input_width=64))
    with pytest.raises(ConfigError, match=r"model.input_height / model.input_width: .* input_height 32 and "
                                          r"input_width 64 .*; set model.input_height = 64 and model.input_width = 64"):
        model_mod.load(ModelConfig(path=dynamic, **{**float_form, "input_height": 32}))
    served = model_mod.load(ModelConfig(path=dynamic, **float_form))
    assert served.spec.labels == tuple(str(i) for i in range(8))      # width read off the program


def test_model_name_and_the_preprocessing_id():
    named = model_mod.load(ModelConfig(builtin="shapes", name="prod-shapes-v3"))
    plain = model_mod.load(ModelConfig(builtin="shapes"))
    assert named.spec.name == "prod-shapes-v3" and plain.spec.name == "shapes"
    assert named.digest == plain.digest              # a name is no part of the cache key
    assert named.describe()["name"] == "prod-shapes-v3"
    as_is = dataclasses.replace(plain.spec, input_form="uint8_nhwc", mean=(), std=())
    assert as_is.preprocess_id != plain.spec.preprocess_id
    assert "uint8-nhwc" in as_is.preprocess_id and "mean" not in as_is.preprocess_id


def test_warmup_covers_every_size_the_planner_may_choose():
    assert model_mod.warmup_sizes(1) == [1]
    assert model_mod.warmup_sizes(32) == [1, 2, 4, 8, 16, 32]                    # cpu: log-spaced
    assert model_mod.warmup_sizes(24, padded=True) == list(modes.batch_sizes(24))  # padded: all run
    assert model_mod.warmup_sizes(24, padded=True, asynchronous=True) == [1, 2, 4, 8, 16, 24]
    assert model_mod.warmup_sizes(12, asynchronous=True) == list(range(1, 13))   # cuda eager: every
    with pytest.raises(ValueError):
        model_mod.warmup_sizes(0)
