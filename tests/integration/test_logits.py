"""A classify that asks for its logits (``logits: true``, docs/protocol.md) through a real daemon:
the rows equal the in-process model's, such a request is always computed (never a cache hit, never
coalesced) while its top-k still fills the cache, and requests that do not ask get what they got
before."""
import asyncio

import numpy as np
import pytest
import torch

from helpers import RawClient
from inferd.client import AsyncClient, Client, InvalidInput
from inferd.daemon.models import zoo
from inferd.daemon.models.zoo.shapes import make_dataset
from inferd.daemon.pipeline.preprocess import to_input
from inferd.shm import wire

pytestmark = pytest.mark.timeout(180)


def in_process(images):
    """The built-in shapes model's logits [N, C] and softmax top-3 indices, in this process."""
    model, spec = zoo.build("shapes")
    with torch.inference_mode():
        raw = model(to_input(torch.from_numpy(np.stack(images)), torch.tensor(spec.mean), torch.tensor(spec.std)))
        idx = torch.softmax(raw, dim=1).topk(3, dim=1).indices
    return raw.float().numpy(), idx.tolist()


def frames_computed(client) -> int:
    return client.info()["counters"].get("frames", 0)


def test_logits_equal_the_in_process_model_and_plain_answers_carry_none(daemon):
    images, _ = make_dataset(20, seed=1901)
    want, want_idx = in_process(images)
    with Client(daemon.socket_path, cache=False) as c:
        got = c.classify_many(list(images), top_k=3, logits=True)
        plain = c.classify_many(list(images), top_k=3)
        one = c.classify(images[3], top_k=3, logits=True)
    for row, preds in enumerate(got):
        assert preds.logits.dtype == np.float32 and preds.logits.shape == (8,)
        np.testing.assert_allclose(preds.logits, want[row], atol=1e-4, rtol=1e-5)
        assert [p.index for p in preds] == want_idx[row]
        assert preds == plain[row] and plain[row].logits is None     # the same top-k either way
    np.testing.assert_allclose(one.logits, want[3], atol=1e-4, rtol=1e-5)


def test_the_async_client_gets_them_too(daemon):
    images, _ = make_dataset(5, seed=1902)
    want, _ = in_process(images)

    async def run():
        async with AsyncClient(daemon.socket_path) as c:
            return await c.classify_many(list(images), top_k=2, logits=True), \
                await c.classify(images[0], logits=True)

    got, one = asyncio.run(run())
    np.testing.assert_allclose(np.stack([p.logits for p in got]), want, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(one.logits, want[0], atol=1e-4, rtol=1e-5)


def test_a_logits_request_after_a_cached_frame_is_computed_and_fills_the_cache(daemon):
    images, _ = make_dataset(2, seed=1903)
    want, _ = in_process(images)
    with Client(daemon.socket_path) as c:            # with the client's read-only cache mapped
        first = c.classify(images[0], top_k=3)
        assert c.classify(images[0], top_k=3) == first and c.cache_hits == 1   # cached now
        before, hits = frames_computed(c), c.info()["cache"]["daemon_hits"]
        again = c.classify(images[0], top_k=3, logits=True)
        assert frames_computed(c) == before + 1 and c.cache_hits == 1      # computed, not looked up
        assert c.info()["cache"]["daemon_hits"] == hits
        assert again == first
        np.testing.assert_allclose(again.logits, want[0], atol=1e-4, rtol=1e-5)
    with Client(daemon.socket_path, cache=False) as c:
        c.classify(images[1], top_k=3, logits=True)  # a new frame, first asked with its logits
        before, hits = frames_computed(c), c.info()["cache"]["daemon_hits"]
        c.classify(images[1], top_k=3)               # its top-k was stored: a daemon hit now
        assert frames_computed(c) == before and c.info()["cache"]["daemon_hits"] == hits + 1


def test_identical_frames_asking_for_logits_are_each_computed(daemon):
    (img,), _ = make_dataset(1, seed=1904)
    want, _ = in_process([img])
    c = RawClient(daemon.socket_path, ring_slots=8)
    try:
        with Client(daemon.socket_path) as probe:
            before = probe.info()["counters"]
        for slot in range(8):
            c.ring.slot(slot, img.nbytes)[:] = img.reshape(-1)
        c.send_raw(b"".join(wire.encode(
            {"op": "classify", "id": slot, "slot": slot, "shape": [64, 64, 3], "dtype": "uint8",
             "nbytes": img.nbytes, "top_k": 2, "logits": slot % 2 == 0}) for slot in range(8)))
        replies = {r["id"]: r for r in (c.recv() for _ in range(8))}
        with Client(daemon.socket_path) as probe:
            after = probe.info()["counters"]
    finally:
        c.close()
    assert sorted(replies) == list(range(8)) and all(r["ok"] for r in replies.values())
    for rid, r in replies.items():
        if rid % 2 == 0:
            assert len(r["logits"]) == 8 * 4
            np.testing.assert_allclose(np.frombuffer(r["logits"], np.float32), want[0], atol=1e-4, rtol=1e-5)
        else:
            assert "logits" not in r
    # the four that asked are computed each; the four others may coalesce among themselves, or find
    # an answer already in the cache (a loaded machine: a logits row computed first fills it)
    assert after["frames"] - before.get("frames", 0) >= 4
    assert after.get("coalesced", 0) - before.get("coalesced", 0) <= 3


def test_bad_logits_fields_are_refused_typed(daemon):
    images, _ = make_dataset(1, seed=1905)
    c = RawClient(daemon.socket_path, ring_slots=4)
    try:
        c.ring.slot(0, images[0].nbytes)[:] = images[0].reshape(-1)
        base = {"slot": 0, "shape": [64, 64, 3], "dtype": "uint8", "nbytes": images[0].nbytes}
        c.send_raw(wire.encode({"op": "classify", "id": 1, **base, "logits": "yes"}))
        r = c.recv()
        assert not r["ok"] and r["code"] == wire.E_BAD_REQUEST and "logits" in r["message"]
        c.send_raw(wire.encode({"op": "embed", "id": 2, **base, "logits": True}))
        r = c.recv()
        assert not r["ok"] and r["code"] == wire.E_INVALID_INPUT and "classify only" in r["message"]
    finally:
        c.close()
    with Client(daemon.socket_path) as client, pytest.raises(InvalidInput):
        client.classify(images[0], top_k=99, logits=True)


def test_a_batching_session_gets_logits_replies_in_frames_of_their_own(daemon):
    images, _ = make_dataset(8, seed=1906)
    want, _ = in_process(images)
    c = RawClient(daemon.socket_path, ring_slots=8)
    try:
        for slot in range(8):
            c.ring.slot(slot, images[slot].nbytes)[:] = images[slot].reshape(-1)
        shared = {"shape": [64, 64, 3], "dtype": "uint8", "nbytes": images[0].nbytes, "top_k": 2}
        c.send_raw(wire.encode({"op": wire.CLASSIFY_MANY, "id": 100, "slots": [0, 1, 2, 3], **shared})
                   + wire.encode({"op": wire.CLASSIFY_MANY, "id": 200, "slots": [4, 5, 6, 7], **shared,
                                  "logits": True}))
        got, bundled = {}, []
        while len(got) < 8:
            message = c.recv()
            for r in message.get(wire.REPLIES, [message]):
                got[r["id"]] = r
            bundled += [r["id"] for r in message.get(wire.REPLIES, [])]
    finally:
        c.close()
    assert sorted(got) == [100, 101, 102, 103, 200, 201, 202, 203]
    assert not any(rid >= 200 for rid in bundled)          # never inside a replies message
    for i in range(4):
        assert "logits" not in got[100 + i]
        np.testing.assert_allclose(np.frombuffer(got[200 + i]["logits"], np.float32), want[4 + i],
                                   atol=1e-4, rtol=1e-5)
