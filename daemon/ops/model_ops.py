"""Models loaded and unloaded while the daemon serves: the admin socket's load and unload, and
SIGHUP's changed ``[[models]]`` list.

NOTE [ live models ]

    load NAME PATH (admin ``load``, or an entry SIGHUP finds added)
      |  one model operation at a time (a reload too); refused while draining
      v
    the entry's keys checked as start-up checks a [[models]] entry     any failure: nothing of the
    load the model on the CPU, off the loop (asyncio.to_thread)        model is kept, the others
    its versions of one name take one frame shape                      serve as before, the reply
      |                                                                and the log say why
      v
    a model id (a new one, or one an unloaded model freed); on every
    device an empty lane and a latency profile for it (Scheduler.add_lanes)
    each device that may run it, one after another, between two
    batches: staging buffers, replica, warm-up (Executor.add)
      |
      v
    register, on the loop in one step (Catalog.enter): requests resolve to it from the next one on

    unload NAME [VERSION] (admin ``unload``, or an entry SIGHUP finds removed)
      |
      v
    on the loop in one step (Catalog.remove): no request resolves to it any more; one naming it
    gets unknown_model, whose message lists the models there are
      |
      v
    the requests admitted before (queued, staged, running: each keeps its Served) are computed and
    answered as any other; the last answer (Scheduler._let_go) wakes the unload
      |
      v
    each device frees its replica and staging buffers (Executor.drop); its id may be reused

Nothing fails for the models that stay: their lanes, runners and routes are not touched, and a
device pauses for a load only as long as a swap's staging pauses it (one warm-up). The model loaded
first (the default at start-up) stays until a restart: the result cache's generation, the embedding
store and hello's ``model`` are its (daemon/dispatch/scheduler.py ``first``); reload it to change it.

SIGHUP (``apply``): the configuration read again, its ``[[models]]`` list compared with what is
served by (name, version): entries added are loaded, removed are unloaded, changed (any key) are
swapped (daemon/ops/reload.py), a changed ``devices`` unloads and loads again, the rest untouched.
Every new model is loaded on the CPU and staged on its devices before anything changes; a list
that does not load (a bad key, a missing file, another frame size, the first model removed)
changes nothing, and the log says why. Then, in one loop step, the added are registered, the
changed switched and the removed unrouted; the removed are freed once their requests are answered.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from ..config import ConfigError, ModelEntryConfig, entry_name, from_dict
from ..models import loading as model_mod
from ..models.catalog import DEFAULT_NAME, Served
from .reload import ReloadError
from ...shm import wire

log = logging.getLogger("inferd.models")

#: Keys ``load`` takes besides a [[models]] entry's own (``set``: any of those).
LOAD_FIELDS = ("name", "model", "version", "devices", "share", "canary_percent", "canary_uids", "set")
MAX_KEYS = 64


class ModelOpError(Exception):
    """A load or unload that cannot be done; what is served is unchanged. ``code``: the wire error
    (invalid_input: the request is wrong; unknown_model: no such model; reload_failed: the model
    does not load or warm)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(eq=False)
class _Plan:
    """What SIGHUP's list changes: entries to add, served models to swap (with their new entry)
    and to remove."""

    added: list
    changed: list           # [(Served, entry)]
    removed: list           # [Served]


class LiveModels:
    """Loads and unloads models while serving (NOTE [ live models ]), given what that touches:
    the ``scheduler`` (its catalog, lanes, first model, caches), the ``devices`` (their executors),
    the ``swap`` (daemon/ops/reload.py: a changed entry is swapped; one operation at a time is its
    ``running``) and ``draining()``."""

    def __init__(self, scheduler, devices: list, swap, *, draining):
        self.scheduler = scheduler
        self.devices = devices
        self.swap = swap
        self._draining = draining
        self._reserved: set[int] = set()    # model ids given to models staged, not yet routed
        self._stores: dict = {}             # their embedding stores, by model id, until routed

    @property
    def catalog(self):
        return self.scheduler.catalog

    # what is served -----------------------------------------------------------------------------
    def describe(self) -> dict:
        """The admin ``models`` reply: each model served (name, version, route, default, devices,
        share, digest, generation, requests in flight, state) and the routes; a model being
        unloaded is listed with state ``unloading`` until its last request is answered."""
        models = [{**m, "state": "serving"} for m in self.catalog.describe()]
        for m, s in zip(models, self.catalog.live):
            m["inflight"] = s.inflight
        models += [{"name": s.name, "version": s.version, "digest": s.digest, "gen": s.gen,
                    "route": None, "default": False, "share": s.share, "inflight": s.inflight,
                    "devices": sorted(s.devices) if s.devices is not None else None, "state": "unloading"}
                   for s in self.catalog.by_id if s.retired and not s.released]
        return {"models": models, "routes": self.catalog.routes_describe(),
                "default_model": self.catalog.default.name}

    # load ---------------------------------------------------------------------------------------
    def entry(self, msg: dict) -> ModelEntryConfig:
        """The [[models]] entry an admin ``load`` describes: ``name``; ``model`` (a file path, or a
        built-in's name); ``version``, ``devices``, ``share``, ``canary_percent``, ``canary_uids``;
        ``set``: any other entry keys. Checked as start-up checks one; ModelOpError says which key."""
        settings = msg.get("set") or {}
        if not isinstance(settings, dict) or len(settings) > MAX_KEYS or not all(isinstance(k, str) for k in settings):
            raise ModelOpError(wire.E_INVALID_INPUT, f"set must be a table of at most {MAX_KEYS} [[models]] keys")
        keys = {k.removeprefix("model."): v for k, v in settings.items()}
        source = msg.get("model")
        if source is not None:
            if not isinstance(source, str) or not source or len(source) > 4096:
                raise ModelOpError(wire.E_INVALID_INPUT, "model must be a built-in name or a file path")
            keys["path" if "/" in source or "." in source else "builtin"] = source
        for key in LOAD_FIELDS[2:-1] + ("name",):
            if msg.get(key) is not None:
                keys[key] = msg[key]
        if not keys.get("name"):
            raise ModelOpError(wire.E_INVALID_INPUT, "name: a load names the model (inferctl load NAME PATH)")
        if not keys.get("path") and not keys.get("builtin"):
            raise ModelOpError(wire.E_INVALID_INPUT, "model: a load names a model file or a built-in "
                               "(inferctl load NAME PATH)")
        if keys.get("default"):
            raise ModelOpError(wire.E_INVALID_INPUT, "default: the default model changes only at a restart")
        try:
            return from_dict({"models": [keys]}).models[0]
        except ConfigError as exc:
            raise ModelOpError(wire.E_INVALID_INPUT, str(exc).replace("models[0].", "")) from None

    async def load(self, entry: ModelEntryConfig) -> dict:
        """Load ``entry`` beside the models served and route requests to it (NOTE [ live models ]).
        Returns the admin reply; ModelOpError leaves everything as it was."""
        t0 = time.perf_counter()
        async with self._one_at_a_time():
            served = await self._prepare(entry, self._check_new(entry, set()))
            self._route(served)
            self._stamps()
        seconds = time.perf_counter() - t0
        log.info("model %s version %d loaded (digest %s) on %s in %.2f s", served.name, served.version,
                 served.digest, self._where(served), seconds)
        return {"loaded": _brief(served), "route": self.catalog.routes[served.name].describe(),
                "seconds": seconds}

    def _check_new(self, entry, leaving: set) -> str:
        """``entry`` may be loaded (its name and version not served but for ``leaving``'s, its
        devices exist); its name."""
        name = entry_name(entry)
        route = self.catalog.routes.get(name)
        held = route.versions.get(entry.version) if route is not None else None
        if held is not None and (name, entry.version) not in leaving:
            raise ModelOpError(wire.E_INVALID_INPUT, f"model {name} version {entry.version} is served already: "
                               f"reload it (inferctl reload {name}) or load another version")
        if name == DEFAULT_NAME:
            raise ModelOpError(wire.E_INVALID_INPUT, '"default" names the default model; choose another name')
        bad = sorted(i for i in (entry.devices or ()) if i >= len(self.devices))
        if bad:
            raise ModelOpError(wire.E_INVALID_INPUT, f"devices {bad} do not exist; this daemon has "
                               f"{len(self.devices)} device(s), 0 to {len(self.devices) - 1}")
        return name

    async def _load_cpu(self, entry) -> object:
        try:
            return await asyncio.to_thread(model_mod.load, entry)
        except ConfigError as exc:
            raise ModelOpError(wire.E_RELOAD_FAILED, f"model {entry_name(entry)} version {entry.version} "
                               f"does not load: {exc}") from None
        except MemoryError:
            raise ModelOpError(wire.E_RELOAD_FAILED, f"model {entry_name(entry)} does not fit this host's "
                               "memory beside the models served") from None

    async def _prepare(self, entry, name: str, model=None, current=None) -> Served:
        """``entry`` loaded (``model``: already, on the CPU), lanes on every device, staged and warm
        on each device that may run it; not yet routed. ModelOpError: nothing of it is kept."""
        model = model or await self._load_cpu(entry)
        self._check_frames(name, model)
        cache = self.scheduler.caches.cache
        keep_k = min(cache.geometry.max_k, len(model.spec.labels)) if cache is not None else 0
        mid = self.catalog.free_mid(self._reserved)
        self._reserved.add(mid)             # until it is entered or let go (several loads in one list)
        served = Served(mid, model.spec.name, entry.version, model,
                        frozenset(entry.devices) if entry.devices else None, entry.share, keep_k, config=entry)
        shares = [s.share for s in self.catalog.by_id] + [0.0] * (mid + 1 - len(self.catalog.by_id))
        shares[mid] = served.share
        self.scheduler.add_lanes(mid, shares)
        staged, dims = [], []
        for dev in self.devices:
            if not served.runs_on(dev.index):
                continue
            try:
                dims.append(await asyncio.wrap_future(dev.executor.add(model, keep_k, mid)))
            except Exception as exc:  # any failure on a device: the others let it go too
                for other in staged:
                    other.executor.drop(mid)
                why = str(exc).split("\n")[0]
                raise ModelOpError(wire.E_RELOAD_FAILED, f"model {name} version {entry.version} on "
                                   f"{dev.label}: {type(exc).__name__}: {why}") from None
            staged.append(dev)
        try:                                # its embeddings in a store of its own digest
            self._stores[mid] = await self.swap.open_store(model, dims[0] if dims else 0, current)
        except ReloadError as exc:
            for dev in staged:
                dev.executor.drop(mid)
            raise ModelOpError(wire.E_RELOAD_FAILED, f"model {name} version {entry.version}: {exc}") from None
        return served

    def _route(self, served: Served) -> None:
        """On the loop, no await: its embedding store in place, then requests resolve to it."""
        store = self._stores.pop(served.mid, None)
        if store is not None:
            self.scheduler.caches.stores[served.mid] = store
            for dev in self.devices:
                if dev.executor.runs(served.mid):
                    dev.executor.set_store(served.mid, store)
        self.catalog.enter(served)

    def _check_frames(self, name: str, model, leaving=()) -> None:
        """Versions of one name take one frame: a client sizes a frame for a name before the route
        picks the version."""
        route = self.catalog.routes.get(name)
        for other in (route.versions.values() if route is not None else ()):
            if other in leaving:
                continue
            if (other.spec.frame_shape, other.spec.input_form) != (model.spec.frame_shape, model.spec.input_form):
                h, w, _ = other.spec.frame_shape
                raise ModelOpError(wire.E_RELOAD_FAILED, f"model {name}: version {other.version} takes "
                                   f"{h}x{w} {other.spec.input_form} frames and versions of one name must "
                                   "take the same frames: give it another name")

    # unload -------------------------------------------------------------------------------------
    def targets(self, name, version=None) -> list[Served]:
        """The models ``unload NAME [VERSION]`` removes: that version, or every version of the name."""
        if not isinstance(name, str) or (version is not None and type(version) is not int):
            raise ModelOpError(wire.E_INVALID_INPUT, "unload takes name (a model name) and version "
                               "(an integer, optional: every version)")
        route = self.catalog.routes.get(self.catalog.default.name if name == DEFAULT_NAME else name)
        if route is None or (version is not None and version not in route.versions):
            what = f"{name!r}" if version is None else f"{name!r} version {version}"
            raise ModelOpError(wire.E_UNKNOWN_MODEL, f"no model {what} is served; the models are "
                               f"{self.catalog.names_text()}")
        targets = list(route.versions.values()) if version is None else [route.versions[version]]
        first = self.scheduler.first
        if first in targets:
            raise ModelOpError(wire.E_INVALID_INPUT, f"model {first.name} version {first.version} is the "
                               "daemon's first model (the result cache's and embedding store's, hello's "
                               "default): it stays until a restart; reload it to change it")
        return targets

    async def unload(self, name, version=None) -> dict:
        """Stop routing to the named model(s) at once, answer their requests admitted already, then
        free them (NOTE [ live models ]). Returns the admin reply once they are freed."""
        targets = self.targets(name, version)
        t0 = time.perf_counter()
        async with self._one_at_a_time():
            pending = self._unroute(targets)
            await self._release(targets)
        seconds = time.perf_counter() - t0
        return {"unloaded": [_brief(s) for s in targets], "answered": pending, "seconds": seconds}

    def _unroute(self, targets: list[Served]) -> int:
        """On the loop, one step: no request resolves to ``targets`` from now on. Returns how many
        of their requests are still to be answered."""
        for s in targets:
            self.catalog.remove(s)
            log.info("model %s version %d unloaded: no request goes to it; %d admitted before are "
                     "still answered", s.name, s.version, s.inflight)
        self._stamps()
        return sum(s.inflight for s in targets)

    async def _release(self, targets: list[Served]) -> None:
        """Once each target's last request is answered, its replica and buffers go on every device."""
        for s in targets:
            if s.inflight:
                idle = asyncio.Event()
                s.on_idle = idle.set
                await idle.wait()
            s.on_idle = None
            for dev in self.devices:
                if dev.executor.runs(s.mid):
                    await asyncio.wrap_future(dev.executor.drop(s.mid))
            store = self.scheduler.caches.stores.pop(s.mid, None)
            if store is not None and store not in self.scheduler.caches.stores.values():
                store.close()               # no device holds it any more (nor a model loaded again)
            s.released = True
            self._stamps()
            log.info("model %s version %d freed on its devices", s.name, s.version)

    # SIGHUP ---------------------------------------------------------------------------------------
    async def apply(self, entries: list) -> dict:
        """Serve the ``[[models]]`` list ``entries`` (NOTE [ live models ]: SIGHUP). ModelOpError
        changes nothing. Returns what changed (names and versions)."""
        async with self._one_at_a_time():
            plan = self._plan(entries)
            leaving = {(s.name, s.version) for s in plan.removed}
            loaded = []
            for entry in plan.added:
                name = self._check_new(entry, leaving)
                loaded.append((entry, name, await self._load_cpu(entry)))
            swaps = []
            for served, entry in plan.changed:
                new = served.model
                if _model_keys(entry) != _model_keys(served.config):
                    new = await self._load_cpu(entry)
                    if new.spec.frame_shape != served.spec.frame_shape:
                        raise ModelOpError(wire.E_RELOAD_FAILED, f"model {served.name} version {served.version}: "
                                           "a new input size needs a restart")
                swaps.append([served, entry, new, None])
            for entry, name, model in loaded:
                self._check_frames(name, model, leaving=plan.removed)
            added = await self._stage_all(loaded, swaps, plan.removed)
            # one loop step from here on: what requests resolve to changes all at once
            pending = self._unroute(plan.removed)
            for served in added:
                self._route(served)
            self._stamps()
            for served, entry, new, store in swaps:
                if new is not served.model:
                    self.swap.switch(served, new, store)
                served.config, served.share = entry, entry.share
                for dev in self.devices:
                    dev.set_share(served.mid, entry.share)
                self.catalog.reroute(served.name)
        summary = {"added": [_brief(s) for s in added], "changed": [_brief(s) for s, *_ in swaps],
                   "removed": [_brief(s) for s in plan.removed], "answered": pending}
        log.info("[[models]] applied: %d added, %d changed, %d removed", len(added), len(swaps), len(plan.removed))
        await self._release(plan.removed)
        return summary

    def _plan(self, entries: list) -> _Plan:
        """Compare ``entries`` with what is served, by (name, version)."""
        served = {(s.name, s.version): s for s in self.catalog.live}
        wanted = {(entry_name(e), e.version): e for e in entries}
        first = self.scheduler.first
        if (first.name, first.version) not in wanted:
            raise ModelOpError(wire.E_INVALID_INPUT, f"the list leaves out {first.name} version {first.version}, "
                               "the daemon's first model: it stays until a restart")
        default = next((e for e in entries if e.default), entries[0])
        if entry_name(default) != self.catalog.default.name:
            raise ModelOpError(wire.E_INVALID_INPUT, f"the default model would be {entry_name(default)}, it is "
                               f"{self.catalog.default.name}: the default changes only at a restart")
        plan = _Plan([e for key, e in wanted.items() if key not in served], [], [])
        for key, s in served.items():
            entry = wanted.get(key)
            if entry is None:
                plan.removed.append(s)
            elif sorted(entry.devices or ()) != sorted(getattr(s.config, "devices", None) or ()):
                if s is first:
                    raise ModelOpError(wire.E_INVALID_INPUT, f"model {s.name}: the first model's devices "
                                       "change only at a restart")
                plan.removed.append(s)          # on other devices: unloaded, and loaded again
                plan.added.append(entry)
            elif entry != s.config:
                plan.changed.append((s, entry))
        return plan

    async def _stage_all(self, loaded: list, swaps: list, removed: list) -> list[Served]:
        """Stage every added model, and every changed one's new model, on its devices; a failure
        lets every staged one go (nothing changed). Fills each swap's store (the first model's)."""
        added, staged = [], []
        try:
            for entry, name, model in loaded:
                # the same name and version unloaded in this list (its devices changed): its
                # store, the same file, is taken over rather than opened twice
                leaving = next((s for s in removed if (s.name, s.version) == (name, entry.version)), None)
                current = self.scheduler.caches.stores.get(leaving.mid) if leaving is not None else None
                added.append(await self._prepare(entry, name, model, current))
            for swap in swaps:
                served, _, new, _ = swap
                if new is not served.model:
                    new.gen = served.gen + 1
                    staged.append(new)
                    swap[3] = await self.swap.stage(served, new)
        except Exception as exc:
            for served in added:
                for dev in self.devices:
                    if dev.executor.runs(served.mid):
                        dev.executor.drop(served.mid)
                store = self._stores.pop(served.mid, None)
                if store is not None and store not in self.scheduler.caches.stores.values():
                    store.close()
            for new in staged:
                for dev in self.devices:
                    dev.executor.discard(new.gen)
            if isinstance(exc, ModelOpError):
                raise
            raise ModelOpError(wire.E_RELOAD_FAILED, str(exc)) from None
        return added

    # -------------------------------------------------------------------------------------------
    def _one_at_a_time(self):
        """Held across one model operation: a reload, a load, an unload or a list applied."""
        if self._draining():
            raise ModelOpError(wire.E_RELOAD_FAILED, "the daemon is draining")
        if self.swap.running:
            raise ModelOpError(wire.E_RELOAD_FAILED, "another model operation (a reload, load or unload) "
                               "is in progress; retry when it is done")
        return _Running(self.swap, self._reserved)

    def _stamps(self) -> None:
        """The scheduler's ``several``: replies say which model answered, and a request's device
        is chosen among its model's, while several models are served or one is still being
        unloaded (its requests admitted before may be dispatched again)."""
        self.scheduler.several = not self.catalog.single or any(s.retired and not s.released
                                                                for s in self.catalog.by_id)

    def _where(self, served: Served) -> str:
        return ", ".join(d.label for d in self.devices if served.runs_on(d.index))


class _Running:
    """``swap.running`` held for one operation (the systemd watchdog forgives a pause meanwhile)."""

    def __init__(self, swap, reserved: set):
        self.swap, self.reserved = swap, reserved

    async def __aenter__(self):
        self.swap.running = True

    async def __aexit__(self, *exc):
        self.swap.running = False
        self.reserved.clear()


def _model_keys(cfg) -> dict:
    """A configured model's keys that make its model (all but where and how much it runs)."""
    keys = dataclasses.asdict(cfg) if cfg is not None else {}
    for key in ("devices", "share", "default", "canary_percent", "canary_uids"):
        keys.pop(key, None)
    return keys


def _brief(served: Served) -> dict:
    return {"name": served.name, "version": served.version, "digest": served.digest, "gen": served.gen}
