"""Several models in one daemon ([[models]]): each answers as the in-process model does, requests
name theirs (or get the default), an unknown one is a typed error naming those there are, hello
and info list them, and no batch ever mixes two models."""
import asyncio
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from helpers import RawClient, admin_path, short_dir, spawn_daemon, wait_until
from inferd.client import AdminClient, AsyncClient, Client, InvalidInput, ReloadFailed, UnknownModel
from inferd.daemon import exitcodes
from inferd.daemon.models import zoo
from inferd.daemon.models.zoo.shapes import make_dataset
from inferd.daemon.models.zoo.synthetic import level_of
from inferd.daemon.pipeline.preprocess import to_input
from inferd.shm import wire

pytestmark = pytest.mark.timeout(180)

TWO_MODELS = """
[[models]]
builtin = "shapes"
default = true
warmup_batches = 1

[[models]]
builtin = "synthetic"
name = "synth"
warmup_batches = 1
"""


def write_config(text: str) -> str:
    path = os.path.join(short_dir(), "models.toml")
    with open(path, "w") as fh:
        fh.write(text)
    return path


@pytest.fixture(scope="module")
def two():
    d = spawn_daemon("--config", write_config(TWO_MODELS), model="")
    yield d
    rc = d.stop()
    d.cleanup()
    assert rc == 0, f"daemon exited with {rc}:\n{d.log()}"


def in_process_shapes(images: np.ndarray, k: int):
    model, spec = zoo.build("shapes")
    with torch.inference_mode():
        x = to_input(torch.from_numpy(images), torch.tensor(spec.mean), torch.tensor(spec.std))
        return torch.softmax(model(x), dim=1).topk(k, dim=1)


def test_each_model_answers_as_in_process_under_mixed_load(two):
    """Both models at once from two threads: shapes' answers equal the in-process model's, the
    synthetic model's name each frame's level, and the daemon counts batches of each model and
    none that mixed them (the executor fails such a batch; the loop counts it apart)."""
    images, _ = make_dataset(96, seed=7)
    want_scores, want_idx = in_process_shapes(images, 5)
    levels = [(i * 37) % 256 for i in range(96)]
    frames = [np.full((16, 16, 3), v, np.uint8) for v in levels]
    got = {}

    def shapes():
        with Client(two.socket_path, ring_slots=16) as c:
            got["shapes"] = [c.classify_many(list(images[i:i + 16]), top_k=5) for i in range(0, 96, 16)]

    def synth():
        with Client(two.socket_path, ring_slots=16, model="synth") as c:
            got["synth"] = [c.classify_many(frames[i:i + 16], top_k=1) for i in range(0, 96, 16)]

    threads = [threading.Thread(target=shapes), threading.Thread(target=synth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    tops = [t for chunk in got["shapes"] for t in chunk]
    for row, top in enumerate(tops):
        assert [p.index for p in top] == want_idx[row].tolist()
        np.testing.assert_allclose([p.score for p in top], want_scores[row].numpy(), atol=1e-5, rtol=0)
    answers = [t[0] for chunk in got["synth"] for t in chunk]
    assert [p.index for p in answers] == [level_of(v) for v in levels]
    assert all(p.label == f"level_{level_of(v)}" for p, v in zip(answers, levels))   # synth's own labels
    with Client(two.socket_path) as c:
        counters = c.info()["counters"]
    assert counters["mixed_batches"] == 0
    assert counters["batches_model_0"] > 0 and counters["batches_model_1"] > 0
    assert counters["frames_model_0"] >= 96 and counters["frames_model_1"] >= 96


def test_async_client_names_its_model_and_sizes_frames_for_it(two):
    """AsyncClient(model=...) and a per-call model: frames of any size are resized for the model
    that answers (a 64x64 white frame becomes synth's 16x16: level 9)."""
    async def run():
        async with AsyncClient(two.socket_path, model="synth") as c:
            white = np.full((64, 64, 3), 255, np.uint8)
            mine = await c.classify(white, top_k=1)
            other = await c.classify(white, top_k=2, model="shapes")
            names = await c.labels(model="synth")
            with pytest.raises(UnknownModel):
                await c.classify(white, model="synth", version=3)
            return mine, other, names
    mine, other, names = asyncio.run(run())
    assert (mine[0].index, mine[0].label) == (9, "level_9") and names[9] == "level_9"
    assert len(other) == 2 and other[0].label in zoo.build("shapes")[1].labels


def test_unknown_model_is_a_typed_error_naming_the_models(two):
    raw = RawClient(two.socket_path)
    try:
        frame = np.zeros((16, 16, 3), np.uint8)
        raw.classify(1, 0, frame, model="nope")
        reply = raw.recv()
        assert reply["code"] == wire.E_UNKNOWN_MODEL
        assert "shapes" in reply["message"] and "synth" in reply["message"]
        raw.classify(2, 0, frame, model="synth", version=7)
        reply = raw.recv()
        assert reply["code"] == wire.E_UNKNOWN_MODEL and "version" in reply["message"]
        raw.send({"op": "classify_many", "id": 3, "slots": [0, 1], "shape": [16, 16, 3], "dtype": "uint8",
                  "nbytes": 768, "model": 5})
        reply = raw.recv()                  # one ``replies`` message: the errors of a message go together
        assert [m["code"] for m in reply["replies"]] == [wire.E_UNKNOWN_MODEL] * 2
    finally:
        raw.close()
    with Client(two.socket_path) as c, pytest.raises(UnknownModel, match="synth"):
        c.classify(frame, model="nope")


def test_a_frame_is_checked_against_its_own_model(two):
    """Slots hold the largest model's frame; a frame of the default's shape sent for synth is refused."""
    raw = RawClient(two.socket_path)
    try:
        assert raw.ring.geometry.slot_bytes == 64 * 64 * 3
        raw.classify(1, 0, np.zeros((64, 64, 3), np.uint8), model="synth")
        reply = raw.recv()
        assert reply["code"] == wire.E_INVALID_INPUT and "[16, 16, 3]" in reply["message"]
        raw.classify(2, 1, np.full((16, 16, 3), 255, np.uint8), model="synth", top_k=1)
        reply = raw.recv()
        assert reply["ok"] and reply["top"][0][0] == 9 and reply["served"] == ["synth", 1]
    finally:
        raw.close()
    with Client(two.socket_path) as c, pytest.raises(InvalidInput):
        c.classify(np.zeros((16, 16, 3), np.uint8), top_k=11, model="synth")     # synth has 10 classes


def test_hello_and_info_list_the_models(two):
    raw = RawClient(two.socket_path)
    try:
        hello = raw.hello_reply
    finally:
        raw.close()
    assert hello["model"]["name"] == "shapes" and hello["default_model"] == "shapes"
    listed = {(m["name"], m["version"]): m for m in hello["models"]}
    assert set(listed) == {("shapes", 1), ("synth", 1)}
    assert listed["synth", 1]["input"] == [16, 16, 3] and listed["synth", 1]["classes"] == 10
    assert listed["shapes", 1]["default"] and not listed["synth", 1]["default"]
    assert listed["shapes", 1]["digest"] != listed["synth", 1]["digest"]
    with Client(two.socket_path) as c:
        info = c.info()
        assert [(m["name"], m["input"]) for m in info["models"]] == [("shapes", [64, 64, 3]), ("synth", [16, 16, 3])]
        assert c.labels(model="synth")[3] == "level_3"
        assert c.labels() == tuple(zoo.build("shapes")[1].labels)
        assert c.classify(np.zeros((64, 64, 3), np.uint8), model="default").__len__() == 5


def test_a_one_model_daemon_says_nothing_new(daemon):
    """[model] alone: hello and replies as before (no ``models``, no ``served``), and its model
    answers to its own name and to "default"."""
    raw = RawClient(daemon.socket_path)
    try:
        assert "models" not in raw.hello_reply
        raw.classify(1, 0, np.zeros((64, 64, 3), np.uint8))
        reply = raw.recv()
        assert reply["ok"] and "served" not in reply
        raw.classify(2, 1, np.zeros((64, 64, 3), np.uint8), model="shapes")
        assert raw.recv()["ok"]
        raw.classify(3, 2, np.zeros((64, 64, 3), np.uint8), model="default")
        assert raw.recv()["ok"]
        raw.classify(4, 3, np.zeros((64, 64, 3), np.uint8), model="resnet18")
        assert raw.recv()["code"] == wire.E_UNKNOWN_MODEL
    finally:
        raw.close()


def test_a_reload_names_the_model_it_swaps(two):
    """With several models a reload must name one; the named one is swapped (its generation moves
    on, its answers keep coming), the other is untouched."""
    with AdminClient(admin_path(two)) as admin:
        with pytest.raises(ReloadFailed, match="several models"):
            admin.call("reload")
        with pytest.raises(ReloadFailed, match="no model 'nope'"):
            admin.call("reload", name="nope")
        before = {m["name"]: m for m in admin.call("health")["models"]}
        reply = admin.call("reload", name="synth", set={"top_k": 3})
        assert reply["changed"] and reply["model"]["name"] == "synth"
        after = {m["name"]: m for m in admin.call("health")["models"]}
    assert after["synth"]["gen"] == before["synth"]["gen"] + 1
    assert after["synth"]["digest"] == before["synth"]["digest"]       # same weights, same keys
    assert after["shapes"] == before["shapes"]
    with Client(two.socket_path, model="synth") as c:
        assert c.classify(np.full((16, 16, 3), 255, np.uint8), top_k=1)[0].label == "level_9"
        assert c.info()["models"][1]["top_k"] == 3


def test_inferctl_classify_takes_a_model(two, tmp_path):
    frame = tmp_path / "white.npy"
    np.save(frame, np.full((40, 40, 3), 255, np.uint8))
    run = lambda *a: subprocess.run([sys.executable, "-m", "inferd.client.cli", "--socket", two.socket_path,
                                     "classify", "--json", "-k", "1", *a], capture_output=True, text=True,
                                    timeout=60)
    out = run("--model", "synth", str(frame))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[str(frame)][0]["label"] == "level_9"
    bad = run("--model", "nope", str(frame))
    assert bad.returncode == 1 and "synth" in bad.stderr and "nope" in bad.stderr


def test_start_up_names_the_entry_that_does_not_load():
    work = short_dir()
    junk = os.path.join(work, "junk.pt2")
    with open(junk, "wb") as fh:
        fh.write(b"not a model")
    config = write_config(TWO_MODELS + f"""
[[models]]
path = "{junk}"
input = "uint8_nhwc"
input_height = 16
input_width = 16
""")
    d = spawn_daemon("--config", config, model="", wait=False)
    try:
        rc = d.proc.wait(120)
        log = d.log()
    finally:
        d.kill()
    assert rc == exitcodes.CONFIG, log
    assert "configuration error: models[2] (junk version 1): model.path: cannot load" in log, log


def test_a_named_model_is_answered_from_the_local_cache_under_its_own_key(two):
    """A repeat for synth is found in the client's read-only mapping, under synth's digest and
    preprocessing (hello's ``models``), not the default model's."""
    frame = np.full((16, 16, 3), 77, np.uint8)
    with Client(two.socket_path, model="synth") as c:
        first = c.classify(frame, top_k=1)
        wait_until(lambda: c.classify(frame, top_k=1) and c.cache_hits >= 1, 10, "a local hit for synth")
        hits = c.cache_hits
        assert c.classify(frame, top_k=1)[0].index == first[0].index == level_of(77)
        assert c.cache_hits == hits + 1


def test_a_reload_of_the_default_model_renames_its_classes_in_the_client(two):
    """The default model swapped to other labels: a client connected before names the next
    answers with the new labels (the first answer of the new generation carries it, filed under
    its name and version), and the other model's answers keep theirs."""
    labels = os.path.join(short_dir(), "shapes.labels")
    names = [f"renamed_{k}" for k in range(len(zoo.build("shapes")[1].labels))]
    with open(labels, "w") as fh:
        fh.write("\n".join(names) + "\n")
    frame = np.zeros((64, 64, 3), np.uint8)
    with Client(two.socket_path) as c:
        before = c.classify(frame, top_k=1)[0]
        with AdminClient(admin_path(two)) as admin:
            assert admin.call("reload", name="shapes", set={"labels": labels})["changed"]
        after = [c.classify(frame, top_k=1, model=m)[0] for m in (None, "shapes", "synth")]
    assert not before.label.startswith("renamed_")
    assert after[0].label == after[1].label == names[after[0].index]
    assert after[2].label.startswith("level_")
