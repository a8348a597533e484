"""Bring your own model: a classifier that normalises inside and takes uint8 NHWC frames, saved
with torch.export (.pt2) or TorchScript, served without a wrapper, labels file or mean/std, and
answering exactly what the model itself answers; labels fetched once on request, model.name."""
import numpy as np
import pytest
import torch
from torch import nn

from helpers import RawClient, admin_path, spawn_daemon
from inferd.client import AdminClient, Client
from inferd.shm import wire

pytestmark = pytest.mark.timeout(180)

SIZE = 32          # frames are SIZE x SIZE x 3
CLASSES = 10


class Normalising(nn.Module):
    """What an exported production model looks like: uint8 NHWC in, its own normalisation."""

    def __init__(self, classes: int = CLASSES, seed: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(8 * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float().div(255.0)
        return self.head(self.body((x - self.mean) / self.std))


def _save(model: nn.Module, kind: str, directory) -> str:
    example = torch.randint(0, 256, (4, SIZE, SIZE, 3), dtype=torch.uint8)
    if kind == "export":
        path = str(directory / "model.pt2")
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}), path)
    elif kind == "script":
        path = str(directory / "model.pt")
        torch.jit.script(model).save(path)
    else:
        path = str(directory / "model.pt")
        torch.jit.trace(model, example).save(path)
    return path


def _frames(n: int, seed: int = 11) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _want(model: nn.Module, frames: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """top-k of softmax(model(frame)) for each frame, as the daemon computes it: one frame per
    batch (batching.max_batch=1, so the batch composition is known) in float32."""
    out = []
    with torch.inference_mode():
        for frame in frames:
            logits = model(torch.from_numpy(frame[None].copy()))
            scores, indices = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
            out.append(list(zip(indices[0].tolist(), scores[0].tolist())))
    return out


def _spawn(path: str, *extra: str):
    return spawn_daemon("--set", "model.input=uint8_nhwc", "--set", f"model.input_height={SIZE}",
                        "--set", f"model.input_width={SIZE}", "--set", "batching.max_batch=1",
                        "--set", "cache.enabled=false", *extra, model=path)


@pytest.mark.parametrize("kind", ["export", "script", "trace"])
def test_a_model_that_normalises_inside_answers_exactly_what_it_computes(tmp_path, kind):
    model = Normalising().eval()
    path = _save(model, kind, tmp_path)
    frames = _frames(12)
    want = _want(model, frames, 5)
    d = _spawn(path, "--set", f'model.name="byo-{kind}"')
    try:
        with Client(d.socket_path) as c:
            assert (c.model.name, c.model.classes, c.model.labels_id) == (f"byo-{kind}", CLASSES, "numbered")
            got = c.classify_many(list(frames), top_k=5)
            again = c.classify(frames[0], top_k=5)
        for predictions, expected in zip([*got, again], [*want, want[0]]):
            assert [(p.index, p.score) for p in predictions] == expected        # exactly, not close
            assert [p.label for p in predictions] == [str(i) for i, _ in expected]   # numbered
        assert d.stop() == 0
    finally:
        d.cleanup()


def test_hello_stays_small_and_labels_come_once_on_request(tmp_path):
    """1000 named classes: hello says how many and which list, the labels request brings the names
    (in index order), and a Client asks for them once however many replies it names."""
    model = Normalising(classes=1000).eval()
    path = _save(model, "export", tmp_path)
    names = [f"a rather long class name number {i}" for i in range(1000)]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    d = _spawn(path, "--set", f'model.labels="{tmp_path}/labels.txt"')
    try:
        raw = RawClient(d.socket_path)
        described = raw.hello_reply["model"]
        assert "labels" not in described and described["classes"] == 1000
        assert len(wire.encode(raw.hello_reply)) < 1024            # the names alone are 35 KB
        raw.send({"op": "labels", "id": 7})
        reply = raw.recv()
        assert reply["ok"] and reply["id"] == 7 and reply["labels"] == names
        assert reply["labels_id"] == described["labels_id"] != "numbered"
        raw.close()
        with Client(d.socket_path) as c:
            asked = []
            inner = c._call_locked
            c._call_locked = lambda message: asked.append(message["op"]) or inner(message)
            top = c.classify_many(list(_frames(6)), top_k=3)
            top += [c.classify(_frames(1, seed=5)[0], top_k=1)]
            assert c.labels() == tuple(names)
            assert asked == ["labels"]                                  # once, on demand
        want = _want(model, np.concatenate([_frames(6), _frames(1, seed=5)]), 3)
        for predictions, expected in zip(top, want):
            assert [(p.index, p.label) for p in predictions] == [(i, names[i]) for i, _ in expected][:len(predictions)]
        assert d.stop() == 0
    finally:
        d.cleanup()


def test_model_name_is_shown_in_info_stats_and_metrics(tmp_path):
    path = _save(Normalising().eval(), "export", tmp_path)
    d = _spawn(path, "--set", 'model.name="fraud-detector-v7"')
    try:
        with Client(d.socket_path) as c:
            assert c.model.name == "fraud-detector-v7"
            assert c.info()["model"]["name"] == "fraud-detector-v7"
            raw = RawClient(d.socket_path)
            raw.send({"op": "labels", "id": 1})
            assert raw.recv()["labels"] == [str(i) for i in range(CLASSES)]     # numbered on request too
            raw.close()
        with AdminClient(admin_path(d)) as admin:
            assert admin.call("stats")["model"]["name"] == "fraud-detector-v7"
            assert admin.call("health")["model"]["name"] == "fraud-detector-v7"
            text = admin.call("metrics")["text"]
        assert 'inferd_model_info{digest=' in text and 'name="fraud-detector-v7"' in text
        assert 'name="model"' not in text                               # not the file's name
        assert d.stop() == 0
    finally:
        d.cleanup()


def test_an_exported_model_s_named_layer_gives_embeddings(tmp_path):
    # torch.export's module() inlines the submodules, so a hook on one never fired: the daemon
    # loads an exported program with a named embedding layer through unflatten, which keeps them
    path = _save(Normalising().eval(), "export", tmp_path)
    d = _spawn(path, "--set", 'model.embedding_layer="body.0"', "--set", "embeddings.enabled=true")
    try:
        with Client(d.socket_path) as c:
            vector = c.embed(_frames(1)[0])
        assert vector.shape == (8,) and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    finally:
        d.stop()
        d.cleanup()
