"""The fleet cache: a second level of the result cache in a Redis (or Valkey) the hosts share.

NOTE [ fleet cache ]

    Scheduler._submit: local miss (classify)                 loop thread, every step
       | device chosen by admission, reserved (device.outstanding += 1)
       v
    FleetCache.lookup(request, done) --False (breaker open, too many MGETs out)--> device queue
       | parked in this turn's batch
       v  call_soon (end of the turn)
    _send: one MGET of every key parked this turn  +  a timer at l2.budget_ms
       |                                              |
       v  reply (decode + MAC check per value)        v  budget passed first
    _verdict: done(request, top) for a hit          _expire: done(request, None) for all
              done(request, None) for a miss,                (timeouts; the late reply is
              a forged entry, or an error                     read and dropped)
       v
    Scheduler._after_l2: a hit is answered ("cached") and kept in the local cache (the client
    answers the next repeat itself); anything else goes to its reserved device, or another one
    if that device left rotation meanwhile.

    computed answer -> Caches.remember -> FleetCache.store -> bounded backlog -> one pipelined
    SET EX per write batch (a task; never awaited by a request). Full backlog: dropped, counted.

Why look up first and compute on a miss, rather than compute at once and answer from L2 if it
wins: a hit found first costs the device nothing, which is where a fleet's repeats pay (a racing
computation would be done, and paid for, anyway); a miss pays one round trip before its device,
about 0.1 ms against milliseconds of batching and compute (bench/fleet/run.py measures both).

Every verdict comes within the budget: the timer resolves whatever the reply has not, and a
request is resolved exactly once (``_Batch.open``). No request fails because of L2: an error, a
timeout, a forged entry or an open breaker is a miss. Failures (an error, a batch past its budget,
a failed write) feed the breaker (daemon/caching/fleet/breaker.py); a reply in time closes it again.
Only the loop thread touches any of this; the Redis client is asyncio on the same loop
(daemon/caching/fleet/connection.py).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

from . import connection
from .breaker import STATES, Breaker
from .codec import decode, encode, load_fleet_key, redis_key
from ...ops.logs import RateLimitedLog
from ...ops.stats import LATENCY_BOUNDS, Histogram

log = logging.getLogger("inferd.l2")
_errors = RateLimitedLog(log)
_forged = RateLimitedLog(log)
#: How long a stopping daemon gives its last writes.
CLOSE_WRITES_S = 1.0


class _Batch:
    """The lookups parked in one loop turn: key -> [(request, done), ...]."""

    __slots__ = ("waiters", "started", "open", "timer")

    def __init__(self):
        self.waiters: dict = {}
        self.started = 0.0
        self.open = True                    # no verdict given yet
        self.timer = None


class FleetCache:
    """Lookups (batched, budgeted), write-behind, breaker and counters of the fleet cache."""

    def __init__(self, cfg, fleet_key: bytes, client, classes: Callable[[], int],
                 loop: asyncio.AbstractEventLoop, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self._key = fleet_key
        self._client = client
        self._classes = classes
        self._loop = loop
        self._clock = clock
        self._prefix = cfg.prefix.encode()
        self._budget = cfg.budget_ms / 1000.0
        self.breaker = Breaker(cfg.breaker_failures, cfg.breaker_cooldown_s, clock, self._breaker_moved)
        self.counts = collections.Counter()
        self.wait = {"hit": Histogram(LATENCY_BOUNDS), "miss": Histogram(LATENCY_BOUNDS)}
        self.round_trip = Histogram(LATENCY_BOUNDS)
        self._batch: _Batch | None = None
        self._in_flight: set = set()
        self._backlog: collections.deque = collections.deque()
        self._writer: asyncio.Task | None = None
        self._closing = False

    # lookups ------------------------------------------------------------------------------------
    def lookup(self, request, done: Callable) -> bool:
        """Park ``request`` (its ``key`` missed locally): ``done(request, top or None)`` is called
        once, on the loop, within ``l2.budget_ms``. False: not taken (breaker open, or
        ``l2.max_lookups_in_flight`` MGETs out): compute it now."""
        if self._closing:
            return False
        batch = self._batch
        if batch is None:
            if len(self._in_flight) >= self.cfg.max_lookups_in_flight or not self.breaker.allow():
                self.counts["skipped"] += 1
                return False
            batch = self._batch = _Batch()
            self._loop.call_soon(self._send)
        batch.waiters.setdefault(request.key, []).append((request, done))
        return True

    def _send(self) -> None:
        batch, self._batch = self._batch, None
        batch.started = self._clock()
        batch.timer = self._loop.call_later(self._budget, self._expire, batch)
        task = self._loop.create_task(self._ask(batch))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        self.counts["batches"] += 1

    async def _ask(self, batch: _Batch) -> None:
        keys = [redis_key(self._prefix, key) for key in batch.waiters]
        try:
            values = await connection.mget(self._client, self.cfg.cluster, keys)
        except asyncio.CancelledError:
            self._verdict(batch, None, "errors")
            raise
        except Exception as exc:  # any client or server error is a miss; the breaker counts it
            _errors.warning("fleet cache lookup failed: %s: %s", type(exc).__name__, exc)
            if batch.open:
                self.breaker.failure()
            self._verdict(batch, None, "errors")
            return
        self.round_trip.observe(self._clock() - batch.started)
        if not batch.open:
            self.counts["late"] += 1        # its requests went to their devices at the budget
            return
        self.breaker.success()
        self._verdict(batch, values, "misses")

    def _expire(self, batch: _Batch) -> None:
        """The budget passed: its requests go to their devices. Redis is blamed (the breaker) only
        when the loop itself was on time: a timer firing a whole budget late means the loop was
        busy, and the reply may well be sitting unread in the socket."""
        if not batch.open:
            return
        lag = self._clock() - batch.started - self._budget
        if lag < 0:         # early: a loop may run a timer up to its clock resolution early
            batch.timer = self._loop.call_later(-lag, self._expire, batch)
            return
        if lag < self._budget:
            self.breaker.failure()
        else:
            self.counts["loop_late"] += 1
        self._verdict(batch, None, "timeouts")

    def _verdict(self, batch: _Batch, values, why: str) -> None:
        """Resolve every request of ``batch`` once: a hit where ``values`` holds a valid entry with
        enough pairs, else a miss counted under ``why``."""
        if not batch.open:
            return
        batch.open = False
        if batch.timer is not None:
            batch.timer.cancel()
        now, classes = self._clock(), self._classes()
        for i, (key, waiters) in enumerate(batch.waiters.items()):
            top = None
            if values is not None and values[i] is not None:
                top = decode(self._key, key, values[i], classes)
                if top is None:
                    self.counts["forged"] += 1
                    _forged.warning("fleet cache entry %s failed its MAC check (written without this "
                                    "fleet's l2.key_file, or corrupt): ignored", key.hex()[:16])
            for request, done in waiters:
                hit = top if top is not None and len(top) >= request.top_k else None
                self.counts["hits" if hit is not None else why] += 1
                self.wait["hit" if hit is not None else "miss"].observe(now - request.arrived)
                done(request, hit)

    # writes -------------------------------------------------------------------------------------
    def store(self, key: bytes, top) -> None:
        """Queue a computed answer for Redis. Never waits: dropped (counted) while the breaker is
        not closed or when ``l2.write_backlog`` answers are already waiting."""
        if self._closing or not self.breaker.writing or len(self._backlog) >= self.cfg.write_backlog:
            self.counts["writes_dropped"] += 1
            return
        self._backlog.append((redis_key(self._prefix, key), encode(self._key, key, top)))
        if self._writer is None:
            self._writer = self._loop.create_task(self._write_out())

    async def _write_out(self) -> None:
        try:
            while self._backlog:
                n = min(self.cfg.write_batch, len(self._backlog))
                items = [self._backlog.popleft() for _ in range(n)]
                try:
                    await connection.write(self._client, items, self.cfg.ttl_s)
                except Exception as exc:  # counted, fed to the breaker; the answers were served
                    self.counts["write_errors"] += n
                    self.breaker.failure()
                    _errors.warning("fleet cache write of %d entries failed: %s: %s", n,
                                    type(exc).__name__, exc)
                    if not self.breaker.writing:
                        self.counts["writes_dropped"] += len(self._backlog)
                        self._backlog.clear()
                    continue
                self.counts["writes"] += n
                self.breaker.success()
        finally:
            self._writer = None

    # life and figures ---------------------------------------------------------------------------
    def _breaker_moved(self, old: str, new: str) -> None:
        level = logging.WARNING if new == "open" else logging.INFO
        log.log(level, "fleet cache breaker %s -> %s%s", old, new,
                f": {self.cfg.breaker_failures} failures in a row; lookups stop for "
                f"{self.cfg.breaker_cooldown_s:g} s" if new == "open" and old == "closed" else "")

    async def start(self) -> None:
        """Say in the log whether Redis answers now (a daemon serves either way)."""
        try:
            await asyncio.wait_for(self._client.ping(), self.cfg.timeout_ms / 1000.0 + 1.0)
            log.info("fleet cache: Redis answers; budget %g ms, ttl %d s, prefix %r",
                     self.cfg.budget_ms, self.cfg.ttl_s, self.cfg.prefix)
        except Exception as exc:  # serve from local cache and devices; the breaker takes over
            log.warning("fleet cache: Redis does not answer (%s: %s); serving without it until it does",
                        type(exc).__name__, exc)

    async def close(self) -> None:
        """Stop taking work, give the last writes CLOSE_WRITES_S, close the client. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), CLOSE_WRITES_S)
            except (asyncio.TimeoutError, Exception):  # shutting down: what is left is dropped
                self._writer.cancel()
        for task in list(self._in_flight):
            task.cancel()
        try:
            await self._client.aclose()
        except Exception as exc:  # a connection already broken; nothing left to release
            log.debug("fleet cache: closing the client: %s", exc)

    def stats(self) -> dict:
        c = self.counts
        return {"enabled": True, "state": self.breaker.state, "breaker_opened": self.breaker.opened,
                **{k: c[k] for k in ("hits", "misses", "errors", "timeouts", "skipped", "forged", "late", "loop_late",
                                     "batches", "writes", "write_errors", "writes_dropped")},
                "write_backlog": len(self._backlog),
                "wait_hit": self.wait["hit"].summary(), "wait_miss": self.wait["miss"].summary(),
                "round_trip": self.round_trip.summary()}


async def open_fleet_cache(cfg, classes: Callable[[], int], clock=time.monotonic) -> FleetCache:
    """The fleet cache of ``cfg`` (an enabled L2Config) on the running loop. ConfigError when the
    key file or password file is unusable; Redis being down is not an error (NOTE [ fleet cache ])."""
    fleet_key = load_fleet_key(cfg.key_file)
    cache = FleetCache(cfg, fleet_key, connection.make_client(cfg), classes, asyncio.get_running_loop(), clock)
    await cache.start()
    return cache


__all__ = ["FleetCache", "open_fleet_cache", "STATES"]
