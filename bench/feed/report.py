"""The printed report of the feed-rate benchmark and its targets (plain text, from feed.json's dict).

The targets are the frame path's (docs/benchmarks.md, "Feed rate"), read from the one-device rows
as they were set: one CPU device of one thread, 4 client processes, 16 frames in flight each.
"""
from __future__ import annotations

from ..lib.report import table

CACHE_ON_OFF = 0.90           # 224x224 unique: frames/s with the cache on / off
CPU_ON_US = 80.0              # 224x224 unique, cache on: daemon CPU per frame
LOOP_ON_US = 25.0             # ... of which the event loop thread
CPU_OFF_US = 50.0             # 224x224 unique, cache off: daemon CPU per frame
SMALL_ON_FPS = 25_000.0       # 64x64 unique, cache on: frames/s


def _row(rows, size: int, cache: bool, devices: int = 1, frames: str = "unique", tree: str = "this"):
    return next((r for r in rows if (r["size"], r["cache"], r["devices"], r["frames"])
                 == (size, cache, devices, frames) and r.get("tree", "this") == tree), None)


def targets(rows: list) -> list[dict]:
    """The frame path's targets that this run's rows can answer, each with its value and bound."""
    out = []

    def add(name, value, bound, unit, at_most):
        if value is not None:
            out.append({"name": name, "value": value, "bound": bound, "unit": unit,
                        "met": value <= bound if at_most else value >= bound})

    on, off = _row(rows, 224, True), _row(rows, 224, False)
    if on and off:
        add("224x224 unique frames: cache on >= 0.90 of cache off (frames/s)",
            on["frames_s"] / off["frames_s"], CACHE_ON_OFF, "x off", False)
    if on:
        add("224x224 unique, cache on: daemon CPU per frame <= 80 us", on["cpu_us_per_frame"],
            CPU_ON_US, "us", True)
        add("224x224 unique, cache on: event loop CPU per frame <= 25 us", on["loop_us_per_frame"],
            LOOP_ON_US, "us", True)
    if off:
        add("224x224 unique, cache off: daemon CPU per frame <= 50 us", off["cpu_us_per_frame"],
            CPU_OFF_US, "us", True)
    small = _row(rows, 64, True)
    if small:
        add("64x64 unique, cache on, 4 client processes: >= 25,000 frames/s", small["frames_s"],
            SMALL_ON_FPS, "frames/s", False)
    return out


def _baseline(bare: dict) -> list[str]:
    ping = bare["ping_pong"]
    lines = [f"Bare baseline: socket ping-pong p50 {ping['p50_ms'] * 1e3:.1f} us ({ping['n']} round trips, "
             f"request {ping['request_bytes']} B, reply {ping['reply_bytes']} B)"]
    for size, b in bare["sizes"].items():
        w = b["ring_write"]
        lines.append(f"    {size}x{size}: ring write of {w['frame_bytes']} B p50 {w['p50_us']:.1f} us; "
                     f"bare {b['per_frame_us']:.1f} us a frame = {b['frames_s']:.0f} frames/s")
    return lines


def _rows(results: dict) -> list[str]:
    pct = lambda v: "-" if v is None else f"{v:.0%}"
    num = lambda v, spec: "-" if v is None else format(v, spec)
    cells = []
    for r in results["rows"]:
        cells.append((r.get("tree", "this"), f"{r['size']}x{r['size']}", "on" if r["cache"] else "off", r["devices"], r["frames"],
                      r["frames_s"], r["x_bare"], num(r["x_one_device"], ".2f"),
                      num(r["cpu_us_per_frame"], ".1f"), r["daemon_cores"], num(r["loop_us_per_frame"], ".1f"),
                      pct(r["loop_share"]), pct(r["loop_cores"]), pct(r["busiest_other_thread_cores"]),
                      r["computed_s"], r["daemon_hits_s"] + r["coalesced_s"], num(r["mean_batch"], ".1f"),
                      r["latency"]["p50_ms"], r["clients_cores"], num(r.get("client_us_per_frame"), ".1f"),
                      r["machine_cores"]))
    return [f"Feed rate: {results['clients']} client processes x {results['in_flight']} frames in flight "
            f"(classify_many, client cache off), uint8 no-op, max_batch {results['max_batch']}, "
            f"CPU devices of 1 thread",
            *table([("tree", "<4"), ("size", "<7"), ("cache", "<5"), ("dev", ">3"), ("frames", "<8"), ("frames/s", ">9.0f"),
                    ("x bare", ">6.2f"), ("x 1 dev", ">7"), ("us/frame", ">8"), ("cores", ">5.2f"),
                    ("loop us", ">7"), ("loop %", ">6"), ("loop busy", ">9"), ("top other", ">9"),
                    ("computed/s", ">10.0f"), ("cached/s", ">8.0f"), ("batch", ">5"),
                    ("p50 ms", ">6.2f"), ("clients", ">7.2f"), ("cl us", ">5"), ("machine", ">7.2f")], cells),
            "    (frames/s: into the daemon, counted by the clients; x bare: against the bare "
            "baseline of the size; us/frame: daemon CPU (every thread) per frame, cores: its CPU use; "
            "loop us: the event loop thread's CPU per frame, loop %: its share of the daemon's CPU, "
            "loop busy: of one core; top other: the busiest other daemon thread, of one core; "
            "computed/s: frames through the model, cached/s: answered by the daemon's cache or "
            "coalesced; batch: mean frames per batch; p50 ms: one call of 16 frames; clients, "
            "machine: cores used by the 4 clients, by everything; cl us: the clients' CPU per frame)"]


def _summary(results: dict) -> list[str]:
    out = ["Targets (one device, unique frames):" if results["targets"] else
           "Targets: none this run can answer (they read the one-device unique rows at 64x64 and 224x224)"]
    for t in results["targets"]:
        out.append(f"  [{'MET ' if t['met'] else 'MISS'}] {t['name']}: {t['value']:.2f} {t['unit']} "
                   f"(bound {t['bound']:g})")
    m = results["machine"]
    out.append(f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, commit {m['git']}; "
               f"load average at start {m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}; "
               f"{'QUICK run' if results.get('quick') else 'full run'}, {results.get('wall_s', 0):.0f} s")
    ended = results["daemons"]
    leftovers = [n for d in ended for n in d.get("shm_leftovers") or []]
    problems = sum(len(d.get("log_problems") or []) for d in ended)
    out.append(f"Cleanup: daemons exited with {', '.join(str(d['exit_code']) for d in ended)} after SIGTERM; "
               f"error lines in their logs: {problems}; /dev/shm leftovers: {', '.join(leftovers) or 'none'}")
    return out


def _compare(results: dict) -> list[str]:
    """With ``--alt-path``: each row of this tree over the same row of the other, measured beside it."""
    rows = results["rows"]
    alt = [r for r in rows if r.get("tree") == "alt"]
    if not alt:
        return []
    cells = []
    for a in alt:
        t = _row(rows, a["size"], a["cache"], a["devices"], a["frames"])
        if t is None:
            continue
        ratio = lambda key: "-" if not (t[key] and a[key]) else f"{t[key] / a[key]:.2f}"
        cells.append((f"{a['size']}x{a['size']}", "on" if a["cache"] else "off", a["devices"], a["frames"],
                      t["frames_s"], a["frames_s"], ratio("frames_s"), t["cpu_us_per_frame"] or 0,
                      a["cpu_us_per_frame"] or 0, ratio("cpu_us_per_frame"), t["loop_us_per_frame"] or 0,
                      a["loop_us_per_frame"] or 0, ratio("loop_us_per_frame")))
    return [f"This tree against the daemon of {results.get('alt_path')} (alt), each pair measured one after the other:",
            *table([("size", "<7"), ("cache", "<5"), ("dev", ">3"), ("frames", "<8"), ("frames/s", ">9.0f"),
                    ("alt", ">7.0f"), ("x alt", ">5"), ("us/frame", ">8.1f"), ("alt", ">6.1f"), ("x alt", ">5"),
                    ("loop us", ">7.1f"), ("alt", ">6.1f"), ("x alt", ">5")], cells)]


def render(results: dict) -> str:
    """The whole printed report."""
    parts = (_baseline(results["baseline"]), _rows(results), _compare(results), _summary(results))
    return "\n\n".join("\n".join(p) for p in parts if p)
