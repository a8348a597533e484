"""The daemon's thread pools: how many threads each gets, on which cores, and that none spins idle.

NOTE [ thread pools ]

    pool                       used by                               limit (config key)
    -------------------------  ------------------------------------  ----------------------------------
    torch intra-op (OpenMP,    each CPU device's executor thread:    the device's threads; 0: the
      oneDNN, MKL)               one team per executor thread          usable cores shared evenly
    torch inter-op             nothing (no torch.jit.fork)           threads.interop (1)
    BLAS of numpy (OpenBLAS)   the embedding store: open, search     threads.blas (1), threadpoolctl
    OpenMP idle workers        after every batch                     threads.omp_wait_policy (passive)
    the GIL's hand-over        every thread: the event loop, each    threads.switch_interval_ms (0.25)
                                 device's collector and executor

Why each limit. The daemon's real work is the devices' batches; every other pool competes with them
for the same cores. numpy's OpenBLAS starts one worker per core when it is loaded, and a worker that
ran a product spins for a while before it sleeps: with a near-duplicate search after every few batches
it never sleeps, and one of two cores goes to spinning (0.3 -> 1.1 cores at the same throughput in a
soak). A search is one matrix-vector product, memory bound, so one thread loses nothing. An OpenMP
team that spins after a batch steals a core from the event loop and the clients exactly when the
replies go out, so the daemon asks for passive waiting. ``OMP_WAIT_POLICY`` is read when libgomp is
loaded (``import torch``): :func:`prepare_environment` runs before that (daemon/__main__.py); a value
already in the environment wins. BLAS is limited at run time through threadpoolctl, since numpy is
loaded (and OpenBLAS has started its threads) before any configuration is read.

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

WAIT_POLICIES = ("passive", "active", "default")


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
        self.blas_limit = 0
        self.controller = None                           # threadpoolctl.ThreadpoolController
        self.layout: dict | None = None                  # cpu:auto's choice (daemon/pipeline/cpu_layout.py)


_state = _Registry()


def usable_cores() -> tuple:
    """The cores this process may run on (its affinity mask, which cgroups and taskset narrow)."""
    return tuple(sorted(os.sched_getaffinity(0)))


def prepare_environment(wait_policy: str, environ=os.environ) -> str:
    """Set ``OMP_WAIT_POLICY`` for libgomp before torch is imported; a value already set wins.
    Returns the policy in force ("" for OpenMP's default)."""
    if wait_policy not in WAIT_POLICIES:
        raise ValueError(f"wait policy {wait_policy!r} is not one of {', '.join(WAIT_POLICIES)}")
    if "OMP_WAIT_POLICY" not in environ and wait_policy != "default":
        environ["OMP_WAIT_POLICY"] = wait_policy.upper()
    _state.wait_policy = environ.get("OMP_WAIT_POLICY", "")
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
                      switch_interval_ms: float | None = None) -> None:
    """Limit the process-wide pools once torch and numpy are loaded: numpy's BLAS to
    ``blas_threads`` (threadpoolctl, so it holds although OpenBLAS started before), torch's
    inter-op pool to ``interop_threads`` (only possible before it first ran; a later call logs);
    and set the GIL's switch interval to ``switch_interval_ms`` (None leaves Python's)."""
    import sys

    import numpy  # noqa: F401  (loads OpenBLAS, so threadpoolctl finds it)
    import torch
    from threadpoolctl import ThreadpoolController

    if switch_interval_ms is not None:
        sys.setswitchinterval(switch_interval_ms / 1000)

    controller = ThreadpoolController()
    controller.select(user_api="blas").limit(limits=blas_threads)
    try:
        torch.set_num_interop_threads(interop_threads)
    except RuntimeError as exc:        # the inter-op pool already started: keep what it has
        log.warning("torch inter-op threads stay at %d: %s", torch.get_num_interop_threads(), exc)
    with _state.lock:
        _state.controller, _state.blas_limit = controller, blas_threads


def enter_device_thread(device) -> dict:
    """Call first in ``device``'s executor thread, before any torch work: set this thread's torch
    intra-op threads to the device's share (CPU devices) and pin the thread to its cores when
    :func:`plan` gave it some. The OpenMP team this thread creates later inherits both. Returns
    (and records for :func:`snapshot`) what was applied. Never raises for a pinning the OS refuses
    (a narrowed cpuset): it logs and runs unpinned."""
    import torch

    share = _state.assignments.get(device.index) or Assignment(getattr(device, "threads", 0))
    applied = {"device": device.label, "tid": threading.get_native_id(), "cores": []}
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
    return applied


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
               "devices": [dict(v, planned=_state.assignments.get(i, Assignment(0)).threads)
                           for i, v in sorted(_state.entered.items())]}
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
    _state = _Registry()
