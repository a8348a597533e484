"""The daemon's configuration: one home, documented defaults, every value checked at start-up.

A TOML file (``inferd --config FILE``) gives sections ``[server]``, ``[ring]``, ``[batching]``,
``[model]``, ``[dispatch]``, ``[health]`` and a list ``[[device]]``; command-line flags override single keys
(``--set batching.max_batch=16``, or the shortcuts ``--socket``, ``--model``, ...). An unknown key,
a wrong type or a value out of range stops start-up with a :class:`ConfigError` whose message names
the key and what is allowed. The configuration reference, docs/configuration.md, is generated from
the same table (``python -m inferd.daemon.config docs/configuration.md``).
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .front.listener import SUN_PATH_MAX
from .dispatch.policy import POLICIES
from ..shm.ring import BACKENDS
from ..shm.wire import default_socket_path

LOG_LEVELS = ("debug", "info", "warning", "error")
MODEL_FORMATS = ("auto", "torchscript", "export")
PRECISIONS = ("fp32", "bf16", "fp16")          # model.precision (daemon/pipeline/engine_options.py)
COMPILE_MODES = ("none", "graphs", "compile")  # model.compile (daemon/pipeline/engine_options.py)
INPUT_FORMS = ("float_nchw", "uint8_nhwc")     # model.input (daemon/pipeline/preprocess.py)


class ConfigError(Exception):
    """A configuration value that cannot be used; the message names the key and the allowed values."""


def _opt(default, doc, *, lo=None, hi=None, choices=None):
    return field(default=default, metadata={"doc": doc, "lo": lo, "hi": hi, "choices": choices})


@dataclass
class ServerConfig:
    socket: str = _opt("", "socket path; empty: $INFERD_SOCKET (what clients read too), else "
                           "/run/inferd/inferd.sock as root, else $XDG_RUNTIME_DIR/inferd/inferd.sock "
                           "(/tmp/inferd-UID/inferd.sock without it)")
    socket_mode: int = _opt(0o660, "permission bits of the socket file (TOML: 0o660 or \"0660\")",
                            lo=0, hi=0o777)
    allow_uids: list = _opt(None, "uids allowed to connect besides the daemon's own and root")
    allow_gids: list = _opt(None, "gids whose members (primary or supplementary group) may connect")
    max_clients: int = _opt(256, "concurrent client sessions", lo=1, hi=65536)
    max_frame_bytes: int = _opt(65536, "largest request frame accepted", lo=256, hi=16 * 2**20)
    hello_timeout_s: float = _opt(5.0, "time a new connection has to send hello", lo=0.01, hi=300.0)
    drain_timeout_s: float = _opt(10.0, "SIGTERM: time allowed to finish in-flight work", lo=0.0, hi=3600.0)
    log_level: str = _opt("info", "log level (any case)", choices=LOG_LEVELS)
    admin_socket: str = _opt("", "admin socket path (stats, metrics, reload, drain, devices); empty: "
                                 "admin.sock beside the client socket")
    admin_group: str = _opt("", "group (name or number) whose members may use the admin socket "
                                "(socket mode 0660); empty: root and the daemon's user only (0600)")
    max_sessions_per_uid: int = _opt(32, "sessions one uid may hold at once (below max_clients, so a "
                                         "new uid can always connect)", lo=1, hi=65536)
    max_inflight_per_uid: int = _opt(2048, "requests one uid may have in flight over all its sessions",
                                     lo=1, hi=1 << 24)
    idle_timeout_s: float = _opt(600.0, "a session with nothing in flight that sends nothing for this "
                                        "long is closed (0: never)", lo=0.0, hi=86400.0)
    frame_timeout_s: float = _opt(10.0, "a frame begun must be complete within this (a half-sent "
                                        "frame holds nothing longer)", lo=0.01, hi=3600.0)
    max_frames_per_turn: int = _opt(32, "frames of one uid (all its sessions) handled per loop "
                                        "turn, at most; fewer when its frames are costly", lo=1, hi=65536)
    reply_buffer_bytes: int = _opt(1 << 20, "replies queued for a client that does not read, before "
                                            "the daemon stops reading its requests", lo=4096, hi=1 << 30)
    unread_timeout_s: float = _opt(30.0, "a client whose replies stay over reply_buffer_bytes this "
                                         "long is disconnected", lo=0.01, hi=86400.0)


@dataclass
class RingConfig:
    backend: str = _opt("memfd", "memfd (sealed, Linux) or posix (posix-ipc, unlinked at once)",
                        choices=BACKENDS)
    shm_prefix: str = _opt("inferd", "name prefix of rings and their start-up sweep")
    default_slots: int = _opt(32, "slots of a ring whose client asks for 0", lo=1, hi=65536)
    max_slots: int = _opt(1024, "most slots one client may ask for", lo=1, hi=65536)
    max_ring_bytes: int = _opt(256 * 2**20, "largest ring one client may ask for",
                               lo=4096, hi=64 * 2**30)


@dataclass
class BatchingConfig:
    max_batch: int = _opt(32, "frames in one batch", lo=1, hi=4096)
    max_delay_ms: float = _opt(2.0, "longest a batch waits for more frames after its first", lo=0.0, hi=10000.0)
    queue_limit: int = _opt(1024, "frames queued or running per device before overloaded", lo=1, hi=1 << 20)
    default_timeout_ms: float = _opt(30000.0, "deadline of a request that names none", lo=1.0, hi=3.6e6)
    adaptive: bool = _opt(True, "pick batch sizes from the measured latency profile and deadlines "
                                "(NOTE [ batch planning ] in daemon/dispatch/queues.py); false: fixed window")


@dataclass
class DispatchConfig:
    policy: str = _opt("weighted", "weighted (earliest expected finish, idle devices steal) or "
                                   "round_robin", choices=POLICIES)
    fair_share: bool = _opt(True, "share each device between uids by deficit round robin "
                                  "(NOTE [ batch planning ]); false: first come, first served")
    weights: dict = _opt(None, "fair-share weights: uid or @group to a weight, e.g. "
                               "{ \"1000\" = 2, \"@render\" = 4 }; others weigh 1")


@dataclass
class HealthConfig:
    max_failures: int = _opt(3, "batches in a row that raise before a device leaves rotation", lo=1, hi=1000)
    watchdog_floor_s: float = _opt(1.0, "least time a batch may run before the device is called stuck",
                                   lo=0.05, hi=3600.0)
    watchdog_factor: float = _opt(10.0, "watchdog bound = max(floor, factor x measured batch time)",
                                  lo=1.0, hi=1000.0)
    backoff_s: float = _opt(1.0, "first wait before a canary batch probes a device out of rotation",
                            lo=0.01, hi=3600.0)
    backoff_max_s: float = _opt(30.0, "longest wait between canaries (doubles per failed canary)",
                                lo=0.01, hi=86400.0)
    max_attempts: int = _opt(3, "devices a request may be tried on before it fails", lo=1, hi=100)


@dataclass
class ModelConfig:
    builtin: str = _opt("shapes", "built-in model: shapes, resnet18, resnet50, noop, synthetic (when path is empty)")
    path: str = _opt("", "TorchScript (.pt) or torch.export (.pt2) file; overrides builtin")
    format: str = _opt("auto", "how to load path", choices=MODEL_FORMATS)
    name: str = _opt("", "the model's name in hello, info, stats and metrics; empty: the built-in's "
                         "name, or the file name without its suffix")
    input: str = _opt("float_nchw", "what the model is given: float_nchw (the daemon normalises with mean "
                                    "and std), or uint8_nhwc (the frames as they are, uint8 height x width "
                                    "x RGB, for models that normalise inside; file models only)",
                      choices=INPUT_FORMS)
    input_height: int = _opt(0, "input height (0: the built-in model's own)", lo=0, hi=16384)
    input_width: int = _opt(0, "input width (0: the built-in model's own)", lo=0, hi=16384)
    mean: list = _opt(None, "per-channel mean after scaling to 0..1 (3 floats): float_nchw input only; "
                            "required with path (no silent ImageNet default), a built-in's own otherwise")
    std: list = _opt(None, "per-channel std (3 floats > 0): float_nchw input only; required with path, "
                           "a built-in's own otherwise")
    labels: str = _opt("", "labels file, one class name per line; empty: the built-in's own, or for a "
                           "file model classes named by their index (\"0\", \"1\", ...)")
    top_k: int = _opt(5, "top-k a request gets when it names none", lo=1, hi=1000)
    warmup_batches: int = _opt(2, "batches run on each device before READY", lo=0, hi=100)
    embedding_layer: str = _opt("", "submodule whose output is the embedding (a 4-D output is averaged "
                                    "over height and width); empty: the built-in's own, or none for a file "
                                    "model unless its forward returns (logits, embedding)")
    embedding_pool: str = _opt("", "how the embedding layer's output is pooled for near-duplicate search: "
                                   "mean (over height and width), or grid:G (G x G cells, each channel "
                                   "centred), optionally +thumbnail:T (a T x T colour thumbnail of the "
                                   "frame); G, T 1..16; empty: the built-in's own (shapes: "
                                   "grid:4+thumbnail:4 on features.0), mean for a file model "
                                   "(docs/operations.md, Near-duplicates)")
    precision: str = _opt("fp32", "forward pass precision: fp32, or bf16 / fp16 autocast (fp16: CUDA only; "
                                  "bf16 also on CPUs with bf16 units); not fp32 changes the model digest, "
                                  "so cached answers are never mixed", choices=PRECISIONS)
    channels_last: bool = _opt(False, "run the model in channels_last (NHWC) memory format: faster "
                                      "convolutions on tensor-core GPUs, and no copy after preprocessing")
    compile: str = _opt("none", "none; graphs: CUDA graphs captured per batch size (powers of two up to "
                                "max_batch, batches padded up), for small models and batches; compile: "
                                "torch.compile with static shapes per size (minutes at start-up); both "
                                "prepared during warm-up (docs/operations.md, GPU)", choices=COMPILE_MODES)


@dataclass
class CacheConfig:
    enabled: bool = _opt(True, "answer repeated frames from the result cache")
    path: str = _opt("", "cache file; empty: $CACHE_DIRECTORY/results.cache under systemd, else "
                         "/var/cache/inferd/results.cache as root, else ~/.cache/inferd/results.cache")
    size_mb: int = _opt(64, "cache file size in MiB (fixed; a new size rebuilds the file)", lo=1, hi=1 << 20)
    min_hit_rate: float = _opt(0.02, "below this observed hit rate, only 1 in sample_every misses is "
                                     "inserted, so unique traffic does not pay for the cache", lo=0.0, hi=1.0)
    sample_every: int = _opt(16, "insert 1 in this many misses while the hit rate is low", lo=1, hi=1 << 20)
    max_upload_bytes: int = _opt(4 * 2**20, "largest encoded upload (JPEG/PNG/WebP bytes) the daemon copies "
                                            "and verifies for a repeat-upload entry; larger ones are "
                                            "classified from their frame alone (the copy is the event "
                                            "loop's: about 1 ms a MiB)", lo=0, hi=1 << 30)


@dataclass
class EmbeddingsConfig:
    enabled: bool = _opt(True, "keep embeddings of models that expose one (model.embedding_layer)")
    path: str = _opt("", "store file; empty: embeddings-<model digest>.store beside the result cache")
    capacity: int = _opt(100_000, "embeddings kept; once full, a uid past its share (capacity / uids "
                                  "holding rows) replaces its own oldest; exact search is fine to ~100k",
                         lo=1, hi=10_000_000)
    shared: bool = _opt(False, "near-duplicate results and tags are visible to every uid; false: a "
                               "uid sees only the images it stored itself")


@dataclass
class MetricsConfig:
    enabled: bool = _opt(True, "time every request and batch for the latency and batch-size "
                               "histograms (counters are always kept)")
    listen: str = _opt("", "HOST:PORT of an HTTP listener serving /metrics to a Prometheus server, "
                           "loopback addresses only (127.0.0.1:9464, [::1]:9464); empty: off "
                           "(the admin socket serves the same text)")


@dataclass
class ThreadsConfig:
    blas: int = _opt(1, "threads of numpy's BLAS (the embedding search, a memory-bound product), set "
                        "through threadpoolctl; more only competes with the devices (NOTE [ thread "
                        "pools ] in daemon/pipeline/thread_pools.py)", lo=1, hi=1024)
    interop: int = _opt(1, "torch inter-op threads (the daemon forks no torch work)", lo=1, hi=1024)
    omp_wait_policy: str = _opt("passive", "OMP_WAIT_POLICY set before torch loads: passive (idle "
                                           "OpenMP workers sleep, not spin), active, or default "
                                           "(OpenMP's own); the environment variable wins",
                                choices=("passive", "active", "default"))
    pin: bool = _opt(False, "bind each CPU device's batching thread (and its OpenMP team) to cores of "
                            "its own")
    oversubscribe: str = _opt("warn", "CPU devices asking for more threads in all than the usable "
                                      "cores (sched_getaffinity): warn, or refuse to start",
                              choices=("warn", "refuse"))
    auto_measure_s: float = _opt(0.3, "--device cpu:auto: seconds measured per layout and batch size "
                                      "at start-up (daemon/pipeline/cpu_layout.py)", lo=0.02, hi=60.0)


@dataclass
class L2Config:
    """The fleet-wide second level of the result cache on Redis / Valkey (docs/fleet.md)."""
    enabled: bool = _opt(False, "look local cache misses up in a Redis shared by the fleet, and write "
                                "computed answers to it (docs/fleet.md)")
    url: str = _opt("", "standalone server: redis://HOST:PORT/DB, rediss://... (TLS) or "
                        "unix:///PATH?db=N; with cluster, any one node; unused with sentinels")
    sentinels: list = _opt(None, "Sentinel addresses [\"HOST:PORT\", ...]: the master of "
                                 "sentinel_service is found through them (and again after a failover)")
    sentinel_service: str = _opt("mymaster", "the master's name at the sentinels")
    cluster: bool = _opt(False, "url names one node of a Redis Cluster; lookups and writes are split "
                                "by hash slot")
    db: int = _opt(0, "database number (standalone and Sentinel; a cluster has only 0)", lo=0, hi=1 << 16)
    username: str = _opt("", "ACL user (AUTH username password); empty: the default user")
    password_file: str = _opt("", "file holding the AUTH password (mode 0600 or stricter, like "
                                  "key_file); empty: no password")
    tls: bool = _opt(False, "TLS to Redis (implied by a rediss:// url)")
    tls_ca_file: str = _opt("", "CA bundle that signed the server's certificate; empty: the system's")
    tls_cert_file: str = _opt("", "client certificate (Redis tls-auth-clients); empty: none")
    tls_key_file: str = _opt("", "private key of tls_cert_file")
    key_file: str = _opt("", "the fleet key: a file of at least 32 bytes (head -c 32 /dev/urandom), "
                             "the same on every host, readable by the daemon's user only; every entry "
                             "carries a keyed BLAKE3 MAC made with it (required)")
    prefix: str = _opt("inferd:", "Redis key prefix, so several fleets share one Redis")
    budget_ms: float = _opt(2.0, "longest a local miss waits for L2 before its device computes it",
                            lo=0.05, hi=1000.0)
    timeout_ms: float = _opt(250.0, "socket timeout of one Redis command: a hung server is given up on "
                                    "after this (requests stop waiting at budget_ms)", lo=1.0, hi=60000.0)
    ttl_s: int = _opt(7 * 86400, "lifetime of an entry in Redis (SET EX)", lo=1, hi=1 << 31)
    max_lookups_in_flight: int = _opt(4, "batched lookups (MGET) outstanding at once; beyond, a miss "
                                         "goes straight to its device", lo=1, hi=1024)
    write_backlog: int = _opt(10000, "answers waiting to be written; beyond, new ones are dropped "
                                     "(counted)", lo=1, hi=1 << 24)
    write_batch: int = _opt(256, "SETs in one pipelined write", lo=1, hi=65536)
    breaker_failures: int = _opt(5, "errors or timeouts in a row that open the circuit breaker (no "
                                    "lookups, no writes)", lo=1, hi=1 << 20)
    breaker_cooldown_s: float = _opt(5.0, "how long the breaker stays open before one probe lookup",
                                     lo=0.01, hi=3600.0)


@dataclass
class DeviceConfig:
    name: str = _opt("cpu", "cpu, cpu:auto (threads and number of CPU devices measured at start-up, "
                            "daemon/pipeline/cpu_layout.py) or cuda:N")
    threads: int = _opt(0, "torch intra-op threads for a cpu device (0: the usable cores, shared evenly "
                           "by the cpu devices that give none; NOTE [ thread pools ] in daemon/pipeline/thread_pools.py)",
                        lo=0, hi=1024)


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    ring: RingConfig = field(default_factory=RingConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    l2: L2Config = field(default_factory=L2Config)
    threads: ThreadsConfig = field(default_factory=ThreadsConfig)
    devices: list = field(default_factory=list)   # of DeviceConfig; empty: all CUDA devices, else cpu

    @property
    def socket_path(self) -> str:
        return self.server.socket or os.environ.get("INFERD_SOCKET") or default_socket_path()

    @property
    def admin_socket_path(self) -> str:
        return self.server.admin_socket or os.path.join(os.path.dirname(self.socket_path), "admin.sock")

    @property
    def cache_path(self) -> str:
        return self.cache.path or default_cache_path()


def default_cache_path() -> str:
    """$CACHE_DIRECTORY (systemd's CacheDirectory=), /var/cache/inferd as root, ~/.cache/inferd."""
    base = os.environ.get("CACHE_DIRECTORY")
    if not base:
        base = "/var/cache/inferd" if os.geteuid() == 0 else os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "inferd")
    return os.path.join(base.split(":")[0], "results.cache")


SECTIONS = {"server": ServerConfig, "ring": RingConfig, "batching": BatchingConfig, "model": ModelConfig,
            "dispatch": DispatchConfig, "health": HealthConfig, "cache": CacheConfig,
            "embeddings": EmbeddingsConfig, "metrics": MetricsConfig, "l2": L2Config, "threads": ThreadsConfig}


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Check one value against its field's type and range; return it in the field's type."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    meta = f.metadata
    if kind == "int":
        if isinstance(value, str) and key.endswith("socket_mode"):
            try:
                value = int(value, 8)
            except ValueError:
                raise ConfigError(f"{key}: {value!r} is not an octal mode such as \"0660\"") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if key.endswith("log_level"):
            value = value.lower()
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif kind == "list":
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
    elif kind == "dict":
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if lo is not None and not lo <= value <= hi:
        raise ConfigError(f"{key}: {value!r} is out of range; allowed {lo} to {hi}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _apply(obj, section: str, values: dict) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in fields:
            raise ConfigError(f"{key}: unknown key; [{section}] takes {', '.join(fields)}")
        setattr(obj, name, _coerce(key, fields[name], value))


def _check_cross(cfg: Config) -> None:
    """Checks that involve more than one key."""
    for key in ("server.allow_uids", "server.allow_gids"):
        ids = getattr(cfg.server, key.split(".")[1]) or []
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**32 for i in ids):
            raise ConfigError(f"{key}: expected a list of ids 0 to {2**32 - 1}, got {ids!r}")
    for key in ("model.mean", "model.std"):
        vals = getattr(cfg.model, key.split(".")[1])
        if vals is None:
            continue
        if len(vals) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            raise ConfigError(f"{key}: expected 3 numbers (one per RGB channel), got {vals!r}")
        if key == "model.std" and not all(v > 0 for v in vals):
            raise ConfigError(f"{key}: every std must be > 0, got {vals!r}")
    for who, weight in (cfg.dispatch.weights or {}).items():
        if not (who.isdigit() or (who.startswith("@") and len(who) > 1)):
            raise ConfigError(f"dispatch.weights: key {who!r} is not a uid or @group")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1000:
            raise ConfigError(f"dispatch.weights.{who}: {weight!r} is not a weight above 0, at most 1000")
    if cfg.server.max_sessions_per_uid >= cfg.server.max_clients:
        raise ConfigError(f"server.max_sessions_per_uid: {cfg.server.max_sessions_per_uid} must be below "
                          f"server.max_clients ({cfg.server.max_clients}), so a new uid can always connect")
    if cfg.health.backoff_s > cfg.health.backoff_max_s:
        raise ConfigError(f"health.backoff_s: {cfg.health.backoff_s} is above health.backoff_max_s "
                          f"({cfg.health.backoff_max_s})")
    if cfg.ring.default_slots > cfg.ring.max_slots:
        raise ConfigError(f"ring.default_slots: {cfg.ring.default_slots} is above ring.max_slots "
                          f"({cfg.ring.max_slots})")
    for key, path in (("server.socket / --socket", cfg.socket_path),
                      ("server.admin_socket", cfg.admin_socket_path)):
        size = len(os.fsencode(path))
        if size > SUN_PATH_MAX:            # bind() would fail with a bare EINVAL
            raise ConfigError(f"socket path is {size} bytes; AF_UNIX allows at most {SUN_PATH_MAX}: "
                              f"choose a shorter {key} ({path})")
    if cfg.model.path:
        # first, so `--model /typo.pt2` says the file is missing, not that its input size is
        if not os.path.exists(cfg.model.path):
            raise ConfigError(f"model.path: {cfg.model.path} does not exist")
        if not os.path.isfile(cfg.model.path):
            raise ConfigError(f"model.path: {cfg.model.path} is not a file")
        if not cfg.model.input_height or not cfg.model.input_width:
            raise ConfigError("model.input_height / model.input_width: required (> 0) with model.path")
    check_input_form(cfg.model)
    if cfg.model.compile != "none" and cfg.model.warmup_batches < 1:
        raise ConfigError(f"model.compile: {cfg.model.compile} prepares every batch size during the "
                          f"warm-up; set model.warmup_batches >= 1")
    if cfg.l2.enabled:
        from .caching.fleet.codec import check_l2_config

        check_l2_config(cfg.l2, cfg.cache.enabled)    # key file private, one topology named
    seen = set()
    for i, dev in enumerate(cfg.devices):
        if dev.name not in ("cpu", "cpu:auto") and not (dev.name.startswith("cuda:") and dev.name[5:].isdigit()):
            raise ConfigError(f"device[{i}].name: {dev.name!r} is not cpu or cuda:N (nor cpu:auto)")
        if dev.name == "cpu:auto" and (dev.threads or len([d for d in cfg.devices if d.name.startswith("cpu")]) > 1):
            raise ConfigError(f"device[{i}]: cpu:auto chooses every CPU device and its threads; list "
                              f"no other cpu device and no threads beside it")
        if dev.name.startswith("cuda") and dev.name in seen:
            raise ConfigError(f"device[{i}].name: {dev.name} is listed twice")
        seen.add(dev.name)


def check_input_form(m: "ModelConfig") -> None:
    """A file model's normalisation is explicit: float_nchw needs model.mean and model.std (no
    silent ImageNet default), uint8_nhwc takes neither; built-ins take float_nchw only."""
    given = [key for key in ("mean", "std") if getattr(m, key) is not None]
    if m.input == "uint8_nhwc":
        if not m.path:
            raise ConfigError(f"model.input: uint8_nhwc is for file models that normalise inside; the "
                              f"built-in {m.builtin} takes float_nchw")
        if given:
            raise ConfigError(f"model.{given[0]}: a uint8_nhwc model normalises inside and is given the "
                              f"frames as they are; remove model.mean / model.std, or set "
                              f"model.input = \"float_nchw\"")
    elif m.path and len(given) < 2:
        raise ConfigError("model.mean / model.std: required for a float_nchw file model (the daemon "
                          "normalises (x / 255 - mean) / std and will not guess); e.g. ImageNet's "
                          "mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225], or set "
                          "model.input = \"uint8_nhwc\" if the model normalises inside")


def from_dict(data: dict, overrides: dict | None = None) -> Config:
    """Build and check a Config from parsed TOML plus ``{"section.key": value}`` overrides."""
    cfg = Config()
    for section, values in data.items():
        if section == "device":
            if not isinstance(values, list):
                raise ConfigError("device: expected a list of tables ([[device]])")
            for i, dev in enumerate(values):
                d = DeviceConfig()
                _apply(d, f"device[{i}]", dev)
                cfg.devices.append(d)
        elif section in SECTIONS:
            _apply(getattr(cfg, section), section, values)
        else:
            raise ConfigError(f"[{section}]: unknown section; allowed: {', '.join([*SECTIONS, 'device'])}")
    for dotted, value in (overrides or {}).items():
        section, _, name = dotted.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(f"{dotted}: overrides take section.key with section one of {', '.join(SECTIONS)}")
        _apply(getattr(cfg, section), section, {name: value})
    _check_cross(cfg)
    return cfg


def load(path: str | os.PathLike | None, overrides: dict | None = None) -> Config:
    """Read a TOML file (or nothing) and apply overrides. Raises ConfigError."""
    data = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    return from_dict(data, overrides)


# a value that is no TOML but plainly meant as a string: resnet18, /srv/m.pt2, cuda:0
_BARE_WORD = re.compile(r"""[^\s\[\]{}"',=#]+""")


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with value read as TOML (so 16, 2.5, "x", [1, 2] all work; a bare word
    such as resnet18 or /srv/model.pt2 is taken as a string). ConfigError for anything else that is
    not TOML, such as ``[1,``."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if not _BARE_WORD.fullmatch(raw):
            raise ConfigError(f"--set {text}: not a TOML value: {exc}; quote a string "
                              f'("..."), write a list as [1, 2]') from None
        value = raw
    return key.strip(), value


def reference() -> str:
    """The configuration reference as a Markdown table (for docs/configuration.md)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section, cls in [*SECTIONS.items(), ("device", DeviceConfig)]:
        for f in dataclasses.fields(cls):
            default = f.default
            shown = "(see meaning)" if default in ("", None) else f"`{default!r}`"
            if f.name == "socket_mode":
                shown = f"`{oct(default)}`"
            rows.append(f"| `{section}.{f.name}` | {shown} | {f.metadata['doc']} |")
    return "\n".join(rows)


#: docs/configuration.md holds the table between these two lines; the prose around it is written by hand.
REFERENCE_BEGIN = ("<!-- generated by `python -m inferd.daemon.config docs/configuration.md` "
                   "from daemon/config.py: edit the docs there, not here -->")
REFERENCE_END = "<!-- end of the generated reference -->"


def write_reference(page: Path) -> bool:
    """Replace the generated table in ``page`` with :func:`reference`; True if the page changed.
    Raises ValueError when the page lacks the two marker lines."""
    text = page.read_text()
    head, begin, rest = text.partition(REFERENCE_BEGIN + "\n")
    _, end, tail = rest.partition(REFERENCE_END)
    if not begin or not end:
        raise ValueError(f"{page}: no {REFERENCE_BEGIN!r} ... {REFERENCE_END!r} block to fill")
    new = f"{head}{begin}{reference()}\n{end}{tail}"
    if new != text:
        page.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys
    if len(sys.argv) > 1:                  # python -m inferd.daemon.config docs/configuration.md
        print(f"{sys.argv[1]}: {'rewritten' if write_reference(Path(sys.argv[1])) else 'up to date'}")
    else:
        print(reference())
