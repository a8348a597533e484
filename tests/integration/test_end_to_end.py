"""The whole request path with a real daemon process: answers, exactness, pipelining, clients."""
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT, sample_images
from inferd.client import Client, InvalidInput
from inferd.daemon.models import zoo
from inferd.daemon.pipeline.preprocess import to_input
from inferd.daemon.models.zoo.shapes import make_dataset

pytestmark = pytest.mark.timeout(180)


def test_sample_images_get_their_labels(daemon):
    samples = sample_images()
    assert len(samples) == 8
    with Client(daemon.socket_path) as client:
        assert client.model.name == "shapes" and client.model.input_shape == (64, 64, 3)
        for label, image in samples:
            top = client.classify(image, top_k=3)
            assert len(top) == 3 and top[0].label == label, (label, top)
            assert top[0].score >= top[1].score >= top[2].score


def test_answers_equal_the_in_process_model(daemon):
    """Same frames, same preprocessing: identical top-k indices, scores within 1e-5."""
    images, _ = make_dataset(48, seed=4242)
    model, spec = zoo.build("shapes")
    with torch.inference_mode():
        x = to_input(torch.from_numpy(images), torch.tensor(spec.mean), torch.tensor(spec.std))
        want_scores, want_idx = torch.softmax(model(x), dim=1).topk(8, dim=1)
    with Client(daemon.socket_path) as client:
        got = client.classify_many(list(images), top_k=8)
    for row, top in enumerate(got):
        assert [p.index for p in top] == want_idx[row].tolist()
        np.testing.assert_allclose([p.score for p in top], want_scores[row].numpy(), atol=1e-5, rtol=0)


def test_pipelining_over_few_slots_keeps_answers_in_order(daemon):
    images, _ = make_dataset(120, seed=99)
    with Client(daemon.socket_path, ring_slots=4) as client:
        one_by_one = [client.classify(img, top_k=2) for img in images[:20]]
        many = client.classify_many(list(images), top_k=2)
    for batched, single in zip(many[:20], one_by_one):   # batch composition moves the last bits only
        assert [p.index for p in batched] == [p.index for p in single]
        np.testing.assert_allclose([p.score for p in batched], [p.score for p in single], atol=1e-5)
    assert len(many) == 120 and all(len(t) == 2 for t in many)


def test_requests_in_flight_together_share_batches(daemon):
    images, _ = make_dataset(64, seed=5)
    with Client(daemon.socket_path, ring_slots=32) as client:
        before = client.info()["counters"]
        client.classify_many(list(images))
        after = client.info()["counters"]
    frames = after["frames"] - before.get("frames", 0)
    batches = after["batches"] - before.get("batches", 0)
    assert frames == 64 and batches < 64 / 2, (frames, batches)


def test_torch_tensors_and_other_sizes_are_converted(daemon):
    label, image = sample_images()[0]
    bigger = np.array(Image.fromarray(image).resize((128, 128), Image.Resampling.NEAREST))
    chw_float = torch.from_numpy(bigger).permute(2, 0, 1).float() / 255.0
    with Client(daemon.socket_path) as client:
        direct = client.classify(image)
        from_tensor = client.classify(chw_float)
        from_uint8_hwc = client.classify(torch.from_numpy(image))
        grey = client.classify(image[:, :, 0])
        with pytest.raises(InvalidInput, match="expected dtype uint8"):
            client.classify(image.astype(np.float64))
        with pytest.raises(InvalidInput, match="HxWx3"):
            client.classify(np.zeros((4, 4, 5), np.uint8))
    assert [p.index for p in from_uint8_hwc] == [p.index for p in direct]
    assert from_tensor[0].label == label          # resized 128 -> 64 (bilinear) still recognised
    assert len(grey) == 5


def test_one_client_shared_by_threads(daemon):
    samples = sample_images()
    errors, results = [], {}
    with Client(daemon.socket_path) as client:
        def work(k):
            try:
                results[k] = [client.classify(img)[0].label for _, img in samples]
            except Exception as exc:  # collected and asserted below
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors
    assert all(results[k] == [label for label, _ in samples] for k in range(4))


CHILD = r"""
import json, sys
from inferd.client import Client
from inferd.daemon.models.zoo.shapes import make_dataset
images, _ = make_dataset(40, seed=int(sys.argv[2]))
with Client(sys.argv[1], ring_slots=8) as c:
    print(json.dumps([t[0].index for t in c.classify_many(list(images))]))
"""


@pytest.mark.slow
def test_several_client_processes_get_their_own_answers(daemon):
    """Four processes at once, each with different images; each gets the answers for its own."""
    seeds = [11, 12, 13, 14]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, daemon.socket_path, str(s)],
                              stdout=subprocess.PIPE) for s in seeds]
    outputs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    model, spec = zoo.build("shapes")
    for seed, got in zip(seeds, outputs):
        images, _ = make_dataset(40, seed=seed)
        with torch.inference_mode():
            x = to_input(torch.from_numpy(images), torch.tensor(spec.mean), torch.tensor(spec.std))
            want = model(x).argmax(dim=1).tolist()
        assert got == want


def test_inferctl_ping_info_and_classify(daemon, tmp_path):
    label, image = sample_images()[3]
    npy = tmp_path / "frame.npy"
    np.save(npy, image)
    png = str(sorted((ROOT / "samples").glob("*.png"))[0])
    run = lambda *a: subprocess.run([sys.executable, "-m", "inferd.client.cli", "--socket",
                                     daemon.socket_path, *a], capture_output=True, text=True, timeout=60)
    ping = run("ping")
    assert ping.returncode == 0 and "pong" in ping.stdout
    info = run("info")
    assert info.returncode == 0 and json.loads(info.stdout)["model"]["name"] == "shapes"
    out = run("classify", str(npy), png, "-k", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(f"{npy}: {label} ") and lines[1].split(": ")[1].startswith("circle ")
    missing = run("classify", str(tmp_path / "missing.npy"))
    assert missing.returncode == 2 and "missing.npy" in missing.stderr


def test_a_reply_for_an_unknown_id_closes_the_session(daemon):
    """If the stream ever carries a reply the client did not ask for, it closes rather than
    read later replies out of step."""
    from inferd.client import DaemonUnavailable, ProtocolError
    from inferd.shm import wire

    with Client(daemon.socket_path) as client:
        client._conn.send(wire.encode({"op": "ping", "id": 10**6}))   # a reply nobody waits for
        with pytest.raises(ProtocolError, match="reply for id 1000000, expected .*session is closed"):
            client.ping()
        with pytest.raises(DaemonUnavailable, match="closed"):
            client.ping()
