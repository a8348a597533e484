"""The event loop's side of every request: admission, dispatch, replies, re-dispatch.

Runs on the loop thread only; batching threads talk to it through ``on_batch_done`` (scheduled with
call_soon_threadsafe, one call per batch). See NOTE [ request path ] in daemon/pipeline/collector.py.

Exactly one reply per admitted request. A request carries ``attempt``, bumped each time it is
re-dispatched; a batching thread notes the attempt of each request when it takes it, and a result
whose noted attempt is not the request's current one is stale (its device was given up on and the
request already went elsewhere) and is dropped. ``done`` marks a request answered. Together they
mean none is lost when a device fails, and none is answered twice when a stuck device wakes up.

Refuse first, then work: everything that can refuse a request is decided before the daemon copies
or hashes its frame, so a flood of refused requests costs the loop a few dict lookups each. In
order: not draining (else ``shutting_down``); its fields and slot (``check_classify``: ring bounds,
spec, the slot not already in flight, which bounds a session by its ring); its uid holds fewer than
``server.max_inflight_per_uid`` requests in flight (else ``overloaded``); a healthy device exists
(else ``no_healthy_device``); the chosen device holds fewer than ``batching.queue_limit`` requests,
or the uid holds less than its fair share of them (NOTE [ batch planning ] in daemon/dispatch/queues.py);
the request is expected to finish before its deadline at its place in the device's (fair) order,
given the device's measured latency (else ``overloaded``, with ``retry_after_ms`` = how late it
would be). Only then is the frame copied and hashed; a cache hit, a coalesced frame or a stored
embedding found by the hash is still answered at once (admission reserved nothing, so nothing is
given back). A request that passes may still find its deadline gone by the time a batch takes it:
it is answered ``deadline_exceeded`` without being computed.
"""
from __future__ import annotations

import logging

import numpy as np

from . import fairness
from . import policy as policies
from ..pipeline.collector import BatchResult, Request
from ..caching.results import Memory
from .health import HealthMonitor
from ..ops.logs import RateLimitedLog
from ..front.session import Rejected, check_classify
from ..ops.stats import Stats
from ...shm import wire

from ...client import decode as decoding

log = logging.getLogger("inferd.scheduler")
_late = RateLimitedLog(log)         # one per batch of a slow device: one line per 10 s

MAX_TAG_BYTES = 64
MAX_NEAR_K = 1000
# The min_similarity of a near request that names none (the client's default is the same): chosen
# from the similarities of changed copies against different images with the built-in model
# (docs/operations.md, Near-duplicates; bench/cache/near.py)
DEFAULT_MIN_SIMILARITY = 0.95


def _flow_of(request: Request) -> tuple:
    """A request's place in the fair share: (uid, session); a canary's is (None, None)."""
    session = request.session
    return (session.peer[1], session) if session is not None else (None, None)


def _tag(value):
    """A client's tag for its embeddings: None or a short string. Raises Rejected."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value.encode()) > MAX_TAG_BYTES:
        raise Rejected(wire.E_INVALID_INPUT, f"tag must be a string of at most {MAX_TAG_BYTES} bytes")
    return value


def _upload_of(msg: dict, ring, slot: int, inflight: dict, op: str) -> tuple[range, int] | None:
    """(run of slots, upload_nbytes) of a classify that carries its encoded bytes, None when it
    carries none. The bytes span ``[upload_slot, upload_slot + m)``, ``m = ceil(nbytes / slot
    capacity)`` (Runs in inferd.shm.ring). Every field checked against the ring before anything is
    read: O(m), m at most half the ring (NOTE [ encoded uploads ] in daemon/caching/results.py). Raises
    Rejected."""
    if wire.UPLOAD_SLOT not in msg and wire.UPLOAD_NBYTES not in msg:
        return None
    first, nbytes = msg.get(wire.UPLOAD_SLOT), msg.get(wire.UPLOAD_NBYTES)
    if type(first) is not int or type(nbytes) is not int:
        raise Rejected(wire.E_INVALID_INPUT, f"{wire.UPLOAD_SLOT} and {wire.UPLOAD_NBYTES} must both be "
                       f"integers, got {first!r} and {nbytes!r}")
    if op != "classify":
        raise Rejected(wire.E_INVALID_INPUT, f"{wire.UPLOAD_SLOT} is for classify only, not {op}")
    g = ring.geometry
    if not 0 < nbytes <= decoding.MAX_ENCODED_BYTES:
        raise Rejected(wire.E_INVALID_INPUT, f"{wire.UPLOAD_NBYTES} {nbytes} is out of range: 1 to "
                       f"{decoding.MAX_ENCODED_BYTES} (inferd.client.decode.MAX_ENCODED_BYTES)")
    m = g.run_slots(nbytes)
    if m > g.max_run:
        raise Rejected(wire.E_INVALID_INPUT, f"{wire.UPLOAD_NBYTES} {nbytes} spans {m} slots of "
                       f"{g.slot_bytes} bytes; an upload may span at most {g.max_run}, half this "
                       f"ring's {g.slots}, so one request never holds the whole ring: send no upload, "
                       "or ask hello for more ring_slots")
    if not 0 <= first <= g.slots - m:
        raise Rejected(wire.E_INVALID_INPUT, f"{wire.UPLOAD_SLOT} {first} is out of range: its {m} "
                       f"slots must lie within slots 0 to {g.slots - 1}, without wrapping")
    run = range(first, first + m)
    if slot in run:
        raise Rejected(wire.E_INVALID_INPUT, f"{wire.UPLOAD_SLOT} {first} and its {m} slots include "
                       f"the frame's slot {slot}; the bytes need slots of their own")
    for s in run:
        if s in inflight:
            raise Rejected(wire.E_SLOT_BUSY, f"{wire.UPLOAD_SLOT} {first} and its {m} slots include "
                           f"slot {s}, which already carries request {inflight[s]}; a slot may be "
                           "reused only after its reply")
    return run, nbytes


def _near_args(msg: dict) -> tuple[int, float]:
    """(k, min_similarity) of a near request. Raises Rejected."""
    k, sim = msg.get("k", 5), msg.get("min_similarity", DEFAULT_MIN_SIMILARITY)
    if type(k) is not int or not 1 <= k <= MAX_NEAR_K:
        raise Rejected(wire.E_INVALID_INPUT, f"k {k!r} is out of range: 1 to {MAX_NEAR_K}")
    if isinstance(sim, bool) or not isinstance(sim, (int, float)) or not -1.0 <= sim <= 1.0:
        raise Rejected(wire.E_INVALID_INPUT, f"min_similarity {sim!r} is out of range: -1 to 1")
    return k, float(sim)


class Scheduler:
    def __init__(self, cfg, spec, devices: list, clock, digest: str = ""):
        self.cfg = cfg
        self.spec = spec
        self.devices = devices
        self.policy = policies.make(cfg.dispatch.policy)
        self.stats = Stats(cfg, devices, clock)       # NOTE [ stats ] in daemon/ops/stats.py
        self.counters = self.stats.counters           # raw counters health and caching bump too
        self.outstanding = 0
        self.draining = False
        self.on_idle = None                 # called when draining and nothing is outstanding
        self._clock = clock
        self.health = HealthMonitor(cfg.health, devices, on_out=self._device_out,
                                    send_canary=self._send_canary, counters=self.counters, clock=clock,
                                    stats=self.stats)
        self.memory = Memory(cfg, spec, digest, self.counters)
        self.model = None                   # the LoadedModel serving now (set by the server)
        if cfg.dispatch.fair_share:         # NOTE [ batch planning ] in daemon/dispatch/queues.py
            quantum = fairness.quanta(cfg.dispatch.weights)
            for dev in devices:
                dev.queue.use(fairness.DeficitRoundRobin(_flow_of, quantum))

    @property
    def gen(self) -> int:
        return self.model.gen if self.model is not None else 0

    def switch_model(self, model) -> None:
        """Admit and key new requests for ``model`` (a reload switched to it, daemon/ops/reload.py):
        its spec for checks, its digest for cache keys. Empties the result cache, so a client
        still keying by the old digest misses and learns the new model from its next reply."""
        self.model = model
        self.spec = model.spec
        self.memory.switch_model(model)

    # admission --------------------------------------------------------------------------------
    def submit(self, session, rid: int, msg: dict, op: str = "classify") -> None:
        """Check and admit one classify / embed / near request. Raises Rejected."""
        try:
            self._submit(session, rid, msg, op)
        except Rejected as exc:             # every refusal is an outcome, named by its code
            self.stats.outcome(exc.code)
            raise

    def _submit(self, session, rid: int, msg: dict, op: str) -> None:
        if self.draining:
            raise Rejected(wire.E_SHUTTING_DOWN, "the daemon is shutting down; reconnect to its successor")
        slot, top_k, timeout = check_classify(msg, session.ring, self.spec, session.inflight,
                                              self.cfg.batching.default_timeout_ms)
        memory = self.memory
        memory.client_hits(msg.get("hits"))
        if op != "classify" and memory.store is None:
            raise Rejected(wire.E_INVALID_INPUT, f"{op} needs embeddings: this model exposes none, or "
                           "embeddings.enabled is false")
        tag = _tag(msg.get("tag"))
        args = _near_args(msg) if op == "near" else None
        upload = _upload_of(msg, session.ring, slot, session.inflight, op)
        uid = session.peer[1]
        now = self._clock()
        device = self._admit(uid, now, now + timeout)     # refused here: nothing copied or hashed
        frame = content = key = None
        if memory.hashing:                  # NOTE [ unhashed misses ] in daemon/caching/results.py
            looked = msg.get("looked") if upload is None else None     # an upload is verified on the copy
            frame, content, key = memory.admission_copy(session.ring, slot, looked, op, tag)
            if key is not None and self._answered_at_once(session, rid, slot, top_k, op, key, content, tag):
                return
        verifying = memory.upload(session.ring, *upload, frame) if upload is not None else None
        request = Request(session, session.ring, rid, slot, top_k, now, now + timeout, frame=frame,
                          key=key or b"", content=content or b"", op=op, tag=tag, args=args, gen=self.gen)
        session.inflight[slot] = rid
        if upload is not None:              # every slot of the run held until the reply, like the frame's
            for s in upload[0]:
                session.inflight[s] = rid
            request.upload = (upload[0], verifying)
        self.stats.admitted(uid)
        if key and op == "classify":
            session.pending[key] = request
        self.outstanding += 1
        session.think.submitted(session, now, device.queue)    # NOTE [ batch planning ]
        if memory.l2 is not None and key and op == "classify":      # NOTE [ fleet cache ] in daemon/caching/fleet/cache.py
            request.device = device
            device.outstanding += 1         # reserved while L2 is asked (at most l2.budget_ms)
            if memory.l2.lookup(request, self._after_l2):
                return
            device.outstanding -= 1
        self._assign(request, device)

    def _after_l2(self, r: Request, top) -> None:
        """The fleet cache's verdict on a parked request: ``top`` (a hit) answers it and goes to the
        local cache; None (a miss, an error, the budget passed) sends it to its reserved device, or
        elsewhere if that one left rotation meanwhile."""
        if r.done:
            return
        if top is not None and r.gen == self.gen:
            self.memory.adopt(r.key, top)
            self.memory.retag(r.content, r.tag, r.session.peer[1])
            self.stats.outcome("cached_l2")   # its coalesced followers were counted at admission
            replies: dict = {}
            self._answer(replies, r, lambda rid, k: {"id": rid, "ok": True, "cached": True,
                                                     "top": [list(p) for p in top[:k]]}, r.gen)
            r.session.write(b"".join(replies[r.session]))
        elif r.device.healthy:
            r.device.queue.put(r)
        else:
            self._redispatch([r], r.device, f"device {r.device.label} left rotation")

    def _answered_at_once(self, session, rid, slot, top_k, op, key, content, tag) -> bool:
        """A cache hit, a frame already in flight (coalesced), or an embedding already stored."""
        memory = self.memory
        if op == "classify" and memory.cache is not None:
            hit = memory.lookup(key, top_k)
            if hit is not None:
                memory.retag(content, tag, session.peer[1])
                self.stats.outcome("cached")
                session.send(self._stamp(session, {"id": rid, "ok": True, "top": [list(p) for p in hit[:top_k]],
                                                   "cached": True}, self.gen))
                return True
            leader = session.pending.get(key)
            if leader is not None and not leader.done:
                leader.followers.append((rid, slot, top_k))
                session.inflight[slot] = rid
                self.counters["coalesced"] += 1
                self.stats.admitted(session.peer[1])      # its slot is held until the leader's reply
                self.stats.outcome("coalesced")
                return True
        if op == "embed":                   # (near always runs: its search belongs off the loop)
            vector = memory.store.get(content, uid=session.peer[1])   # its own row (unless shared)
            if vector is not None:
                memory.retag(content, tag, session.peer[1])     # a new tag wins, as classify's does
                self.stats.outcome("cached")
                session.send(self._stamp(session, self._embedding_reply(rid, op, vector, content, None), self.gen))
                return True
        return False

    def _admit(self, uid: int, now: float, deadline: float):
        """The device a request of ``uid`` due at ``deadline`` goes to, or Rejected. Reserves
        nothing: O(1) but for the device choice (O(devices))."""
        server, max_batch = self.cfg.server, self.cfg.batching.max_batch
        held = self.stats.uids.get(uid)
        if held is not None and held.in_flight >= server.max_inflight_per_uid:
            self.counters["overloaded"] += 1
            raise Rejected(wire.E_OVERLOADED, f"not admitted: uid {uid} has {held.in_flight} requests in "
                           f"flight (server.max_inflight_per_uid {server.max_inflight_per_uid}); wait "
                           "for replies, or ask the operator to raise the limit",
                           retry_after_ms=self._batch_ms())
        device = self.policy.choose(self.devices, now, max_batch)
        if device is None:
            self.counters["no_healthy_device"] += 1
            raise Rejected(wire.E_NO_HEALTHY_DEVICE, "no device is in rotation; every device failed "
                           "its health checks (inferctl info shows each one's state)")
        limit, queue = self.cfg.batching.queue_limit, device.queue
        # a uid under its share of a full queue still gets in, up to twice the limit in all
        # (NOTE [ batch planning ]): a flood fills the queue, never shuts others out of it
        if device.outstanding >= limit and (device.outstanding >= 2 * limit or queue.over_share(uid, limit)):
            self.counters["overloaded"] += 1
            raise Rejected(wire.E_OVERLOADED, f"not admitted: {device.outstanding} requests are queued on "
                           f"{device.label} (batching.queue_limit {limit}), uid {uid}'s share of them "
                           "taken; retry later", retry_after_ms=self._batch_ms())
        finish = now + policies.finish_in(device, now, max_batch, queue.ahead(uid) + 1)
        if finish > deadline:
            self.counters["overloaded"] += 1
            late_ms = (finish - deadline) * 1000.0
            raise Rejected(wire.E_OVERLOADED, f"not admitted: it would finish {late_ms:.1f} ms after its "
                           "deadline; retry later", retry_after_ms=round(max(late_ms, 1.0), 1))
        return device

    def _batch_ms(self) -> float:
        """A retry hint when a queue or quota is full: one full batch on the fastest device."""
        batch = self.cfg.batching.max_batch
        seconds = min((d.profile.latency(batch) for d in self.devices if d.healthy), default=0.0)
        return round(max(seconds * 1000.0, 1.0), 1)

    def _assign(self, request: Request, device) -> None:
        request.device = device
        device.outstanding += 1
        device.queue.put(request)

    # results ----------------------------------------------------------------------------------
    def on_batch_done(self, result: BatchResult) -> None:
        """Every request of one batch comes back here: reply, re-dispatch, or drop if stale."""
        dev = result.device
        taken = dict(zip(map(id, result.requests), result.attempts))
        # a canary has no session: it only informs the health monitor below
        live = lambda r: r.session is not None and not r.done and taken.get(id(r)) == r.attempt
        stale = sum(not live(r) for r in result.requests if r.session is not None)
        if stale:
            self.counters["stale_results"] += stale
            _late.info("%d late results from %s dropped: their requests went elsewhere", stale, dev.label)
        replies: dict = {}
        answered = []                       # live requests answered ok: their latency is kept
        vectors = result.embeddings
        for i, (r, top) in enumerate(zip(result.done, result.top)):
            if live(r):
                dev.frames += 1
                answered.append(r)
                vector = vectors[i] if vectors is not None else None
                if r.op != "near" and result.gen == self.gen:   # a query is searched, never stored;
                    # an answer of the model before a swap is never stored (NOTE [ model swap ])
                    self.memory.remember(self._key_for(r) if r.op == "classify" else b"", r.content, top,
                                         vector, r.tag, r.session.peer[1])
                if r.op == "classify":
                    if r.upload is not None and r.upload[1] is not None and result.gen == self.gen:
                        r.upload[1].answered(top)
                    self._answer(replies, r, lambda rid, k, top=top: {"id": rid, "ok": True, "top": top[:k]},
                                 result.gen)
                else:
                    message = self._embedding_reply(r.id, r.op, vector, r.content, result.matches.get(i))
                    if not message["ok"]:
                        answered.pop()
                        self.stats.outcome("failed")
                    self._answer(replies, r, lambda rid, k, m=message: m, result.gen)
        for r in result.expired:
            if live(r):
                self.stats.outcome(wire.E_DEADLINE_EXCEEDED)
                self._answer(replies, r, lambda rid, k: wire.error(
                    rid, wire.E_DEADLINE_EXCEEDED, "the deadline passed while queued; not computed"))
        for r in result.dropped:
            if live(r):
                self.stats.outcome("dropped")
                self._finish(r)
        for r, why in result.unreadable:   # its client shrank its (posix) ring: its error alone
            if live(r):
                self.stats.outcome(wire.E_INVALID_INPUT)
                self._answer(replies, r, lambda rid, k, why=why: wire.error(rid, wire.E_INVALID_INPUT, why))
        if result.canary:
            ok = not result.failed
            (self.health.batch_ok if ok else self.health.batch_failed)(dev, True, *(() if ok else (result.error,)))
        elif result.failed:
            self.counters["batches_failed"] += 1
            self.health.batch_failed(dev, False, result.error)
            self._redispatch([r for r in result.failed if live(r)], dev, result.error)
        else:
            self.health.batch_ok(dev, False)
        now = self._clock()
        horizon = self.cfg.batching.max_delay_ms / 1000.0
        for session, chunks in replies.items():
            session.write(b"".join(chunks))
            session.think.replied(session, now, len(chunks), dev.queue, horizon)
        self.stats.batch(result, answered, now)
        if len(dev.queue):
            # the planner learns who is coming back only now (NOTE [ batch planning ]): if it waits
            # on a device it thought busy, the device is free and the expectations are in
            dev.queue.poke()
        c = self.counters
        c["batches"] += bool(result.done)
        c["frames"] += len(result.done)
        c["model_seconds"] += result.seconds
        c["expired"] += len(result.expired)
        c["dropped"] += len(result.dropped)

    def _answer(self, replies: dict, r: Request, make, gen: int = 0) -> None:
        """Queue ``make(id, top_k)`` for the request and each identical frame coalesced with it;
        an answer computed by model generation ``gen`` says so (``_stamp``)."""
        chunks = replies.setdefault(r.session, [])
        for rid, top_k in ((r.id, r.top_k), *((rid, top_k) for rid, _, top_k in r.followers)):
            message = make(rid, top_k)
            chunks.append(wire.encode(self._stamp(r.session, message, gen) if gen else message))
        self._finish(r)

    def _stamp(self, session, message: dict, gen: int) -> dict:
        """Mark an answer with the model generation that computed it; the first answer of a newer
        generation than the session knows also carries that model's description."""
        if message.get("ok"):
            message["gen"] = gen
            if gen > session.told_gen and gen == self.gen:
                message["model"] = self.model.describe()
                session.told_gen = gen
        return message

    def _key_for(self, r: Request) -> bytes:
        """The cache key of a request's answer under the current model: its admission key, or a
        new one when it was admitted (and keyed) under the model before a swap."""
        if r.gen == self.gen or not r.key:
            return r.key
        return self.memory.key(r.content)

    def _embedding_reply(self, rid: int, op: str, vector, content: bytes, matches) -> dict:
        """The reply to embed (the vector) or near (``matches``, searched by the batching thread)."""
        if vector is None or (op == "near" and matches is None):
            return wire.error(rid, wire.E_INTERNAL, "the model produced no embedding for this frame")
        if op == "embed":
            return {"id": rid, "ok": True, "embedding": np.asarray(vector, np.float32).tobytes(),
                    "content_hash": content.hex()}
        return {"id": rid, "ok": True, "content_hash": content.hex(),
                "matches": [[h.hex(), tag, float(sim)] for h, tag, sim in matches]}

    def _finish(self, r: Request) -> None:
        r.done = True
        session = r.session
        session.inflight.pop(r.slot, None)
        if r.upload is not None:            # its run, on every path to here (answer, error, expiry, drop)
            for s in r.upload[0]:
                session.inflight.pop(s, None)
        for _, slot, _ in r.followers:      # coalesced frames hold slots too, even when r is dropped
            session.inflight.pop(slot, None)
        self.stats.finished(session.peer[1], 1 + len(r.followers))
        if r.key and session.pending.get(r.key) is r:
            del session.pending[r.key]
        r.device.outstanding -= 1
        self.outstanding -= 1
        if session.closed and not session.inflight:
            session.release_ring()
        if self.outstanding == 0 and self.draining and self.on_idle is not None:
            self.on_idle()

    # failures ---------------------------------------------------------------------------------
    def _redispatch(self, requests: list, failed_dev, why: str) -> None:
        """Move requests off ``failed_dev``: each goes to another healthy device, or gets an error
        when none is left or it has failed on health.max_attempts devices already."""
        now = self._clock()
        max_batch = self.cfg.batching.max_batch
        for r in requests:
            r.attempt += 1
            target = self.policy.choose(self.devices, now, max_batch, exclude=failed_dev)
            if r.attempt >= self.cfg.health.max_attempts or target is None:
                code = wire.E_INTERNAL if target is not None else wire.E_NO_HEALTHY_DEVICE
                self.counters["failed"] += 1
                self.stats.outcome("failed")
                replies: dict = {}
                self._answer(replies, r, lambda rid, k: wire.error(
                    rid, code, f"not computed: {why} (tried on {r.attempt} device(s))"))
                r.session.write(b"".join(replies[r.session]))
                continue
            self.counters["redispatched"] += 1
            r.device.outstanding -= 1
            self._assign(r, target)

    def _device_out(self, dev, reason: str, stuck: bool) -> None:
        queued = dev.queue.drain()
        if any(r.session is None for r in queued):
            dev.canary_pending = False                 # a queued canary dies with the queue
        moved = [r for r in queued if r.session is not None and not r.done]
        # a batch staged behind the running one has not started: it goes too (if it starts
        # meanwhile, the bumped attempts make its results stale)
        moved += [r for r, attempt in dev.staged if r.session is not None and not r.done and r.attempt == attempt]
        if stuck:
            moved += [r for r, attempt in dev.running
                      if r.session is not None and not r.done and r.attempt == attempt]
        if moved:
            log.warning("re-dispatching %d requests from %s", len(moved), dev.label)
        self._redispatch(moved, dev, f"device {dev.label} left rotation: {reason}")

    def _send_canary(self, dev) -> None:
        now = self._clock()
        dev.queue.put(Request(None, None, -1, -1, 1, now, now + 3600.0, dev))

    def describe(self) -> dict:
        """Devices, cache and counters for the client socket's ``info`` (``self.stats`` is the rest)."""
        c = self.counters
        return {"outstanding": self.outstanding, "policy": self.policy.name,
                "requests": dict(self.stats.outcomes),
                "devices": [d.describe() for d in self.devices], "cache": self.memory.stats(),
                "counters": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in c.items()}}
