"""Messages that blame the right thing, read as a user reads them (a real daemon, inferctl as a
process): a device an operator disabled is not a failed health check; a user the socket keeps out
is told who may connect and how, not to start a daemon that runs; an exported model of another
size names the size keys."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import sample_images, spawn_daemon
from inferd.client import Client, NoHealthyDevice

pytestmark = pytest.mark.timeout(180)


def inferctl(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferd.client.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def test_a_device_disabled_by_an_operator_is_named_as_such(fresh_daemon):
    d = fresh_daemon()
    env = {"INFERD_SOCKET": d.socket_path}
    (_, img), *_ = sample_images()
    assert inferctl("device", "disable", "0", env=env).returncode == 0
    with Client(d.socket_path, cache=False) as c:
        with pytest.raises(NoHealthyDevice) as refused:
            c.classify(img)
    assert "taken out by an operator" in str(refused.value)
    assert "health checks" not in str(refused.value)
    health = inferctl("health", env=env)
    assert health.returncode == 1
    assert health.stdout.startswith("not ready (no device in rotation: every device was disabled by an "
                                    "operator"), health.stdout
    assert inferctl("device", "enable", "0", env=env).returncode == 0
    health = inferctl("health", env=env)
    assert health.returncode == 0 and health.stdout.startswith("ready: "), health.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_a_user_the_socket_keeps_out_is_told_who_may_connect(fresh_daemon):
    d = fresh_daemon()
    # imports as root first (the interpreter's files may be under a root-only home), then nobody
    script = ("import os, shutil, sys\nfrom inferd.client import Client, cli\ncli._parser()\n"
              "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
              "sys.exit(cli.main(['--socket', sys.argv[1], 'ping']))\n")
    out = subprocess.run([sys.executable, "-c", script, d.socket_path], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 77, out.stderr                  # not 69: the daemon runs
    assert "Permission denied" in out.stderr and "start the daemon" not in out.stderr
    for key in ("server.socket_mode", "server.allow_uids", "allow_gids"):
        assert key in out.stderr, out.stderr
    with Client(d.socket_path) as c:                           # and it does run
        c.ping()


SIZE = 32


def _export(path: str) -> None:
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(x.permute(0, 3, 1, 2).float().mean(dim=(2, 3)))

    example = torch.randint(0, 256, (2, SIZE, SIZE, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(Net().eval(), (example,), dynamic_shapes={"x": {0: batch}}), path)


@pytest.mark.parametrize("settings, named, not_named", [
    (["model.input=uint8_nhwc", "model.input_height=16", "model.input_width=16"],
     "model.input_height / model.input_width: the exported program takes", "model.input:"),
    (["model.input=float_nchw", f"model.input_height={SIZE}", f"model.input_width={SIZE}",
      "model.mean=[0.5, 0.5, 0.5]", "model.std=[0.5, 0.5, 0.5]"],
     "model.input: the exported program takes", "model.input_height / model.input_width"),
], ids=["wrong size", "wrong form"])
def test_an_exported_model_s_wrong_input_names_the_wrong_keys(tmp_path, settings, named, not_named):
    model = str(tmp_path / "m.pt2")
    _export(model)
    sets = [arg for s in settings for arg in ("--set", s)]
    d = spawn_daemon(*sets, model=model, wait=False)
    try:
        assert d.proc.wait(120) == 78, d.log()
        log = d.log()
    finally:
        d.cleanup()
    assert named in log and not_named not in log, log
    if named.startswith("model.input_height"):                 # and the values the program takes
        assert f"set model.input_height = {SIZE} and model.input_width = {SIZE}" in log, log
