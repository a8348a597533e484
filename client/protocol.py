"""The client side of the protocol, with no I/O in it: what both clients decide, whatever their
way of waiting (Client: a blocking socket under a lock; AsyncClient: an asyncio transport).

    ProtocolCore            replies in ---> receive() ---> the Call that progressed (or None)
      adopt(connection)     a new session: its ring's slots all free, its model, its cache
      submit(call, now)     ---> bytes to send (frames written into free slots first)
      connection_lost()     what was in flight goes back to its calls, within their deadlines
      abandon(call)         a cancelled call: its slots stay the daemon's until their replies

It owns the request ids, the ring slots (free, or held by a request until its reply), encoding
requests, reading and checking replies (a malformed one is a ProtocolError, never an IndexError),
the local answers from the read-only result cache and the count of hits to report, the model
generations (``gen``, ``model`` in replies) and the class names. The caller owns the socket, the
waiting and the reconnecting (inferd.client.retry), so Client and AsyncClient cannot drift apart.

NOTE [ resubmission ]

  todo --submit--> in flight (on this connection's ring) --reply ok / error--> results
    ^                  |   reply shutting_down: the daemon drains; send nothing more on this
    |                  |   connection, collect what it still owes, then drop it
    +---- requeue -----+   connection lost (EOF, reset, broken pipe): nothing in flight will be
                           answered; all of it goes back, for the next connection

Slots belong to one connection's ring: a requeued frame is written again into a slot of the next
ring, whatever its slot count. Each message carries what is left of its call's deadline. A request
that got an answer (a result or an error) is never sent again. A slot is free again only when the
daemon's reply for it arrived (or the connection, and with it the ring, is gone): a call that is
cancelled leaves its requests in the table with no call, and their replies only free the slots.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import decode, errors
from .connection import Connection, ModelInfo
from .hits import HitReport
from .retry import Call
from ..shm import cache as cachefile
from ..shm import limits, wire

#: The id of notifications (``hits``): no reply is expected, and a refusal by an older daemon,
#: which answers it ``unknown_op``, is ignored. Requests count from 1.
NOTE_ID = 0
#: Model generations whose labels a client keeps, for replies computed just before a swap.
KEEP_GENERATIONS = 4
#: near_duplicates' defaults, the daemon's for a request that names none (inferd.shm.limits).
DEFAULT_MIN_SIMILARITY = limits.DEFAULT_MIN_SIMILARITY
DEFAULT_NEAR_K = limits.DEFAULT_NEAR_K


class Prediction(NamedTuple):
    index: int
    label: str
    score: float


class Predictions(list):
    """One image's top-k predictions, best first (a list of Prediction); with ``logits=True``
    also ``logits``: the model's raw output row, a float32 numpy array of one value per class
    (None when not asked for)."""

    __slots__ = ("logits",)

    def __init__(self, items=(), logits: np.ndarray | None = None):
        super().__init__(items)
        self.logits = logits


class NearDuplicate(NamedTuple):
    content_hash: bytes      # BLAKE3 of the stored frame (shape, dtype, bytes)
    tag: str | None          # the tag it was stored with
    similarity: float        # cosine similarity of the embeddings, -1..1


@dataclass(slots=True)
class InFlight:
    call: Call | None        # None once the call was abandoned: the reply only frees the slot
    index: int               # which request of the call
    slot: int | None         # its ring slot (None: a request without a frame)
    upload_slot: range | None  # the run of slots of the encoded bytes it was decoded from, if sent
    hits: int                # local hits it reported (given back if it is refused unread)


#: How often a client may ask ``info`` for the models when a request names one it does not know
#: (ProtocolCore.may_list_models): a model loaded live since the session's hello.
LIST_MODELS_S = 1.0


def _frame_bytes(model: ModelInfo) -> int:
    h, w, c = model.input_shape
    return h * w * c


class ProtocolCore:
    """The state of one client across its sessions (see the module docstring). ``hits`` is the
    client's HitReport (its timer is the client's way of waiting)."""

    def __init__(self, hits: HitReport, *, resubmit: bool):
        self.hits = hits
        self.resubmit = resubmit            # shutting_down replies go again (reconnect=True)
        self.model: ModelInfo | None = None
        self.session = None
        self.preprocess_id = None
        self.cache = None
        self.cache_hits = 0                 # answered here, without a round trip
        self.reconnects = 0                 # sessions opened after the first
        self.resubmitted = 0                # requests sent again after a restart
        self.draining = False               # the daemon answered shutting_down on this session
        self.inflight: dict[int, InFlight] = {}
        self.free: list[int] = []
        self._ring = None
        self._max_batch = 0                 # classify requests one message may carry (0: one each)
        self._ids = itertools.count(NOTE_ID + 1)
        self._models: dict[int, ModelInfo] = {}
        self._label_book: dict[str, tuple] = {}     # labels_id -> names
        self.catalog: dict[tuple, ModelInfo] = {}   # (name, version) -> model, with several (hello)
        self._listed_at = float("-inf")             # when info's list of models was last asked
        self.too_large: set[tuple] = set()          # (name, version) listed whose frames outgrow the ring

    # sessions ---------------------------------------------------------------------------------
    def adopt(self, conn: Connection) -> None:
        """A new session: every slot of its ring is free, nothing is in flight on it."""
        if self.model is not None:
            self.reconnects += 1
        self.session, self.model, self.preprocess_id = conn.session, conn.model, conn.preprocess_id
        self.cache, self._ring = conn.cache, conn.ring
        self._models = {conn.model.gen: conn.model}
        self.catalog = {(m.name, m.version): m for m in getattr(conn, "models", ())}
        self.too_large = set()
        self.free = list(range(conn.ring.geometry.slots - 1, -1, -1))
        self._max_batch = getattr(conn, "max_batch", 0)     # (a stand-in connection may lack it)
        self.inflight = {}
        self.draining = False

    def connection_lost(self) -> list[Call]:
        """The session is gone (and its ring with it): every request in flight goes back to its
        call's ``todo`` (unless lost too often); the calls touched, to be woken."""
        by_call: dict[int, tuple[Call, list[int]]] = {}
        for entry in self.inflight.values():
            if entry.call is not None:
                by_call.setdefault(id(entry.call), (entry.call, []))[1].append(entry.index)
                self.hits.add(entry.hits, arm=False)    # never counted: the next request carries them
        self.inflight, self.free, self._ring, self.cache = {}, [], None, None
        for call, indices in by_call.values():
            self.resubmitted += call.requeue(indices)
        return [call for call, _ in by_call.values()]

    def idle(self) -> bool:
        """Nothing in flight: a draining session owes nothing more and may be dropped."""
        return not self.inflight

    # requests ---------------------------------------------------------------------------------
    def submit(self, call: Call, now: float) -> bytes:
        """Encode what fits of ``call.todo`` (frames into free slots), to be sent in one write;
        b"" when nothing can go now (no free slot, a draining session, a failed call). A deadline
        that passed before a request could be (re)sent fails the call with DeadlineExceeded."""
        if self.draining or call.first_error is not None or not call.todo or self._ring is None:
            return b""
        left = call.deadline - now
        if left <= 0:
            call.todo.clear()
            call.fail(errors.DeadlineExceeded("the request's deadline passed before it could be "
                                              "resubmitted to a restarted daemon; it was not computed"))
            return b""
        if call.op == "classify" and call.frames is not None and self._max_batch and len(call.todo) > 1 \
                and not (call.uploads and any(call.uploads[i] is not None for i in call.todo)) \
                and len({call.frames[i].shape for i in call.todo}) == 1:     # their fields are shared
            return self._submit_many(call, left)
        out = []
        while call.todo and (call.frames is None or self.free):
            index = call.todo.popleft()
            rid = next(self._ids)
            msg = {"op": call.op, "id": rid, **call.extra}
            slot = upload_slot = None
            hits = 0
            if call.frames is not None:
                slot = self.free.pop()
                frame = call.frames[index]
                self._ring.slot(slot, frame.nbytes)[:] = frame.reshape(-1)
                msg.update(slot=slot, shape=list(frame.shape), dtype="uint8", nbytes=frame.nbytes,
                           timeout_ms=left * 1000.0)
                hits = self.hits.take()
                if hits:
                    msg["hits"] = hits
                upload_slot = self._upload(msg, call.uploads[index] if call.uploads else None)
            self.inflight[rid] = InFlight(call, index, slot, upload_slot, hits)
            call.inflight += 1
            out.append(wire.encode(msg))
        return b"".join(out)

    def _submit_many(self, call: Call, left: float) -> bytes:
        """What fits of ``call.todo`` as classify_many messages (docs/protocol.md): consecutive
        ids, a slot each, the frames written first; at most the daemon's ``max_batch_requests``
        a message."""
        out = []
        while call.todo and self.free:
            n = min(len(call.todo), len(self.free), self._max_batch)
            first = next(self._ids)
            rids = [first, *(next(self._ids) for _ in range(n - 1))]
            slots, frame = [], None
            hits = self.hits.take()
            for rid in rids:
                index = call.todo.popleft()
                slot = self.free.pop()
                frame = call.frames[index]
                self._ring.slot(slot, frame.nbytes)[:] = frame.reshape(-1)
                slots.append(slot)
                self.inflight[rid] = InFlight(call, index, slot, None, hits if rid == first else 0)
            call.inflight += n
            msg = {"op": wire.CLASSIFY_MANY, "id": first, "slots": slots, "shape": list(frame.shape),
                   "dtype": "uint8", "nbytes": frame.nbytes, "timeout_ms": left * 1000.0, wire.ANSWERS: 1,
                   **call.extra}
            if hits:
                msg["hits"] = hits
            out.append(wire.encode(msg))
        return b"".join(out)

    def _upload(self, msg: dict, upload: bytes | None) -> range | None:
        """Encoded bytes go in a run of consecutive free slots, at most half the ring (Runs in
        inferd.shm.ring; docs/protocol.md; NOTE [ encoded uploads ] in daemon/caching/results.py); the
        run, or None when no such run is free: the bytes are not sent, the answer is the same."""
        if upload is None or not self.free:
            return None
        g = self._ring.geometry
        m = g.run_slots(len(upload))
        run = self._free_run(m) if m <= min(g.max_run, len(self.free)) else None
        if run is None:
            return None
        if m == 1:
            self.free.pop()
        else:
            self.free[:] = [s for s in self.free if s not in run]
        self._ring.write_run(run.start, upload)
        msg.update(upload_slot=run.start, upload_nbytes=len(upload))
        return run

    def _free_run(self, m: int) -> range | None:
        """The lowest ``m`` consecutive free slots (one: the next free slot), or None."""
        if m == 1:
            return range(self.free[-1], self.free[-1] + 1)
        start = prev = -2
        for s in sorted(self.free):
            start = start if s == prev + 1 else s
            prev = s
            if s - start + 1 == m:
                return range(start, s + 1)
        return None

    def _release(self, entry: InFlight) -> None:
        if entry.slot is not None:
            self.free.append(entry.slot)
        if entry.upload_slot is not None:           # every slot of its run
            self.free.extend(entry.upload_slot)

    def receive(self, reply) -> Call | None:
        """Settle one reply: its slot is free again, its call gets the result (or the error, or
        the request back in ``todo`` when a draining daemon refused it). The call, or None for a
        notification's refusal or an abandoned request. Raises ProtocolError for a reply no
        request is waiting for: the caller closes the session."""
        if not isinstance(reply, dict):
            raise errors.ProtocolError(f"unreadable reply from the daemon: {reply!r:.200}")
        rid = reply.get("id")
        if rid == NOTE_ID:
            return None                             # an older daemon refusing a hits notification
        entry = self.inflight.pop(rid, None) if type(rid) is int else None
        if entry is None:
            waiting = sorted(self.inflight)
            expected = waiting[0] if len(waiting) == 1 else f"one of {waiting[:8]}"
            detail = f": {reply.get('code')}: {reply.get('message')}" if not reply.get("ok") else ""
            raise errors.ProtocolError(f"reply for id {rid!r}, expected {expected}{detail}")
        self._release(entry)
        call = entry.call
        if call is None:
            return None
        call.inflight -= 1
        call.backoff.reset()                        # this connection works
        if reply.get("ok"):
            try:
                call.results[entry.index] = (reply, self.model_of(reply))
            except errors.ProtocolError as exc:
                call.fail(exc)
        elif reply.get("code") == wire.E_SHUTTING_DOWN and self.resubmit:
            self.draining = True
            call.todo.append(entry.index)
            self.hits.add(entry.hits)               # refused before the daemon counted them
            self.resubmitted += 1
        else:
            call.fail(errors.from_reply(reply))
        return call

    def abandon(self, call: Call) -> None:
        """The call's task was cancelled (or gave up): send nothing more of it; its requests in
        flight keep their slots until the daemon's replies free them."""
        call.todo.clear()
        for entry in self.inflight.values():
            if entry.call is call:
                entry.call = None
        call.inflight = 0

    def hits_note(self) -> bytes:
        """A ``hits`` notification carrying what no request has carried yet, or b""."""
        n = self.hits.take()
        return wire.encode({"op": "hits", "id": NOTE_ID, "n": n}) if n else b""

    # checks and answers -----------------------------------------------------------------------
    def target(self, name: str | None, version: int | None) -> tuple[ModelInfo, dict, bool]:
        """The model a request naming ``name`` (None: the default) and ``version`` (None: the
        daemon's route) is sized and checked for, the fields that name it, and whether it may be
        answered from the local cache: only where the name's answer cannot depend on the daemon's
        route between versions (one version, or a version named), so a canary split or a
        promotion is never bypassed. UnknownModel for a name or version hello did not list."""
        if name is None and version is None:
            if not self.catalog:
                return self.model, {}, True
            name = self.model.name
            fields = {}
        else:
            name = name if name is not None else self.model.name
            fields = {"model": name, **({"version": version} if version is not None else {})}
        if not self.catalog:                        # one model: it answers to its name and "default"
            if name in (self.model.name, "default") and version in (None, self.model.version, 1):
                return self.model, fields, True
            raise errors.UnknownModel(f"no model {name!r}{'' if version is None else f' version {version}'} "
                                      f"is served; the daemon serves {self.model.name}")
        if name == "default":
            name = self.model.name
        versions = [m for (n, _), m in self.catalog.items() if n == name]
        if version is not None:
            model = self.catalog.get((name, version))
        else:
            model = next((m for m in versions if m.route == "stable"), versions[0] if versions else None)
        if model is None:
            if any(n == name and version in (None, v) for n, v in self.too_large):
                raise errors.UnknownModel(f"model {name!r} was loaded after this session began and its "
                                          f"frames are larger than the session's ring slots: connect again")
            known = ", ".join(f"{n} v{v}" for n, v in self.catalog)
            raise errors.UnknownModel(f"no model {name!r}{'' if version is None else f' version {version}'} "
                                      f"is served; the models are {known}")
        return model, fields, version is not None or len(versions) == 1

    def may_list_models(self, now: float) -> bool:
        """Whether a request naming a model this session was not told of may ask ``info`` for the
        list now (a model loaded live since hello): at most once per LIST_MODELS_S, so a caller
        that names a model nobody serves costs the daemon one ``info`` a second, not one a request."""
        if now - self._listed_at < LIST_MODELS_S:
            return False
        self._listed_at = now
        return True

    def learn_models(self, listed) -> None:
        """``info``'s ``models`` (the daemon's catalog now) in place of hello's. A model whose frames
        are larger than this session's ring slots stays out (hello sized the ring for the models
        there were): naming it says so, and a new session (reconnecting) sizes for it."""
        if not isinstance(listed, list) or not listed:
            return
        slot = self._ring.geometry.slot_bytes if self._ring is not None else 0
        models = [ModelInfo.from_wire(m) for m in listed if isinstance(m, dict)]
        self.too_large = {(m.name, m.version) for m in models if slot and _frame_bytes(m) > slot}
        fit = {(m.name, m.version): m for m in models if (m.name, m.version) not in self.too_large}
        self.catalog = fit if len(models) > 1 else {}      # one model: no list, as hello has none

    def check(self, top_k, timeout, model: ModelInfo | None = None) -> None:
        """The daemon's own range checks, made here too so a local cache hit answers a bad
        argument the same way a round trip would."""
        model = model or self.model
        n = model.classes or len(model.labels)
        if type(top_k) is not int or not 1 <= top_k <= n:
            raise errors.InvalidInput(f"top_k {top_k!r} is out of range: 1 to {n}")
        if not limits.timeout_s_ok(timeout):
            raise errors.InvalidInput(f"timeout {timeout!r} is out of range: more than 0, at most "
                                      f"{limits.MAX_TIMEOUT_S:g} s (timeout_ms)")

    def look_up(self, items: list, top_k: int, tag: str | None,
                logits: bool = False, target: tuple | None = None) -> tuple[list, list[int], dict]:
        """Local answers from the read-only cache for prepared inputs (inferd.client.decode):
        ((pairs, model) or None per input, the indices to ask the daemon, the request's fields).
        A request for the logits is never answered here: the cache holds top-k only. ``target``:
        ``self.target(...)`` of a request that names a model."""
        model, fields, local = target or (self.model, {}, True)
        answers: list = [None] * len(items)
        extra = {"top_k": top_k, **({"tag": tag} if tag else {}), **({"logits": True} if logits else {}),
                 **fields}
        if self.cache is None or tag is not None or logits or not local:    # a tag must reach the daemon's store
            return answers, list(range(len(items))), extra
        for i, item in enumerate(items):
            answers[i] = self._local_answer(item, top_k, model)
        extra["looked"] = True          # misses here: NOTE [ unhashed misses ] in daemon/caching/results.py
        return answers, [i for i, a in enumerate(answers) if a is None], extra

    def _local_answer(self, item: decode.Prepared, top_k: int, model: ModelInfo | None = None):
        """(pairs, model) from the read-only cache, or None (a miss). Encoded bytes are looked up
        by their hash first, before they are decoded (NOTE [ encoded uploads ] in
        daemon/caching/results.py); on a miss there, by the decoded frame's content hash."""
        model, hit = model or self.model, None
        preprocess = model.preprocess or self.preprocess_id
        if item.encoded_hash is not None and model.digest == self.model.digest:   # verified: the default model only
            h, w, _ = model.input_shape
            hit = self.cache.lookup(cachefile.encoded_key(model.digest, preprocess,
                                                          decode.decoder_id(h, w), item.encoded_hash))
        if hit is None or len(hit) < top_k:
            key = cachefile.cache_key(model.digest, preprocess, cachefile.content_hash(item.frame()))
            hit = self.cache.lookup(key)
        if hit is None or len(hit) < top_k:
            return None
        self.cache_hits += 1
        self.hits.add(1)
        return hit[:top_k], model

    def needs_decoding(self, item: decode.Prepared, top_k: int, model: ModelInfo | None = None) -> bool:
        """Encoded bytes the cache cannot answer by their hash (so ``look_up`` would decode them):
        an AsyncClient decodes these off its event loop first."""
        if item.encoded is None:
            return False
        if self.cache is None or (model is not None and model.digest != self.model.digest):
            return True
        h, w, _ = self.model.input_shape
        hit = self.cache.lookup(cachefile.encoded_key(self.model.digest, self.preprocess_id,
                                                      decode.decoder_id(h, w), item.encoded_hash))
        return hit is None or len(hit) < top_k

    def uploads(self, items: list) -> list | None:
        """The encoded bytes to send beside each frame (the daemon then keys the answer by them
        too), or None without a cache to fill."""
        return [item.encoded for item in items] if self.cache is not None else None

    @staticmethod
    def top(reply: dict, model: ModelInfo) -> list:
        """A classify reply's (index, score) pairs, checked against the model's classes."""
        n = model.classes or len(model.labels)
        try:
            pairs = [(int(i), float(s)) for i, s in reply["top"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.ProtocolError(f"unreadable classify reply from the daemon: {exc!r}") from None
        if any(not 0 <= i < n for i, _ in pairs):
            raise errors.ProtocolError(f"classify reply names a class outside 0..{n - 1}: {pairs}")
        return pairs

    @staticmethod
    def logits(reply: dict, model: ModelInfo) -> np.ndarray:
        """A classify reply's raw output row (float32, one value per class of ``model``)."""
        data = reply.get("logits")
        n = model.classes or len(model.labels)
        if not isinstance(data, bytes) or len(data) != 4 * n:
            raise errors.ProtocolError(f"classify reply carries no float32 logits of {n} classes")
        return np.frombuffer(data, dtype=np.float32).copy()

    @staticmethod
    def predictions(pairs: list, names: tuple, logits: np.ndarray | None = None) -> Predictions:
        return Predictions([Prediction(i, names[i] if i < len(names) else str(i), s) for i, s in pairs], logits)

    def answer(self, reply: dict, model: ModelInfo, logits: bool) -> tuple:
        """(pairs, model, logits row or None) of a classify reply."""
        return self.top(reply, model), model, self.logits(reply, model) if logits else None

    @staticmethod
    def embedding(reply: dict) -> np.ndarray:
        data = reply.get("embedding")
        if not isinstance(data, bytes) or len(data) % 4:
            raise errors.ProtocolError("unreadable embed reply from the daemon: no float32 embedding")
        return np.frombuffer(data, dtype=np.float32).copy()

    @staticmethod
    def matches(reply: dict) -> list[NearDuplicate]:
        try:
            return [NearDuplicate(bytes.fromhex(h), tag, float(sim)) for h, tag, sim in reply["matches"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.ProtocolError(f"unreadable near reply from the daemon: {exc!r}") from None

    # model generations and names --------------------------------------------------------------
    def model_of(self, reply: dict) -> ModelInfo:
        """The model that computed a reply: a new generation it announces becomes ``model``; with
        several models, the one its ``served`` [name, version] names."""
        served = reply.get("served")
        if type(served) is list and len(served) == 2 and not isinstance(reply.get("model"), dict):
            fresh = reply.get("served_model")
            if isinstance(fresh, dict):             # a model (or generation) hello did not tell of
                info = ModelInfo.from_wire(fresh)
                if not self.catalog:                # one model at hello: the default joins the catalog
                    self.catalog[self.model.name, self.model.version or 1] = self.model
                self.catalog[info.name, info.version] = info
                return info
            model = self.catalog.get(tuple(served))
            if model is not None:
                gen = reply.get("gen")
                if type(gen) is int and gen != model.gen:      # the default model's other generation
                    other = self._models.get(gen)
                    if other is not None and (other.name, other.version) == (model.name, model.version):
                        return other
                return model
        described = reply.get("model")
        if isinstance(described, dict):
            info = ModelInfo.from_wire(described)
            self._models[info.gen] = info
            if (info.name, info.version) in self.catalog and info.gen >= self.catalog[info.name, info.version].gen:
                self.catalog[info.name, info.version] = info
            if info.gen >= self.model.gen:
                self.model = info
            while len(self._models) > KEEP_GENERATIONS:
                del self._models[min(self._models)]
            return info
        gen = reply.get("gen")
        return self._models.get(gen, self.model) if type(gen) is int else self.model

    def names(self, model: ModelInfo) -> tuple | None:
        """``model``'s class names, or None: ask the daemon (a ``labels`` request) and pass the
        reply to ``learn_labels``. Hello carries only their number and ``labels_id``."""
        if model.labels:
            return model.labels
        return self._label_book.get(model.labels_id)

    def learn_labels(self, reply: dict, model: ModelInfo) -> tuple:
        """Keep a ``labels`` reply's names; ``model``'s names. A generation whose names the daemon
        no longer serves (swapped to other labels before they were asked for) gets its classes
        numbered rather than wrongly named."""
        labels = reply.get("labels")
        if not isinstance(labels, (list, tuple)):
            raise errors.ProtocolError("unreadable labels reply from the daemon: no list of labels")
        self._label_book[str(reply.get("labels_id"))] = tuple(map(str, labels))
        while len(self._label_book) > KEEP_GENERATIONS:
            del self._label_book[next(iter(self._label_book))]
        return self._label_book.get(model.labels_id) or tuple(str(i) for i in range(model.classes))
