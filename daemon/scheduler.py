"""The event loop's side of every request: admission, dispatch, replies, re-dispatch.

Runs on the loop thread only; batching threads talk to it through ``on_batch_done`` (scheduled with
call_soon_threadsafe, one call per batch). See NOTE [ request path ] in daemon/batcher.py.

Exactly one reply per admitted request. A request carries ``attempt``, bumped each time it is
re-dispatched; a batching thread notes the attempt of each request when it takes it, and a result
whose noted attempt is not the request's current one is stale (its device was given up on and the
request already went elsewhere) and is dropped. ``done`` marks a request answered. Together they
mean none is lost when a device fails, and none is answered twice when a stuck device wakes up.

Admission, in order: a healthy device exists (else ``no_healthy_device``); the chosen device holds
fewer than ``batching.queue_limit`` requests; the request is expected to finish before its
deadline, given the chosen device's backlog and measured latency (else ``overloaded``, with
``retry_after_ms`` = how late it would be). A request that passes may still find its deadline gone
by the time a batch takes it: it is answered ``deadline_exceeded`` without being computed.
"""
from __future__ import annotations

import collections
import logging

from inferd.daemon import policy as policies
from inferd.daemon.batcher import BatchResult, Request
from inferd.daemon.health import HealthMonitor
from inferd.daemon.session import Rejected, check_classify
from inferd.shm import wire

log = logging.getLogger("inferd.scheduler")


class Scheduler:
    def __init__(self, cfg, spec, devices: list, clock):
        self.cfg = cfg
        self.spec = spec
        self.devices = devices
        self.policy = policies.make(cfg.dispatch.policy)
        self.counters = collections.Counter()
        self.outstanding = 0
        self.draining = False
        self.on_idle = None                 # called when draining and nothing is outstanding
        self._clock = clock
        self.health = HealthMonitor(cfg.health, devices, on_out=self._device_out,
                                    send_canary=self._send_canary, counters=self.counters, clock=clock)

    # admission --------------------------------------------------------------------------------
    def classify(self, session, rid: int, msg: dict) -> None:
        """Check and admit one classify request. Raises Rejected."""
        if self.draining:
            raise Rejected(wire.E_SHUTTING_DOWN, "the daemon is shutting down; reconnect to its successor")
        slot, top_k, timeout = check_classify(msg, session.ring, self.spec, session.inflight,
                                              self.cfg.batching.default_timeout_ms)
        now = self._clock()
        request = Request(session, session.ring, rid, slot, top_k, now, now + timeout)
        device = self._admit(request, now)
        session.inflight[slot] = rid
        self.outstanding += 1
        self._assign(request, device)

    def _admit(self, request: Request, now: float):
        max_batch = self.cfg.batching.max_batch
        device = self.policy.choose(self.devices, now, max_batch)
        if device is None:
            self.counters["no_healthy_device"] += 1
            raise Rejected(wire.E_NO_HEALTHY_DEVICE, "no device is in rotation; every device failed "
                           "its health checks (inferctl info shows each one's state)")
        limit = self.cfg.batching.queue_limit
        finish = now + policies.backlog(device, now, max_batch, extra=1)
        if device.outstanding >= limit or finish > request.deadline:
            self.counters["overloaded"] += 1
            late_ms = max(finish - request.deadline, 0.0) * 1000.0
            why = (f"{device.outstanding} requests are queued on {device.label} (batching.queue_limit "
                   f"{limit})" if device.outstanding >= limit else
                   f"it would finish {late_ms:.1f} ms after its deadline")
            raise Rejected(wire.E_OVERLOADED, f"not admitted: {why}; retry later",
                           retry_after_ms=round(max(late_ms, 1.0), 1))
        return device

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
            log.info("%d late results from %s dropped: their requests went elsewhere", stale, dev.label)
        replies: dict = {}
        for r, top in zip(result.done, result.top):
            if live(r):
                dev.frames += 1
                self._reply(replies, r, {"id": r.id, "ok": True, "top": top})
        for r in result.expired:
            if live(r):
                self._reply(replies, r, wire.error(r.id, wire.E_DEADLINE_EXCEEDED,
                                                   "the deadline passed while queued; not computed"))
        for r in result.dropped:
            if live(r):
                self._finish(r)
        if result.canary:
            ok = not result.failed
            (self.health.batch_ok if ok else self.health.batch_failed)(dev, True, *(() if ok else (result.error,)))
        elif result.failed:
            self.counters["batches_failed"] += 1
            self.health.batch_failed(dev, False, result.error)
            self._redispatch([r for r in result.failed if live(r)], dev, result.error)
        else:
            self.health.batch_ok(dev, False)
        for session, chunks in replies.items():
            session.write(b"".join(chunks))
        c = self.counters
        c["batches"] += bool(result.done)
        c["frames"] += len(result.done)
        c["model_seconds"] += result.seconds
        c["expired"] += len(result.expired)
        c["dropped"] += len(result.dropped)

    def _reply(self, replies: dict, r: Request, message: dict) -> None:
        replies.setdefault(r.session, []).append(wire.encode(message))
        self._finish(r)

    def _finish(self, r: Request) -> None:
        r.done = True
        session = r.session
        session.inflight.pop(r.slot, None)
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
                r.session.write(wire.encode(wire.error(
                    r.id, code, f"not computed: {why} (tried on {r.attempt} device(s))")))
                self._finish(r)
                continue
            self.counters["redispatched"] += 1
            r.device.outstanding -= 1
            self._assign(r, target)

    def _device_out(self, dev, reason: str, stuck: bool) -> None:
        queued = dev.queue.drain()
        if any(r.session is None for r in queued):
            dev.canary_pending = False                 # a queued canary dies with the queue
        moved = [r for r in queued if r.session is not None and not r.done]
        if stuck:
            moved += [r for r, attempt in dev.running
                      if r.session is not None and not r.done and r.attempt == attempt]
        if moved:
            log.warning("re-dispatching %d requests from %s", len(moved), dev.label)
        self._redispatch(moved, dev, f"device {dev.label} left rotation: {reason}")

    def _send_canary(self, dev) -> None:
        now = self._clock()
        dev.queue.put(Request(None, None, -1, -1, 1, now, now + 3600.0, dev))

    def stats(self) -> dict:
        c = self.counters
        return {"outstanding": self.outstanding, "policy": self.policy.name,
                "devices": [d.describe() for d in self.devices],
                "counters": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in c.items()}}
