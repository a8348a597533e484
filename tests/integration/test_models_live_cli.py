"""inferctl's model commands through the real CLI against a real daemon: models, load, classify
with the model loaded, reload NAME, promote NAME VERSION, unload NAME, and their errors."""
import json
import os
import subprocess
import sys

import pytest

from helpers import admin_path, short_dir, spawn_daemon

pytestmark = pytest.mark.timeout(180)


def inferctl(d, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferd.client.cli", "--admin-socket", admin_path(d),
                           "--socket", d.socket_path, *args], capture_output=True, text=True, timeout=60)


def ok(d, *args) -> str:
    done = inferctl(d, *args)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def test_inferctl_models_load_reload_promote_unload():
    work = short_dir()
    config = os.path.join(work, "models.toml")
    with open(config, "w") as fh:
        fh.write('[[models]]\nbuiltin = "synthetic"\nname = "a"\nwarmup_batches = 1\n')
    labels = os.path.join(work, "two.labels")
    with open(labels, "w") as fh:
        fh.write("".join(f"two_{k}\n" for k in range(10)))
    frame = os.path.join(work, "white.npy")
    import numpy as np
    np.save(frame, np.full((16, 16, 3), 255, np.uint8))
    d = spawn_daemon("--config", config, model="")
    try:
        text = ok(d, "models")
        assert text.splitlines()[0].split()[:3] == ["model", "version", "route"]
        assert "a: stable version 1" in text
        out = ok(d, "load", "b", "synthetic", "--share", "2", "--set", "warmup_batches=1")
        assert "loaded b version 1" in out and "b: stable version 1" in out
        out = ok(d, "load", "b", "synthetic", "--version", "2", "--canary-percent", "10",
                 "--set", f'labels="{labels}"', "--devices", "0")
        assert "canary version 2 (10 % of requests" in out
        listed = json.loads(ok(d, "models", "--json"))
        assert {(m["name"], m["version"], m["route"]) for m in listed["models"]} == {
            ("a", 1, "stable"), ("b", 1, "stable"), ("b", 2, "canary")}
        assert next(m for m in listed["models"] if m["version"] == 2)["devices"] == [0]
        assert "level_9" in ok(d, "classify", frame, "--model", "b", "--version", "1", "-k", "1")
        assert "two_9" in ok(d, "classify", frame, "--model", "b", "--version", "2", "-k", "1")
        assert "generation 2" in ok(d, "reload", "b", "--version", "1", "--set", f'model.labels="{labels}"')
        assert "b version 2 takes every request" in ok(d, "promote", "b", "2")
        assert "two_9" in ok(d, "classify", frame, "--model", "b", "-k", "1")
        out = ok(d, "unload", "b", "--version", "1")
        assert "unloaded b version 1" in out
        out = ok(d, "unload", "b")
        assert "unloaded b version 2" in out
        assert [m["name"] for m in json.loads(ok(d, "models", "--json"))["models"]] == ["a"]
        gone = inferctl(d, "unload", "b")
        assert gone.returncode == 1 and "UnknownModel" in gone.stderr and "a (versions 1)" in gone.stderr
        first = inferctl(d, "unload", "a")
        assert first.returncode == 1 and "first model" in first.stderr
        bad = inferctl(d, "load", "x", "synthetic", "--devices", "7")
        assert bad.returncode == 1 and "devices [7] do not exist" in bad.stderr
        usage = inferctl(d, "load", "x", "synthetic", "--devices", "zero")
        assert usage.returncode == 2
    finally:
        rc = d.stop()
        d.cleanup()
    assert rc == 0, d.log()
