"""The client library: connect, say hello, map the ring, classify; ride out daemon restarts.

    with Client() as client:                      # socket from $INFERD_SOCKET or the default path
        top = client.classify(image, top_k=3)     # [Prediction(index, label, score), ...]
        tops = client.classify_many(images)       # many ring slots in flight at once

Restarts (``reconnect=True``, the default). Every request has a deadline: its call's ``timeout``
(default: the Client's). When the connection breaks (EOF, ECONNRESET, EPIPE) or the daemon answers
``shutting_down`` (it drains before a restart: admitted work still finishes, new work is refused),
the Client reconnects to the same socket path with exponential backoff and jitter
(inferd.client.retry), takes the successor's ring, result-cache mapping and model description
from its hello, and resubmits every request of the call that never got an answer, with what is
left of its deadline. A ring of another slot count is fine: only what fits is in flight at once.
- Resent: requests the daemon never answered (in flight on a broken connection, or refused with
  ``shutting_down``); also ping and info, which only read the daemon's state.
- Never resent: a request that got an answer, whether a result or any other error (Overloaded,
  InvalidInput, DeadlineExceeded, ...): those are the daemon's word and reach the application.
  A request that a killed daemon computed but did not answer is computed again by its successor.
- The application sees nothing of a restart that a successor covers within the deadline; past it
  DaemonUnavailable (no daemon took over in time) or DeadlineExceeded (the deadline passed before
  the request could be resubmitted). ``reconnects`` and ``resubmitted`` count what happened.
- The constructor connects once: no daemon there raises DaemonUnavailable at once.
- A reply that belongs to no request (a protocol fault, not a restart) closes the Client.
``reconnect=False`` keeps the old contract: a broken connection closes the Client and raises
DaemonUnavailable, a draining daemon's refusal raises ShuttingDown.

Model swaps. Replies carry ``gen``, the model generation that computed them; the first reply of a
generation this session has not been told of also carries ``model`` (hello's shape). The Client
then updates ``model``, names that reply's classes with that generation's labels (replies of the
old generation still in flight keep theirs), and looks up local cache hits under the new digest.
Replies without ``gen`` (an older daemon) are read with the current model.

Cache hits. A frame the daemon already answered is answered here from the read-only result cache.
The daemon's statistics learn of these hits with the next request (``hits`` field) or, at the
latest about half a second after the first unreported hit, by a ``hits`` notification (no reply),
and at ``close()``, before the socket closes.

Threads: a Client may be shared between threads. Each call holds the client's lock for its whole
round trip (reconnecting included), so calls from several threads run one after another; for
parallel requests use ``classify_many`` (it pipelines up to the ring's slot count) or one Client
per thread. Not fork-safe: a child process must open its own Client.

Errors are typed (inferd.client.errors): DaemonUnavailable, InvalidInput for an image or field the
daemon refuses, Overloaded with ``retry_after``, DeadlineExceeded, PermissionDenied, ProtocolError,
InferenceFailed.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Iterable, NamedTuple

import numpy as np

from . import errors
from .connection import Connection, ModelInfo
from .hits import HitReport
from .images import to_frame
from .retry import MAX_LOSSES, Backoff, Call, Pending, lost_too_often, reconnect
from ..shm import cache as cachefile
from ..shm import wire

__all__ = ["Client", "ModelInfo", "Prediction", "NearDuplicate", "default_socket_path"]

#: Extra time a read waits beyond a request's own deadline before the client gives up on the daemon.
READ_GRACE_S = 5.0
#: Local cache hits reach the daemon at most this long after the first one nobody reported.
HITS_REPORT_DELAY_S = 0.5
#: The id of notifications (``hits``): no reply is expected, and a refusal by an older daemon,
#: which answers it ``unknown_op``, is ignored. Requests count from 1.
NOTE_ID = 0
#: Model generations whose labels a Client keeps, for replies computed just before a swap.
KEEP_GENERATIONS = 4
class Prediction(NamedTuple):
    index: int
    label: str
    score: float


class NearDuplicate(NamedTuple):
    content_hash: bytes      # BLAKE3 of the stored frame (shape, dtype, bytes)
    tag: str | None          # the tag it was stored with
    similarity: float        # cosine similarity of the embeddings, -1..1


def default_socket_path() -> str:
    """$INFERD_SOCKET, else the daemon's own default (inferd.shm.wire.default_socket_path)."""
    return os.environ.get("INFERD_SOCKET") or wire.default_socket_path()


class Client:
    """One application's session with the daemon, renewed across daemon restarts.

    ``timeout`` (seconds) is the default deadline of each request; the daemon answers
    DeadlineExceeded rather than compute a request whose deadline passed while queued.
    ``reconnect``: reconnect and resubmit within the deadline when the daemon restarts (see the
    module docstring); False raises DaemonUnavailable at the first broken connection.
    """

    def __init__(self, socket_path: str | None = None, *, ring_slots: int = 0,
                 timeout: float = 30.0, connect_timeout: float = 5.0, cache: bool = True,
                 reconnect: bool = True):
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self.reconnect = reconnect
        self.cache_hits = 0                     # answered here, without a round trip
        self.reconnects = 0                     # sessions opened after the first
        self.resubmitted = 0                    # requests sent again after a restart
        self.model: ModelInfo | None = None
        self.session = None
        self.preprocess_id = None               # the daemon's preprocessing, part of cache keys
        self._ring_slots = ring_slots
        self._connect_timeout = connect_timeout
        self._use_cache = cache
        self._lock = threading.Lock()
        self._ids = itertools.count(NOTE_ID + 1)
        self._clock = time.monotonic
        self._conn: Connection | None = None
        self._closed = False
        self._models: dict[int, ModelInfo] = {}
        self._label_book: dict[str, tuple] = {}   # labels_id -> names (Client.labels)
        self._hits = HitReport(self._report_hits, HITS_REPORT_DELAY_S)
        try:
            self._adopt(self._open(connect_timeout))
        except BaseException:
            self.close()
            raise

    # connection -------------------------------------------------------------------------------
    def _open(self, hello_timeout: float) -> Connection:
        return Connection.open(self.socket_path, ring_slots=self._ring_slots, use_cache=self._use_cache,
                               connect_timeout=min(self._connect_timeout, hello_timeout),
                               hello_timeout=hello_timeout)

    def _adopt(self, conn: Connection) -> None:
        self._conn = conn
        self.session = conn.session
        self.model = conn.model
        self._models = {conn.model.gen: conn.model}
        self.preprocess_id = conn.preprocess_id

    def _connection(self, deadline: float, backoff: Backoff) -> Connection:
        """The live connection, reconnecting first (within ``deadline``) if the last one broke."""
        conn = self._conn
        if conn is not None and conn.is_open and not self._closed:
            return conn
        if self._closed or not self.reconnect:
            self._close_locked()
            raise errors.DaemonUnavailable("this Client is closed")
        self._conn = None
        if conn is not None:
            conn.close()
        self._adopt(reconnect(self._open, deadline, what=self.socket_path, backoff=backoff,
                              clock=self._clock))
        self.reconnects += 1
        return self._conn

    def _lost(self, conn: Connection, exc: errors.ConnectionLost) -> None:
        """The connection broke: with reconnect off that ends the Client, and the error is raised;
        with reconnect on, the next ``_connection`` call opens a new one."""
        conn.close()
        if not self.reconnect:
            self._close_locked()
            raise exc

    def _read_wait(self, deadline: float) -> float:
        return max(deadline - self._clock(), 0.0) + READ_GRACE_S

    def close(self) -> None:
        """Report unreported cache hits, then close the session; idempotent. The daemon frees the
        ring when it sees the socket close."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        self._closed = True
        self._hits.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            self._send_hits(conn)
            conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # cache hits -------------------------------------------------------------------------------
    def _report_hits(self) -> None:
        """The hits timer: send what no request has carried yet (it runs on the timer's thread)."""
        with self._lock:
            self._hits.fired()
            conn = self._conn
            if not self._closed and conn is not None and conn.is_open:
                self._send_hits(conn)
            # else: the next request's connection carries them

    def _send_hits(self, conn: Connection) -> None:
        n = self._hits.take()
        if n and conn.is_open:
            try:
                conn.send(wire.encode({"op": "hits", "id": NOTE_ID, "n": n}))
            except errors.ConnectionLost:
                self._hits.add(n, arm=False)          # the next connection reports them
        else:
            self._hits.add(n, arm=False)

    def _local_answer(self, conn: Connection, frame, top_k: int):
        """Predictions from the read-only cache for a frame, or None (a miss)."""
        model = self.model
        key = cachefile.cache_key(model.digest, conn.preprocess_id, cachefile.content_hash(frame))
        hit = conn.cache.lookup(key)
        if hit is None or len(hit) < top_k:
            return None
        self.cache_hits += 1
        self._hits.add(1)
        names = self._names(model)
        return [Prediction(i, names[i], s) for i, s in hit[:top_k]]

    # model generations ------------------------------------------------------------------------
    def _model_of(self, reply: dict) -> ModelInfo:
        """The model that computed a reply: a new generation it announces becomes ``self.model``."""
        described = reply.get("model")
        if isinstance(described, dict):
            info = ModelInfo.from_wire(described)
            self._models[info.gen] = info
            if info.gen >= self.model.gen:
                self.model = info
            while len(self._models) > KEEP_GENERATIONS:
                del self._models[min(self._models)]
            return info
        gen = reply.get("gen")
        return self._models.get(gen, self.model) if type(gen) is int else self.model

    # single round trips -----------------------------------------------------------------------
    def _call(self, message: dict) -> dict:
        with self._lock:
            return self._call_locked(message)

    def _call_locked(self, message: dict) -> dict:
        deadline = self._clock() + self.timeout
        backoff = Backoff()
        for _ in range(MAX_LOSSES):
            conn = self._connection(deadline, backoff)
            rid = next(self._ids)
            try:
                conn.send(wire.encode({**message, "id": rid}))
                reply = self._reply_to(conn, rid, deadline)
                break
            except errors.ConnectionLost as exc:
                self._lost(conn, exc)
        else:
            raise lost_too_often(MAX_LOSSES)
        if not reply.get("ok"):
            raise errors.from_reply(reply)
        return reply

    def _reply_to(self, conn: Connection, rid: int, deadline: float) -> dict:
        while True:
            reply = conn.read_reply(self._read_wait(deadline))
            if reply.get("id") == NOTE_ID:
                continue                            # an older daemon refusing a hits notification
            if reply.get("id") != rid:
                raise self._desync(reply, f"reply for id {reply.get('id')!r}, expected {rid}")
            return reply

    def _desync(self, reply: dict, what: str) -> errors.ProtocolError:
        """A reply this session did not ask for: which slots the daemon still holds is unknown, and
        this is a fault rather than a restart. Close the Client; the caller raises the error."""
        self._close_locked()
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

    def labels(self) -> tuple[str, ...]:
        """The current model's class names, by index: asked of the daemon once per list of names
        (``labels`` request; hello carries only their number and ``labels_id``), then kept.
        Numbered classes ("0", "1", ...: a model without a labels file) are named without asking."""
        with self._lock:
            return self._names(self.model)

    def _names(self, model: ModelInfo) -> tuple[str, ...]:
        """``model``'s class names, fetched at most once per labels_id (lock held). A reply of a
        generation whose names the daemon no longer serves (swapped to other labels before they
        were asked for) gets its classes numbered rather than wrongly named."""
        if model.labels:
            return model.labels
        names = self._label_book.get(model.labels_id)
        if names is None:
            reply = self._call_locked({"op": "labels"})
            self._label_book[str(reply.get("labels_id"))] = tuple(map(str, reply.get("labels") or ()))
            while len(self._label_book) > KEEP_GENERATIONS:
                del self._label_book[next(iter(self._label_book))]
            names = self._label_book.get(model.labels_id) or tuple(str(i) for i in range(model.classes))
        return names

    def classify(self, image, top_k: int = 5, *, timeout: float | None = None,
                 tag: str | None = None) -> list[Prediction]:
        """Top-k predictions for one image (see inferd.client.images for what an image may be)."""
        return self.classify_many([image], top_k, timeout=timeout, tag=tag)[0]

    def classify_many(self, images: Iterable, top_k: int = 5, *, timeout: float | None = None,
                      tag: str | None = None) -> list[list[Prediction]]:
        """Top-k predictions for each image, in order, keeping up to all ring slots in flight.

        A frame the daemon already answered is answered from the read-only result cache without a
        round trip. ``tag`` (at most 64 bytes) is stored with the frames' embeddings, where the
        model has them (see near_duplicates). If any request fails, the others still complete (no
        slot is left in flight) and the first error is raised.
        """
        h, w, _ = self.model.input_shape
        frames = [to_frame(img, h, w) for img in images]
        timeout = self.timeout if timeout is None else timeout
        self._check(top_k, timeout)
        with self._lock:
            deadline = self._clock() + timeout
            conn = self._connection(deadline, Backoff())
            results: list = [None] * len(frames)
            todo = list(range(len(frames)))
            extra = {"top_k": top_k, **({"tag": tag} if tag else {})}
            if conn.cache is not None and tag is None:    # a tag must reach the daemon's store
                for i in todo:
                    results[i] = self._local_answer(conn, frames[i], top_k)
                todo = [i for i in todo if results[i] is None]
                extra["looked"] = True      # misses here: NOTE [ unhashed misses ] in daemon/caching.py
            answers = self._pipeline([frames[i] for i in todo], "classify", extra, deadline)
            for i, (reply, model) in zip(todo, answers):
                names = self._names(model)
                results[i] = [Prediction(k, names[k], s) for k, s in reply["top"]]
            return results

    def _check(self, top_k, timeout) -> None:
        """The daemon's own range checks, made here too so a local cache hit answers a bad
        argument the same way a round trip would."""
        n = self.model.classes or len(self.model.labels)
        if type(top_k) is not int or not 1 <= top_k <= n:
            raise errors.InvalidInput(f"top_k {top_k!r} is out of range: 1 to {n}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise errors.InvalidInput(f"timeout {timeout!r} is out of range: more than 0, at most 3600 s "
                                      "(timeout_ms)")

    def embed(self, image, *, tag: str | None = None, timeout: float | None = None):
        """The model's embedding of an image (float32, unit length), stored by the daemon under the
        image's content hash with ``tag``. InvalidInput if the model exposes no embedding."""
        return self._embedding_op(image, "embed", {"tag": tag} if tag else {}, timeout)[0]

    def near_duplicates(self, image, k: int = 5, min_similarity: float = 0.95, *,
                        timeout: float | None = None) -> list[NearDuplicate]:
        """The stored images most similar to this one (cosine of embeddings), best first, at most k
        of them with similarity >= min_similarity. The query itself is not stored."""
        return self._embedding_op(image, "near", {"k": k, "min_similarity": min_similarity}, timeout)[1]

    def _embedding_op(self, image, op: str, extra: dict, timeout):
        h, w, _ = self.model.input_shape
        frame = to_frame(image, h, w)
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            ((reply, _),) = self._pipeline([frame], op, extra, self._clock() + timeout)
        if op == "embed":
            return np.frombuffer(reply["embedding"], dtype=np.float32).copy(), None
        return None, [NearDuplicate(bytes.fromhex(h), tag, sim) for h, tag, sim in reply["matches"]]

    # pipelining and resubmission --------------------------------------------------------------
    # NOTE [ resubmission ]
    #
    #   todo --_submit--> pending (on this connection's ring) --reply ok / error--> results
    #     ^                  |   reply shutting_down: the daemon drains; stop sending on this
    #     |                  |   connection, collect what it still owes, then drop it
    #     +---- requeue -----+   connection lost (EOF, reset, broken pipe): nothing in flight
    #                            will be answered; all of it goes back, for the next connection
    #
    # Slots belong to one connection's ring: a requeued frame is written again into a slot of the
    # next ring, whatever its slot count. Each message carries what is left of the deadline.
    def _pipeline(self, frames: list, op: str, extra: dict, deadline: float) -> list:
        """Send each frame as ``op`` with ``extra`` fields, up to the ring's slots at a time, across
        reconnects; the (reply, model) pairs in frame order."""
        call = Call(len(frames))
        while call.unfinished():
            conn = self._connection(deadline, call.backoff)
            try:
                self._submit(conn, call, frames, op, extra, deadline)
                if not call.pending:
                    if conn.draining:               # owes us nothing: leave it for its successor
                        conn.close()
                    continue
                reply = conn.read_reply(self._read_wait(deadline))
            except errors.ConnectionLost as exc:
                self._lost(conn, exc)
                self.resubmitted += call.requeue()
                continue
            self._settle(conn, call, reply)
        if call.first_error is not None:
            raise call.first_error
        return call.results

    def _submit(self, conn: Connection, call: Call, frames: list, op: str, extra: dict,
                deadline: float) -> None:
        """Write what fits into free slots and send it, in one write."""
        if conn.draining or call.first_error is not None or not call.todo:
            return
        left = deadline - self._clock()
        if left <= 0:
            call.todo.clear()
            call.fail(errors.DeadlineExceeded("the request's deadline passed before it could be "
                                              "resubmitted to a restarted daemon; it was not computed"))
            return
        out = []
        while call.todo and conn.free:
            index = call.todo.popleft()
            slot = conn.free.pop()
            frame = frames[index]
            conn.ring.slot(slot, frame.nbytes)[:] = frame.reshape(-1)
            rid = next(self._ids)
            msg = {"op": op, "id": rid, "slot": slot, "shape": list(frame.shape), "dtype": "uint8",
                   "nbytes": frame.nbytes, "timeout_ms": left * 1000.0, **extra}
            hits = self._hits.take()
            if hits:
                msg["hits"] = hits
            call.pending[rid] = Pending(index, slot, hits)
            out.append(wire.encode(msg))
        if out:
            conn.send(b"".join(out))

    def _settle(self, conn: Connection, call: Call, reply: dict) -> None:
        rid = reply.get("id")
        if rid == NOTE_ID:
            return                                  # an older daemon refusing a hits notification
        entry = call.pending.pop(rid, None)
        if entry is None:
            raise self._desync(reply, f"reply for unknown request id {rid!r}")
        call.backoff.reset()                        # this connection works
        conn.free.append(entry.slot)
        if reply.get("ok"):
            call.results[entry.index] = (reply, self._model_of(reply))
        elif reply.get("code") == wire.E_SHUTTING_DOWN and self.reconnect:
            conn.draining = True
            call.todo.append(entry.index)
            self._hits.add(entry.hits)              # refused before the daemon counted them
            self.resubmitted += 1
        else:
            call.fail(errors.from_reply(reply))
