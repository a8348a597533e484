"""The daemon's event loop: accept, hello handshake, admission, replies, and an orderly stop.

Lifecycle::

    bind socket -> start each device's collector and executor, wait until each has warmed its
    model -> accept -> READY=1 (sd_notify) -> serve -> SIGTERM/SIGINT -> STOPPING=1, not ready
    (draining), still serving for fleet.drain_grace_s so a balancer stops sending first -> stop
    accepting, unlink the socket, refuse new requests (shutting_down), wait up to drain_timeout_s for
    in-flight requests -> close sessions, stop and join the device threads, unmap every ring -> exit 0

Readiness (starting / ready / draining, devices in rotation, capacity) is daemon/ops/readiness.py's
one answer, told by the admin ``health``, the client ``info`` and the HAProxy agent-check
(daemon/ops/agent_check.py, ``[fleet] agent``).

Each accepted connection goes through the hello handshake (daemon/front/handshake.py), then becomes a
Session (daemon/front/session.py).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time

from . import exitcodes
from .ops import metrics
from .pipeline.collector import Collector
from .pipeline.executor import Executor
from .pipeline.records import BatchResult
from .dispatch.device import Device
from .config import Config, ConfigError
from .front.admin import AdminServer
from .front.door import Door, raise_fd_limit
from .front.handshake import Hand, handshake
from .ops.reload import ACTIVATE_WAIT_S, ModelSwap, ReloadError
from .ops.model_ops import LiveModels, ModelOpError
from .front.listener import Listener
from .front.loop_share import LoopShare
from .front.principal import weights as principal_weights
from .oip.supervisor import FrontSupervisor
from .dispatch import fairness
from .models.catalog import UnknownModel, store_digest
from .models.loading import LoadedModel
from .ops.agent_check import AgentCheck, agent_line
from .ops.heap_trim import HeapTrim
from .ops import readiness
from .ops.sd_notify import notify
from .ops.sd_watchdog import start as start_systemd_watchdog
from .dispatch.scheduler import Scheduler
from .front.admission import Rejected
from .front.session import Session
from ..shm import wire
from .caching.embedding_store import default_path
from .caching.fleet.cache import open_fleet_cache
from .models.embedding_pooling import embedding_id

log = logging.getLogger("inferd.server")


#: How stale the door's answer in ``info`` may be (Server._door_blocked_lately).
DOOR_CHECK_S = 0.5


class Server:
    def __init__(self, cfg: Config, catalog, devices: list[Device], listener: Listener,
                 clock=time.monotonic, reread_config=None):
        """``catalog``: what is served (daemon/models/catalog.py), or one LoadedModel."""
        self.cfg = cfg
        self.devices = devices
        self.listener = listener
        self.pid = os.getpid()
        self.sessions: dict[int, Session] = {}
        # the loop's work shared per uid, weighted as the devices are (NOTE [ loop share ])
        self.turns = LoopShare(cfg.server.max_frames_per_turn, fairness.quanta(principal_weights(cfg))
                               if cfg.dispatch.fair_share else (lambda uid: 1.0))
        self.heap_trim = HeapTrim()         # the heap a closed session's buffers freed goes back
        self.draining = False
        self.scheduler = Scheduler(cfg, catalog, devices, clock)
        self.catalog = self.scheduler.catalog
        self.caches = self.scheduler.caches
        self._hand = Hand(caches=self.caches, submit=self.scheduler.submit,    # for each handshake
                          turns=self.turns, submit_many=self.scheduler.submit_many)
        self.state = "starting"             # -> ready -> draining (health on the admin socket)
        self.front = None                   # the OIP front's supervisor, with [oip] enabled
        self.swap = ModelSwap(self.scheduler, devices, cfg.embeddings, os.path.dirname(cfg.cache_path),
                              retire=self.retire, done=self.reload_done, draining=lambda: self.draining)
        # models loaded and unloaded live, and SIGHUP's [[models]] list (NOTE [ live models ])
        self.models = LiveModels(self.scheduler, devices, self.swap, draining=lambda: self.draining)
        self.admin: AdminServer | None = None
        self.door: Door | None = None        # the client socket's accept loop (daemon/front/door.py)
        self._reread_config = reread_config  # SIGHUP: a fresh Config from the same file and flags
        self._retired: list = []             # embedding stores of models swapped out
        self.counters = self.scheduler.counters
        self._clock = clock
        self._door_asked: tuple[float, str | None] = (float("-inf"), None)   # (when, answer): info's door
        self._sids = itertools.count(1)
        self._handshakes: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self.stats = self.scheduler.stats
        # Prometheus text, and the HTTP listener of [metrics] (ConfigError if it cannot be)
        self.metrics = metrics.Exporter(self.stats_snapshot, lambda: self._loop, cfg.metrics)
        # the HAProxy agent-check of [fleet], up while starting (it says "down #starting" then)
        self.agent = AgentCheck(cfg.fleet.agent, cfg.fleet.reference_fps, self.readiness) \
            if cfg.fleet.agent else None
        self._grace_over: asyncio.Event | None = None

    @property
    def model(self) -> LoadedModel:
        """The serving model (a swap changes it: daemon/ops/reload.py)."""
        return self.scheduler.model

    @property
    def reloading(self) -> bool:
        return self.swap.running

    # lifecycle --------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._stop, self._drained, self._grace_over = asyncio.Event(), asyncio.Event(), asyncio.Event()
        fd_limit = raise_fd_limit()          # before any client can take descriptors (logged)
        self.admin = AdminServer(self, self.cfg.admin_socket_path, self.cfg.server.admin_group)
        await self.admin.start()            # up while starting: `inferctl health --wait` asks it
        if not await self._start_devices():
            self._stop_devices()
            self.listener.close()
            self.admin.close()
            self._close_agent()
            return exitcodes.STARTUP_FAILED
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.handle_reload_signal)
        self.door = Door(self.listener.sock, self.cfg.server, self._start_handshake, fd_limit, self._clock)
        self.stats.door = self.door
        self.state = readiness.READY
        accept = loop.create_task(self._accept_loop())
        health_ticks = loop.create_task(self._health_ticks())
        start_systemd_watchdog(self)         # WATCHDOG=1 and STATUS= (daemon/ops/sd_watchdog.py)
        notify(f"READY=1\nMAINPID={self.pid}\nSTATUS=serving {self.model.spec.name} on "
               f"{', '.join(d.name for d in self.devices)}")
        log.info("ready: serving %s (digest %s) on %s; socket %s, admin socket %s", self.model.spec.name,
                 self.model.digest, ", ".join(d.label for d in self.devices), self.listener.path, self.admin.path)
        if not self.catalog.single:         # and the others, by name and version
            log.info("models: %s (default %s)", ", ".join(f"{s.name} v{s.version}" for s in self.catalog.live),
                     self.catalog.default.name)
        if self.cfg.oip.enabled:            # the OIP front, a supervised child (daemon/oip/supervisor.py)
            self.front = FrontSupervisor(self.cfg)
            self.front.start()
        await self._stop.wait()
        await self._announce_drain()
        health_ticks.cancel()
        await self._drain(accept)
        return exitcodes.OK

    async def _announce_drain(self) -> None:
        """Not ready from now on (the agent-check says ``drain``, health and info not ready), while
        still serving for ``fleet.drain_grace_s``: a balancer that checks within that time sends
        nothing more, so no request of its reaches a daemon that refuses. A second signal ends it."""
        self.state = readiness.DRAINING
        notify("STOPPING=1")
        grace = self.cfg.fleet.drain_grace_s
        if grace > 0 and not self._grace_over.is_set():
            log.info("draining: still serving for %.1f s (fleet.drain_grace_s) while balancers take "
                     "this host out", grace)
            try:
                await asyncio.wait_for(self._grace_over.wait(), grace)
            except asyncio.TimeoutError:
                pass

    async def _health_ticks(self) -> None:
        """Health checks on the loop (daemon/dispatch/health.py): a timer, not a poll of anything the OS
        could tell us; a stuck batch gives no event to wait on."""
        health = self.scheduler.health
        while True:
            health.check()
            await asyncio.sleep(health.tick)

    def handle_stop_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():             # a second signal: no more grace
            log.info("%s: draining now", signal.Signals(sig).name)
            self._grace_over.set()
            return
        log.info("%s: draining", signal.Signals(sig).name)
        self._stop.set()

    def handle_reload_signal(self) -> None:
        """SIGHUP: read the configuration again and swap to its model (NOTE [ model swap ])."""
        task = self._loop.create_task(self._reload_from_config())
        self._handshakes.add(task)          # kept referenced; cancelled by a drain
        task.add_done_callback(self._handshakes.discard)

    async def _reload_from_config(self) -> None:
        try:
            fresh = self._reread_config() if self._reread_config is not None else self.cfg
        except ConfigError as exc:
            log.error("SIGHUP: the configuration no longer loads; still serving %s: %s",
                      self.model.spec.name, exc)
            self.reload_done(False)
            return
        if fresh.models:
            await self._apply_models(fresh)
            return
        if self.cfg.models:
            log.error("SIGHUP: the configuration has no [[models]] list any more; still serving %s "
                      "(a restart serves [model] alone)", self.catalog.names_text())
            self.reload_done(False)
            return
        # [model] alone: its model swapped (models loaded live beside it are left as they are)
        log.info("SIGHUP: reloading the model (other configuration changes need a restart)")
        try:
            await self.swap.reload(fresh.model)
        except ReloadError:
            return                          # logged by the swap
        self.cfg.model = fresh.model
        self.scheduler.first.config = fresh.model

    async def _apply_models(self, fresh: Config) -> None:
        """SIGHUP with a [[models]] list: serve it (NOTE [ live models ] in daemon/ops/model_ops.py);
        one that does not load changes nothing, and the log says why."""
        log.info("SIGHUP: applying the [[models]] list (other configuration changes need a restart)")
        try:
            done = await self.models.apply(fresh.models)
        except ModelOpError as exc:
            log.error("SIGHUP: the [[models]] list is not applied; still serving %s as before: %s",
                      self.catalog.names_text(), exc)
            self.reload_done(False)
            return
        self.cfg.models = fresh.models
        self.reload_done(True)
        log.info("SIGHUP: serving %s (added %s; changed %s; removed %s)", self.catalog.names_text(),
                 *(", ".join(f"{m['name']} v{m['version']}" for m in done[k]) or "none"
                   for k in ("added", "changed", "removed")))

    async def _start_devices(self) -> bool:
        caches = self.caches
        if self.cfg.cache.enabled:
            caches.open_cache(self.cfg.cache_path)     # CacheError: reported by __main__
        if self.cfg.l2.enabled:             # the fleet cache (daemon/caching/fleet/cache.py); ConfigError: a bad key file
            caches.l2 = await open_fleet_cache(self.cfg.l2, lambda: len(caches.spec.labels), self._clock)
        for served in self.catalog.by_id:   # the answers each model keeps, at most the cache's
            served.keep_k = min(caches.cache.geometry.max_k, len(served.spec.labels)) \
                if caches.cache is not None else 0
        first = self.scheduler.first
        for dev in self.devices:
            # the default model's runner first: its embeddings are the store's (Executor)
            served = sorted(self.catalog.on_device(dev.index), key=lambda s: s is not first)
            if not served:
                raise ConfigError(f"device {dev.label} runs no model: every [[models]] entry's devices "
                                  f"leave it out; remove it or name it in one")
            dev.executor = Executor(
                dev, served if not self.catalog.single else self.model, deliver=self._deliver_threadsafe,
                max_batch=self.cfg.batching.max_batch, warmup_batches=self._warmup_batches(),
                keep_k=caches.keep_k, clock=self._clock)
            dev.collector = Collector(
                dev, dev.executor, batching=self.cfg.batching, policy=self.scheduler.policy,
                peers=self.devices, deliver=self._deliver_threadsafe, clock=self._clock, caches=caches)
            dev.collector.start()           # it starts the executor
        for dev in self.devices:
            await asyncio.to_thread(dev.executor.ready.wait)
            error = dev.executor.startup_error
            if isinstance(error, ConfigError):
                self._stop_devices()
                raise error                 # the model does not fit its spec: exit 78 with the key
            if error is not None:
                log.error("device %s failed to start: %r", dev.name, error)
                return False
        if self.cfg.embeddings.enabled:
            self._open_stores()
        return True

    def _open_stores(self) -> None:
        """An embedding store for each model that has an embedding, one file per model digest and
        embedding definition (so versions never share rows), handed to the devices that run it.
        ``embeddings.path`` names one file: the default model's alone then."""
        first = self.scheduler.first
        for served in [first, *(s for s in self.catalog.by_id if s is not first)]:
            dim = next((d.executor.embedding_dim_of(served.mid) for d in self.devices
                        if d.executor.runs(served.mid)), 0)
            if not dim:
                continue
            if served is not first and self.cfg.embeddings.path:
                log.warning("embeddings.path names one file, the default model's: model %s version %d "
                            "keeps no embeddings (leave embeddings.path empty for a store per model)",
                            served.name, served.version)
                continue
            embedding = embedding_id(served.spec)      # one file per model and embedding definition
            store = self.caches.open_store(self.cfg.embeddings.path or default_path(
                os.path.dirname(self.cfg.cache_path), store_digest(served.digest), embedding), dim, embedding,
                served.mid)
            for dev in self.devices:
                if dev.executor.runs(served.mid):
                    dev.executor.set_store(served.mid, store)

    def _warmup_batches(self) -> int:
        """Warm-up batches per model on each device: [model]'s, or the most any entry asks."""
        return max(getattr(s.config, "warmup_batches", self.cfg.model.warmup_batches)
                   for s in self.catalog.by_id)

    def _deliver_threadsafe(self, result: BatchResult) -> None:
        self._loop.call_soon_threadsafe(self.scheduler.on_batch_done, result)

    async def _drain(self, accept: asyncio.Task) -> None:
        if self.front is not None:          # its doors close first; what it sent still finishes below
            await self.front.stop(self.cfg.server.drain_timeout_s)
        self.draining = self.scheduler.draining = True
        self.scheduler.on_idle = self._drained.set
        accept.cancel()
        for task in list(self._handshakes):
            task.cancel()
        self.listener.close()
        if self.scheduler.outstanding:
            try:
                await asyncio.wait_for(self._drained.wait(), self.cfg.server.drain_timeout_s)
            except asyncio.TimeoutError:
                log.warning("drain: %d requests still in flight after %.1f s; stopping anyway",
                            self.scheduler.outstanding, self.cfg.server.drain_timeout_s)
        for session in list(self.sessions.values()):
            session.transport.close()
        await asyncio.to_thread(self._stop_devices)
        await asyncio.sleep(0)          # run the last on_batch_done callbacks the threads queued
        for session in list(self.sessions.values()):
            session.closed = True
            session.release_ring()
        self.sessions.clear()
        await asyncio.to_thread(self.metrics.close)       # before what a scrape reads closes
        if self.caches.l2 is not None:
            await self.caches.l2.close()          # its last writes, within a second
        self.caches.close()
        for store in self._retired:
            store.close()
        self.admin.close()
        self._close_agent()
        log.info("stopped")

    def _close_agent(self) -> None:
        if self.agent is not None:
            self.agent.close()

    def _stop_devices(self) -> None:
        for dev in self.devices:
            dev.queue.stop()
        for dev in self.devices:
            if dev.collector is not None:        # it joins its executor
                dev.collector.join(timeout=max(self.cfg.server.drain_timeout_s, 1.0))
                if dev.collector.is_alive():
                    log.error("device thread of %s did not stop", dev.name)

    # accept and hello -------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        """Until the drain cancels it: bounds, the descriptor reserve and back-off on EMFILE are
        the door's (NOTE [ the door ] in daemon/front/door.py)."""
        await self.door.run()

    def _start_handshake(self, conn, peer: tuple) -> asyncio.Task:
        task = self._loop.create_task(handshake(self, conn, self._hand, peer))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)
        return task

    # admin operations (daemon/front/admin.py) -----------------------------------------------------
    def readiness(self) -> readiness.Readiness:
        """Ready or not, why, and the capacity (daemon/ops/readiness.py); safe off the loop (the
        agent-check thread asks it)."""
        return self._readiness(self._door_blocked())

    def _door_blocked(self) -> str | None:
        """Why new clients are refused (daemon/front/door.py), asked only while serving: a draining
        server is closing the socket the question dups."""
        return self.door.blocked() if self.door is not None and self.state == readiness.READY else None

    def _door_blocked_lately(self) -> str | None:
        """The door's answer as of at most DOOR_CHECK_S ago, for ``info``, which any client may
        ask for as often as it likes: asking the door each time (a dup and a close) under an info
        flood left another uid's classify waiting 0.2-1 s for the device threads (measured by
        tests/integration/test_event_loop_attacks.py; 30-50 ms with this)."""
        now = self._clock()
        if now - self._door_asked[0] >= DOOR_CHECK_S:
            self._door_asked = (now, self._door_blocked())
        return self._door_asked[1]

    def _readiness(self, door: str | None) -> readiness.Readiness:
        return readiness.assess(self.state, self.devices, self.cfg.batching.max_batch, door)

    def health(self) -> dict:
        door = self._door_blocked()
        r = self._readiness(door)
        return {"state": r.state, "ready": r.ready, "reason": r.reason, "live": True, "door": door,
                "capacity_fps": r.capacity_fps,
                "agent": ({"address": "%s:%d" % self.agent.address, "line": agent_line(r, self.agent.reference_fps).strip(),
                           "reference_fps": self.agent.reference_fps} if self.agent else None),
                "model": {"name": self.model.spec.name, "digest": self.model.digest, "gen": self.model.gen},
                "models": [{"name": s.name, "version": s.version, "digest": s.digest, "gen": s.gen}
                           for s in self.catalog.live],
                "devices": [{"index": d.index, "name": d.label, "state": d.state} for d in self.devices],
                "in_rotation": r.in_rotation, "pid": self.pid,
                "oip": self.front.describe() if self.front is not None else None}

    def request_drain(self, who: str) -> dict:
        log.info("%s: draining", who)
        self._stop.set()
        return {"draining": True, "outstanding": self.scheduler.outstanding}

    def flush_cache(self, peer: tuple) -> dict:
        """Empty the result cache (admin socket only)."""
        cache = self.caches.cache
        if cache is None:
            raise Rejected(wire.E_INVALID_INPUT, "the result cache is disabled (cache.enabled)")
        dropped, generation = self.caches.flush()
        log.info("result cache flushed by pid %d uid %d: %d entries dropped", peer[0], peer[1], dropped)
        return {"dropped": dropped, "generation": generation}

    def set_device(self, index: int, enable: bool, who: str) -> dict:
        """Take a device out of rotation (its queued work moves to the others) or put it back."""
        dev = self.devices[index]
        health = self.scheduler.health
        (health.enable if enable else health.disable)(dev, f"by {who}")
        return {"device": {"index": dev.index, "name": dev.label, "state": dev.state},
                "in_rotation": sum(d.healthy for d in self.devices)}

    def promote(self, name, version, who: str) -> dict:
        """Make ``version`` (None: the canary) of model ``name`` take every request that names no
        version (Catalog.promote): on the loop, between two requests, so none fails; requests in
        flight finish on the version they resolved to. Rejected (unknown_model) naming the models."""
        if not isinstance(name, str) or (version is not None and type(version) is not int):
            raise Rejected(wire.E_INVALID_INPUT, "promote takes model (a name) and version (an integer, "
                           "optional: the canary)")
        try:
            served = self.catalog.promote(name, version)
        except UnknownModel as exc:
            raise Rejected(wire.E_UNKNOWN_MODEL, str(exc)) from None
        log.info("model %s version %d promoted by %s: it takes every request naming no version",
                 served.name, served.version, who)
        return {"promoted": {"name": served.name, "version": served.version},
                "route": self.catalog.routes[served.name].describe()}

    def reload_done(self, ok: bool) -> None:
        self.scheduler.stats.reload_done(ok)

    def retire(self, store, activated: list) -> None:
        """Close a swapped-out model's embedding store once every device thread let go of it
        (``activated``: their futures); at shutdown if one never does."""
        self._retired.append(store)
        futures = [asyncio.wrap_future(f) for f in activated]

        async def close_when_released():
            done, pending = await asyncio.wait(futures, timeout=ACTIVATE_WAIT_S)
            if not pending and store in self._retired:
                self._retired.remove(store)
                store.close()
        task = self._loop.create_task(close_when_released())
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def next_session_id(self) -> int:
        return next(self._sids)

    def session_opened(self, session: Session) -> None:
        """A session passed hello (daemon/front/handshake.py) and takes over its socket."""
        self.sessions[session.sid] = session
        self.stats.session_opened(session.peer[1])
        self.counters["sessions"] += 1

    def session_closed(self, session: Session) -> None:
        if self.sessions.pop(session.sid, None) is not None:
            self.stats.session_closed(session.peer[1])
        if not session.inflight:
            session.release_ring()
        if session.heavy:
            self.heap_trim.request()

    def labels_of(self, msg: dict) -> dict:
        """The ``labels`` reply: the named model's (``model``, ``version``), else the default's.
        Rejected (unknown_model) naming the models there are."""
        if msg.get("model") is None and msg.get("version") is None:
            return self.model.labels()
        try:
            return self.catalog.resolve(msg.get("model"), msg.get("version"), 0, 0).model.labels()
        except UnknownModel as exc:
            raise Rejected(wire.E_UNKNOWN_MODEL, str(exc)) from None

    def info(self) -> dict:
        """The client socket's ``info``: O(devices), nothing scanned (the cache keeps its count)."""
        r = self._readiness(self._door_blocked_lately())
        return {"model": self.model.describe(), "pid": self.pid, "sessions": len(self.sessions),
                "ready": r.ready, "state": r.state, "reason": r.reason, "capacity_fps": r.capacity_fps,
                "oip": self.front.describe() if self.front is not None else None, **self.scheduler.describe()}

    # stats ------------------------------------------------------------------------------------
    def stats_snapshot(self) -> dict:
        """Everything an operator reads (admin ``stats``, the Prometheus text), as plain data that
        msgpack carries: str keys, ints, floats, lists. Kept as events happened (NOTE [ stats ] in
        daemon/ops/stats.py), so taking it costs O(devices + uids + buckets). Loop thread only."""
        snap = self.stats.snapshot()
        model = self.model
        snap.update(model={"name": model.spec.name, "digest": model.digest, "gen": getattr(model, "gen", 0)},
                    pid=self.pid, policy=self.scheduler.policy.name, in_flight=self.scheduler.outstanding,
                    sessions={"open": len(self.sessions), "opened": self.counters["sessions"]},
                    cache=self.caches.stats(), readiness=self.readiness().as_dict())
        return snap

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition (daemon/ops/metrics.py lists the families)."""
        return self.metrics.text()
