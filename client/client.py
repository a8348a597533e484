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

import numpy as np

from inferd.client import errors
from inferd.client.images import to_frame
from inferd.shm import cache as cachefile
from inferd.shm import wire
from inferd.shm.ring import Ring, RingError

#: Extra time a read waits beyond a request's own deadline before the client gives up on the daemon.
READ_GRACE_S = 5.0


class Prediction(NamedTuple):
    index: int
    label: str
    score: float


class NearDuplicate(NamedTuple):
    content_hash: bytes      # BLAKE3 of the stored frame (shape, dtype, bytes)
    tag: str | None          # the tag it was stored with
    similarity: float        # cosine similarity of the embeddings, -1..1


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
                 timeout: float = 30.0, connect_timeout: float = 5.0, cache: bool = True):
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self._use_cache = cache
        self._cache = None                      # read-only ResultCache, when the daemon has one
        self.preprocess_id = None               # the daemon's preprocessing, part of cache keys
        self.cache_hits = 0                     # answered here, without a round trip
        self._unreported_hits = 0
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
        m = reply["model"]
        self.model = ModelInfo(m["name"], m["digest"], tuple(m["input"]), tuple(m["labels"]), m["top_k"])
        want = 2 if reply.get("cache") else 1
        try:
            if len(fds) != want:
                raise errors.ProtocolError(f"hello reply carried {len(fds)} descriptors, expected {want}")
            self._ring = Ring.attach(fds[0])
            if want == 2 and self._use_cache:
                self._open_cache(fds[1], reply["cache"])
        except RingError as exc:
            raise errors.ProtocolError(f"the daemon's ring is unusable: {exc}") from None
        finally:
            for fd in fds:
                os.close(fd)
        self.session = reply["session"]
        self._free = list(range(self._ring.geometry.slots - 1, -1, -1))

    def _open_cache(self, fd: int, info: dict) -> None:
        """Map the daemon's result cache read-only from the descriptor it sent. A cache that cannot
        be read only costs round trips, so it is skipped rather than fatal."""
        try:
            self._cache = cachefile.ResultCache.open_reader(f"/proc/self/fd/{fd}")
        except cachefile.CacheError:
            return
        self.preprocess_id = info["preprocess"]

    def _local_answer(self, frame, top_k: int):
        """Predictions from the read-only cache for a frame, or None (a miss)."""
        key = cachefile.cache_key(self.model.digest, self.preprocess_id, cachefile.content_hash(frame))
        hit = self._cache.lookup(key)
        if hit is None or len(hit) < top_k:
            return None
        self.cache_hits += 1
        self._unreported_hits += 1
        labels = self.model.labels
        return [Prediction(i, labels[i], s) for i, s in hit[:top_k]]

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
        cache, self._cache = self._cache, None
        if cache is not None:
            cache.close()

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
            if self._ring is None:
                raise errors.DaemonUnavailable("this Client is closed")
            results: list = [None] * len(frames)
            todo = list(range(len(frames)))
            if self._cache is not None and tag is None:    # a tag must reach the daemon's store
                for i in todo:
                    results[i] = self._local_answer(frames[i], top_k)
                todo = [i for i in todo if results[i] is None]
            extra = {"top_k": top_k, "timeout_ms": timeout * 1000.0, **({"tag": tag} if tag else {})}
            for i, reply in zip(todo, self._pipeline([frames[i] for i in todo], "classify", extra, timeout)):
                labels = self.model.labels
                results[i] = [Prediction(k, labels[k], s) for k, s in reply["top"]]
            return results

    def _check(self, top_k, timeout) -> None:
        """The daemon's own range checks, made here too so a local cache hit answers a bad
        argument the same way a round trip would."""
        n = len(self.model.labels)
        if type(top_k) is not int or not 1 <= top_k <= n:
            raise errors.InvalidInput(f"top_k {top_k!r} is out of range: 1 to {n}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise errors.InvalidInput(f"timeout {timeout!r} is out of range: more than 0, at most 3600 s "
                                      "(timeout_ms)")

    def embed(self, image, *, tag: str | None = None, timeout: float | None = None):
        """The model's embedding of an image (float32, unit length), stored by the daemon under the
        image's content hash with ``tag``. InvalidInput if the model exposes no embedding."""
        return self._embedding_op(image, "embed", {"tag": tag} if tag else {}, timeout)[0]

    def near_duplicates(self, image, k: int = 5, min_similarity: float = 0.9, *,
                        timeout: float | None = None) -> list[NearDuplicate]:
        """The stored images most similar to this one (cosine of embeddings), best first, at most k
        of them with similarity >= min_similarity. The query itself is not stored."""
        return self._embedding_op(image, "near", {"k": k, "min_similarity": min_similarity}, timeout)[1]

    def _embedding_op(self, image, op: str, extra: dict, timeout):
        h, w, _ = self.model.input_shape
        frame = to_frame(image, h, w)
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            if self._ring is None:
                raise errors.DaemonUnavailable("this Client is closed")
            (reply,) = self._pipeline([frame], op, {**extra, "timeout_ms": timeout * 1000.0}, timeout)
        if op == "embed":
            return np.frombuffer(reply["embedding"], dtype=np.float32).copy(), None
        return None, [NearDuplicate(bytes.fromhex(h), tag, sim) for h, tag, sim in reply["matches"]]

    def flush_cache(self) -> int:
        """Empty the daemon's result cache (root or the daemon's user only); entries dropped."""
        return self._call({"op": "flush_cache"})["dropped"]

    def _pipeline(self, frames: list, op: str, extra: dict, timeout: float) -> list:
        """Send each frame as ``op`` with ``extra`` fields, up to the ring's slots at a time;
        the replies in frame order."""
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
                msg = {"op": op, "id": rid, "slot": slot, "shape": shape, "dtype": "uint8",
                       "nbytes": frame.nbytes, **extra}
                if self._unreported_hits:
                    msg["hits"], self._unreported_hits = self._unreported_hits, 0
                out.append(wire.encode(msg))
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
                results[index] = reply
            elif first_error is None:
                first_error = errors.from_reply(reply)
        if first_error is not None:
            raise first_error
        return results
