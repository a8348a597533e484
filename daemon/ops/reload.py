"""Model swap: load and warm a new model beside the serving one, switch, let the old one finish.

NOTE [ model swap ]

    admin `reload [MODEL] [section] [set]` or SIGHUP
      |  (one at a time; refused while draining)
      v
    the [model] keys, checked as start-up checks them (model_config)  ConfigError: old model keeps
    load the model on the CPU, off the loop (asyncio.to_thread)       serving, the reply and the
    check: same frame shape as the serving model                      log say why
      |
      v
    for each device, one after another (the others keep serving):
      Executor.stage(model): between two batches the executor
      puts it on its device, checks its output, warms it up           any failure: every staged
      |                                                               copy is discarded, the old
      v                                                               model keeps serving
    switch, on the loop, in one step (no await in between):
      model.gen = old.gen + 1; scheduler keys and checks by the new
      model; the result cache is emptied; each thread is told to
      activate gen at its next batch
      |
      v
    each thread: the batch running now finishes on the old model;
    the next batch runs on the new one; the old replica is dropped

Nothing fails across the swap: no request is refused for it, and a request admitted before the
switch is computed by whichever model its batch runs on. Every answer says which (``gen`` in the
reply, daemon/dispatch/scheduler.py ``_stamp``), and the first answer of the new generation a session
receives carries the new model's description, so its client learns the new labels and digest.

The cache can't hold a stale answer: an answer is stored only when the model that computed it is
the one serving (``result.gen == scheduler.gen``), under a key made with that model's digest (a
request admitted before the switch is keyed again); and the switch empties the cache, so a client
that still keys its local lookups by the old digest misses and asks the daemon. A swap to a model
with another input size is refused: clients' rings and resized frames are of the old size (restart
the daemon for that; clients reconnect, see inferd.client). Another input *form* of the same size
is a swap like any other: a daemon started on a built-in (float_nchw) swaps to a file model that
takes uint8_nhwc when the reload names the keys such a model needs (``model.input``,
``input_height``, ``input_width``), as the configuration would.

What a swap changes is named in :class:`ModelSwap`: the scheduler (which keys, checks and stamps
requests by the serving model, and so is where the serving model lives), the devices' executor
threads, the embedding store held by the scheduler's caches, and two callbacks (retire a swapped-out
store, count the outcome). It never touches the Server.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from ..caching.embedding_store import EmbeddingStore, EmbeddingStoreError, default_path, index_options
from ..config import ConfigError, ModelConfig, ModelEntryConfig, entry_name, from_dict
from ..models import loading as model_mod
from ..models.catalog import UnknownModel, store_digest
from ..models.embedding_pooling import embedding_id

log = logging.getLogger("inferd.reload")

#: How long the swap waits for every thread to switch before it frees the old embedding store
#: anyway at shutdown instead (a device stuck in a batch switches only when that batch returns).
ACTIVATE_WAIT_S = 30.0

#: Keys that describe one model file, not how any model is served: a reload to a built-in by name
#: drops them, so a file model's mean, labels or name never follow the swap to a built-in.
FILE_MODEL_KEYS = ("path", "format", "input", "mean", "std", "labels", "name")
MAX_KEYS = 64          # a [model] section has fewer keys; more is not a request to read


class ReloadError(Exception):
    """The new model cannot be served; the old one still is. The message says why."""


def model_config(configured: ModelConfig, source: str | None = None, section: dict | None = None,
                 settings: dict | None = None) -> ModelConfig:
    """The [model] section a reload loads, checked as start-up checks the configuration.

    ``configured``: the configuration's [model] section. ``section``: a whole [model] table in its
    place (``inferctl reload --model-config FILE``). ``source``: a built-in name, or a file path
    when it has a '/' or a '.', read as ``inferd --model`` reads it (a built-in drops the file
    model's keys, FILE_MODEL_KEYS). ``settings``: keys set on top (``--set model.KEY=VALUE``).
    Nothing given: ``configured`` itself (its file read again, picking up a model replaced on
    disk). A ``[[models]]`` entry (ModelEntryConfig) stays one: its name, version, devices, share
    and route keys are kept whatever the source, so the swap keeps its place in the catalog.
    ReloadError names the key that is wrong."""
    if not source and section is None and not settings:
        return configured
    entry = isinstance(configured, ModelEntryConfig)
    if section is not None:
        keys = dict(_table("section", section))
    else:
        keys = {k: v for k, v in dataclasses.asdict(configured).items() if v is not None}
    if source:
        if "/" in source or "." in source:
            keys["path"] = source
        else:
            for key in FILE_MODEL_KEYS:
                keys.pop(key, None)
            keys["builtin"] = source
    keys.update(_table("set", settings or {}))
    try:
        if entry:
            model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
            keys = {k: v for k, v in keys.items() if k in model_keys}
            keys.update({k: v for k, v in dataclasses.asdict(configured).items()
                         if k not in model_keys and v is not None}, name=entry_name(configured))
            return from_dict({"models": [keys]}).models[0]
        return from_dict({"model": keys}).model
    except ConfigError as exc:
        raise ReloadError(str(exc)) from None


def _table(field: str, value) -> dict:
    """``value`` as a table of [model] keys (``model.`` before a key is allowed); ReloadError else."""
    if not isinstance(value, dict) or len(value) > MAX_KEYS or not all(isinstance(k, str) for k in value):
        raise ReloadError(f"{field} must be a table of at most {MAX_KEYS} [model] keys")
    return {k.removeprefix("model."): v for k, v in value.items()}


class ModelSwap:
    """Swaps the served model (NOTE [ model swap ]) given what that touches and nothing more.

    ``scheduler``: admits, keys and stamps requests by ``scheduler.model``, the serving model
    (daemon/dispatch/scheduler.py ``switch_model``); its ``caches`` holds the result cache and the
    embedding store. ``devices``: each one's executor stages and activates the new model.
    ``embeddings``: the [embeddings] section; ``store_dir``: where default-named stores live.
    ``retire(store, activated)``: close a swapped-out store once every thread let go of it.
    ``done(ok)``: count the outcome. ``draining()``: True once the daemon stops taking work."""

    def __init__(self, scheduler, devices: list, embeddings, store_dir: str, *, retire, done, draining):
        self.scheduler = scheduler
        self.devices = devices
        self.embeddings = embeddings
        self.store_dir = store_dir
        self._retire, self._done, self._draining = retire, done, draining
        self.running = False          # a swap under way (the systemd watchdog reads it)

    @property
    def model(self):
        return self.scheduler.model

    def target(self, name, version=None):
        """The Served a reload swaps: the named model (``version``: the default route's when None),
        or with one model that one. ReloadError when several are served and none is named, or the
        name is not served."""
        catalog = self.scheduler.catalog
        if name is None and version is None:
            if not catalog.single:
                raise ReloadError(f"this daemon serves several models ({catalog.names_text()}): name the "
                                  f"one to reload (inferctl reload --name NAME)")
            return self.scheduler.first
        if not isinstance(name, str) or (version is not None and type(version) is not int):
            raise ReloadError("name must be a model name and version an integer")
        try:
            return catalog.resolve(name, version, 0, 0) if version is not None else catalog.routes[
                name if name != "default" else catalog.default.name].stable
        except (UnknownModel, KeyError):
            raise ReloadError(f"no model {name!r} is served; the models are {catalog.names_text()}") from None

    async def reload(self, configured: ModelConfig, source: str | None = None, section: dict | None = None,
                     settings: dict | None = None, served=None) -> dict:
        """Swap ``served`` (a catalog Served; None: the first model, a one-model daemon's) to the
        model :func:`model_config` describes. Returns what the admin reply says; raises
        ReloadError, with the old model still serving."""
        if self._draining():
            raise ReloadError("the daemon is draining")
        if self.running:
            raise ReloadError("a reload is already in progress")
        self.running = True
        t0 = time.perf_counter()
        served = served or self.scheduler.first
        old = served.model
        try:
            model_cfg = model_config(configured, source, section, settings)
            try:
                new = await asyncio.to_thread(model_mod.load, model_cfg)
            except ConfigError as exc:
                raise ReloadError(f"cannot load the model: {exc}") from None
            if new.spec.frame_shape != old.spec.frame_shape:
                raise ReloadError(f"the new model takes {_shape(new)} frames, the serving one {_shape(old)}: "
                                  "a new input size needs a restart (clients reconnect by themselves)")
            if new.digest == old.digest and new.spec == old.spec:
                log.info("reload: %s unchanged (digest %s); nothing to do", new.spec.name, new.digest)
                return {"changed": False, "model": _brief(old), "seconds": time.perf_counter() - t0}
            new.gen = old.gen + 1
            dim = await self._stage(new, served)
            if served is self.scheduler.first:      # the embedding store is the first model's
                store = await asyncio.to_thread(self._open_store, new, dim, self.scheduler.caches.store)
                self._switch(new, store)
            else:
                # (embeddings.path names the default model's one file: the others keep none)
                store = None if self.embeddings.path else await asyncio.to_thread(
                    self._open_store, new, dim, self.scheduler.caches.stores.get(served.mid))
                self._switch_other(served, new, store)
        except ReloadError as exc:
            log.error("reload failed; still serving %s (digest %s): %s", old.spec.name, old.digest, exc)
            self._done(False)
            raise
        finally:
            self.running = False
        seconds = time.perf_counter() - t0
        log.info("reload: %s (digest %s) -> %s (digest %s), generation %d, on %d devices in %.2f s",
                 old.spec.name, old.digest, new.spec.name, new.digest, new.gen, len(self.devices), seconds)
        self._done(True)
        return {"changed": True, "model": _brief(new), "previous": _brief(old), "seconds": seconds}

    async def stage(self, served, new):
        """``new`` staged and warm in ``served``'s place on its devices, and its embedding store
        opened: the store (or None). A [[models]] list applied by SIGHUP (daemon/ops/model_ops.py)
        stages every change before it switches any. ReloadError: the devices staged let it go."""
        dim = await self._stage(new, served)
        first = served is self.scheduler.first
        caches = self.scheduler.caches
        return await self.open_store(new, dim, caches.store if first else caches.stores.get(served.mid), first)

    async def open_store(self, new, dim: int, current=None, first: bool = False):
        """The embedding store of ``new`` (off the loop), or None: for a model other than the first
        none when ``embeddings.path`` names the default model's one file. ReloadError says why not."""
        if not first and self.embeddings.path:
            return None
        return await asyncio.to_thread(self._open_store, new, dim, current)

    def switch(self, served, new, store) -> None:
        """Switch ``served`` to ``new`` staged by ``stage`` (on the loop, no await)."""
        if served is self.scheduler.first:
            self._switch(new, store)
        else:
            self._switch_other(served, new, store)

    async def _stage(self, new, served) -> int:
        """Load and warm ``new`` in ``served``'s place on every device that runs it, one after
        another. Returns the embedding width."""
        caches = self.scheduler.caches
        keep_k = min(caches.cache.geometry.max_k, len(new.spec.labels)) if caches.cache is not None else 0
        staged, dims = [], []
        for dev in self.devices:
            if not dev.executor.runs(served.mid):
                continue
            try:
                dims.append(await asyncio.wrap_future(dev.executor.stage(new, keep_k, served.mid)))
            except Exception as exc:  # any failure of the new model on a device keeps the old one
                for other in staged:
                    other.executor.discard(new.gen)
                if isinstance(exc, ConfigError):
                    raise ReloadError(f"{dev.label}: {exc}") from None
                raise ReloadError(f"{dev.label}: {type(exc).__name__}: {exc}") from None
            staged.append(dev)
        return dims[0] if dims else 0

    def _open_store(self, new, dim: int, current=None):
        """The embedding store of the new model (one file per digest), or None. ``current``: the
        store of the model it replaces, kept when it is that very file (the same weights and
        embedding definition: a swap that changes labels or top-k only)."""
        cfg = self.embeddings
        if not (cfg.enabled and dim):
            return None
        embedding = embedding_id(new.spec)
        path = cfg.path or default_path(self.store_dir, store_digest(new.digest), embedding)
        if current is not None and current.path == path and current.dim == dim:
            return current
        if cfg.path and self.scheduler.caches.store is not None:
            raise ReloadError("embeddings.path names one file: a model swap needs a store per model; "
                              "leave embeddings.path empty (one file per model digest)")
        try:
            return EmbeddingStore.open(path, cfg.capacity, dim, shared=cfg.shared, log=log, embedding=embedding,
                                       index=index_options(cfg))
        except EmbeddingStoreError as exc:      # a full filesystem, another daemon's lock: keep serving
            raise ReloadError(str(exc)) from None

    def _switch(self, new, store) -> None:
        """The switch itself: on the loop, no await, so no request sees half of it."""
        caches = self.scheduler.caches
        old_store = caches.store
        self.scheduler.switch_model(new)
        caches.store = store
        activated = [dev.executor.activate(new.gen, store) for dev in self.devices
                     if dev.executor.runs(self.scheduler.first.mid)]
        if old_store is not None and old_store is not store:
            self._retire(old_store, activated)

    def _switch_other(self, served, new, store) -> None:
        """A model other than the first: its Served takes the new model (requests resolve to it,
        are checked and keyed by it from now on) and its embedding ``store``, each device running it
        is told to activate it. Its answers are keyed by its own digest, so nothing cached needs
        emptying."""
        caches = self.scheduler.caches
        cache = caches.cache
        served.keep_k = min(cache.geometry.max_k, len(new.spec.labels)) if cache is not None else 0
        served.model = new
        old_store = caches.stores.pop(served.mid, None)
        if store is not None:
            caches.stores[served.mid] = store
        activated = [dev.executor.activate(new.gen, store) for dev in self.devices
                     if dev.executor.runs(served.mid)]
        if old_store is not None and old_store is not store:
            self._retire(old_store, activated)


def _shape(model) -> str:
    h, w, c = model.spec.frame_shape
    return f"{h}x{w}x{c}"


def _brief(model) -> dict:
    return {"name": model.spec.name, "digest": model.digest, "gen": model.gen}
