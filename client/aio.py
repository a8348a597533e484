"""The asyncio client: the operations of inferd.client.Client, awaitable, for one event loop.

    async with AsyncClient() as client:               # socket from $INFERD_SOCKET or the default
        top = await client.classify(image, top_k=3)
        tops = await asyncio.gather(*(client.classify(im) for im in images))   # many in flight

One AsyncClient is one connection and one ring, shared by every task of its event loop: each call
takes free slots, sends, and waits for its own replies, so as many requests are in flight as the
ring has slots (calls beyond that wait for a slot, in order of arrival). It runs on the same
protocol core as Client (inferd.client.protocol), so requests, replies, cache hits, model swaps
and resubmission after a restart behave alike; this module adds only its way of waiting:

- First connection: as Client's, it waits for a daemon within ``connect_timeout`` (with
  ``reconnect``), sleeping with asyncio between attempts.
- Hello: connect and hello run in a worker thread (Connection.open, blocking, bounded by the
  timeouts), because the ring's descriptor arrives by SCM_RIGHTS and asyncio's ``sock_recv`` reads
  no ancillary data. The socket is then handed to the loop as a transport; replies arrive in
  ``data_received``, and requests go out with ``transport.write`` (whole frames, never interleaved).
- Cancellation: a cancelled call sends nothing more; its requests already sent keep their slots
  until the daemon's replies arrive (the daemon owns a submitted slot until it answers), then the
  slots are free again and the replies dropped. No slot is reused early, none is lost.
- Restarts (``reconnect=True``): a broken connection, or a draining daemon's ``shutting_down``,
  sends every call's unanswered requests to the successor within their deadlines, as Client does;
  one task reconnects, the others wait for it.
- A reply that belongs to no request closes the AsyncClient (ProtocolError), as it closes Client.
- Not thread-safe: use it from the loop that opened it (a Client per thread otherwise).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Iterable

from . import decode, errors
from .client import HITS_REPORT_DELAY_S, READ_GRACE_S, first_connect_failed
from .connection import Connection, ModelInfo
from .hits import HitReport
from .protocol import DEFAULT_MIN_SIMILARITY, DEFAULT_NEAR_K, NearDuplicate, Predictions, ProtocolCore
from .retry import Backoff, Call, reconnect_async
from .settings import ClientSettings

__all__ = ["AsyncClient"]


class _Stream(asyncio.Protocol):
    """The transport's callbacks, forwarded to the client with the Connection they belong to."""

    def __init__(self, client: "AsyncClient", conn: Connection):
        self.client, self.conn = client, conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client._data(self, data)

    def connection_lost(self, exc) -> None:
        self.client._gone(self, errors.ConnectionLost(
            f"connection to the daemon failed: {exc}" if exc else "the daemon closed the connection"))

    def close(self) -> None:
        """Close the socket and unmap the ring and cache; idempotent."""
        if self.transport is not None:
            self.transport.close()
        self.conn.close()


class AsyncClient(ClientSettings):
    """One application's session with the daemon for the tasks of one event loop; the arguments
    are Client's (kept by ClientSettings, inferd.client.settings). Open it with
    ``async with AsyncClient(...)`` or ``await AsyncClient.open(...)`` (no daemon there within
    ``connect_timeout``: DaemonUnavailable; at once with ``reconnect=False``); close with
    ``await aclose()``."""

    def __init__(self, socket_path: str | None = None, *, ring_slots: int = 0,
                 timeout: float = 30.0, connect_timeout: float = 5.0, cache: bool = True,
                 reconnect: bool = True, model: str | None = None, version: int | None = None):
        super().__init__(socket_path, ring_slots=ring_slots, timeout=timeout,
                         connect_timeout=connect_timeout, cache=cache, reconnect=reconnect,
                         model=model, version=version)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: _Stream | None = None
        self._closed = False
        self._connecting: asyncio.Lock | None = None
        self._starved: dict[Call, None] = {}     # calls waiting for a free slot, in order
        self._calls: set[Call] = set()           # every call under way (woken by a lost connection)
        self._hits: HitReport | None = None
        self._core: ProtocolCore | None = None
        self._labels_asked: dict[str, asyncio.Future] = {}

    @classmethod
    async def open(cls, socket_path: str | None = None, **kwargs) -> "AsyncClient":
        client = cls(socket_path, **kwargs)
        await client.connect()
        return client

    async def connect(self) -> "AsyncClient":
        """Open the first session (idempotent); raises what Client's constructor raises."""
        if self._core is not None:
            return self
        self._loop = asyncio.get_running_loop()
        self._connecting = asyncio.Lock()
        self._hits = HitReport(self._report_hits, HITS_REPORT_DELAY_S,
                               lambda delay, fn: self._loop.call_later(delay, fn))
        self._core = ProtocolCore(self._hits, resubmit=self.reconnect)
        try:
            await self._attach(await self._first_connection())
        except BaseException:
            self._close_now()
            raise
        return self

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # what the core knows, read-only -----------------------------------------------------------
    model = property(lambda self: self._core.model, doc="The daemon's model (ModelInfo), updated on swaps.")
    session = property(lambda self: self._core.session)
    preprocess_id = property(lambda self: self._core.preprocess_id)
    cache_hits = property(lambda self: self._core.cache_hits, doc="Answered here, without a round trip.")
    reconnects = property(lambda self: self._core.reconnects, doc="Sessions opened after the first.")
    resubmitted = property(lambda self: self._core.resubmitted, doc="Requests sent again after a restart.")

    # connection -------------------------------------------------------------------------------
    async def _open(self, hello_timeout: float) -> Connection:
        """Connect and hello in a worker thread (module docstring). A cancelled wait closes the
        connection the thread opens."""
        fut = self._loop.run_in_executor(None, self._open_connection, hello_timeout)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().close())
            raise

    async def _first_connection(self) -> Connection:
        """Client._first_connection, awaitable."""
        if not self.reconnect:
            return await self._open(self._connect_timeout)
        return await reconnect_async(self._open, self._clock() + self._connect_timeout,
                                     what=self.socket_path, backoff=Backoff(), clock=self._clock,
                                     gave_up=first_connect_failed(self.socket_path, self._connect_timeout))

    async def _attach(self, conn: Connection) -> None:
        try:
            sock = conn.detach_socket()
            _, stream = await self._loop.create_unix_connection(lambda: _Stream(self, conn), sock=sock)
        except BaseException:
            conn.close()
            raise
        self._stream = stream
        self._core.adopt(conn)

    async def _connection(self, call: Call) -> _Stream:
        """The live stream, reconnecting first (one task does; within the call's deadline)."""
        while True:
            stream = self._stream
            if self._closed:
                raise errors.DaemonUnavailable("this AsyncClient is closed")
            if stream is not None:
                return stream
            if not self.reconnect:
                self._close_now()
                raise errors.DaemonUnavailable("this AsyncClient is closed")
            async with self._connecting:
                if self._stream is None and not self._closed:
                    conn = await reconnect_async(self._open, call.deadline, what=self.socket_path,
                                                 backoff=call.backoff, clock=self._clock)
                    if self._closed:
                        conn.close()
                    else:
                        await self._attach(conn)

    def _drop(self, stream: _Stream) -> None:
        """Close ``stream`` and forget it (its ring goes with it)."""
        if self._stream is stream:
            self._stream = None
        stream.close()

    def _gone(self, stream: _Stream, exc: errors.ConnectionLost) -> None:
        """The transport closed: if it was the live one, what was in flight goes back to its calls
        (reconnect) or fails them (reconnect=False closes the client)."""
        if self._stream is not stream:
            return                                      # one this client dropped itself
        self._stream = None
        stream.conn.close()
        touched = self._core.connection_lost()
        if not self.reconnect:
            for call in touched:
                call.todo.clear()
                call.fail(exc)
            self._close_now()
        self._wake_all()

    def _data(self, stream: _Stream, data: bytes) -> None:
        """Replies arrived: settle each, wake the calls they answer and, when slots came free,
        the calls waiting for one."""
        if self._stream is not stream:
            return
        try:
            replies = stream.conn.feed(data)
            for reply in replies:
                call = self._core.receive(reply)
                if call is not None and call.waker is not None:
                    call.waker.set()
        except errors.ProtocolError as exc:
            self._fail_all(errors.ProtocolError(f"{exc}; the session is closed, open a new AsyncClient"))
            return
        if self._core.draining and self._core.idle():
            self._drop(stream)                          # owes nothing more: leave it for its successor
        if self._starved and (self._core.free or self._stream is None):
            # oldest first, as many as there are free slots (all when the session went away);
            # one that finds no slot after all keeps its place in the queue
            n = len(self._core.free) if self._stream is not None else len(self._starved)
            for call in itertools.islice(self._starved, n):
                call.waker.set()

    def _wake_all(self) -> None:
        for call in self._calls:
            if call.waker is not None:
                call.waker.set()

    def _fail_all(self, exc: errors.InferdError) -> None:
        """A fault, not a restart: every call under way fails with ``exc``; the client closes."""
        for call in self._calls:
            call.todo.clear()
            call.fail(exc)
            self._core.abandon(call)
        self._close_now()
        self._wake_all()

    async def aclose(self) -> None:
        """Report unreported cache hits, then close the session; idempotent. Calls under way fail
        with DaemonUnavailable."""
        self._close_now()
        await asyncio.sleep(0)                          # let the transport's close run

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._hits is not None:
            self._hits.cancel()
        stream, self._stream = self._stream, None
        if stream is not None:
            note = self._core.hits_note()
            if note and stream.transport is not None:
                stream.transport.write(note)
            stream.close()
        for call in self._calls:
            call.fail(errors.DaemonUnavailable("this AsyncClient was closed while the call was under way"))
            self._core.abandon(call)
        self._wake_all()

    def _report_hits(self) -> None:
        """The hits timer (on the loop): send what no request has carried yet."""
        self._hits.fired()
        stream = self._stream
        if not self._closed and stream is not None:
            note = self._core.hits_note()
            if note:
                stream.transport.write(note)

    # one call, any number of requests ---------------------------------------------------------
    async def _run(self, call: Call) -> list:
        """Send ``call``'s requests as slots allow, across reconnects; the (reply, model) pairs in
        order, or the first error once none of them is in flight (NOTE [ resubmission ] in
        inferd.client.protocol). Cancelled: see the module docstring."""
        core = self._core
        call.waker = asyncio.Event()
        self._calls.add(call)
        try:
            while call.unfinished():
                stream = await self._connection(call)
                call.waker.clear()
                data = core.submit(call, self._clock())
                if data:
                    stream.transport.write(data)
                if not call.unfinished():
                    break
                if call.todo and call.first_error is None:
                    self._starved[call] = None
                else:
                    self._starved.pop(call, None)
                await self._wait(call)
        finally:
            self._calls.discard(call)
            self._starved.pop(call, None)
            if call.unfinished():
                core.abandon(call)
        if call.first_error is not None:
            raise call.first_error
        return call.results

    async def _wait(self, call: Call) -> None:
        """Until something happens to ``call``; a daemon that stays silent past the call's
        deadline and READ_GRACE_S is given up on (the connection closes, as Client's does)."""
        wait = max(call.deadline - self._clock(), 0.0) + READ_GRACE_S
        try:
            async with asyncio.timeout(wait):
                await call.waker.wait()
        except TimeoutError:
            stream = self._stream
            if stream is not None and call.inflight:
                self._drop(stream)
                self._core.connection_lost()
                self._wake_all()
            call.todo.clear()
            call.fail(errors.DaemonUnavailable(f"no reply from the daemon within {wait:.0f} s"))
            self._core.abandon(call)

    async def _call(self, message: dict) -> dict:
        self._check_open()
        op = message["op"]
        extra = {k: v for k, v in message.items() if k != "op"}
        ((reply, _),) = await self._run(Call(op, extra, self._clock() + self.timeout))
        return reply

    def _check_open(self) -> None:
        if self._core is None:
            raise errors.DaemonUnavailable("this AsyncClient is not connected: use `async with "
                                           "AsyncClient(...)` or `await AsyncClient.open(...)`")

    # requests ---------------------------------------------------------------------------------
    async def ping(self) -> float:
        """Round-trip time of one ping, in seconds."""
        t0 = time.perf_counter()
        await self._call({"op": "ping"})
        return time.perf_counter() - t0

    async def info(self) -> dict:
        """The daemon's model, devices and counters."""
        return await self._call({"op": "info"})

    async def labels(self, model: str | None = None, version: int | None = None) -> tuple[str, ...]:
        """A model's class names (Client.labels)."""
        self._check_open()
        return await self._names((await self._model_target(model, version))[0])

    async def _model_target(self, model: str | None, version: int | None) -> tuple:
        """Client._model_target: a model loaded live since hello is looked for in ``info``."""
        try:
            return self._target(model, version)
        except errors.UnknownModel as exc:
            if not self._should_list_models(exc):
                raise
        self._core.learn_models((await self._call({"op": "info"})).get("models"))
        return self._target(model, version)

    async def _names(self, model: ModelInfo) -> tuple[str, ...]:
        """Fetched at most once per labels_id, however many tasks ask at once."""
        names = self._core.names(model)
        if names is not None:
            return names
        asked = self._labels_asked.get(model.labels_id)
        if asked is None:
            ask = {"op": "labels", **({"model": model.name, "version": model.version} if model.version else {})}
            asked = self._labels_asked[model.labels_id] = self._loop.create_task(self._call(ask))
            asked.add_done_callback(lambda _: self._labels_asked.pop(model.labels_id, None))
        reply = await asyncio.shield(asked)
        return self._core.learn_labels(reply, model)

    async def classify(self, image, top_k: int = 5, *, timeout: float | None = None,
                       tag: str | None = None, logits: bool = False, model: str | None = None,
                       version: int | None = None) -> Predictions:
        """Top-k predictions for one image (what Client.classify takes; ``logits``, ``model`` and
        ``version`` as there)."""
        return (await self.classify_many([image], top_k, timeout=timeout, tag=tag, logits=logits,
                                         model=model, version=version))[0]

    async def classify_many(self, images: Iterable, top_k: int = 5, *, timeout: float | None = None,
                            tag: str | None = None, logits: bool = False, model: str | None = None,
                            version: int | None = None) -> list[Predictions]:
        """Top-k predictions for each image, in order (Client.classify_many; with ``logits`` each
        result's ``.logits`` is the model's raw output row, always computed by the daemon). Reading files and
        decoding encoded images run in the loop's default executor, never on the loop; a repeat
        upload answered from the cache by the hash of its bytes is not decoded at all."""
        self._check_open()
        timeout = self.timeout if timeout is None else timeout
        core = self._core
        target = await self._model_target(model, version)
        core.check(top_k, timeout, target[0])
        deadline = self._clock() + timeout
        items = await self._prepare(list(images), target[0])
        slow = [it for it in items if logits or core.needs_decoding(it, top_k, target[0])]
        if slow:
            await self._loop.run_in_executor(None, lambda: [it.frame() for it in slow])
        results, todo, extra = core.look_up(items, top_k, tag, logits, target)
        if todo:
            asked = [items[i] for i in todo]
            # encoded bytes go beside a frame for the default model only (the daemon verifies those)
            uploads = core.uploads(asked) if target[0].digest == core.model.digest else None
            call = Call("classify", extra, deadline, [it.frame() for it in asked], uploads)
            for i, (reply, model) in zip(todo, await self._run(call)):
                results[i] = core.answer(reply, model, logits)
        return [core.predictions(pairs, await self._names(model), *rest) for pairs, model, *rest in results]

    async def _prepare(self, images: list, model: ModelInfo | None = None) -> list:
        """inferd.client.decode.prepare for each image, sized for ``model`` (default: the daemon's);
        paths and file objects are read in the executor (blocking I/O), arrays and bytes here."""
        h, w, _ = (model or self.model).input_shape
        if any(isinstance(im, (str, os.PathLike)) or hasattr(im, "read") for im in images):
            return await self._loop.run_in_executor(None, lambda: [decode.prepare(im, h, w) for im in images])
        return [decode.prepare(im, h, w) for im in images]

    async def embed(self, image, *, tag: str | None = None, timeout: float | None = None,
                    model: str | None = None, version: int | None = None):
        """The model's embedding of an image (Client.embed)."""
        return self._core.embedding(await self._embedding_op(image, "embed", {"tag": tag} if tag else {},
                                                             timeout, model, version))

    async def near_duplicates(self, image, k: int = DEFAULT_NEAR_K, min_similarity: float = DEFAULT_MIN_SIMILARITY, *,
                              timeout: float | None = None, model: str | None = None,
                              version: int | None = None) -> list[NearDuplicate]:
        """The stored images most similar to this one (Client.near_duplicates)."""
        return self._core.matches(await self._embedding_op(
            image, "near", {"k": k, "min_similarity": min_similarity}, timeout, model, version))

    async def _embedding_op(self, image, op: str, extra: dict, timeout, model=None, version=None) -> dict:
        self._check_open()
        target, fields, _ = await self._model_target(model, version)
        extra = {**extra, **fields}
        (item,) = await self._prepare([image], target)
        frame = item.frame() if item.encoded is None else await self._loop.run_in_executor(None, item.frame)
        timeout = self.timeout if timeout is None else timeout
        ((reply, _),) = await self._run(Call(op, extra, self._clock() + timeout, [frame]))
        return reply
