"""`inferctl reload` takes the [model] keys the configuration takes, checked as start-up checks
them: a daemon started on a built-in (float_nchw, normalised by the daemon) swaps to a file model
that takes uint8 NHWC frames and normalises inside, and back to the built-in from a model section
file; a wrong or missing key is named and the old model keeps serving."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from helpers import admin_path
from inferd.client import AdminClient, Client

pytestmark = pytest.mark.timeout(240)

SIZE = 64                  # the built-in shapes model's frame size: the swap keeps it


class Normalising(nn.Module):
    """uint8 NHWC in, its own normalisation: what an exported production model looks like."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(8 * 16, 10))

    def forward(self, x):
        return self.body(x.permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.25))


def inferctl(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferd.client.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


def test_reload_to_a_uint8_nhwc_file_model_and_back(fresh_daemon, tmp_path):
    model = Normalising().eval()
    path = str(tmp_path / "prod.pt2")
    example = torch.randint(0, 256, (2, SIZE, SIZE, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}), path)
    frames = np.random.default_rng(7).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
    with torch.inference_mode():
        want = model(torch.from_numpy(frames)).argmax(dim=1).tolist()

    d = fresh_daemon()                                       # the built-in shapes, float_nchw
    env = {"INFERD_SOCKET": d.socket_path}
    # the path alone: the keys a file model needs are missing, named as start-up names them
    out = inferctl("reload", path, env=env)
    assert out.returncode == 1 and "model.input_height / model.input_width: required" in out.stderr, out.stderr
    out = inferctl("reload", path, "--set", "model.input=nhwc", env=env)
    assert out.returncode == 1 and "model.input: 'nhwc' is not one of float_nchw, uint8_nhwc" in out.stderr
    out = inferctl("reload", path, "--set", "server.max_clients=3", env=env)
    assert out.returncode == 2 and "model.KEY=VALUE" in out.stderr
    with AdminClient(admin_path(d)) as admin:
        assert admin.call("health")["model"]["name"] == "shapes"   # still serving

    out = inferctl("reload", path, "--set", "model.input=uint8_nhwc", "--set", f"model.input_height={SIZE}",
                   "--set", f"model.input_width={SIZE}", env=env)
    assert out.returncode == 0 and out.stdout.startswith("now serving prod "), out.stdout + out.stderr
    with Client(d.socket_path, cache=False) as c:
        assert c.model.name == "prod" and c.model.gen == 2
        got = [top[0].index for top in c.classify_many(list(frames), 1)]
    assert got == want                                       # frames given as they are, uint8 NHWC

    section = tmp_path / "model.toml"
    section.write_text('[model]\nbuiltin = "shapes"\n')     # replaces the section: no uint8 input left
    out = inferctl("reload", "--model-config", str(section), env=env)
    assert out.returncode == 0 and out.stdout.startswith("now serving shapes "), out.stdout + out.stderr
    with AdminClient(admin_path(d)) as admin:
        health = admin.call("health")
        assert health["model"]["name"] == "shapes" and health["model"]["gen"] == 3
        assert admin.call("stats")["reloads"] == {"ok": 2, "failed": 2}
