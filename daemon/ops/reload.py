"""Model swap: load and warm a new model beside the serving one, switch, let the old one finish.

NOTE [ model swap ]

    admin `reload [MODEL]` or SIGHUP
      |  (one at a time; refused while draining)
      v
    load the model on the CPU, off the loop (asyncio.to_thread)      ConfigError: old model keeps
    check: same frame shape as the serving model                      serving, the reply and the
      |                                                               log say why
      v
    for each device, one after another (the others keep serving):
      BatchingThread.stage(model): between two batches the thread
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
the daemon for that; clients reconnect, see inferd.client).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time

from ..models import loading as model_mod
from ..config import ConfigError

log = logging.getLogger("inferd.reload")

#: How long the swap waits for every thread to switch before it frees the old embedding store
#: anyway at shutdown instead (a device stuck in a batch switches only when that batch returns).
ACTIVATE_WAIT_S = 30.0


class ReloadError(Exception):
    """The new model cannot be served; the old one still is. The message says why."""


def model_config(current, source: str | None):
    """The [model] section to load: ``source`` read as ``inferd --model`` reads it (a built-in
    name, or a file path when it has a '/' or a '.'), else the current one (the same file read
    again, picking up a model replaced on disk)."""
    if not source:
        return current
    if "/" in source or "." in source:
        return dataclasses.replace(current, path=source)
    return dataclasses.replace(current, builtin=source, path="")


async def reload_model(server, model_cfg) -> dict:
    """Swap the served model for the one ``model_cfg`` describes (NOTE [ model swap ]). Returns
    what the admin reply says; raises ReloadError, with the old model still serving."""
    if server.draining:
        raise ReloadError("the daemon is draining")
    if server.reloading:
        raise ReloadError("a reload is already in progress")
    server.reloading = True
    t0 = time.perf_counter()
    old = server.model
    try:
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
        dim = await _stage(server, new)
        store = await asyncio.to_thread(_open_store, server, new, dim)
        _switch(server, new, store)
    except ReloadError as exc:
        log.error("reload failed; still serving %s (digest %s): %s", old.spec.name, old.digest, exc)
        server.reload_done(False)
        raise
    finally:
        server.reloading = False
    seconds = time.perf_counter() - t0
    log.info("reload: %s (digest %s) -> %s (digest %s), generation %d, on %d devices in %.2f s",
             old.spec.name, old.digest, new.spec.name, new.digest, new.gen, len(server.devices), seconds)
    server.reload_done(True)
    return {"changed": True, "model": _brief(new), "previous": _brief(old), "seconds": seconds}


async def _stage(server, new) -> int:
    """Load and warm ``new`` on every device, one after another. Returns the embedding width."""
    memory = server.scheduler.caches
    keep_k = min(memory.cache.geometry.max_k, len(new.spec.labels)) if memory.cache is not None else 0
    staged, dims = [], []
    for dev in server.devices:
        try:
            dims.append(await asyncio.wrap_future(dev.thread.stage(new, keep_k)))
        except Exception as exc:  # any failure of the new model on a device keeps the old one
            for other in staged:
                other.thread.discard(new.gen)
            if isinstance(exc, ConfigError):
                raise ReloadError(f"{dev.label}: {exc}") from None
            raise ReloadError(f"{dev.label}: {type(exc).__name__}: {exc}") from None
        staged.append(dev)
    return dims[0] if dims else 0


def _open_store(server, new, dim: int):
    """The embedding store of the new model (one file per digest), or None."""
    cfg = server.cfg.embeddings
    if not (cfg.enabled and dim):
        return None
    from ..caching.embedding_store import EmbeddingStore, default_path
    from ..models.embedding_pooling import embedding_id

    embedding = embedding_id(new.spec)
    path = cfg.path or default_path(os.path.dirname(server.cfg.cache_path), new.digest, embedding)
    if cfg.path and server.scheduler.caches.store is not None:
        raise ReloadError("embeddings.path names one file: a model swap needs a store per model; "
                          "leave embeddings.path empty (one file per model digest)")
    return EmbeddingStore.open(path, cfg.capacity, dim, shared=cfg.shared, log=log, embedding=embedding)


def _switch(server, new, store) -> None:
    """The switch itself: on the loop, no await, so no request sees half of it."""
    memory = server.scheduler.caches
    old_store = memory.store
    server.model = new
    server.scheduler.switch_model(new)
    memory.store = store
    activated = [dev.thread.activate(new.gen, store) for dev in server.devices]
    if old_store is not None:
        server.retire(old_store, activated)


def _shape(model) -> str:
    h, w, c = model.spec.frame_shape
    return f"{h}x{w}x{c}"


def _brief(model) -> dict:
    return {"name": model.spec.name, "digest": model.digest, "gen": model.gen}
