"""One client session on the event loop: frames in, checked requests to a device, replies out.

A session starts after the hello handshake (inferd.daemon.front.handshake) has created its ring and
handed the descriptor over. From then on every frame is a request; nothing a client sends is used
before it is checked against the ring's geometry and the model's spec (daemon/front/admission.py).
A client can only hurt its own requests: a bad field gets a typed error for that request id, a bad
frame body (not a map, or nested deeper than a request needs) gets ``bad_frame``, and the
connection is closed only for an unreadable stream (a header over the frame limit), a frame left
half-sent past ``server.frame_timeout_s``, an idle session past ``server.idle_timeout_s``, or
replies left unread past ``server.unread_timeout_s`` (NOTE [ session flow control ]).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Callable

from ..dispatch.queues import ThinkTime
from .loop_share import LoopShare
from ..ops.logs import RateLimitedLog
from .admission import Rejected, check_hits
from ...shm import wire
from ...shm.ring import Ring

log = logging.getLogger("inferd.session")
# a client can cause these in a loop: one line per 10 s for each kind
_bad_frames = RateLimitedLog(log)
_unread = RateLimitedLog(log)
_idle = RateLimitedLog(log)

# NOTE [ session flow control ]
#
# No client may hold the loop, the daemon's memory or a session slot for longer than a bound.
#
#    socket --data_received--> FrameReader buffer --take_turn: <= the frames its uid may still
#                                   ^                  handle this loop iteration (and <= max_frame_bytes
#                                   |                  of bodies) --> handle() --> replies --> transport
#      pause_reading while a hold   |                                                        | write
#      is set: "backlog" (whole     +-- more whole frames? hold "backlog", wait in the       | buffer
#      frames still buffered) or        uid's queue for the next tick (NOTE [ loop share ])  v
#      "replies" (write buffer over reply_buffer_bytes: pause_writing, until resume_writing)
#
# - Bounded work per event: a uid's sessions together handle one budget of frames per loop
#   iteration (about 1 ms of loop, at most max_frames_per_turn: daemon/front/loop_share.py); the
#   rest wait in the reader, and reading stops until they are handled, so the buffer holds at most
#   one read more.
# - Backpressure: replies a client does not read pile up in the transport's write buffer only up
#   to reply_buffer_bytes (set_write_buffer_limits); then the session neither reads nor handles
#   frames. Replies of requests already in flight still come, bounded by the ring's slots. A
#   client whose replies stay unread for unread_timeout_s is aborted (its buffer dropped).
# - Timers, one handle each, re-armed lazily (never per frame): idle_timeout_s since the last
#   byte with nothing in flight closes the session; a frame begun must be whole within
#   frame_timeout_s (bad_frame, then closed); a session we close that does not take its last
#   replies is aborted after unread_timeout_s.


class Leaders:
    """The requests of one session that lead identical frames in flight: cache key -> the Request
    claimed by the collectors of every device once they hashed a row, let go on the loop when it
    is answered (NOTE [ request path ] in daemon/pipeline/collector.py). A client's Session and
    the OIP front's sessions on the loop (daemon/oip/direct.py) coalesce alike."""

    def _init_leaders(self) -> None:
        self.pending: dict[bytes, object] = {}
        self._pending_lock = threading.Lock()

    def claim(self, key: bytes, request):
        """The request that leads frames of ``key`` in this session: ``request`` itself if none
        in flight does (it leads from now on), else that one. Any thread (collectors claim)."""
        with self._pending_lock:
            leader = self.pending.get(key)
            if leader is None or leader.done:
                self.pending[key] = leader = request
            return leader

    def unclaim(self, key: bytes, request) -> None:
        """``request`` (answered) leads frames of ``key`` no more. Loop thread."""
        with self._pending_lock:
            if self.pending.get(key) is request:
                del self.pending[key]


class Session(asyncio.Protocol, Leaders):
    """The loop-side state of one client. ``inflight`` maps slot -> request id; the ring is
    released when the session has closed and its last in-flight request has come back.
    Flow control and timeouts: NOTE [ session flow control ].

    ``submit(session, rid, msg, op)`` admits a classify / embed / near request or raises Rejected
    (Scheduler.submit), ``submit_many(session, rid, msg)`` each request of a classify_many
    (Scheduler.submit_many); ``hits(n)`` takes the local cache hits a client reports (the result
    caches' count, Caches.client_hits); ``turns`` says when its frames are handled (the loop's share
    per uid, daemon/front/loop_share.py). ``server`` gives the limits (``cfg.server``), ``pid``,
    ``info()``, the model's ``labels()`` and ``session_closed``."""

    def __init__(self, server, sid: int, ring: Ring, peer: tuple, leftover: bytes = b"", *,
                 submit: Callable[..., None], hits: Callable[[int], None], turns: LoopShare,
                 submit_many: Callable[..., None] | None = None):
        self.server = server
        self._submit = submit
        self._submit_many = submit_many
        self._hits = hits
        self.sid = sid
        self.ring = ring
        self.peer = peer                       # (pid, uid, gid)
        self.inflight: dict[int, int] = {}
        self._init_leaders()                   # pending: the leaders of identical frames (Leaders)
        self.closed = False
        self.told_gen = 0                      # newest model generation this client was told of
        self.told_models: dict = {}            # (name, version) -> (digest, gen) told of, other models
        self.batches = False                   # it sent classify_many: its replies may come batched
        self.packed = False                    # ... and said it reads ``answers`` messages (shm/wire.py)
        self.think = ThinkTime()               # for the batch planner (daemon/dispatch/queues.py)
        self.transport: asyncio.Transport | None = None
        self.waiting = False                   # queued for a turn (daemon/front/loop_share.py)
        self.heavy = False                     # buffered a backlog or replies: its close is worth a
                                               # heap trim (daemon/ops/heap_trim.py)
        self._turns = turns                    # the loop's share per uid
        limits = server.cfg.server
        self._limits = limits
        self._reader = wire.FrameReader(limits.max_frame_bytes, wire.MAX_REQUEST_DEPTH)
        self._leftover = leftover
        self._loop: asyncio.AbstractEventLoop | None = None
        self._holds: set[str] = set()          # why reading is paused: "backlog", "replies"
        self._last_data = 0.0                  # loop time of the last bytes received
        self._partial_since: float | None = None   # when the partial frame being timed began
        self._partial_frame = -1               # reader.taken when it began (which frame it is)
        self._timers: dict[str, asyncio.TimerHandle] = {}   # "idle", "frame", "unread", "closing"

    def __repr__(self) -> str:
        return f"Session({self.sid}, pid={self.peer[0]}, uid={self.peer[1]})"

    # asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self._last_data = self._loop.time()
        transport.set_write_buffer_limits(high=self._limits.reply_buffer_bytes)
        if self._limits.idle_timeout_s > 0:
            self._arm("idle", self._limits.idle_timeout_s, self._check_idle)
        if self._leftover:
            data, self._leftover = self._leftover, b""
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        self._reader.append(data)
        if "replies" not in self._holds:
            self._turns.offer(self)
            self._settle()

    def connection_lost(self, exc) -> None:
        self.closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._reader = None                    # its buffer goes now, not when the last reply does
        self.server.session_closed(self)

    def pause_writing(self) -> None:
        """The client's unread replies passed reply_buffer_bytes: read and handle nothing more of
        it until they drain, and give it unread_timeout_s to start reading."""
        self._hold("replies")
        self._arm("unread", self._limits.unread_timeout_s, self._unread_expired)

    def resume_writing(self) -> None:
        self._disarm("unread")
        self._release("replies")
        if self.wants_turn():
            self._turns.offer(self)

    # turns ------------------------------------------------------------------------------------
    def wants_turn(self) -> bool:
        """Whole frames wait and nothing holds this session back (NOTE [ loop share ])."""
        return (not self.closed and "replies" not in self._holds and not self.transport.is_closing()
                and self._reader.has_frame())

    def take_turn(self, limit: int) -> int:
        """Handle at most ``limit`` (and max_frames_per_turn) buffered frames; returns how many
        were taken. Called by the loop share (daemon/front/loop_share.py), which decides when."""
        if not self.wants_turn():
            return 0
        try:
            messages = self._reader.take(min(limit, self._limits.max_frames_per_turn),
                                         self._limits.max_frame_bytes)
        except wire.FrameError as exc:      # a header over the limit: the stream is lost
            _bad_frames.warning("%r: %s; closing the connection", self, exc)
            self._shut(wire.error(None, exc.code, str(exc)))
            return 1
        try:
            for msg in messages:
                if isinstance(msg, wire.FrameError):
                    self.send(wire.error(None, msg.code, str(msg)))
                else:
                    self.handle(msg)
        except Exception:                   # a bug, not the client's doing: this session only
            log.exception("%r: handling a request failed; closing the connection", self)
            self.transport.abort()
            return len(messages)
        self._settle()
        return len(messages)

    def _settle(self) -> None:
        """Reading stays paused while whole frames wait for a turn; else time a partial frame."""
        if self.closed or self.transport.is_closing():
            return
        if self._reader.has_frame():
            self._partial_since = None
            self._hold("backlog")
            return
        self._release("backlog")
        self._time_partial_frame()

    def _hold(self, reason: str) -> None:
        self.heavy = True                   # a backlog or unread replies: buffers worth a trim
        if not self._holds and not self.transport.is_closing():
            self.transport.pause_reading()
        self._holds.add(reason)

    def _release(self, reason: str) -> None:
        if reason in self._holds:
            self._holds.discard(reason)
            if not self._holds and not self.transport.is_closing():
                self.transport.resume_reading()

    # timers -----------------------------------------------------------------------------------
    def _arm(self, name: str, delay: float, callback) -> None:
        old = self._timers.get(name)
        if old is not None:
            old.cancel()
        self._timers[name] = self._loop.call_later(delay, callback)

    def _disarm(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _time_partial_frame(self) -> None:
        """After a turn that left no whole frame: start timing a partial frame that just began."""
        if not self._reader.pending():
            self._partial_since = None
            return
        if self._partial_since is None or self._partial_frame != self._reader.taken:
            self._partial_since = self._last_data
            self._partial_frame = self._reader.taken
            if "frame" not in self._timers:
                self._arm("frame", self._limits.frame_timeout_s, self._check_frame)

    def _check_frame(self) -> None:
        del self._timers["frame"]
        if self.closed or self._partial_since is None:
            return
        if self._holds:                     # we are not reading: not the client's delay
            self._arm("frame", self._limits.frame_timeout_s, self._check_frame)
            return
        left = self._partial_since + self._limits.frame_timeout_s - self._loop.time()
        if left > 0:                        # the frame timed is a later one: its own deadline
            self._arm("frame", left, self._check_frame)
            return
        _bad_frames.warning("%r: a frame begun %.1f s ago is still not whole (%d of its bytes); "
                            "closing the connection", self, self._loop.time() - self._partial_since,
                            self._reader.pending())
        self._shut(wire.error(None, wire.E_BAD_FRAME, (
            f"a frame begun is not whole after server.frame_timeout_s ({self._limits.frame_timeout_s:g} s, "
            f"{self._reader.pending()} bytes of it received); send each frame whole; closing the connection")))

    def _check_idle(self) -> None:
        del self._timers["idle"]
        if self.closed:
            return
        idle = self._limits.idle_timeout_s
        # busy, or a frame begun (the frame timer has a better reason to give): not idle
        if self.inflight or self._holds or self.waiting or self._reader.pending():
            self._arm("idle", idle, self._check_idle)
            return
        left = self._last_data + idle - self._loop.time()
        if left > 0:
            self._arm("idle", left, self._check_idle)
            return
        _idle.info("%r: nothing in flight and nothing received for %g s (server.idle_timeout_s); "
                   "closing the session", self, idle)
        self._shut(None)

    def _unread_expired(self) -> None:
        del self._timers["unread"]
        if self.closed:
            return
        _unread.warning("%r: %d bytes of replies unread for %g s (over server.reply_buffer_bytes "
                        "for server.unread_timeout_s); disconnecting the client", self,
                        self.transport.get_write_buffer_size(), self._limits.unread_timeout_s)
        self.transport.abort()

    def _shut(self, last: dict | None) -> None:
        """Close after sending ``last`` (if any); a client that does not take it within
        unread_timeout_s is aborted, so a closing session holds nothing for long."""
        if last is not None:
            self.send(last)
        self.transport.close()
        self._disarm("idle")
        self._disarm("frame")
        self._arm("closing", self._limits.unread_timeout_s, self.transport.abort)

    # requests ---------------------------------------------------------------------------------
    def handle(self, msg: dict) -> None:
        rid = msg.get("id")
        if type(rid) is not int:
            self.send(wire.error(None, wire.E_BAD_REQUEST, f"id must be an integer, got {rid!r}"))
            return
        op = msg.get("op")
        try:
            if op in ("classify", "embed", "near"):
                self._submit(self, rid, msg, op)
            elif op == wire.CLASSIFY_MANY:
                self.batches = True             # it reads ``replies`` messages from now on
                if msg.get(wire.ANSWERS) == 1:
                    self.packed = True          # and ``answers`` messages
                self._submit_many(self, rid, msg)
            elif op == "flush_cache":
                raise Rejected(wire.E_UNKNOWN_OP, "flush_cache moved to the admin socket: "
                               "`inferctl flush-cache` (root, the daemon's user or server.admin_group)")
            elif op == "hits":
                self._client_hits(msg.get("n"))     # a notification: no reply
            elif op == "ping":
                self.send({"id": rid, "ok": True, "pid": self.server.pid})
            elif op == "info":
                self.send({"id": rid, "ok": True, **self.server.info()})
            elif op == "labels":            # once per labels_id, not in hello (daemon/models/labels.py)
                self.send({"id": rid, "ok": True, **self.server.labels_of(msg)})
            elif op == "hello":
                raise Rejected(wire.E_BAD_REQUEST, "hello was already said on this connection")
            else:
                raise Rejected(wire.E_UNKNOWN_OP, f"unknown op {op!r}; ops are classify, classify_many, "
                               "embed, near, hits, ping, info, labels")
        except Rejected as exc:
            self.send(wire.error(rid, exc.code, str(exc), **exc.extra))

    def _client_hits(self, n) -> None:
        """``hits``: requests the client answered from its read-only cache mapping, reported
        within a second and at close, so the hit rate needs no request to follow them."""
        self._hits(check_hits(n))

    def send(self, message: dict) -> None:
        self.write(wire.encode(message))

    def write(self, data: bytes) -> None:
        """Queue replies; dropped once the session is closing (nobody will read them)."""
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def release_ring(self) -> None:
        """Unmap the ring; idempotent. Only when nothing in flight can still read it."""
        if self.ring is not None:
            self.ring.close()
            self.ring = None

