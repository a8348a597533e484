"""The daemon's thread settings against the in-process ceiling, interleaved: ``python -m bench.load.policy
[--quick] [--rounds R] [--policies NAME,...|all] [--clients N,...] [--alt-path TREE]``.

The measurements behind the ``threads`` defaults (daemon/pipeline/thread_pools.py, NOTE [ thread
pools ]; daemon/pipeline/team_size.py). Every ceiling setting (bench/load/ceiling.py ``SETTINGS``:
torch's defaults, passive, one thread) is loaded once in a child of its own (``ceiling.Worker``),
and every chosen setting of ``POLICIES`` gets a daemon of its own (ResNet-18 @ 64x64, ``--device
cpu:2``, max batch 16 / 5 ms, cache and embeddings off), all kept running. Then ``--rounds`` rounds
(default 3): for each N of 1, 4 and 16, the ceiling at batch N (the fastest setting, measured now)
and each daemon under N client processes with one request in flight each
(bench/load/daemon_load.py), the ceiling first in odd rounds and last in even ones. A ratio is
always against the ceiling of its own round, taken seconds from it, never against one caught at a
quiet moment minutes before; each figure is the median over rounds, with its min and max.

The machine is shared: beside every window the report gives the rest of the machine's load (busy
cores from /proc/stat less our own processes' CPU), and for the daemon where its time went: the
event loop thread's and the model threads' (executor and OpenMP team, named ``inferd-dev<i>``)
CPU and run-queue wait (schedstat: runnable but not running), the mean batch, the forward-pass
time per batch, and the garbage collector's collections (admin stats ``threads.gc``).

    old            threads.omp_wait_policy = passive, per_batch = fixed (the defaults before)
    auto           the defaults: a little spinning where the teams fit, team size per batch measured
    spin fixed     the spinning of auto, the whole share on every batch
    passive team   passive waiting, team size per batch measured
    auto gil5ms    the defaults with Python's own switch interval (threads.switch_interval_ms)
    auto spin1e5   the defaults with ten times the spinning (threads.omp_spin_count = 100000)
    default team   OpenMP's own waiting (as the in-process ceiling's default), team size measured
    default fixed  OpenMP's own waiting, the whole share on every batch
    auto bound     the defaults with OMP_PROC_BIND=true: each OpenMP thread bound to a core
    auto freeze    the defaults with the model in channels_last, traced and frozen
                   (model.compile = freeze)
    freeze fixed   model.compile = freeze, the whole share on every batch
    auto delay20   the defaults with a 20 ms batching window, not the target's 5 ms: a diagnosis
                   (do N clients' requests form batches of N when they have time to come back?)
    auto fixed     the defaults with the fixed batching window (batching.window = "fixed": a batch
                   waits for clients expected back only inside max_delay, the rule before the
                   measured window, NOTE [ measured window ] in daemon/dispatch/formation.py)

``--policies`` picks some of them by name (comma-separated; default: auto; ``all``: every one,
each a daemon running at once, so mind the memory). ``--alt-path TREE`` adds ``before``: the
defaults of another source tree (the code before a change), a daemon run from that tree's
``.pkg`` beside the others, in the same rounds. ``--clients`` picks the N (default 1,4,16).

Writes ``OUT/policy.json``.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import statistics
import sys
import time

from ..lib import procs, report
from . import ceiling, daemon_load

POLICIES = (
    ("old", ["threads.omp_wait_policy=\"passive\"", "threads.per_batch=\"fixed\""]),
    ("auto", []),
    ("spin fixed", ["threads.per_batch=\"fixed\""]),
    ("passive team", ["threads.omp_wait_policy=\"passive\""]),
    ("auto gil5ms", ["threads.switch_interval_ms=5"]),
    ("auto spin1e5", ["threads.omp_spin_count=100000"]),
    ("default team", ["threads.omp_wait_policy=\"default\""]),
    ("default fixed", ["threads.omp_wait_policy=\"default\"", "threads.per_batch=\"fixed\""]),
    ("auto bound", [], {"OMP_PROC_BIND": "true"}),
    ("auto delay20", ["batching.max_delay_ms=20"]),
    ("auto fixed", ["batching.window=\"fixed\""]),
    ("auto freeze", ["model.compile=\"freeze\""]),
    ("freeze fixed", ["model.compile=\"freeze\"", "threads.per_batch=\"fixed\""]),
)
CASES = ((1, 1), (4, 1), (16, 1))
DURATIONS = {"full": {"ceiling_warmup_s": 0.5, "ceiling_s": 2.0, "warmup_s": 1.0, "seconds": 3.0},
             "quick": {"ceiling_warmup_s": 0.3, "ceiling_s": 1.0, "warmup_s": 0.5, "seconds": 2.0}}


def _ceiling(workers, batch: int, d: dict) -> dict:
    """The ceiling at ``batch`` now: every setting measured once, one after another; the fastest."""
    rows = [w.measure(batch, d["ceiling_warmup_s"], d["ceiling_s"]) for w in workers]
    best = max(rows, key=lambda r: r["img_s"])
    return {"img_s": best["img_s"], "setting": best["setting"], "batch_ms_p50": best["batch_ms_p50"],
            "by_setting": {r["setting"]: r["img_s"] for r in rows},
            # the rest of the machine beside each setting's window: all busy cores less the child's
            "other_cores": [r["busy_cores"] - r["own_cores"] for r in rows],
            "steal_cores": [r["steal_cores"] for r in rows]}


def _daemon_row(served, n: int, depth: int, d: dict) -> dict:
    dd, probe, admin = served
    r = daemon_load.run_case(dd["socket"], dd["proc"].pid, probe, n, depth, d["warmup_s"], d["seconds"],
                             None, admin)
    own = r["daemon"]["cpu_cores"] + r["clients_cpu_cores"]
    return {"clients": n, "img_s": r["img_s"],
            "p50_ms": r["latency"]["p50_ms"], "p99_ms": r["latency"]["p99_ms"],
            "mean_batch": r.get("mean_batch", 0.0), "model_ms": r.get("model_ms_per_batch", 0.0),
            "daemon_cores": r["daemon"]["cpu_cores"], "clients_cores": r["clients_cpu_cores"],
            "other_cores": r["daemon"]["machine_busy_cores"] - own,
            "steal_cores": r["daemon"]["machine_steal_cores"],
            "loop_cpu": r["daemon"]["threads"]["loop"]["cpu"], "loop_wait": r["daemon"]["threads"]["loop"]["wait"],
            "model_cpu": r["daemon"]["threads"]["model"]["cpu"],
            "model_wait": r["daemon"]["threads"]["model"]["wait"],
            "rest_cpu": r["daemon"]["threads"]["other"]["cpu"],          # collectors, watchdog, ...
            "batch_sizes": r["daemon"].get("batch_sizes", {}),
            "gc_full": r["daemon"].get("gc", {}).get("collections", [0, 0, 0])[2],
            "gc_ms": 1000.0 * r["daemon"].get("gc", {}).get("seconds", 0.0)}


def measure(d: dict, rounds: int, log, policies=POLICIES, cases=CASES) -> dict:
    """Every ceiling setting kept loaded in a child (ceiling.Worker) and every policy's daemon kept
    running, then ``rounds`` rounds: for each N, the ceiling at batch N and each daemon under N
    clients, the ceiling first in odd rounds and last in even ones, so a ratio is always against
    a ceiling taken a few seconds from it and drift reaches both sides alike. Each window carries
    the rest of the machine's load (/proc/stat less our own processes' CPU)."""
    from inferd.client import Client
    from inferd.client.admin import AdminClient

    from ..lib.daemons import daemon

    out = {"rounds": [], "threads": {}}
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(ceiling.Worker(name, env, *threads))
                   for name, env, *threads in ceiling.SETTINGS]
        served = {}
        for name, sets, *env in policies:
            args = daemon_load.daemon_args() + [a for kv in sets for a in ("--set", kv)]
            dd = stack.enter_context(daemon(args, env[0] if env else None))
            admin_path = os.path.join(os.path.dirname(dd["socket"]), "admin.sock")
            served[name] = (dd, stack.enter_context(Client(dd["socket"])),
                            stack.enter_context(AdminClient(admin_path)))
            out["threads"][name] = served[name][2].call("stats").get("threads")
        for i in range(rounds):
            for n, depth in cases:
                batch = min(n * depth, daemon_load.MAX_BATCH)
                entry = {"round": i + 1, "clients": n, "depth": depth, "daemons": {}}
                order = ["", *served] if i % 2 == 0 else [*served, ""]
                for name in order:
                    if name:
                        entry["daemons"][name] = _daemon_row(served[name], n, depth, d)
                    else:
                        entry["ceiling"] = _ceiling(workers, batch, d)
                for r in entry["daemons"].values():
                    r["ratio"] = r["img_s"] / entry["ceiling"]["img_s"]
                out["rounds"].append(entry)
                c = entry["ceiling"]
                log(f"round {i + 1} N={n}: ceiling {c['img_s']:.1f} img/s ({c['setting']}; other load "
                    f"{max(c['other_cores']):.2f} cores); " + "; ".join(
                        f"{name} {r['img_s']:.1f} = {r['ratio']:.2f}x, p99/p50 {r['p99_ms'] / r['p50_ms']:.2f}, "
                        f"batch {r['mean_batch']:.1f}, other load {r['other_cores']:.2f}, "
                        f"loop {r['loop_cpu']:.2f}/{r['loop_wait']:.2f}, model {r['model_cpu']:.2f}/{r['model_wait']:.2f}, "
                        f"gc {r['gc_full']} full, {r['gc_ms']:.0f} ms"
                        for name, r in entry["daemons"].items()))
        # the collector over each daemon's whole life (start-up's collections included)
        out["threads_end"] = {name: a.call("stats").get("threads") or {} for name, (_, _, a) in served.items()}
        out["gc"] = {name: t.get("gc") for name, t in out["threads_end"].items()}
    out.update(policies={name: sets for name, sets, *_ in policies}, rounds_n=rounds,
               cases=[list(c) for c in cases])
    return out


def _spread(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summary(results: dict) -> list[dict]:
    """Per policy and N: the median over rounds (and min, max) of the ratio, img/s, p50, p99,
    p99/p50, the mean batch and the other load beside the daemon's and the ceiling's windows."""
    out = []
    for name in results["policies"]:
        for n, _depth in results["cases"]:
            mine = [e for e in results["rounds"] if e["clients"] == n]
            rows = [e["daemons"][name] for e in mine]
            out.append({"policy": name, "clients": n,
                        "ratio": _spread([r["ratio"] for r in rows]),
                        "img_s": _spread([r["img_s"] for r in rows]),
                        "ceiling_img_s": _spread([e["ceiling"]["img_s"] for e in mine]),
                        "ceiling_settings": sorted({e["ceiling"]["setting"] for e in mine}),
                        "p50_ms": _spread([r["p50_ms"] for r in rows]),
                        "p99_ms": _spread([r["p99_ms"] for r in rows]),
                        "tail": _spread([r["p99_ms"] / r["p50_ms"] for r in rows]),
                        "mean_batch": _spread([r["mean_batch"] for r in rows]),
                        "model_ms": _spread([r["model_ms"] for r in rows]),
                        "daemon_cores": _spread([r["daemon_cores"] for r in rows]),
                        **{k: _spread([r[k] for r in rows])
                           for k in ("loop_cpu", "loop_wait", "model_cpu", "model_wait", "gc_full", "gc_ms")},
                        "other_daemon": _spread([r["other_cores"] for r in rows]),
                        "other_ceiling": _spread([max(e["ceiling"]["other_cores"]) for e in mine])})
    return out


def render(results: dict) -> str:
    lines = [f"Daemon thread settings against the in-process ceiling, interleaved (resnet18 64x64, cpu:2, "
             f"one request in flight per client; median [min-max] of {results['rounds_n']} round(s))"]
    rows = []
    for s in summary(results):
        rows.append((s["policy"], s["clients"], s["img_s"]["median"], s["ceiling_img_s"]["median"],
                     f"{s['ratio']['median']:.2f} [{s['ratio']['min']:.2f}-{s['ratio']['max']:.2f}]",
                     s["p50_ms"]["median"], s["p99_ms"]["median"],
                     f"{s['tail']['median']:.2f} [{s['tail']['min']:.2f}-{s['tail']['max']:.2f}]",
                     s["mean_batch"]["median"], s["model_ms"]["median"],
                     f"{s['loop_cpu']['median']:.2f}/{s['loop_wait']['median']:.2f}",
                     f"{s['model_cpu']['median']:.2f}/{s['model_wait']['median']:.2f}",
                     f"{s['gc_full']['max']:.0f}/{s['gc_ms']['max']:.0f}",
                     f"{s['other_ceiling']['median']:.2f}/{s['other_daemon']['median']:.2f} "
                     f"(max {max(s['other_ceiling']['max'], s['other_daemon']['max']):.2f})"))
    lines += report.table([("setting", "<15"), ("N", ">3"), ("img/s", ">7.1f"), ("ceiling", ">7.1f"),
                           ("x ceiling", ">16"), ("p50 ms", ">7.1f"), ("p99 ms", ">7.1f"),
                           ("p99/p50", ">16"), ("batch", ">5.1f"), ("model ms/b", ">10.2f"),
                           ("loop run/wait", ">13"), ("model run/wait", ">14"), ("gc full/ms", ">10"), ("other load c/d", ">20")], rows)
    lines.append("    (ceiling: the fastest of torch's defaults, passive and one thread at batch N, taken in the "
                 "same round; other load: busy cores of the rest of the machine (/proc/stat less our own "
                 "processes) beside the ceiling's / the daemon's windows, median over rounds and the largest; "
                 "loop and model run/wait: the daemon's event loop thread and its model threads (executor and "
                 "OpenMP team), cores running and threads runnable but waiting for a core, from schedstat; gc: "
                 "full collections in a window and the ms all collections took, the largest over rounds)")
    for name, gc in (results.get("gc") or {}).items():
        if gc:
            lines.append(f"  gc over the life of {name}: collections by generation {gc['collections']}, longest "
                         f"{gc['longest_ms']} ms, {gc['frozen']} objects frozen at start")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = report.parser(__doc__, "policy.json", "one round of 2 s windows, about 3 minutes")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the ceiling and every setting, taking "
                   "turns (default 3)")
    p.add_argument("--policies", default="auto", metavar="NAME,...",
                   help="these settings, each a daemon of its own kept running through the rounds "
                        "(default: auto; 'all' for every one)")
    p.add_argument("--alt-path", default="", metavar="TREE",
                   help="also a daemon of the defaults from another source tree (its .pkg, else the "
                        "tree itself, as PYTHONPATH): the code before a change, measured in the same rounds")
    p.add_argument("--clients", default="1,4,16", metavar="N,...",
                   help="the client counts, each with one request in flight (default 1,4,16)")
    args = p.parse_args(argv)
    known = {p[0]: p for p in POLICIES}
    names = list(known) if args.policies == "all" else [n.strip() for n in args.policies.split(",")]
    if unknown := [n for n in names if n not in known]:
        p.error(f"unknown --policies {', '.join(unknown)}: choose among {', '.join(known)}")
    chosen = tuple(known[n] for n in names)
    if args.alt_path:
        pkg = os.path.join(args.alt_path, ".pkg")
        chosen += (("before", [], {"PYTHONPATH": pkg if os.path.isdir(pkg) else args.alt_path}),)
    procs.sigterm_as_exit()
    if args.replot:
        return report.replot(args.replot, args.img_dir, args.out, render, lambda results, img_dir: [])
    d = DURATIONS["quick" if args.quick else "full"]
    t0 = time.monotonic()
    cases = tuple((int(n), 1) for n in args.clients.split(","))
    results = measure(d, args.rounds, lambda msg: print(msg, flush=True), chosen, cases)
    results.update(durations=d, quick=args.quick, command=report.command(), machine=report.machine(),
                   wall_s=time.monotonic() - t0, loadavg=os.getloadavg(),
                   date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    report.write_results(args.out, "policy.json", results, render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
