"""The three figures of the cache benchmark, drawn with matplotlib's Agg backend."""
from __future__ import annotations

from ..lib.plots import pyplot, save_figure


def latency(lat: dict, path: str) -> str:
    """p50 and p99 bars (log scale, microseconds): client hit, daemon hit, miss."""
    import numpy as np

    plt = pyplot()
    rows = [("client-side hit\n(local lookup)", lat["client_hit"]), ("daemon-side hit\n(round trip)", lat["daemon_hit"]),
            ("ping\n(round-trip floor)", lat["ping"]), ("miss\n(computed, batch 1)", lat["miss"])]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    x = np.arange(len(rows))
    for off, key, label in ((-0.2, "p50_us", "p50"), (0.2, "p99_us", "p99")):
        vals = [r[1][key] for r in rows]
        bars = ax.bar(x + off, vals, 0.38, label=label)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.1f}", (b.get_x() + b.get_width() / 2, v),
                        textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x, [r[0] for r in rows], fontsize=9)
    ax.set_ylabel("latency per call (us, log scale)")
    ax.set_title("resnet18 @ 64x64: cache hits against the miss path (cpu:2)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, plt, path)


def throughput(tp: dict, path: str) -> str:
    """img/s bars, one per measured case (rounds side by side), cache on against off."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    groups = [(f"{tp['repeat_frac']:.0%} repeats", tp["repeat_frac"]), ("unique", 0.0)]
    rounds = sorted({r["round"] for r in tp["rows"]})
    width = 0.8 / (2 * len(rounds))
    colours = {True: "tab:green", False: "tab:grey"}
    for gi, (label, frac) in enumerate(groups):
        k = 0
        for cache in (True, False):
            for rnd in rounds:
                row = next(r for r in tp["rows"] if r["repeat_frac"] == frac and r["cache"] == cache
                           and r["round"] == rnd)
                xpos = gi - 0.4 + width * (k + 0.5)
                ax.bar(xpos, row["img_s"], width * 0.95, color=colours[cache],
                       alpha=1.0 if rnd == rounds[0] else 0.65,
                       label=f"cache {'on' if cache else 'off'}" if gi == 0 and rnd == rounds[0] else None)
                ax.annotate(f"{row['img_s']:.0f}", (xpos, row["img_s"]), textcoords="offset points",
                            xytext=(0, 2), ha="center", fontsize=7)
                k += 1
        ratio = tp["ratios"]["repeats" if frac else "unique"]["mean_ratio"]
        top = max(r["img_s"] for r in tp["rows"] if r["repeat_frac"] == frac)
        ax.annotate(f"on / off = {ratio:.3f}", (gi, top * 1.08), ha="center", fontsize=9)
    ax.set_xticks(np.arange(len(groups)), [g[0] for g in groups])
    ax.set_ylabel("img/s (all clients)")
    ax.set_ylim(0, max(r["img_s"] for r in tp["rows"]) * 1.2)
    ax.set_title(f"{tp['clients']} closed-loop clients, resnet18 @ 64x64 (cpu:2); bars per round")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return save_figure(fig, plt, path)


def near(rob: dict, path: str) -> str:
    """Top-1 rate per perturbation, per model through the daemon, plus the best in-process
    alternative of each model (hatched)."""
    import numpy as np

    plt = pyplot()
    kinds = ("resize", "noise", "jpeg", "combined")
    series = [(f"daemon, --model {m}", [res["kinds"][k]["top1"] for k in kinds], None)
              for m, res in rob["daemon"].items()]
    for model in rob["daemon"]:
        group = rob["inprocess"][model]
        alts = {v: r for v, r in group["variants"].items() if v != group["daemon_variant"]}
        best = max(alts, key=lambda v: np.mean([alts[v][k]["top1"] for k in kinds]))
        series.append((f"in-process {model}: {best.split(' (')[0]}", [alts[best][k]["top1"] for k in kinds], "//"))
    fig, ax = plt.subplots(figsize=(8, 5.6), dpi=110)
    x = np.arange(len(kinds))
    width = 0.8 / len(series)
    for i, (label, vals, hatch) in enumerate(series):
        ax.bar(x - 0.4 + width * (i + 0.5), [100 * v for v in vals], width * 0.95, label=label, hatch=hatch)
    ax.axhline(95, color="red", linestyle=":", label="target 95%")
    ax.set_xticks(x, kinds)
    ax.set_ylabel("top-1 finds the original (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{rob['samples']} changed copies against {rob['images']} stored shapes images")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    return save_figure(fig, plt, path)
