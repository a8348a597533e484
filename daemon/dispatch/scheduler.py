"""The event loop's side of every request: admission, dispatch, replies, re-dispatch.

Runs on the loop thread only; device threads talk to it through ``on_batch_done`` (scheduled with
call_soon_threadsafe, one call per batch). See NOTE [ request path ] in daemon/pipeline/collector.py.

Exactly one reply per admitted request. A request carries ``attempt``, bumped each time it is
re-dispatched; a device thread notes the attempt of each request when it takes it, and a result
whose noted attempt is not the request's current one is stale (its device was given up on and the
request already went elsewhere) and is dropped. ``done`` marks a request answered. Together they
mean none is lost when a device fails, and none is answered twice when a stuck device wakes up.

Refuse first, then work: everything that can refuse a request is decided before the daemon copies
or hashes its frame, so a flood of refused requests costs the loop a few dict lookups each. In
order: not draining (else ``shutting_down``); its fields and slots (daemon/front/admission.py:
ring bounds, spec, the slot not already in flight, which bounds a session by its ring; the tag, a
near request's k and similarity, an upload's run of slots); its uid holds fewer than
``server.max_inflight_per_uid`` requests in flight (else ``overloaded``); a healthy device exists
(else ``no_healthy_device``); the chosen device holds fewer than ``batching.queue_limit`` requests,
or the uid holds less than its fair share of them (NOTE [ batch planning ] in daemon/dispatch/queues.py);
the request is expected to finish before its deadline at its place in the device's (fair) order,
given the device's measured latency (else ``overloaded``, with ``retry_after_ms`` = how late it
would be). Admission itself copies and hashes nothing (NOTE [ request path ] in
daemon/pipeline/collector.py): the device's collector stages the frame, hashes its row, and settles
a cache hit or a coalesced frame before the model runs; those come back here and are answered at
once. Only with the fleet cache on, and for embed / near, is the frame still copied and hashed
here, once admitted; a hit, a coalesced frame or a stored embedding found then is answered at once
(admission reserved nothing, so nothing is given back). A request that passes may still find its
deadline gone by the time a batch takes it: it is answered ``deadline_exceeded`` without being
computed.
"""
from __future__ import annotations

import logging
import struct

import numpy as np

from . import fairness
from . import policy as policies
from .formation import horizon as expect_horizon
from ..pipeline.records import BatchResult, Outcome, Request
from ..caching.results import LOOP, STAGED, UNHASHED, Caches
from .device import DISABLED
from .health import HealthMonitor
from ..ops.logs import RateLimitedLog
from ..front.admission import (Rejected, check_classify, check_frame, check_logits, check_near, check_slot,
                               check_tag, check_upload)
from ..front.principal import weights as principal_weights
from ..models.catalog import Catalog, UnknownModel
from ..ops.stats import Stats
from ...shm import wire

# Why one module of ~400 lines: admission, dispatch, replies and re-dispatch all act on the same
# records (a request's attempt, done, device reservation, session slots) and counters, and each
# reply path must end in _finish; split across modules, that invariant would have no one place to
# be read. What does not touch them is elsewhere: field checks (daemon/front/admission.py), device
# choice (policy.py), fair order and planning (fairness.py, queues.py), caches (caching/results.py).

# NOTE [ group admission ]
#
# A classify_many of K frames costs the loop O(1) Python a message plus a small O(K) loop, not K
# times the per-request machinery: its shared fields are checked once (submit_many); then, where
# every one of its requests would pass admission one by one, they are admitted as a group:
#
#   check_slot per slot (bounds, busy; a slot named twice in the message: one at a time instead)
#   the uid's quota:        in_flight + K <= server.max_inflight_per_uid
#   one device choice:      policy.choose once (the group goes to one device, in one lane)
#   the queue's bound:      outstanding + K <= batching.queue_limit (so no share check can refuse)
#   the deadline of the LAST: finish_in(ahead(uid, extra=K-1) + 1): it has the most ahead of it,
#                           so if it finishes in time every one before it does
#   -> K Requests (one arrival time, one deadline), counts bumped by K, ThinkTime once,
#      DeviceQueue.put_many: one lock, one wake, the same fair order, gap and expectations
#
# Where any of those could refuse one of them (the quota or the queue near full, a deadline too
# tight for the last, no device, the fleet cache hashing on the loop), and on a pool of devices
# (one device choice would put all of one call's frames on one device), the message goes one request
# at a time through ``_enter`` exactly as before, so a group is split where the uid's share, its
# quota or a deadline says so, with each refused request's own error. tests/unit/test_group_admission.py
# checks that both ways end in the same queue, refusals and counts.
#
# The way back is per batch too: on_batch_done sorts a batch's entries by outcome in one pass
# (BatchResult.settle), builds a plain reply (one model, no followers, no logits, no upload, a
# generation the session knows) as one dict with no stamping call, gives the counts of a run of
# alike requests back at once (``_finish_many``), and the latency histograms take one observation
# per run of requests that arrived together (Stats.batch), with its count: p50 and p99 stay per
# request.
log = logging.getLogger("inferd.scheduler")
_late = RateLimitedLog(log)         # one per batch of a slow device: one line per 10 s


def _flow_of(request: Request) -> tuple:
    """A request's place in the fair share: (uid, session); a canary's is (None, None)."""
    session = request.session
    return (session.peer[1], session) if session is not None else (None, None)


class Scheduler:
    """Admission, dispatch and replies of every request (the module docstring). ``catalog``
    (daemon/models/catalog.py) is what is served: each request resolves to one of its Served at
    admission and keeps it (its checks, keys, lane, runner, stamp). ``model`` is the LoadedModel
    of the default (the first) model, as a one-model daemon's; a reload hands over the next one
    with ``switch_model``."""

    def __init__(self, cfg, catalog, devices: list, clock):
        self.cfg = cfg
        if not isinstance(catalog, Catalog):   # a LoadedModel alone: a one-model catalog
            catalog = Catalog.of([(None, catalog)])
        self.catalog = catalog
        self.several = not catalog.single   # replies say which model answered (``_stamp``)
        # the default model at start: the Served whose keys, store and generation the caches hold,
        # hello's ``model`` (what a client that names none is told), and a reload's target
        self.first = catalog.default_served
        self.model = self.first.model       # the LoadedModel serving now (of a one-model daemon)
        self.spec = self.model.spec
        self.devices = devices
        self.policy = policies.make(cfg.dispatch.policy)
        self.stats = Stats(cfg, devices, clock, catalog=catalog)   # NOTE [ stats ] in daemon/ops/stats.py
        self.counters = self.stats.counters           # raw counters health and caching bump too
        self.outstanding = 0
        self.draining = False
        self.on_idle = None                 # called when draining and nothing is outstanding
        self._clock = clock
        self.health = HealthMonitor(cfg.health, devices, on_out=self._device_out,
                                    send_canary=self._send_canary, counters=self.counters, clock=clock,
                                    stats=self.stats)
        self.caches = Caches(cfg, self.model.spec, self.model.digest, self.counters)
        self.caches.first_mid = self.first.mid
        if cfg.dispatch.fair_share:         # NOTE [ batch planning ] in daemon/dispatch/queues.py
            quantum = fairness.quanta(principal_weights(cfg))
            make = lambda: fairness.DeficitRoundRobin(_flow_of, quantum)
        else:
            make = fairness.Fifo
        self._make_order = make             # a model loaded live gets its lanes in it (add_lanes)
        shares = [s.share for s in catalog.by_id]
        for dev in devices:
            if len(shares) > 1:             # a lane per model, shared by NOTE [ model share ]
                dev.use_models(shares, make, cfg.batching.max_batch)
            elif cfg.dispatch.fair_share:
                dev.queue.use(make())

    def add_lanes(self, mid: int, shares: list[float]) -> None:
        """A lane and a latency profile for model ``mid`` on every device (a model loaded live,
        daemon/ops/model_ops.py; ``shares``: each model id's weight). Empty until the catalog
        routes requests to it."""
        for dev in self.devices:
            dev.add_model(mid, shares, self._make_order, self.cfg.batching.max_batch)

    @property
    def gen(self) -> int:
        return self.model.gen

    def switch_model(self, model) -> None:
        """Admit and key new requests for ``model`` (a reload switched to it, daemon/ops/reload.py):
        its spec for checks, its digest for cache keys. Empties the result cache, so a client
        still keying by the old digest misses and learns the new model from its next reply."""
        self.model = model
        self.spec = model.spec
        self.first.model = model
        self.caches.switch_model(model)

    def _resolve(self, msg: dict, uid: int, rid: int):
        """The Served a request gets: its ``model`` and ``version`` fields, else the default route
        (daemon/models/catalog.py). One model and neither field: the one, at no cost."""
        catalog = self.catalog
        name, version = msg.get("model"), msg.get("version")
        if catalog.single and name is None and version is None:
            return self.first           # (one model: the first is the only one)
        try:
            return catalog.resolve(name, version, uid, rid)
        except UnknownModel as exc:
            raise Rejected(wire.E_UNKNOWN_MODEL, str(exc)) from None

    # admission --------------------------------------------------------------------------------
    def submit(self, session, rid: int, msg: dict, op: str = "classify") -> None:
        """Check and admit one classify / embed / near request. Raises Rejected."""
        served = None
        try:
            if self.draining:
                raise Rejected(wire.E_SHUTTING_DOWN, "the daemon is shutting down; reconnect to its successor")
            served = self._resolve(msg, session.peer[1], rid)
            self._submit(session, rid, msg, op, served)
        except Rejected as exc:             # every refusal is an outcome, named by its code (and
            self.stats.outcome(exc.code, served=served)     # its model's, once resolved)
            raise

    def submit_many(self, session, rid: int, msg: dict) -> None:
        """Check and admit each request of a classify_many (docs/protocol.md): request i is
        ``rid + i`` on ``msg["slots"][i]``, the other fields shared. A message whose ``slots`` is
        not a list of 1 to wire.MAX_BATCH_REQUESTS, or that carries an upload, raises Rejected for
        ``rid`` alone (nothing admitted); a shared field refused refuses every request, each
        under its id; a request refused on its own (its slot out of range or busy, the queue
        full) gets its error under its id; all the errors of a message go in one write. The
        shared fields are checked once a message: per request, the loop does only the slot's
        checks, admission and the queueing."""
        slots = msg.get("slots")
        if type(slots) is not list or not 1 <= len(slots) <= wire.MAX_BATCH_REQUESTS:
            self.stats.outcome(wire.E_BAD_REQUEST)
            raise Rejected(wire.E_BAD_REQUEST, f"slots must be a list of 1 to {wire.MAX_BATCH_REQUESTS} "
                           f"slot numbers, got {type(slots).__name__} of {len(slots) if type(slots) is list else 0}")
        if wire.UPLOAD_SLOT in msg or wire.UPLOAD_NBYTES in msg:
            self.stats.outcome(wire.E_BAD_REQUEST)
            raise Rejected(wire.E_BAD_REQUEST, f"{wire.CLASSIFY_MANY} carries no upload: send a frame "
                           "with its encoded bytes as a classify of its own")
        refused, served = [], None
        try:
            if self.draining:
                raise Rejected(wire.E_SHUTTING_DOWN, "the daemon is shutting down; reconnect to its successor")
            served = self._resolve(msg, session.peer[1], rid)
            spec = served.spec
            top_k, timeout = check_frame(msg, session.ring, spec, self.cfg.batching.default_timeout_ms)
            self.caches.client_hits(msg.get("hits"))
            tag = check_tag(msg.get("tag"))
            logits = check_logits(msg, spec, "classify")
        except Rejected as exc:
            for i in range(len(slots)):
                self.stats.outcome(exc.code, served=served)
                refused.append(wire.error(rid + i, exc.code, str(exc), **exc.extra))
            self._write({session: refused})
            return
        looked = msg.get("looked")
        if not self._enter_group(session, rid, slots, top_k, timeout, tag, looked, logits, served, refused):
            inflight, ring = session.inflight, session.ring
            for i, slot in enumerate(slots):
                try:
                    self._enter(session, rid + i, check_slot(slot, ring, inflight), top_k, timeout, "classify",
                                tag, None, None, looked, logits, served)
                except Rejected as exc:
                    self.stats.outcome(exc.code, served=served)
                    refused.append(wire.error(rid + i, exc.code, str(exc), **exc.extra))
        if refused:
            self._write({session: refused})

    def _enter_group(self, session, rid: int, slots: list, top_k: int, timeout: float, tag, looked,
                     logits: bool, served, refused: list) -> bool:
        """Admit a classify_many's requests as one group, when every one of them would pass
        ``_enter``'s checks one by one (NOTE [ group admission ]); False (nothing done) where any
        check could refuse one of them, or a frame must be copied on the loop: ``_enter`` then
        takes them one at a time. Slots refused on their own go to ``refused``."""
        caches = self.caches
        if caches.l2 is not None:           # the fleet cache hashes on the loop: one at a time
            return False
        if len(self.devices) > 1:           # a pool: each request's device chosen on its own, so one
            return False                    # call's frames spread over the devices, not all on one
        inflight, ring = session.inflight, session.ring
        ok, ids, bad = [], [], []
        for i, slot in enumerate(slots):
            try:
                slot = check_slot(slot, ring, inflight)
            except Rejected as exc:
                bad.append((rid + i, exc))
                continue
            ok.append(slot)
            ids.append(rid + i)
        k = len(ok)
        if k > 1 and len(set(ok)) < k:      # a slot named twice: the second is refused as busy
            return False
        if k:
            uid = session.peer[1]
            server, batching = self.cfg.server, self.cfg.batching
            held = self.stats.uids.get(uid)
            if held is not None and held.in_flight + k > server.max_inflight_per_uid:
                return False
            now = self._clock()
            deadline = now + timeout
            device = self.policy.choose(self.devices, now, batching.max_batch,
                                        served=served if self.several else None)
            if device is None or device.outstanding + k > batching.queue_limit:
                return False
            queue, mid = device.queue, served.mid
            # the last of the group has the most ahead of it: if it finishes in time, all do
            last = policies.finish_in(device, now, batching.max_batch, queue.ahead(uid, mid, k - 1) + 1, mid)
            if now + last > deadline:
                return False
        for i, exc in bad:
            self.stats.outcome(exc.code, served=served)
            refused.append(wire.error(i, exc.code, str(exc), **exc.extra))
        if not k:
            return True
        where, insert = (caches.hashing_for(looked, "classify", tag) if caches.hashing
                         else (UNHASHED, False))
        gen = served.model.gen
        requests = []
        for n, slot in enumerate(ok):
            if n and looked is True and caches.hashing:     # (sampling decides request by request)
                where, insert = caches.hashing_for(looked, "classify", tag)
            requests.append(Request(session, ring, ids[n], slot, top_k, now, deadline, device, 0, False, None,
                                    b"", b"", where == STAGED, insert, None, "classify", tag, None, [], gen,
                                    logits, served, mid))
            inflight[slot] = ids[n]
        self.stats.admitted(uid, k)
        self.outstanding += k
        served.inflight += k
        session.think.submitted(session, now, queue, k)
        device.outstanding += k
        queue.put_many(requests)
        return True

    def _submit(self, session, rid: int, msg: dict, op: str, served) -> None:
        spec = served.spec
        slot, top_k, timeout = check_classify(msg, session.ring, spec, session.inflight,
                                              self.cfg.batching.default_timeout_ms)
        caches = self.caches
        caches.client_hits(msg.get("hits"))
        if op != "classify" and caches.store_for(served.mid) is None:
            raise Rejected(wire.E_INVALID_INPUT, f"{op} needs embeddings: model {served.name} exposes none, "
                           "or embeddings.enabled is false")
        tag = check_tag(msg.get("tag"))
        logits = check_logits(msg, spec, op)
        args = check_near(msg) if op == "near" else None
        upload = check_upload(msg, session.ring, slot, session.inflight, op)
        if upload is not None and served is not self.first:
            upload = None                   # verified uploads key the first model's entries only
        looked = msg.get("looked") if upload is None else None     # an upload is verified on the copy
        self._enter(session, rid, slot, top_k, timeout, op, tag, args, upload, looked, logits, served)

    def _enter(self, session, rid: int, slot: int, top_k: int, timeout: float, op: str, tag, args,
               upload, looked, logits: bool = False, served=None) -> None:
        """Admit one checked request (refused here: nothing copied or hashed) and queue it, or
        answer it at once (a hit or a coalesced frame found by a hash taken on the loop). A
        request for its ``logits`` is always computed: never answered from a cache nor coalesced
        (the caches hold top-k only); its top-k is stored as any other's."""
        caches = self.caches
        uid = session.peer[1]
        now = self._clock()
        device = self._admit(uid, now, now + timeout, served)     # refused here: nothing copied or hashed
        frame = content = key = None
        staged = insert = False
        if caches.hashing:                  # NOTE [ unhashed misses ] in daemon/caching/results.py
            where, insert = caches.hashing_for(looked, op, tag)
            if where == LOOP:
                frame, content, key = caches.private_copy(session.ring, slot, served)
                if not logits and self._answered_at_once(session, rid, slot, top_k, op, key, content, tag,
                                                         served):
                    return
            staged = where == STAGED
        request = Request(session, session.ring, rid, slot, top_k, now, now + timeout, frame=frame,
                          key=key or b"", content=content or b"", hash=staged, insert=insert, op=op,
                          tag=tag, args=args, gen=served.model.gen, logits=logits, served=served, mid=served.mid)
        session.inflight[slot] = rid
        if upload is not None:              # every slot of the run held until the reply, like the frame's
            for s in upload[0]:
                session.inflight[s] = rid
            request.upload = (upload[0], caches.upload_bytes(upload[1]))
        self.stats.admitted(uid)
        if key and op == "classify" and not logits:
            session.claim(key, request)
        self.outstanding += 1
        served.inflight += 1                # an unloaded model is freed once none is left
        session.think.submitted(session, now, device.queue)    # NOTE [ batch planning ]
        # NOTE [ fleet cache ] in daemon/caching/fleet/cache.py
        if caches.l2 is not None and key and op == "classify" and not logits:
            request.device = device
            device.outstanding += 1         # reserved while L2 is asked (at most l2.budget_ms)
            if caches.l2.lookup(request, self._after_l2):
                return
            device.outstanding -= 1
        self._assign(request, device)

    def _after_l2(self, r: Request, top) -> None:
        """The fleet cache's verdict on a parked request: ``top`` (a hit) answers it and goes to the
        local cache; None (a miss, an error, the budget passed) sends it to its reserved device, or
        elsewhere if that one left rotation meanwhile."""
        if r.done:
            return
        if top is not None and r.gen == r.served.gen:
            self.caches.adopt(r.key, top)
            self.caches.retag(r.content, r.tag, r.session.peer[1], r.mid)
            self.stats.outcome("cached_l2", served=r.served)   # its coalesced followers were counted at admission
            replies: dict = {}
            r.answer = top
            self._answer(replies, r, lambda rid, k: {"id": rid, "ok": True, "cached": True,
                                                     "top": [list(p) for p in top[:k]]}, r.gen)
            self._write(replies)
        elif r.device.healthy:
            r.device.queue.put(r)
        else:
            self._redispatch([r], r.device, f"device {r.device.label} left rotation")

    def _answered_at_once(self, session, rid, slot, top_k, op, key, content, tag, served) -> bool:
        """A cache hit, a frame already in flight (coalesced), or an embedding already stored."""
        caches = self.caches
        if op == "classify" and caches.cache is not None:
            hit = caches.lookup(key, top_k)
            if hit is not None:
                caches.retag(content, tag, session.peer[1], served.mid)
                self.stats.outcome("cached", served=served)
                session.send(self._stamp(session, {"id": rid, "ok": True, "top": [list(p) for p in hit[:top_k]],
                                                   "cached": True}, served.gen, served))
                return True
            leader = session.pending.get(key)
            if leader is not None and not leader.done:
                leader.followers.append((rid, slot, top_k))
                session.inflight[slot] = rid
                self.counters["coalesced"] += 1
                self.stats.admitted(session.peer[1])      # its slot is held until the leader's reply
                self.stats.outcome("coalesced", served=served)
                return True
        if op == "embed":                   # (near always runs: its search belongs off the loop)
            vector = caches.store_for(served.mid).get(content, uid=session.peer[1])   # its own row (unless shared)
            if vector is not None:
                caches.retag(content, tag, session.peer[1], served.mid)     # a new tag wins, as classify's does
                self.stats.outcome("cached", served=served)
                session.send(self._stamp(session, self._embedding_reply(rid, op, vector, content, None),
                                         served.gen, served))
                return True
        return False

    def _admit(self, uid: int, now: float, deadline: float, served):
        """The device a request of ``uid`` for model ``served`` due at ``deadline`` goes to, or
        Rejected. Reserves nothing: O(1) but for the device choice (O(devices))."""
        server, max_batch = self.cfg.server, self.cfg.batching.max_batch
        held = self.stats.uids.get(uid)
        if held is not None and held.in_flight >= server.max_inflight_per_uid:
            self.counters["overloaded"] += 1
            raise Rejected(wire.E_OVERLOADED, f"not admitted: uid {uid} has {held.in_flight} requests in "
                           f"flight (server.max_inflight_per_uid {server.max_inflight_per_uid}); wait "
                           "for replies, or ask the operator to raise the limit",
                           retry_after_ms=self._batch_ms())
        device = self.policy.choose(self.devices, now, max_batch, served=served if self.several else None)
        if device is None:
            self.counters["no_healthy_device"] += 1
            raise Rejected(wire.E_NO_HEALTHY_DEVICE, _none_in_rotation(self.devices))
        limit, queue = self.cfg.batching.queue_limit, device.queue
        # a uid under its share of a full queue still gets in, up to twice the limit in all
        # (NOTE [ batch planning ]): a flood fills the queue, never shuts others out of it
        mid = served.mid
        if device.outstanding >= limit and (device.outstanding >= 2 * limit or queue.over_share(uid, limit, mid)):
            self.counters["overloaded"] += 1
            raise Rejected(wire.E_OVERLOADED, f"not admitted: {device.outstanding} requests are queued on "
                           f"{device.label} (batching.queue_limit {limit}), uid {uid}'s share of them "
                           "taken; retry later", retry_after_ms=self._batch_ms())
        finish = now + policies.finish_in(device, now, max_batch, queue.ahead(uid, mid) + 1, mid)
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
    def seal_answers(self, result: BatchResult) -> None:
        """On the pipeline thread that delivers a batch, before the loop has it: seal the cache
        entries of its computed classify answers that the loop will surely insert (Caches.seal),
        so the loop's insert is a lock, a way and a write (``remember`` seals any other itself,
        and again if the cache was flushed or the key changed meanwhile). Reads the entries, which
        no other thread writes then, and the caches' hit rate (a float: any value is safe)."""
        seal = self.caches.seal
        for e in result.entries:
            if e.key and e.outcome is Outcome.DONE:
                r = e.request
                if r.op == "classify":
                    e.sealed = seal(e.key, e.top, r.insert)

    def on_batch_done(self, result: BatchResult) -> None:
        """Every request of one batch comes back here: reply, re-dispatch, or drop if stale."""
        dev = result.device
        # a canary has no session: it only informs the health monitor below
        live = lambda e: e.request.session is not None and e.current()
        replies: dict = {}
        result.settle()                     # the entries by outcome, one pass (records.py)
        self._hashed(result, live)
        if result.early:                    # hits and coalesced frames, ahead of their batch
            self._answer_settled(result, live, replies)
            self._write(replies)
            return
        stale = sum(not live(e) for e in result.entries if e.request.session is not None)
        if stale:
            self.counters["stale_results"] += stale
            _late.info("%d late results from %s dropped: their requests went elsewhere", stale, dev.label)
        self._answer_settled(result, live, replies)
        answered = self._answer_computed(result, live, replies)
        for e in result.with_outcome(Outcome.EXPIRED):
            if live(e):
                self.stats.outcome(wire.E_DEADLINE_EXCEEDED, served=e.request.served)
                self._answer(replies, e.request, lambda rid, k: wire.error(
                    rid, wire.E_DEADLINE_EXCEEDED, "the deadline passed while queued; not computed"))
        for e in result.with_outcome(Outcome.DROPPED):
            if live(e):
                self.stats.outcome("dropped", served=e.request.served)
                self._finish(e.request)
        for e in result.with_outcome(Outcome.UNREADABLE):   # its client shrank its (posix) ring: its error alone
            if live(e):
                self.stats.outcome(wire.E_INVALID_INPUT, served=e.request.served)
                self._answer(replies, e.request, lambda rid, k, why=e.why: wire.error(rid, wire.E_INVALID_INPUT, why))
        failed = result.with_outcome(Outcome.FAILED)
        if result.canary:
            ok = not failed
            (self.health.batch_ok if ok else self.health.batch_failed)(dev, True, *(() if ok else (result.error,)))
        elif failed:
            self.counters["batches_failed"] += 1
            self.health.batch_failed(dev, False, result.error)
            self._redispatch([e.request for e in failed if live(e)], dev, result.error)
        else:
            self.health.batch_ok(dev, False)
        now = self._clock()
        horizon = expect_horizon(self.cfg.batching, dev.profile)
        self._write(replies)
        for session, messages in replies.items():
            count = len(messages) if not messages or type(messages[0]) is not _Answers else \
                len(messages) - 1 + len(messages[0].ids)
            session.think.replied(session, now, count, dev.queue, horizon)
        self.stats.batch(result, answered, now)
        if len(dev.queue):
            # the planner learns who is coming back only now (NOTE [ batch planning ]): if it waits
            # on a device it thought busy, the device is free and the expectations are in
            dev.queue.poke()
        c = self.counters
        done = result.count(Outcome.DONE)
        if done and not self.catalog.single:
            # which model each batch ran, checked apart from the queue that formed it (the
            # executor fails a batch that mixes models; this counts one that got through)
            c[f"batches_model_{result.mid}"] += 1
            c[f"frames_model_{result.mid}"] += done
            c["mixed_batches"] += any(e.request.mid != result.mid for e in result.entries
                                      if e.outcome is Outcome.DONE)
        c["batches"] += bool(done)
        c["frames"] += done
        c["model_seconds"] += result.seconds
        c["expired"] += result.count(Outcome.EXPIRED)
        c["dropped"] += result.count(Outcome.DROPPED)

    def _hashed(self, result: BatchResult, live) -> None:
        """What the collector learnt by hashing a batch's rows: each live request's key and content
        hash (its answer is stored under them), the lookups it made, the time it took."""
        hits = misses = 0
        for e in result.entries:
            if e.key:
                if e.looked:
                    if e.outcome is Outcome.HIT:
                        hits += 1
                    else:
                        misses += 1
                r = e.request
                if r.session is not None and not r.done and r.attempt == e.attempt:    # live(e), inline
                    r.key, r.content = e.key, e.content
        if hits or misses:
            self.caches.count_lookups(hits, misses)
        if result.hashed:
            self.counters["hash_seconds"] += result.hash_seconds
            self.counters["hashed"] += result.hashed

    def _answer_settled(self, result: BatchResult, live, replies: dict) -> None:
        """The entries the collector settled without computing: a cache hit answered from the
        cache; a frame coalesced with an identical one of its session rides on that leader,
        answered with it (or from its answer, if it came first; or queued again, if it failed)."""
        plain = []
        for e in result.with_outcome(Outcome.HIT):
            if live(e):
                r = e.request
                r.answer = e.top
                if r.tag is not None:
                    self.caches.retag(r.content, r.tag, r.session.peer[1], r.mid)
                if self._plain(replies, r, e.top, r.served.gen, True):
                    plain.append(r)
                    continue
                self.stats.outcome("cached", served=r.served)
                self._answer(replies, r, lambda rid, k, top=e.top: {
                    "id": rid, "ok": True, "top": [list(p) for p in top[:k]], "cached": True}, r.served.gen)
        if plain:
            self.stats.outcome("cached", len(plain), served=self.first)
            self._finish_many(plain)
        for e in result.with_outcome(Outcome.COALESCED):
            if not live(e):
                continue
            r, leader = e.request, e.leader
            self.counters["coalesced"] += 1
            self.stats.outcome("coalesced", served=r.served)
            if not leader.done:             # its slot stays held until the leader's reply
                leader.followers.append((r.id, r.slot, r.top_k))
                r.done = True
                r.device.outstanding -= 1
                self.outstanding -= 1
                self._let_go(r.served)
            elif leader.answer is not None:
                self._answer(replies, r, lambda rid, k, top=leader.answer: {
                    "id": rid, "ok": True, "top": [list(p) for p in top[:k]]}, r.served.gen)
            elif r.device.healthy:          # its leader failed: computed on its own
                r.device.queue.put(r)
            else:
                self._redispatch([r], r.device, f"device {r.device.label} left rotation")

    def _write(self, replies: dict) -> None:
        """One write per session: a client that batches its requests gets its replies in one
        ``replies`` message (docs/protocol.md), and its plain answers in one ``answers`` message
        when it reads those; any other one frame each."""
        for session, messages in replies.items():
            if messages and type(messages[0]) is _Answers:
                session.write(messages[0].encode())
                messages = messages[1:]
                if not messages:
                    continue
            if session.batches and len(messages) > 1 and any("logits" in m for m in messages):
                # a reply with logits (up to 4 MiB) goes in a frame of its own: no bundle of a
                # batch's replies can pass the client's frame limit
                session.write(b"".join(wire.encode(m) for m in messages if "logits" in m))
                messages = [m for m in messages if "logits" not in m]
            if session.batches and len(messages) > 1:
                session.write(wire.encode({"replies": messages}))
            else:
                session.write(b"".join(map(wire.encode, messages)))

    def _answer_computed(self, result: BatchResult, live, replies: dict) -> list:
        """Queue the replies of a batch's computed requests that are still ``live``, keep their
        answers (cache, embeddings, a verified upload); the live requests answered ok (their
        latency is kept)."""
        answered, plain, computed = [], [], 0
        # a batch is one model's: is its generation the one serving now?
        current = result.gen == (self.catalog.by_id[result.mid].model.gen if result.mid >= 0 else self.gen)
        gen, remember, rows = result.gen, self.caches.remember, []     # rows: the batch's embeddings
        for e in result.with_outcome(Outcome.DONE):
            r = e.request
            if r.session is None or r.done or r.attempt != e.attempt:      # not live
                continue
            top, vector = e.top, e.embedding
            computed += 1
            answered.append(r)
            if r.op != "near" and current:   # a query is searched, never stored;
                # an answer of the model before a swap is never stored (NOTE [ model swap ])
                remember(self._key_for(r) if r.op == "classify" else b"", r.content, top,
                         vector, r.tag, r.session.peer[1], r.insert, r.mid, e.sealed, rows)
            if r.op == "classify":
                r.answer = top
                if e.upload is not None and current:
                    self.caches.verify_upload(e.upload, e.frame, top)
                if e.logits is None and self._plain(replies, r, top, gen):
                    plain.append(r)         # (its bookkeeping once a batch: ``_finish_many``)
                    continue
                if e.logits is not None:    # it has no followers: it never leads coalesced frames
                    self._answer(replies, r, lambda rid, k, top=top, raw=e.logits.tobytes(): {
                        "id": rid, "ok": True, "top": top[:k], "logits": raw}, result.gen)
                else:
                    self._answer(replies, r, lambda rid, k, top=top: {"id": rid, "ok": True, "top": top[:k]},
                                 result.gen)
            else:
                message = self._embedding_reply(r.id, r.op, vector, r.content, e.matches)
                if not message["ok"]:
                    answered.pop()
                    self.stats.outcome("failed", served=r.served)
                self._answer(replies, r, lambda rid, k, m=message: m, result.gen)
        if rows:                            # one write a batch (NOTE [ rows written per batch ])
            self.caches.keep(rows)
        result.device.frames += computed
        self._finish_many(plain)
        return answered

    def _plain(self, replies: dict, r: Request, top: list, gen: int, cached: bool = False) -> bool:
        """Queue ``r``'s answer ``top`` (by generation ``gen``; from the cache) where it needs no
        more than id, top, gen and cached: one model, no followers, no upload, a generation its
        session knows (``_stamp`` would add nothing else). One ``answers`` entry for a session that
        reads those, else a map. False where ``_answer`` must make it; the caller finishes ``r``."""
        session = r.session
        if self.several or r.followers or r.upload is not None or r.served is not self.first \
                or gen > session.told_gen:
            return False
        messages = replies.get(session)
        if messages is None:
            messages = replies[session] = []
        if getattr(session, "packed", False):       # one ``answers`` frame (shm/wire.py)
            packed = messages[0] if messages and type(messages[0]) is _Answers else None
            if packed is None:
                packed = _Answers(gen)
                messages.insert(0, packed)
            if packed.gen == gen:                   # (else, after a model swap: a map of its own)
                packed.add(r.id, top[:r.top_k], cached)
                return True
        message = {"id": r.id, "ok": True, "top": top[:r.top_k]}
        if gen:
            message["gen"] = gen
        if cached:
            message["cached"] = True
        messages.append(message)
        return True

    def _answer(self, replies: dict, r: Request, make, gen: int = 0) -> None:
        """Queue ``make(id, top_k)`` for the request and each identical frame coalesced with it;
        an answer computed by model generation ``gen`` says so (``_stamp``)."""
        messages = replies.setdefault(r.session, [])
        for rid, top_k in ((r.id, r.top_k), *((rid, top_k) for rid, _, top_k in r.followers)):
            message = make(rid, top_k)
            messages.append(self._stamp(r.session, message, gen, r.served) if gen else message)
        self._finish(r)

    def _stamp(self, session, message: dict, gen: int, served=None) -> dict:
        """Mark an answer with the model generation that computed it, and with several models
        which one (``served``: [name, version]); the first answer of a newer generation of the
        first model than the session knows also carries that model's description, and the first
        answer of another model (or of its new generation) to a session carries that one's
        (``served_model``): a model loaded or swapped after hello, or a canary version the client
        never heard of, is named by its own labels, never the default model's."""
        if message.get("ok"):
            message["gen"] = gen
            if (self.several or served is not self.first) and served is not None:
                # (a model unloaded still answers the requests admitted before: stamped too)
                message["served"] = [served.name, served.version]
                if served is not self.first:
                    told, key = session.told_models, (served.name, served.version)
                    if gen == served.gen and told.get(key) != (served.digest, gen):
                        told[key] = (served.digest, gen)
                        message["served_model"] = served.describe()
                    return message
            if gen > session.told_gen and gen == self.gen:
                # (several models: with its version, so a client files it under (name, version))
                message["model"] = self.first.describe() if self.several else self.model.describe()
                session.told_gen = gen
        return message

    def _key_for(self, r: Request) -> bytes:
        """The cache key of a request's answer under the current model: its admission key, or a
        new one when it was admitted (and keyed) under the model before a swap."""
        if r.gen == r.served.gen or not r.key:
            return r.key
        return self.caches.key(r.content, r.served.keying)

    def _embedding_reply(self, rid: int, op: str, vector, content: bytes, matches) -> dict:
        """The reply to embed (the vector) or near (``matches``, searched by the device thread)."""
        if vector is None or (op == "near" and matches is None):
            return wire.error(rid, wire.E_INTERNAL, "the model produced no embedding for this frame")
        if isinstance(matches, Exception):  # the near-duplicate index rebuilding a large store
            return wire.error(rid, wire.E_OVERLOADED, str(matches), retry_after_ms=5000)
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
        if r.key:
            session.unclaim(r.key, r)
        r.device.outstanding -= 1
        self.outstanding -= 1
        served = r.served
        if served is not None:              # (Scheduler._let_go, inline: once per request)
            served.inflight -= 1
            if served.retired and not served.inflight and served.on_idle is not None:
                served.on_idle()
        if session.closed and not session.inflight:
            session.release_ring()
        if self.outstanding == 0 and self.draining and self.on_idle is not None:
            self.on_idle()

    def _finish_many(self, done: list) -> None:
        """``_finish`` of answered requests without followers or an upload, the counts they hold
        (uid, device, model, daemon) given back once per run of alike ones (NOTE [ group
        admission ])."""
        if not done:
            return
        run_uid = run_dev = run_served = None
        n_uid = n_dev = n_served = 0
        stats, closing = self.stats, []
        for r in done:
            r.done = True
            session = r.session
            session.inflight.pop(r.slot, None)
            if r.key:
                session.unclaim(r.key, r)
            if session.closed and not session.inflight:
                closing.append(session)
            uid, dev, served = session.peer[1], r.device, r.served
            if uid != run_uid:
                if n_uid:
                    stats.finished(run_uid, n_uid)
                run_uid, n_uid = uid, 0
            n_uid += 1
            if dev is not run_dev:
                if n_dev:
                    run_dev.outstanding -= n_dev
                run_dev, n_dev = dev, 0
            n_dev += 1
            if served is not run_served:
                if n_served:
                    self._let_go(run_served, n_served)
                run_served, n_served = served, 0
            n_served += 1
        stats.finished(run_uid, n_uid)
        run_dev.outstanding -= n_dev
        self.outstanding -= len(done)
        for session in closing:
            session.release_ring()
        self._let_go(run_served, n_served)
        if self.outstanding == 0 and self.draining and self.on_idle is not None:
            self.on_idle()

    @staticmethod
    def _let_go(served, n: int = 1) -> None:
        """``n`` requests of ``served`` answered; the last one of an unloaded model lets it be freed."""
        if served is None:
            return
        served.inflight -= n
        if served.retired and not served.inflight and served.on_idle is not None:
            served.on_idle()

    # failures ---------------------------------------------------------------------------------
    def _redispatch(self, requests: list, failed_dev, why: str) -> None:
        """Move requests off ``failed_dev``: each goes to another healthy device, or gets an error
        when none is left or it has failed on health.max_attempts devices already."""
        now = self._clock()
        max_batch = self.cfg.batching.max_batch
        for r in requests:
            r.attempt += 1
            target = self.policy.choose(self.devices, now, max_batch, exclude=failed_dev,
                                        served=r.served if self.several else None)
            if r.attempt >= self.cfg.health.max_attempts or target is None:
                code = wire.E_INTERNAL if target is not None else wire.E_NO_HEALTHY_DEVICE
                self.counters["failed"] += 1
                self.stats.outcome("failed", served=r.served)
                replies: dict = {}
                self._answer(replies, r, lambda rid, k: wire.error(
                    rid, code, f"not computed: {why} (tried on {r.attempt} device(s))"))
                self._write(replies)
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
        moved += [e.request for e in dev.staged if e.request.session is not None and e.current()]
        if stuck:
            moved += [e.request for e in dev.running if e.request.session is not None and e.current()]
        if moved:
            log.warning("re-dispatching %d requests from %s", len(moved), dev.label)
        self._redispatch(moved, dev, f"device {dev.label} left rotation: {reason}")

    def _send_canary(self, dev) -> None:
        """A blank frame of the first model this device runs: the daemon's first model where it
        runs (it is never unloaded, so no canary can outlive its model's replica)."""
        now = self._clock()
        served = self.first if self.first.runs_on(dev.index) else self.catalog.on_device(dev.index)[0]
        dev.queue.put(Request(None, None, -1, -1, 1, now, now + 3600.0, dev, served=served, mid=served.mid))

    def describe(self) -> dict:
        """Devices, cache and counters for the client socket's ``info`` (``self.stats`` is the rest)."""
        c = self.counters
        return {"outstanding": self.outstanding, "policy": self.policy.name,
                "models": self.catalog.describe(), "routes": self.catalog.routes_describe(),
                "requests": dict(self.stats.outcomes),
                "devices": [d.describe() for d in self.devices], "cache": self.caches.stats(),
                "counters": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in c.items()}}


class _Answers:
    """A session's plain classify answers of one batch, to go as one ``answers`` frame
    (wire.pack_answers): ids, their pairs and the generation, no dict per answer."""

    __slots__ = ("gen", "ids", "ks", "tops", "cached")

    def __init__(self, gen: int):
        self.gen = gen
        self.ids: list = []
        self.ks: list = []
        self.tops: list = []
        self.cached: list = []

    def add(self, rid: int, top: list, cached: bool = False) -> None:
        self.ids.append(rid)
        self.ks.append(len(top))
        self.tops.append(top)
        self.cached.append(cached)

    def encode(self) -> bytes:
        try:
            return wire.pack_answers(self.ids, self.ks, self.tops, self.gen, self.cached)
        except (struct.error, TypeError, ValueError):   # a pair that is not (int, float): as replies
            gen = {"gen": self.gen} if self.gen else {}
            return wire.encode({wire.REPLIES: [{"id": rid, "ok": True, "top": top, **gen,
                                                **({"cached": True} if cached else {})}
                                               for rid, top, cached in zip(self.ids, self.tops, self.cached)]})


def _none_in_rotation(devices) -> str:
    """Why no device takes work, by what put each one out: an operator (``inferctl device
    disable``) or its health checks."""
    disabled = [d.label for d in devices if d.state == DISABLED]
    failed = [d.label for d in devices if d.state != DISABLED]
    parts = []
    if disabled:
        parts.append(f"{', '.join(disabled)} taken out by an operator (inferctl device enable N puts "
                     f"one back)")
    if failed:
        parts.append(f"{', '.join(failed)} out after failing health checks (retried by a canary batch)")
    return f"no device is in rotation: {'; '.join(parts)}; retry later (inferctl info shows each one's state)"
