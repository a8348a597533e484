"""The front's side of the daemon: one client-library session per principal.

The front is a trusted local client (daemon/front/principal.py): for each principal it serves (a
local uid read from its Unix socket's SO_PEERCRED, or a tenant named by a bearer token) it opens
one AsyncClient whose hello names that principal, so the daemon's fair share, per-uid quotas and
privacy scope apply to the caller, not to the front. Frames go into that session's ring as for any
client; repeats are answered from the read-only result cache without a round trip. At most
``oip.max_principals`` sessions stay open; the least recently used idle one is closed to make room.

``own`` is the front's session as itself: the models' metadata, their labels and readiness.

Models. A path names a model, and maybe a version (``/v2/models/{name}[/versions/{v}]``):
``target`` resolves it against the models the daemon's hello listed (its client library's own
resolution, inferd.client.aio ``AsyncClient._model_target``: hello's list, then the daemon's
``info`` for a model loaded live since), so the front knows no model the daemon does not serve and OIP's 404 / NOT_FOUND names the ones it does. A path without a version
goes to the name's route (the daemon picks stable or canary, as for any client); a request for the
default model naming no version is sent without a model field, as from any one-model client.

Sessions do not wait for a daemon that went away (``reconnect=False``): a request that finds none
is answered 503 at once, so a balancer sends it elsewhere, and the session is dropped; the next
request opens a new one (within ``CONNECT_S``), so a restarted daemon is served again at once.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
from dataclasses import dataclass

import numpy as np

from ...client import errors as client_errors
from ...client.admin import AdminClient
from ...client.aio import AsyncClient
from ...client.connection import Connection
from ...client.images import to_frame
from .errors import OipError, from_client

log = logging.getLogger("inferd.oip")
#: how long opening a session waits for the daemon, once the front runs
CONNECT_S = 1.0


@dataclass(frozen=True)
class Principal:
    """Whom a request is served as: ``hello`` is what the daemon's hello gets (None: the front
    itself), ``name`` what logs say."""
    name: str
    hello: tuple | None = None      # (("uid", 1000), ("gid", 1000), ("groups", (..)) or (("tenant", "x"),)

    @classmethod
    @functools.lru_cache(maxsize=1024)          # one object per caller, not one per request
    def local(cls, uid: int, gid: int, groups: tuple = ()) -> "Principal":
        return cls(f"uid {uid}", (("uid", uid), ("gid", gid), ("groups", tuple(groups))))

    @classmethod
    @functools.lru_cache(maxsize=1024)
    def tenant(cls, name: str) -> "Principal":
        return cls(f"tenant {name}", (("tenant", name),))

    def wire(self) -> dict | None:
        if self.hello is None:
            return None
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.hello}


FRONT = Principal("the front")


class _PrincipalClient(AsyncClient):
    """An AsyncClient whose hello names the principal it serves."""

    def __init__(self, socket_path: str, principal: Principal, **kwargs):
        super().__init__(socket_path, **kwargs)
        self._principal = principal.wire()

    def _open_connection(self, hello_timeout: float) -> Connection:
        return Connection.open(self.socket_path, ring_slots=self._ring_slots, use_cache=self._use_cache,
                               connect_timeout=min(self._connect_timeout, hello_timeout),
                               hello_timeout=hello_timeout, principal=self._principal)


@dataclass(frozen=True)
class Target:
    """The model an OIP path names: ``name`` and ``version`` as OIP spells them (a version is a
    string; "" when the path named none), the client library's ModelInfo, and what a classify
    passes to name it (None, None: the default model by its route, as a one-model client sends)."""
    name: str
    version: str
    info: object                        # inferd.client ModelInfo
    model: str | None = None
    pinned: int | None = None           # the version the path named

    @property
    def classes(self) -> int:
        return self.info.classes or len(self.info.labels)


class Backend:
    def __init__(self, socket_path: str, *, ring_slots: int, max_principals: int, timeout_s: float,
                 admin_path: str | None = None):
        self.socket_path = socket_path
        self.admin_path = admin_path
        self._ring_slots = ring_slots
        self._max = max_principals
        self.timeout_s = timeout_s
        self._clients: collections.OrderedDict[Principal, AsyncClient] = collections.OrderedDict()
        self._opening: dict[Principal, asyncio.Task] = {}
        self._busy: collections.Counter[Principal] = collections.Counter()     # requests in flight
        self.own: AsyncClient | None = None
        self.labels: tuple = ()
        self._labels: dict[str, tuple] = {}    # labels_id -> names, of models other than the default

    async def start(self, connect_timeout: float = 30.0) -> None:
        """Open the front's own session (waits up to ``connect_timeout`` for the daemon)."""
        self.own = await self._open(FRONT, connect_timeout, reconnect=True)
        self.labels = await self.own.labels()

    async def close(self) -> None:
        for task in list(self._opening.values()):
            task.cancel()
        clients, self._clients = list(self._clients.values()), collections.OrderedDict()
        for c in clients + ([self.own] if self.own else []):
            await c.aclose()

    # what the model is ------------------------------------------------------------------------
    @property
    def model(self):
        return self.own.model

    @property
    def classes(self) -> int:
        m = self.own.model
        return m.classes or len(m.labels)

    def models(self) -> list:
        """Every model served (inferd.client ModelInfo each): hello's list, or the one model."""
        return list(self.own._core.catalog.values()) or [self.own.model]

    async def target(self, name: str, version: str) -> Target:
        """The model a path names, or OipError not_found naming the models there are. A name
        the front's hello did not list is looked for in the daemon's ``info`` (the client
        library's own look-up, at most once a second): a model loaded live is served at once."""
        if version and not version.isdigit():
            raise OipError("not_found", f"no model {name!r} version {version!r}: versions are numbers; "
                           f"the models are {self._names()}")
        pinned = int(version) if version else None
        try:
            info, _, _ = await self.own._model_target(name, pinned)
        except client_errors.UnknownModel:
            raise OipError("not_found", f"no model {name!r}{f' version {version}' if version else ''} is "
                           f"served; the models are {self._names()}") from None
        default = self.own.model
        plain = pinned is None and info.name == default.name     # the default by its route: no fields
        return Target(info.name, version or str(info.version or 1), info,
                      None if plain else info.name, pinned)

    async def index(self) -> list[tuple[str, str]]:
        """(name, version) of every model the daemon serves now (its ``info``: models loaded
        since the front's hello are listed too)."""
        try:
            info = await asyncio.wait_for(self.own.info(), 2.0)
        except (client_errors.InferdError, TimeoutError) as exc:
            raise OipError("unavailable", f"the daemon does not answer: {exc}") from None
        listed = info.get("models") or []
        if listed:
            return [(str(m["name"]), str(m.get("version") or 1)) for m in listed]
        return [(m.name, str(m.version or 1)) for m in self.models()]

    def _names(self) -> str:
        return ", ".join(f"{m.name} (version {m.version or 1})" for m in self.models())

    def versions(self, name: str) -> list[str]:
        """The versions served under ``name``, as OIP lists them."""
        return sorted({str(m.version or 1) for m in self.models() if m.name == name}, key=int)

    async def labels_of(self, target: Target) -> tuple:
        """The class names of ``target``'s model (the default's kept in ``labels``)."""
        info = target.info
        if info.labels_id == self.own.model.labels_id:
            return self.labels
        names = self._labels.get(info.labels_id)
        if names is None:
            names = self._labels[info.labels_id] = await self.own.labels(info.name, info.version or None)
        return names

    async def ready(self) -> tuple[bool, str]:
        """Whether an inference sent now can be served, and why not. The daemon's own word when
        the front may ask its admin socket (it runs as the daemon's user): ready, not starting or
        draining, a device in rotation, new clients admitted (``inferctl health``); else, from
        the client socket, that the daemon answers and has a device in rotation."""
        if self.admin_path is not None:
            try:
                health = await asyncio.get_running_loop().run_in_executor(None, self._admin_health)
            except client_errors.PermissionDenied:
                self.admin_path = None               # not the daemon's user: the client socket's view
            except client_errors.InferdError as exc:
                return False, f"the daemon does not answer: {exc}"
            else:
                if health.get("ready"):
                    return True, ""
                return False, (f"the daemon is {health.get('state')}, {health.get('in_rotation')} device(s) "
                               f"in rotation{'; ' + health['door'] if health.get('door') else ''}")
        try:
            info = await asyncio.wait_for(self.own.info(), 2.0)
        except (client_errors.InferdError, TimeoutError) as exc:
            return False, f"the daemon does not answer: {exc}"
        if "ready" in info:                 # the daemon's own answer (daemon/ops/readiness.py)
            return bool(info["ready"]), info.get("reason") or ""
        devices = info.get("devices") or []
        if devices and not any(d.get("state", "healthy") == "healthy" for d in devices):
            return False, "no device is in rotation"
        return True, ""

    def _admin_health(self) -> dict:
        with AdminClient(self.admin_path, timeout=2.0) as admin:
            return admin.call("health")

    # inference --------------------------------------------------------------------------------
    async def classify(self, principal: Principal, images: list, top_k: int, timeout_s: float | None,
                       logits: bool = False, target: Target | None = None) -> list:
        """Each image's predictions (inferd.client Predictions, with their ``logits`` rows when
        ``logits``), as ``principal``, by ``target``'s model (None: the default). Frames of
        another size are resized in a worker thread first (the client library would resize them
        on this loop: a large frame would stall every other caller of the front)."""
        model = pinned = None
        if target is not None:
            model, pinned = target.model, target.pinned
        h, w, _ = (target.info if target is not None else self.own.model).input_shape
        if any(isinstance(im, np.ndarray) and im.shape[:2] != (h, w) for im in images):
            images = await asyncio.get_running_loop().run_in_executor(
                None, lambda: [to_frame(im, h, w) if isinstance(im, np.ndarray) else im for im in images])
        client = await self._client(principal)
        if self.own.model.labels_id != client.model.labels_id:
            self.labels = await self.own.labels()
        self._busy[principal] += 1
        try:
            return await client.classify_many(images, top_k, timeout=timeout_s or self.timeout_s, logits=logits,
                                              model=model, version=pinned)
        except client_errors.DaemonUnavailable as exc:
            self._forget(principal, client)
            raise from_client(exc) from None
        except client_errors.InferdError as exc:
            raise from_client(exc) from None
        finally:
            self._busy[principal] -= 1
            if not self._busy[principal]:
                del self._busy[principal]

    def _forget(self, principal: Principal, client: AsyncClient) -> None:
        """Drop a session whose daemon went away; the next request opens another."""
        if self._clients.get(principal) is client:
            del self._clients[principal]
        asyncio.ensure_future(client.aclose())

    async def _client(self, principal: Principal) -> AsyncClient:
        client = self._clients.get(principal)
        if client is not None:
            self._clients.move_to_end(principal)
            return client
        task = self._opening.get(principal)
        if task is None:
            task = self._opening[principal] = asyncio.ensure_future(self._open(principal, CONNECT_S))
            task.add_done_callback(lambda _: self._opening.pop(principal, None))
        try:
            client = await asyncio.shield(task)
        except client_errors.InferdError as exc:
            raise from_client(exc) from None
        if principal not in self._clients:
            self._clients[principal] = client
            self._evict()
        return self._clients[principal]

    def _evict(self) -> None:
        """Close the least recently used sessions over ``max_principals`` that have nothing in
        flight (a busy one stays until it is idle: its callers' requests are never cut off)."""
        over = len(self._clients) - self._max
        for principal in [p for p in self._clients if p not in self._busy][:max(over, 0)]:
            asyncio.ensure_future(self._clients.pop(principal).aclose())

    async def _open(self, principal: Principal, connect_timeout: float, reconnect: bool = False) -> AsyncClient:
        client = _PrincipalClient(self.socket_path, principal, ring_slots=self._ring_slots, timeout=self.timeout_s,
                                  connect_timeout=connect_timeout, reconnect=reconnect)
        try:
            await client.connect()
        except client_errors.PermissionDenied as exc:
            raise OipError("forbidden", f"{principal.name}: {exc}") from None
        log.debug("session opened for %s", principal.name)
        return client
