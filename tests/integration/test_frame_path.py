"""The frame path off the event loop (NOTE [ request path ] in daemon/pipeline/collector.py),
through real daemons: a cache hit found once a row is staged and hashed costs no model row;
identical frames of a session in flight are computed once, across devices too; classify_many
carries many slots in one message, and a batch's replies to a session come in one message;
malformed batched messages get typed errors.
"""
from collections import Counter

import numpy as np
import pytest

from helpers import RawClient
from inferd.client import Client
from inferd.client.connection import Connection
from inferd.daemon.models.zoo.shapes import make_dataset
from inferd.shm import wire

pytestmark = pytest.mark.timeout(120)

SHAPE = [64, 64, 3]
NBYTES = 64 * 64 * 3


def _info(path: str) -> tuple[Counter, Counter]:
    """The daemon's counters and its cache's, 0 for those not counted yet."""
    with Client(path, cache=False) as probe:
        info = probe.info()
    return Counter(info["counters"]), Counter({k: v for k, v in info["cache"].items() if type(v) is int})


def _many(raw: RawClient, first: int, slots: list, frames=None, **fields) -> None:
    """One classify_many of ``slots`` (their frames written first), ids first, first + 1, ..."""
    for slot, frame in zip(slots, frames) if frames is not None else ():
        raw.ring.slot(slot, frame.nbytes)[:] = frame.reshape(-1)
    msg = {"op": wire.CLASSIFY_MANY, "id": first, "slots": slots, "shape": SHAPE, "dtype": "uint8",
           "nbytes": NBYTES}
    msg.update(fields)
    raw.send(msg)


def _replies(raw: RawClient, n: int) -> tuple[dict, int]:
    """``n`` replies by id, and how many messages they came in."""
    got, messages = {}, 0
    while len(got) < n:
        m = raw.recv()
        assert m is not None, f"connection closed with {len(got)} of {n} replies"
        messages += 1
        for r in (m[wire.REPLIES] if wire.REPLIES in m else [m]):
            assert r["id"] not in got, f"two replies for id {r['id']}"
            got[r["id"]] = r
    return got, messages


def test_a_hit_found_after_staging_costs_no_model_row(fresh_daemon):
    """Frames the daemon has answered come back in a call with new ones: the collector finds them
    in the cache once hashed, answers them at once, and the model computes only the new rows."""
    d = fresh_daemon()
    images, _ = make_dataset(6, seed=901)
    with Client(d.socket_path, cache=False) as c:       # no lookup of its own: the daemon finds them
        first = c.classify_many(list(images[:3]), top_k=3)
        before, cache0 = _info(d.socket_path)
        again = c.classify_many([images[0], images[3], images[1], images[4], images[2], images[5]], top_k=3)
        after, cache1 = _info(d.socket_path)
    assert [p.index for p in again[0]] == [p.index for p in first[0]]
    assert [p.index for p in again[2]] == [p.index for p in first[1]]
    assert [p.index for p in again[4]] == [p.index for p in first[2]]
    assert after["frames"] - before["frames"] == 3      # model rows: the three new frames alone
    assert cache1["daemon_hits"] - cache0["daemon_hits"] == 3
    assert after["hashed"] - before["hashed"] == 6      # every frame hashed, by its collector


def test_identical_frames_across_two_devices_are_computed_once(fresh_daemon):
    d = fresh_daemon("--device", "cpu:1", "--device", "cpu:1")
    (img,), _ = make_dataset(1, seed=902)
    raw = RawClient(d.socket_path, ring_slots=16)
    try:
        before, cache0 = _info(d.socket_path)
        _many(raw, 1, list(range(16)), [img] * 16)
        got, _ = _replies(raw, 16)
        after, cache1 = _info(d.socket_path)
    finally:
        raw.close()
    assert sorted(got) == list(range(1, 17)) and all(r["ok"] for r in got.values())
    assert len({tuple(map(tuple, r["top"])) for r in got.values()}) == 1
    assert after["frames"] - before["frames"] == 1
    # each of the other 15 rode on the one in flight, or (once it was answered) hit the cache
    assert (after["coalesced"] - before["coalesced"]) + (cache1["daemon_hits"] - cache0["daemon_hits"]) == 15


def test_one_message_carries_many_slots_and_a_batch_answers_in_one(fresh_daemon):
    d = fresh_daemon("--set", "batching.max_batch=8")
    images, _ = make_dataset(16, seed=903)
    raw = RawClient(d.socket_path, ring_slots=16)
    try:
        assert raw.hello_reply["limits"]["max_batch_requests"] == wire.MAX_BATCH_REQUESTS
        before, _ = _info(d.socket_path)
        _many(raw, 100, list(range(16)), list(images), top_k=1)
        got, messages = _replies(raw, 16)
        after, _ = _info(d.socket_path)
    finally:
        raw.close()
    assert sorted(got) == list(range(100, 116)) and all(r["ok"] for r in got.values())
    batches = after["batches"] - before["batches"]
    assert after["frames"] - before["frames"] == 16 and batches >= 2      # max_batch 8
    assert messages == batches                  # one message (and write) per batch for this session


def test_the_client_library_sends_one_message_for_a_call(daemon, monkeypatch):
    sent = []
    real = Connection.send
    monkeypatch.setattr(Connection, "send", lambda self, data: (sent.append(bytes(data)), real(self, data))[1])
    images, _ = make_dataset(12, seed=904)
    with Client(daemon.socket_path, cache=False) as c:
        sent.clear()
        tops = c.classify_many(list(images), top_k=2)
    assert len(tops) == 12 and all(len(t) == 2 for t in tops)
    frames = wire.FrameReader(wire.MAX_REPLY_FRAME).feed(b"".join(sent[:1]))
    assert len(sent) >= 1 and len(frames) == 1
    assert frames[0]["op"] == wire.CLASSIFY_MANY and len(frames[0]["slots"]) == 12


@pytest.mark.parametrize("fields,code,match", [
    ({"slots": 3}, wire.E_BAD_REQUEST, "slots must be a list"),
    ({"slots": []}, wire.E_BAD_REQUEST, "slots must be a list"),
    ({"slots": list(range(wire.MAX_BATCH_REQUESTS + 1))}, wire.E_BAD_REQUEST, "slots must be a list"),
    ({"slots": [0, 1], "upload_slot": 4, "upload_nbytes": 10}, wire.E_BAD_REQUEST, "carries no upload"),
])
def test_a_malformed_batch_is_refused_whole(daemon, fields, code, match):
    raw = RawClient(daemon.socket_path, ring_slots=8)
    try:
        _many(raw, 7, **fields)
        reply = raw.recv()
        assert reply["id"] == 7 and not reply["ok"] and reply["code"] == code and match in reply["message"], reply
        (img,), _ = make_dataset(1, seed=905)
        _many(raw, 20, [0, 1], [img, img])                        # nothing was taken
        got, _ = _replies(raw, 2)
        assert all(r["ok"] for r in got.values())
    finally:
        raw.close()


def test_bad_requests_of_a_batch_get_their_own_errors(daemon):
    images, _ = make_dataset(3, seed=906)
    raw = RawClient(daemon.socket_path, ring_slots=8)
    try:
        for slot, img in zip((0, 2, 5), images):
            raw.ring.slot(slot, img.nbytes)[:] = img.reshape(-1)
        _many(raw, 1, [0, 99, "x", 2, 2, -1, 5])
        got, _ = _replies(raw, 7)
        codes = {rid: (r["ok"], r.get("code")) for rid, r in got.items()}
        assert codes == {1: (True, None), 2: (False, wire.E_INVALID_INPUT), 3: (False, wire.E_BAD_REQUEST),
                         4: (True, None), 5: (False, wire.E_SLOT_BUSY), 6: (False, wire.E_INVALID_INPUT),
                         7: (True, None)}, codes
        _many(raw, 10, [0, 1], shape=[32, 32, 3])                 # a shared field wrong: each refused
        got, _ = _replies(raw, 2)
        assert [got[i]["code"] for i in (10, 11)] == [wire.E_INVALID_INPUT] * 2
    finally:
        raw.close()


def test_a_client_rewriting_its_slots_after_a_batched_submit_never_poisons_the_cache(fresh_daemon):
    """The row is the daemon's copy: what a client writes into its slots after submitting changes
    at most its own answers, and what is stored is the answer for the bytes hashed."""
    d = fresh_daemon()
    images, _ = make_dataset(2, seed=907)
    a, b = images
    with Client(d.socket_path, cache=False) as honest:
        want_a, want_b = (t[0].index for t in honest.classify_many([a, b], top_k=1))
    assert not np.array_equal(a, b)
    raw = RawClient(d.socket_path, ring_slots=16)
    try:
        for round_ in range(20):
            _many(raw, 1 + 16 * round_, list(range(16)), [a] * 16)
            for slot in range(16):                                # rewrite while they are in flight
                raw.ring.slot(slot, b.nbytes)[:] = b.reshape(-1)
            got, _ = _replies(raw, 16)
            assert all(r["ok"] and r["top"][0][0] in (want_a, want_b) for r in got.values())
    finally:
        raw.close()
    with Client(d.socket_path) as honest:                         # the cache still says a is a, b is b
        got = [t[0].index for t in honest.classify_many([a, b], top_k=1)]
    assert got == [want_a, want_b]
