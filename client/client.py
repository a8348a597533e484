"""The client library: connect, say hello, map the ring, classify.

    with Client() as client:                      # socket from $INFERD_SOCKET or the default path
        top = client.classify(image, top_k=3)     # [Prediction(index, label, score), ...]
        tops = client.classify_many(images)       # many ring slots in flight at once

Threads: a Client may be shared between threads. Each call holds the client's lock for its whole
round trip, so calls from several threads run one after another; for parallel requests use
``classify_many`` (it pipelines up to the ring's slot count) or one Client per thread.
Not fork-safe: a child process must open its own Client.

Errors are typed (inferd.client.errors): DaemonUnavailable when nothing answers or the connection
breaks, InvalidInput for an image or field the daemon refuses, Overloaded with ``retry_after``,
DeadlineExceeded, PermissionDenied, ProtocolError, InferenceFailed.
"""
from __future__ import annotations

import array
import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from inferd.client import errors
from inferd.client.images import to_frame
from inferd.shm import wire
from inferd.shm.ring import Ring, RingError

#: Extra time a read waits beyond a request's own deadline before the client gives up on the daemon.
READ_GRACE_S = 5.0


class Prediction(NamedTuple):
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class ModelInfo:
    name: str
    digest: str
    input_shape: tuple       # (height, width, 3)
    labels: tuple
    top_k: int


def default_socket_path() -> str:
    """$INFERD_SOCKET, else the daemon's own default (inferd.shm.wire.default_socket_path)."""
    return os.environ.get("INFERD_SOCKET") or wire.default_socket_path()


class Client:
    """One session with the daemon: a Unix socket plus this client's shared-memory ring.

    ``timeout`` (seconds) is the default deadline of each request; the daemon answers
    DeadlineExceeded rather than compute a request whose deadline passed while queued.
    """

    def __init__(self, socket_path: str | None = None, *, ring_slots: int = 0,
                 timeout: float = 30.0, connect_timeout: float = 5.0):
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._ring: Ring | None = None
        self._reader = wire.FrameReader(wire.MAX_REPLY_FRAME)
        self._ready: list = []
        self._wait: float | None = None        # the socket's current timeout
        try:
            self._connect(connect_timeout, ring_slots)
        except BaseException:
            self.close()
            raise

    # connection -------------------------------------------------------------------------------
    def _connect(self, connect_timeout: float, ring_slots: int) -> None:
        sock = self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise errors.DaemonUnavailable(
                f"no inferd daemon answers on {self.socket_path} ({exc.strerror}); start it with "
                "`inferd` or pass socket_path=") from None
        except OSError as exc:
            raise errors.DaemonUnavailable(f"cannot connect to {self.socket_path}: {exc}") from None
        sock.sendall(wire.encode({"op": "hello", "id": 0, "version": wire.PROTOCOL_VERSION,
                                  "ring_slots": ring_slots, "slot_bytes": 0}))
        reply, fds = self._read_hello()
        if not reply.get("ok"):
            raise errors.from_reply(reply)
        if len(fds) != 1:
            raise errors.ProtocolError(f"hello reply carried {len(fds)} descriptors, expected 1")
        try:
            self._ring = Ring.attach(fds[0])
        except RingError as exc:
            raise errors.ProtocolError(f"the daemon's ring is unusable: {exc}") from None
        finally:
            os.close(fds[0])
        m = reply["model"]
        self.model = ModelInfo(m["name"], m["digest"], tuple(m["input"]), tuple(m["labels"]), m["top_k"])
        self.session = reply["session"]
        self._free = list(range(self._ring.geometry.slots - 1, -1, -1))

    def _read_hello(self) -> tuple[dict, list[int]]:
        fds: list[int] = []
        while not self._ready:
            try:
                data, ancdata, _, _ = self._sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
            except OSError as exc:
                raise errors.DaemonUnavailable(f"connection to {self.socket_path} failed during hello: {exc}") from None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            if not data:
                raise errors.DaemonUnavailable(f"the daemon on {self.socket_path} closed the connection during hello")
            self._feed(data)
        return self._ready.pop(0), fds

    def close(self) -> None:
        """Close the session; idempotent. The daemon frees the ring when it sees the socket close."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # framing ----------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        try:
            self._ready.extend(self._reader.feed(data))
        except wire.FrameError as exc:
            self.close()
            raise errors.ProtocolError(f"unreadable reply from the daemon: {exc}") from None

    def _read_reply(self, wait: float) -> dict:
        """The next reply frame; waits at most ``wait`` seconds for it."""
        while not self._ready:
            if self._sock is None:
                raise errors.DaemonUnavailable("this Client is closed")
            if wait != self._wait:
                self._sock.settimeout(wait)
                self._wait = wait
            try:
                data = self._sock.recv(1 << 16)
            except socket.timeout:
                self.close()
                raise errors.DaemonUnavailable(f"no reply from the daemon within {wait:.1f} s; "
                                               "the session is closed") from None
            except OSError as exc:
                self.close()
                raise errors.DaemonUnavailable(f"connection to the daemon failed: {exc}") from None
            if not data:
                self.close()
                raise errors.DaemonUnavailable("the daemon closed the connection")
            self._feed(data)
        reply = self._ready.pop(0)
        if isinstance(reply, wire.FrameError):
            raise errors.ProtocolError(f"unreadable reply from the daemon: {reply}")
        return reply

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise errors.DaemonUnavailable("this Client is closed")
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self.close()
            raise errors.DaemonUnavailable(f"connection to the daemon failed: {exc}") from None

    def _call(self, message: dict) -> dict:
        with self._lock:
            rid = next(self._ids)
            self._send(wire.encode({**message, "id": rid}))
            reply = self._read_reply(self.timeout + READ_GRACE_S)
            if reply.get("id") != rid:
                raise self._desync(reply, f"reply for id {reply.get('id')!r}, expected {rid}")
            if not reply.get("ok"):
                raise errors.from_reply(reply)
            return reply

    def _desync(self, reply: dict, what: str) -> errors.ProtocolError:
        """A reply this session did not ask for: which slots the daemon still holds is unknown, so
        the session cannot go on. Close it; the caller raises the returned error."""
        self.close()
        detail = f": {reply.get('code')}: {reply.get('message')}" if not reply.get("ok") else ""
        return errors.ProtocolError(f"{what}{detail}; the session is closed, open a new Client")

    # requests ---------------------------------------------------------------------------------
    def ping(self) -> float:
        """Round-trip time of one ping, in seconds."""
        t0 = time.perf_counter()
        self._call({"op": "ping"})
        return time.perf_counter() - t0

    def info(self) -> dict:
        """The daemon's model, devices and counters."""
        return self._call({"op": "info"})

    def classify(self, image, top_k: int = 5, *, timeout: float | None = None) -> list[Prediction]:
        """Top-k predictions for one image (see inferd.client.images for what an image may be)."""
        return self.classify_many([image], top_k, timeout=timeout)[0]

    def classify_many(self, images: Iterable, top_k: int = 5, *,
                      timeout: float | None = None) -> list[list[Prediction]]:
        """Top-k predictions for each image, in order, keeping up to all ring slots in flight.

        If any request fails, the others still complete (no slot is left in flight) and the first
        error is raised.
        """
        images = list(images)
        h, w, _ = self.model.input_shape
        frames = [to_frame(img, h, w) for img in images]
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            if self._ring is None:
                raise errors.DaemonUnavailable("this Client is closed")
            return self._pipeline(frames, top_k, timeout)

    def _pipeline(self, frames: list, top_k: int, timeout: float) -> list:
        results: list = [None] * len(frames)
        pending: dict[int, tuple[int, int]] = {}      # request id -> (frame index, slot)
        first_error: errors.InferdError | None = None
        shape = list(self.model.input_shape)
        nxt = 0
        while nxt < len(frames) or pending:
            out = []
            while nxt < len(frames) and self._free and first_error is None:
                slot = self._free.pop()
                frame = frames[nxt]
                self._ring.slot(slot, frame.nbytes)[:] = frame.reshape(-1)
                rid = next(self._ids)
                out.append(wire.encode({"op": "classify", "id": rid, "slot": slot, "shape": shape,
                                        "dtype": "uint8", "nbytes": frame.nbytes, "top_k": top_k,
                                        "timeout_ms": timeout * 1000.0}))
                pending[rid] = (nxt, slot)
                nxt += 1
            if first_error is not None and not pending:
                break
            if out:
                self._send(b"".join(out))
            reply = self._read_reply(timeout + READ_GRACE_S)
            entry = pending.pop(reply.get("id"), None)
            if entry is None:
                raise self._desync(reply, f"reply for unknown request id {reply.get('id')!r}")
            index, slot = entry
            self._free.append(slot)
            if reply.get("ok"):
                labels = self.model.labels
                results[index] = [Prediction(i, labels[i], s) for i, s in reply["top"]]
            elif first_error is None:
                first_error = errors.from_reply(reply)
        if first_error is not None:
            raise first_error
        return results
