"""The processes of bench/isolation/run.py: the victim, the well-behaved loaders, and one attacker per
attack. Each is a spawned child (``bench/lib/procs.py``) called with its own result queue and stop event
first; it reports ``("ok", "ready")`` once it is about to start, then one ``("ok", dict)``.

An attacker may run as another uid: it imports everything it needs as root first (the
interpreter's files may be readable by root only), then drops to ``uid`` (setgroups, setgid,
setuid), then connects. Attackers run until their ``stop`` event is set, each in its own way:

- ``info``: one write of 10,000 ``info`` requests, read every reply, again;
- ``unread``: pings and classifies pipelined on one session, never a reply read; when the daemon
  stops reading, wait for the socket to take more; when it closes the session, open another;
- ``flood``: one Client keeping ``FLOOD_SLOTS`` frames in flight (``classify_many``);
- ``door``: as many sessions as the daemon lets one uid open, every other one with half a frame
  sent; a session the daemon closes is opened again;
- ``malformed``: seeded garbage frames until ``stop``, and at least ``MALFORMED_FRAMES`` of them;
- ``hits``: ``HITS_SESSIONS`` sessions, each keeping ``HITS_DEPTH`` copies of one frame in flight
  (answered from the daemon's result cache, on its event loop, after the first).
"""
from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
import time
import traceback

import numpy as np

from ..lib.measure import frames
from ..lib.report import REPO

FLOOD_SLOTS = 256                  # frames the flooding session keeps in flight
INFO_BATCH = 10_000                # info requests in one write
MALFORMED_FRAMES = 100_000
MALFORMED_MAX_S = 60.0             # a daemon that reads the garbage slowly ends the attack short of it
HITS_SESSIONS, HITS_DEPTH = 4, 64  # the cache-hit flood: sessions of one uid, frames in flight each
DOOR_MAX = 400                     # sessions the door attacker tries to hold (max_clients is 256)


def drop_to(uid: int | None) -> None:
    """Become ``uid`` (and gid ``uid``, no supplementary groups); None keeps this process's."""
    if uid is not None and uid != os.geteuid():
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def sample_images() -> list[tuple[str, np.ndarray]]:
    """The repository's sample PNGs as (true label, uint8 HxWx3 array)."""
    from PIL import Image

    root = os.path.join(REPO, "samples")
    out = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".png"):
            with Image.open(os.path.join(root, name)) as img:
                out.append((name.rsplit("_", 1)[0], np.array(img.convert("RGB"))))
    return out


# -- well-behaved clients ------------------------------------------------------------------------
def victim(q, stop, socket_path: str, hold) -> None:
    """Classify the sample images one at a time until ``stop`` (idle while ``hold`` is set), each
    with its corner pixel stamped by a counter so that every call is computed on the device;
    report every call's end time, latency and outcome (0 right, 1 wrong label, 2 error) and the
    errors by type."""
    try:
        from inferd.client import Client, InferdError

        samples = sample_images()
        ends, lats, outcomes, errors = [], [], [], {}
        client = Client(socket_path, cache=False)
        client.classify(samples[0][1])                   # connected and warm
        q.put(("ok", "ready"))
        i = 0
        while not stop.is_set():
            if hold.is_set():
                stop.wait(0.05)
                continue
            label, image = samples[i % len(samples)]
            image = image.copy()                         # a frame never seen: computed, not a cache
            image[0, 0] = np.frombuffer(i.to_bytes(3, "little"), np.uint8)   # hit (the cache is on)
            i += 1
            t0 = time.perf_counter()
            try:
                got = client.classify(image, top_k=1)[0].label
                outcome = 0 if got == label else 1
            except InferdError as exc:
                outcome = 2
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            lats.append(time.perf_counter() - t0)
            ends.append(time.monotonic())
            outcomes.append(outcome)
        client.close()
        q.put(("ok", {"ends": ends, "lats": lats, "outcomes": outcomes, "errors": errors}))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def loader(q, stop, socket_path: str, depth: int, uid: int | None, seed: int) -> None:
    """Closed loop of ``classify_many`` on ``depth`` random frames until ``stop``; reports the end
    time and frame count of every call. With ``uid`` and a large depth this is the flood."""
    try:
        from inferd.client import Client, InferdError

        batch = frames(depth, 64, seed=seed)
        drop_to(uid)
        ends, errors, n = [], 0, 0
        with Client(socket_path, ring_slots=min(depth, FLOOD_SLOTS), cache=False, timeout=60) as client:
            q.put(("ok", "ready"))
            while not stop.is_set():
                n += 1                   # every call's frames new: misses of the daemon's result cache
                batch[:, 0, 0, :3] = np.frombuffer(n.to_bytes(3, "little"), np.uint8)
                try:
                    client.classify_many(list(batch), top_k=1)
                    ends.append(time.monotonic())
                except InferdError:
                    errors += 1
        q.put(("ok", {"ends": ends, "depth": depth, "errors": errors}))
    except BaseException:
        q.put(("error", traceback.format_exc()))


# -- raw sessions --------------------------------------------------------------------------------
class Raw:
    """One session spoken by hand: connect, hello, then whatever the attack sends."""

    def __init__(self, socket_path: str, ring_slots: int = 8):
        from inferd.shm import wire

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(socket_path)
        self.sock.sendall(wire.encode({"op": "hello", "id": 0, "version": wire.PROTOCOL_VERSION,
                                       "ring_slots": ring_slots}))
        self.reader = wire.FrameReader(wire.MAX_REPLY_FRAME)
        data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
        for level, kind, payload in anc:                 # the ring's descriptor: not needed here
            if kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) // 4 * 4]):
                    os.close(fd)
        replies = self.reader.feed(data)
        self.hello = replies[0] if replies else {}
        if not self.hello.get("ok"):
            self.sock.close()
            raise ConnectionRefusedError(f"hello refused: {self.hello}")

    def drain(self) -> tuple[int, bool]:
        """Read what has arrived without waiting: (replies read, still open)."""
        n = 0
        while select.select([self.sock], [], [], 0)[0]:  # a socket with a timeout would wait in recv
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return n, False
            if not data:
                return n, False
            n += len(self.reader.feed(data))
        return n, True

    def close(self) -> None:
        self.sock.close()


def attacker(q, stop, kind: str, socket_path: str, uid: int | None, seed: int) -> None:
    """Run attack ``kind`` as ``uid`` until ``stop``; report its own counts."""
    try:
        from inferd.shm import wire                      # noqa: F401  imported before dropping root
        import inferd.client                             # noqa: F401

        drop_to(uid)
        q.put(("ok", "ready"))
        q.put(("ok", ATTACKS[kind](socket_path, stop, random.Random(seed))))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def _pump(raw: Raw, data: bytes, want: int, stop) -> int:
    """Send ``data`` and read replies until ``want`` have come, each as the socket allows (an
    attacker that reads while it writes), or until ``stop``. Returns the replies read."""
    view, pos, got = memoryview(data), 0, 0
    while got < want and not stop.is_set():
        readable, writable, _ = select.select([raw.sock], [raw.sock] if pos < len(view) else [], [], 0.1)
        if writable:
            pos += raw.sock.send(view[pos:pos + (1 << 16)])
        if readable:
            chunk = raw.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionResetError("the daemon closed the session")
            got += len(raw.reader.feed(chunk))
    return got


def _info(socket_path, stop, rng) -> dict:
    from inferd.shm import wire

    batch = b"".join(wire.encode({"op": "info", "id": i}) for i in range(1, INFO_BATCH + 1))
    writes = replies = closed = 0
    raw = Raw(socket_path)
    while not stop.is_set():
        try:
            replies += _pump(raw, batch, INFO_BATCH, stop)
            writes += 1
        except OSError:
            closed += 1
            raw.close()
            raw = Raw(socket_path)
    raw.close()
    return {"writes": writes, "replies": replies, "closed_by_daemon": closed}


def _unread(socket_path, stop, rng) -> dict:
    from inferd.shm import wire

    raw = Raw(socket_path, ring_slots=64)
    shape = raw.hello["model"]["input"]
    nbytes = int(np.prod(shape))
    chunk = b"".join(wire.encode({"op": "ping", "id": i} if i % 2 else
                                 {"op": "classify", "id": i, "slot": i % 64, "shape": shape,
                                  "dtype": "uint8", "nbytes": nbytes}) for i in range(1, 2001))
    sent = closed = 0
    view = memoryview(chunk)
    pos = 0
    raw.sock.setblocking(False)
    while not stop.is_set():
        try:
            pos += raw.sock.send(view[pos:])
            if pos == len(chunk):
                sent += 2000
                pos = 0
        except BlockingIOError:
            select.select([], [raw.sock], [], 0.1)        # the daemon stopped reading: wait
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise
            closed += 1                                   # closed for not reading: come again
            raw.close()
            raw = Raw(socket_path, ring_slots=64)
            raw.sock.setblocking(False)
            pos = 0
    raw.close()
    return {"frames_sent": sent, "closed_by_daemon": closed}


def _door(socket_path, stop, rng) -> dict:
    from inferd.shm import wire

    held: list[Raw] = []
    opened = refused = closed = 0
    half = wire.HEADER.pack(200) + b"\x80" * 50          # a frame announced at 200 bytes, 50 sent
    while not stop.is_set():
        if len(held) < DOOR_MAX:
            try:
                raw = Raw(socket_path, ring_slots=1)
                if opened % 2:
                    raw.sock.sendall(half)
                held.append(raw)
                opened += 1
                continue
            except (OSError, ConnectionRefusedError):
                refused += 1
        alive = []
        for raw in held:                                 # sessions the daemon closed are retried
            _, still = raw.drain()
            if still:
                alive.append(raw)
            else:
                closed += 1
                raw.close()
        held = alive
        stop.wait(0.2)
    peak = len(held)
    for raw in held:
        raw.close()
    return {"opened": opened, "refused": refused, "closed_by_daemon": closed, "held_at_end": peak}


def malformed_frame(rng: random.Random, wire) -> bytes:
    """One frame that is wrong in one of several ways; one in 1,000 announces a body over the
    limit, which closes the connection (the attacker then opens another session)."""
    if rng.randrange(1000) == 0:                         # over the frame limit: closed
        return wire.HEADER.pack(1 << 30) + b"x"
    kind = rng.randrange(10)
    if kind == 0:                                        # not msgpack at all
        body = rng.randbytes(rng.randrange(1, 64))
    elif kind == 1:                                      # msgpack, not a map
        body = wire.encode([1, 2, 3])[wire.HEADER_SIZE:]
    elif kind == 2:
        return wire.encode({"op": rng.choice(["nope", "", "hello", "admin"]), "id": rng.randrange(1 << 30)})
    elif kind == 3:
        return wire.encode({"op": "classify", "id": "x"})
    elif kind in (4, 5, 6):                              # classify with one field out of range
        msg = {"op": "classify", "id": rng.randrange(1 << 30), "slot": 0, "shape": [64, 64, 3],
               "dtype": "uint8", "nbytes": 64 * 64 * 3}
        field = rng.choice(["slot", "nbytes", "shape", "dtype", "top_k", "timeout_ms"])
        msg[field] = rng.choice([-1, 0, 1 << 40, 2**64 - 1, "a", None, [1] * 5, {"k": 1}])
        return wire.encode(msg)
    elif kind == 7:                                      # nested deeper than a request may be
        body = b"\x91" * rng.randrange(5, 200) + b"\xc0"
    elif kind == 8:                                      # a map with trailing bytes
        body = wire.encode({"op": "ping", "id": 1})[wire.HEADER_SIZE:] + b"\x00"
    else:                                                # a frame of an empty body
        body = b""
    return wire.HEADER.pack(len(body)) + body


def _malformed(socket_path, stop, rng) -> dict:
    from inferd.shm import wire

    sent = closed = replies = 0
    raw = Raw(socket_path)
    give_up = time.monotonic() + MALFORMED_MAX_S
    # for the whole attack, and on after it until MALFORMED_FRAMES are sent (at most MALFORMED_MAX_S)
    while not stop.is_set() or (sent < MALFORMED_FRAMES and time.monotonic() < give_up):
        burst = [malformed_frame(rng, wire) for _ in range(100)]
        try:
            for frame in burst:
                raw.sock.sendall(frame)
                sent += 1
                if frame.startswith(wire.HEADER.pack(1 << 30)):
                    raise ConnectionResetError       # the daemon closes this one: reconnect
            n, still = raw.drain()
            replies += n
            if not still:
                raise ConnectionResetError
        except OSError:
            closed += 1
            raw.close()
            raw = _reconnect(socket_path, stop)
            if raw is None:
                break
    if raw is not None:
        raw.close()
    return {"frames_sent": sent, "replies": replies, "reconnects": closed, "hello_failures": FAILED[0]}


FAILED = [0]


def _reconnect(socket_path, stop) -> Raw | None:
    """A new session, trying again (and counting) while hello fails or times out; None at ``stop``."""
    while not stop.is_set():
        try:
            return Raw(socket_path)
        except OSError:
            FAILED[0] += 1
    return None


def _hits(socket_path, stop, rng) -> dict:
    import threading

    from inferd.client import Client

    batch = list(frames(1, 64, seed=rng.randrange(1 << 30))) * HITS_DEPTH
    done = [0] * HITS_SESSIONS

    def session(i: int) -> None:
        with Client(socket_path, ring_slots=HITS_DEPTH, cache=False, timeout=60) as client:
            while not stop.is_set():
                client.classify_many(batch, top_k=1)
                done[i] += HITS_DEPTH
    threads = [threading.Thread(target=session, args=(i,)) for i in range(HITS_SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"frames": sum(done), "sessions": HITS_SESSIONS}


ATTACKS = {"info": _info, "unread": _unread, "door": _door, "malformed": _malformed, "hits": _hits}
