"""The printed report of bench/pool/run.py and its targets."""
from __future__ import annotations

import numpy as np

from .daemon import (
    GEN_PROCS, LATENCY_TIMEOUT_MS, LOAD_70, MAX_BATCH, OVERLOAD_X,
    POLL_S, REMOVAL_BOUND_S, RSS_FLAT, SAT_CLIENTS, SAT_SLOTS, SPEEDS, WEIGHTED_TARGET,
    theory_fps)


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
    L.append(f"Device pools: synthetic model, batch of n = ({res['model']['base_ms']:g} + {res['model']['per_frame_ms']:g} n) ms / speed, "
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
