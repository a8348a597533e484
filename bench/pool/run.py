"""Device-pool benchmark: ``python -m bench.pool [--quick] [--out bench/out] [--img-dir DIR]``.

On daemons serving the ``synthetic`` model (inferd.daemon.models.zoo.synthetic: a batch of n frames costs
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

import os
import time

import numpy as np

from ..lib import daemons, measure, procs, report as lib_report
from ..lib.measure import cpu_seconds, sleep_until
from ..lib.procs import children
from . import load as pool_load, plots as pool_plots
from .daemon import (
    CDF_QUANTILES, CLEANUP, COST, FAULT_ARGS, FAULT_CLEAR_MS, FAULT_DEPTH, FAULT_POLL_S,
    FAULT_RAISE_MS, GEN_PROCS, LATENCY_TIMEOUT_MS, LOAD_70, LOG_DIR, MAX_BATCH,
    OVERLOAD_TIMEOUT_MS, OVERLOAD_X, POLL_S, REMOVAL_ARGS, REMOVAL_LOAD,
    RSS_EVERY_S, SAT_CLIENTS, SAT_SLOTS, SEED, SPEEDS, counter_delta,
    gen_cfg, merge_generators, pool, rss_bytes, theory_fps)
from .report import render, targets

DURATIONS = {
    "full": {"sat_warmup_s": 2.0, "sat_s": 8.0, "lat_warmup_s": 2.0, "lat_s": 15.0, "removal_reps": 10,
             "faults": 1000, "faults_cap_s": 150.0, "over_warmup_s": 1.0, "over_s": 18.0},
    "quick": {"sat_warmup_s": 1.0, "sat_s": 3.0, "lat_warmup_s": 1.0, "lat_s": 4.0, "removal_reps": 3,
              "faults": 150, "faults_cap_s": 25.0, "over_warmup_s": 1.0, "over_s": 5.0},
}


def log(msg: str) -> None:
    print(msg, flush=True)


def saturate(d: dict, probe, table: list, warmup_s: float, seconds: float, seed: int) -> dict:
    """SAT_CLIENTS closed-loop Client processes with SAT_SLOTS in flight each; frames/s and the
    per-device split from the daemon's counters over [start + warmup, + seconds]."""
    pid = d["proc"].pid
    specs = [(pool_load.saturator, (d["socket"], SAT_SLOTS, table, seed + i)) for i in range(SAT_CLIENTS)]
    with children(specs, name="bench-pool") as g:
        sleep_until(g.start + warmup_s)
        before, cpu0, t0 = probe.info(), cpu_seconds(pid), time.monotonic()
        sleep_until(g.start + warmup_s + seconds)
        after, cpu1, t1 = probe.info(), cpu_seconds(pid), time.monotonic()
        done = g.finish(procs.RESULT_GRACE_S)
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
            "batch_ms": [dv["batch_ms"] for dv in after["devices"]],
            # full batches handed to an idle device late, and the staging lead then (NOTE [ batch
            # planning ] rule 0); None from a daemon that does not report them
            "late_handovers": [(a.get("late_handovers") or 0) - (b.get("late_handovers") or 0)
                               for a, b in zip(after["devices"], before["devices"])],
            "stage_lead_ms": [dv.get("stage_lead_ms") for dv in after["devices"]]}


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
    with children(specs, name="bench-pool") as g:
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
        reports = g.finish(warmup_s + seconds + drain_s + procs.RESULT_GRACE_S)
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
            "latency_ok": measure.latency_stats(w["latency"][ok]),
            "latency_admitted": measure.latency_stats(w["latency"][admitted]),
            "lag": measure.latency_stats(w["lag"]), "samples": m["samples"], "lost_ids": m["lost_ids"],
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
        with children([(pool_load.generator, (d["socket"], cfg, table))], name="bench-pool") as g:
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
        specs = [(pool_load.generator, (d["socket"], c, table)) for c in cfg]
        with children(specs, name="bench-pool") as g:
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
    out.update(toggles=toggles, seconds=t1 - t0, raise_phase_ms=measure.latency_stats(raise_s),
               clear_phase_ms=measure.latency_stats(clear_s), raise_without_failure=stuck, cpu_daemon=(cpu1 - cpu0) / (t1 - t0),
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


def saturated_only(table: list, dur: dict) -> int:
    """``--only saturated``: the standalone capacities and the saturated weighted pool, printed;
    nothing written (the full run's report and figures stay as they are)."""
    rows = standalone(table, dur)
    cap = sum(r["fps"] for r in rows)
    with pool(SPEEDS, "weighted", name="pool-weighted") as (d, _ctl, probe):
        sat = saturate(d, probe, table, dur["sat_warmup_s"], dur["sat_s"], SEED + 200)
    for r in rows:
        log(f"    standalone speed {r['speed']:g}: {r['fps']:.1f} frames/s (theory {r['theory_fps']:.1f}), "
            f"mean batch {r['mean_batch']:.1f}, daemon CPU {r['cpu_daemon']:.2f}")
    log(f"    weighted pool: {sat['fps']:.1f} frames/s = {sat['fps'] / cap:.1%} of the summed capacity "
        f"{cap:.1f}; per device {', '.join(f'{x:.1f}' for x in sat['device_fps'])} frames/s "
        f"(dev1 share {sat['share'][1]:.1%}, standalone {rows[1]['fps'] / cap:.1%}), mean batch "
        f"{sat['mean_batch']:.1f}, daemon CPU {sat['cpu_daemon']:.2f}; late handovers {sat['late_handovers']} "
        f"of about {[round(f / MAX_BATCH) for f in sat['device_frames']]} batches, staging lead "
        f"{sat['stage_lead_ms']} ms; batch ms {sat['batch_ms']}")
    return 0


# ------------------------------------------------------------------------------------ report
def level_table() -> list[int]:
    """level_of(v) for v = 0..255, from the model's own module (imports torch, in the parent only)."""
    from inferd.daemon.models.zoo.synthetic import level_of

    return [level_of(v) for v in range(256)]


def strip_private(obj):
    """results without the per-request arrays (keys starting with _) for devices.json."""
    if isinstance(obj, dict):
        return {k: strip_private(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [strip_private(v) for v in obj]
    return obj


def _cost(text: str) -> tuple[float, float]:
    base, per_frame = (float(x) for x in text.split(","))
    return base, per_frame


def main(argv=None) -> int:
    p = lib_report.parser(__doc__, "devices.json", "about 1.5 minutes")
    p.add_argument("--only", choices=("saturated",),
                   help="saturated: only (1) and (2)'s saturated weighted pool, its %% of the summed "
                        "capacity printed (a figure to compare before and after a dispatcher change)")
    p.add_argument("--cost", metavar="BASE_MS,PER_FRAME_MS", type=_cost,
                   help=f"the synthetic model's cost per batch of n, (BASE_MS + PER_FRAME_MS n) ms / speed "
                        f"(default {COST['base_ms']:g},{COST['per_frame_ms']:g}; the tests' model is 2,0.5)")
    args = p.parse_args(argv)
    procs.sigterm_as_exit()
    if args.replot:
        return lib_report.replot(args.replot, args.img_dir, args.out, render, pool_plots.draw_all)
    if args.cost:
        COST.update(base_ms=args.cost[0], per_frame_ms=args.cost[1])
    dur = DURATIONS["quick" if args.quick else "full"]
    img_dir = lib_report.img_dir(args)
    LOG_DIR[0] = os.path.join(args.out, "devices-logs")
    shm_before = set(os.listdir(daemons.SHM_DIR)) if os.path.isdir(daemons.SHM_DIR) else set()
    t0 = time.monotonic()
    res = {"machine": lib_report.machine(), "durations": dur, "quick": args.quick, "seed": SEED, "command": lib_report.command(),
           "model": {**COST, "max_batch": MAX_BATCH, "speeds": SPEEDS}}
    table = level_table()
    log(f"seed {SEED}; synthetic model: ({COST['base_ms']:g} + {COST['per_frame_ms']:g} n) ms / speed per batch of n")
    if args.only == "saturated":
        return saturated_only(table, dur)
    res["standalone"] = standalone(table, dur)
    cap = res["capacity_sum"] = sum(r["fps"] for r in res["standalone"])
    res["policies"] = policies(table, cap, dur)
    res["removal"] = removal(table, cap, dur)
    res["faults"] = faults(table, dur)
    res["overload"] = overload(table, cap, dur)
    res["targets"] = targets(res)
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["wall_s"] = time.monotonic() - t0
    res["cleanup"] = CLEANUP
    res["shm_new"] = sorted(set(os.listdir(daemons.SHM_DIR)) - shm_before) if os.path.isdir(daemons.SHM_DIR) else []
    res["plots"] = pool_plots.draw_all(res, img_dir)
    lib_report.write_results(args.out, "devices.json", strip_private(res), render(res), indent=1)
    return 0

