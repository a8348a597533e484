"""The resident front's way in: a session per principal on the daemon's own loop, fed directly.

With ``oip.placement = "daemon"`` (daemon/oip/resident.py) the OIP doors run on the daemon's
event loop, and an inference goes straight into admission, without a socket or the client
library in between:

    OIP handler -> frames written into the principal's ring slots (in this process's memory)
                -> Scheduler.submit_many(session, ...)     the checks, admission, fair share, quotas
                                                           and queues of any client's request
    batch done  -> Scheduler writes the replies to the session (DirectSession.write: decoded here,
                   no socket) -> each request's future -> the OIP reply, in the same loop turn

A DirectSession has what the scheduler, the collectors and the stats read of a Session
(daemon/front/session.py): ``peer`` (the principal's number, as the daemon's hello would adopt it:
daemon/front/principal.py), its ``ring``, ``inflight``, ``pending`` and claims, ``think``; it opens
through the same checks as a hello (the allow-list for a local uid, the per-uid session quota,
``server.max_clients``) and counts as a session of that uid. Its replies are encoded by the
scheduler as for any session and decoded here (a few microseconds; the socket, its wake-ups and
the client library's work are what this path saves).

What stays off the loop: encoded files (BYTES inputs) are decoded, and frames of another size
resized, in a small thread pool; the daemon's collectors copy frames out of the ring as for any
client. Repeats are answered by the daemon's result cache (its collectors hash what they stage),
not by a lookup in the front.

Metadata, labels and readiness still come through the front's own client-library session
(``Backend.own``): they are rare, and answer as in the front's process.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os

import numpy as np

from ...client import errors as client_errors
from ...client.protocol import Prediction, Predictions
from ...shm import uploads, wire
from ...shm.ring import Ring
from ..dispatch.queues import ThinkTime
from ..front import principal as principals
from ..front.admission import Rejected
from ..front.handshake import check_hello
from ..front.session import Leaders
from .backend import Backend, Principal, Target
from .errors import OipError, from_client

log = logging.getLogger("inferd.oip")
#: threads that decode encoded files and resize frames for the resident front
DECODE_THREADS = 2


class _Closed:
    """The transport the server's drain closes: a direct session has none."""

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return True


class DirectSession(Leaders):
    """One principal's session on the loop (the module docstring). Loop thread only, except
    ``claim`` (the collectors)."""

    def __init__(self, server, sid: int, ring: Ring, peer: tuple, name: str):
        self.server = server
        self.sid = sid
        self.ring = ring
        self.peer = peer                       # (pid, uid, gid): the principal's
        self.name = name
        self.inflight: dict[int, int] = {}     # slot -> request id (the scheduler's)
        self._init_leaders()                   # pending, claim, unclaim (daemon/front/session.py)
        self.closed = False
        self.told_gen = 0
        self.told_models: dict = {}
        self.batches = True                    # its replies may come in one ``replies`` message
        self.think = ThinkTime()
        self.transport = _Closed()
        self.waiting = False
        self.heavy = False
        self.free = list(range(ring.geometry.slots - 1, -1, -1))   # slots not carrying a request
        self._ids = iter(range(1, 1 << 62))
        self._calls: dict[int, tuple[int, asyncio.Future]] = {}   # request id -> (slot, its answer)
        self._freed = asyncio.Event()          # a slot came free
        self._reader = wire.FrameReader(1 << 31, wire.MAX_DEPTH)

    def __repr__(self) -> str:
        return f"DirectSession({self.sid}, {self.name})"

    # what the scheduler and the collectors use of a Session -----------------------------------
    def send(self, message: dict) -> None:
        self._settle(message)

    def write(self, data: bytes) -> None:
        for message in self._reader.feed(data):
            for reply in message["replies"] if "replies" in message else (message,):
                self._settle(reply)

    def release_ring(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    # the front's side -------------------------------------------------------------------------
    def _settle(self, reply: dict) -> None:
        entry = self._calls.pop(reply.get("id"), None)
        if entry is None:
            return
        slot, future = entry
        self.free.append(slot)                 # the scheduler let go of the slot before replying
        self._freed.set()
        if not future.done():
            future.set_result(reply)

    async def classify(self, scheduler, frames: list, fields: dict, deadline: float) -> list:
        """The daemon's reply to each frame (model-sized uint8 arrays), in order: written into
        free slots and submitted in classify_many messages as slots free up. Rejected refusals
        of a whole message raise OipError; a request's own error is its reply."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future] = []
        todo = collections.deque(range(len(frames)))
        nbytes = frames[0].nbytes
        while todo:
            if not self.free:
                self._freed.clear()
                left = deadline - loop.time()
                try:
                    await asyncio.wait_for(self._freed.wait(), max(left, 0.0))
                except asyncio.TimeoutError:
                    raise OipError("deadline", "the deadline passed before this request's images could "
                                   "all be sent (its principal's ring slots were busy)") from None
                continue
            n = min(len(todo), len(self.free), wire.MAX_BATCH_REQUESTS)
            first = next(self._ids)
            slots = []
            for i in range(n):
                rid = first if i == 0 else next(self._ids)
                slot = self.free.pop()
                self.ring.slot(slot, nbytes)[:] = frames[todo.popleft()].reshape(-1)
                future = loop.create_future()
                self._calls[rid] = (slot, future)
                futures.append(future)
                slots.append(slot)
            msg = {"op": wire.CLASSIFY_MANY, "id": first, "slots": slots, "shape": list(frames[0].shape),
                   "dtype": "uint8", "nbytes": nbytes, "timeout_ms": max(deadline - loop.time(), 1e-3) * 1000.0,
                   **fields}
            try:
                scheduler.submit_many(self, first, msg)
            except Rejected as exc:             # the whole message refused, nothing admitted
                for rid in range(first, first + n):
                    self._settle({"id": rid})
                raise refusal(wire.error(first, exc.code, str(exc), **exc.extra)) from None
        return await asyncio.gather(*futures)

    def idle(self) -> bool:
        return not self._calls

    def close(self) -> None:
        """No more requests; the ring goes once the last one in flight is answered."""
        if not self.closed:
            self.closed = True
            self.server.session_closed(self)


class DirectBackend(Backend):
    """Backend (daemon/oip/backend.py) whose inferences go straight into the daemon's admission
    (the module docstring); the front's own session still answers metadata and readiness."""

    def __init__(self, server, socket_path: str, **kwargs):
        super().__init__(socket_path, **kwargs)
        self.server = server
        self._sessions: collections.OrderedDict[Principal, DirectSession] = collections.OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="oip-decode")

    async def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        await super().close()

    def _session(self, principal: Principal) -> DirectSession:
        session = self._sessions.get(principal)
        if session is not None:
            self._sessions.move_to_end(principal)
            return session
        server = self.server
        me = (os.getpid(), os.geteuid(), os.getegid())
        hello = {"op": "hello", "version": wire.PROTOCOL_VERSION, "ring_slots": self._ring_slots,
                 "principal": principal.wire()}
        try:
            peer, groups, authorised = principals.adopt(hello, me, ())
            geometry = check_hello(server, hello, peer, groups, authorised=authorised)
        except Rejected as exc:
            kind = "forbidden" if exc.code == wire.E_PERMISSION_DENIED else None
            if kind is not None:
                raise OipError(kind, f"{principal.name}: {exc}") from None
            raise refusal(wire.error(0, exc.code, str(exc), **exc.extra)) from None
        ring, fd = Ring.create(geometry, backend="memfd", prefix=server.cfg.ring.shm_prefix)
        os.close(fd)                            # nothing to hand over: the ring lives in this process
        session = DirectSession(server, server.next_session_id(), ring, peer, principal.name)
        session.told_gen = server.model.gen
        server.session_opened(session)
        self._sessions[principal] = session
        over = len(self._sessions) - self._max
        for p in [p for p, s in self._sessions.items() if s.idle() and p != principal][:max(over, 0)]:
            self._sessions.pop(p).close()
        log.debug("direct session %d opened for %s", session.sid, principal.name)
        return session

    async def classify(self, principal: Principal, images: list, top_k: int, timeout_s: float | None,
                       logits: bool = False, target: Target | None = None) -> list:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_s or self.timeout_s)
        info = target.info if target is not None else self.own.model
        h, w, _ = info.input_shape
        if any(not isinstance(im, np.ndarray) or im.shape[:2] != (h, w) for im in images):
            frames = await loop.run_in_executor(self._pool, _frames, images, h, w)
        else:
            frames = images
        if self.server.draining:
            raise OipError("unavailable", "the daemon is draining; send to another host")
        fields: dict = {"top_k": top_k}
        if logits:
            fields["logits"] = True
        if target is not None and target.model is not None:
            fields["model"] = target.model
        if target is not None and target.pinned is not None:
            fields["version"] = target.pinned
        replies = await self._session(principal).classify(self.server.scheduler, frames, fields, deadline)
        out = []
        n = info.classes or len(info.labels)
        for reply in replies:
            if not reply.get("ok"):
                raise refusal(reply)
            row = np.frombuffer(reply["logits"], np.float32).copy() if logits else None
            if row is not None and len(row) != n:
                raise OipError("internal", f"the daemon answered {len(row)} logits for {n} classes")
            out.append(Predictions([Prediction(int(i), "", float(s)) for i, s in reply["top"]], row))
        return out


def refusal(reply: dict) -> OipError:
    """The OipError for the daemon's error reply (as the client library's error would map)."""
    if reply.get("code") == wire.E_SHUTTING_DOWN:
        return OipError("unavailable", f"the daemon is draining: {reply.get('message')}; send to another host")
    return from_client(client_errors.from_reply(reply))


def _frames(images: list, h: int, w: int) -> list:
    """Each image as an (h, w, 3) uint8 frame: encoded files decoded (the daemon's one decode,
    inferd.shm.uploads), other sizes resized as the client library resizes them."""
    from ...client.images import to_frame
    out = []
    for im in images:
        if isinstance(im, np.ndarray):
            out.append(im if im.shape[:2] == (h, w) else to_frame(im, h, w))
            continue
        try:
            out.append(uploads.decode(bytes(im), h, w))
        except uploads.UndecodableImage as exc:
            raise OipError("invalid", f"an encoded image could not be decoded: {exc}") from None
    return out
