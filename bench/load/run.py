"""The request-path benchmark: ``python -m bench.load [--quick] [--out bench/out] [--img-dir DIR]``.

Measures, in one go and on this machine only:

(a) the ceiling: ResNet-18 @ 64x64 in-process (a child process, 2 torch threads), img/s per batch size
    at torch's default OpenMP settings, passive waiting, one thread and the daemon's own OpenMP
    setting, the fastest at each batch size (bench/load/ceiling.py);
(b) the daemon under load (cpu:2, max_batch 16, max_delay 5 ms, cache off): 1, 4, 16 and 64
    closed-loop client processes with one frame in flight each, and 16 with 4, each row against
    the in-process model at the batch its frames in flight allow, with each device's busy fraction;
(c) transport alone: a no-op model through the daemon against a bare Unix-socket ping-pong;
(d) the one-client latency check, from (a) and (b);
(e) the daemon's CPU per frame at a steady 200 frames/s, embeddings off against 100,000 stored.

Nothing is asserted: every figure is reported as a ratio to a baseline measured in the same run, and
the summary says which targets were met. Writes ``OUT/results.json`` and two PNG plots (to docs/img,
or with ``--quick`` to OUT so a smoke run does not replace the documented figures). See
docs/benchmarks.md.
"""
from __future__ import annotations

import os
import time

from ..lib import procs, report as lib_report
from . import ceiling, cpu_per_frame, daemon_load, plots, report, transport

#: Seconds (or round-trip counts) of each part; --quick takes the second set (about a minute in all).
DURATIONS = {
    "full": {"ceiling_warmup_s": 0.5, "ceiling_s": 2.5, "load_warmup_s": 1.5, "load_s": 8.0,
             "rt_warmup": 300, "rt_count": 3000, "cpu_warmup_s": 1.0, "cpu_s": 6.0},
    "quick": {"ceiling_warmup_s": 0.2, "ceiling_s": 0.5, "load_warmup_s": 0.5, "load_s": 2.0,
              "rt_warmup": 100, "rt_count": 500, "cpu_warmup_s": 0.5, "cpu_s": 2.0},
}
MAX_DELAY_MS = 5.0
MAX_BATCH = daemon_load.MAX_BATCH
LATENCY_SLACK_MS = 0.5


def _args(argv):
    """The command line; ``--daemon-env`` becomes a dict."""
    p = lib_report.parser(__doc__, "results.json", "about a minute")
    p.add_argument("--device", action="append", default=None, metavar="SPEC",
                   help="daemon device for part (b), repeatable (default: cpu:2); e.g. --device cpu:1 --device cpu:1")
    p.add_argument("--max-delay-ms", type=float, default=MAX_DELAY_MS, help="daemon batching.max_delay_ms for part (b)")
    p.add_argument("--daemon-env", action="append", default=[], metavar="NAME=VALUE",
                   help="add to the daemons' environment (repeatable), e.g. OMP_NUM_THREADS=1 to "
                        "compare a setting; the documented figures use none")
    p.add_argument("--daemon-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="add --set SECTION.KEY=VALUE to the part (b) daemon (repeatable), e.g. "
                        "threads.omp_wait_policy=default to compare a setting")
    p.add_argument("--no-cpu", action="store_true", help="skip part (e), the CPU per frame")
    p.add_argument("--cases", default=None, metavar="N[xD],...",
                   help="part (b)'s rows: client processes, x frames in flight each (default "
                        "1,4,16,64,16x4); the targets need 1, 4 and 16")
    args = p.parse_args(argv)
    args.daemon_env = dict(item.split("=", 1) for item in args.daemon_env)
    args.cases = daemon_load.CASES if args.cases is None else tuple(
        (int(n), int(d or 1)) for n, _, d in (c.partition("x") for c in args.cases.split(",")))
    return args


def one_client_check(ceil: dict, load: dict) -> dict:
    """Part (d): one client's p50 against batch-1 model time + max_delay + 0.5 ms."""
    row = next(r for r in load["rows"] if r["clients"] == 1 and r["depth"] == 1)
    max_delay = load.get("max_delay_ms", MAX_DELAY_MS)
    bound = ceil["model_ms_b1"] + max_delay + LATENCY_SLACK_MS
    p50 = row["latency"]["p50_ms"]
    return {"p50_ms": p50, "model_ms_b1": ceil["model_ms_b1"], "max_delay_ms": max_delay,
            "slack_ms": LATENCY_SLACK_MS, "bound_ms": bound, "margin_ms": bound - p50}


def omp_env(env: dict, daemon_set, devices=None) -> dict:
    """The OpenMP settings the part (b) daemon runs with: its environment's, else
    threads.omp_wait_policy's (auto by default: what daemon/pipeline/thread_pools.py's auto_wait
    picks for ``devices`` on this machine's usable cores, with threads.omp_spin_count). The ceiling
    does not follow them: it is measured at torch's defaults, passive and one thread and takes the
    fastest (bench/load/ceiling.py); a daemon setting that is none of them is one more candidate."""
    from inferd.daemon.pipeline import thread_pools

    out = {k: v for k, v in env.items() if k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if out:
        return out
    value = lambda key, default: next((kv.split("=", 1)[1].strip('"') for kv in daemon_set
                                       if kv.startswith(f"threads.{key}=")), default)
    policy = value("omp_wait_policy", "auto")
    if policy == "auto":
        teams = thread_pools.cpu_teams(list(devices or daemon_load.DEVICES), [])
        return thread_pools.auto_wait(teams, len(thread_pools.usable_cores()),
                                      int(value("omp_spin_count", thread_pools.SPIN_COUNT)))
    return {} if policy == "default" else {"OMP_WAIT_POLICY": policy.upper()}


def run_all(d: dict, env: dict, log, devices=None, max_delay_ms: float = MAX_DELAY_MS,
            daemon_set=(), cpu: bool = True, cases=daemon_load.CASES) -> dict:
    """Parts (a) to (e) in order, then the ceiling once more (batch 1 and the best batch) to show
    how much the machine drifted; the daemons and children of each part are gone when it returns."""
    results = {"machine": lib_report.machine(), "durations": d}
    t0 = time.monotonic()
    settings = ceiling.candidates(omp_env(env, daemon_set, devices))
    log("(a) ceiling: in-process model, batch sizes %s, settings %s ..."
        % (ceiling.BATCH_SIZES, ", ".join(f"{name} {omp or '(torch defaults)'}" for name, omp, *_ in settings)))
    results["ceiling"] = ceil = ceiling.measure(d["ceiling_warmup_s"], d["ceiling_s"], settings=settings)
    log("(b) daemon under load: cases %s ..." % (cases,))
    extra = [a for kv in daemon_set for a in ("--set", kv)]
    results["load"] = load = daemon_load.measure(
        ceiling.fair(ceil, MAX_BATCH), d["load_warmup_s"], d["load_s"], cases=cases, env=env,
        args=daemon_load.daemon_args(devices or daemon_load.DEVICES, max_delay_ms) + extra)
    load["max_delay_ms"], load["max_batch"] = max_delay_ms, MAX_BATCH
    log("(c) transport: %d round trips each ..." % d["rt_count"])
    results["transport"] = transport.measure(d["rt_warmup"], d["rt_count"], env)
    if cpu:
        log("(e) daemon CPU per frame at %.0f frames/s, embeddings off / on ..." % cpu_per_frame.RATE)
        results["cpu_per_frame"] = cpu_per_frame.measure(d["cpu_warmup_s"], d["cpu_s"], log=log)
    log("(a') ceiling again, batch 1 and %d ..." % ceil["ceiling_batch"])
    results["ceiling_recheck"] = ceiling.measure(d["ceiling_warmup_s"], d["ceiling_s"],
                                                 sorted({1, ceil["ceiling_batch"]}), settings)
    results["one_client"] = one_client_check(ceil, load)
    results["targets"] = report.targets(results)
    results["machine"].update(loadavg_end=os.getloadavg(), torch=ceil["torch"])
    results["wall_s"] = time.monotonic() - t0
    return results


def write_plots(results: dict, img_dir: str) -> list[str]:
    """Both figures, from a results dict; returns their paths."""
    return [plots.latency_throughput(results["load"], results["ceiling"]["ceiling_img_s"],
                                     os.path.join(img_dir, "latency_throughput.png")),
            plots.ceiling_batch(results["ceiling"], os.path.join(img_dir, "ceiling_batch.png"))]


def main(argv=None) -> int:
    """Run everything, write results.json and the plots, print the report."""
    args = _args(argv)
    procs.sigterm_as_exit()
    if args.replot:
        return lib_report.replot(args.replot, args.img_dir, args.out, report.render, write_plots)
    durations = DURATIONS["quick" if args.quick else "full"]
    results = run_all(durations, args.daemon_env, lambda msg: print(msg, flush=True),
                      args.device, args.max_delay_ms, args.daemon_set, not args.no_cpu, args.cases)
    results.update(quick=args.quick, daemon_env=args.daemon_env, daemon_set=args.daemon_set,
                   command=lib_report.command())
    results["plots"] = write_plots(results, lib_report.img_dir(args))
    lib_report.write_results(args.out, "results.json", results, report.render(results))
    return 0
