"""Device-pool benchmark: ``python bench/devices.py [--quick] [--out bench/out] [--img-dir DIR]``.

On daemons serving the ``synthetic`` model (inferd.daemon.zoo.synthetic: a batch of n frames costs
(base_ms + per_frame_ms * n) / speed of GIL-free sleep, so each device's capacity is known), measures:

(1) standalone capacity of a device at speed 1 and one at speed 3 (one daemon each, saturated by
    closed-loop Client processes); their sum is the baseline of (2), (3) and (6);
(2) the saturated throughput of a two-device pool (speeds 1 and 3) under ``weighted`` and
    ``round_robin`` dispatch, as % of that sum, and each device's share of the frames;
(3) p50/p99 latency at 70 % of the sum, open-loop Poisson arrivals, for both policies;
(4) time from an injected fault (``raise``, ``hang``) on device 1 to its removal, and to re-admission;
(5) 1000+ injected faults under closed-loop load: requests lost, answered twice, answered wrong;
(6) 3x overload with a 300 ms deadline: admitted and refused rates, admitted latency, daemon RSS.

Nothing is asserted: the report says which targets were met. Writes ``OUT/devices.json`` and four
PNGs (docs/img/pool_*.png; with ``--quick`` into OUT, so a smoke run does not replace the documented
figures). See docs/benchmarks.md, section "Device pools".
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
if BENCH_DIR not in sys.path:        # spawned children find these modules through the same sys.path
    sys.path.insert(0, BENCH_DIR)

import numpy as np   # noqa: E402

import common        # noqa: E402
import pool_load     # noqa: E402

#: The synthetic model's cost: a batch of n frames sleeps (BASE_MS + PER_FRAME_MS * n) / speed ms.
BASE_MS, PER_FRAME_MS = 10.0, 4.0
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

DURATIONS = {
    "full": {"sat_warmup_s": 2.0, "sat_s": 8.0, "lat_warmup_s": 2.0, "lat_s": 15.0, "removal_reps": 10,
             "faults": 1000, "faults_cap_s": 150.0, "over_warmup_s": 1.0, "over_s": 18.0},
    "quick": {"sat_warmup_s": 1.0, "sat_s": 3.0, "lat_warmup_s": 1.0, "lat_s": 4.0, "removal_reps": 3,
              "faults": 150, "faults_cap_s": 25.0, "over_warmup_s": 1.0, "over_s": 5.0},
}


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------ plumbing
def theory_fps(speed: float, batch: int = MAX_BATCH) -> float:
    """Frames/s of a device at ``speed`` running full batches back to back."""
    return speed * 1000.0 * batch / (BASE_MS + PER_FRAME_MS * batch)


class Control:
    """The synthetic model's control file ($INFERD_SYNTHETIC), rewritten atomically."""

    def __init__(self, speeds):
        self.dir = tempfile.mkdtemp(prefix="inferd-bctl", dir="/tmp")
        self.path = os.path.join(self.dir, "synthetic.json")
        self.values = {"base_ms": BASE_MS, "per_frame_ms": PER_FRAME_MS,
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
    Client) with d = {"proc", "socket", "prefix", "daemon_args"}. Always stopped (SIGTERM, then
    SIGKILL if it overstays); afterwards d has exit_code, shm_leftovers, log_problems, and its log is
    kept as LOG_DIR/<name>.log."""
    import secrets

    from inferd.client import Client
    from inferd.daemon.launch import DaemonProcess

    ctl = Control(speeds)
    workdir = common.short_workdir()
    prefix = f"inferdbench{secrets.token_hex(3)}"
    args = ["--model", "synthetic", "--set", f"batching.max_batch={MAX_BATCH}",
            "--set", f'dispatch.policy="{policy}"', *[a for _ in speeds for a in ("--device", "cpu:1")],
            *no_memory_args(), *extra]
    d = {"socket": os.path.join(workdir, "d.sock"), "prefix": prefix, "daemon_args": args, "name": name}
    proc = None
    try:
        proc = d["proc"] = DaemonProcess.start([*args, "--set", f'ring.shm_prefix="{prefix}"'],
                                               socket_path=d["socket"], workdir=workdir,
                                               env={"INFERD_SYNTHETIC": ctl.path})
        with Client(d["socket"], timeout=30.0) as probe:
            yield d, ctl, probe
    finally:
        try:
            if proc is not None:
                try:
                    d["exit_code"] = proc.stop(timeout=30.0)
                finally:
                    proc.kill()
                text = proc.log()
                d["log_problems"] = daemon_log_problems(text)
                if LOG_DIR:
                    os.makedirs(LOG_DIR, exist_ok=True)
                    with open(os.path.join(LOG_DIR, f"{name}.log"), "w") as fh:
                        fh.write(text)
        finally:
            d["shm_leftovers"] = common.shm_leftovers(prefix)
            shutil.rmtree(workdir, ignore_errors=True)
            ctl.remove()
            _CLEANUP.append({"name": name, "exit_code": d.get("exit_code"),
                             "shm_leftovers": d.get("shm_leftovers"), "log_problems": d.get("log_problems", [])})


def no_memory_args() -> list[str]:
    """``--set cache.enabled=false`` (and the same for embeddings) where this daemon has those
    sections: the frames here repeat (256 grey levels), and a result cache would answer most of them
    without a device, which is not what this benchmark measures (and would write a cache file
    outside the benchmark's work directory)."""
    from inferd.daemon.config import SECTIONS

    return [a for section in ("cache", "embeddings") if section in SECTIONS
            for a in ("--set", f"{section}.enabled=false")]


_CLEANUP: list = []
LOG_DIR = ""            # set by main: daemon logs are kept there


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``: psutil's memory_info().rss, or the same figure from
    /proc/PID/statm where psutil is not installed (setup.cfg's bench extra does not list it)."""
    try:
        import psutil
    except ImportError:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process(pid).memory_info().rss


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


class Group:
    """Child processes started together against one shared start time; see ``children``."""

    def __init__(self, q, procs, start: float, stop):
        self.q, self.procs, self.start, self.stop = q, procs, start, stop

    def finish(self, timeout: float) -> list:
        """Set ``stop`` and collect every child's final report, in index order."""
        self.stop.set()
        done = common.collect_results(self.q, self.procs, len(self.procs), timeout)
        return [d[2:] for d in sorted(done, key=lambda d: d[1])]


@contextlib.contextmanager
def children(specs: list, lead_s: float = 0.3):
    """Start ``target(q, index, *args, start, go, stop)`` for each (target, args) in ``specs``, wait
    until every one reported ready, give them one start time ``lead_s`` from now, yield a Group.
    Every child is joined or killed on the way out."""
    ctx = common.CTX
    q, go, start, stop = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0), ctx.Event()
    procs = [ctx.Process(target=t, args=(q, i, *a, start, go, stop), name=f"bench-pool-{i}", daemon=True)
             for i, (t, a) in enumerate(specs)]
    try:
        for p in procs:
            p.start()
        common.collect_results(q, procs, len(procs), common.RESULT_GRACE_S)
        start.value = time.monotonic() + lead_s
        go.set()
        yield Group(q, procs, start.value, stop)
    finally:
        go.set()
        stop.set()
        common.stop_processes(procs, grace=20.0)


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
def saturate(d: dict, probe, table: list, warmup_s: float, seconds: float, seed: int) -> dict:
    """SAT_CLIENTS closed-loop Client processes with SAT_SLOTS in flight each; frames/s and the
    per-device split from the daemon's counters over [start + warmup, + seconds]."""
    pid = d["proc"].pid
    specs = [(pool_load.saturator, (d["socket"], SAT_SLOTS, table, seed + i)) for i in range(SAT_CLIENTS)]
    with children(specs) as g:
        sleep_until(g.start + warmup_s)
        before, cpu0, t0 = probe.info(), cpu_seconds(pid), time.monotonic()
        sleep_until(g.start + warmup_s + seconds)
        after, cpu1, t1 = probe.info(), cpu_seconds(pid), time.monotonic()
        done = g.finish(common.RESULT_GRACE_S)
    span = t1 - t0
    delta = counter_delta(before, after, ("frames", "batches", "model_seconds", "overloaded", "failed"))
    dev_frames = [a["frames"] - b["frames"] for a, b in zip(after["devices"], before["devices"])]
    fps = delta["frames"] / span
    counts: dict = {}
    for c, _cpu in done:
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
    return {"fps": fps, "window_s": span, "device_frames": dev_frames,
            "device_fps": [f / span for f in dev_frames],
            "share": [f / max(delta["frames"], 1) for f in dev_frames],
            "mean_batch": delta["frames"] / max(delta["batches"], 1), "daemon": delta,
            "cpu_daemon": (cpu1 - cpu0) / span, "cpu_clients": sum(cpu for _, cpu in done),
            "clients": counts, "in_flight": SAT_CLIENTS * SAT_SLOTS,
            "batch_ms": [dv["batch_ms"] for dv in after["devices"]]}


def standalone(table: list, dur: dict) -> list[dict]:
    rows = []
    for speed in SPEEDS:
        log(f"(1) standalone: one device at speed {speed:g} ...")
        with pool((speed,), name=f"standalone-{speed:g}x") as (d, _ctl, probe):
            r = saturate(d, probe, table, dur["sat_warmup_s"], dur["sat_s"], SEED + 100)
        r.update(speed=speed, theory_fps=theory_fps(speed))
        rows.append(r)
    return rows


# --------------------------------------------------------------------------------------- (3)
def open_loop(d: dict, probe, table: list, rate: float, warmup_s: float, seconds: float, seed: int,
              timeout_ms: float, drain_s: float, rss: list | None = None) -> dict:
    """GEN_PROCS open-loop generators at ``rate`` requests/s in all; requests sent in
    [warmup, warmup + seconds] are measured. ``rss``: if a list, (t, bytes) of the daemon every
    RSS_EVERY_S from just before the start until every reply is in."""
    pid = d["proc"].pid
    window = (warmup_s, warmup_s + seconds)
    specs = [(pool_load.generator, (d["socket"], gen_cfg("open", seed + i, warmup_s + seconds, window,
                                                          rate=rate / GEN_PROCS, timeout_ms=timeout_ms,
                                                          drain_s=drain_s), table))
             for i in range(GEN_PROCS)]
    with children(specs) as g:
        t_w0, t_w1 = g.start + warmup_s, g.start + warmup_s + seconds
        t_rss_end = t_w1 + (2.0 if rss is not None else 0.0)
        before = after = None
        nxt = g.start - RSS_EVERY_S               # RSS: one sample before the start, then every 0.5 s
        while True:
            now = time.monotonic()
            if before is None and now >= t_w0:
                before, cpu0, t0 = probe.info(), cpu_seconds(pid), time.monotonic()
            if after is None and before is not None and now >= t_w1:
                after, cpu1, t1 = probe.info(), cpu_seconds(pid), time.monotonic()
            if rss is not None and now >= nxt:
                rss.append((now - g.start, rss_bytes(pid)))
                nxt += RSS_EVERY_S
            if after is not None and now >= t_rss_end:
                break
            wake = [t_w0 if before is None else t_w1] if after is None else [t_rss_end]
            sleep_until(min(wake + ([nxt] if rss is not None else [])))
        reports = g.finish(warmup_s + seconds + drain_s + common.RESULT_GRACE_S)
    m = merge_generators([r[0] for r in reports])
    w = m["window"]
    ok = w["outcome"] == pool_load.OK
    over = w["outcome"] == pool_load.CODE_OF["overloaded"]
    admitted = ~over
    span = t1 - t0
    per_second = []
    for k in range(int(np.ceil(seconds))):
        sel = (w["t_send"] >= warmup_s + k) & (w["t_send"] < warmup_s + k + 1)
        lat_ok = w["latency"][sel & ok] * 1000.0
        lat_adm = w["latency"][sel & admitted] * 1000.0
        expired = sel & (w["outcome"] == pool_load.CODE_OF["deadline_exceeded"])
        per_second.append({"t": k, "ok": int((sel & ok).sum()), "admitted": int((sel & admitted).sum()),
                           "overloaded": int((sel & over).sum()), "deadline_exceeded": int(expired.sum()),
                           "p50_ok_ms": float(np.percentile(lat_ok, 50)) if lat_ok.size else None,
                           "p99_ok_ms": float(np.percentile(lat_ok, 99)) if lat_ok.size else None,
                           "p99_admitted_ms": float(np.percentile(lat_adm, 99)) if lat_adm.size else None})
    lat_ok_ms = w["latency"][ok] * 1000.0
    cdf = {"q": CDF_QUANTILES, "ms": (np.percentile(lat_ok_ms, CDF_QUANTILES).tolist() if lat_ok_ms.size else [])}
    return {"rate": rate, "window_s": seconds, "counts": m["counts"], "cpu_generators": m["cpu"],
            "cpu_daemon": (cpu1 - cpu0) / span,
            "daemon": counter_delta(before, after, ("frames", "batches", "overloaded", "expired",
                                                    "failed", "redispatched", "stale_results")),
            "device_frames": [a["frames"] - b["frames"] for a, b in zip(after["devices"], before["devices"])],
            "sent_in_window": m["sent_in_window"], "offered_rate": m["sent_in_window"] / seconds,
            "answered_ok_rate": float(ok.sum()) / seconds,
            "admitted_rate": float(admitted.sum()) / seconds, "overloaded_rate": float(over.sum()) / seconds,
            "outcomes": {name: int((w["outcome"] == i).sum()) for i, name in enumerate(pool_load.CODE_NAMES)
                         if (w["outcome"] == i).any()},
            "latency_ok": common.latency_stats(w["latency"][ok]),
            "latency_admitted": common.latency_stats(w["latency"][admitted]),
            "lag": common.latency_stats(w["lag"]), "samples": m["samples"], "lost_ids": m["lost_ids"],
            "per_second": per_second, "cdf_ok": cdf}


def latency_70(d, probe, table, capacity: float, dur: dict, seed: int) -> dict:
    return open_loop(d, probe, table, LOAD_70 * capacity, dur["lat_warmup_s"], dur["lat_s"], seed,
                     LATENCY_TIMEOUT_MS, drain_s=20.0)


def policies(table: list, capacity: float, dur: dict) -> dict:
    out = {}
    for policy in ("weighted", "round_robin"):
        log(f"(2)+(3) pool {SPEEDS}, policy {policy}: saturated, then {LOAD_70:.0%} load ...")
        with pool(SPEEDS, policy, name=f"pool-{policy}") as (d, _ctl, probe):
            sat = saturate(d, probe, table, dur["sat_warmup_s"], dur["sat_s"], SEED + 200)
            sat["pct_of_sum"] = sat["fps"] / capacity
            lat = latency_70(d, probe, table, capacity, dur, SEED + 300)
            out[policy] = {"saturated": sat, "load70": lat, "daemon_args": d["daemon_args"]}
    return out


# --------------------------------------------------------------------------------------- (4)
def wait_state(probe, index: int, pred, timeout: float) -> tuple[float, dict]:
    """Poll info every POLL_S until ``pred(state of device index)``; (monotonic time of the reply
    that showed it, that info). RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        info = probe.info()
        t = time.monotonic()
        if pred(info["devices"][index]["state"]):
            return t, info
        if t > deadline:
            raise RuntimeError(f"device {index} still {info['devices'][index]['state']} after {timeout} s")
        time.sleep(POLL_S)


def removal(table: list, capacity: float, dur: dict) -> dict:
    """Faults on device 1 under open-loop load; fault -> removal and clear -> re-admission times."""
    log(f"(4) fault to removal: raise and hang x {dur['removal_reps']} ...")
    out = {"reps": dur["removal_reps"], "load_rate": REMOVAL_LOAD * capacity, "args": REMOVAL_ARGS}
    with pool(SPEEDS, "weighted", REMOVAL_ARGS, name="removal") as (d, ctl, probe):
        cfg = gen_cfg("open", SEED + 400, 3600.0, (0.0, 3600.0), rate=REMOVAL_LOAD * capacity,
                      drain_s=15.0)
        with children([(pool_load.generator, (d["socket"], cfg, table))]) as g:
            sleep_until(g.start + 1.0)
            pid, t0, cpu0 = d["proc"].pid, time.monotonic(), cpu_seconds(d["proc"].pid)
            for fault in ("raise", "hang"):
                times, readmit = [], []
                for _ in range(dur["removal_reps"]):
                    frames0 = probe.info()["devices"][1]["frames"]     # device 1 serving again
                    deadline = time.monotonic() + 10
                    while probe.info()["devices"][1]["frames"] < frames0 + 20 and time.monotonic() < deadline:
                        time.sleep(0.02)
                    t_fault = time.monotonic()
                    ctl.fault(1, fault)
                    try:
                        t_out, _ = wait_state(probe, 1, lambda s: s != "healthy", 10.0)
                    finally:
                        t_clear = time.monotonic()
                        ctl.fault(1, None)
                    times.append(t_out - t_fault)
                    t_back, _ = wait_state(probe, 1, lambda s: s == "healthy", 10.0)
                    readmit.append(t_back - t_clear)
                out[fault] = {"removal_s": times, "readmit_s": readmit}
            info = probe.info()
            out["cpu_daemon"] = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            reports = g.finish(30.0)
        out["counters"] = info["counters"]
        m = merge_generators([r[0] for r in reports])
        out["generator"], out["cpu_generators"] = m["counts"], m["cpu"]
    return out


# --------------------------------------------------------------------------------------- (5)
def faults(table: list, dur: dict) -> dict:
    """Toggle ``raise`` on device 1 under closed-loop load until the daemon counted ``dur['faults']``
    failed batches (or faults_cap_s passed). One cycle: write raise; keep it at least U(FAULT_RAISE_MS)
    ms and until batches_failed went up; clear it; wait until device 1 is healthy again (its canary
    passed); keep it clear U(FAULT_CLEAR_MS) ms. The daemon's info is polled every FAULT_POLL_S."""
    target, cap = dur["faults"], dur["faults_cap_s"]
    log(f"(5) {target} injected faults under closed-loop load (at most {cap:.0f} s) ...")
    rng = np.random.default_rng(SEED + 500)
    out = {"target": target, "args": FAULT_ARGS, "depth": FAULT_DEPTH * GEN_PROCS,
           "raise_ms": FAULT_RAISE_MS, "clear_ms": FAULT_CLEAR_MS}
    with pool(SPEEDS, "weighted", FAULT_ARGS, name="faults") as (d, ctl, probe):
        cfg = [gen_cfg("closed", SEED + 510 + i, 3600.0, (0.0, 3600.0), depth=FAULT_DEPTH, drain_s=30.0)
               for i in range(GEN_PROCS)]
        before = probe.info()
        failed0 = before["counters"].get("batches_failed", 0)
        pid = d["proc"].pid
        with children([(pool_load.generator, (d["socket"], c, table)) for c in cfg]) as g:
            sleep_until(g.start + 0.5)
            t0, cpu0 = time.monotonic(), cpu_seconds(pid)
            toggles, failed, raise_s, clear_s, stuck = 0, 0, [], [], 0
            try:
                while failed < target and time.monotonic() - t0 < cap:
                    ctl.fault(1, "raise")
                    t_r = time.monotonic()
                    hold = t_r + rng.uniform(*FAULT_RAISE_MS) / 1000.0
                    seen = failed
                    while True:
                        info = probe.info()
                        failed = info["counters"].get("batches_failed", 0) - failed0
                        now = time.monotonic()
                        if (failed > seen and now >= hold) or now - t_r > 1.0:
                            stuck += failed == seen
                            break
                        time.sleep(FAULT_POLL_S)
                    ctl.fault(1, None)
                    t_c = time.monotonic()
                    raise_s.append(t_c - t_r)
                    while info["devices"][1]["state"] != "healthy" and time.monotonic() - t_c < 5.0:
                        time.sleep(FAULT_POLL_S)
                        info = probe.info()
                    time.sleep(rng.uniform(*FAULT_CLEAR_MS) / 1000.0)
                    clear_s.append(time.monotonic() - t_c)
                    toggles += 1
            finally:
                ctl.fault(1, None)
            t1, cpu1 = time.monotonic(), cpu_seconds(pid)
            wait_state(probe, 1, lambda s: s == "healthy", 10.0)
            reports = g.finish(60.0)
        after = probe.info()
        m = merge_generators([r[0] for r in reports])
    out.update(toggles=toggles, seconds=t1 - t0, raise_phase_ms=common.latency_stats(raise_s),
               clear_phase_ms=common.latency_stats(clear_s), raise_without_failure=stuck, cpu_daemon=(cpu1 - cpu0) / (t1 - t0),
               cpu_generators=m["cpu"], generator=m["counts"], samples=m["samples"], lost_ids=m["lost_ids"],
               daemon=counter_delta(before, after, ("batches_failed", "redispatched", "failed",
                                                    "health_out", "health_probing", "health_healthy",
                                                    "stale_results", "frames", "expired", "dropped")),
               outstanding_after=after["outstanding"], states_after=[dv["state"] for dv in after["devices"]])
    return out


# --------------------------------------------------------------------------------------- (6)
def overload(table: list, capacity: float, dur: dict) -> dict:
    log(f"(6) {OVERLOAD_X:g}x overload, deadline {OVERLOAD_TIMEOUT_MS:.0f} ms ...")
    rss: list = []
    with pool(SPEEDS, "weighted", name="overload") as (d, _ctl, probe):
        r = open_loop(d, probe, table, OVERLOAD_X * capacity, dur["over_warmup_s"], dur["over_s"],
                      SEED + 600, OVERLOAD_TIMEOUT_MS, drain_s=10.0, rss=rss)
        r["rss_idle_after"] = rss_bytes(d["proc"].pid)
    r["rss"] = rss
    w0, w1 = dur["over_warmup_s"], dur["over_warmup_s"] + dur["over_s"]
    in_win = [b for t, b in rss if w0 <= t <= w1]
    r["rss_window"] = {"start": in_win[0], "max": max(in_win), "end": in_win[-1]} if in_win else {}
    r["timeout_ms"] = OVERLOAD_TIMEOUT_MS
    return r


# ------------------------------------------------------------------------------------ report
def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def targets(res: dict) -> list[dict]:
    w = res["policies"]["weighted"]
    rm, f, o = res["removal"], res["faults"], res["overload"]
    rw = o["rss_window"]
    worst = max(max(rm[k]["removal_s"]) for k in ("raise", "hang"))
    g = f["generator"]
    return [
        {"name": "weighted: saturated throughput >= 95% of the summed standalone capacity",
         "value": f"{w['saturated']['pct_of_sum']:.1%}", "met": w["saturated"]["pct_of_sum"] >= WEIGHTED_TARGET},
        {"name": f"fault to removal <= {REMOVAL_BOUND_S:g} s (worst of raise and hang)",
         "value": f"{worst:.3f} s", "met": worst <= REMOVAL_BOUND_S},
        {"name": f"{f['target']} injected faults: 0 requests lost, 0 answered twice",
         "value": f"{g.get('lost', 0)} lost, {g.get('twice', 0)} twice, {f['daemon']['batches_failed']} failed batches",
         "met": g.get("lost", 0) == 0 and g.get("twice", 0) == 0 and f["daemon"]["batches_failed"] >= f["target"]},
        {"name": f"{OVERLOAD_X:g}x overload: p99 of admitted requests within their deadline",
         "value": f"{_ms(o['latency_admitted']['p99_ms'])} ms (ok only {_ms(o['latency_ok']['p99_ms'])}) vs {o['timeout_ms']:.0f} ms",
         "met": (o["latency_admitted"]["p99_ms"] or 0) <= o["timeout_ms"]},
        {"name": f"{OVERLOAD_X:g}x overload: daemon RSS flat (max over the window within {RSS_FLAT:.0%} of its start)",
         "value": f"start {rw['start'] / 2**20:.1f} MiB, max {rw['max'] / 2**20:.1f} MiB, end {rw['end'] / 2**20:.1f} MiB",
         "met": rw["max"] <= rw["start"] * (1 + RSS_FLAT)},
    ]


def render(res: dict) -> str:
    L = []
    s, cap = res["standalone"], res["capacity_sum"]
    L.append(f"Device pools: synthetic model, batch of n = ({BASE_MS:g} + {PER_FRAME_MS:g} n) ms / speed, "
             f"max_batch {MAX_BATCH}, speeds {', '.join(f'{x:g}' for x in SPEEDS)}; seed {res['seed']}")
    L.append(f"\n(1) Standalone capacity: one daemon per device, {SAT_CLIENTS} Client processes x "
             f"{SAT_SLOTS} frames in flight (classify_many), {res['durations']['sat_s']:g} s window")
    L.append(f"    {'speed':>5}  {'frames/s':>9}  {'theory':>7}  {'x theory':>8}  {'mean batch':>10}  "
             f"{'CPU daemon':>10}  {'CPU clients':>11}")
    for r in s:
        L.append(f"    {r['speed']:>5g}  {r['fps']:>9.1f}  {r['theory_fps']:>7.1f}  {r['fps'] / r['theory_fps']:>8.3f}  "
                 f"{r['mean_batch']:>10.1f}  {r['cpu_daemon']:>10.2f}  {r['cpu_clients']:>11.2f}")
    L.append(f"    sum (the baseline): {cap:.1f} frames/s (theory {sum(theory_fps(x) for x in SPEEDS):.1f})")

    P = res["policies"]
    L.append(f"\n(2) Saturated pool: --device cpu:1 --device cpu:1, speeds {{0: {SPEEDS[0]:g}, 1: {SPEEDS[1]:g}}}, "
             f"same load as (1)")
    L.append(f"    {'policy':<11}  {'frames/s':>9}  {'% of sum':>8}  {'dev0 f/s':>8}  {'dev1 f/s':>8}  "
             f"{'dev1 share':>10}  {'mean batch':>10}  {'CPU daemon':>10}  {'CPU clients':>11}")
    for name, p in P.items():
        r = p["saturated"]
        L.append(f"    {name:<11}  {r['fps']:>9.1f}  {r['pct_of_sum']:>8.1%}  {r['device_fps'][0]:>8.1f}  "
                 f"{r['device_fps'][1]:>8.1f}  {r['share'][1]:>10.1%}  {r['mean_batch']:>10.1f}  "
                 f"{r['cpu_daemon']:>10.2f}  {r['cpu_clients']:>11.2f}")
    ideal = SPEEDS[1] / sum(SPEEDS)
    L.append(f"    (dev1 share at capacity: {s[1]['fps'] / cap:.1%} by the standalone figures, "
             f"{ideal:.1%} by the speeds)")

    L.append(f"\n(3) {LOAD_70:.0%} load: open-loop Poisson arrivals at {LOAD_70 * cap:.1f} req/s "
             f"({GEN_PROCS} raw-protocol generator processes, seed {res['seed'] + 300}+i), "
             f"{res['durations']['lat_s']:g} s window, request deadline {LATENCY_TIMEOUT_MS / 1000:g} s")
    L.append(f"    {'policy':<11}  {'offered/s':>9}  {'ok/s':>7}  {'p50 ms':>7}  {'p99 ms':>7}  {'max ms':>7}  "
             f"{'overloaded':>10}  {'dropped':>7}  {'lag p99':>7}  {'CPU daemon':>10}  {'CPU gen':>7}")
    for name, p in P.items():
        r = p["load70"]
        lat = r["latency_ok"]
        L.append(f"    {name:<11}  {r['offered_rate']:>9.1f}  {r['answered_ok_rate']:>7.1f}  {_ms(lat['p50_ms']):>7}  "
                 f"{_ms(lat['p99_ms']):>7}  {_ms(lat['max_ms']):>7}  {r['outcomes'].get('overloaded', 0):>10}  "
                 f"{r['counts'].get('dropped_no_slot', 0):>7}  {_ms(r['lag']['p99_ms']):>7}  "
                 f"{r['cpu_daemon']:>10.2f}  {r['cpu_generators']:>7.2f}")
    L.append("    (latency: send -> reply of requests sent in the window and answered ok; dropped: found no "
             "free ring slot in the generator; lag: send behind its Poisson schedule)")

    rm = res["removal"]
    L.append(f"\n(4) Fault to removal on device 1 ({' '.join(rm['args'])}), info polled every "
             f"{POLL_S * 1000:g} ms, under open-loop load of {rm['load_rate']:.0f} req/s; {rm['reps']} times each")
    L.append(f"    {'fault':<6}  {'min s':>6}  {'median s':>8}  {'max s':>6}  {'re-admitted after clear: median s':>34}")
    for fault in ("raise", "hang"):
        t, ra = rm[fault]["removal_s"], rm[fault]["readmit_s"]
        L.append(f"    {fault:<6}  {min(t):>6.3f}  {np.median(t):>8.3f}  {max(t):>6.3f}  {np.median(ra):>34.3f}")
    gen = rm["generator"]
    L.append(f"    background load: {gen.get('sent', 0)} sent, {gen.get('lost', 0)} lost, {gen.get('twice', 0)} twice, "
             f"{gen.get('reply_wrong', 0)} wrong, errors: "
             f"{ {k[6:]: v for k, v in gen.items() if k.startswith('reply_') and k not in ('reply_ok', 'reply_wrong')} }; "
             f"CPU daemon {rm['cpu_daemon']:.2f}, generator {rm['cpu_generators']:.2f}")

    f = res["faults"]
    g, dc = f["generator"], f["daemon"]
    L.append(f"\n(5) Injected faults on device 1 ({' '.join(f['args'])}), {f['depth']} requests in flight "
             f"(closed loop, raw protocol)")
    L.append(f"    {f['toggles']} raise phases in {f['seconds']:.1f} s (raise held p50 {f['raise_phase_ms']['p50_ms']:.0f} ms, "
             f"max {f['raise_phase_ms']['max_ms']:.0f}; then clear until re-admitted + U{f['clear_ms']} ms: "
             f"p50 {f['clear_phase_ms']['p50_ms']:.0f} ms; {f['raise_without_failure']} raise phases saw no failed batch in 1 s)")
    L.append(f"    daemon: batches_failed {dc['batches_failed']}, "
             f"redispatched {dc['redispatched']}, failed {dc['failed']}, health_out {dc['health_out']}, "
             f"health_healthy {dc['health_healthy']}, stale_results {dc['stale_results']}")
    errs = {k[6:]: v for k, v in g.items() if k.startswith("reply_") and k not in ("reply_ok", "reply_wrong")}
    L.append(f"    requests sent {g.get('sent', 0)}, answered {g.get('answered', 0)} "
             f"(ok {g.get('reply_ok', 0)}, wrong class {g.get('reply_wrong', 0)}, errors {errs or 0}), "
             f"lost {g.get('lost', 0)}, answered twice {g.get('twice', 0)}, unknown id {g.get('unknown', 0)}")
    L.append(f"    after: outstanding {f['outstanding_after']}, states {f['states_after']}; "
             f"CPU daemon {f['cpu_daemon']:.2f}, generators {f['cpu_generators']:.2f}")

    o = res["overload"]
    rw = o["rss_window"]
    L.append(f"\n(6) {OVERLOAD_X:g}x overload: open-loop Poisson at {o['rate']:.0f} req/s, deadline "
             f"{o['timeout_ms']:.0f} ms, {res['durations']['over_s']:g} s window")
    L.append(f"    offered {o['offered_rate']:.1f}/s: admitted {o['admitted_rate']:.1f}/s "
             f"(ok {o['answered_ok_rate']:.1f}/s = {o['answered_ok_rate'] / cap:.1%} of the sum), "
             f"Overloaded {o['overloaded_rate']:.1f}/s, DeadlineExceeded {o['outcomes'].get('deadline_exceeded', 0)}, "
             f"dropped by the generator {o['counts'].get('dropped_no_slot', 0)}")
    la, lo = o["latency_admitted"], o["latency_ok"]
    L.append(f"    admitted latency: p50 {_ms(la['p50_ms'])} ms, p99 {_ms(la['p99_ms'])} ms, max {_ms(la['max_ms'])} ms "
             f"(ok only: p50 {_ms(lo['p50_ms'])}, p99 {_ms(lo['p99_ms'])}) vs deadline {o['timeout_ms']:.0f} ms; "
             f"lag p99 {_ms(o['lag']['p99_ms'])} ms")
    if rw:
        L.append(f"    daemon RSS over the window: start {rw['start'] / 2**20:.1f} MiB, max {rw['max'] / 2**20:.1f} MiB, "
                 f"end {rw['end'] / 2**20:.1f} MiB; idle after {o['rss_idle_after'] / 2**20:.1f} MiB")
    od = o["daemon"]
    L.append(f"    daemon over the window: {od['frames'] / o['window_s']:.1f} frames/s computed in batches of "
             f"{od['frames'] / max(od['batches'], 1):.2f} on average, {od['expired']} expired in the queue")
    L.append(f"    CPU daemon {o['cpu_daemon']:.2f}, generators {o['cpu_generators']:.2f}; lost "
             f"{o['counts'].get('lost', 0)}, twice {o['counts'].get('twice', 0)}")

    L.append("\nTargets:")
    for t in res["targets"]:
        L.append(f"  [{'MET' if t['met'] else 'MISS'}] {t['name']}: {t['value']}")
    m = res["machine"]
    L.append(f"Command: {' '.join(res['command'])}")
    L.append(f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}; load average at start "
             f"{m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}; "
             f"{'quick' if res['quick'] else 'full'} run, {res['wall_s']:.0f} s")
    codes = [c["exit_code"] for c in res["cleanup"]]
    shm = [x for c in res["cleanup"] for x in (c["shm_leftovers"] or [])] + res["shm_new"]
    L.append(f"Cleanup: {len(codes)} daemons exited with {', '.join(map(str, codes))} after SIGTERM; "
             f"/dev/shm leftovers: {', '.join(shm) if shm else 'none'}")
    problems = [(c["name"], c["log_problems"]) for c in res["cleanup"] if c["log_problems"]]
    L.append("Daemon logs: " + ("no tracebacks or unexpected errors" if not problems else
                                "; ".join(f"{k}: {x[:3]}" for k, x in problems)))
    return "\n".join(L)


# -------------------------------------------------------------------------------------- main
def _machine() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_start": os.getloadavg()}


def level_table() -> list[int]:
    """level_of(v) for v = 0..255, from the model's own module (imports torch, in the parent only)."""
    from inferd.daemon.zoo.synthetic import level_of

    return [level_of(v) for v in range(256)]


def strip_private(obj):
    """results without the per-request arrays (keys starting with _) for devices.json."""
    if isinstance(obj, dict):
        return {k: strip_private(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [strip_private(v) for v in obj]
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (about 1.5 minutes): a smoke test")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "out"), help="where devices.json goes")
    p.add_argument("--img-dir", default=None, help="where the PNGs go (default docs/img; with --quick: --out)")
    p.add_argument("--replot", metavar="DEVICES_JSON", help="measure nothing: reprint and redraw from a devices.json")
    args = p.parse_args(argv)
    common.sigterm_as_exit()
    import pool_plots

    if args.replot:
        return common.replot(args.replot, args.img_dir, args.out, render, pool_plots.draw_all)
    dur = DURATIONS["quick" if args.quick else "full"]
    img_dir = args.img_dir or (args.out if args.quick else os.path.join(REPO, "docs", "img"))
    global LOG_DIR
    LOG_DIR = os.path.join(args.out, "devices-logs")
    shm_before = set(os.listdir(common.SHM_DIR)) if os.path.isdir(common.SHM_DIR) else set()
    t0 = time.monotonic()
    res = {"machine": _machine(), "durations": dur, "quick": args.quick, "seed": SEED, "command": sys.argv,
           "model": {"base_ms": BASE_MS, "per_frame_ms": PER_FRAME_MS, "max_batch": MAX_BATCH, "speeds": SPEEDS}}
    table = level_table()
    log(f"seed {SEED}; synthetic model: ({BASE_MS:g} + {PER_FRAME_MS:g} n) ms / speed per batch of n")
    res["standalone"] = standalone(table, dur)
    cap = res["capacity_sum"] = sum(r["fps"] for r in res["standalone"])
    res["policies"] = policies(table, cap, dur)
    res["removal"] = removal(table, cap, dur)
    res["faults"] = faults(table, dur)
    res["overload"] = overload(table, cap, dur)
    res["targets"] = targets(res)
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["wall_s"] = time.monotonic() - t0
    res["cleanup"] = _CLEANUP
    res["shm_new"] = sorted(set(os.listdir(common.SHM_DIR)) - shm_before) if os.path.isdir(common.SHM_DIR) else []
    res["plots"] = pool_plots.draw_all(res, img_dir)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "devices.json")
    with open(path, "w") as fh:
        json.dump(strip_private(res), fh, indent=1)
    print()
    print(render(res))
    print(f"\nwrote {path}, {', '.join(res['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
