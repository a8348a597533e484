"""Model options through a real daemon: a bf16, channels_last daemon answers like the fp32 model, a
frozen one like the eager model (the engine itself, on CPU and a fake device:
tests/unit/test_engine.py)."""
import numpy as np
import pytest
import torch

from helpers import sample_images
from inferd.client import Client
from inferd.daemon.models import zoo
from inferd.daemon.pipeline.preprocess import to_input

pytestmark = pytest.mark.timeout(120)


def test_a_bf16_daemon_answers_like_the_fp32_model(fresh_daemon):
    d = fresh_daemon("--set", "model.precision=bf16", "--set", "model.channels_last=true")
    images = [img for _, img in sample_images()]
    model, spec = zoo.build("shapes")
    with torch.inference_mode():
        x = to_input(torch.from_numpy(np.stack(images)), spec.mean, spec.std)
        want = torch.softmax(model(x), dim=1).topk(1, dim=1)
    with Client(d.socket_path) as client:
        got = client.classify_many(images, top_k=1)
        assert client.model.digest.endswith("+bf16")
    assert [t[0].index for t in got] == want.indices[:, 0].tolist()
    np.testing.assert_allclose([t[0].score for t in got], want.values[:, 0].numpy(), atol=0.05)
    assert d.stop() == 0


def test_a_frozen_model_daemon_answers_and_embeds_as_the_eager_one(fresh_daemon):
    """model.compile = freeze: the same answers as the eager model in process, and the same
    embeddings as an eager daemon's (its embedding layer traced as a second output), within float
    rounding."""
    frozen = fresh_daemon("--set", "model.compile=freeze")
    eager = fresh_daemon()
    images = [img for _, img in sample_images()]
    model, spec = zoo.build("shapes")
    with torch.inference_mode():
        x = to_input(torch.from_numpy(np.stack(images)), spec.mean, spec.std)
        want = torch.softmax(model(x), dim=1).topk(3, dim=1)
    with Client(frozen.socket_path) as client, Client(eager.socket_path) as reference:
        got = client.classify_many(images, top_k=3)
        assert client.model.digest == reference.model.digest      # the same answers: the same keys
        for image in images:
            np.testing.assert_allclose(client.embed(image), reference.embed(image), atol=1e-5)
    assert [[p.index for p in t] for t in got] == want.indices.tolist()
    np.testing.assert_allclose([[p.score for p in t] for t in got], want.values.numpy(), atol=1e-5)
    assert "in channels_last, traced and frozen" in frozen.log()
    assert frozen.stop() == 0 and eager.stop() == 0
