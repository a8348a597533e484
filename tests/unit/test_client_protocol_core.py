"""The protocol core (inferd.client.protocol) driven by hand, without a socket: frames and slots in,
events out. What both clients rely on: a slot is free again only with its reply, what was in
flight on a lost connection goes again and what was answered never does, a cancelled call's
replies only free slots, and a reply for no request is a ProtocolError."""
import os
from types import SimpleNamespace

import numpy as np
import pytest

from inferd.client import DeadlineExceeded, Overloaded, ProtocolError
from inferd.client.connection import ModelInfo
from inferd.client.hits import HitReport
from inferd.client.protocol import ProtocolCore
from inferd.client.retry import MAX_LOSSES, Call
from inferd.shm import wire
from inferd.shm.ring import Ring, RingGeometry

SLOTS = 3
MODEL = ModelInfo("fake", "d1", (8, 8, 3), ("a", "b", "c"), 1, gen=1, classes=3)


class Timers:
    """An injected timer that never fires: the test reads what is counted."""

    def __call__(self, delay, callback):
        return SimpleNamespace(cancel=lambda: None)


@pytest.fixture
def session():
    rings = []

    def make(model=MODEL):
        ring, fd = Ring.create(RingGeometry(SLOTS, 8 * 8 * 3), prefix=f"inferdproto{os.getpid()}")
        os.close(fd)
        rings.append(ring)
        return SimpleNamespace(session=len(rings), model=model, preprocess_id=None, cache=None, ring=ring)
    yield make
    for ring in rings:
        ring.close()


def _core(resubmit=True):
    return ProtocolCore(HitReport(lambda: None, 0.5, Timers()), resubmit=resubmit)


def _frames(n):
    return [np.full((8, 8, 3), i, np.uint8) for i in range(n)]


def _sent(data: bytes) -> list[dict]:
    return wire.FrameReader(wire.MAX_REPLY_FRAME).feed(data) if data else []


def test_slots_are_taken_as_they_free_and_the_frame_is_in_its_slot(session):
    core, conn = _core(), session()
    core.adopt(conn)
    call = Call("classify", {"top_k": 1}, deadline=10.0, frames=_frames(5))
    first = _sent(core.submit(call, now=0.0))
    assert len(first) == SLOTS and not core.free and len(call.todo) == 2
    for msg in first:
        assert conn.ring.slot(msg["slot"], 192)[0] == msg["id"] - 1     # frame i holds the byte i
    assert _sent(core.submit(call, now=0.0)) == []                       # nothing free: nothing sent
    assert core.receive({"id": first[0]["id"], "ok": True, "top": [[1, 0.9]]}) is call
    (second,) = _sent(core.submit(call, now=0.0))
    assert second["slot"] == first[0]["slot"] and call.inflight == SLOTS


def test_a_lost_connection_resends_what_was_unanswered_never_what_was_answered(session):
    core = _core()
    core.adopt(session())
    call = Call("classify", {"top_k": 1}, deadline=10.0, frames=_frames(3))
    sent = _sent(core.submit(call, now=0.0))
    core.receive({"id": sent[1]["id"], "ok": True, "top": [[2, 0.5]]})
    assert core.connection_lost() == [call] and core.resubmitted == 2
    successor = session()
    core.adopt(successor)
    again = _sent(core.submit(call, now=1.0))
    assert sorted(int(successor.ring.slot(m["slot"], 192)[0]) for m in again) == [0, 2]   # frames 0, 2
    assert [m["timeout_ms"] for m in again] == [9000.0, 9000.0]          # what is left of the deadline
    assert core.reconnects == 1 and call.results[1][0]["top"] == [[2, 0.5]]


def test_a_request_lost_too_often_fails_and_a_passed_deadline_is_not_resent(session):
    core = _core()
    call = Call("classify", {"top_k": 1}, deadline=10.0, frames=_frames(1))
    for _ in range(MAX_LOSSES):
        core.adopt(session())
        assert _sent(core.submit(call, now=0.0))
        core.connection_lost()
    assert not call.unfinished() and "broke 3 times" in str(call.first_error)
    late = Call("classify", {"top_k": 1}, deadline=1.0, frames=_frames(1))
    core.adopt(session())
    assert core.submit(late, now=2.0) == b"" and isinstance(late.first_error, DeadlineExceeded)


def test_shutting_down_is_resent_an_error_is_the_daemons_word(session):
    core = _core()
    core.adopt(session())
    call = Call("classify", {"top_k": 1}, deadline=10.0, frames=_frames(2))
    a, b = _sent(core.submit(call, now=0.0))
    core.receive({"id": a["id"], "ok": False, "code": wire.E_SHUTTING_DOWN, "message": "draining"})
    assert core.draining and list(call.todo) == [0] and core.submit(call, now=0.0) == b""
    core.receive({"id": b["id"], "ok": False, "code": wire.E_OVERLOADED, "message": "full"})
    assert isinstance(call.first_error, Overloaded) and core.idle()
    refused = _core(resubmit=False)
    refused.adopt(session())
    other = Call("ping", {}, deadline=10.0)
    (p,) = _sent(refused.submit(other, now=0.0))
    refused.receive({"id": p["id"], "ok": False, "code": wire.E_SHUTTING_DOWN, "message": "draining"})
    assert other.first_error.code == wire.E_SHUTTING_DOWN and not other.todo


def test_an_abandoned_call_keeps_its_slots_until_their_replies(session):
    core = _core()
    core.adopt(session())
    call = Call("classify", {"top_k": 1}, deadline=10.0, frames=_frames(2))
    sent = _sent(core.submit(call, now=0.0))
    core.abandon(call)
    assert len(core.free) == SLOTS - 2 and not call.unfinished()
    assert core.receive({"id": sent[0]["id"], "ok": True, "top": [[0, 1.0]]}) is None
    assert len(core.free) == SLOTS - 1 and call.results == [None, None]
    assert core.connection_lost() == [] and core.resubmitted == 0       # nobody waits to resend it


def test_replies_for_no_request_and_malformed_replies(session):
    core = _core()
    core.adopt(session())
    call = Call("classify", {"top_k": 1}, deadline=10.0, frames=_frames(1))
    (msg,) = _sent(core.submit(call, now=0.0))
    with pytest.raises(ProtocolError, match=f"reply for id 99, expected {msg['id']}"):
        core.receive({"id": 99, "ok": True})
    with pytest.raises(ProtocolError, match="unreadable"):
        core.receive(["not", "a", "map"])
    assert core.receive({"id": 0, "ok": False, "code": wire.E_UNKNOWN_OP}) is None   # a refused note
    with pytest.raises(ProtocolError, match="outside 0..2"):
        core.top({"top": [[3, 0.1]]}, MODEL)
    with pytest.raises(ProtocolError, match="embedding"):
        core.embedding({"embedding": b"abc"})
    with pytest.raises(ProtocolError, match="near reply"):
        core.matches({"matches": [["zz", None, 0.5]]})


def test_a_new_generation_in_a_reply_becomes_the_model_and_old_replies_keep_theirs(session):
    core = _core()
    core.adopt(session())
    call = Call("classify", {"top_k": 1}, deadline=10.0, frames=_frames(2))
    a, b = _sent(core.submit(call, now=0.0))
    new = {"name": "fake", "digest": "d2", "input": [8, 8, 3], "labels": ["x", "y", "z"], "top_k": 1, "gen": 2}
    core.receive({"id": a["id"], "ok": True, "top": [[0, 1.0]], "gen": 2, "model": new})
    core.receive({"id": b["id"], "ok": True, "top": [[0, 1.0]], "gen": 1})
    assert core.model.gen == 2 and call.results[0][1].labels == ("x", "y", "z")
    assert call.results[1][1].labels == ("a", "b", "c")


def test_local_hits_ride_on_the_next_frame_request(session):
    core = _core()
    core.adopt(session())
    core.hits.add(2)
    (msg,) = _sent(core.submit(Call("classify", {"top_k": 1}, 10.0, _frames(1)), now=0.0))
    assert msg["hits"] == 2 and core.hits_note() == b""


def test_a_logits_call_asks_the_daemon_and_reads_one_float32_per_class(session):
    core = _core()
    core.adopt(session())
    results, todo, extra = core.look_up([SimpleNamespace(encoded_hash=None)], 2, None, logits=True)
    assert results == [None] and todo == [0] and extra == {"top_k": 2, "logits": True}   # no "looked"
    (msg,) = _sent(core.submit(Call("classify", extra, 10.0, _frames(1)), now=0.0))
    assert msg["logits"] is True
    row = np.array([0.5, -1.0, 3.0], np.float32)
    pairs, model, logits = core.answer({"top": [[2, 0.9], [0, 0.1]], "logits": row.tobytes()}, MODEL, True)
    assert pairs == [(2, 0.9), (0, 0.1)] and model is MODEL and np.array_equal(logits, row)
    preds = core.predictions(pairs, MODEL.labels, logits)
    assert [p.label for p in preds] == ["c", "a"] and preds.logits is logits
    assert core.predictions(pairs, MODEL.labels).logits is None
    for bad in ({"top": [[2, 0.9]]}, {"top": [[2, 0.9]], "logits": row[:2].tobytes()}):
        with pytest.raises(ProtocolError, match="logits"):
            core.answer(bad, MODEL, True)


def test_models_listed_later_are_asked_for_at_most_once_a_second_and_sized_against_the_ring(session):
    """A model loaded live since hello: the core may ask info for the list once per
    LIST_MODELS_S; what it learns resolves, and a model whose frames outgrow the ring's slots is
    refused naming why rather than written past a slot."""
    from inferd.client import UnknownModel
    from inferd.client.protocol import LIST_MODELS_S

    core = _core()
    core.adopt(session())
    with pytest.raises(UnknownModel, match="serves fake"):
        core.target("b", None)
    assert core.may_list_models(100.0)
    assert not core.may_list_models(100.0 + LIST_MODELS_S / 2)
    assert core.may_list_models(100.0 + LIST_MODELS_S)
    listed = [{"name": n, "digest": f"d{n}", "input": list(shape), "top_k": 1, "classes": 3,
               "version": 1, "route": "stable", "labels_id": "numbered"}
              for n, shape in (("fake", (8, 8, 3)), ("b", (4, 4, 3)), ("big", (16, 16, 3)))]
    core.learn_models(listed)
    assert core.target("b", None)[0].input_shape == (4, 4, 3)
    assert core.target(None, None)[0].name == "fake"
    with pytest.raises(UnknownModel, match="ring slots"):
        core.target("big", None)
    with pytest.raises(UnknownModel, match="b v1"):
        core.target("nowhere", None)
    core.adopt(session())                          # a new session: hello's list again
    assert not core.too_large and not core.catalog
