"""What a daemon serves: model names, their versions, the route between versions, the default.

The one place that knows it. Everything else holds a ``Served`` (one loaded (name, version)) and
its small integer ``mid``, which indexes the per-model state on the hot path: each device's lane
(daemon/dispatch/queues.py), its latency profile (Device.profiles), its executor's runner
(daemon/pipeline/executor.py), the stats.

    Catalog
      by_id[mid]  -> Served(name, version, model: LoadedModel, devices, share)
      routes[name] -> Route: stable Served, canary Served | None, canary_percent, canary_uids
      default     -> the Route a request that names no model takes ("default" names it too)

``resolve(name, version, uid, rid)`` runs on the event loop for every request, O(1): one or two
dict lookups, and for a name with a canary one multiply and compare. A request that names a
version gets it; one that names none takes the route: the canary for ``canary_uids``' uids, or
for ``canary_percent`` of request ids (a multiplicative hash of the id, so deterministic per
request id and spread over ids that count up), else the stable version. A request for a name or
version the catalog lacks raises UnknownModel, whose message lists what is served.

Versions. Two ``[[models]]`` entries of one name and different versions are loaded side by side.
The newest is the canary when it sets ``canary_percent`` or ``canary_uids`` (the next older one
is then stable), else the newest is stable and takes all the traffic that names no version.
``promote(name, version)`` makes a version the stable one and ends the split: it only changes
which Served new requests resolve to, on the loop, between two requests, so no request fails:
every admitted request keeps the Served it resolved to (both versions stay loaded).

Live changes (daemon/ops/model_ops.py, NOTE [ live models ]). ``enter`` routes to a model loaded
while serving, ``remove`` stops routing to one being unloaded, each on the loop in one step. A
removed Served stays in ``by_id`` (``retired``; its requests admitted before keep it and are
answered) until every device freed it (``released``); then ``free_mid`` gives its id to the next
model loaded, so ids, lanes and profiles do not grow with every load. ``live`` is what is served
now: iterate it, not ``by_id``, to list the models.

Keys. A [[models]] entry's digest carries its name and version (daemon/models/loading.py), so two
versions of one file still key the result cache, the embedding store and the clients' local
lookups apart, and every answer is cached under the model that computed it. ``[model]`` alone is
a one-model catalog whose digest is the model's own, as before (its name: the spec's).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..errors import ConfigError
from ...shm import wire

DEFAULT_NAME = "default"
_SPREAD = 2654435761          # Knuth's multiplicative hash: request ids 1, 2, 3 ... spread over 2**32


def store_digest(digest: str) -> str:
    """What a model's embedding store file is named by (daemon/caching/embedding_store.py
    ``default_path``, which keeps 16 characters of it): a plain digest as it is (the name stores
    have always had), else a hash of the whole: a digest tagged with its precision (``+bf16``,
    daemon/pipeline/engine_options.py) or, for a [[models]] entry, with ``-NAME.vVERSION``, so
    the bf16 and fp32 runs of one file, and versions of one file, get stores of their own."""
    if "-" not in digest and "+" not in digest:
        return digest
    return hashlib.blake2b(digest.encode(), digest_size=8).hexdigest()


class UnknownModel(Exception):
    """A request named a model or version the catalog does not serve (wire.E_UNKNOWN_MODEL)."""

    code = wire.E_UNKNOWN_MODEL


@dataclass(eq=False)
class Served:
    """One (name, version) loaded in this daemon: its LoadedModel (a reload replaces it, the
    generation counting up), where it may run and its weight of a device's time."""

    mid: int
    name: str
    version: int
    model: object                      # LoadedModel (daemon/models/loading.py)
    devices: frozenset | None = None   # device indices that may run it; None: all
    share: float = 1.0
    keep_k: int = 0                    # top-k kept per answer (the cache's max_k, at most its classes)
    config: object = None              # its [model] / [[models]] entry
    # live unloading (daemon/ops/model_ops.py): requests admitted and not yet answered (the loop
    # counts them), unloaded (no request resolves to it), its per-device state freed (its id reusable)
    inflight: int = 0
    retired: bool = False
    released: bool = False
    on_idle: object = None             # called once retired and its last request is answered
    _keyed: tuple | None = field(default=None, repr=False)    # (model, keying) of ``keying``

    @property
    def spec(self):
        return self.model.spec

    @property
    def digest(self) -> str:
        return self.model.digest

    @property
    def gen(self) -> int:
        return self.model.gen

    @property
    def keying(self) -> tuple[str, str]:
        """What its result-cache keys are made of besides the content hash (made once per model:
        device threads ask it per frame)."""
        model = self.model
        keyed = self._keyed
        if keyed is None or keyed[0] is not model:
            keyed = self._keyed = (model, (model.digest, model.spec.preprocess_id))
        return keyed[1]

    def runs_on(self, index: int) -> bool:
        return self.devices is None or index in self.devices

    def describe(self) -> dict:
        """hello's and info's entry for it: the model's description and its version."""
        return {**self.model.describe(), "version": self.version, "preprocess": self.spec.preprocess_id}


@dataclass(eq=False)
class Route:
    """The versions of one name, and which one a request that names none gets."""

    name: str
    versions: dict = field(default_factory=dict)   # version -> Served
    stable: Served | None = None
    canary: Served | None = None
    canary_percent: float = 0.0
    canary_uids: frozenset = frozenset()

    def pick(self, uid: int, rid: int) -> Served:
        canary = self.canary
        if canary is None:
            return self.stable
        if uid in self.canary_uids:
            return canary
        if self.canary_percent and ((rid * _SPREAD) & 0xFFFFFFFF) * 100.0 < self.canary_percent * 2**32:
            return canary
        return self.stable

    def describe(self) -> dict:
        return {"name": self.name, "versions": sorted(self.versions), "stable": self.stable.version,
                "canary": self.canary.version if self.canary is not None else None,
                "canary_percent": self.canary_percent if self.canary is not None else 0.0,
                "canary_uids": sorted(self.canary_uids) if self.canary is not None else []}


class Catalog:
    """Every model served, by id and by name (the module docstring). Loop thread for changes;
    device threads read ``by_id`` entries, each replaced whole."""

    def __init__(self):
        self.by_id: list[Served] = []
        self.routes: dict[str, Route] = {}
        self.default: Route | None = None
        self.single = True             # one model: resolve's fast path

    @classmethod
    def of(cls, entries: list) -> "Catalog":
        """A catalog of ``[(config entry, LoadedModel), ...]``, in configuration order: ``[model]``
        alone (a ModelConfig) or ``[[models]]`` entries (ModelEntryConfig; version, devices, share,
        default, canary keys)."""
        catalog = cls()
        default = None
        for cfg, model in entries:
            version = getattr(cfg, "version", 1)
            devices = getattr(cfg, "devices", None)
            served = catalog.add(model.spec.name, version, model, frozenset(devices) if devices else None,
                                 getattr(cfg, "share", 1.0), cfg)
            if getattr(cfg, "default", False):
                default = served.name
        for route in catalog.routes.values():
            shapes = {(s.spec.frame_shape, s.spec.input_form) for s in route.versions.values()}
            if len(shapes) > 1:     # a client sizes a frame for a name before the route picks a version
                raise ConfigError(f"model {route.name}: its versions take different inputs "
                                  f"({', '.join(f'{h}x{w} {form}' for (h, w, _), form in sorted(shapes))}); "
                                  f"versions of one name must take the same frames: give it another name")
            catalog._split(route)
        catalog.default = catalog.routes[default or catalog.by_id[0].name]
        return catalog

    def add(self, name: str, version: int, model, devices=None, share: float = 1.0, cfg=None) -> Served:
        served = Served(len(self.by_id), name, version, model, devices, share, config=cfg)
        self.by_id.append(served)
        self.routes.setdefault(name, Route(name)).versions[version] = served
        self.single = len(self.by_id) == 1
        return served

    @staticmethod
    def _split(route: Route) -> None:
        """Stable and canary from the configuration: the newest is the canary when it names a
        split, else it is stable and takes all."""
        versions = sorted(route.versions)
        newest = route.versions[versions[-1]]
        cfg = newest.config
        percent = getattr(cfg, "canary_percent", 0.0)
        uids = frozenset(getattr(cfg, "canary_uids", None) or ())
        if len(versions) > 1 and (percent or uids):
            route.stable, route.canary = route.versions[versions[-2]], newest
            route.canary_percent, route.canary_uids = percent, uids
        else:
            route.stable, route.canary = newest, None

    # the hot path -----------------------------------------------------------------------------
    def resolve(self, name, version, uid: int, rid: int) -> Served:
        """The Served a request gets (the module docstring). Raises UnknownModel."""
        if name is None or name == DEFAULT_NAME:
            route = self.default
        else:
            route = self.routes.get(name) if type(name) is str else None
            if route is None:
                raise UnknownModel(f"no model named {name!r} is served here; the models are "
                                   f"{self.names_text()} (a request naming none gets "
                                   f"{self.default.name})")
        if version is None:
            return route.pick(uid, rid)
        served = route.versions.get(version) if type(version) is int else None
        if served is None:
            raise UnknownModel(f"model {route.name} has no version {version!r}; its versions are "
                               f"{', '.join(map(str, sorted(route.versions)))}; the models are "
                               f"{self.names_text()}")
        return served

    # what is served ---------------------------------------------------------------------------
    def names_text(self) -> str:
        return ", ".join(f"{n} (versions {', '.join(map(str, sorted(r.versions)))})"
                         for n, r in self.routes.items())

    def describe(self) -> list[dict]:
        """hello's and info's ``models``: each (name, version) with its input, classes, labels id,
        top-k, generation, whether it is what a request naming no model gets, and its route."""
        out = []
        for s in self.live:
            route = self.routes[s.name]
            out.append({**s.describe(), "default": route is self.default and route.stable is s,
                        "route": "canary" if route.canary is s else "stable" if route.stable is s else "named",
                        "devices": sorted(s.devices) if s.devices is not None else None, "share": s.share})
        return out

    def routes_describe(self) -> list[dict]:
        return [r.describe() for r in self.routes.values()]

    @property
    def default_served(self) -> Served:
        """What a request naming no model and no version gets when there is no canary."""
        return self.default.stable

    def largest_frame(self) -> int:
        """Bytes of the largest model input: every session's ring slots hold one (docs/protocol.md)."""
        return max(s.spec.frame_bytes for s in self.live)

    def on_device(self, index: int) -> list[Served]:
        return [s for s in self.live if s.runs_on(index)]

    @property
    def live(self) -> list[Served]:
        """The models served now: ``by_id`` less those unloaded (whose ids stay until reused)."""
        return [s for s in self.by_id if not s.retired]

    # operations (the loop) --------------------------------------------------------------------
    def promote(self, name: str, version: int | None = None) -> Served:
        """Make ``version`` (default: the canary) of ``name`` its stable version and end the split:
        every request naming no version gets it from the next one on. In-flight requests keep the
        version they resolved to. Raises UnknownModel."""
        route = self.routes.get(name if name != DEFAULT_NAME else self.default.name)
        if route is None:
            raise UnknownModel(f"no model named {name!r} is served here; the models are {self.names_text()}")
        if version is None:
            if route.canary is None:
                raise UnknownModel(f"model {name} has no canary version to promote; name a version "
                                   f"({', '.join(map(str, sorted(route.versions)))})")
            target = route.canary
        else:
            target = route.versions.get(version)
            if target is None:
                raise UnknownModel(f"model {name} has no version {version}; its versions are "
                                   f"{', '.join(map(str, sorted(route.versions)))}")
        route.stable, route.canary = target, None
        route.canary_percent, route.canary_uids = 0.0, frozenset()
        return target

    def free_mid(self, taken=frozenset()) -> int:
        """The id a model loaded now gets: one an unloaded model left once its per-device state
        was freed (its lane, profile and runner slots are reused), else a new one; none in ``taken``
        (ids of models being loaded)."""
        return next((s.mid for s in self.by_id if s.released and s.mid not in taken),
                    max([len(self.by_id) - 1, *taken]) + 1)

    def enter(self, served: Served) -> None:
        """Serve ``served`` (loaded and warm on its devices) from the next request on: on the loop,
        one step. A version newer than its name's others takes the route the configuration would
        give it (stable, or the canary when it names a split); an older one is reached by naming it."""
        if served.mid == len(self.by_id):
            self.by_id.append(served)
        else:
            self.by_id[served.mid] = served
        route = self.routes.setdefault(served.name, Route(served.name))
        route.versions[served.version] = served
        if served.version == max(route.versions):
            self._split(route)
        self.single = len(self.live) == 1

    def reroute(self, name: str) -> None:
        """The route of ``name`` made again from its versions' configuration (SIGHUP changed a
        canary key): the newest stable, or the canary when it names a split."""
        self._split(self.routes[name])

    def remove(self, served: Served) -> None:
        """Resolve no request to ``served`` from the next one on (on the loop, one step): requests
        naming it get UnknownModel; those admitted already keep it and are answered. When it was
        its name's stable or canary version, the split ends: the canary left is stable, else the
        newest version left. Its id is not reused before ``released`` is set."""
        route = self.routes[served.name]
        del route.versions[served.version]
        served.retired = True
        if not route.versions:
            del self.routes[served.name]
        elif served is route.stable or served is route.canary:
            left = route.canary if route.canary is not None and route.canary is not served else (
                route.stable if route.stable is not served else route.versions[max(route.versions)])
            route.stable, route.canary = left, None
            route.canary_percent, route.canary_uids = 0.0, frozenset()
        self.single = len(self.live) == 1

    def check_devices(self, count: int) -> None:
        """Every entry's devices exist. Raises ConfigError naming the entry."""
        for s in self.live:
            bad = sorted(i for i in (s.devices or ()) if i >= count)
            if bad:
                raise ConfigError(f"model {s.name} version {s.version}: devices {bad} do not exist; "
                                  f"this daemon has {count} device(s), 0 to {count - 1}")
