"""The OIP front on the daemon's own event loop (``oip.placement = "daemon"``,
daemon/oip/resident.py), against a real daemon, through clients nobody here wrote.

The same doors as the front's process (tests/integration/test_oip_front.py holds the full set of
routes and errors, against a front process): here, what changes with the placement. Answers equal
the Python client's (tensor and BYTES inputs, HTTP and gRPC); tokens and peer uids name the
principal as before; no front process exists; drain closes the doors first; and hostile callers
(malformed HTTP, oversized bodies, slow-loris connections, bad tokens) on the daemon's own loop
leave a well-behaved caller's answers right and its latency within seconds."""
from __future__ import annotations

import io
import json
import os
import secrets
import socket
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
from helpers import short_dir, spawn_daemon, wait_until
from inferd.client import AdminClient, Client
from inferd.daemon.oip.tenants import tenant_uid

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.timeout(300)
TOKEN = secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 256 * 1024
#: each principal's slots on the daemon's loop: fewer than a request's images below
RING_SLOTS = 4


def _tokens_file() -> str:
    path = os.path.join(short_dir(), "tokens")
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        fh.write(f"{TOKEN} alpha 1\n")
    return path


def _doors(daemon) -> dict:
    """The doors the daemon's health names once bound (ports resolved)."""
    def bound():
        with AdminClient(helpers.admin_path(daemon)) as admin:
            oip = admin.call("health").get("oip") or {}
        return oip if oip.get("http") not in (None, "starting") and oip.get("grpc") not in (None, "starting") else None
    return wait_until(bound, 60, "the OIP doors on the daemon's loop")


@pytest.fixture(scope="module")
def resident():
    """A daemon serving OIP on its loop: TCP doors with a tokens file, a small body limit, a 1 s
    idle timeout (so a slow-loris connection that stops is closed within the test) and rings of
    RING_SLOTS slots (so a request of more images waits for slots to come free)."""
    tokens = _tokens_file()
    daemon = spawn_daemon("--set", "oip.enabled=true", "--set", 'oip.placement="daemon"',
                          "--set", 'oip.http="127.0.0.1:0"', "--set", 'oip.grpc="127.0.0.1:0"',
                          "--set", f'oip.tokens_file="{tokens}"', "--set", f"oip.max_request_bytes={MAX_BODY}",
                          "--set", "oip.idle_timeout_s=1.0", "--set", f"oip.ring_slots={RING_SLOTS}")
    try:
        yield daemon, _doors(daemon)
    finally:
        daemon.cleanup()


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def python_top3(daemon, images) -> list:
    with Client(daemon.socket_path) as c:
        answers = c.classify_many(list(images), top_k=8)
    return [[f"{p.score:f}:{p.index}:{p.label}".encode() for p in preds[:3]] for preds in answers]


def _triton_infer(module, address: str, images, headers: dict, name="IMAGE") -> list:
    client = module.InferenceServerClient(address)
    try:
        if name == "IMAGE":
            inp = module.InferInput("IMAGE", list(images.shape), "UINT8")
            inp.set_data_from_numpy(images)
        else:
            inp = module.InferInput("IMAGE_BYTES", [len(images)], "BYTES")
            inp.set_data_from_numpy(np.array(images, dtype=np.object_))
        out = module.InferRequestedOutput("SCORES", class_count=3)
        # (a copy: tritonclient.http writes Inference-Header-Content-Length into the dict it is given)
        got = client.infer("shapes", [inp], outputs=[out], headers=dict(headers)).as_numpy("SCORES")
        return [list(row) for row in got]
    finally:
        client.close()


def test_both_doors_answer_as_the_python_client_from_the_daemons_loop(resident):
    daemon, doors = resident
    assert doors["placement"] == "daemon" and doors["pid"] == daemon.pid and doors["restarts"] == 0
    assert _front_children(daemon.pid) == []                # no front process
    batch = frames(3, seed=1)
    want = python_top3(daemon, batch)
    grpc_auth = {k.lower(): v for k, v in AUTH.items()}
    assert _triton_infer(tritonhttp, doors["http"], batch, AUTH) == want
    assert _triton_infer(tritongrpc, doors["grpc"], batch, grpc_auth) == want
    files = []
    for frame in batch:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, "PNG")
        files.append(buf.getvalue())
    want_files = python_top3(daemon, files)             # the client library decodes files as the front does
    assert _triton_infer(tritonhttp, doors["http"], files, AUTH, "IMAGE_BYTES") == want_files
    assert _triton_infer(tritongrpc, doors["grpc"], files, grpc_auth, "IMAGE_BYTES") == want_files
    # the tenant its token names is the principal, as with the front's process
    with AdminClient(helpers.admin_path(daemon)) as admin:
        uids = {u["uid"] for u in admin.call("stats")["uids"]}
    assert tenant_uid("alpha") in uids
    # inferctl says where the front runs
    health = subprocess.run([sys.executable, "-m", "inferd.client.cli", "--socket", daemon.socket_path, "health"],
                            capture_output=True, text=True, timeout=60)
    assert f"OIP front: HTTP {doors['http']}, gRPC {doors['grpc']} (on the daemon's event loop)" in health.stdout


def test_more_images_than_ring_slots_logits_and_each_error_path(resident):
    """A request of more images than its principal's ring has slots is sent as slots come free;
    LOGITS equal the Python client's; every refusal has its OIP status (HTTP and gRPC)."""
    daemon, doors = resident
    http, grpc_auth = doors["http"], {k.lower(): v for k, v in AUTH.items()}
    batch = frames(3 * RING_SLOTS + 1, seed=5)
    assert _triton_infer(tritonhttp, http, batch, AUTH) == python_top3(daemon, batch)
    with Client(daemon.socket_path) as c:
        want = np.stack([p.logits for p in c.classify_many(list(batch[:2]), top_k=3, logits=True)])
    g = tritongrpc.InferenceServerClient(doors["grpc"])
    inp = tritongrpc.InferInput("IMAGE", [2, 64, 64, 3], "UINT8")
    inp.set_data_from_numpy(batch[:2])
    got = g.infer("shapes", [inp], outputs=[tritongrpc.InferRequestedOutput("LOGITS")],
                  headers=grpc_auth).as_numpy("LOGITS")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    def body(shape, data=None, **extra) -> bytes:
        n = int(np.prod(shape))
        return json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": shape,
                                       "data": data if data is not None else [0] * n}], **extra}).encode()
    for payload, headers, want_status in [
            (body([1, 8, 8, 4]), AUTH, 400),
            (json.dumps({"inputs": [{"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1],
                                     "data": ["not an image"]}]}).encode(), AUTH, 400),
            (body([1, 2, 2, 3]), {}, 401),
            (body([1, 64, 64, 3], data=frames(1, seed=99).reshape(-1).tolist(), parameters={"timeout": 1}),
             AUTH, (429, 504))]:
        status, reply = _post(http, payload, headers)
        assert status in (want_status if isinstance(want_status, tuple) else (want_status,)), (status, reply)
        assert reply["error"]
    request = urllib.request.Request(f"http://{http}/v2/models/nope/infer", data=body([1, 2, 2, 3]), headers=AUTH)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 404 and "shapes" in json.loads(err.value.read())["error"]
    from tritonclient.utils import InferenceServerException
    bad = tritongrpc.InferInput("IMAGE", [1, 4, 4, 2], "UINT8")
    bad.set_data_from_numpy(np.zeros((1, 4, 4, 2), np.uint8))
    good = tritongrpc.InferInput("IMAGE", [1, 4, 4, 3], "UINT8")
    good.set_data_from_numpy(np.zeros((1, 4, 4, 3), np.uint8))
    for model, inputs, headers, code in [("shapes", [bad], grpc_auth, "StatusCode.INVALID_ARGUMENT"),
                                         ("nope", [good], grpc_auth, "StatusCode.NOT_FOUND"),
                                         ("shapes", [good], {}, "StatusCode.UNAUTHENTICATED")]:
        with pytest.raises(InferenceServerException) as info:
            g.infer(model, inputs, headers=headers)
        assert info.value.status() == code
    assert daemon.proc.poll() is None


def _front_children(parent: int) -> list:
    with open(f"/proc/{parent}/task/{parent}/children") as fh:
        children = [int(p) for p in fh.read().split()]
    out = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"inferd.daemon.oip" in fh.read():
                    out.append(pid)
        except FileNotFoundError:
            pass
    return out


def _post(address: str, body: bytes, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{address}/v2/models/shapes/infer", data=body,
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


@pytest.mark.slow
def test_hostile_callers_on_the_daemons_loop_leave_a_good_caller_served(resident):
    """While a well-behaved tritonclient.http caller classifies in a loop (each answer checked
    against the Python client's, each latency kept), hostile callers hit the same door: malformed
    HTTP, oversized bodies (413), bad tokens (401), and slow-loris connections (headers trickled,
    or half a request and then silence, which the idle timeout closes). The good caller's
    answers stay right, its slowest request within seconds; the daemon and its doors survive."""
    daemon, doors = resident
    http = doors["http"]
    batch = frames(2, seed=7)
    want = python_top3(daemon, batch)
    stop = threading.Event()
    good = {"lat": [], "wrong": [], "errors": []}

    def well_behaved():
        client = tritonhttp.InferenceServerClient(http)
        inp = tritonhttp.InferInput("IMAGE", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        out = tritonhttp.InferRequestedOutput("SCORES", class_count=3)
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    got = [list(r) for r in client.infer("shapes", [inp], outputs=[out], headers=dict(AUTH))
                           .as_numpy("SCORES")]
                except Exception as exc:        # noqa: recorded, asserted below
                    good["errors"].append(repr(exc))
                    continue
                good["lat"].append(time.monotonic() - t0)
                if got != want:
                    good["wrong"].append(got)
        finally:
            client.close()

    victim = threading.Thread(target=well_behaved)
    victim.start()
    lorises = []
    silent = socket.socket()
    counts = {"413": 0, "401": 0, "junk": 0}
    try:
        wait_until(lambda: len(good["lat"]) >= 3, 60, "the good caller's first answers")
        for _ in range(20):                     # slow-loris: connections that trickle their headers
            s = _connect(http)
            s.sendall(b"POST /v2/models/shapes/infer HTTP/1.1\r\nHost: x\r\n")
            lorises.append(s)
        silent = _connect(http)                 # half a request, then nothing: closed when idle
        silent.sendall(b"POST /v2/models/shapes/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\nab")
        deadline = time.monotonic() + 8.0
        i = 0
        while time.monotonic() < deadline:
            i += 1
            for s in lorises:
                s.sendall(f"X-Loris-{i}: {i}\r\n".encode())
            status, reply = _post(http, b"{" + b" " * (MAX_BODY + 1024) + b"}", AUTH)
            assert status == 413 and reply["error"]
            counts["413"] += 1
            status, reply = _post(http, b'{"inputs": []}', {"Authorization": "Bearer " + "x" * 32})
            assert status == 401 and reply["error"]
            counts["401"] += 1
            for junk in (b"\x00" * 2048, b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                         b"POST /v2/models/shapes/infer HTTP/9.9 nonsense\r\n\r\n"):
                with _connect(http) as s:
                    s.sendall(junk)
                counts["junk"] += 1
            time.sleep(0.2)                     # noqa: sleep-ok  the lorises' trickle rate
        # the silent half request was closed by the idle timeout (1 s) long ago: it reads EOF
        # (a socket.timeout here: the door kept it open)
        silent.settimeout(10)
        while silent.recv(65536):
            pass
    finally:
        stop.set()
        victim.join(60)
        for s in lorises:
            s.close()
        silent.close()
    assert not good["wrong"] and not good["errors"], (good["wrong"][:2], good["errors"][:3])
    assert len(good["lat"]) >= 10 and max(good["lat"]) < 5.0, (len(good["lat"]), max(good["lat"], default=0))
    assert counts["413"] >= 3 and counts["401"] >= 3 and counts["junk"] >= 9
    assert daemon.proc.poll() is None
    assert tritonhttp.InferenceServerClient(http).is_server_ready()
    assert tritongrpc.InferenceServerClient(doors["grpc"]).is_server_live()


def _json_top3_over_unix(http: str, batch) -> tuple[bytes, bytes]:
    """POST ``batch`` as JSON with the classification extension (top 3) to the HTTP door on the
    Unix socket ``http``, on a connection of its own: the reply's head and body."""
    body = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": list(batch.shape),
                                   "data": batch.reshape(-1).tolist()}],
                       "outputs": [{"name": "SCORES", "parameters": {"classification": 3}}]}).encode()
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(http)
    s.sendall(b"POST /v2/models/shapes/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    s.close()
    head, _, payload = reply.partition(b"\r\n\r\n")
    return head, payload

def test_local_callers_on_the_unix_door_are_their_uids_and_drain_closes_it_first():
    """On a Unix socket the peer's uid is the principal, as with the front's process; SIGTERM
    closes the door (its socket unlinked) and the daemon exits 0."""
    where = short_dir()
    http = f"{where}/http.sock"
    daemon = spawn_daemon("--set", "oip.enabled=true", "--set", 'oip.placement="daemon"',
                          "--set", f'oip.http="{http}"', "--set", "oip.grpc=off")
    try:
        doors = _doors(daemon)
        assert doors == {"http": http, "grpc": "off", "pid": daemon.pid, "restarts": 0, "placement": "daemon"}
        batch = frames(1, seed=3)
        head, payload = _json_top3_over_unix(http, batch)
        assert head.startswith(b"HTTP/1.1 200"), head
        want = [w.decode() for w in python_top3(daemon, batch)[0]]
        assert json.loads(payload)["outputs"][0]["data"] == want
        with AdminClient(helpers.admin_path(daemon)) as admin:
            uids = {u["uid"] for u in admin.call("stats")["uids"]}
        assert os.getuid() in uids
        assert daemon.stop() == 0
        assert not os.path.exists(http)
    finally:
        daemon.cleanup()


def test_http_on_the_daemons_loop_and_grpc_in_the_supervised_process():
    """``oip.placement = "http-daemon"``: the HTTP door on the daemon's loop, the gRPC door in
    the front's supervised process (which serves no HTTP); both answer as the Python client;
    SIGTERM stops both."""
    where = short_dir()
    http, grpc_port = f"{where}/http.sock", _free_port()
    daemon = spawn_daemon("--set", "oip.enabled=true", "--set", 'oip.placement="http-daemon"',
                          "--set", f'oip.http="{http}"', "--set", f'oip.grpc="127.0.0.1:{grpc_port}"', fork=False)
    try:
        doors = _doors(daemon)
        assert doors["http"] == http and doors["grpc"] == f"127.0.0.1:{grpc_port}", doors
        assert doors["placement"] == "http-daemon"
        child = wait_until(lambda: _front_children(daemon.pid), 60, "the gRPC front's process")[0]
        assert doors["pid"] in (None, child)
        with open(f"/proc/{child}/cmdline", "rb") as fh:
            assert b'oip.http="off"' in fh.read()         # the process serves gRPC alone
        health = subprocess.run([sys.executable, "-m", "inferd.client.cli", "--socket", daemon.socket_path,
                                 "health"], capture_output=True, text=True, timeout=60)
        assert f"(HTTP on the daemon's event loop, gRPC pid {child})" in health.stdout, health.stdout
        batch = frames(2, seed=21)
        want = python_top3(daemon, batch)
        g = tritongrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        wait_until(lambda: _live(g), 60, "the gRPC door")
        assert _triton_infer(tritongrpc, f"127.0.0.1:{grpc_port}", batch, {}) == want
        head, payload = _json_top3_over_unix(http, batch)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(payload)["outputs"][0]["data"] == [e.decode() for row in want for e in row]
        assert daemon.stop() == 0
        assert not os.path.exists(http)
        wait_until(lambda: not os.path.exists(f"/proc/{child}") or _zombie(child), 30, "the gRPC front gone")
    finally:
        daemon.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live(client) -> bool:
    try:
        return client.is_server_live()
    except Exception:                           # noqa: not listening yet
        return False


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True
