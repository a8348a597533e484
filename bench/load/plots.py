"""The two figures of docs/benchmarks.md, drawn with matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

from ..lib.plots import pyplot, save_figure


def _ticker():
    """matplotlib.ticker, imported lazily like pyplot."""
    import matplotlib.ticker

    return matplotlib.ticker


def latency_throughput(load: dict, ceiling: float, path: str) -> str:
    """p50 and p99 latency against total img/s, one point pair per row of part (b), each row's own
    ceiling (the in-process model at its batch) as a grey tick, and a vertical line at the best
    in-process figure. Returns ``path``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    rows = load["rows"]
    x = [r["img_s"] for r in rows]
    ax.plot(x, [r["latency"]["p50_ms"] for r in rows], "o-", label="p50")
    ax.plot(x, [r["latency"]["p99_ms"] for r in rows], "s--", label="p99")
    for r in rows:
        label = f"{r['clients']} client{'s' if r['clients'] > 1 else ''}"
        if r["depth"] > 1:
            label += f", {r['depth']} in flight each"
        ax.annotate(label, (r["img_s"], r["latency"]["p99_ms"]), textcoords="offset points",
                    xytext=(4, 6), fontsize=8)
    fair = [r for r in rows if r.get("ceiling_img_s")]
    if fair:
        ax.plot([r["ceiling_img_s"] for r in fair], [r["latency"]["p50_ms"] for r in fair], "|",
                color="grey", markersize=14, label="in-process at the row's batch")
    ax.axvline(ceiling, color="grey", linestyle=":", label=f"in-process ceiling {ceiling:.0f} img/s")
    ax.set_xlabel("total throughput (img/s)")
    ax.set_ylabel("latency per call (ms, log scale)")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(_ticker().LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(_ticker().FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(_ticker().NullFormatter())
    lats = [r["latency"][k] for r in rows for k in ("p50_ms", "p99_ms")]
    ax.set_ylim(min(lats) / 1.3, max(lats) * 1.6)
    ax.set_xlim(0, max(ceiling, *x) * 1.1)
    ax.set_title(f"ResNet-18 @ 64x64 through inferd (cpu:2, max_batch {load.get('max_batch', 32)}, "
                 f"max_delay {load.get('max_delay_ms', 2):g} ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, plt, path)


def ceiling_batch(ceiling: dict, path: str) -> str:
    """In-process img/s against batch size (log2 axis), one line per OpenMP setting measured and
    the ceiling (the faster at each batch size) annotated. Returns ``path``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    rows = ceiling["rows"]
    for name, setting in ceiling.get("settings", {}).items():
        env = " ".join(f"{k}={v}" for k, v in setting["omp_env"].items()) or "torch defaults"
        env += f", {setting['threads']} thread(s)" if "threads" in setting else ""
        ax.plot([r["batch"] for r in setting["rows"]], [r["img_s"] for r in setting["rows"]], ".--",
                alpha=0.7, label=f"{name} ({env})")
    ax.plot([r["batch"] for r in rows], [r["img_s"] for r in rows], "o-", color="black",
            label="ceiling: the fastest")
    for r in rows:
        ax.annotate(f"{r['img_s']:.0f}", (r["batch"], r["img_s"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["batch"] for r in rows], [str(r["batch"]) for r in rows])
    ax.set_xlabel("batch size")
    ax.set_ylabel("img/s")
    ax.set_ylim(0, max(r["img_s"] for r in rows) * 1.15)
    ax.set_title(f"{ceiling['model']} @ {ceiling['input_size']}x{ceiling['input_size']} in-process, "
                 f"{ceiling['threads']} torch threads")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, plt, path)


