"""The printed tables and the target summary of a benchmark run (plain text, from results.json's dict)."""
from __future__ import annotations

from ..lib.report import table

LOAD_TARGET = 0.95        # daemon img/s with N clients / in-process at batch N, N = 1, 4, 16
TAIL_TARGET = 1.3         # p99 / p50 with 16 clients
TRANSPORT_TARGET = 3.0    # no-op round trip through the daemon / bare socket ping-pong
EMBEDDINGS_TARGET = 1.10  # daemon CPU per frame, 100k embeddings on / off, at a steady 200 frames/s


def targets(results: dict) -> list[dict]:
    """The targets, each with the measured value, the bound and whether it is met."""
    rows = results["load"]["rows"]
    out = []
    for n in (1, 4, 16):
        r = next((r for r in rows if r["clients"] == n and r["depth"] == 1), None)
        if r is None:                   # a run of other --cases
            continue
        out.append({"name": f"ResNet-18 @ 64x64: daemon img/s with {n} client(s) >= {LOAD_TARGET:.0%} of "
                            f"the in-process model at batch {r['ceiling_batch']}",
                    "value": r["ratio_to_ceiling"], "bound": LOAD_TARGET, "unit": "x ceiling",
                    "met": r["ratio_to_ceiling"] >= LOAD_TARGET})
    r16 = next((r for r in rows if r["clients"] == 16 and r["depth"] == 1), None)
    if r16 is not None:
        tail = r16["latency"]["p99_ms"] / r16["latency"]["p50_ms"]
        out.append({"name": "16 clients: p99 <= 1.3x p50", "value": tail, "bound": TAIL_TARGET,
                    "unit": "x p50", "met": tail <= TAIL_TARGET})
    cpu = results.get("cpu_per_frame")
    if cpu and cpu.get("ratio_on_off") is not None:
        out.append({"name": f"Daemon CPU per frame at {cpu['rate']:.0f} frames/s, {cpu['rows_stored']} "
                            f"embeddings stored against embeddings off <= 1.10x",
                    "value": cpu["ratio_on_off"], "bound": EMBEDDINGS_TARGET, "unit": "x off",
                    "met": cpu["ratio_on_off"] <= EMBEDDINGS_TARGET})
    t, one = results["transport"], results["one_client"]
    return out + [
        {"name": "No-op round trip through the daemon <= 3x the bare socket ping-pong (p50)",
         "value": t["ratio_p50"], "bound": TRANSPORT_TARGET, "unit": "x bare",
         "met": t["ratio_p50"] <= TRANSPORT_TARGET},
        {"name": "One client: p50 latency <= model time at batch 1 + max_delay + 0.5 ms",
         "value": one["p50_ms"], "bound": one["bound_ms"], "unit": "ms",
         "met": one["p50_ms"] <= one["bound_ms"]},
    ]


def _ceiling_table(c: dict) -> list[str]:
    """Part (a): img/s at each OpenMP setting and ms per batch of the faster, for each batch size."""
    settings = c.get("settings") or {"as measured": {"omp_env": c.get("omp_env", {})}}
    names = list(settings)
    omp = "; ".join(f"{n}: {' '.join(f'{k}={v}' for k, v in s['omp_env'].items()) or 'torch defaults'}"
                    f"{'' if s.get('threads', c['threads']) == c['threads'] else ', %d thread(s)' % s['threads']}"
                    for n, s in settings.items())
    by = lambda r, n: r.get("img_s_by_setting", {}).get(n, r["img_s"])
    return [f"(a) Ceiling: {c['model']} @ {c['input_size']}x{c['input_size']} in-process, "
            f"{c['threads']} threads, torch {c['torch']}; OpenMP settings {omp}; the ceiling is the "
            f"faster at each batch size",
            *table([("batch", ">5"), *((f"{n} img/s", f">{max(8, len(n) + 6)}.1f") for n in names),
                    ("ceiling", ">8.1f"), ("setting", "<9"), ("ms/batch p50", ">12.2f"), ("x ceiling", ">9.2f")],
                   [(r["batch"], *(by(r, n) for n in names), r["img_s"], r.get("setting", names[0]),
                     r["batch_ms_p50"], r["img_s"] / c["ceiling_img_s"]) for r in c["rows"]]),
            f"    ceiling {c['ceiling_img_s']:.1f} img/s (batch {c['ceiling_batch']}"
            f"{', ' + c['ceiling_setting'] if c.get('ceiling_setting') else ''}); "
            f"model time at batch 1: {c['model_ms_b1']:.2f} ms"]


def _load_table(load: dict, ceiling: float) -> list[str]:
    """Part (b): one line per case against the in-process model at the batch its frames in flight
    allow, with the daemon-side figures that explain it."""
    env = " ".join(f"{k}={v}" for k, v in load.get("daemon_env", {}).items())
    rows = []
    for r in load["rows"]:
        lat = r["latency"]
        busy = "/".join(f"{v:.0%}" for v in r.get("device_busy", {}).values()) or f"{r['model_busy']:.0%}"
        ceil = f"{r['ceiling_img_s']:.1f}@{r['ceiling_batch']}" if r.get("ceiling_batch") else "-"
        rows.append((r["clients"], r["clients"] * r["depth"], ceil, r["img_s"], r["ratio_to_ceiling"],
                     lat["p50_ms"], lat["p99_ms"], r.get("mean_batch", 0), r.get("model_ms_per_batch", 0),
                     busy, r["daemon"]["cpu_cores"], r["clients_cpu_cores"]))
    return [f"(b) Daemon under load: {env + ' ' if env else ''}{' '.join(load['daemon_args'])}",
            *table([("clients", ">7"), ("in flight", ">9"), ("in-proc@b", ">13"), ("img/s", ">8.1f"),
                    ("ratio", ">5.2f"), ("p50 ms", ">8.2f"), ("p99 ms", ">8.2f"), ("mean batch", ">10.1f"),
                    ("model ms/b", ">10.2f"), ("busy", ">9"), ("CPU daemon", ">10.2f"),
                    ("CPU clients", ">11.2f")], rows),
            f"    (in-proc@b: img/s of the model in-process at batch b = min(frames in flight, "
            f"max_batch), the row's ceiling; busy: each device's busy fraction (admin stats); "
            f"latency is per call: one frame, or 4 frames for the 4-in-flight row; best batch "
            f"overall {ceiling:.1f} img/s; CPU: cores used over the window)"]


def _cpu_table(cpu: dict) -> list[str]:
    """Part (e): the daemon's CPU per frame at a steady paced load, per embeddings case."""
    off = next(r for r in cpu["cases"] if r["case"] == "off")["cpu_us_per_frame"]
    return [f"(e) Daemon CPU per frame: {cpu['model']}, {cpu['senders']} paced senders, "
            f"{cpu['rate']:.0f} frames/s, store of {cpu['rows_stored']} rows (dim {cpu['dim']}); "
            f"near: 1 call in {cpu['near_every']} of one sender",
            *table([("case", "<11"), ("frames/s", ">8.1f"), ("cores", ">6.3f"), ("us/frame", ">8.0f"),
                    ("x off", ">6.2f"), ("p50 ms", ">7.2f"), ("p99 ms", ">7.2f")],
                   [(r["case"], r["frames_s"], r["cpu_cores"], r["cpu_us_per_frame"],
                     r["cpu_us_per_frame"] / off, r["latency"]["p50_ms"], r["latency"]["p99_ms"])
                    for r in cpu["cases"]])]


def _transport_table(t: dict) -> list[str]:
    """Part (c): bare ping-pong, daemon ping and daemon no-op classify round trips."""
    b, d = t["bare"], t["daemon"]
    return [f"(c) Transport alone: {t['round_trips']} round trips; request {t['request_bytes']} B, "
            f"reply {t['reply_bytes']} B on the wire",
            *table([("", "<26"), ("p50 us", ">8.1f"), ("mean us", ">8.1f"), ("p99 us", ">8.1f")],
                   [(name, s["p50_ms"] * 1e3, s["mean_ms"] * 1e3, s["p99_ms"] * 1e3)
                    for name, s in (("bare AF_UNIX ping-pong", b), ("daemon, ping (no model)", d["ping"]),
                                    ("daemon, classify no-op", d))]),
            f"    ratio classify/bare: p50 {t['ratio_p50']:.2f}x, mean {t['ratio_mean']:.2f}x "
            f"(ping/bare p50 {d['ping']['p50_ms'] / b['p50_ms']:.2f}x; the daemon's batching-thread "
            f"work per no-op frame: {d['daemon_model_us_per_frame']:.0f} us)"] + _handoff_lines(t)


def _handoff_lines(t: dict) -> list[str]:
    """The thread hops alone (bench/load/handoff.py) and the floor ratio they set, when measured."""
    if "handoff" not in t:
        return []
    us = lambda s: s["p50_ms"] * 1e3
    cond, two = t["handoff"]["cond"], t["handoff"]["two_threads"]
    return [f"    thread hops alone, p50 us: loop->thread {us(cond['loop_to_thread']):.1f}, thread->loop "
            f"{us(cond['thread_to_loop']):.1f} (one batching thread); loop->collector "
            f"{us(two['loop_to_thread']):.1f}, ->executor {us(two['thread_to_thread']):.1f}, ->loop "
            f"{us(two['thread_to_loop']):.1f} (collector + executor)",
            f"    floor (bare + hops, nothing else): {t['floor_ratio_p50']['cond']:.2f}x with one thread, "
            f"{t['floor_ratio_p50']['two_threads']:.2f}x with two"]


def _recheck(first: dict, again: dict) -> list[str]:
    """The end-of-run ceiling against the first one, per batch size, with the setting that won."""
    cells = []
    for r in again["rows"]:
        before = next(x for x in first["rows"] if x["batch"] == r["batch"])
        won = f", {r['setting']}" if r.get("setting") else ""
        cells.append(f"batch {r['batch']}: {r['img_s']:.1f} img/s{won} ({r['img_s'] / before['img_s'] - 1:+.0%})")
    return ["(a') Ceiling re-measured at the end (drift of the machine during the run): " + "; ".join(cells)]


def _one_client(o: dict) -> list[str]:
    """Part (d): one client's p50 against its bound."""
    return ["(d) One client: p50 %.2f ms vs bound %.2f ms (= model %.2f + max_delay %.1f + %.1f); "
            "margin %+.2f ms" % (o["p50_ms"], o["bound_ms"], o["model_ms_b1"], o["max_delay_ms"],
                                 o["slack_ms"], o["margin_ms"])]


def _summary(results: dict) -> list[str]:
    """The three targets, met or missed, and what the machine was doing."""
    out = ["Targets:"]
    for t in results["targets"]:
        out.append(f"  [{'MET ' if t['met'] else 'MISS'}] {t['name']}: "
                   f"{t['value']:.2f} {t['unit']} (bound {t['bound']:.2f})")
    m = results["machine"]
    out.append(f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, torch {m.get('torch')}; "
               f"load average at start {m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}; "
               f"{'QUICK run' if results.get('quick') else 'full run'}, {results['wall_s']:.0f} s")
    daemons = (results["load"], results["transport"]["daemon"])
    threads = results["load"].get("threads")
    if threads:
        out.append(f"Thread pools in the load daemon: {threads['usable_cores']} usable cores, OMP_WAIT_POLICY "
                   f"{threads['omp_wait_policy'] or '(unset)'}, team size per batch "
                   f"{threads.get('per_batch', 'fixed')}, BLAS {threads['blas_threads']}, inter-op "
                   f"{threads['interop']}, devices "
                   f"{', '.join(str(d['intra_op']) for d in threads['devices']) or '(not reported)'}")
    leftovers = [n for d in daemons for n in d["shm_leftovers"]]
    out.append(f"Cleanup: daemons exited with {', '.join(str(d['daemon_exit_code']) for d in daemons)} "
               f"after SIGTERM; /dev/shm leftovers: {', '.join(leftovers) or 'none'}")
    return out


def render(results: dict) -> str:
    """The whole printed report."""
    parts = [_ceiling_table(results["ceiling"]),
             _load_table(results["load"], results["ceiling"]["ceiling_img_s"]),
             _transport_table(results["transport"]),
             *([_cpu_table(results["cpu_per_frame"])] if results.get("cpu_per_frame") else []),
             _recheck(results["ceiling"], results["ceiling_recheck"]), _one_client(results["one_client"]),
             _summary(results)]
    return "\n\n".join("\n".join(p) for p in parts)
