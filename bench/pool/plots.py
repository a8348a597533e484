"""The four figures of bench/pool/run.py (docs/benchmarks.md, "Device pools"), drawn with matplotlib's
Agg backend from the results dict alone, so ``--replot`` can redraw them from devices.json."""
from __future__ import annotations

import os

from ..lib.plots import pyplot, save_figure


def throughput(res: dict, path: str) -> str:
    """Bars: the summed standalone capacity (stacked by device), weighted, round_robin (stacked by
    the device that served the frames), with % of the sum on top."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    cap = res["capacity_sum"]
    s = res["standalone"]
    pol = res["policies"]
    names = ["standalone sum", "weighted", "round_robin"]
    dev0 = [s[0]["fps"], pol["weighted"]["saturated"]["device_fps"][0], pol["round_robin"]["saturated"]["device_fps"][0]]
    dev1 = [s[1]["fps"], pol["weighted"]["saturated"]["device_fps"][1], pol["round_robin"]["saturated"]["device_fps"][1]]
    totals = [cap, pol["weighted"]["saturated"]["fps"], pol["round_robin"]["saturated"]["fps"]]
    x = range(len(names))
    ax.bar(x, dev0, color="#8da0cb", label=f"device 0 (speed {s[0]['speed']:g})")
    ax.bar(x, dev1, bottom=dev0, color="#66c2a5", label=f"device 1 (speed {s[1]['speed']:g})")
    for i, t in enumerate(totals):
        ax.text(i, t + cap * 0.01, f"{t:.0f}/s\n{t / cap:.1%}", ha="center", va="bottom", fontsize=9)
    ax.axhline(cap, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("frames/s (saturated)")
    ax.set_ylim(0, cap * 1.25)
    ax.set_title("Two-device pool (speeds 1 and 3): saturated throughput vs the sum of standalone capacities",
                 fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    return save_figure(fig, plt, path)


def latency(res: dict, path: str) -> str:
    """Latency CDF (log x) of requests answered ok at 70 % load, one curve per policy, p50/p99 marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for (name, p), color in zip(res["policies"].items(), ("#1b9e77", "#d95f02")):
        r = p["load70"]
        cdf = r["cdf_ok"]
        if not cdf["ms"]:
            continue
        ax.plot(cdf["ms"], [q / 100 for q in cdf["q"]], "-", color=color,
                label=f"{name}: p50 {r['latency_ok']['p50_ms']:.0f} ms, p99 {r['latency_ok']['p99_ms']:.0f} ms"
                      f" ({r['answered_ok_rate']:.0f} ok/s of {r['offered_rate']:.0f} offered)")
        for q, key in ((0.5, "p50_ms"), (0.99, "p99_ms")):
            ax.plot([r["latency_ok"][key]], [q], "o", color=color)
    ax.set_xscale("log")
    ax.set_xlabel("latency send -> reply (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    load = res["policies"]["weighted"]["load70"]["rate"]
    ax.set_title(f"Open-loop Poisson arrivals at 70% of the summed capacity ({load:.0f} req/s)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, plt, path)


def removal(res: dict, path: str, bound: float = 2.0) -> str:
    """Fault-to-removal times, one point per repetition, box per fault kind, the 2 s bound."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    rm = res["removal"]
    kinds = ("raise", "hang")
    data = [[t * 1000 for t in rm[k]["removal_s"]] for k in kinds]
    ax.boxplot(data, positions=[1, 2], widths=0.4, showfliers=False)
    for i, d in enumerate(data, start=1):
        ax.plot([i + 0.25] * len(d), d, "o", alpha=0.6, markersize=4)
    ax.axhline(bound * 1000, color="red", linestyle="--", label=f"bound {bound:g} s")
    ax.set_xticks([1, 2], [f"raise (max_failures {2})", "hang (watchdog)"])
    ax.set_ylabel("control-file write -> info shows 'out' (ms)")
    ax.set_yscale("log")
    ax.set_ylim(1, bound * 1000 * 2)
    ax.set_title(f"Time from fault to removal, {rm['reps']} times each ({' '.join(rm['args'])})", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, plt, path)


def overload(res: dict, path: str) -> str:
    """Left: daemon RSS over time. Middle: per-second p99 of admitted / ok latency vs the deadline.
    Right: per-second rates of each outcome against the summed capacity."""
    plt = pyplot()
    o = res["overload"]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 4.2), dpi=110)
    t = [x[0] for x in o["rss"]]
    a1.plot(t, [x[1] / 2**20 for x in o["rss"]], ".-")
    w0 = res["durations"]["over_warmup_s"]
    w1 = w0 + res["durations"]["over_s"]
    a1.axvspan(w0, w1, color="grey", alpha=0.15, label="measured window")
    a1.axvline(0, color="black", linewidth=0.8)
    a1.set_xlabel("s since the load started")
    a1.set_ylabel("daemon RSS (MiB)")
    lo = min(x[1] for x in o["rss"]) / 2**20
    hi = max(x[1] for x in o["rss"]) / 2**20
    a1.set_ylim(lo - max(5, (hi - lo)), hi + max(5, (hi - lo)))
    a1.set_title(f"daemon RSS under {o['rate']:.0f} req/s offered", fontsize=9)
    a1.legend(fontsize=8)
    ps = o["per_second"]
    x = [p["t"] for p in ps]
    a2.plot(x, [p["p99_admitted_ms"] for p in ps], "o-", label="p99 admitted (ok + deadline_exceeded)")
    a2.plot(x, [p["p99_ok_ms"] for p in ps], "s--", label="p99 ok")
    a2.plot(x, [p["p50_ok_ms"] for p in ps], ".:", label="p50 ok")
    a2.axhline(o["timeout_ms"], color="red", linestyle="--", label=f"deadline {o['timeout_ms']:.0f} ms")
    a2.set_xlabel("second of the window (by send time)")
    a2.set_ylabel("latency send -> reply (ms)")
    a2.set_ylim(0, o["timeout_ms"] * 1.4)
    a2.set_title("latency of admitted requests, per second", fontsize=9)
    a2.legend(fontsize=7, loc="lower right")
    a2.grid(True, alpha=0.3)
    cap = res["capacity_sum"]
    for key, style, label in (("overloaded", "^-", "Overloaded (refused)"), ("ok", "o-", "ok (goodput)"),
                              ("deadline_exceeded", "s--", "DeadlineExceeded")):
        a3.plot(x, [p.get(key, 0) for p in ps], style, label=label)
    a3.axhline(cap, color="grey", linestyle=":", label=f"summed capacity {cap:.0f}/s")
    a3.set_xlabel("second of the window (by send time)")
    a3.set_ylabel("requests/s")
    a3.set_ylim(0, max(max(p["overloaded"] for p in ps), cap) * 1.2)
    a3.set_title("outcome of each request, per second", fontsize=9)
    a3.legend(fontsize=7, loc="center right")
    a3.grid(True, alpha=0.3)
    return save_figure(fig, plt, path)


def draw_all(res: dict, img_dir: str) -> list[str]:
    return [throughput(res, os.path.join(img_dir, "pool_throughput.png")),
            latency(res, os.path.join(img_dir, "pool_latency.png")),
            removal(res, os.path.join(img_dir, "pool_removal.png")),
            overload(res, os.path.join(img_dir, "pool_overload.png"))]
