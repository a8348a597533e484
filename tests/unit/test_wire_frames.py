"""Frames: split correctly, refuse an oversized header before reading its body, report bad bodies."""
import msgpack
import pytest

from inferd.shm import wire


def test_frames_split_across_and_within_chunks():
    data = wire.encode({"op": "ping", "id": 1}) + wire.encode({"op": "ping", "id": 2})
    reader = wire.FrameReader(1024)
    got = []
    for i in range(len(data)):                       # one byte at a time
        got.extend(reader.feed(data[i:i + 1]))
    assert [m["id"] for m in got] == [1, 2]
    assert reader.pending() == 0


def test_oversized_header_is_refused_before_the_body_arrives():
    reader = wire.FrameReader(1024)
    with pytest.raises(wire.FrameError) as err:
        reader.feed(wire.HEADER.pack(4 * 2**30 - 1))  # header alone: 4 GiB announced
    assert err.value.code == wire.E_FRAME_TOO_LARGE
    assert "4294967295" in str(err.value) and "1024" in str(err.value)


@pytest.mark.parametrize("body, fragment", [
    (msgpack.packb({"op": "ping", "id": 1})[:-2], "not valid msgpack"),     # truncated
    (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
    (msgpack.packb({"a": 1}) + b"\x01", "not valid msgpack"),             # trailing bytes
    (msgpack.packb({"a": msgpack.ExtType(5, b"x")}), "extension type 5"),
    (msgpack.packb({1: 2}), "not valid msgpack"),                          # non-str key
])
def test_bad_bodies_come_back_in_place_and_the_stream_stays_in_sync(body, fragment):
    reader = wire.FrameReader(1024)
    out = reader.feed(wire.HEADER.pack(len(body)) + body + wire.encode({"op": "ping", "id": 9}))
    assert isinstance(out[0], wire.FrameError) and out[0].code == wire.E_BAD_FRAME
    assert fragment in str(out[0])
    assert out[1] == {"op": "ping", "id": 9}


def test_error_reply_shape():
    assert wire.error(3, wire.E_OVERLOADED, "busy", retry_after_ms=5.0) == {
        "id": 3, "ok": False, "code": "overloaded", "message": "busy", "retry_after_ms": 5.0}


def test_answers_pack_and_unpack_to_the_replies_they_stand_for():
    tops = [[[3, 0.5], [1, 0.25]], [[0, 1.0]], [[7, 0.125], [2, 0.0625], [5, 1e-300]]]
    ids = [10, 11, 2**40]
    frame = wire.pack_answers(ids, [len(t) for t in tops], tops, 3)
    (message,) = wire.FrameReader(1 << 20, wire.MAX_DEPTH).feed(frame)
    replies = wire.unpack_answers(message)
    assert replies == [{"id": rid, "ok": True, "top": [tuple(p) for p in top], "gen": 3}
                       for rid, top in zip(ids, tops)]
    (unstamped,) = wire.FrameReader(1 << 20, wire.MAX_DEPTH).feed(wire.pack_answers([1], [1], [[[4, 0.5]]], 0))
    assert wire.unpack_answers(unstamped) == [{"id": 1, "ok": True, "top": [(4, 0.5)]}]
    (hits,) = wire.FrameReader(1 << 20, wire.MAX_DEPTH).feed(
        wire.pack_answers([1, 2], [1, 1], [[[4, 0.5]], [[5, 0.25]]], 2, [False, True]))
    assert wire.unpack_answers(hits) == [{"id": 1, "ok": True, "top": [(4, 0.5)], "gen": 2},
                                         {"id": 2, "ok": True, "top": [(5, 0.25)], "gen": 2, "cached": True}]


@pytest.mark.parametrize("bad", [
    {"answers": [1, 2], "k": (1).to_bytes(4, "little"), "top": b"\0" * 12},          # k for one of two
    {"answers": [1], "k": (2).to_bytes(4, "little"), "top": b"\0" * 12},             # one pair for two
    {"answers": [1], "k": (1).to_bytes(4, "little"), "top": b"\0" * 11},             # a torn pair
    {"answers": [1], "k": (-1).to_bytes(4, "little", signed=True), "top": b""},
    {"answers": "1", "k": b"", "top": b""},
    {"answers": [1], "k": (1).to_bytes(4, "little"), "top": b"\0" * 12, "gen": "3"},
    {"answers": [1], "k": (1).to_bytes(4, "little"), "top": b"\0" * 12, "cached": b"\1\1"},
])
def test_an_answers_message_that_does_not_add_up_is_a_bad_frame(bad):
    with pytest.raises(wire.FrameError) as err:
        wire.unpack_answers(bad)
    assert err.value.code == wire.E_BAD_FRAME
