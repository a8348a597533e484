"""One session with the daemon: the socket, the hello handshake, this session's ring and the
read-only result-cache mapping, and reply framing.

A Connection is what a daemon restart takes away: inferd.client.client.Client holds one at a time
and opens a fresh one when the old one breaks (reconnecting is the Client's policy, see
inferd.client.retry; this module only says *how* it broke):

    ConnectionLost      EOF, ECONNRESET, EPIPE, or no daemon listening (missing socket path,
                        ECONNREFUSED): a restart looks like this, so the Client may retry it
    ShuttingDown        the hello was refused because the daemon is draining: retryable too
    DaemonUnavailable   no reply within the time asked for: the caller's deadline is gone
    ProtocolError       a reply that cannot be read, or a ring that fails its checks

Every error closes the connection first, so a broken Connection is never used again. Not
thread-safe: the Client's lock serialises every use.
"""
from __future__ import annotations

import array
import math
import os
import socket
import struct
from dataclasses import dataclass

from . import errors
from ..shm import cache as cachefile
from ..shm import wire
from ..shm.ring import Ring, RingError


#: Bytes one recv may read: replies are small (a classify reply is under 100 bytes), and several
#: pipelined replies arrive together.
RECV_BYTES = 1 << 16


@dataclass(frozen=True)
class ModelInfo:
    name: str
    digest: str
    input_shape: tuple       # (height, width, 3)
    labels: tuple            # class names; () until fetched (Client.labels(): hello carries none)
    top_k: int
    gen: int = 0             # the daemon's model generation, 1 up; 0 from a daemon that sends none
    classes: int = 0         # number of classes (the width of the model's output)
    labels_id: str = ""      # identifies the names (daemon/models/labels.py); "numbered": "0", "1", ...
    version: int = 0         # its version, with several models (hello's ``models``); 0: not told
    preprocess: str = ""     # its preprocessing id (cache keys), with several models
    route: str = ""          # stable | canary | named: what a request naming no version gets

    @classmethod
    def from_wire(cls, m: dict) -> "ModelInfo":
        """From the ``model`` map of a hello reply (or of the first reply of a new generation).
        Numbered classes are named here; other names come with the ``labels`` request."""
        try:
            gen = m.get("gen", 0)
            labels = tuple(m.get("labels", ()))         # an older daemon sends them all in hello
            classes = int(m.get("classes", len(labels)))
            labels_id = str(m.get("labels_id", ""))
            if labels_id == "numbered":
                labels = tuple(str(i) for i in range(classes))
            version = m.get("version", 0)
            return cls(str(m["name"]), str(m["digest"]), tuple(m["input"]), labels,
                       int(m["top_k"]), gen if type(gen) is int else 0, classes, labels_id,
                       version if type(version) is int else 0, str(m.get("preprocess", "")),
                       str(m.get("route", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.ProtocolError(f"unreadable model description from the daemon: {exc!r}") from None


class Connection:
    """A live session: ``open`` it (connect + hello), ``send``, ``read_reply``, ``close``.
    Which slots are free and what is in flight is the protocol core's (inferd.client.protocol).
    AsyncClient opens one in a thread and then hands ``detach_socket()`` to its event loop."""

    def __init__(self, sock: socket.socket, path: str):
        self._sock: socket.socket | None = sock
        self.path = path
        self.ring: Ring | None = None
        self.cache = None                       # read-only ResultCache, when the daemon has one
        self.preprocess_id = None               # the daemon's preprocessing, part of cache keys
        self.model: ModelInfo | None = None
        self.models: list[ModelInfo] = []       # every model served, with several (hello's ``models``)
        self.session = None
        self.max_batch = 0                      # classify requests one message may carry (hello)
        self._reader = wire.FrameReader(wire.MAX_REPLY_FRAME)
        self._ready: list = []
        self._wait = 0                         # whole seconds of SO_RCVTIMEO / SO_SNDTIMEO now set
        self._buf = bytearray(RECV_BYTES)      # every reply is read into this one buffer
        self._view = memoryview(self._buf)

    @classmethod
    def open(cls, path: str, *, ring_slots: int, use_cache: bool, connect_timeout: float,
             hello_timeout: float, principal: dict | None = None) -> "Connection":
        """Connect and say hello. ``hello_timeout`` bounds the wait for the hello reply: a daemon
        that is starting accepts only once its model is warm, so a reconnect gives it the rest of
        the request's deadline. ``principal``: whom the session serves, named by a trusted front
        (the daemon refuses it from anyone else: inferd.daemon.front.principal)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        conn = cls(sock, path)
        try:
            conn._connect(connect_timeout)
            conn._hello(ring_slots, use_cache, hello_timeout, principal)
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self, timeout: float) -> None:
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise errors.ConnectionLost(
                f"no inferd daemon answers on {self.path} ({exc.strerror}); start it with "
                "`inferd` or pass socket_path=") from None
        except PermissionError as exc:      # the file mode (or a folder's) keeps this user out
            raise errors.PermissionDenied(
                f"cannot connect to {self.path} ({exc.strerror}): the daemon runs, but this user may not "
                "open its socket; the operator admits users by the socket's group and mode "
                "(server.socket_mode, with systemd: group inferd) and by server.allow_uids / "
                "allow_gids") from None
        except OSError as exc:
            raise errors.ConnectionLost(f"cannot connect to {self.path}: {exc}") from None

    def _hello(self, ring_slots: int, use_cache: bool, timeout: float, principal: dict | None = None) -> None:
        hello = {"op": "hello", "id": 0, "version": wire.PROTOCOL_VERSION, "ring_slots": ring_slots,
                 "slot_bytes": 0}
        if principal is not None:
            hello["principal"] = principal
        self.send(wire.encode(hello))
        self._sock.settimeout(timeout)
        reply, fds = self._read_hello()
        try:
            if not reply.get("ok"):
                raise errors.from_reply(reply)
            self.model = ModelInfo.from_wire(reply.get("model") or {})
            listed = reply.get("models")
            self.models = [ModelInfo.from_wire(m) for m in listed] if isinstance(listed, list) else []
            want = 2 if reply.get("cache") else 1
            if len(fds) != want:
                raise errors.ProtocolError(f"hello reply carried {len(fds)} descriptors, expected {want}")
            self.ring = Ring.attach(fds[0])
            if want == 2 and use_cache:
                self._open_cache(fds[1], reply["cache"])
        except RingError as exc:
            raise errors.ProtocolError(f"the daemon's ring is unusable: {exc}") from None
        finally:
            for fd in fds:
                os.close(fd)
        self.session = reply.get("session")
        limits = reply.get("limits")
        batch = limits.get("max_batch_requests") if isinstance(limits, dict) else None
        # how many requests one classify_many may carry; 0: a daemon without it, one message each
        self.max_batch = batch if type(batch) is int and 1 < batch <= wire.MAX_BATCH_REQUESTS else 0
        self._sock.settimeout(None)             # NOTE [ reply wait ]
        self._bound(timeout)

    def _read_hello(self) -> tuple[dict, list[int]]:
        """The hello reply and the descriptors that came with it (the caller closes them)."""
        fds: list[int] = []
        try:
            return self._read_hello_into(fds), fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _read_hello_into(self, fds: list[int]) -> dict:
        while not self._ready:
            try:
                data, ancdata, _, _ = self._sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
            except socket.timeout:
                raise errors.DaemonUnavailable(f"the daemon on {self.path} accepted the connection but "
                                               "sent no hello reply in time") from None
            except OSError as exc:
                raise errors.ConnectionLost(f"connection to {self.path} failed during hello: {exc}") from None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            if not data:
                raise errors.ConnectionLost(f"the daemon on {self.path} closed the connection during hello")
            self._feed(data)
        reply = self._ready.pop(0)
        if not isinstance(reply, dict):
            raise errors.ProtocolError(f"unreadable hello reply from the daemon: {reply}")
        return reply

    def _open_cache(self, fd: int, info: dict) -> None:
        """Map the daemon's result cache read-only from the descriptor it sent: the descriptor
        itself, never a path (the file is the daemon's user's alone, 0600: reopening it, even as
        /proc/self/fd/N, would be refused to any other uid). A cache that cannot be read only
        costs round trips, so it is skipped rather than fatal."""
        try:
            self.cache = cachefile.ResultCache.open_reader(fd)
        except cachefile.CacheError:
            return
        self.preprocess_id = info["preprocess"]

    def detach_socket(self) -> socket.socket:
        """The socket, non-blocking and no longer this Connection's (AsyncClient's transport owns
        it from here); the ring and cache mappings stay until ``close``. Replies already read
        (none after a hello) stay in ``pending_replies``."""
        sock, self._sock = self._sock, None
        sock.setblocking(False)
        return sock

    def pending_replies(self) -> list:
        ready, self._ready = self._ready, []
        return ready

    def feed(self, data) -> list:
        """Frames out of bytes a caller read itself (AsyncClient); a broken stream is ProtocolError."""
        self._feed(data)
        return self.pending_replies()

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        """Close the socket and unmap the ring and cache; idempotent. The daemon frees the ring
        when it sees the socket close."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        ring, self.ring = self.ring, None
        if ring is not None:
            ring.close()
        cache, self.cache = self.cache, None
        if cache is not None:
            cache.close()

    # framing ----------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except wire.FrameError as exc:
            self.close()
            raise errors.ProtocolError(f"unreadable reply from the daemon: {exc}") from None
        for m in messages:
            # a ``replies`` message carries the replies of one batch (docs/protocol.md): each
            # goes on as if it had come in a frame of its own
            if type(m) is dict and wire.REPLIES in m and "id" not in m:
                many = m[wire.REPLIES]
                if type(many) is not list:
                    self.close()
                    raise errors.ProtocolError(f"unreadable replies message from the daemon: {many!r:.200}")
                self._ready.extend(many)
            elif type(m) is dict and wire.ANSWERS in m and "id" not in m:
                # plain answers of one batch, packed (shm/wire.py): each as the reply it stands for
                try:
                    self._ready.extend(wire.unpack_answers(m))
                except wire.FrameError as exc:
                    self.close()
                    raise errors.ProtocolError(f"unreadable answers message from the daemon: {exc}") from None
            else:
                self._ready.append(m)

    def send(self, data: bytes) -> None:
        if self._sock is None:
            raise errors.ConnectionLost("the connection to the daemon is closed")
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self.close()
            raise errors.ConnectionLost(f"connection to the daemon failed: {exc}") from None

    # NOTE [ reply wait ]
    #
    # After hello the socket is in blocking mode, and the wait for a reply is bounded by the
    # kernel (SO_RCVTIMEO, and SO_SNDTIMEO for sends), not by Python's socket timeout: a socket
    # with a timeout polls before every recv and send, one more system call and a Python-level
    # deadline per round trip. The bound is whole seconds, rounded up, and set only when it
    # changes: it guards against a daemon that stopped answering (the request's deadline plus
    # READ_GRACE_S), so a second more is immaterial, and a steady stream of requests with one
    # timeout never sets it again. A recv that times out fails with EAGAIN (BlockingIOError).
    def _bound(self, wait: float) -> None:
        seconds = max(1, math.ceil(wait))
        if seconds != self._wait:
            timeval = struct.pack("@ll", seconds, 0)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            self._wait = seconds

    def read_reply(self, wait: float) -> dict:
        """The next reply frame; waits at most ``wait`` seconds for it (rounded up to whole
        seconds: NOTE [ reply wait ])."""
        while not self._ready:
            sock = self._sock
            if sock is None:
                raise errors.ConnectionLost("the connection to the daemon is closed")
            try:
                self._bound(wait)
                n = sock.recv_into(self._buf)
            except (BlockingIOError, socket.timeout):
                self.close()
                raise errors.DaemonUnavailable(f"no reply from the daemon within {self._wait} s; "
                                               "the session is closed") from None
            except OSError as exc:
                self.close()
                raise errors.ConnectionLost(f"connection to the daemon failed: {exc}") from None
            if not n:
                self.close()
                raise errors.ConnectionLost("the daemon closed the connection")
            self._feed(self._view[:n])
        reply = self._ready.pop(0)
        if isinstance(reply, wire.FrameError):
            raise errors.ProtocolError(f"unreadable reply from the daemon: {reply}")
        return reply
