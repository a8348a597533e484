"""The daemon's thread pools: how many threads each gets, on which cores, and that none spins idle.

NOTE [ thread pools ]

    pool                       used by                               limit (config key)
    -------------------------  ------------------------------------  ----------------------------------
    torch intra-op (OpenMP,    each CPU device's executor thread:    the device's threads; 0: the
      oneDNN, MKL)               one team per executor thread          usable cores shared evenly
    torch inter-op             nothing (no torch.jit.fork)           threads.interop (1)
    BLAS of numpy (OpenBLAS)   the embedding store: open, search     threads.blas (1), threadpoolctl
    OpenMP idle workers        between ops and after every batch     threads.omp_wait_policy (auto) and
                                                                     threads.omp_spin_count (10000)
    the team of one batch      each CPU batch                        threads.per_batch (auto)
    the GIL's hand-over        every thread: the event loop, each    threads.switch_interval_ms (0.25)
                                 device's collector and executor
    the garbage collector      whichever thread allocates when a     Python's thresholds (watched:
                                 generation's threshold is crossed     GcWatch)

Why each limit. The daemon's real work is the devices' batches; every other pool competes with them
for the same cores. numpy's OpenBLAS starts one worker per core when it is loaded, and a worker that
ran a product spins for a while before it sleeps: with a near-duplicate search after every few batches
it never sleeps, and one of two cores goes to spinning (0.3 -> 1.1 cores at the same throughput in a
soak). A search is one matrix-vector product, memory bound, so one thread loses nothing. BLAS is
limited at run time through threadpoolctl, since numpy is loaded (and OpenBLAS has started its
threads) before any configuration is read.

Waiting. Between two parallel regions (two ops of a forward pass) an OpenMP worker either spins or
sleeps on a futex, and waking a sleeper costs tens of microseconds at every op: in one process,
ResNet-18 at 64x64 on two threads ran 222.8 img/s at batch 4 with OpenMP's default (spin about
300000 times, a few milliseconds here, then sleep) against 122.5 with OMP_WAIT_POLICY=PASSIVE. But
a worker spinning after the last op of a batch takes a core from the event loop, the collector and
the clients exactly when the replies go out and the next batch is gathered, and when the cores are
shared (teams that together ask for more threads than there are, or other processes on a busy
host) a spinning worker waits on a core its team's master needs: on the shared 2-core development
machine, with other work on it, the default ran the same model 8-20x slower than passive. So
``threads.omp_wait_policy = "auto"`` (:func:`auto_wait`) spins only where it pays: where the CPU
devices' teams fit the usable cores, OpenMP's default policy with ``GOMP_SPINCOUNT = threads.omp_spin_count`` (10000, about
30-100 us on this kind of CPU: across the gap between two ops of a forward pass, asleep soon after
a batch); where they do not fit, or no team has a second thread, passive. These settings are read
once, when libgomp is loaded (``import torch``): :func:`prepare_environment` runs before that
(daemon/__main__.py) with the devices of the configuration; OMP_WAIT_POLICY or GOMP_SPINCOUNT
already in the environment wins. What the spin count cannot see, the load of the machine while
serving, the team size per batch does: on a contended machine one thread runs each batch faster
than two, and a team of one has no worker to spin or wake (daemon/pipeline/team_size.py, NOTE
[ team size per batch ]).
Measured again interleaved (2026-12-07, docs/benchmarks.md "Thread pools and the CPU layout"): in
a process of its own, at a quiet moment, 10,000 spins ran a batch of four as fast as OpenMP's
default (22-32 against 24-31 ms; passive 40-45), with or without a pause of up to 10 ms between
batches; the daemon's own batch of four took 36-41 ms at such moments whatever the count (10,000,
100,000 or OpenMP's own) and team size, so the count is not what is left between the daemon and
the in-process model there. Through the daemon, later (docs/benchmarks.md, "The spin count,
measured again"): OpenMP's own count ran 3-8 % closer to the model on the quiet machine, and with
two busy processes beside it fell to half of it at four clients (p99 839 ms) where 10,000 kept
0.88: a daemon shares its host, so 10,000 stays; a dedicated host may raise it.

One team per thread that computes. What was left was a parallel region on the event loop's thread:
the staging buffers' ``torch.zeros`` (and any op over more than torch's grain of 32,768 elements)
ran as an OpenMP team there, before the executors started, and from then on every executor
thread's team ran 1.6-1.8x slower for the life of the process (a plain process reproduces it: one
``torch.zeros`` of 16 64x64 frames on the main thread, then resnet18 @ 64x64 on two threads in
another thread, 30 against 17 ms a batch of 4). So :func:`configure_process` sets the loop's
thread, and the default of every thread started after it, to one thread: only the executors
(:func:`enter_device_thread`) and the start-up measurement (daemon/pipeline/cpu_layout.py) set a
team of their own. The daemon's warm-up went from 38 to 17 ms a batch of 4, the in-process figure.

The GIL. A torch op lets go of the GIL while it computes and takes it back to return, so a device
thread asks for it again after every op: about 30 times in a forward pass of the shapes CNN. When
another thread holds it (the event loop busy with one client's flood of ``info`` requests, say),
each ask waits until the holder is told to hand it over, which CPython does after the switch
interval, 5 ms by default: a 3 ms forward pass took 140 ms beside a thread that kept the GIL, and a
client classifying one frame at a time during such a flood waited over a second
(bench/isolation (a); the loop's share per uid bounds the loop time of each uid, not what the loop
as a whole leaves the devices). At 0.25 ms the same forward pass takes 13 ms. The price is more
switches when two threads both want to run Python, a few microseconds each, and it is the loop's
work that then yields to the devices', which is what a daemon serving its devices wants.

The garbage collector. A collection runs on whichever thread crossed a threshold and holds the
GIL until it ends, so the event loop, every collector and every executor (between two torch ops)
wait for it. A young collection takes microseconds; a full one walks every tracked object, and
after start-up torch and the model leave about 250,000 of them: 80-250 ms a full collection on the
shared 2-core development machine. Whether that happens while serving is what :class:`GcWatch`
answers (admin ``stats``, ``threads.gc``: collections by generation, their seconds, the longest):
in bench.load.policy's runs (2026-12-07, about six minutes of serving each) every daemon made one
full collection, at start-up, and none while serving (157 young ones in all), so freezing the
start-up heap (``gc.freeze`` before READY, tried in the same runs) changed nothing measurable
and is not done. A p99 that the watch ties to a full collection would bring it back.

Hand-offs. A lone request crosses three threads (loop -> collector -> executor -> loop). Timed
stage by stage in the daemon (docs/benchmarks.md, "Thread pools and the CPU layout": where a lone
request's time goes), the three wakes together cost 0.1-0.25 ms of the 0.4-1.0 ms a request spends
outside the model, the rest being the loop's Python and the client's side and socket; running an
idle device's batch on its collector thread would save one wake, 0.02-0.14 ms, and is not done.

Names. Each device's executor thread takes the OS name ``inferd-dev<index>`` (:data:`THREAD_NAME`)
before its first torch op, and the OpenMP workers it starts inherit it: ``top -H``, py-spy and
/proc/PID/task/*/comm (and bench/load's per-thread run-queue wait, from schedstat) tell the
model's threads from the event loop (the process's own name) and the rest.

Cores. The CPU devices' threads together may use at most the usable cores
(``os.sched_getaffinity``); :func:`plan` shares them out and warns about (or, with
``threads.oversubscribe = "refuse"``, refuses) an explicit configuration that asks for more. With
``threads.pin`` each CPU device's executor thread is bound to its own cores before its first batch,
so its OpenMP team (created by that thread, inheriting its affinity) stays there too.

Who calls what: :func:`prepare_environment` before torch is imported; :func:`plan` when the devices
are built; :func:`configure_process` once torch and numpy are loaded; :func:`enter_device_thread`
first thing in each executor thread (daemon/pipeline/executor.py); :func:`snapshot` for the admin
``stats`` reply (``threads``).
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

log = logging.getLogger("inferd.thread_pools")

WAIT_POLICIES = ("auto", "passive", "active", "default")
#: GOMP_SPINCOUNT of threads.omp_wait_policy = "auto" (threads.omp_spin_count's default): about
#: 30-100 us of spinning on this kind of CPU (5-10 ns a pause), across the gaps between the ops of
#: a forward pass, and no more (NOTE [ thread pools ], "Waiting")
SPIN_COUNT = 10000


class ThreadPlanError(Exception):
    """The CPU devices ask for more threads than there are usable cores (threads.oversubscribe)."""


@dataclass(frozen=True)
class Assignment:
    """One device's share: intra-op threads, and the cores it is pinned to (empty: not pinned)."""

    threads: int
    cores: tuple = ()


class _Registry:
    """What this process decided and what each executor thread applied (read by :func:`snapshot`)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.assignments: dict[int, Assignment] = {}     # device index -> its share
        self.entered: dict[int, dict] = {}               # device index -> what its thread applied
        self.usable: tuple = ()
        self.oversubscribed = False
        self.wait_policy = ""
        self.per_batch = "fixed"                         # threads.per_batch (configure_process)
        self.threads: dict[int, int] = {}                # executor thread ident -> device index
        self.teams: dict[int, object] = {}               # device index -> its engine's TeamSize
        self.blas_limit = 0
        self.controller = None                           # threadpoolctl.ThreadpoolController
        self.layout: dict | None = None                  # cpu:auto's choice (daemon/pipeline/cpu_layout.py)
        self.gc: GcWatch | None = None                   # configure_process installs it


_state = _Registry()


def usable_cores() -> tuple:
    """The cores this process may run on (its affinity mask, which cgroups and taskset narrow)."""
    return tuple(sorted(os.sched_getaffinity(0)))


def cpu_teams(specs, devices) -> list[int | None]:
    """The intra-op team size of each CPU device, before torch loads: from ``--device`` ``specs``
    (strings, they replace the configured devices) or the configured ``devices`` (``name``,
    ``threads``); 0 for a device whose share of the cores is worked out later (:func:`plan`),
    None for ``cpu:auto`` (measured after torch loads)."""
    if specs:
        teams = []
        for spec in specs:
            if spec == "cpu:auto":
                teams.append(None)
            elif spec.startswith("cpu"):
                _, _, n = spec.partition(":")
                teams.append(int(n) if n.isdigit() else 0)
        return teams
    if not devices:                     # none configured: one CPU device on every core (or
        return [0]                      # the CUDA devices found later, whose teams idle)
    return [None if d.name == "cpu:auto" else d.threads for d in devices if d.name.startswith("cpu")]


def auto_wait(teams: list, cores: int, spin_count: int = SPIN_COUNT) -> dict:
    """The OpenMP environment threads.omp_wait_policy = "auto" picks for CPU devices with these
    intra-op ``teams`` (:func:`cpu_teams`) on ``cores`` usable cores (NOTE [ thread pools ],
    "Waiting"): passive where the teams together ask for more threads than there are cores (a
    spinning worker would take the core another team needs) or where no CPU device has a team
    that could spin (only CUDA devices, or teams of one thread); else OpenMP's default policy
    with ``GOMP_SPINCOUNT = spin_count``: spin a little, then sleep."""
    explicit = sum(t for t in teams if t)
    shared = [t for t in teams if t == 0]
    share = max(1, (cores - explicit) // len(shared)) if shared else 0
    sizes = [t if t else share for t in teams if t is not None]
    unknown = any(t is None for t in teams)          # cpu:auto: its layouts never oversubscribe
    if not teams or sum(sizes) > cores or (not unknown and max(sizes, default=1) <= 1):
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {"GOMP_SPINCOUNT": str(spin_count)}


def prepare_environment(wait_policy: str, environ=os.environ, *, teams: list | None = None,
                        cores: int | None = None, spin_count: int = SPIN_COUNT) -> str:
    """Set the OpenMP wait policy for libgomp before torch is imported: ``OMP_WAIT_POLICY`` for
    passive and active, nothing for default, and for auto what :func:`auto_wait` picks for the
    CPU ``teams`` on ``cores`` (default: the usable cores). ``OMP_WAIT_POLICY`` or
    ``GOMP_SPINCOUNT`` already in the environment wins. Returns the setting in force, as the admin
    ``stats`` shows it: "PASSIVE", "ACTIVE", "GOMP_SPINCOUNT=N", or "" for OpenMP's default."""
    if wait_policy not in WAIT_POLICIES:
        raise ValueError(f"wait policy {wait_policy!r} is not one of {', '.join(WAIT_POLICIES)}")
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        if wait_policy == "auto":
            environ.update(auto_wait(teams or [], len(usable_cores()) if cores is None else cores,
                                     spin_count))
        elif wait_policy != "default":
            environ["OMP_WAIT_POLICY"] = wait_policy.upper()
    _state.wait_policy = " ".join(v if k == "OMP_WAIT_POLICY" else f"{k}={v}"
                                  for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if (v := environ.get(k)))
    return _state.wait_policy


def plan(devices: list, cores: tuple, *, pin: bool = False, oversubscribe: str = "warn") -> list:
    """One :class:`Assignment` per device config (``name``, ``threads``), in order.

    CPU devices with ``threads = 0`` share the cores that explicit ones leave, evenly, at least one
    thread each; CUDA devices get ``Assignment(0)`` (their executor thread keeps torch's setting).
    More CPU threads in all than ``cores``: a warning, or ThreadPlanError with ``oversubscribe =
    "refuse"``. With ``pin`` (and no oversubscription) each CPU device gets consecutive cores of
    its own."""
    cpu = [i for i, d in enumerate(devices) if d.name == "cpu"]
    explicit = sum(devices[i].threads for i in cpu)
    auto = [i for i in cpu if not devices[i].threads]
    share = max(1, (len(cores) - explicit) // len(auto)) if auto else 0
    counts = {i: devices[i].threads or share for i in cpu}
    total = sum(counts.values())
    over = total > len(cores)
    if over:
        text = (f"the CPU devices ask for {total} threads in all ("
                f"{', '.join(f'device[{i}] {n}' for i, n in counts.items())}) but this process may "
                f"use {len(cores)} cores (sched_getaffinity): their teams would take cores from each "
                f"other; lower [[device]] threads, or use --device cpu:auto")
        if oversubscribe == "refuse":
            raise ThreadPlanError(text + " (threads.oversubscribe = \"refuse\")")
        log.warning("%s", text)
    out, next_core = [], 0
    for i, dev in enumerate(devices):
        if i not in counts:
            out.append(Assignment(0))
            continue
        mine = ()
        if pin and not over:
            mine = tuple(cores[next_core:next_core + counts[i]])
            next_core += counts[i]
        out.append(Assignment(counts[i], mine))
    with _state.lock:
        _state.assignments = dict(enumerate(out))
        _state.usable, _state.oversubscribed = tuple(cores), over
    return out


def configure_process(blas_threads: int, interop_threads: int,
                      switch_interval_ms: float | None = None, per_batch: str = "fixed") -> None:
    """Limit the process-wide pools once torch and numpy are loaded: numpy's BLAS to
    ``blas_threads`` (threadpoolctl, so it holds although OpenBLAS started before), torch's
    inter-op pool to ``interop_threads`` (only possible before it first ran; a later call logs);
    set the GIL's switch interval to ``switch_interval_ms`` (None leaves Python's); and keep
    threads.per_batch for the CPU engines (:func:`per_batch`)."""
    import sys

    import numpy  # noqa: F401  (loads OpenBLAS, so threadpoolctl finds it)
    import torch
    from threadpoolctl import ThreadpoolController

    if switch_interval_ms is not None:
        sys.setswitchinterval(switch_interval_ms / 1000)

    # The calling thread, the event loop's, runs no OpenMP team, and threads started later default
    # to none either (each device's executor sets its own share, enter_device_thread): a parallel
    # region on the loop's thread (a torch.zeros of a staging buffer is one) left every device
    # thread's team 1.7x slower for the life of the process (resnet18 @ 64x64, 2 threads, a batch
    # of 4: 30 ms against 17; NOTE [ thread pools ])
    torch.set_num_threads(1)
    controller = ThreadpoolController()
    controller.select(user_api="blas").limit(limits=blas_threads)
    try:
        torch.set_num_interop_threads(interop_threads)
    except RuntimeError as exc:        # the inter-op pool already started: keep what it has
        log.warning("torch inter-op threads stay at %d: %s", torch.get_num_interop_threads(), exc)
    watch = GcWatch()
    watch.install()
    with _state.lock:
        if _state.gc is not None:
            _state.gc.uninstall()
        _state.controller, _state.blas_limit = controller, blas_threads
        _state.per_batch = per_batch
        _state.gc = watch


class GcWatch:
    """How often and how long Python's garbage collector ran in this process, by generation
    (``gc.callbacks``): collections, seconds in all, and the longest, in ms. A collection holds
    the GIL throughout, so every thread (the event loop, each collector and executor between two
    torch ops) waits for its end: a long one is a latency spike for every request then in flight.
    ``install`` once; ``snapshot`` for the admin ``stats`` (``threads.gc``)."""

    def __init__(self, clock=None):
        import time

        self.clock = clock or time.perf_counter
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest_ms = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = self.clock()
            return
        gen, took = info["generation"], self.clock() - self._t0
        self.count[gen] += 1
        self.seconds[gen] += took
        self.longest_ms[gen] = max(self.longest_ms[gen], 1000.0 * took)

    def install(self) -> None:
        import gc

        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        import gc

        if self in gc.callbacks:
            gc.callbacks.remove(self)

    def snapshot(self) -> dict:
        import gc

        return {"collections": list(self.count), "seconds": [round(s, 6) for s in self.seconds],
                "longest_ms": [round(m, 3) for m in self.longest_ms], "frozen": gc.get_freeze_count()}


def per_batch() -> str:
    """threads.per_batch: "auto" (each CPU batch's team size measured, daemon/pipeline/team_size.py)
    or "fixed" (the default until :func:`configure_process` says otherwise)."""
    return _state.per_batch


def enter_device_thread(device) -> dict:
    """Call first in ``device``'s executor thread, before any torch work: set this thread's torch
    intra-op threads to the device's share (CPU devices) and pin the thread to its cores when
    :func:`plan` gave it some. The OpenMP team this thread creates later inherits both. Returns
    (and records for :func:`snapshot`) what was applied. Never raises for a pinning the OS refuses
    (a narrowed cpuset): it logs and runs unpinned."""
    import torch

    share = _state.assignments.get(device.index) or Assignment(getattr(device, "threads", 0))
    applied = {"device": device.label, "tid": threading.get_native_id(), "cores": []}
    name_native_thread(f"{THREAD_NAME}{device.index}")
    if device.torch_device.type == "cpu":
        threads = device.threads or share.threads
        # torch copies its process-wide count into a thread at the thread's first parallel op;
        # do that now, so another device's later set_num_threads cannot leak into this thread
        torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        if share.cores:
            try:
                os.sched_setaffinity(0, share.cores)   # 0: the calling thread on Linux
                applied["cores"] = list(share.cores)
            except OSError as exc:
                log.warning("%s: cannot pin to cores %s (%s); running unpinned", device.label,
                            list(share.cores), exc.strerror)
    applied["intra_op"] = torch.get_num_threads()
    with _state.lock:
        _state.entered[device.index] = applied
        _state.threads[threading.get_ident()] = device.index
    return applied


#: The OS name (comm) of each device's executor thread, with the device's index after it. The
#: OpenMP workers that thread creates inherit the name, so ``top -H``, py-spy and
#: /proc/PID/task/*/comm tell the model's threads from the event loop (the process's own name)
#: and the rest; bench/load/daemon_load.py reads each group's CPU and run-queue wait by it.
THREAD_NAME = "inferd-dev"


def name_native_thread(name: str) -> bool:
    """Give the calling thread the OS name ``name`` (cut to the 15 bytes Linux keeps); False where
    the OS does not let it (no /proc), never raising: a name is for people and tools only."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as fh:
            fh.write(name[:15])
        return True
    except OSError:
        return False


def record_team(team) -> None:
    """Keep the calling executor thread's TeamSize (daemon/pipeline/team_size.py) for
    :func:`snapshot`; a thread that never entered a device (a test's engine) records nothing."""
    with _state.lock:
        index = _state.threads.get(threading.get_ident())
        if index is not None:
            _state.teams[index] = team


def record_layout(choice: dict) -> None:
    """Keep cpu:auto's choice and measured table for :func:`snapshot` (daemon/pipeline/cpu_layout.py)."""
    with _state.lock:
        _state.layout = choice


def snapshot() -> dict:
    """The pools as they are now, as plain data: usable cores, the OpenMP wait policy, per device
    its intra-op threads and cores, torch's inter-op threads, and every native pool threadpoolctl
    sees (OpenBLAS, libgomp; its OpenMP count is the calling thread's, not a device's). Cheap: the
    libraries were found once, in :func:`configure_process`."""
    import sys

    torch = sys.modules.get("torch")
    with _state.lock:
        controller = _state.controller
        out = {"usable_cores": len(_state.usable) or len(usable_cores()),
               "oversubscribed": _state.oversubscribed, "omp_wait_policy": _state.wait_policy,
               "blas_limit": _state.blas_limit, "switch_interval_ms": sys.getswitchinterval() * 1000,
               "per_batch": _state.per_batch,
               "devices": [dict(v, planned=_state.assignments.get(i, Assignment(0)).threads)
                           for i, v in sorted(_state.entered.items())]}
        teams = dict(_state.teams)
        if _state.gc is not None:
            out["gc"] = _state.gc.snapshot()
    preprocess = sys.modules.get(__name__.rsplit(".", 1)[0] + ".preprocess")   # never imported from here
    out["fused_preprocessing"] = preprocess.FUSED_LOADER.state() if preprocess is not None else "idle"
    for d, (i, _) in zip(out["devices"], sorted(_state.entered.items())):
        if i in teams:
            try:                # read while its executor may add a bucket: a retry next time
                d["team_by_batch"] = teams[i].snapshot()
            except RuntimeError:
                d["team_by_batch"] = {}
        if _state.layout is not None:
            out["layout"] = _state.layout
    out["interop"] = torch.get_num_interop_threads() if torch is not None else None
    out["pools"] = [{"api": lib["user_api"], "library": lib["internal_api"], "prefix": lib["prefix"],
                     "threads": lib["num_threads"]} for lib in (controller.info() if controller else [])]
    out["blas_threads"] = max((p["threads"] for p in out["pools"] if p["api"] == "blas"), default=None)
    return out


def reset_for_tests() -> None:
    """Forget every decision (unit tests run several plans in one process)."""
    global _state
    if _state.gc is not None:
        _state.gc.uninstall()
    _state = _Registry()
