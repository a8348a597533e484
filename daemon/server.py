"""The daemon's event loop: accept, hello handshake, admission, replies, and an orderly stop.

Lifecycle::

    bind socket -> start batching threads, wait until each has warmed its model -> accept
    -> READY=1 (sd_notify) -> serve -> SIGTERM/SIGINT -> STOPPING=1: stop accepting, unlink the
    socket, refuse new requests (shutting_down), wait up to drain_timeout_s for in-flight requests
    -> close sessions, stop and join batching threads, unmap every ring -> exit 0

Handshake (on the raw socket, before the session protocol takes it over, because descriptors can
only be sent with sendmsg): check the peer's uid/gid (SO_PEERCRED) against the allow-list, read one
``hello`` frame within hello_timeout_s, check the asked ring geometry against the limits, create the
ring, send the reply with the ring's descriptor attached (SCM_RIGHTS), close our copy of it.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time

from inferd.daemon import exitcodes
from inferd.daemon.batcher import BatchingThread, BatchResult
from inferd.daemon.device import Device
from inferd.daemon.config import Config, ConfigError
from inferd.daemon.listener import Listener, peer_credentials, send_with_fds
from inferd.daemon.model import LoadedModel
from inferd.daemon.notify import notify
from inferd.daemon.scheduler import Scheduler
from inferd.daemon.session import Rejected, Session
from inferd.shm import wire
from inferd.shm.ring import Ring, RingGeometry

log = logging.getLogger("inferd.server")


class Server:
    def __init__(self, cfg: Config, model: LoadedModel, devices: list[Device], listener: Listener,
                 clock=time.monotonic):
        self.cfg = cfg
        self.model = model
        self.devices = devices
        self.listener = listener
        self.pid = os.getpid()
        self.sessions: dict[int, Session] = {}
        self.draining = False
        self.scheduler = Scheduler(cfg, model.spec, devices, clock, model.digest)
        self.counters = self.scheduler.counters
        self._clock = clock
        self._sids = itertools.count(1)
        self._handshakes: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None

    # lifecycle --------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._stop, self._drained = asyncio.Event(), asyncio.Event()
        if not await self._start_devices():
            self._stop_devices()
            self.listener.close()
            return exitcodes.STARTUP_FAILED
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_stop_signal, sig)
        accept = loop.create_task(self._accept_loop())
        watchdog = loop.create_task(self._watchdog())
        notify(f"READY=1\nMAINPID={self.pid}\nSTATUS=serving {self.model.spec.name} on "
               f"{', '.join(d.name for d in self.devices)}")
        log.info("ready: serving %s on %s at %s", self.model.spec.name,
                 ", ".join(d.name for d in self.devices), self.listener.path)
        await self._stop.wait()
        watchdog.cancel()
        await self._drain(accept)
        return exitcodes.OK

    async def _watchdog(self) -> None:
        """Health checks on the loop (daemon/health.py): a timer, not a poll of anything the OS
        could tell us; a stuck batch gives no event to wait on."""
        health = self.scheduler.health
        while True:
            health.check()
            await asyncio.sleep(health.tick)

    def handle_stop_signal(self, sig: signal.Signals) -> None:
        log.info("%s: draining", signal.Signals(sig).name)
        self._stop.set()

    async def _start_devices(self) -> bool:
        memory = self.scheduler.memory
        if self.cfg.cache.enabled:
            memory.open_cache(self.cfg.cache_path)     # CacheError: reported by __main__
        for dev in self.devices:
            dev.thread = BatchingThread(
                dev, self.model, batching=self.cfg.batching, policy=self.scheduler.policy,
                peers=self.devices, deliver=self._deliver_threadsafe,
                warmup_batches=self.cfg.model.warmup_batches, keep_k=memory.keep_k, clock=self._clock)
            dev.thread.start()
        for dev in self.devices:
            await asyncio.to_thread(dev.thread.ready.wait)
            error = dev.thread.startup_error
            if isinstance(error, ConfigError):
                self._stop_devices()
                raise error                 # the model does not fit its spec: exit 78 with the key
            if error is not None:
                log.error("device %s failed to start: %r", dev.name, error)
                return False
        dim = self.devices[0].thread.embedding_dim
        if self.cfg.embeddings.enabled and dim:
            memory.open_store(self.cfg.embeddings.path or os.path.join(
                os.path.dirname(self.cfg.cache_path), f"embeddings-{self.model.digest[:16]}.store"), dim)
            for dev in self.devices:
                dev.thread.store = memory.store
        return True

    def _deliver_threadsafe(self, result: BatchResult) -> None:
        self._loop.call_soon_threadsafe(self.scheduler.on_batch_done, result)

    async def _drain(self, accept: asyncio.Task) -> None:
        self.draining = self.scheduler.draining = True
        self.scheduler.on_idle = self._drained.set
        notify("STOPPING=1")
        accept.cancel()
        for task in list(self._handshakes):
            task.cancel()
        self.listener.close()
        if self.scheduler.outstanding:
            try:
                await asyncio.wait_for(self._drained.wait(), self.cfg.server.drain_timeout_s)
            except asyncio.TimeoutError:
                log.warning("drain: %d requests still in flight after %.1f s; stopping anyway",
                            self.scheduler.outstanding, self.cfg.server.drain_timeout_s)
        for session in list(self.sessions.values()):
            session.transport.close()
        await asyncio.to_thread(self._stop_devices)
        await asyncio.sleep(0)          # run the last on_batch_done callbacks the threads queued
        for session in list(self.sessions.values()):
            session.closed = True
            session.release_ring()
        self.sessions.clear()
        self.scheduler.memory.close()
        log.info("stopped")

    def _stop_devices(self) -> None:
        for dev in self.devices:
            dev.queue.stop()
        for dev in self.devices:
            if dev.thread is not None:
                dev.thread.join(timeout=max(self.cfg.server.drain_timeout_s, 1.0))
                if dev.thread.is_alive():
                    log.error("batching thread of %s did not stop", dev.name)

    # accept and hello -------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        loop = self._loop
        while True:
            conn, _ = await loop.sock_accept(self.listener.sock)
            task = loop.create_task(self._handshake(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn) -> None:
        conn.setblocking(False)
        ring = None
        try:
            peer = peer_credentials(conn)
            hello, leftover = await asyncio.wait_for(self._read_hello(conn),
                                                     self.cfg.server.hello_timeout_s)
            rid = hello.get("id") if type(hello.get("id")) is int else None
            try:
                geometry = self._check_hello(hello, peer)
            except Rejected as exc:
                log.info("hello from pid %d refused: %s", peer[0], exc)
                await self._loop.sock_sendall(conn, wire.encode(wire.error(rid, exc.code, str(exc))))
                conn.close()
                return
            ring, fd = Ring.create(geometry, backend=self.cfg.ring.backend, prefix=self.cfg.ring.shm_prefix)
            fds = [fd]
            if self.scheduler.memory.cache is not None:     # read-only: clients look up, never write
                fds.append(os.open(self.cfg.cache_path, os.O_RDONLY | os.O_CLOEXEC))
            sid = next(self._sids)
            try:
                await send_with_fds(self._loop, conn, wire.encode(self._hello_reply(rid, sid, geometry)), fds)
            finally:
                for f in fds:
                    os.close(f)
        except (asyncio.TimeoutError, OSError, wire.FrameError, EOFError) as exc:
            log.info("connection dropped during hello: %r", exc)
            if ring is not None:
                ring.close()
            conn.close()
            return
        except asyncio.CancelledError:
            if ring is not None:
                ring.close()
            conn.close()
            raise
        session = Session(self, sid, ring, peer, leftover)
        self.sessions[sid] = session
        await self._loop.connect_accepted_socket(lambda: session, conn)
        self.counters["sessions"] += 1
        log.debug("session %d: pid %d uid %d, ring %d x %d bytes", sid, *peer[:2], geometry.slots,
                  geometry.slot_bytes)

    async def _read_hello(self, conn) -> tuple[dict, bytes]:
        """The first frame, and any bytes after it. Raises FrameError or EOFError."""
        buf = b""
        limit = self.cfg.server.max_frame_bytes
        while True:
            if len(buf) >= wire.HEADER_SIZE:
                (length,) = wire.HEADER.unpack_from(buf)
                if length > limit:
                    await self._loop.sock_sendall(conn, wire.encode(wire.error(
                        None, wire.E_FRAME_TOO_LARGE, f"frame of {length} bytes; the limit is {limit}")))
                    raise wire.FrameError(wire.E_FRAME_TOO_LARGE, "hello frame too large")
                end = wire.HEADER_SIZE + length
                if len(buf) >= end:
                    return wire.decode_body(buf[wire.HEADER_SIZE:end]), buf[end:]
            data = await self._loop.sock_recv(conn, 65536)
            if not data:
                raise EOFError("peer closed before hello")
            buf += data

    def _check_hello(self, hello: dict, peer: tuple) -> RingGeometry:
        s, r = self.cfg.server, self.cfg.ring
        pid, uid, gid = peer
        if uid not in (0, os.geteuid(), *(s.allow_uids or ())) and gid not in (s.allow_gids or ()):
            raise Rejected(wire.E_PERMISSION_DENIED, f"uid {uid} gid {gid} is not allowed; add it to "
                           "server.allow_uids or server.allow_gids")
        if hello.get("op") != "hello":
            raise Rejected(wire.E_BAD_REQUEST, f"the first message must be hello, got op {hello.get('op')!r}")
        if hello.get("version") != wire.PROTOCOL_VERSION:
            raise Rejected(wire.E_UNSUPPORTED_VERSION, f"protocol version {hello.get('version')!r}; "
                           f"this daemon speaks {wire.PROTOCOL_VERSION}")
        if self.draining:
            raise Rejected(wire.E_SHUTTING_DOWN, "the daemon is shutting down")
        if len(self.sessions) >= s.max_clients:
            raise Rejected(wire.E_OVERLOADED, f"{s.max_clients} sessions are open (server.max_clients)")
        slots, slot_bytes = hello.get("ring_slots", 0), hello.get("slot_bytes", 0)
        frame = self.model.spec.frame_bytes
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

    def _hello_reply(self, rid, sid: int, geometry: RingGeometry) -> dict:
        return {"id": rid, "ok": True, "session": sid, "version": wire.PROTOCOL_VERSION,
                "ring": {"slots": geometry.slots, "slot_bytes": geometry.slot_bytes},
                "model": self.model.describe(),
                "cache": ({"max_k": self.scheduler.memory.keep_k, "preprocess": self.model.spec.preprocess_id}
                          if self.scheduler.memory.cache is not None else None),
                "limits": {"max_frame_bytes": self.cfg.server.max_frame_bytes,
                           "default_timeout_ms": self.cfg.batching.default_timeout_ms}}

    # requests ---------------------------------------------------------------------------------
    def submit(self, session: Session, rid: int, msg: dict, op: str) -> None:
        self.scheduler.submit(session, rid, msg, op)

    def flush_cache(self, session: Session) -> dict:
        """Empty the result cache; only root or the daemon's own uid may."""
        if session.peer[1] not in (0, os.geteuid()):
            raise Rejected(wire.E_PERMISSION_DENIED, "only root or the daemon's user may flush the cache")
        cache = self.scheduler.memory.cache
        if cache is None:
            raise Rejected(wire.E_INVALID_INPUT, "the result cache is disabled (cache.enabled)")
        dropped = cache.stats()["used"]
        generation = cache.flush()
        log.info("result cache flushed by pid %d: %d entries dropped, generation %d",
                 session.peer[0], dropped, generation)
        return {"dropped": dropped, "generation": generation}

    def session_closed(self, session: Session) -> None:
        self.sessions.pop(session.sid, None)
        if not session.inflight:
            session.release_ring()

    def info(self) -> dict:
        return {"model": self.model.describe(), "pid": self.pid, "sessions": len(self.sessions),
                **self.scheduler.stats()}
