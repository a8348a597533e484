"""The OIP front's parts without a daemon: tokens files, tenants' principal numbers, the listen
policy, door addresses, tensors in and out, who may name a principal, and the command line the
daemon gives its supervised front (daemon/oip/, daemon/front/principal.py)."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from inferd.client.protocol import Prediction
from inferd.daemon import config
from inferd.daemon.errors import ConfigError
from inferd.daemon.front import principal
from inferd.daemon.front.admission import Rejected
from inferd.daemon.oip import addresses, doors, supervisor, tensors, tenants
from inferd.daemon.oip.errors import OipError
from inferd.shm import wire

TOKEN = "t" * 20


# tokens and tenants -------------------------------------------------------------------------------
def test_a_tokens_file_maps_tokens_to_tenants_and_weights(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n{TOKEN} web 2\n{'u' * 16} web 2   # a second token of web\n{'v' * 32} batch\n")
    path.chmod(0o600)
    t = tenants.Tokens.load(str(path))
    assert t.tenant(TOKEN).name == "web" and t.tenant(TOKEN).weight == 2.0
    assert t.tenant("v" * 32).weight == 1.0 and t.tenant("nope" * 5) is None
    assert tenants.fair_share_weights(str(path)) == {str(tenants.tenant_uid("batch")): 1.0,
                                                     str(tenants.tenant_uid("web")): 2.0}


@pytest.mark.parametrize("text, why", [
    ("short web\n", "at least 16"),
    (f"{TOKEN}\n", "TOKEN TENANT"),
    (f"{TOKEN} web zero\n", "not a number"),
    (f"{TOKEN} web 0\n", "out of range"),
    (f"{TOKEN} web 2\n{'u' * 16} web 3\n", "same weight"),
    (f"{TOKEN} web\n{TOKEN} other\n", "listed twice"),
])
def test_a_bad_tokens_line_is_refused_naming_it(text, why):
    with pytest.raises(ConfigError, match=why):
        tenants.parse(text)


def test_a_tokens_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN} web\n")
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        tenants.Tokens.load(str(path))
    path.chmod(0o600)
    assert tenants.Tokens.load(str(path)).tenant(TOKEN).name == "web"


def test_tenant_numbers_are_stable_and_never_a_login_uid():
    for name in ("a", "web-tier", "anonymous", "x" * 200):
        uid = tenants.tenant_uid(name)
        assert tenants.is_tenant_uid(uid) and uid == tenants.tenant_uid(name) and uid < 0xFFFFFFFF
    assert not tenants.is_tenant_uid(65534) and not tenants.is_tenant_uid(0)
    assert tenants.tenant_uid("a") != tenants.tenant_uid("b")


def test_the_authenticator_names_tenants_by_bearer_token(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN} web\n")
    path.chmod(0o600)
    auth = doors.Authenticator(str(path), clock=lambda: 0.0)
    assert auth.bearer(f"Bearer {TOKEN}", network=True).hello == (("tenant", "web"),)
    for bad in (None, "", f"Basic {TOKEN}", "Bearer " + "z" * 20):
        with pytest.raises(OipError) as info:
            auth.bearer(bad, network=True)
        assert info.value.http_status == 401
    assert auth.bearer(None, network=False).hello == (("tenant", "anonymous"),)
    assert doors.Authenticator("", clock=lambda: 0.0).bearer(None, network=True).hello == (("tenant", "anonymous"),)


# doors ------------------------------------------------------------------------------------------
def test_door_addresses():
    assert addresses.parse("off", "oip.http", "x.sock", "/run/s/d.sock") is None
    assert addresses.parse("", "oip.http", "oip-http.sock", "/run/s/d.sock").path == "/run/s/oip-http.sock"
    assert addresses.parse("/tmp/a.sock", "k", "n", "").path == "/tmp/a.sock"
    a = addresses.parse("[::1]:8001", "k", "n", "")
    assert (a.host, a.port, a.loopback, str(a)) == ("::1", 8001, True, "[::1]:8001")
    assert not addresses.parse("10.0.0.5:8000", "k", "n", "").loopback
    for bad in ("8000", "host:", "host:99999", ":80"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            addresses.parse(bad, "oip.http", "n", "")


def test_a_network_door_without_tokens_is_refused_unless_allowed():
    cfg = config.load(None)
    outside = addresses.Address(host="0.0.0.0", port=8000)
    with pytest.raises(ConfigError, match="allow_anonymous_network"):
        doors.check_policy(outside, "oip.http", cfg.oip)
    doors.check_policy(addresses.Address(host="127.0.0.1", port=8000), "oip.http", cfg.oip)
    cfg.oip.allow_anonymous_network = True
    doors.check_policy(outside, "oip.http", cfg.oip)
    cfg.oip.allow_anonymous_network, cfg.oip.tokens_file = False, "/etc/inferd/tokens"
    doors.check_policy(outside, "oip.http", cfg.oip)


# tensors ----------------------------------------------------------------------------------------
def test_uint8_tensors_from_binary_and_json():
    batch = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    for data in (batch.tobytes(), batch.reshape(-1).tolist(), batch.tolist()):
        frames = tensors.uint8_images("IMAGE", [2, 3, 4, 3], data)
        assert len(frames) == 2 and all((f == b).all() for f, b in zip(frames, batch))
    for bad in (batch.tobytes()[:-1], [1] * 10, [256] * 72, [-1] * 72, [0.5] * 72):
        with pytest.raises(OipError):
            tensors.uint8_images("IMAGE", [2, 3, 4, 3], bad)


def test_shapes_and_datatypes_are_checked():
    assert tensors.check_input("IMAGE", "UINT8", [4, 7, 9, 3], 16) == 4
    assert tensors.check_input("IMAGE_BYTES", "BYTES", [3, 1], 16) == 3
    for args in (("UINT8", [1, 7, 9]), ("UINT8", [1, 7, 9, 4]), ("UINT8", [1, 0, 9, 3]), ("FP32", [1, 2, 2, 3]),
                 ("UINT8", [17, 2, 2, 3]), ("UINT8", [0, 2, 2, 3]), ("BYTES", [2, 2]), ("UINT8", [1.0, 2, 2, 3])):
        with pytest.raises(OipError) as info:
            tensors.check_input("IMAGE", *args, 16)
        assert info.value.http_status == 400


def test_bytes_elements_binary_and_json():
    files = [b"\x89PNG....", b"\xff\xd8jpeg"]
    binary = b"".join(struct.pack("<I", len(f)) + f for f in files)
    assert tensors.bytes_elements("B", 2, binary) == files
    assert tensors.bytes_elements("B", 1, [{"b64": "aGVsbG8="}]) == [b"hello"]
    for bad, n in ((binary[:-1], 2), (binary + b"\1\0", 2), (binary, 3), ([{"b64": "!!"}], 1), ([b""], 1), (5, 1)):
        with pytest.raises(OipError):
            tensors.bytes_elements("B", n, bad)


def test_classification_strings_are_tritons():
    results = [[Prediction(2, "cat", 0.75), Prediction(0, "dog", 0.25), Prediction(1, "", 0.0)]]
    out = tensors.classification(results, 2, ("dog", "", "cat"))
    assert out.tolist() == [[b"0.750000:2:cat", b"0.250000:0:dog"]]
    assert tensors.classification(results, 3, ("dog", "", "cat"))[0, 2] == b"0.000000:1"
    dense = tensors.scores(results, 3)
    assert dense.dtype == np.float32 and dense.tolist() == [[0.25, 0.0, 0.75]]
    request = tensors.Inference([None], [tensors.Wanted(classes=2)])
    assert request.top_k(3) == 2 and tensors.Inference([None]).top_k(3) == 3
    binary = tensors.bytes_binary(out)
    assert tensors.bytes_elements("x", 2, binary) == [b"0.750000:2:cat", b"0.250000:0:dog"]


def test_logits_as_a_tensor_and_classified_by_their_own_values():
    from inferd.client.protocol import Predictions
    row = np.array([1.5, -2.0, 4.25], np.float32)
    results = [Predictions([Prediction(2, "cat", 0.9)], row)]
    LOGITS, SCORES = tensors.LOGITS, tensors.SCORES
    assert tensors.wanted("LOGITS", None, True) == tensors.Wanted(LOGITS, 0, True)
    with pytest.raises(OipError, match="LOGITS"):
        tensors.wanted("PROBS", None, False)
    only = tensors.Inference([None], [tensors.Wanted(LOGITS, 2)])
    assert only.logits() and only.top_k(3) == 1         # SCORES not wanted: one pair is enough
    both = tensors.Inference([None], [tensors.Wanted(LOGITS), tensors.Wanted(SCORES, 1)])
    assert both.logits() and both.top_k(3) == 1 and not tensors.Inference([None]).logits()
    (w1, t1, a1), (w2, t2, a2) = tensors.outputs(
        tensors.Inference([None], [tensors.Wanted(LOGITS), tensors.Wanted(LOGITS, 2)]), results, 3,
        ("dog", "", "cat"))
    assert t1 == "FP32" and a1.dtype == np.float32 and a1.tolist() == [row.tolist()]
    assert t2 == "BYTES" and a2.tolist() == [[b"4.250000:2:cat", b"1.500000:0:dog"]]   # the logits' values
    assert [o["name"] for o in tensors.metadata("m", 3)["outputs"]] == [SCORES, LOGITS]


# principals ------------------------------------------------------------------------------------
def test_only_root_or_the_daemons_user_may_name_a_principal():
    me = os.geteuid()
    claim = {"principal": {"uid": 1000, "gid": 100, "groups": [27]}}
    assert principal.adopt(claim, (9, me, me), ()) == ((9, 1000, 100), (27,), False)
    assert principal.adopt({}, (9, 4242, 4242), (5,)) == ((9, 4242, 4242), (5,), False)
    other = 4242 if me != 4242 else 4243
    with pytest.raises(Rejected) as info:
        principal.adopt(claim, (9, other, other), ())
    assert info.value.code == wire.E_PERMISSION_DENIED
    peer, groups, authorised = principal.adopt({"principal": {"tenant": "web"}}, (9, me, me), ())
    assert peer[1] == tenants.tenant_uid("web") and authorised and groups == ()
    for bad in ({"uid": tenants.tenant_uid("web"), "gid": 0}, {"uid": -1, "gid": 0}, {"uid": "0", "gid": 0},
                {"tenant": ""}, {"tenant": 5}, "root", {"uid": 1, "gid": 1, "groups": [2**32]}):
        with pytest.raises(Rejected) as info:
            principal.adopt({"principal": bad}, (9, me, me), ())
        assert info.value.code == wire.E_BAD_REQUEST


# the supervised front's command line --------------------------------------------------------------
def test_the_supervised_front_reads_the_daemons_values_back():
    cfg = config.load(None, {"server.socket": "/tmp/x/d.sock", "server.allow_uids": [5, 6],
                             "oip.enabled": True, "oip.http": "127.0.0.1:8000", "oip.socket_mode": 0o600,
                             "oip.request_timeout_ms": 1500.0, "oip.tokens_file": "/etc/t \"q\""})
    argv = supervisor.front_argv(cfg)
    assert argv[1:3] == ["-m", "inferd.daemon.oip"] and "--parent-pid" in argv
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    back = config.load(None, dict(config.parse_override(s) for s in sets))
    for section in ("server", "oip"):
        for key in ("socket", "allow_uids", "http", "socket_mode", "request_timeout_ms", "tokens_file"):
            if hasattr(getattr(cfg, section), key):
                assert getattr(getattr(back, section), key) == getattr(getattr(cfg, section), key)
    assert not back.oip.enabled                          # the front never starts a front


# the doors' hand-made parts: HTTP routing, replies built once ---------------------------------------
@pytest.mark.parametrize("method, path, want, model, version", [
    ("GET", "/v2/health/live", "live", "", ""),
    ("GET", "/v2/health/ready", "ready", "", ""),
    ("HEAD", "/v2/health/ready", "ready", "", ""),
    ("GET", "/v2/models/shapes", "model_metadata", "shapes", ""),
    ("GET", "/v2/models/shapes/versions/1", "model_metadata", "shapes", "1"),
    ("GET", "/v2/models/shapes/ready", "model_ready", "shapes", ""),
    ("GET", "/v2/models/shapes/versions/7/config", "model_config", "shapes", "7"),
    ("POST", "/v2/models/shapes/infer", "infer", "shapes", ""),
    ("POST", "/v2/models/nope/versions/1/infer", "infer", "nope", "1"),
    ("GET", "/v2/models/shapes/infer", "POST", "shapes", ""),
    ("POST", "/v2/models/shapes/ready", "GET, HEAD", "shapes", ""),
    ("GET", "/v2/models", None, "", ""),
    ("GET", "/v2/models/", None, "", ""),
    ("GET", "/v2/models/shapes/versions", None, "", ""),
    ("GET", "/v2/models/shapes/versions//infer", None, "", ""),
    ("GET", "/v2/models/shapes/stats", None, "", ""),
    ("GET", "/v2/models/shapes/ready/more", None, "", ""),
    ("GET", "/v2/health/alive", None, "", ""),
    ("GET", "/v3/health/live", None, "", ""),
    ("GET", "/", None, "", ""),
])
def test_the_http_door_routes_by_the_path_as_its_router_did(method, path, want, model, version):
    from inferd.daemon.oip.http_front import HttpDoor
    door = HttpDoor(None, None, network=True, max_batch=8, version="0")
    handler, m, v = door.route(method, path)
    if want is None:
        assert handler is None
    elif want in ("POST", "GET, HEAD"):             # 405 with the methods the path takes
        assert handler == want and (m, v) == (model, version)
    else:
        assert handler.__name__ == want and (m, v) == (model, version)


def _predictions(rows):
    return [[Prediction(i, f"c{i}", s) for i, s in enumerate(row)] for row in rows]


@pytest.mark.parametrize("request_id", ["", "42", "é\"x"])
def test_grpc_replies_encoded_by_hand_equal_protobufs(request_id):
    from inferd.daemon.oip import grpc_front, oip_pb2 as pb
    results = _predictions([[0.25, 0.5, 0.125, 0.125], [0.7, 0.1, 0.1, 0.1]])
    parsed = tensors.Inference([], [tensors.Wanted(), tensors.Wanted(classes=2)], None, request_id)
    outputs = tensors.outputs(parsed, results, 4, ("a", "b", "c", "d"))
    for _ in range(2):                                  # the second from the encoded entries kept
        got = pb.ModelInferResponse.FromString(grpc_front.response("shapes", parsed, outputs))
        want = pb.ModelInferResponse(model_name="shapes", model_version="1", id=request_id)
        for w, datatype, array in outputs:
            want.outputs.add(name=w.name, datatype=datatype, shape=list(array.shape))
            want.raw_output_contents.append(tensors.bytes_binary(array) if datatype == "BYTES"
                                            else array.astype("<f4").tobytes())
        assert got == want


@pytest.mark.parametrize("request_id", ["", "7", "a\"b"])
def test_http_replies_built_once_carry_each_requests_id(request_id):
    import json

    from inferd.daemon.oip import http_front
    results = _predictions([[0.25, 0.5, 0.125, 0.125]])
    parsed = tensors.Inference([], [tensors.Wanted(classes=3, binary=True)], None, request_id)
    for _ in range(2):
        reply = http_front.response("shapes", parsed, tensors.outputs(parsed, results, 4, ("a", "b", "c", "d")), True)
        length = int(reply.headers["Inference-Header-Content-Length"])
        head = json.loads(reply.body[:length])
        assert head.get("id", "") == request_id and head["model_name"] == "shapes"
        (out,) = head["outputs"]
        assert out["shape"] == [1, 3] and out["parameters"]["binary_data_size"] == len(reply.body) - length
        assert reply.body[length:][4:].startswith(b"0.500000:1:b")
