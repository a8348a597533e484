"""The daemon's thread settings side by side: ``python -m bench.load.policy [--quick] [--rounds R]``.

The measurements behind the ``threads`` defaults (daemon/pipeline/thread_pools.py, NOTE [ thread
pools ]; daemon/pipeline/team_size.py): the in-process ceiling once (bench/load/ceiling.py, the
fastest of its settings at each batch size), then, for each setting of ``POLICIES``, a daemon
(ResNet-18 @ 64x64, ``--device cpu:2``, max batch 16 / 5 ms, cache and embeddings off) under N
client processes with one request in flight each (bench/load/daemon_load.py), N = 1, 4 and 16.
With ``--rounds`` > 1 the settings take turns, round after round, so a shared machine's drift
reaches them alike; a figure is the median over rounds. Each row: img/s, its ratio to the ceiling
at batch N, p50 and p99 latency, the mean batch.

    old            threads.omp_wait_policy = passive, per_batch = fixed (the defaults before)
    auto           the defaults: a little spinning where the teams fit, team size per batch measured
    spin fixed     the spinning of auto, the whole share on every batch
    passive team   passive waiting, team size per batch measured
    auto gil5ms    the defaults with Python's own switch interval (threads.switch_interval_ms)
    auto spin1e5   the defaults with ten times the spinning (threads.omp_spin_count = 100000)
    default team   OpenMP's own waiting (as the in-process ceiling's default), team size measured
    default fixed  OpenMP's own waiting, the whole share on every batch

``--policies`` picks some of them by name (comma-separated; default: all).

Writes ``OUT/policy.json``.
"""
from __future__ import annotations

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
)
CASES = ((1, 1), (4, 1), (16, 1))
DURATIONS = {"full": {"ceiling_s": 2.0, "warmup_s": 1.5, "seconds": 6.0},
             "quick": {"ceiling_s": 0.5, "warmup_s": 0.5, "seconds": 2.0}}


def measure(d: dict, rounds: int, log, policies=POLICIES) -> dict:
    ceil = ceiling.measure(0.5, d["ceiling_s"], sorted({n for n, _ in CASES}))
    log("ceiling " + ", ".join(f"batch {r['batch']}: {r['img_s']:.1f} img/s ({r['setting']})" for r in ceil["rows"]))
    fair = ceiling.fair(ceil, daemon_load.MAX_BATCH)
    runs = {name: [] for name, _ in policies}
    for i in range(rounds):
        for name, sets in policies:
            args = daemon_load.daemon_args() + [a for kv in sets for a in ("--set", kv)]
            load = daemon_load.measure(fair, d["warmup_s"], d["seconds"], cases=CASES, args=args)
            rows = [{"clients": r["clients"], "img_s": r["img_s"], "ratio": r["ratio_to_ceiling"],
                     "p50_ms": r["latency"]["p50_ms"], "p99_ms": r["latency"]["p99_ms"],
                     "mean_batch": r.get("mean_batch", 0.0), "model_ms": r.get("model_ms_per_batch", 0.0),
                     "daemon_cores": r["daemon"]["cpu_cores"]} for r in load["rows"]]
            runs[name].append({"rows": rows, "threads": load.get("threads")})
            log(f"round {i + 1} {name}: " + ", ".join(f"N={r['clients']} {r['ratio']:.2f}x" for r in rows))
    return {"ceiling": ceil, "runs": runs, "rounds": rounds,
            "policies": {name: sets for name, sets in policies}}


def _median_rows(runs: list) -> list[dict]:
    out = []
    for k, first in enumerate(runs[0]["rows"]):
        med = {key: statistics.median(run["rows"][k][key] for run in runs)
               for key in ("img_s", "ratio", "p50_ms", "p99_ms", "mean_batch", "model_ms", "daemon_cores")
               if key in first}
        out.append({"clients": first["clients"], **med})
    return out


def render(results: dict) -> str:
    c = results["ceiling"]
    lines = [f"Daemon thread settings against the in-process ceiling (resnet18 64x64, cpu:2, one request in "
             f"flight per client; median of {results['rounds']} round(s))",
             "  ceiling: " + ", ".join(f"batch {r['batch']} {r['img_s']:.1f} img/s ({r['setting']}; "
                                       + ", ".join(f"{n} {v:.1f}" for n, v in r["img_s_by_setting"].items()) + ")"
                                       for r in c["rows"])]
    rows = []
    for name, runs in results["runs"].items():
        for r in _median_rows(runs):
            rows.append((name, r["clients"], r["img_s"], r["ratio"], r["p50_ms"], r["p99_ms"],
                         r["p99_ms"] / r["p50_ms"], r["mean_batch"], r.get("model_ms", float("nan")),
                         r.get("daemon_cores", float("nan"))))
    lines += report.table([("setting", "<15"), ("N", ">3"), ("img/s", ">7.1f"), ("x ceiling", ">9.2f"),
                           ("p50 ms", ">7.1f"), ("p99 ms", ">7.1f"), ("p99/p50", ">7.2f"), ("batch", ">5.1f"),
                           ("model ms/b", ">10.2f"), ("daemon cores", ">12.2f")], rows)
    lines.append("    (model ms/b: the daemon's own forward-pass time per batch; against the ceiling's "
                 "ms per batch it says whether the model or what surrounds it fell short)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = report.parser(__doc__, "policy.json", "one round of 2 s windows, about 3 minutes")
    p.add_argument("--rounds", type=int, default=1, help="rounds of every setting, taking turns (default 1)")
    p.add_argument("--policies", default=None, metavar="NAME,...", help="only these settings (default: all)")
    args = p.parse_args(argv)
    known = dict(POLICIES)
    names = [n.strip() for n in args.policies.split(",")] if args.policies else list(known)
    if unknown := [n for n in names if n not in known]:
        p.error(f"unknown --policies {', '.join(unknown)}: choose among {', '.join(known)}")
    chosen = tuple((n, known[n]) for n in names)
    procs.sigterm_as_exit()
    if args.replot:
        return report.replot(args.replot, args.img_dir, args.out, render, lambda results, img_dir: [])
    d = DURATIONS["quick" if args.quick else "full"]
    t0 = time.monotonic()
    results = measure(d, args.rounds, lambda msg: print(msg, flush=True), chosen)
    results.update(durations=d, quick=args.quick, command=report.command(), machine=report.machine(),
                   wall_s=time.monotonic() - t0, loadavg=os.getloadavg(),
                   date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    report.write_results(args.out, "policy.json", results, render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
