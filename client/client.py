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
- The first connection waits for a daemon too: the constructor retries what a restart looks like
  (no socket yet, connection refused or reset, ``shutting_down``) with the same backoff until
  ``connect_timeout`` has passed, so an application started before the daemon (boot ordering) or
  during ``systemctl restart`` gets the daemon that comes up; then DaemonUnavailable naming the last
  failure. PermissionDenied and ProtocolError are raised at once.
- A reply that belongs to no request (a protocol fault, not a restart) closes the Client.
``reconnect=False`` keeps the old contract: the constructor raises the first failure at once, a
broken connection closes the Client and raises DaemonUnavailable, a draining daemon's refusal
raises ShuttingDown.

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
parallel requests use ``classify_many`` (it pipelines up to the ring's slot count), one Client
per thread, or inferd.client.AsyncClient (many requests in flight from many tasks over one
connection). Not fork-safe: a child process must open its own Client.

Both clients run on one protocol core (inferd.client.protocol: ids, slots, encoding, replies,
cache lookups, resubmission, model generations); this module adds only the blocking wait.

Errors are typed (inferd.client.errors): DaemonUnavailable, InvalidInput for an image or field the
daemon refuses, Overloaded with ``retry_after``, DeadlineExceeded, PermissionDenied, ProtocolError,
InferenceFailed.
"""
from __future__ import annotations

import threading
import time
from typing import Iterable

from . import decode, errors
from .connection import Connection, ModelInfo
from .hits import HitReport
from .protocol import (DEFAULT_MIN_SIMILARITY, DEFAULT_NEAR_K, NOTE_ID, NearDuplicate, Prediction, Predictions,
                       ProtocolCore)
from .retry import Backoff, Call, reconnect
from .settings import ClientSettings, default_socket_path

__all__ = ["Client", "ModelInfo", "Prediction", "Predictions", "NearDuplicate", "default_socket_path"]

#: Extra time a read waits beyond a request's own deadline before the client gives up on the daemon.
READ_GRACE_S = 5.0
#: Local cache hits reach the daemon at most this long after the first one nobody reported.
HITS_REPORT_DELAY_S = 0.5


def first_connect_failed(path: str, connect_timeout: float) -> str:
    """The first words of DaemonUnavailable when no daemon answered a new client in time."""
    return f"no inferd daemon answered on {path} within connect_timeout ({connect_timeout:g} s)"


class Client(ClientSettings):
    """One application's session with the daemon, renewed across daemon restarts.

    ``timeout`` (seconds) is the default deadline of each request; the daemon answers
    DeadlineExceeded rather than compute a request whose deadline passed while queued.
    ``reconnect``: wait up to ``connect_timeout`` for a daemon to connect to at first, and
    reconnect and resubmit within the deadline when the daemon restarts (see the module
    docstring); False raises DaemonUnavailable at the first failed or broken connection.
    The arguments are kept, and a session opened with them, by ClientSettings
    (inferd.client.settings), AsyncClient's too. What a call sends and how its replies are read
    is the protocol core's (inferd.client.protocol); this class adds the blocking socket, the
    lock and the thread timer.
    """

    def __init__(self, socket_path: str | None = None, *, ring_slots: int = 0,
                 timeout: float = 30.0, connect_timeout: float = 5.0, cache: bool = True,
                 reconnect: bool = True, model: str | None = None, version: int | None = None):
        super().__init__(socket_path, ring_slots=ring_slots, timeout=timeout,
                         connect_timeout=connect_timeout, cache=cache, reconnect=reconnect,
                         model=model, version=version)
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._closed = False
        self._hits = HitReport(self._report_hits, HITS_REPORT_DELAY_S)
        self._core = ProtocolCore(self._hits, resubmit=reconnect)
        try:
            self._adopt(self._first_connection())
        except BaseException:
            self.close()
            raise

    # what the core knows, read-only -----------------------------------------------------------
    model = property(lambda self: self._core.model, doc="The daemon's model (ModelInfo), updated on swaps.")
    models = property(lambda self: list(self._core.catalog.values()),
                      doc="Every model the daemon serves (ModelInfo each, with its version), when it serves "
                          "several; [] for a one-model daemon.")
    session = property(lambda self: self._core.session)
    preprocess_id = property(lambda self: self._core.preprocess_id,
                             doc="The daemon's preprocessing, part of cache keys.")
    cache_hits = property(lambda self: self._core.cache_hits, doc="Answered here, without a round trip.")
    reconnects = property(lambda self: self._core.reconnects, doc="Sessions opened after the first.")
    resubmitted = property(lambda self: self._core.resubmitted, doc="Requests sent again after a restart.")

    # connection -------------------------------------------------------------------------------
    def _first_connection(self) -> Connection:
        """The first session: with ``reconnect``, a daemon that is not there yet or is restarting
        is waited for until ``connect_timeout`` has passed (module docstring); without, the first
        failure is raised."""
        if not self.reconnect:
            return self._open_connection(self._connect_timeout)
        return reconnect(self._open_connection, self._clock() + self._connect_timeout,
                         what=self.socket_path, backoff=Backoff(), clock=self._clock,
                         gave_up=first_connect_failed(self.socket_path, self._connect_timeout))

    def _adopt(self, conn: Connection) -> None:
        self._conn = conn
        self._core.adopt(conn)

    def _connection(self, deadline: float, backoff: Backoff) -> Connection:
        """The live connection, reconnecting first (within ``deadline``) if the last one broke or
        a draining daemon owes nothing more on it."""
        conn = self._conn
        if conn is not None and conn.is_open and self._core.draining and self._core.idle():
            conn.close()                        # leave it for its successor
        if conn is not None and conn.is_open and not self._closed:
            return conn
        if self._closed or not self.reconnect:
            self._close_locked()
            raise errors.DaemonUnavailable("this Client is closed")
        self._conn = None
        if conn is not None:
            conn.close()
        self._adopt(reconnect(self._open_connection, deadline, what=self.socket_path, backoff=backoff,
                              clock=self._clock))
        return self._conn

    def _lost(self, conn: Connection, exc: errors.ConnectionLost) -> None:
        """The connection broke: what was in flight goes back to its call; with reconnect off
        that ends the Client, and the error is raised."""
        conn.close()
        self._core.connection_lost()
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
        n = self._hits.n
        if not n or not conn.is_open:
            return                                  # the next connection reports them
        try:
            conn.send(self._core.hits_note())
        except errors.ConnectionLost:
            self._hits.add(n, arm=False)

    # one call, any number of requests ---------------------------------------------------------
    def _run(self, call: Call) -> list:
        """Send ``call``'s requests, up to the ring's slots at a time, across reconnects (NOTE
        [ resubmission ] in inferd.client.protocol); the (reply, model) pairs in order. If any
        request fails, the others still complete (no slot is left in flight) and the first error
        is raised. Lock held."""
        core = self._core
        try:
            while call.unfinished():
                conn = self._connection(call.deadline, call.backoff)
                try:
                    data = core.submit(call, self._clock())
                    if data:
                        conn.send(data)
                    if not call.unfinished() or core.idle():
                        continue                    # nothing to read: done, or a drained session to drop
                    reply = conn.read_reply(self._read_wait(call.deadline))
                except errors.ConnectionLost as exc:
                    self._lost(conn, exc)
                    continue
                try:
                    core.receive(reply)
                except errors.ProtocolError as exc:
                    raise self._desync(exc) from None
        finally:
            if call.unfinished():                   # interrupted: the replies only free the slots
                core.abandon(call)
        if call.first_error is not None:
            raise call.first_error
        return call.results

    def _desync(self, exc: errors.ProtocolError) -> errors.ProtocolError:
        """A reply this session did not ask for: which slots the daemon still holds is unknown, and
        this is a fault rather than a restart. Close the Client; the caller raises the error."""
        self._close_locked()
        return errors.ProtocolError(f"{exc}; the session is closed, open a new Client")

    def _call(self, message: dict) -> dict:
        with self._lock:
            return self._call_locked(message)

    def _call_locked(self, message: dict) -> dict:
        """One request without a frame (ping, info, labels); its reply."""
        op = message["op"]
        extra = {k: v for k, v in message.items() if k != "op"}
        ((reply, _),) = self._run(Call(op, extra, self._clock() + self.timeout))
        return reply

    # requests ---------------------------------------------------------------------------------
    def ping(self) -> float:
        """Round-trip time of one ping, in seconds."""
        t0 = time.perf_counter()
        self._call({"op": "ping"})
        return time.perf_counter() - t0

    def info(self) -> dict:
        """The daemon's model, devices and counters."""
        return self._call({"op": "info"})

    def labels(self, model: str | None = None, version: int | None = None) -> tuple[str, ...]:
        """A model's class names (default: this client's model), by index: asked of the daemon once
        per list of names (``labels`` request; hello carries only their number and ``labels_id``),
        then kept. Numbered classes ("0", "1", ...: a model without a labels file) are named
        without asking."""
        target = self._model_target(model, version)[0]
        with self._lock:
            return self._names(target)

    def _model_target(self, model: str | None, version: int | None) -> tuple:
        """``_target``; a model this session was not told of is looked for once more in the
        daemon's ``info`` (a model loaded live since hello), at most once a second."""
        try:
            return self._target(model, version)
        except errors.UnknownModel as exc:
            if not self._should_list_models(exc):
                raise
        self._core.learn_models(self._call({"op": "info"}).get("models"))
        return self._target(model, version)

    def _names(self, model: ModelInfo) -> tuple[str, ...]:
        names = self._core.names(model)
        if names is None:
            ask = {"op": "labels", **({"model": model.name, "version": model.version} if model.version else {})}
            names = self._core.learn_labels(self._call_locked(ask), model)
        return names

    def classify(self, image, top_k: int = 5, *, timeout: float | None = None,
                 tag: str | None = None, logits: bool = False, model: str | None = None,
                 version: int | None = None) -> Predictions:
        """Top-k predictions for one image: a numpy array or torch tensor (inferd.client.images), or
        a JPEG/PNG/WebP file as bytes, a path or a binary file object (inferd.client.decode).
        With ``logits`` the result's ``logits`` is the model's raw output row (float32 numpy).
        ``model`` (a name) and ``version``: which of the daemon's models answers (default: the
        client's ``model``, else the daemon's default); UnknownModel names those there are."""
        return self.classify_many([image], top_k, timeout=timeout, tag=tag, logits=logits, model=model,
                                  version=version)[0]

    def classify_many(self, images: Iterable, top_k: int = 5, *, timeout: float | None = None,
                      tag: str | None = None, logits: bool = False, model: str | None = None,
                      version: int | None = None) -> list[Predictions]:
        """Top-k predictions for each image, in order, keeping up to all ring slots in flight.

        A frame the daemon already answered is answered from the read-only result cache without a
        round trip, unless ``logits`` asks for each image's raw output row too (``.logits`` of
        each result, float32 numpy): the daemon computes those, the caches hold top-k only.
        ``tag`` (at most 64 bytes) is stored with the frames' embeddings, where the model has them
        (see near_duplicates). If any request fails, the others still complete (no slot is left in
        flight) and the first error is raised.
        """
        target = self._model_target(model, version)
        h, w, _ = target[0].input_shape                            # frames sized for that model
        items = [decode.prepare(img, h, w) for img in images]     # read, not yet decoded
        timeout = self.timeout if timeout is None else timeout
        core = self._core
        core.check(top_k, timeout, target[0])
        with self._lock:
            deadline = self._clock() + timeout
            self._connection(deadline, Backoff())
            results, todo, extra = core.look_up(items, top_k, tag, logits, target)
            asked = [items[i] for i in todo]
            # encoded bytes go beside a frame for the default model only (the daemon verifies those)
            uploads = core.uploads(asked) if target[0].digest == core.model.digest else None
            call = Call("classify", extra, deadline, [it.frame() for it in asked], uploads)
            for i, (reply, model) in zip(todo, self._run(call)):
                results[i] = core.answer(reply, model, logits)
            return [core.predictions(pairs, self._names(model), *rest) for pairs, model, *rest in results]

    def embed(self, image, *, tag: str | None = None, timeout: float | None = None, model: str | None = None,
              version: int | None = None):
        """The model's embedding of an image (float32, unit length), stored by the daemon under the
        image's content hash with ``tag``. InvalidInput if the model exposes no embedding.
        ``model`` / ``version`` as classify's: each model keeps its own embeddings."""
        return self._core.embedding(self._embedding_op(image, "embed", {"tag": tag} if tag else {}, timeout,
                                                       model, version))

    def near_duplicates(self, image, k: int = DEFAULT_NEAR_K, min_similarity: float = DEFAULT_MIN_SIMILARITY, *,
                        timeout: float | None = None, model: str | None = None,
                        version: int | None = None) -> list[NearDuplicate]:
        """The stored images most similar to this one (cosine of embeddings), best first, at most k
        of them with similarity >= min_similarity, among those the model (``model`` / ``version``
        as classify's) embedded. The query itself is not stored."""
        return self._core.matches(self._embedding_op(image, "near", {"k": k, "min_similarity": min_similarity},
                                                     timeout, model, version))

    def _embedding_op(self, image, op: str, extra: dict, timeout, model=None, version=None) -> dict:
        target, fields, _ = self._model_target(model, version)
        h, w, _ = target.input_shape
        extra = {**extra, **fields}
        frame = decode.prepare(image, h, w).frame()
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            ((reply, _),) = self._run(Call(op, extra, self._clock() + timeout, [frame]))
        return reply
