"""The result-cache and embedding benchmark: ``python -m bench.cache [--quick] [--out bench/out]``.

Measures, on this machine only, every figure beside a baseline from the same run:

(1) hit latency: a client-side hit (local read-only cache) and a daemon-side hit against the miss
    path (resnet18 @ 64x64), and where the client-side hit's time goes;
(2) throughput of 4 closed-loop clients with 30 % repeats, cache on against cache off;
(3) the same with unique images only (twice each, interleaved: on, off, on, off);
(4) hashing against the per-image inference time of resnet50 @ 224x224;
(5) near-duplicate search time in the embedding store at 10k and 100k rows;
(6) whether a lightly changed copy finds its original among 10k stored images (shapes and resnet18).

Nothing is asserted: the report states which targets were met. Writes ``OUT/cache.json`` and three
PNGs (to docs/img, or with ``--quick`` to OUT so a smoke run does not replace the documented
figures). See docs/benchmarks.md, section "Result cache and embeddings".
"""
from __future__ import annotations

import os
import time

from ..lib import procs, report as lib_report
from . import embeddings, hashing, load, plots, report

#: Sizes of each part; --quick takes the second set (about a minute and a half in all).
SIZES = {
    "full": {"n_hit": 10000, "n_rt": 2000, "n_miss": 200,
             "tp_clients": 4, "tp_warmup_s": 2.0, "tp_s": 8.0, "tp_rounds": 2, "repeat_frac": 0.3,
             "hash_count": 1000, "inf_warmup_s": 1.0, "inf_s": 4.0, "hash_daemon_frames": 24,
             "search_sizes": [10_000, 100_000], "search_queries": 200,
             "near_images": 10_000, "near_samples": 300, "near_threads": 16},
    "quick": {"n_hit": 2000, "n_rt": 300, "n_miss": 40,
              "tp_clients": 4, "tp_warmup_s": 0.5, "tp_s": 2.0, "tp_rounds": 2, "repeat_frac": 0.3,
              "hash_count": 200, "inf_warmup_s": 0.3, "inf_s": 1.0, "hash_daemon_frames": 8,
              "search_sizes": [10_000, 100_000], "search_queries": 30,
              "near_images": 2000, "near_samples": 60, "near_threads": 16},
}


def _args(argv):
    p = lib_report.parser(__doc__, "cache.json", "about 1.5 minutes")
    p.add_argument("--parts", default="1,2,3,4,5,6",
                   help="comma-separated parts to run (2 and 3 run together), for development; the "
                        "documented figures are of all parts")
    return p.parse_args(argv)


def _problems(results: dict) -> list[str]:
    """Everything a part flagged, plus daemons that exited badly, logged errors or left /dev/shm names."""
    out = []

    def walk(x, path):
        if isinstance(x, dict):
            if isinstance(x.get("problems"), list):
                out.extend(f"{path}: {p}" for p in x["problems"])
            for k, v in x.items():
                if k != "problems":
                    walk(v, f"{path}/{k}" if path else k)
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")

    walk({k: v for k, v in results.items() if k != "daemons"}, "")
    for d in results.get("daemons", []):
        if d.get("exit_code") != 0:
            out.append(f"daemon {' '.join(d.get('args', []))} exited with {d.get('exit_code')}")
        if d.get("log_tail"):
            out.append(f"daemon {' '.join(d.get('args', [])[:2])} logged errors:\n{d['log_tail']}")
        if d.get("log_warnings"):
            out.append(f"daemon {' '.join(d.get('args', [])[:2])} logged warnings: " + " | ".join(d["log_warnings"]))
        if d.get("shm_leftovers"):
            out.append(f"/dev/shm leftovers: {d['shm_leftovers']}")
    return out


def _daemons(results: dict) -> list[dict]:
    """Every daemon summary in the results (they carry ``exit_code``)."""
    found = []

    def walk(x):
        if isinstance(x, dict):
            if "exit_code" in x and "args" in x:
                found.append(x)
                return
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(results)
    return found


def run_all(s: dict, parts: set, log) -> dict:
    """The requested parts in order; each part's daemons and children are gone when it returns."""
    results = {"machine": lib_report.machine(), "sizes": s}
    t0 = time.monotonic()
    if 1 in parts:
        log("(1) hit latency ...")
        results["latency"] = load.hit_latency(s["n_hit"], s["n_rt"], s["n_miss"])
    if parts & {2, 3}:
        log(f"(2, 3) throughput, {s['tp_rounds']} rounds of: {s['repeat_frac']:.0%} repeats on/off, unique on/off ...")
        results["throughput"] = load.throughput(s["tp_clients"], s["tp_warmup_s"], s["tp_s"],
                                                s["repeat_frac"], s["tp_rounds"], log)
    if 4 in parts:
        log("(4) hashing against resnet50 @ 224 inference ...")
        results["hashing"] = hashing.measure(s["hash_count"], s["inf_warmup_s"], s["inf_s"],
                                             s["hash_daemon_frames"])
        results["machine"]["torch"] = results["hashing"]["inference"]["torch"]
    if parts & {5, 6}:
        results["near"] = {}
        if 5 in parts:
            log("(5) near-duplicate search time ...")
            results["near"]["search"] = embeddings.search_time(s["search_sizes"], 512, s["search_queries"])
        if 6 in parts:
            log("(6) near-duplicate robustness ...")
            results["near"]["robustness"] = embeddings.robustness(s["near_images"], s["near_samples"], 20261129,
                                                                  s["near_threads"], log)
        if not {5, 6} <= parts:
            results.pop("near")                      # the report shows both or neither
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.monotonic() - t0
    results["daemons"] = _daemons(results)
    results["problems"] = _problems(results)
    results["targets"] = report.targets(results)
    return results


def write_plots(results: dict, img_dir: str) -> list[str]:
    """The figures of the parts that ran, from a results dict; returns their paths."""
    out = []
    if "latency" in results:
        out.append(plots.latency(results["latency"], os.path.join(img_dir, "cache_latency.png")))
    if "throughput" in results:
        out.append(plots.throughput(results["throughput"], os.path.join(img_dir, "cache_throughput.png")))
    if "near" in results:
        out.append(plots.near(results["near"]["robustness"], os.path.join(img_dir, "cache_near.png")))
    return out


def main(argv=None) -> int:
    """Run the asked parts, write cache.json and the plots, print the report."""
    args = _args(argv)
    procs.sigterm_as_exit()
    if args.replot:
        return lib_report.replot(args.replot, args.img_dir, args.out, report.render, write_plots)
    parts = {int(x) for x in args.parts.split(",") if x.strip()}
    sizes = SIZES["quick" if args.quick else "full"]
    results = run_all(sizes, parts, lambda msg: print(msg, flush=True))
    results.update(quick=args.quick, parts=sorted(parts), command=lib_report.command())
    results["plots"] = write_plots(results, lib_report.img_dir(args))
    lib_report.write_results(args.out, "cache.json", results, report.render(results))
    return 0
