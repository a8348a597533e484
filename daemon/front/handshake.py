"""The hello handshake: who the peer is, what ring it gets, and the descriptors handed over.

Runs on the raw accepted socket, before the session protocol (daemon/front/session.py) takes it over,
because descriptors can only be sent with sendmsg. The door (daemon/front/door.py) has counted the
connection among those waiting for hello, per uid and in total, until this ends::

    accept -> peer credentials from the kernel (SO_PEERCRED: pid, uid, gid; SO_PEERGROUPS)
           -> read one ``hello`` frame within server.hello_timeout_s (length checked first)
           -> check: allowed uid, or a primary or supplementary gid; op and protocol version, not
              draining, session limit, ring geometry within ring.max_slots / ring.max_ring_bytes
           -> create the ring; reply with its descriptor (and a read-only descriptor of the result
              cache) attached (SCM_RIGHTS); close our copies
           -> Session(...) over the same socket

A refused hello gets one typed error reply and the connection is closed. Nothing a peer sends
before or in hello is used unchecked.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Callable

from ..caching.results import Caches
from .admission import Rejected
from .listener import peer_credentials, peer_groups, send_with_fds
from .loop_share import LoopShare
from . import principal
from ..ops.logs import RateLimitedLog
from .session import Session
from ...shm import wire
from ...shm.ring import Ring, RingGeometry

log = logging.getLogger("inferd.handshake")
# one line per burst, not per connection: a refusing flood must not flood the journal too
_refused = RateLimitedLog(log, interval=10.0)
_dropped = RateLimitedLog(log, interval=10.0)


@dataclass(frozen=True)
class Hand:
    """What the handshake hands on, made once by the server. ``caches`` is the source of the
    result cache's descriptor and hello fields (``share_cache()``, ``hello_cache()``) and the sink
    of the hits clients report (``client_hits``); ``submit`` admits a session's requests
    (Scheduler.submit), ``submit_many`` those of a classify_many (Scheduler.submit_many); ``turns`` shares the loop's work between uids (NOTE [ loop share ] in
    daemon/front/loop_share.py). The server itself gives the limits, the state (draining, sessions, the
    model) and takes the new session (``session_opened``)."""

    caches: Caches
    submit: Callable[..., None]
    turns: LoopShare
    submit_many: Callable[..., None] | None = None


async def handshake(server, conn, hand: Hand, peer: tuple | None = None) -> None:
    """Take one accepted connection through hello; on success the server gets a new Session.
    ``peer``: its credentials when the door (daemon/front/door.py) read them already."""
    loop = asyncio.get_running_loop()
    conn.setblocking(False)
    ring = None
    try:
        peer = peer or peer_credentials(conn)
        hello, leftover = await asyncio.wait_for(read_hello(loop, conn, server.cfg.server.max_frame_bytes),
                                                 server.cfg.server.hello_timeout_s)
        rid = hello.get("id") if type(hello.get("id")) is int else None
        try:
            # a trusted front (daemon/oip/) may name the principal it serves (daemon/front/principal.py)
            peer, groups, authorised = principal.adopt(hello, peer, peer_groups(conn))
            geometry = check_hello(server, hello, peer, groups, authorised=authorised)
        except Rejected as exc:
            _refused.info("hello from pid %d uid %d refused: %s", peer[0], peer[1], exc)
            await loop.sock_sendall(conn, wire.encode(wire.error(rid, exc.code, str(exc))))
            conn.close()
            return
        cfg = server.cfg
        ring, fd = Ring.create(geometry, backend=cfg.ring.backend, prefix=cfg.ring.shm_prefix)
        fds = [fd]
        cache_fd = hand.caches.share_cache()    # read-only: clients look up, never write
        if cache_fd is not None:                # (O_RDONLY: see inferd.shm.cache)
            fds.append(cache_fd)
        sid = server.next_session_id()
        try:
            reply = hello_reply(server, rid, sid, geometry, hand.caches.hello_cache())
            await send_with_fds(loop, conn, wire.encode(reply), fds)
        finally:
            for f in fds:
                os.close(f)
    except wire.FrameError as exc:          # an unreadable hello: say why, then close at once
        _refused.info("hello from pid %d uid %d refused: %s", peer[0], peer[1], exc)
        await _answer_and_close(loop, conn, wire.error(None, exc.code, str(exc)))
        return
    except (asyncio.TimeoutError, OSError, EOFError) as exc:
        _dropped.info("connection dropped during hello: %r", exc)
        _drop(ring, conn)
        return
    except asyncio.CancelledError:
        _drop(ring, conn)
        raise
    except Exception:                       # a bug: this connection only, never a leaked socket
        log.exception("hello from pid %d failed; closing the connection", peer[0] if peer else -1)
        _drop(ring, conn)
        return
    session = Session(server, sid, ring, peer, leftover, submit=hand.submit, hits=hand.caches.client_hits,
                      turns=hand.turns, submit_many=hand.submit_many)
    session.told_gen = server.model.gen
    server.session_opened(session)
    await loop.connect_accepted_socket(lambda: session, conn)
    log.debug("session %d: pid %d uid %d, ring %d x %d bytes", sid, *peer[:2], geometry.slots,
              geometry.slot_bytes)


def _drop(ring, conn) -> None:
    """Close a connection whose hello failed, and its ring if one was made."""
    if ring is not None:
        ring.close()
    conn.close()


async def _answer_and_close(loop, conn, reply: dict) -> None:
    """Send one error reply to a peer that has had nothing from us yet (it fits the socket
    buffer, so this does not wait on the peer), then close."""
    try:
        await loop.sock_sendall(conn, wire.encode(reply))
    except OSError:
        pass                                # the peer left first: nothing to tell
    finally:
        conn.close()


async def read_hello(loop, conn, limit: int) -> tuple[dict, bytes]:
    """The first frame, and any bytes after it. Raises FrameError (frame_too_large before the body
    is read; bad_frame for a body that is not a flat-enough map) or EOFError; the caller answers."""
    buf = b""
    while True:
        if len(buf) >= wire.HEADER_SIZE:
            (length,) = wire.HEADER.unpack_from(buf)
            if length > limit:
                raise wire.FrameError(wire.E_FRAME_TOO_LARGE, f"hello frame of {length} bytes "
                                      f"announced; the limit is {limit} bytes (server.max_frame_bytes)")
            end = wire.HEADER_SIZE + length
            if len(buf) >= end:
                return wire.decode_body(buf[wire.HEADER_SIZE:end], wire.MAX_REQUEST_DEPTH), buf[end:]
        data = await loop.sock_recv(conn, 65536)
        if not data:
            raise EOFError("peer closed before hello")
        buf += data


def check_hello(server, hello: dict, peer: tuple, groups: tuple = (), *, authorised: bool = False) -> RingGeometry:
    """The ring geometry this peer gets, or Rejected with the reason. ``authorised``: a tenant
    principal (daemon/front/principal.py), past the allow-list already."""
    s, r = server.cfg.server, server.cfg.ring
    pid, uid, gid = peer
    # a group counts as primary or supplementary (SO_PEERGROUPS): `usermod -aG inferd alice` lets her in
    if (not authorised and uid not in (0, os.geteuid(), *(s.allow_uids or ()))
            and not {gid, *groups} & set(s.allow_gids or ())):
        raise Rejected(wire.E_PERMISSION_DENIED, f"uid {uid} gid {gid} is not allowed, nor are its "
                       f"{len(groups)} supplementary groups; add the uid to server.allow_uids or one "
                       "of its groups to server.allow_gids")
    if hello.get("op") != "hello":
        raise Rejected(wire.E_BAD_REQUEST, f"the first message must be hello, got op {hello.get('op')!r}")
    if hello.get("version") != wire.PROTOCOL_VERSION:
        raise Rejected(wire.E_UNSUPPORTED_VERSION, f"protocol version {hello.get('version')!r}; "
                       f"this daemon speaks {wire.PROTOCOL_VERSION}")
    if server.draining:
        raise Rejected(wire.E_SHUTTING_DOWN, "the daemon is shutting down")
    held = server.stats.uids.get(uid)      # counted by session_opened/closed: O(1)
    if held is not None and held.sessions >= s.max_sessions_per_uid:
        raise Rejected(wire.E_OVERLOADED, f"uid {uid} holds {held.sessions} sessions "
                       f"(server.max_sessions_per_uid {s.max_sessions_per_uid}); close one first")
    if len(server.sessions) >= s.max_clients:
        raise Rejected(wire.E_OVERLOADED, f"{s.max_clients} sessions are open (server.max_clients)")
    slots, slot_bytes = hello.get("ring_slots", 0), hello.get("slot_bytes", 0)
    frame = server.catalog.largest_frame()     # a slot holds any model's frame (docs/protocol.md)
    if type(slots) is not int or not 0 <= slots <= r.max_slots:
        raise Rejected(wire.E_INVALID_INPUT, f"ring_slots {slots!r} is out of range: 0 (default "
                       f"{r.default_slots}) to {r.max_slots}")
    if type(slot_bytes) is not int or not (slot_bytes == 0 or frame <= slot_bytes <= r.max_ring_bytes):
        raise Rejected(wire.E_INVALID_INPUT, f"slot_bytes {slot_bytes!r} is out of range: 0 (one "
                       f"frame, {frame}) or {frame} to {r.max_ring_bytes}")
    geometry = RingGeometry(slots or r.default_slots, slot_bytes or frame)
    if geometry.total_size > r.max_ring_bytes:
        raise Rejected(wire.E_INVALID_INPUT, f"a ring of {geometry.slots} x {geometry.slot_bytes} "
                       f"bytes is over ring.max_ring_bytes ({r.max_ring_bytes}); ask for fewer slots")
    return geometry


def hello_reply(server, rid, sid: int, geometry: RingGeometry, cache: dict | None) -> dict:
    """The reply to an accepted hello; ``cache``: Caches.hello_cache()."""
    return {"id": rid, "ok": True, "session": sid, "version": wire.PROTOCOL_VERSION,
            "ring": {"slots": geometry.slots, "slot_bytes": geometry.slot_bytes},
            "model": server.model.describe() if server.catalog.single else server.scheduler.first.describe(),
            **({"models": server.catalog.describe(), "default_model": server.catalog.default.name}
               if not server.catalog.single else {}),
            "cache": cache,
            "limits": {"max_frame_bytes": server.cfg.server.max_frame_bytes,
                       "default_timeout_ms": server.cfg.batching.default_timeout_ms,
                       "max_batch_requests": wire.MAX_BATCH_REQUESTS}}
