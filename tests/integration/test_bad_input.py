"""Bad input: each gets a clear typed error (or is cleaned up), and the daemon keeps serving others.

What each bad input gets:

    input                                      daemon's answer                 client library raises
    wrong shape                                invalid_input, for that id      InvalidInput
    wrong dtype                                invalid_input                   InvalidInput
    slot index out of range (or negative)      invalid_input                   InvalidInput
    byte count larger than the slot            invalid_input                   InvalidInput
    slot reused while in flight                slot_busy                       ProtocolError
    a field of the wrong type / no id          bad_request                     ProtocolError
    truncated msgpack body                     bad_frame, connection stays     ProtocolError
    header announcing 4 GiB                    frame_too_large, then closed    ProtocolError
    unknown op                                 unknown_op                      ProtocolError
    hello with another protocol version        unsupported_version, closed     ProtocolError
    hello asking for an oversized ring         invalid_input, closed           InvalidInput
    a uid not on the allow-list                permission_denied, closed       PermissionDenied
    disconnect with requests in flight         nothing to answer; ring freed after the last one
    SIGKILL with slots in flight               same; nothing left in /dev/shm

After each, the module's ``good`` check proves another client is still served correctly.
"""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import TESTS, RawClient, sample_images, shm_leftovers, wait_until
from inferd.client import Client, InvalidInput
from inferd.shm import wire

pytestmark = pytest.mark.timeout(120)

FRAME = np.zeros((64, 64, 3), np.uint8)


@pytest.fixture
def raw(daemon):
    c = RawClient(daemon.socket_path, ring_slots=4)
    assert c.hello_reply["ok"]
    yield c
    c.close()


@pytest.fixture(autouse=True)
def others_still_served(daemon):
    """After every bad input: a second client gets a correct answer, and rings are not leaked."""
    yield
    label, image = sample_images()[0]
    with Client(daemon.socket_path) as good:
        assert good.classify(image)[0].label == label
    # Only the test's own clients ever held rings; once they are gone the daemon holds none.
    wait_until(lambda: daemon.ring_maps() == 0, what="every ring unmapped")
    assert not shm_leftovers(daemon.prefix)


def _expect_error(c: RawClient, rid, code: str, fragment: str) -> dict:
    reply = c.recv()
    assert reply is not None and reply["id"] == rid and reply["ok"] is False, reply
    assert reply["code"] == code and fragment in reply["message"], reply
    return reply


def test_wrong_shape(raw):
    raw.classify(1, 0, np.zeros((32, 32, 3), np.uint8), nbytes=64 * 64 * 3)
    _expect_error(raw, 1, wire.E_INVALID_INPUT, "does not match the model input [64, 64, 3]")


def test_wrong_dtype(raw):
    raw.classify(2, 0, FRAME, dtype="float32")
    _expect_error(raw, 2, wire.E_INVALID_INPUT, "dtype 'float32' is not supported")


@pytest.mark.parametrize("slot", [4, 10**9, -1])
def test_slot_index_out_of_range(raw, slot):
    raw.send({"op": "classify", "id": 3, "slot": slot, "shape": [64, 64, 3], "dtype": "uint8",
              "nbytes": FRAME.nbytes})
    _expect_error(raw, 3, wire.E_INVALID_INPUT, f"slot {slot} is out of range")


def test_byte_count_larger_than_the_slot(raw):
    raw.classify(4, 0, FRAME, nbytes=2**40)
    _expect_error(raw, 4, wire.E_INVALID_INPUT, "does not fit a slot")


def test_slot_reused_while_in_flight(fresh_daemon):
    # A daemon whose lone frame waits a second for company: request 5 is surely still in flight
    # when request 6 names its slot (both go in one write), however loaded the machine is.
    d = fresh_daemon("--set", "batching.adaptive=false", "--set", "batching.max_delay_ms=1000")
    c = RawClient(d.socket_path, ring_slots=2)
    try:
        c.ring.slot(0, FRAME.nbytes)[:] = FRAME.reshape(-1)
        head = {"op": "classify", "slot": 0, "shape": list(FRAME.shape), "dtype": "uint8",
                "nbytes": FRAME.nbytes}
        c.send_raw(wire.encode({**head, "id": 5, "timeout_ms": 60000}) + wire.encode({**head, "id": 6}))
        first, second = c.recv(), c.recv()
        assert second["id"] == 5 and second["ok"] is True, (first, second)
        assert first["id"] == 6 and first["code"] == wire.E_SLOT_BUSY, first
        assert "already carries request 5" in first["message"]
    finally:
        c.close()


@pytest.mark.parametrize("message, rid, fragment", [
    ({"op": "classify", "slot": 0}, None, "id must be an integer"),
    ({"op": "classify", "id": 7, "slot": "0"}, 7, "slot must be an integer"),
    ({"op": "classify", "id": 8, "slot": 0, "nbytes": 1.5}, 8, "nbytes must be an integer"),
])
def test_fields_of_the_wrong_type(raw, message, rid, fragment):
    raw.send(message)
    _expect_error(raw, rid, wire.E_BAD_REQUEST, fragment)


def test_truncated_msgpack_keeps_the_connection(raw):
    body = wire.encode({"op": "ping", "id": 9})[wire.HEADER_SIZE:-3]
    raw.send_raw(wire.HEADER.pack(len(body)) + body)
    _expect_error(raw, None, wire.E_BAD_FRAME, "not valid msgpack")
    raw.send({"op": "ping", "id": 10})
    assert raw.recv()["ok"] is True


def test_frame_header_announcing_4_gib_closes_only_that_connection(raw):
    raw.send_raw(wire.HEADER.pack(2**32 - 1))
    _expect_error(raw, None, wire.E_FRAME_TOO_LARGE, "4294967295 bytes announced")
    assert raw.recv() is None                                      # closed by the daemon


def test_unknown_op(raw):
    raw.send({"op": "format_disk", "id": 11})
    _expect_error(raw, 11, wire.E_UNKNOWN_OP, "unknown op 'format_disk'")


def test_library_maps_codes_to_typed_exceptions(daemon):
    with Client(daemon.socket_path) as client:
        with pytest.raises(InvalidInput, match="top_k 99 is out of range: 1 to 8"):
            client.classify(FRAME, top_k=99)
        with pytest.raises(InvalidInput, match="timeout_ms"):
            client.classify(FRAME, timeout=-1)
        assert client.classify(FRAME, top_k=1)                   # the session is still usable


@pytest.mark.parametrize("hello, code, exc", [
    ({"version": 99}, wire.E_UNSUPPORTED_VERSION, "this daemon speaks 1"),
    ({"ring_slots": 10**6}, wire.E_INVALID_INPUT, "ring_slots 1000000 is out of range"),
    ({"ring_slots": 1024, "slot_bytes": 2**27}, wire.E_INVALID_INPUT, "is over ring.max_ring_bytes"),
    ({"slot_bytes": 100}, wire.E_INVALID_INPUT, "slot_bytes 100 is out of range"),
    ({"op": "classify"}, wire.E_BAD_REQUEST, "the first message must be hello"),
])
def test_bad_hello_is_refused_and_closed(daemon, hello, code, exc):
    c = RawClient(daemon.socket_path, hello=False)
    try:
        reply = c.hello(**hello)
        assert reply["ok"] is False and reply["code"] == code and exc in reply["message"], reply
        assert c.ring is None and c.recv() is None
    finally:
        c.close()


DISCONNECTER = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from helpers import RawClient
c = RawClient(sys.argv[1], ring_slots=16)
frame = np.full((64, 64, 3), 7, np.uint8)
for i in range(16):
    c.classify(i, i, frame)
c.sock.close()          # gone with 16 requests in flight, without reading a reply
"""


def test_disconnect_mid_request(daemon):
    tests_dir = str(TESTS)
    subprocess.run([sys.executable, "-c", DISCONNECTER, daemon.socket_path, tests_dir], check=True, timeout=60)
    # the autouse check then asserts the ring is unmapped and others are served


KILLED = r"""
import sys, numpy as np
from inferd.client import Client
c = Client(sys.argv[1], ring_slots=32)
frames = [np.full((64, 64, 3), i % 255, np.uint8) for i in range(2000)]
print("connected", flush=True)
c.classify_many(frames)
"""


@pytest.mark.parametrize("backend", ["memfd", "posix"])
def test_client_sigkilled_with_slots_in_flight(fresh_daemon, backend):
    d = fresh_daemon("--set", f'ring.backend="{backend}"')
    proc = subprocess.Popen([sys.executable, "-c", KILLED, d.socket_path], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "connected"
        with Client(d.socket_path) as watcher:
            wait_until(lambda: watcher.info()["outstanding"] > 0, what="requests in flight")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        label, image = sample_images()[1]
        with Client(d.socket_path) as good:
            assert good.classify(image)[0].label == label

        def only_the_probe_left():
            with Client(d.socket_path) as probe:
                return probe.info()["sessions"] == 1 and d.ring_maps() == 1
        wait_until(only_the_probe_left, what="the killed client's session and ring released")
        assert not shm_leftovers(d.prefix)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert d.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_uid_not_on_the_allow_list(fresh_daemon):
    d = fresh_daemon("--set", "server.socket_mode=0o666")
    os.chmod(d.workdir, 0o755)
    # Drop to uid/gid 65534 after the imports (the interpreter lives under root-only /root);
    # SO_PEERCRED records the credentials of the connect() that follows.
    script = ("import os, sys\nfrom inferd.client import Client, PermissionDenied\n"
              "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
              "try:\n    Client(sys.argv[1])\nexcept PermissionDenied as e:\n    print('denied:', e)\n")
    out = subprocess.run([sys.executable, "-c", script, d.socket_path], capture_output=True, text=True,
                         timeout=60)
    assert "denied: uid 65534 gid 65534 is not allowed" in out.stdout, out.stderr
    assert d.stop() == 0
