"""The OIP front (daemon/oip/) against a real daemon, through clients nobody here wrote:
tritonclient[http] and tritonclient[grpc] unmodified, and curl for JSON. Answers equal the Python
client's for the same frames and files; every error path has its status; a network caller needs
a token; only a trusted front may name a principal; tenants are principals with their own fair
share and privacy scope; bad input never takes the front or the daemon down.

Two fronts serve one daemon: ``net`` on loopback TCP with a tokens file (tenants), ``local`` on
Unix sockets (callers are their uids)."""
from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

import helpers
from helpers import RawClient, short_dir, spawn_daemon, wait_until
from inferd.client import AdminClient, Client
from inferd.daemon.launch import DaemonProcess
from inferd.daemon.oip.tenants import tenant_uid
from inferd.shm import wire

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.timeout(300)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
NOBODY = 65534


class Front:
    """A running OIP front (python -m inferd.daemon.oip) for ``daemon``; ``http`` and ``grpc``:
    the addresses it bound (ports resolved), read from its READY=1 STATUS line."""

    def __init__(self, daemon, *sets: str):
        self.workdir = short_dir()
        self.proc = DaemonProcess.start([a for s in sets for a in ("--set", s)], socket_path=daemon.socket_path,
                                        workdir=self.workdir, wait=False, module="inferd.daemon.oip")
        try:
            status = self.proc.wait_notify("READY=1", timeout=60)
        except BaseException:
            self.proc.kill()
            raise
        self.http, self.grpc = (None if v == "off" else v for v in
                                re.search(r"HTTP (\S+) gRPC (\S+)", status).groups())

    def alive(self) -> bool:
        return self.proc.proc.poll() is None

    def stop(self) -> int:
        try:
            return self.proc.stop()
        finally:
            self.proc.kill()


def tokens_file(entries: dict) -> str:
    """A tokens file (mode 0600) for {token: (tenant, weight)}."""
    path = os.path.join(short_dir(), "tokens")
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        fh.write("# token tenant weight\n")
        for token, (tenant, weight) in entries.items():
            fh.write(f"{token} {tenant} {weight}\n")
    return path


TOKEN_A, TOKEN_B = secrets.token_hex(16), secrets.token_hex(16)
AUTH_A = {"Authorization": f"Bearer {TOKEN_A}"}
AUTH_B = {"Authorization": f"Bearer {TOKEN_B}"}
GRPC_A, GRPC_B = ({k.lower(): v for k, v in a.items()} for a in (AUTH_A, AUTH_B))   # gRPC keys: lower case
# (tritonclient.http writes Inference-Header-Content-Length into the headers dict it is given: a copy each call)


@pytest.fixture(scope="module")
def served():
    tokens = tokens_file({TOKEN_A: ("alpha", 1), TOKEN_B: ("beta", 3)})
    daemon = spawn_daemon("--set", f"server.allow_uids=[{NOBODY}]", "--set", "server.socket_mode=0o666",
                          "--set", f'oip.tokens_file="{tokens}"')
    os.chmod(daemon.workdir, 0o755)                     # the socket reachable by uid 65534
    fronts = []
    try:
        fronts.append(Front(daemon, "oip.http=127.0.0.1:0", "oip.grpc=127.0.0.1:0", f'oip.tokens_file="{tokens}"'))
        where = short_dir()
        os.chmod(where, 0o755)
        fronts.append(Front(daemon, f'oip.http="{where}/http.sock"', f'oip.grpc="{where}/grpc.sock"',
                            "oip.socket_mode=0o666"))
        yield daemon, fronts[0], fronts[1]
    finally:
        for f in fronts:
            f.stop()
        daemon.cleanup()


def frames(n: int, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def encoded(frame: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def python_client_answers(daemon, images, classes: int) -> tuple[np.ndarray, list]:
    """The client library's answers: dense scores [N, C] and top-3 "score:index:label" strings."""
    with Client(daemon.socket_path) as c:
        answers = c.classify_many(list(images), top_k=classes)
    dense = np.zeros((len(answers), classes), np.float32)
    for row, preds in zip(dense, answers):
        for p in preds:
            row[p.index] = p.score
    top3 = [[f"{p.score:f}:{p.index}:{p.label}" for p in preds[:3]] for preds in answers]
    return dense, top3


# metadata and answers ---------------------------------------------------------------------------
def test_tritonclient_reads_health_and_metadata(served):
    daemon, net, _ = served
    h = tritonhttp.InferenceServerClient(net.http)
    g = tritongrpc.InferenceServerClient(net.grpc)
    assert h.is_server_live() and h.is_server_ready() and h.is_model_ready("shapes")
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready("shapes")
    hm, gm = h.get_model_metadata("shapes"), g.get_model_metadata("shapes", as_json=True)
    for md in (hm, gm):
        assert md["name"] == "shapes"
        assert {i["name"]: i["datatype"] for i in md["inputs"]} == {"IMAGE": "UINT8", "IMAGE_BYTES": "BYTES"}
        assert md["outputs"][0]["name"] == "SCORES" and md["outputs"][0]["datatype"] == "FP32"
    assert [int(d) for d in gm["outputs"][0]["shape"]] == [-1, 8]
    server = h.get_server_metadata()
    assert server["name"] == "inferd" and "classification" in server["extensions"]
    assert g.get_server_metadata().name == "inferd"
    assert not h.is_model_ready("no-such-model")


def test_logits_come_back_as_the_python_clients_and_classify_by_their_own_values(served):
    """LOGITS (FP32 [N, C]) equals the Python client's logits; SCORES comes beside it; the
    classification parameter reports each output's own values: logits for LOGITS, softmax
    probabilities for SCORES (as Triton reports the output tensor's value)."""
    daemon, net, _ = served
    batch = frames(3, seed=1903)
    with Client(daemon.socket_path) as c:
        answers = c.classify_many(list(batch), top_k=8, logits=True)
    logits = np.stack([a.logits for a in answers])
    labels = {p.index: p.label for p in answers[0]}
    dense, top3 = python_client_answers(daemon, batch, 8)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :3]
    logit3 = [[f"{logits[r, i]:f}:{i}:{labels[i]}" for i in row] for r, row in enumerate(order)]
    assert [[int(s.split(":")[1]) for s in row] for row in logit3] == \
        [[int(s.split(":")[1]) for s in row] for row in top3]      # the same classes, other values
    h = tritonhttp.InferenceServerClient(net.http)
    g = tritongrpc.InferenceServerClient(net.grpc)
    assert [o["name"] for o in h.get_model_metadata("shapes")["outputs"]] == ["SCORES", "LOGITS"]
    assert [o["name"] for o in g.get_model_metadata("shapes", as_json=True)["outputs"]] == ["SCORES", "LOGITS"]
    text = lambda rows: [[e.decode() if isinstance(e, bytes) else e for e in row] for row in rows]

    def same(got_rows, want_rows):
        """"value:index:label" strings alike: the same classes in the same order, values equal
        but for the last bits (the rows of one request may be computed in batches of other sizes,
        whose float sums differ there)."""
        got_rows, want_rows = text(got_rows), text(want_rows)
        split = lambda rows: [[e.split(":", 1) for e in row] for row in rows]
        assert [[k for _, k in row] for row in split(got_rows)] == [[k for _, k in row] for row in split(want_rows)]
        np.testing.assert_allclose([[float(v) for v, _ in row] for row in split(got_rows)],
                                   [[float(v) for v, _ in row] for row in split(want_rows)], rtol=1e-5, atol=1e-5)
    for binary in (True, False):
        inp = tritonhttp.InferInput("IMAGE", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch, binary_data=binary)
        got = h.infer("shapes", [inp], headers={**AUTH_A}, outputs=[
            tritonhttp.InferRequestedOutput("LOGITS", binary_data=binary),
            tritonhttp.InferRequestedOutput("SCORES", binary_data=binary)])
        assert got.as_numpy("LOGITS").dtype == np.float32
        np.testing.assert_allclose(got.as_numpy("LOGITS"), logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.as_numpy("SCORES"), dense, rtol=1e-5, atol=1e-6)
        got = h.infer("shapes", [inp], headers={**AUTH_A}, outputs=[
            tritonhttp.InferRequestedOutput("LOGITS", binary_data=binary, class_count=3),
            tritonhttp.InferRequestedOutput("SCORES", binary_data=binary, class_count=3)])
        same(got.as_numpy("LOGITS"), logit3)
        same(got.as_numpy("SCORES"), top3)
    inp = tritongrpc.InferInput("IMAGE", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch)
    got = g.infer("shapes", [inp], headers={**GRPC_A}, outputs=[
        tritongrpc.InferRequestedOutput("LOGITS"), tritongrpc.InferRequestedOutput("SCORES")])
    np.testing.assert_allclose(got.as_numpy("LOGITS"), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.as_numpy("SCORES"), dense, rtol=1e-5, atol=1e-6)
    got = g.infer("shapes", [inp], headers={**GRPC_A}, outputs=[
        tritongrpc.InferRequestedOutput("LOGITS", class_count=3),
        tritongrpc.InferRequestedOutput("SCORES", class_count=2)])
    same(got.as_numpy("LOGITS"), logit3)
    same(got.as_numpy("SCORES"), [r[:2] for r in top3])
    with pytest.raises(InferenceServerException, match="LOGITS"):
        h.infer("shapes", [tritonhttp.InferInput("IMAGE", list(batch.shape), "UINT8").set_data_from_numpy(batch)],
                headers={**AUTH_A}, outputs=[tritonhttp.InferRequestedOutput("PROBS")])


@pytest.mark.parametrize("size", [(64, 64), (50, 90)])
def test_tensor_answers_equal_the_python_client(served, size):
    daemon, net, _ = served
    batch = frames(3, *size, seed=size[0])
    dense, top3 = python_client_answers(daemon, batch, 8)
    h = tritonhttp.InferenceServerClient(net.http)
    g = tritongrpc.InferenceServerClient(net.grpc)
    for binary in (True, False):                     # binary tensor data, and JSON
        inp = tritonhttp.InferInput("IMAGE", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch, binary_data=binary)
        scores = h.infer("shapes", [inp], headers={**AUTH_A},
                         outputs=[tritonhttp.InferRequestedOutput("SCORES", binary_data=binary)]).as_numpy("SCORES")
        np.testing.assert_allclose(scores, dense, rtol=1e-6, atol=1e-7)
        classes = h.infer("shapes", [inp], headers={**AUTH_A}, outputs=[
            tritonhttp.InferRequestedOutput("SCORES", binary_data=binary, class_count=3)]).as_numpy("SCORES")
        assert [[e.decode() if isinstance(e, bytes) else e for e in row] for row in classes] == top3
    inp = tritongrpc.InferInput("IMAGE", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch)
    np.testing.assert_allclose(g.infer("shapes", [inp], headers={**GRPC_A}).as_numpy("SCORES"), dense,
                               rtol=1e-6, atol=1e-7)
    classes = g.infer("shapes", [inp], headers={**GRPC_A},
                      outputs=[tritongrpc.InferRequestedOutput("SCORES", class_count=3)]).as_numpy("SCORES")
    assert [[e.decode() for e in row] for row in classes] == top3


def test_encoded_files_answer_as_the_python_client(served):
    daemon, net, _ = served
    batch = frames(2, 80, 60, seed=7)
    files = [encoded(batch[0], "PNG"), encoded(batch[1], "JPEG")]
    dense, top3 = python_client_answers(daemon, files, 8)
    data = np.array(files, dtype=np.object_)
    h = tritonhttp.InferenceServerClient(net.http)
    g = tritongrpc.InferenceServerClient(net.grpc)
    for _ in range(2):                                   # the second time: repeats, by the files' hash
        inp = tritonhttp.InferInput("IMAGE_BYTES", [2], "BYTES")
        inp.set_data_from_numpy(data, binary_data=True)
        np.testing.assert_allclose(h.infer("shapes", [inp], headers={**AUTH_A}).as_numpy("SCORES"), dense,
                                   rtol=1e-6, atol=1e-7)
        inp = tritongrpc.InferInput("IMAGE_BYTES", [2], "BYTES")
        inp.set_data_from_numpy(data)
        classes = g.infer("shapes", [inp], headers={**GRPC_B},
                          outputs=[tritongrpc.InferRequestedOutput("SCORES", class_count=3)]).as_numpy("SCORES")
        assert [[e.decode() for e in row] for row in classes] == top3


def _curl(args: list[str]) -> tuple[int, dict, dict]:
    out = subprocess.run(["curl", "-s", "-i", "--max-time", "30", *args], capture_output=True, timeout=60,
                         check=True).stdout.decode()
    head, _, body = out.partition("\r\n\r\n")
    status = int(head.split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])}
    return status, headers, json.loads(body) if body.strip() else {}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (apt-get install curl)")
def test_curl_json_over_the_unix_socket_answers_as_the_python_client(served):
    daemon, _, local = served
    batch = frames(2, 32, 48, seed=3)
    dense, top3 = python_client_answers(daemon, batch, 8)
    body = {"id": "curl-1", "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": list(batch.shape),
                                        "data": batch.reshape(-1).tolist()}],
            "outputs": [{"name": "SCORES"}, {"name": "SCORES", "parameters": {"classification": 3}}]}
    status, _, reply = _curl(["--unix-socket", local.http, "-H", "Content-Type: application/json",
                              "--data-binary", json.dumps(body), "http://localhost/v2/models/shapes/infer"])
    assert status == 200, reply
    assert reply["id"] == "curl-1" and reply["model_name"] == "shapes"
    scores, classes = reply["outputs"]
    assert scores["shape"] == [2, 8] and classes["shape"] == [2, 3] and classes["datatype"] == "BYTES"
    np.testing.assert_allclose(np.array(scores["data"], np.float32).reshape(2, 8), dense, rtol=1e-6, atol=1e-7)
    assert [classes["data"][:3], classes["data"][3:]] == top3
    status, _, _ = _curl(["--unix-socket", local.http, "http://localhost/v2/health/ready"])
    assert status == 200


# errors -----------------------------------------------------------------------------------------
def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


def _infer_body(shape, datatype="UINT8", data=None, **extra) -> bytes:
    n = int(np.prod(shape)) if shape else 0
    return json.dumps({"inputs": [{"name": "IMAGE", "datatype": datatype, "shape": shape,
                                   "data": data if data is not None else [0] * n}], **extra}).encode()


def test_each_error_path_has_its_status_and_harms_nothing(served):
    daemon, net, _ = served
    url = f"http://{net.http}/v2/models/shapes/infer"
    cases = [
        (_infer_body([1, 8, 8]), AUTH_A, 400),                       # no channel axis
        (_infer_body([1, 8, 8, 4]), AUTH_A, 400),                    # 4 channels
        (_infer_body([1, 8, 8, 3], "FP32"), AUTH_A, 400),            # another datatype
        (_infer_body([1, 2, 2, 3], data=[300] * 12), AUTH_A, 400),   # out of uint8's range
        (_infer_body([1, 2, 2, 3], data=[1] * 5), AUTH_A, 400),      # too few elements
        (_infer_body([0, 2, 2, 3]), AUTH_A, 400),                    # no image
        (b"{not json", AUTH_A, 400),
        (json.dumps({"inputs": [{"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1],
                                 "data": ["not an image"]}]}).encode(), AUTH_A, 400),
        (_infer_body([1, 2, 2, 3], outputs=[{"name": "PROBS"}]), AUTH_A, 400),      # no such output
        (_infer_body([1, 2, 2, 3], outputs=[{"name": "SCORES", "parameters": {"classification": 99}}]), AUTH_A, 400),
        (_infer_body([1, 2, 2, 3]), {}, 401),                         # no token on a TCP door
        (_infer_body([1, 2, 2, 3]), {"Authorization": "Bearer " + "x" * 32}, 401),
    ]
    for body, headers, want in cases:
        status, _, reply = _post(url, body, headers)
        assert status == want, (body[:120], reply)
        assert isinstance(reply.get("error"), str) and reply["error"], reply
    status, _, reply = _post(f"http://{net.http}/v2/models/nope/infer", _infer_body([1, 2, 2, 3]), AUTH_A)
    assert status == 404 and "shapes" in reply["error"]
    # binary data whose announced sizes lie
    head = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 4, 4, 3],
                                   "parameters": {"binary_data_size": 4096}}]}).encode()
    for length in (str(len(head)), "999999", "-1"):
        status, _, _ = _post(url, head + b"\0" * 48, {**AUTH_A, "Inference-Header-Content-Length": length})
        assert status == 400
    # gRPC
    g = tritongrpc.InferenceServerClient(net.grpc)
    bad = tritongrpc.InferInput("IMAGE", [1, 4, 4, 2], "UINT8")
    bad.set_data_from_numpy(np.zeros((1, 4, 4, 2), np.uint8))
    good = tritongrpc.InferInput("IMAGE", [1, 4, 4, 3], "UINT8")
    good.set_data_from_numpy(np.zeros((1, 4, 4, 3), np.uint8))
    for model, inputs, headers, code in [("shapes", [bad], GRPC_A, "StatusCode.INVALID_ARGUMENT"),
                                         ("nope", [good], GRPC_A, "StatusCode.NOT_FOUND"),
                                         ("shapes", [good], {}, "StatusCode.UNAUTHENTICATED"),
                                         ("shapes", [good, good], GRPC_A, "StatusCode.INVALID_ARGUMENT")]:
        with pytest.raises(InferenceServerException) as info:
            g.infer(model, inputs, headers=headers)
        assert info.value.status() == code
    # a deadline no device can meet: overloaded at admission, with a retry hint
    fresh = frames(1, seed=int.from_bytes(os.urandom(4), "little"))     # no cache hit answers it
    status, headers, reply = _post(url, _infer_body([1, 64, 64, 3], data=fresh.reshape(-1).tolist(),
                                                    parameters={"timeout": 1}), AUTH_A)
    assert status in (429, 504), reply
    if status == 429:
        assert int(headers["Retry-After"]) >= 1
    # none of it took anything down
    assert net.alive() and daemon.proc.poll() is None
    h = tritonhttp.InferenceServerClient(net.http)
    inp = tritonhttp.InferInput("IMAGE", [1, 64, 64, 3], "UINT8")
    inp.set_data_from_numpy(frames(1))
    assert h.infer("shapes", [inp], headers={**AUTH_A}).as_numpy("SCORES").shape == (1, 8)


def test_garbage_on_the_doors_leaves_them_serving(served):
    daemon, net, local = served
    import socket as so
    host, port = net.http.rsplit(":", 1)
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", b"\x00" * 4096,
                 b"POST /v2/models/shapes/infer HTTP/1.1\r\nContent-Length: 10\r\n\r\nab"):
        s = so.create_connection((host, int(port)), timeout=10)
        s.sendall(junk)
        s.close()
    ghost, gport = net.grpc.rsplit(":", 1)
    s = so.create_connection((ghost, int(gport)), timeout=10)
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(2048))
    s.close()
    assert tritongrpc.InferenceServerClient(net.grpc).is_server_live()
    assert tritonhttp.InferenceServerClient(net.http).is_server_ready()
    assert net.alive() and local.alive()


def test_unknown_paths_wrong_methods_and_expect_100_continue_over_the_wire(served):
    """The HTTP door routes by itself (aiohttp's low-level server): 404 and 405 as OIP error
    bodies, HEAD on a GET route, and a body sent only after "100 Continue" (what curl does
    before a large one) is read and answered."""
    daemon, net, local = served
    import socket as so
    for method, path, want in [("GET", "/v2/nope", 404), ("GET", "/v2/models/shapes/infer", 405),
                               ("POST", "/v2/health/live", 405), ("GET", "/v2/models/shapes/versions", 404)]:
        request = urllib.request.Request(f"http://{net.http}{path}", method=method, headers=AUTH_A,
                                         data=b"{}" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == want and json.loads(err.value.read())["error"], (method, path)
    with urllib.request.urlopen(urllib.request.Request(f"http://{net.http}/v2/health/ready", method="HEAD"),
                                timeout=30) as r:
        assert r.status == 200
    frame = frames(1, 64, 64, seed=9)
    head = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 64, 64, 3],
                                   "parameters": {"binary_data_size": frame.nbytes}}],
                       "outputs": [{"name": "SCORES", "parameters": {"classification": 3}}]}).encode()
    body = head + frame.tobytes()
    host, port = net.http.rsplit(":", 1)
    with so.create_connection((host, int(port)), timeout=30) as s:
        s.sendall((f"POST /v2/models/shapes/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\n"
                   f"Expect: 100-continue\r\nInference-Header-Content-Length: {len(head)}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = s.recv(65536)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 100 Continue"), reply[:80]
        s.sendall(body)
        reply = reply.split(b"\r\n\r\n", 1)[1]
        while b"\r\n\r\n" not in reply:
            chunk = s.recv(65536)
            assert chunk, reply
            reply += chunk
        status, rest = reply.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?im)^content-length: *(\d+)", status).group(1))
        while len(rest) < length:
            chunk = s.recv(65536)
            assert chunk, reply
            rest += chunk
    assert status.startswith(b"HTTP/1.1 200"), status
    answer = json.loads(rest)
    _, top3 = python_client_answers(daemon, frame, 8)
    assert answer["outputs"][0]["data"] == top3[0][:3]


# identity ---------------------------------------------------------------------------------------
def test_a_non_loopback_door_without_tokens_is_refused_with_the_reason(served):
    daemon, _, _ = served
    workdir = short_dir()
    proc = DaemonProcess.start(["--set", "oip.http=0.0.0.0:0", "--set", "oip.grpc=off"], socket_path=daemon.socket_path,
                               workdir=workdir, wait=False, module="inferd.daemon.oip")
    try:
        assert proc.proc.wait(60) == 78
        assert "oip.tokens_file" in proc.log() and "allow_anonymous_network" in proc.log()
    finally:
        proc.kill()


@as_root
def test_only_a_trusted_front_may_name_a_principal(served):
    daemon, _, _ = served
    # root (a trusted peer) may name a uid, and that uid's allow-list applies
    ok = RawClient(daemon.socket_path, principal={"uid": NOBODY, "gid": NOBODY, "groups": []})
    refused_uid = RawClient(daemon.socket_path, principal={"uid": 4242, "gid": 4242, "groups": []})
    try:
        assert ok.hello_reply["ok"]
        assert not refused_uid.hello_reply["ok"] and refused_uid.hello_reply["code"] == wire.E_PERMISSION_DENIED
    finally:
        ok.close()
        refused_uid.close()
    # an ordinary (allowed) client may not claim anyone
    script = ("import json, os, sys\nsys.path.insert(0, sys.argv[2])\nfrom helpers import RawClient\n"
              f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
              "out = []\n"
              "for claim in ({'uid': 0, 'gid': 0, 'groups': []}, {'tenant': 'alpha'}):\n"
              "    c = RawClient(sys.argv[1], principal=claim)\n"
              "    out.append(c.hello_reply)\n"
              "    c.close()\n"
              "c = RawClient(sys.argv[1])\nout.append(c.hello_reply.get('ok'))\nc.close()\n"
              "print(json.dumps(out))\n")
    run = subprocess.run([sys.executable, "-c", script, daemon.socket_path, str(helpers.TESTS)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    as_uid, as_tenant, plain = json.loads(run.stdout)
    for reply in (as_uid, as_tenant):
        assert not reply["ok"] and reply["code"] == wire.E_PERMISSION_DENIED
        assert "may not name another principal" in reply["message"]
    assert plain is True


def _uid_rows(daemon) -> dict:
    with AdminClient(helpers.admin_path(daemon)) as admin:
        stats = admin.call("stats")
    return {u["uid"]: u for u in stats["uids"]}


def test_tenants_and_local_callers_are_principals_of_their_own(served):
    daemon, net, local = served
    before = _uid_rows(daemon)
    h = tritonhttp.InferenceServerClient(net.http)
    batch = frames(2, seed=11)
    for auth, n in ((AUTH_A, 3), (AUTH_B, 5)):
        for i in range(n):
            inp = tritonhttp.InferInput("IMAGE", [2, 64, 64, 3], "UINT8")
            inp.set_data_from_numpy(frames(2, seed=100 * n + i))
            h.infer("shapes", [inp], headers={**auth})
    # a local caller on the Unix door is its own uid: nobody's request counts for 65534
    script = ("import json, os, sys, urllib.request, socket, http.client\n"
              f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
              "class C(http.client.HTTPConnection):\n"
              "    def connect(self):\n"
              "        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])\n"
              "c = C('localhost')\n"
              "body = json.dumps({'inputs': [{'name': 'IMAGE', 'datatype': 'UINT8', 'shape': [1, 4, 4, 3], "
              "'data': [7] * 48}]})\n"
              "c.request('POST', '/v2/models/shapes/infer', body, {'Content-Type': 'application/json'})\n"
              "print(c.getresponse().status)\n")
    run = subprocess.run([sys.executable, "-c", script, local.http], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "200", run.stderr
    # a uid the daemon's allow-list does not admit is refused through the front as it is directly
    run = subprocess.run([sys.executable, "-c", script.replace(str(NOBODY), "4242"), local.http],
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "403", run.stderr
    after = _uid_rows(daemon)
    grew = lambda uid: after.get(uid, {}).get("requests", 0) - before.get(uid, {}).get("requests", 0)
    assert grew(tenant_uid("alpha")) >= 3 * 2 - 2 and grew(tenant_uid("beta")) >= 5 * 2 - 2
    assert grew(NOBODY) == 1
    del batch


@as_root
def test_a_tenants_privacy_scope_is_its_own(served):
    """The embedding store keys rows by principal: what tenant alpha classified through the front
    is not a near-duplicate that a local uid (the test, root) can find, until it stores its own."""
    daemon, net, _ = served
    image = frames(1, seed=99)
    g = tritongrpc.InferenceServerClient(net.grpc)
    inp = tritongrpc.InferInput("IMAGE", [1, 64, 64, 3], "UINT8")
    inp.set_data_from_numpy(image)
    g.infer("shapes", [inp], headers={**GRPC_A})
    with Client(daemon.socket_path) as c:
        assert c.near_duplicates(image[0], k=5, min_similarity=0.99) == []
        c.embed(image[0])
        assert len(c.near_duplicates(image[0], k=5, min_similarity=0.99)) == 1


# a daemon of known cost: overload, deadlines, draining, fair share between tenants ---------------
class Slow:
    """A daemon serving the synthetic model (daemon/models/zoo/synthetic.py) at a known cost, one
    device, the cache off (its frames repeat), and a front on loopback TCP with two tenants."""

    def __init__(self, *args, base_ms=20.0, per_frame_ms=20.0, weights=(1, 1), fault=None):
        self.workdir = short_dir()
        self.control = os.path.join(self.workdir, "synthetic.json")
        self.set(base_ms=base_ms, per_frame_ms=per_frame_ms, fault=fault or {})
        self.tokens = tokens_file({TOKEN_A: ("alpha", weights[0]), TOKEN_B: ("beta", weights[1])})
        os.environ["INFERD_SYNTHETIC"] = self.control
        try:
            self.daemon = spawn_daemon("--set", "cache.enabled=false", "--set", f'oip.tokens_file="{self.tokens}"',
                                       *args, model="synthetic", workdir=self.workdir)
        finally:
            del os.environ["INFERD_SYNTHETIC"]
        try:
            self.front = Front(self.daemon, "oip.http=127.0.0.1:0", "oip.grpc=127.0.0.1:0",
                               f'oip.tokens_file="{self.tokens}"')
        except BaseException:
            self.daemon.cleanup()
            raise

    def set(self, **values) -> None:
        tmp = self.control + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"speed": {}, **values}, fh)
        os.replace(tmp, self.control)

    def close(self) -> None:
        try:
            self.front.stop()
        finally:
            self.daemon.cleanup()


def _level(v: int, n: int = 1, side: int = 16) -> list:
    return [v] * (n * side * side * 3)


def _infer(front, auth, value: int, n: int = 1, **params) -> tuple[int, dict, dict]:
    body = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [n, 16, 16, 3],
                                   "data": _level(value, n)}],
                       "outputs": [{"name": "SCORES", "parameters": {"classification": 1}}],
                       **({"parameters": params} if params else {})}).encode()
    return _post(f"http://{front.http}/v2/models/synthetic/infer", body, auth)


@pytest.mark.slow
def test_overload_is_429_with_a_retry_hint_and_draining_is_503():
    slow = Slow("--set", "batching.queue_limit=2", "--set", "batching.max_batch=1", base_ms=100.0, per_frame_ms=100.0)
    try:
        results = []
        def call(i):
            results.append(_infer(slow.front, AUTH_A, (i * 28) % 256))
        threads = [threading.Thread(target=call, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        statuses = sorted(s for s, _, _ in results)
        assert 200 in statuses and 429 in statuses, statuses
        for status, headers, reply in results:
            if status == 429:
                assert int(headers["Retry-After"]) >= 1 and "not admitted" in reply["error"]
            else:
                assert status == 200 and reply["outputs"][0]["data"][0].count(":") == 2
        # level v is class round(9 v / 255): the answers went to the right requests
        status, _, reply = _infer(slow.front, AUTH_A, 255)
        assert status == 200 and reply["outputs"][0]["data"][0].split(":")[1] == "9"
        # the daemon drains: the front is not ready and answers 503
        with AdminClient(helpers.admin_path(slow.daemon)) as admin:
            admin.call("drain")
        wait_until(lambda: _get(f"http://{slow.front.http}/v2/health/ready")[0] == 503, 30, "not ready while draining")
        status, _, reply = _infer(slow.front, AUTH_A, 100)
        assert status == 503, reply
        assert slow.front.alive()
    finally:
        slow.close()


@pytest.mark.slow
def test_a_deadline_that_passes_in_the_queue_is_504():
    slow = Slow("--set", "batching.max_batch=1", base_ms=300.0, per_frame_ms=0.0)
    try:
        # the next batch takes far longer than the profile (measured at start) says: a request
        # admitted behind it waits in the queue past its deadline
        slow.set(base_ms=2500.0, per_frame_ms=0.0)
        first = threading.Thread(target=_infer, args=(slow.front, AUTH_A, 10))
        first.start()
        wait_until(lambda: _uid_rows(slow.daemon).get(tenant_uid("alpha"), {}).get("in_flight", 0) >= 1, 30,
                   "the first request running")
        # 2 s: feasible by the profile (a 300 ms batch measured at start, twice that on a loaded
        # machine), and passed in the queue behind the 2.5 s batch
        status, _, reply = _infer(slow.front, AUTH_B, 20, timeout=2_000_000)
        first.join(60)
        assert status == 504, reply
        assert "deadline" in reply["error"]
    finally:
        slow.close()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.slow
@pytest.mark.timing
def test_two_tenants_share_the_device_by_their_weights():
    """Both tenants keep the one device backlogged (8 callers each, batches of 1); beta weighs 3,
    alpha 1: of the requests served while both wait, beta gets about three quarters."""
    slow = Slow("--set", "batching.max_batch=1", base_ms=15.0, per_frame_ms=0.0, weights=(1, 3))
    done = {"alpha": [], "beta": []}
    stop = threading.Event()
    try:
        def caller(name, auth, seed):
            i = seed
            while not stop.is_set():
                status, _, _ = _infer(slow.front, auth, i % 256)
                if status == 200:
                    done[name].append(time.monotonic())
                i += 7
        threads = [threading.Thread(target=caller, args=(n, a, s)) for s in range(8)
                   for n, a in (("alpha", AUTH_A), ("beta", AUTH_B))]
        for t in threads:
            t.start()
        wait_until(lambda: len(done["alpha"]) + len(done["beta"]) >= 40, 120, "a warm backlog")
        t0 = time.monotonic()
        wait_until(lambda: sum(1 for v in done.values() for x in v if x > t0) >= 120, 240, "120 more answers")
        t1 = time.monotonic()
        stop.set()
        for t in threads:
            t.join(60)
        a = sum(1 for x in done["alpha"] if t0 < x <= t1)
        b = sum(1 for x in done["beta"] if t0 < x <= t1)
        assert 0.62 <= b / (a + b) <= 0.88, (a, b)
    finally:
        stop.set()
        slow.close()


# the daemon's supervised child -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (apt-get install curl)")
def test_the_daemon_supervises_its_front():
    where = short_dir()
    http = f"{where}/http.sock"
    daemon = spawn_daemon("--set", "oip.enabled=true", "--set", f'oip.http="{http}"', "--set", "oip.grpc=off",
                          fork=False)
    try:
        def ready() -> bool:
            try:
                return _curl(["--unix-socket", http, "http://localhost/v2/health/ready"])[0] == 200
            except subprocess.CalledProcessError:
                return False
        wait_until(ready, 60, "the front's HTTP door")
        pid = _front_pid(daemon.pid)
        # inferctl names the doors: health (text) and info (JSON)
        health = subprocess.run([sys.executable, "-m", "inferd.client.cli", "--socket", daemon.socket_path, "health"],
                                capture_output=True, text=True, timeout=60)
        assert f"OIP front: HTTP {http}, gRPC off (pid {pid})" in health.stdout, health
        info = subprocess.run([sys.executable, "-m", "inferd.client.cli", "--socket", daemon.socket_path, "info",
                               "--json"], capture_output=True, text=True, timeout=60)
        assert json.loads(info.stdout)["oip"] == {"http": http, "grpc": "off", "pid": pid, "restarts": 0,
                                                   "placement": "process"}, info
        os.kill(pid, 9)                                      # the front dies: the daemon starts another
        wait_until(lambda: _front_pid(daemon.pid) not in (None, pid), 30, "a new front")
        wait_until(ready, 60, "the new front's HTTP door")
        assert daemon.stop() == 0                            # SIGTERM: the front goes first, its socket too
        assert not os.path.exists(http)
    finally:
        daemon.cleanup()


def _front_pid(parent: int) -> int | None:
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as fh:
            children = [int(p) for p in fh.read().split()]
    except FileNotFoundError:
        return None
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"inferd.daemon.oip" in fh.read():
                    return pid
        except FileNotFoundError:
            pass
    return None


# TLS on the TCP doors ---------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
def test_tls_doors_serve_https_and_grpc_over_tls(served):
    daemon, _, _ = served
    where = short_dir()
    cert, key = os.path.join(where, "cert.pem"), os.path.join(where, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    os.chmod(key, 0o600)
    front = Front(daemon, "oip.http=127.0.0.1:0", "oip.grpc=127.0.0.1:0", f'oip.tls_cert="{cert}"',
                  f'oip.tls_key="{key}"')
    try:
        import ssl
        context = ssl.create_default_context(cafile=cert)
        with urllib.request.urlopen(f"https://{front.http}/v2/health/ready", context=context, timeout=30) as r:
            assert r.status == 200
        with pytest.raises((urllib.error.URLError, ConnectionError)):    # plain HTTP to a TLS door: no answer
            urllib.request.urlopen(f"http://{front.http}/v2/health/ready", timeout=10)
        assert tritongrpc.InferenceServerClient(front.grpc, ssl=True, root_certificates=cert).is_server_ready()
        h = tritonhttp.InferenceServerClient(front.http, ssl=True, ssl_options={"ca_certs": cert})
        inp = tritonhttp.InferInput("IMAGE", [1, 64, 64, 3], "UINT8")
        inp.set_data_from_numpy(frames(1, seed=5))
        assert h.infer("shapes", [inp]).as_numpy("SCORES").shape == (1, 8)
    finally:
        front.stop()


def test_large_frames_and_large_json_are_served_beside_small_requests(served):
    """A 2000x1500 frame (resized off the loop) and a 1 MB JSON body (parsed off the loop) are
    answered as the Python client answers them, and the front stays live meanwhile."""
    daemon, net, _ = served
    big = frames(1, 1500, 2000, seed=21)
    dense, _ = python_client_answers(daemon, big, 8)
    h = tritonhttp.InferenceServerClient(net.http, network_timeout=120)
    inp = tritonhttp.InferInput("IMAGE", list(big.shape), "UINT8")
    inp.set_data_from_numpy(big, binary_data=True)
    np.testing.assert_allclose(h.infer("shapes", [inp], headers={**AUTH_A}).as_numpy("SCORES"), dense,
                               rtol=1e-6, atol=1e-7)
    mid = frames(1, 300, 400, seed=22)
    dense, _ = python_client_answers(daemon, mid, 8)
    status, _, reply = _post(f"http://{net.http}/v2/models/shapes/infer",
                             _infer_body(list(mid.shape), data=mid.reshape(-1).tolist()), AUTH_A)
    assert status == 200, reply
    np.testing.assert_allclose(np.array(reply["outputs"][0]["data"], np.float32).reshape(1, 8), dense,
                               rtol=1e-6, atol=1e-7)
    assert net.alive()


def test_ready_follows_the_daemons_own_health(served):
    """/v2/health/ready and gRPC ServerReady say what `inferctl health` says: with its only device
    taken out of rotation the daemon is not ready, and inference answers 503."""
    daemon, net, local = served
    g = tritongrpc.InferenceServerClient(net.grpc)
    with AdminClient(helpers.admin_path(daemon)) as admin:
        admin.call("device", index=0, action="disable")
        try:
            status, reply = _get(f"http://{net.http}/v2/health/ready")
            assert status == 503 and "0 device(s) in rotation" in reply["error"], reply
            assert not g.is_server_ready() and not g.is_model_ready("shapes")
            fresh = frames(1, seed=int.from_bytes(os.urandom(4), "little"))
            status, _, reply = _post(f"http://{net.http}/v2/models/shapes/infer",
                                     _infer_body([1, 64, 64, 3], data=fresh.reshape(-1).tolist()), AUTH_A)
            assert status == 503, reply
        finally:
            admin.call("device", index=0, action="enable")
    assert _get(f"http://{net.http}/v2/health/ready")[0] == 200 and g.is_server_ready()
