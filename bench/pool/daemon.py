"""The pool benchmark's constants, its daemon (bench/lib/daemons.py's, serving the ``synthetic``
model with a control file), and the load processes' bookkeeping."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np

from ..lib import daemons

#: The synthetic model's cost: a batch of n frames sleeps (BASE_MS + PER_FRAME_MS * n) / speed ms.
BASE_MS, PER_FRAME_MS = 10.0, 4.0
#: The cost this run uses: the defaults above, or --cost (run.py) for a faster model, where the
#: daemon's own per-frame and per-batch work shows (the tests' 2 + 0.5 n).
COST = {"base_ms": BASE_MS, "per_frame_ms": PER_FRAME_MS}
MAX_BATCH = 32
SPEEDS = (1.0, 3.0)
SEED = 20261130

SAT_CLIENTS, SAT_SLOTS = 4, 128        # (1), (2): client processes x frames in flight each
GEN_PROCS, GEN_SLOTS = 2, 1024         # (3), (6): open-loop generator processes, ring slots each
LOAD_70 = 0.70
LATENCY_TIMEOUT_MS = 10000.0
REMOVAL_LOAD = 0.40                    # (4): open-loop background load, x the summed capacity
REMOVAL_ARGS = ["--set", "health.backoff_s=0.2", "--set", "health.max_failures=2"]
REMOVAL_BOUND_S = 2.0
POLL_S = 0.005
FAULT_ARGS = ["--set", "health.max_failures=1", "--set", "health.backoff_s=0.02",
              "--set", "health.backoff_max_s=0.05"]
FAULT_DEPTH = 12                       # (5): closed-loop requests in flight per generator process
FAULT_RAISE_MS = (5.0, 30.0)           # (5): raise stays at least U(a, b) ms (and until a batch failed)
FAULT_CLEAR_MS = (0.0, 20.0)           # (5): after re-admission, no fault for U(a, b) ms
FAULT_POLL_S = 0.002
OVERLOAD_X, OVERLOAD_TIMEOUT_MS = 3.0, 300.0
RSS_EVERY_S = 0.5
CDF_QUANTILES = [float(q) for q in range(0, 100)] + [99.5, 99.9, 100.0]
RSS_FLAT = 0.05                        # (6): "flat" = max RSS over the window within 5 % of its start
WEIGHTED_TARGET = 0.95


# ------------------------------------------------------------------------------------ plumbing
def theory_fps(speed: float, batch: int = MAX_BATCH) -> float:
    """Frames/s of a device at ``speed`` running full batches back to back."""
    return speed * 1000.0 * batch / (COST["base_ms"] + COST["per_frame_ms"] * batch)


class Control:
    """The synthetic model's control file ($INFERD_SYNTHETIC), rewritten atomically."""

    def __init__(self, speeds):
        self.dir = tempfile.mkdtemp(prefix="inferd-bctl", dir="/tmp")
        self.path = os.path.join(self.dir, "synthetic.json")
        self.values = {**COST,
                       "speed": {str(i): s for i, s in enumerate(speeds)}, "fault": {}}
        self.write()

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.values, fh)
        os.replace(tmp, self.path)                 # readers see the old file or the new, never half

    def fault(self, index: int, what: str | None) -> None:
        if what is None:
            self.values["fault"].pop(str(index), None)
        else:
            self.values["fault"][str(index)] = what
        self.write()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def pool(speeds, policy: str = "weighted", extra=(), name: str = "pool"):
    """A daemon serving ``synthetic`` on one ``cpu:1`` device per speed; yields (d, Control, probe
    Client), d being daemons.daemon's dict (plus ``daemon_args`` and ``name``). Its log is kept as
    LOG_DIR/<name>.log; how it ended is appended to CLEANUP."""
    from inferd.client import Client

    ctl = Control(speeds)
    args = ["--model", "synthetic", "--set", f"batching.max_batch={MAX_BATCH}",
            "--set", f'dispatch.policy="{policy}"', *[a for _ in speeds for a in ("--device", "cpu:1")],
            *extra]
    d = {}
    try:
        keep = os.path.join(LOG_DIR[0], f"{name}.log") if LOG_DIR[0] else None
        with daemons.daemon(args, {"INFERD_SYNTHETIC": ctl.path}, keep_log=keep) as d:
            d.update(daemon_args=args, name=name)
            with Client(d["socket"], timeout=30.0) as probe:
                yield d, ctl, probe
    finally:
        ctl.remove()
        d["log_problems"] = daemon_log_problems(d.get("log", ""))
        CLEANUP.append({"name": name, "exit_code": d.get("exit_code"),
                        "shm_leftovers": d.get("shm_leftovers"), "log_problems": d["log_problems"]})


CLEANUP: list = []         # how each daemon ended, for the report
LOG_DIR = [""]             # [0]: where daemon logs are kept (set by main)


def daemon_log_problems(text: str) -> list[str]:
    """Lines of a daemon log that suggest a bug: tracebacks, and errors other than the injected
    faults' own (``batch of N on cpu#1 failed: RuntimeError: injected fault``)."""
    bad = []
    for line in text.splitlines():
        low = line.lower()
        if "injected fault" in low:
            continue
        if "traceback" in low or "exception" in low or " error" in low or "critical" in low:
            bad.append(line)
    return bad[:20]


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``: psutil's memory_info().rss, or the same figure from
    /proc/PID/statm where psutil is not installed (setup.cfg's bench extra does not list it)."""
    try:
        import psutil
    except ImportError:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process(pid).memory_info().rss


def gen_cfg(mode: str, seed: int, send_s: float, window, *, rate: float = 0.0, depth: int = 0,
            timeout_ms: float = LATENCY_TIMEOUT_MS, drain_s: float = 15.0) -> dict:
    return {"mode": mode, "rate": rate, "depth": depth, "seed": seed, "ring_slots": GEN_SLOTS,
            "timeout_ms": timeout_ms, "send_s": send_s, "drain_s": drain_s, "window": list(window)}


def merge_generators(reports: list) -> dict:
    """Counts summed over generator processes; window arrays concatenated."""
    counts: dict = {}
    for r in reports:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
    win = {k: np.concatenate([np.asarray(r["window"][k], dtype=np.float64) for r in reports])
           for k in ("t_send", "latency", "lag", "outcome")}
    return {"counts": counts, "window": win, "cpu": sum(r["cpu"] for r in reports),
            "sent_in_window": sum(r["sent_in_window"] for r in reports),
            "samples": [s for r in reports for s in r["samples"]],
            "lost_ids": [r["lost_ids"] for r in reports]}


def counter_delta(before: dict, after: dict, keys) -> dict:
    b, a = before["counters"], after["counters"]
    return {k: a.get(k, 0) - b.get(k, 0) for k in keys}


# ------------------------------------------------------------------------------- (1) and (2)
