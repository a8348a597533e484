"""A real daemon serving two models reports each one apart: the admin ``stats`` has a row per model
(requests, answers, errors, latency split, batch sizes, device seconds and share), the Prometheus
text labels the families a model owns with ``model`` and ``version`` (parsed back with
prometheus_client's own parser), and ``inferctl top`` shows a row per model. The counts are
checked against what the clients sent."""
import os
import subprocess
import sys

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import RawClient, admin_path, short_dir, spawn_daemon
from inferd.client import AdminClient, Client
from inferd.shm import wire

pytestmark = pytest.mark.timeout(180)

TWO_MODELS = """
[[models]]
builtin = "shapes"
default = true
share = 2.0
warmup_batches = 1

[[models]]
builtin = "synthetic"
name = "synth"
warmup_batches = 1
"""


@pytest.fixture(scope="module")
def two():
    path = os.path.join(short_dir(), "models.toml")
    with open(path, "w") as fh:
        fh.write(TWO_MODELS)
    d = spawn_daemon("--config", path, "--set", "cache.enabled=false", model="")   # every frame computed
    yield d
    rc = d.stop()
    d.cleanup()
    assert rc == 0, f"daemon exited with {rc}:\n{d.log()}"


def _samples(text: str) -> dict:
    return {(x.name, tuple(sorted(x.labels.items()))): x.value
            for fam in text_string_to_metric_families(text) for x in fam.samples}


def _at(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_stats_and_metrics_count_each_model_apart(two):
    rng = np.random.default_rng(5)
    with Client(two.socket_path, ring_slots=16) as c:
        c.classify_many([rng.integers(0, 256, (64, 64, 3), np.uint8) for _ in range(12)])
    with Client(two.socket_path, ring_slots=16, model="synth") as c:
        c.classify_many([np.full((16, 16, 3), 9 * i, np.uint8) for i in range(5)])
    raw = RawClient(two.socket_path)
    try:
        raw.classify(1, 0, np.zeros((16, 16, 3), np.uint8), model="nope")      # no model: the daemon's
        assert raw.recv()["code"] == wire.E_UNKNOWN_MODEL
        raw.classify(2, 0, np.zeros((64, 64, 3), np.uint8), model="synth")     # synth's: a wrong shape
        assert raw.recv()["code"] == wire.E_INVALID_INPUT
    finally:
        raw.close()
    with AdminClient(admin_path(two)) as admin:
        snap = admin.call("stats")
        text = admin.call("metrics")["text"]

    rows = {m["name"]: m for m in snap["models"]}
    shapes, synth = rows["shapes"], rows["synth"]
    assert shapes["outcomes"] == {"ok": 12} and shapes["answers"] == 12 and shapes["errors"] == 0
    assert synth["outcomes"] == {"ok": 5, wire.E_INVALID_INPUT: 1} and synth["requests"] == 6
    assert shapes["frames"] == 12 and synth["frames"] == 5 and shapes["default"] and not synth["default"]
    assert sum(size * n for size, n in shapes["batch_sizes"]) == 12
    for row, n in ((shapes, 12), (synth, 5)):
        assert {phase: h["count"] for phase, h in row["latency"].items()} == dict.fromkeys(
            ("queue", "compute", "reply", "total"), n)
        (dev,) = row["devices"]                         # one CPU device, shared
        assert dev["seconds"] > 0 and 0 < dev["share"] < 1
    assert shapes["devices"][0]["share"] + synth["devices"][0]["share"] == pytest.approx(1, abs=1e-3)
    assert shapes["devices"][0]["share_configured"] == pytest.approx(2 / 3, abs=1e-3)
    assert snap["requests"]["outcomes"][wire.E_UNKNOWN_MODEL] == 1

    samples = _samples(text)
    assert _at(samples, "inferd_requests_total", outcome="ok", model="shapes", version="1") == 12
    assert _at(samples, "inferd_requests_total", outcome="ok", model="synth", version="1") == 5
    assert _at(samples, "inferd_requests_total", outcome="invalid_input", model="synth", version="1") == 1
    assert _at(samples, "inferd_requests_total", outcome="unknown_model", model="", version="") == 1
    assert _at(samples, "inferd_device_frames_total", device="cpu#0", model="synth", version="1") == 5
    assert _at(samples, "inferd_request_duration_seconds_count", phase="queue", model="shapes", version="1") == 12
    busy = {m: _at(samples, "inferd_device_busy_seconds_total", device="cpu#0", model=m, version="1")
            for m in rows}
    assert busy["shapes"] > 0 and busy["synth"] > 0
    assert _at(samples, "inferd_model_share", model="shapes", version="1") == 2.0
    infos = [dict(lab) for (name, lab), v in samples.items() if name == "inferd_model_info"]
    assert sorted((i["name"], i["is_default"]) for i in infos) == [("shapes", "1"), ("synth", "0")]


def test_inferctl_top_shows_a_row_per_model(two):
    with Client(two.socket_path, model="synth") as c:
        c.classify(np.zeros((16, 16, 3), np.uint8))
    out = subprocess.run([sys.executable, "-m", "inferd.client.cli", "top", "--iterations", "1"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "INFERD_SOCKET": two.socket_path})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("model"))
    assert "share 10s" in lines[header] and "compute p50" in lines[header]
    names = [ln.split()[:2] for ln in lines[header + 1:header + 3]]
    assert names == [["shapes", "v1"], ["synth", "v1"]], out.stdout
    assert lines[header + 1].split()[2] == "*"             # the default model
