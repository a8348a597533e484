"""The protocol limits (inferd.shm.limits) are the bounds both sides enforce: the client's own
checks, the daemon's admission (daemon/front/admission.py) and its configuration agree on every
edge, and the client's defaults are the daemon's. In-process, no daemon."""
import inspect
from types import SimpleNamespace

import pytest

from inferd.client import AsyncClient, Client, InvalidInput
from inferd.client import decode as client_decode
from inferd.client.connection import ModelInfo
from inferd.client.hits import HitReport
from inferd.client.protocol import ProtocolCore
from inferd.daemon.config import ConfigError, from_dict
from inferd.daemon.front.admission import (Rejected, check_classify, check_hits, check_logits, check_near,
                                           check_tag, check_upload)
from inferd.shm import limits, wire
from inferd.shm.ring import RingGeometry

SPEC = SimpleNamespace(frame_shape=(8, 8, 3), frame_bytes=8 * 8 * 3, top_k=1, labels=("a", "b", "c"))
RING = SimpleNamespace(geometry=RingGeometry(4, 8 * 8 * 3))


def _classify(**fields) -> dict:
    return {"slot": 0, "nbytes": SPEC.frame_bytes, "dtype": "uint8", "shape": [8, 8, 3], **fields}


def _core() -> ProtocolCore:
    core = ProtocolCore(HitReport(lambda: None, 0.5, lambda d, cb: SimpleNamespace(cancel=lambda: None)),
                        resubmit=False)
    core.model = ModelInfo("fake", "d1", (8, 8, 3), ("a", "b", "c"), 1, gen=1, classes=3)
    return core


def test_the_longest_timeout_is_one_bound_on_both_sides_and_in_the_configuration():
    assert limits.MAX_TIMEOUT_MS == 1000.0 * limits.MAX_TIMEOUT_S
    _core().check(1, limits.MAX_TIMEOUT_S)                     # the edge itself is allowed
    with pytest.raises(InvalidInput, match=f"at most {limits.MAX_TIMEOUT_S:g} s"):
        _core().check(1, limits.MAX_TIMEOUT_S * 1.0001)
    for bad in (0, -1, True, "5"):
        with pytest.raises(InvalidInput):
            _core().check(1, bad)
    slot, _, timeout = check_classify(_classify(timeout_ms=limits.MAX_TIMEOUT_MS), RING, SPEC, {}, 1000.0)
    assert timeout == limits.MAX_TIMEOUT_S
    with pytest.raises(Rejected, match=f"at most {limits.MAX_TIMEOUT_MS:.0f}") as refused:
        check_classify(_classify(timeout_ms=limits.MAX_TIMEOUT_MS + 1), RING, SPEC, {}, 1000.0)
    assert refused.value.code == wire.E_INVALID_INPUT
    assert from_dict({"batching": {"default_timeout_ms": limits.MAX_TIMEOUT_MS}}).batching.default_timeout_ms \
        == limits.MAX_TIMEOUT_MS
    with pytest.raises(ConfigError, match="batching.default_timeout_ms"):
        from_dict({"batching": {"default_timeout_ms": limits.MAX_TIMEOUT_MS + 1}})


def test_the_clients_near_duplicate_defaults_are_the_daemons():
    k, sim = check_near({})                             # what the daemon takes when none is named
    assert (k, sim) == (limits.DEFAULT_NEAR_K, limits.DEFAULT_MIN_SIMILARITY)
    for near in (Client.near_duplicates, AsyncClient.near_duplicates):
        params = inspect.signature(near).parameters
        assert params["k"].default == k and params["min_similarity"].default == sim, near


def test_near_bounds():
    assert check_near({"k": limits.MAX_NEAR_K, "min_similarity": -1}) == (limits.MAX_NEAR_K, -1.0)
    for bad in ({"k": 0}, {"k": limits.MAX_NEAR_K + 1}, {"k": 2.0}, {"min_similarity": 1.01},
                {"min_similarity": True}):
        with pytest.raises(Rejected):
            check_near(bad)


def test_logits_is_a_bool_for_classify_and_bounded_by_the_models_classes():
    narrow = SimpleNamespace(labels=("a",) * 8)
    wide = SimpleNamespace(labels=("a",) * (limits.MAX_LOGITS_CLASSES + 1))
    assert check_logits({}, narrow, "classify") is False
    assert check_logits({"logits": True}, narrow, "classify") is True
    assert check_logits({"logits": False}, wide, "embed") is False
    assert limits.MAX_LOGITS_CLASSES * 4 < wire.MAX_REPLY_FRAME      # a reply fits the client's frame
    for msg, spec, op, code in (({"logits": 1}, narrow, "classify", wire.E_BAD_REQUEST),
                                ({"logits": True}, narrow, "near", wire.E_INVALID_INPUT),
                                ({"logits": True}, wide, "classify", wire.E_INVALID_INPUT)):
        with pytest.raises(Rejected) as caught:
            check_logits(msg, spec, op)
        assert caught.value.code == code and "logits" in str(caught.value)


def test_a_tag_is_bounded_by_its_utf8_bytes():
    assert check_tag(None) is None
    assert check_tag("x" * limits.MAX_TAG_BYTES) == "x" * limits.MAX_TAG_BYTES
    with pytest.raises(Rejected, match=f"at most {limits.MAX_TAG_BYTES} bytes"):
        check_tag("x" * (limits.MAX_TAG_BYTES + 1))
    with pytest.raises(Rejected):                       # 33 characters, 66 bytes
        check_tag("é" * (limits.MAX_TAG_BYTES // 2 + 1))
    with pytest.raises(Rejected):
        check_tag(7)


def test_an_upload_over_the_shared_limit_is_refused_by_both_sides(tmp_path):
    big = SimpleNamespace(geometry=RingGeometry(1 << 16, 1024))     # so only the byte bound refuses
    run, n = check_upload({wire.UPLOAD_SLOT: 1, wire.UPLOAD_NBYTES: 1024}, big, 0, {}, "classify")
    assert (run, n) == (range(1, 2), 1024)
    with pytest.raises(Rejected, match="MAX_ENCODED_BYTES"):
        check_upload({wire.UPLOAD_SLOT: 1, wire.UPLOAD_NBYTES: limits.MAX_ENCODED_BYTES + 1}, big, 0, {},
                     "classify")
    assert client_decode.MAX_ENCODED_BYTES == limits.MAX_ENCODED_BYTES
    with pytest.raises(InvalidInput, match=f"limit of {limits.MAX_ENCODED_BYTES} bytes"):
        client_decode.prepare(bytes(limits.MAX_ENCODED_BYTES + 1), 8, 8)


def test_hits_reports_are_bounded():
    assert check_hits(limits.MAX_HITS_REPORT) == limits.MAX_HITS_REPORT
    for bad in (0, -1, limits.MAX_HITS_REPORT + 1, True, 1.0, None):
        with pytest.raises(Rejected):
            check_hits(bad)
