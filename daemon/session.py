"""One client session on the event loop: frames in, checked requests to a device, replies out.

A session starts after the hello handshake (inferd.daemon.handshake) has created its ring and
handed the descriptor over. From then on every frame is a request; nothing a client sends is used
before it is checked against the ring's geometry and the model's spec (``check_classify``).
A client can only hurt its own requests: a bad field gets a typed error for that request id, a bad
frame body gets ``bad_frame``, and only an unreadable stream (a header over the frame limit)
closes the connection.
"""
from __future__ import annotations

import asyncio
import logging

from inferd.daemon.logs import RateLimitedLog
from inferd.shm import wire
from inferd.shm.ring import Ring

log = logging.getLogger("inferd.session")
_bad_frames = RateLimitedLog(log)   # a client can send them in a loop: one line per 10 s

MAX_TIMEOUT_MS = 3_600_000.0


class Rejected(Exception):
    """A request that fails a check: answered with ``code`` and ``message`` for its id."""

    def __init__(self, code: str, message: str, **extra):
        super().__init__(message)
        self.code = code
        self.extra = extra


def _int_field(msg: dict, key: str, code: str = wire.E_BAD_REQUEST) -> int:
    value = msg.get(key)
    if type(value) is not int:
        raise Rejected(code, f"{key} must be an integer, got {value!r}")
    return value


def check_classify(msg: dict, ring: Ring, spec, inflight: dict, default_timeout_ms: float) -> tuple:
    """Check a classify request; returns (slot, top_k, timeout seconds) or raises Rejected.

    The order matters only for which message a request with several faults gets: ring bounds
    first (they guard memory), then the model's spec.
    """
    geometry = ring.geometry
    slot = _int_field(msg, "slot")
    if not 0 <= slot < geometry.slots:
        raise Rejected(wire.E_INVALID_INPUT, f"slot {slot} is out of range: this session's ring has "
                       f"{geometry.slots} slots (0 to {geometry.slots - 1})")
    nbytes = _int_field(msg, "nbytes")
    if not 0 < nbytes <= geometry.slot_bytes:
        raise Rejected(wire.E_INVALID_INPUT, f"nbytes {nbytes} does not fit a slot: this ring's "
                       f"slots hold 1 to {geometry.slot_bytes} bytes")
    if msg.get("dtype") != "uint8":
        raise Rejected(wire.E_INVALID_INPUT, f"dtype {msg.get('dtype')!r} is not supported: frames are "
                       "uint8 RGB (Client.classify converts)")
    shape = msg.get("shape")
    if not isinstance(shape, list) or tuple(shape) != spec.frame_shape:
        raise Rejected(wire.E_INVALID_INPUT, f"shape {shape!r} does not match the model input "
                       f"{list(spec.frame_shape)} (HxWx3); resize on the client (Client.classify does)")
    if nbytes != spec.frame_bytes:
        raise Rejected(wire.E_INVALID_INPUT, f"nbytes {nbytes} does not match shape {shape} of uint8 "
                       f"({spec.frame_bytes} bytes)")
    top_k = msg.get("top_k", spec.top_k)
    if type(top_k) is not int or not 1 <= top_k <= len(spec.labels):
        raise Rejected(wire.E_INVALID_INPUT, f"top_k {top_k!r} is out of range: 1 to {len(spec.labels)}")
    timeout_ms = msg.get("timeout_ms", default_timeout_ms)
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)) \
            or not 0 < timeout_ms <= MAX_TIMEOUT_MS:
        raise Rejected(wire.E_INVALID_INPUT, f"timeout_ms {timeout_ms!r} is out of range: "
                       f"more than 0, at most {MAX_TIMEOUT_MS:.0f}")
    if slot in inflight:
        raise Rejected(wire.E_SLOT_BUSY, f"slot {slot} already carries request {inflight[slot]}; "
                       "a slot may be reused only after its reply")
    return slot, top_k, timeout_ms / 1000.0


class Session(asyncio.Protocol):
    """The loop-side state of one client. ``inflight`` maps slot -> request id; the ring is
    released when the session has closed and its last in-flight request has come back."""

    def __init__(self, server, sid: int, ring: Ring, peer: tuple, leftover: bytes = b""):
        self.server = server
        self.sid = sid
        self.ring = ring
        self.peer = peer                       # (pid, uid, gid)
        self.inflight: dict[int, int] = {}
        self.pending: dict[bytes, object] = {}    # cache key -> Request in flight (coalescing)
        self.closed = False
        self.told_gen = 0                      # newest model generation this client was told of
        self.transport: asyncio.Transport | None = None
        self._reader = wire.FrameReader(server.cfg.server.max_frame_bytes)
        self._leftover = leftover

    def __repr__(self) -> str:
        return f"Session({self.sid}, pid={self.peer[0]})"

    # asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self._leftover:
            data, self._leftover = self._leftover, b""
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except wire.FrameError as exc:
            _bad_frames.warning("%r: %s; closing the connection", self, exc)
            self.send(wire.error(None, exc.code, str(exc)))
            self.transport.close()
            return
        for msg in messages:
            if isinstance(msg, wire.FrameError):
                self.send(wire.error(None, msg.code, str(msg)))
            else:
                self.handle(msg)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.session_closed(self)

    # requests ---------------------------------------------------------------------------------
    def handle(self, msg: dict) -> None:
        rid = msg.get("id")
        if type(rid) is not int:
            self.send(wire.error(None, wire.E_BAD_REQUEST, f"id must be an integer, got {rid!r}"))
            return
        op = msg.get("op")
        try:
            if op in ("classify", "embed", "near"):
                self.server.submit(self, rid, msg, op)
            elif op == "flush_cache":
                raise Rejected(wire.E_UNKNOWN_OP, "flush_cache moved to the admin socket: "
                               "`inferctl flush-cache` (root, the daemon's user or server.admin_group)")
            elif op == "hits":
                self._client_hits(msg.get("n"))     # a notification: no reply
            elif op == "ping":
                self.send({"id": rid, "ok": True, "pid": self.server.pid})
            elif op == "info":
                self.send({"id": rid, "ok": True, **self.server.info()})
            elif op == "hello":
                raise Rejected(wire.E_BAD_REQUEST, "hello was already said on this connection")
            else:
                raise Rejected(wire.E_UNKNOWN_OP, f"unknown op {op!r}; ops are classify, embed, near, "
                               "hits, ping, info")
        except Rejected as exc:
            self.send(wire.error(rid, exc.code, str(exc), **exc.extra))

    def _client_hits(self, n) -> None:
        """``hits``: requests the client answered from its read-only cache mapping, reported
        within a second and at close, so the hit rate needs no request to follow them."""
        if type(n) is not int or not 0 < n < 1 << 30:
            raise Rejected(wire.E_INVALID_INPUT, f"hits n {n!r} is out of range: an integer, 1 to "
                           f"{(1 << 30) - 1}")
        self.server.scheduler.memory.client_hits(n)

    def send(self, message: dict) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(wire.encode(message))

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def release_ring(self) -> None:
        """Unmap the ring; idempotent. Only when nothing in flight can still read it."""
        if self.ring is not None:
            self.ring.close()
            self.ring = None

