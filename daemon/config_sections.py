"""The sections of the daemon's configuration: one dataclass per TOML table, each key with its
default, its documentation and its allowed range (``_opt``), read by daemon/config.py to load and
check a file and to print the reference.

    [server]      ServerConfig      sockets, access, per-client limits and timeouts
    [ring]        RingConfig        shared-memory rings: backend, sizes
    [batching]    BatchingConfig    batch size and delay, queue bound, default deadline
    [model]       ModelConfig       which model, its input, normalisation, precision, compilation
    [dispatch]    DispatchConfig    dispatch policy and fair share between uids
    [health]      HealthConfig      when a device leaves rotation and how it comes back
    [cache]       CacheConfig       the result cache file and its insert sampling
    [embeddings]  EmbeddingsConfig  the embedding store and who sees its rows
    [metrics]     MetricsConfig     timing histograms and the Prometheus listener
    [l2]          L2Config          the fleet cache on Redis
    [fleet]       FleetConfig       behind a load balancer: the HAProxy agent-check, the drain grace
    [threads]     ThreadsConfig     BLAS, OpenMP and torch thread pools, pinning
    [oip]         OipConfig         the Open Inference Protocol front (HTTP and gRPC), its tenants
    [[device]]    DeviceConfig      a list: cpu, cpu:auto or cuda:N, and threads
    [[models]]    ModelEntryConfig  a list: several named models (and versions) in one daemon, each
                                    with [model]'s keys (daemon/models/catalog.py); replaces [model]

No checks that involve more than one key live here (daemon/config.py has them), and nothing here
reads a file: importing this module costs only the dataclasses.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .dispatch.formation import WINDOWS
from .dispatch.policy import POLICIES
from ..shm import limits, paths
from ..shm.ring import BACKENDS

LOG_LEVELS = ("debug", "info", "warning", "error")
MODEL_FORMATS = ("auto", "torchscript", "export")
PRECISIONS = ("fp32", "bf16", "fp16")          # model.precision (daemon/pipeline/engine_options.py)
COMPILE_MODES = ("none", "graphs", "compile", "freeze")  # model.compile (daemon/pipeline/engine_options.py)
PER_SIZE_MODES = ("graphs", "compile")       # those prepared per batch size in the warm-up, batches padded up
INPUT_FORMS = ("float_nchw", "uint8_nhwc")     # model.input (daemon/pipeline/preprocess.py)


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
    max_prehello_per_uid: int = _opt(32, "connections of one uid that have not said hello yet (each "
                                         "holds a descriptor until hello_timeout_s); more are closed at "
                                         "once with an overloaded error", lo=1, hi=1 << 20)
    max_prehello: int = _opt(256, "connections of all uids that have not said hello yet; when full, "
                                  "the oldest one of the uid holding the most makes room for a newcomer "
                                  "of another uid (NOTE [ the door ] in daemon/front/door.py)",
                             lo=1, hi=1 << 20)
    reserved_fds: int = _opt(64, "file descriptors below RLIMIT_NOFILE (raised to its hard limit at "
                                 "start-up) that client connections never take, kept for the admin "
                                 "socket, hello and reloads; a connection that would take one is "
                                 "closed at once (at most half the limit; 0: none)", lo=0, hi=1 << 20)


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
    max_delay_ms: float = _opt(2.0, "longest a batch waits for more frames after its first (with window = "
                                    "measured: for frames predicted from the arrival rate only)",
                               lo=0.0, hi=10000.0)
    queue_limit: int = _opt(1024, "frames queued or running per device before overloaded", lo=1, hi=1 << 20)
    default_timeout_ms: float = _opt(30000.0, "deadline of a request that names none", lo=1.0,
                                     hi=limits.MAX_TIMEOUT_MS)
    adaptive: bool = _opt(True, "pick batch sizes from the measured latency profile and deadlines "
                                "(NOTE [ batch planning ] in daemon/dispatch/queues.py); false: fixed window")
    window: str = _opt("measured", "how long a batch waits for clients expected back (adaptive only): "
                                   "measured, while one batch of them all ends sooner than two "
                                   "(NOTE [ measured window ] in daemon/dispatch/formation.py); fixed, "
                                   "never past max_delay_ms after its first frame", choices=WINDOWS)


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
                                "prepared during warm-up (docs/operations.md, GPU); freeze (CPU, fp32): "
                                "a channels_last copy traced once and frozen (conv-bn folded, oneDNN "
                                "kernels; any batch size, answers within float rounding of the model's): "
                                "for models without Python control flow", choices=COMPILE_MODES)


@dataclass
class ModelEntryConfig(ModelConfig):
    """One ``[[models]]`` entry: every ``[model]`` key, plus where it runs, its share of a device, its
    version and the traffic split between versions of one name (daemon/models/catalog.py)."""
    version: int = _opt(1, "version of this name; two entries of one name and different versions are "
                           "served side by side (a request may name one; else the route below)",
                        lo=1, hi=1 << 30)
    devices: list = _opt(None, "indices of the devices ([[device]] order, or --device order) that may run "
                               "this model; empty: all")
    share: float = _opt(1.0, "this model's weight of a device's time while models compete for it "
                             "(NOTE [ model share ] in daemon/dispatch/model_share.py)", lo=0.001, hi=1e6)
    default: bool = _opt(False, "requests that name no model get this one (at most one entry; none "
                                "marked: the first)")
    canary_percent: float = _opt(0.0, "the newer version of a name: this percent of the name's requests "
                                      "that name no version, chosen by request id (deterministic), go to it; "
                                      "0 with no canary_uids: the newest version takes all", lo=0.0, hi=100.0)
    canary_uids: list = _opt(None, "the newer version of a name: requests of these uids (or OIP tenants' "
                                   "principal numbers) that name no version go to it; the rest to the older")


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
    capacity: int = _opt(100_000, "embeddings kept (a file of capacity * (4 * dim + 112) bytes, its "
                                  "blocks reserved at start: 133 MB at the default with the built-in "
                                  "model, and the index beside it: ~420 bytes a row in use). A photo "
                                  "service sets millions: the index keeps a query near 1 ms at a "
                                  "million rows. Once full, a uid past its share (capacity / uids "
                                  "holding rows) replaces its own oldest",
                         lo=1, hi=100_000_000)
    shared: bool = _opt(False, "near-duplicate results and tags are visible to every uid; false: a "
                               "uid sees only the images it stored itself")
    index: bool = _opt(True, "search through an approximate index (index_kind: HNSW graphs or IVF lists, one per uid "
                             "or one for all when shared) saved in <store file>.index/ and reopened "
                             "memory-mapped; false: every search scans the whole store exactly "
                             "(~70 ms a query at a million rows)")
    index_kind: str = _opt("auto", "the index's structure: hnsw (usearch graphs: a query ~1 ms at a "
                                   "million rows, an insert 0.3-0.4 ms of the inserter's CPU there), "
                                   "ivf (faiss inverted lists of int8 codes over trained centroids: an "
                                   "insert ~0.05 ms at any size; trained once the store holds "
                                   "39 rows a list, at most index_exact_max, exact scan before), or "
                                   "auto: ivf above 100,000 rows of capacity, hnsw up to it (NOTE "
                                   "[ the kind follows the capacity ] in daemon/caching/ann_index.py; "
                                   "docs/benchmarks.md \"Near-duplicate index\"); changing it, or a "
                                   "capacity that changes what auto means, rebuilds the index",
                           choices=("auto", "hnsw", "ivf"))
    index_lists: int = _opt(0, "IVF lists (centroids); 0: the power of two nearest 4 * sqrt(capacity), "
                               "4,096 at a million rows (changing it rebuilds the index)", lo=0, hi=1 << 20)
    index_probe: int = _opt(16, "IVF lists scanned a query (more: better recall, slower)", lo=1, hi=1 << 20)
    index_train_rows: int = _opt(0, "IVF: rows stored before its centroids are trained (the exact scan "
                                    "answers until then); 0: 39 a list, at most index_exact_max and half "
                                    "the capacity", lo=0, hi=100_000_000)
    index_exact_below: int = _opt(5_000, "stores with fewer rows are scanned exactly (as fast as the "
                                         "graph there, and exact)", lo=0, hi=100_000_000)
    index_exact_max: int = _opt(100_000, "while the index rebuilds or is over index_max_pending rows "
                                         "behind, stores up to this many rows are scanned exactly "
                                         "(~7 ms a query at 100k); larger ones answer near-duplicate "
                                         "requests overloaded (retry later)", lo=0, hi=100_000_000)
    index_max_pending: int = _opt(4_096, "rows stored but not yet in the graph that a search scans "
                                         "exactly beside it; more: as index_exact_max says",
                                  lo=0, hi=1_000_000)
    index_ef: int = _opt(64, "HNSW ef at search: candidates kept while walking the graph (more: "
                             "better recall, slower)", lo=8, hi=4096)
    index_m: int = _opt(12, "HNSW M: links per row (16 costs more CPU per insert for no recall "
                            "measured on near-duplicates; changing it rebuilds the index)", lo=4, hi=128)
    index_ef_construction: int = _opt(32, "HNSW ef at insert: candidates kept while linking a new row "
                                          "(64 costs twice the CPU per insert for no recall measured "
                                          "on near-duplicates at a million rows; changing it rebuilds "
                                          "the index)", lo=8, hi=4096)
    index_scalar: str = _opt("i8", "how the graph keeps its copy of each vector: i8 (int8: a third of "
                                   "f16's insert CPU at a million rows with M 12 and ef 32, the same "
                                   "recall, as the store re-ranks every candidate by its float32 "
                                   "vectors), f16 (float16) or bf16 (changing it rebuilds the index)",
                             choices=("i8", "f16", "bf16"))
    index_save_interval_s: float = _opt(300.0, "seconds between saves of the index while rows change "
                                               "(and at shutdown): a save writes every changed graph "
                                               "(~420 MB at a million rows); a crash loses only the "
                                               "inserts since, redone from the store at start-up",
                                        lo=1.0, hi=86400.0)
    index_nice: int = _opt(10, "how many nice steps below the daemon the index's inserter thread "
                               "runs (0: the same priority): inserts wait for cores the request "
                               "path leaves, rows pending meanwhile are scanned exactly "
                               "(NOTE [ the inserter yields ] in daemon/caching/ann_index.py)",
                           lo=0, hi=19)

@dataclass
class MetricsConfig:
    enabled: bool = _opt(True, "time every request and batch for the latency and batch-size "
                               "histograms (counters are always kept)")
    listen: str = _opt("", "HOST:PORT of an HTTP listener serving /metrics to a Prometheus server, "
                           "loopback addresses only (127.0.0.1:9464, [::1]:9464); every local user can "
                           "connect, so it needs metrics.token_file (or metrics.allow_anonymous); empty: "
                           "off (the admin socket serves the full text)")
    socket: str = _opt("", "Unix socket path of an HTTP listener serving /metrics (the same text as "
                           "metrics.listen), guarded by its file mode; empty: off")
    socket_mode: int = _opt(0o600, "permission bits of metrics.socket (0o660 with metrics.socket_group "
                                   "lets that group scrape)", lo=0, hi=0o777)
    socket_group: str = _opt("", "group (name or number) given metrics.socket; empty: the daemon's")
    token_file: str = _opt("", "file holding the bearer token the HTTP listener requires "
                               "(Authorization: Bearer; Prometheus: authorization: credentials_file), "
                               "at least 16 printable characters, readable by the daemon's user alone "
                               "(mode 0600); read again when it changes")
    allow_anonymous: bool = _opt(False, "serve a listener that every local user can reach (metrics.listen, "
                                        "or a metrics.socket others may open) without a token: the "
                                        "aggregate metrics become visible to every local user")
    per_uid: bool = _opt(False, "the HTTP listener's text also carries the per-uid series "
                                "(inferd_uid_*: which uids use the daemon, and how much); the admin "
                                "socket always does")


@dataclass
class ThreadsConfig:
    blas: int = _opt(1, "threads of numpy's BLAS (the embedding search, a memory-bound product), set "
                        "through threadpoolctl; more only competes with the devices (NOTE [ thread "
                        "pools ] in daemon/pipeline/thread_pools.py)", lo=1, hi=1024)
    interop: int = _opt(1, "torch inter-op threads (the daemon forks no torch work)", lo=1, hi=1024)
    omp_wait_policy: str = _opt("auto", "how idle OpenMP workers wait, set before torch loads: auto "
                                        "(spin omp_spin_count times, then sleep, where the CPU devices' "
                                        "teams fit the usable cores; else passive), passive (sleep at "
                                        "once), active (spin), or default (OpenMP's own: about 300000 "
                                        "spins); OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment "
                                        "wins (NOTE [ thread pools ] in daemon/pipeline/thread_pools.py)",
                                choices=("auto", "passive", "active", "default"))
    omp_spin_count: int = _opt(10000, "omp_wait_policy = auto: GOMP_SPINCOUNT, the spins of an idle "
                                      "OpenMP worker before it sleeps (about 5-10 ns each): enough to "
                                      "bridge the gaps between the ops of a forward pass",
                               lo=0, hi=1 << 40)
    per_batch: str = _opt("auto", "intra-op threads of each CPU batch: auto (each batch size runs "
                                  "with the team size, 1 or up to the device's threads, that its "
                                  "executor measured fastest lately; daemon/pipeline/team_size.py), "
                                  "or fixed (always the device's threads)",
                          choices=("auto", "fixed"))
    pin: bool = _opt(False, "bind each CPU device's device thread (and its OpenMP team) to cores of "
                            "its own")
    oversubscribe: str = _opt("warn", "CPU devices asking for more threads in all than the usable "
                                      "cores (sched_getaffinity): warn, or refuse to start",
                              choices=("warn", "refuse"))
    auto_measure_s: float = _opt(0.3, "--device cpu:auto: seconds measured per layout and batch size "
                                      "at start-up (daemon/pipeline/cpu_layout.py)", lo=0.02, hi=60.0)
    switch_interval_ms: float = _opt(0.25, "longest wait of a thread for the GIL before its holder must "
                                           "hand it over (sys.setswitchinterval; Python's own is 5 ms): "
                                           "a device thread waits for it after every torch op, so with "
                                           "the event loop busy each op would cost up to this (NOTE "
                                           "[ thread pools ] in daemon/pipeline/thread_pools.py)",
                                     lo=0.01, hi=100.0)


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
class FleetConfig:
    """A host behind a load balancer (docs/fleet.md): readiness, weight and drain."""
    agent: str = _opt("", "HOST:PORT of the HAProxy agent-check listener (HAProxy: agent-check "
                          "agent-port PORT): one line per connection, \"up ready NN%\", \"drain\" or "
                          "\"down\" (daemon/ops/agent_check.py); it tells only readiness and weight, so "
                          "it may listen where the balancer reaches it; empty: off")
    reference_fps: float = _opt(1000.0, "capacity in frames/s that the agent reports as 100%: a host "
                                        "reports 100 x (frames/s its devices in rotation deliver at "
                                        "batching.max_batch, by their measured profiles) / this, within "
                                        "1..256%; the same on every host of a fleet, e.g. the capacity "
                                        "of the fastest host type (inferctl health shows a host's)",
                                lo=0.001, hi=1e9)
    drain_grace_s: float = _opt(0.0, "SIGTERM or inferctl drain: seconds the daemon keeps serving while "
                                     "it reports draining (agent \"drain\", not ready), so balancers stop "
                                     "sending before it refuses; then the usual drain "
                                     "(server.drain_timeout_s). Set it above the balancer's check "
                                     "interval (agent-inter) plus a request's time", lo=0.0, hi=3600.0)


@dataclass
class OipConfig:
    enabled: bool = _opt(False, "start the Open Inference Protocol front (KServe v2 over HTTP and gRPC, "
                                "daemon/oip/) as a supervised child process of the daemon; it can also run "
                                "alone: python -m inferd.daemon.oip --config FILE")
    placement: str = _opt("process", "where the front runs with enabled: \"process\", a supervised child "
                                     "(its HTTP, JSON and protobuf work on another core, a crash of it never "
                                     "the daemon's); \"daemon\", on the daemon's own event loop, straight "
                                     "into admission (no process hop each way, but every OIP request's work "
                                     "on the loop that admits and answers every request); \"http-daemon\": "
                                     "the HTTP door on the daemon's loop, the gRPC door in the supervised "
                                     "process (grpcio's cost a call kept off the loop). docs/oip.md, \"Where "
                                     "it runs\", has the measurements",
                          choices=("process", "daemon", "http-daemon"))
    http: str = _opt("", "where the HTTP/REST door listens: a Unix socket path, or HOST:PORT for TCP "
                         "(127.0.0.1:8000, [::1]:8000); empty: oip-http.sock beside the client socket; "
                         "\"off\": no HTTP door")
    grpc: str = _opt("", "where the gRPC door listens: a Unix socket path, or HOST:PORT for TCP; empty: "
                         "oip-grpc.sock beside the client socket; \"off\": no gRPC door")
    socket_mode: int = _opt(0o660, "permission bits of the doors' Unix sockets (as server.socket_mode: the "
                                   "daemon's allow-list still decides who is served)", lo=0, hi=0o777)
    tokens_file: str = _opt("", "bearer tokens of network tenants, one per line: TOKEN TENANT [WEIGHT] "
                                "(# comments); the file must belong to the daemon's user and be readable "
                                "by it alone (mode 0600), else the front refuses to start; with it, every "
                                "TCP caller must send Authorization: Bearer TOKEN (gRPC: authorization "
                                "metadata). A tenant is a principal as a uid is: its own fair share "
                                "(WEIGHT, default 1), quotas and privacy scope. The daemon reads the "
                                "weights at start; the front re-reads the file when it changes")
    allow_anonymous_network: bool = _opt(False, "listen on a non-loopback TCP address without "
                                                "tokens_file: every host that reaches the port is served "
                                                "as the one tenant \"anonymous\" (refused without this)")
    tls_cert: str = _opt("", "PEM certificate chain for the TCP doors (HTTPS, gRPC over TLS); empty: plain "
                             "TCP (terminate TLS at the load balancer instead: docs/oip.md)")
    tls_key: str = _opt("", "PEM private key of tls_cert, readable by the daemon's user alone")
    request_timeout_ms: float = _opt(30000.0, "deadline of an inference request that names none (the "
                                              "timeout parameter in microseconds, or the gRPC deadline)",
                                     lo=1.0, hi=limits.MAX_TIMEOUT_MS)
    max_request_bytes: int = _opt(64 * 2**20, "largest HTTP request body or gRPC message accepted",
                                  lo=4096, hi=2**31 - 1)
    max_batch: int = _opt(256, "images in one inference request, at most", lo=1, hi=65536)
    idle_timeout_s: float = _opt(75.0, "an HTTP keep-alive connection idle this long is closed",
                                 lo=0.1, hi=86400.0)
    ring_slots: int = _opt(64, "ring slots of each session the front opens to the daemon (one session per "
                               "principal: a local uid or a tenant)", lo=1, hi=65536)
    max_principals: int = _opt(256, "principals the front keeps a daemon session open for; the least "
                                    "recently used one is closed to make room", lo=1, hi=65536)


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
    fleet: FleetConfig = field(default_factory=FleetConfig)
    threads: ThreadsConfig = field(default_factory=ThreadsConfig)
    oip: OipConfig = field(default_factory=OipConfig)
    devices: list = field(default_factory=list)   # of DeviceConfig; empty: all CUDA devices, else cpu
    models: list = field(default_factory=list)    # of ModelEntryConfig; empty: [model] alone

    def model_entries(self) -> list:
        """The configured models: the ``[[models]]`` entries, or ``[model]`` alone as a one-model
        catalog (daemon/models/catalog.py)."""
        return self.models or [self.model]

    @property
    def socket_path(self) -> str:
        """server.socket, else $INFERD_SOCKET, else the default (inferd.shm.paths: the clients' rule too)."""
        return paths.socket_path(self.server.socket)

    @property
    def admin_socket_path(self) -> str:
        """server.admin_socket, else admin.sock beside the client socket (inferd.shm.paths)."""
        return paths.admin_socket_path(self.server.admin_socket, self.socket_path)

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
            "embeddings": EmbeddingsConfig, "metrics": MetricsConfig, "l2": L2Config, "fleet": FleetConfig,
            "threads": ThreadsConfig, "oip": OipConfig}
