"""The OIP front routes by model name (daemon/oip/backend.py ``target``): against a real daemon
serving shapes (the default), synth version 1 and synth version 2 (stable), tritonclient[http] and
tritonclient[grpc] read each model's own metadata, infer on the model the path names (synth's
answers are its levels, with its own labels; shapes' equal the Python client's), a version named
in the path is the version that computes (the daemon's per-model stats say which), an unknown
model is 404 / NOT_FOUND naming it and the models there are, and the repository index lists
them. The one-model front's paths: tests/integration/test_oip_front.py."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest

from helpers import admin_path, short_dir, spawn_daemon, wait_until
from inferd.client import AdminClient, Client
from inferd.daemon.models.zoo.synthetic import level_of
from test_oip_front import Front

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.timeout(300)

MODELS = """
[[models]]
builtin = "shapes"
default = true
warmup_batches = 1

[[models]]
builtin = "synthetic"
name = "synth"
version = 1
warmup_batches = 1

[[models]]
builtin = "synthetic"
name = "synth"
version = 2
warmup_batches = 1
"""


@pytest.fixture(scope="module")
def served():
    path = os.path.join(short_dir(), "models.toml")
    with open(path, "w") as fh:
        fh.write(MODELS)
    daemon = spawn_daemon("--config", path, "--set", "cache.enabled=false", model="")
    front = None
    try:
        front = Front(daemon, "oip.http=127.0.0.1:0", "oip.grpc=127.0.0.1:0")
        yield daemon, front
    finally:
        if front is not None:
            front.stop()
        rc = daemon.stop()
        daemon.cleanup()
        assert rc == 0, daemon.log()


def _levels(values: list[int]) -> np.ndarray:
    return np.stack([np.full((16, 16, 3), v, np.uint8) for v in values])


def _model_rows(daemon) -> dict:
    with AdminClient(admin_path(daemon)) as admin:
        return {(m["name"], m["version"]): m for m in admin.call("stats")["models"]}


def test_metadata_and_readiness_are_each_models_own(served):
    _, front = served
    h = tritonhttp.InferenceServerClient(front.http)
    g = tritongrpc.InferenceServerClient(front.grpc)
    for name, classes, versions in (("shapes", 8, ["1"]), ("synth", 10, ["1", "2"])):
        hm, gm = h.get_model_metadata(name), g.get_model_metadata(name, as_json=True)
        for md in (hm, gm):
            assert md["name"] == name and md["versions"] == versions
            assert [int(d) for d in md["outputs"][0]["shape"]] == [-1, classes]
        assert h.is_model_ready(name) and g.is_model_ready(name)
    assert h.get_model_metadata("synth", "2")["name"] == "synth"
    assert h.is_model_ready("synth", "2") and g.is_model_ready("synth", "1")
    assert not h.is_model_ready("synth", "3") and not h.is_model_ready("nope")
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):   # tritonclient.grpc raises it
        g.is_model_ready("nope")


def test_an_unknown_model_is_not_found_naming_it_and_the_models_there_are(served):
    _, front = served
    h = tritonhttp.InferenceServerClient(front.http)
    g = tritongrpc.InferenceServerClient(front.grpc)
    inp = tritonhttp.InferInput("IMAGE", [1, 16, 16, 3], "UINT8")
    inp.set_data_from_numpy(_levels([0]))
    for call in (lambda: h.get_model_metadata("nope"), lambda: h.infer("nope", [inp]),
                 lambda: h.infer("synth", [inp], model_version="7")):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "404" or "404" in str(caught.value.status())
        assert ("'nope'" in caught.value.message() or "version 7" in caught.value.message())
        assert "shapes" in caught.value.message() and "synth" in caught.value.message()
    ginp = tritongrpc.InferInput("IMAGE", [1, 16, 16, 3], "UINT8")
    ginp.set_data_from_numpy(_levels([0]))
    with pytest.raises(InferenceServerException) as caught:
        g.infer("nope", [ginp])
    assert caught.value.status() == "StatusCode.NOT_FOUND" and "'nope'" in caught.value.message()


def test_infer_goes_to_the_model_and_version_the_path_names(served):
    daemon, front = served
    before = _model_rows(daemon)
    values = [0, 40, 100, 170, 255]
    batch = _levels(values)
    h = tritonhttp.InferenceServerClient(front.http)
    g = tritongrpc.InferenceServerClient(front.grpc)
    inp = tritonhttp.InferInput("IMAGE", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch, binary_data=True)
    out = [tritonhttp.InferRequestedOutput("SCORES", binary_data=True, class_count=1)]
    result = h.infer("synth", [inp], outputs=out)
    tops = [row[0].decode() for row in result.as_numpy("SCORES")]
    assert [t.split(":")[1:] for t in tops] == [[str(level_of(v)), f"level_{level_of(v)}"] for v in values]
    # no version named: synth's route, whose stable version is the newest (no canary configured)
    assert result.get_response()["model_name"] == "synth" and result.get_response()["model_version"] == "2"
    pinned = h.infer("synth", [inp], outputs=out, model_version="1")
    assert pinned.get_response()["model_version"] == "1"
    ginp = tritongrpc.InferInput("IMAGE", list(batch.shape), "UINT8")
    ginp.set_data_from_numpy(batch)
    gres = g.infer("synth", [ginp], model_version="2",
                   outputs=[tritongrpc.InferRequestedOutput("SCORES", class_count=1)])
    assert [row[0].decode().split(":")[2] for row in gres.as_numpy("SCORES")] == \
        [f"level_{level_of(v)}" for v in values]
    assert gres.get_response().model_version == "2"

    shapes = np.random.default_rng(3).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    sinp = tritonhttp.InferInput("IMAGE", list(shapes.shape), "UINT8")
    sinp.set_data_from_numpy(shapes)
    scores = h.infer("shapes", [sinp]).as_numpy("SCORES")
    with Client(daemon.socket_path) as c:
        want = c.classify_many(list(shapes), top_k=8)
    for row, preds in zip(scores, want):
        assert int(np.argmax(row)) == preds[0].index

    after = _model_rows(daemon)
    sent = lambda key: after[key]["requests"] - before[key]["requests"]
    assert sent(("synth", 1)) == len(values)                  # pinned to 1 (HTTP)
    assert sent(("synth", 2)) == 2 * len(values)              # the route's stable, and pinned to 2 (gRPC)
    assert sent(("shapes", 1)) == 3 + 3                       # the front's and the Python client's


def test_the_repository_index_lists_every_model_and_its_state(served):
    _, front = served
    h = tritonhttp.InferenceServerClient(front.http)
    index = h.get_model_repository_index()
    assert sorted((m["name"], m["version"], m["state"]) for m in index) == [
        ("shapes", "1", "READY"), ("synth", "1", "READY"), ("synth", "2", "READY")]
    req = urllib.request.Request(f"http://{front.http}/v2/repository/index", data=b'{"ready": true}', method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert len(json.loads(resp.read())) == 3
    req = urllib.request.Request(f"http://{front.http}/v2/repository/index", method="GET")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=10)
    assert caught.value.code == 405


def test_a_model_loaded_live_is_served_by_the_running_front_and_one_unloaded_is_not_found(served):
    """The front's hello did not list it: the name is looked for in the daemon's info."""
    daemon, front = served
    h = tritonhttp.InferenceServerClient(front.http)
    g = tritongrpc.InferenceServerClient(front.grpc)
    with AdminClient(admin_path(daemon)) as admin:
        admin.call("load", name="late", model="synthetic", set={"warmup_batches": 1})
        try:
            def metadata():             # the client library asks info at most once a second
                try:
                    return h.get_model_metadata("late")
                except InferenceServerException:
                    return None
            assert wait_until(metadata, 10, "the front serving the model loaded live")["name"] == "late"
            inp = tritonhttp.InferInput("IMAGE", [1, 16, 16, 3], "UINT8")
            inp.set_data_from_numpy(_levels([255]))
            out = [tritonhttp.InferRequestedOutput("SCORES", class_count=1)]
            top = h.infer("late", [inp], outputs=out).as_numpy("SCORES")[0][0]
            assert (top.decode() if isinstance(top, bytes) else top).split(":")[1] == str(level_of(255))
            ginp = tritongrpc.InferInput("IMAGE", [1, 16, 16, 3], "UINT8")
            ginp.set_data_from_numpy(_levels([0]))
            assert g.infer("late", [ginp]).as_numpy("SCORES").shape == (1, 10)
            assert ("late", "1", "READY") in {(m["name"], m["version"], m["state"])
                                              for m in h.get_model_repository_index()}
        finally:
            admin.call("unload", name="late")
    with pytest.raises(InferenceServerException) as caught:
        h.infer("late", [inp], outputs=out)
    assert "404" in str(caught.value.status()) and "late" in caught.value.message()
