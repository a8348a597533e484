"""The CUDA path (daemon/pipeline/engine.py, daemon/pipeline/streams.py) on a real GPU; skipped without one.

What the CPU tests (tests/unit/test_engine.py) cannot show: the real streams and events give the model's
answers, bf16 / fp16 / channels_last / CUDA graphs work, a daemon on cuda:0 serves, and no launch
or result ever synchronises the whole device."""
import numpy as np
import pytest
import torch

from helpers import sample_images
from inferd.client import Client
from inferd.daemon.models import loading as model_mod
from inferd.daemon.models import zoo
from inferd.daemon.config import ModelConfig
from inferd.daemon.pipeline.engine import Engine, Staging
from inferd.daemon.pipeline.engine_options import EngineOptions
from inferd.daemon.pipeline.preprocess import to_input
from inferd.daemon.models.zoo.shapes import make_dataset

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA device (torch.cuda.is_available() is false)")]
GPU = torch.device("cuda:0")


def _want(images: np.ndarray, k: int):
    model, spec = zoo.build("shapes")
    with torch.inference_mode():
        x = to_input(torch.from_numpy(images), spec.mean, spec.std)
        scores, idx = torch.softmax(model(x), dim=1).topk(k, dim=1)
    return idx.tolist(), scores.numpy()


def _engine(options=EngineOptions(), builtin="shapes"):
    model = model_mod.load(ModelConfig(builtin=builtin))
    engine = Engine(GPU, model, keep_k=3, options=options)
    engine.load()
    return engine


def _staging(n: int, seed: int = 11):
    images, _ = make_dataset(n, seed=seed)
    staging = Staging(GPU, 32, (64, 64, 3))
    assert staging.tensors[0].is_pinned()
    for a in staging.arrays:
        a[:n] = images
    return images, staging


@pytest.fixture
def no_device_sync(monkeypatch):
    """Counts torch.cuda.synchronize calls (whole-device waits) while the test runs."""
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (calls.append(a), real(*a, **k)))
    return calls


# fp32 against the CPU within 1e-2: cuDNN's fp32 convolutions use TF32 by torch's default
@pytest.mark.parametrize("options, atol, top1", [
    (EngineOptions(), 1e-2, 32),
    (EngineOptions(channels_last=True), 1e-2, 32),
    (EngineOptions(precision="bf16"), 0.05, 30),
    (EngineOptions(precision="fp16", channels_last=True), 0.03, 31),
    (EngineOptions(compile="graphs"), 1e-2, 32),
    (EngineOptions(precision="bf16", channels_last=True, compile="graphs"), 0.05, 30),
])
def test_engine_answers_like_the_model_without_a_device_sync(options, atol, top1, no_device_sync):
    images, staging = _staging(32)
    engine = _engine(options)
    want_idx, want_scores = _want(images, 3)
    engine.launch(staging.tensors[0], 1, 1).result()    # the warm-up (captures graphs: syncs)
    no_device_sync.clear()
    for n in (32, 3, 17):                               # padded up to 32, 4, 32 with graphs
        pending = engine.launch(staging.tensors[0], n, 3, want_embedding=True)
        assert pending.staged()                         # wait_copy: the staging buffer is free
        indices, scores, vectors = pending.result()
        assert len(indices) == n and vectors.shape == (n, engine.embedding_dim)
        assert sum(a[0] == b[0] for a, b in zip(indices, want_idx[:n])) >= top1 * n // 32
        np.testing.assert_allclose(np.asarray(scores)[:, 0], want_scores[:n, 0], atol=atol)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert no_device_sync == []


def test_overlapped_launches_keep_their_own_answers(no_device_sync):
    images, staging = _staging(32)
    staging.arrays[1][:32] = images[::-1]
    engine = _engine()
    pendings = []
    for i in range(6):                                   # launch k+1 before waiting for k
        p = engine.launch(staging.tensors[i % 2], 32, 1, wait_copy=False)
        p.wait_staged()
        pendings.append(p)
    results = [p.result()[0] for p in pendings]
    assert all(0 < p.device_seconds() < 10 for p in pendings)   # its own batch, from CUDA events
    want_idx, _ = _want(images, 1)
    assert all(r == (want_idx if i % 2 == 0 else want_idx[::-1]) for i, r in enumerate(results))
    assert no_device_sync == []


def test_a_daemon_on_cuda_serves_the_models_answers(fresh_daemon):
    d = fresh_daemon("--device", "cuda:0", "--set", "model.compile=graphs",
                     "--set", "batching.max_batch=16")
    images, _ = make_dataset(40, seed=4242)
    want_idx, want_scores = _want(images, 5)
    with Client(d.socket_path) as client:
        got = client.classify_many(list(images), top_k=5)
        info = client.info()
    for row, top in enumerate(got):
        assert [p.index for p in top][:1] == want_idx[row][:1]
        np.testing.assert_allclose([p.score for p in top], want_scores[row], atol=1e-2)
    assert info["counters"]["frames"] >= 40
    assert d.stop() == 0


def test_a_bf16_daemon_on_cuda_classifies_the_samples(fresh_daemon):
    d = fresh_daemon("--device", "cuda:0", "--set", "model.precision=bf16",
                     "--set", "model.channels_last=true")
    with Client(d.socket_path) as client:
        for label, image in sample_images():
            assert client.classify(image, top_k=1)[0].label == label
    assert d.stop() == 0
