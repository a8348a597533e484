"""inferd result-cache and embedding benchmark: ``python bench/cache.py [--quick] [--out bench/out]``.

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

import datetime
import json
import os
import platform
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
if BENCH_DIR not in sys.path:        # spawned children find these modules through the same sys.path
    sys.path.insert(0, BENCH_DIR)

import cache_report   # noqa: E402
import common         # noqa: E402

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
    p = common.parser(__doc__, "cache.json", "about 1.5 minutes")
    p.add_argument("--parts", default="1,2,3,4,5,6",
                   help="comma-separated parts to run (2 and 3 run together), for development; the "
                        "documented figures are of all parts")
    return p.parse_args(argv)


def _machine() -> dict:
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        cpu = ""
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git": _git(), "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": os.getloadavg()}


def _git() -> str:
    """The checked-out commit, with "+N modified" when tracked files differ from it ("" without git)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + (f" +{len(dirty)} modified" if dirty else "")


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
    import cache_hash
    import cache_load
    import cache_near

    results = {"machine": _machine(), "sizes": s}
    t0 = time.monotonic()
    if 1 in parts:
        log("(1) hit latency ...")
        results["latency"] = cache_load.hit_latency(s["n_hit"], s["n_rt"], s["n_miss"])
    if parts & {2, 3}:
        log(f"(2, 3) throughput, {s['tp_rounds']} rounds of: {s['repeat_frac']:.0%} repeats on/off, unique on/off ...")
        results["throughput"] = cache_load.throughput(s["tp_clients"], s["tp_warmup_s"], s["tp_s"],
                                                      s["repeat_frac"], s["tp_rounds"], log)
    if 4 in parts:
        log("(4) hashing against resnet50 @ 224 inference ...")
        results["hashing"] = cache_hash.measure(s["hash_count"], s["inf_warmup_s"], s["inf_s"],
                                                s["hash_daemon_frames"])
        results["machine"]["torch"] = results["hashing"]["inference"]["torch"]
    if parts & {5, 6}:
        results["near"] = {}
        if 5 in parts:
            log("(5) near-duplicate search time ...")
            results["near"]["search"] = cache_near.search_time(s["search_sizes"], 512, s["search_queries"])
        if 6 in parts:
            log("(6) near-duplicate robustness ...")
            results["near"]["robustness"] = cache_near.robustness(s["near_images"], s["near_samples"], 20261129,
                                                                  s["near_threads"], log)
        if not {5, 6} <= parts:
            results.pop("near")                      # the report shows both or neither
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.monotonic() - t0
    results["daemons"] = _daemons(results)
    results["problems"] = _problems(results)
    results["targets"] = cache_report.targets(results)
    return results


def write_plots(results: dict, img_dir: str) -> list[str]:
    import cache_plots

    out = []
    if "latency" in results:
        out.append(cache_plots.latency(results["latency"], os.path.join(img_dir, "cache_latency.png")))
    if "throughput" in results:
        out.append(cache_plots.throughput(results["throughput"], os.path.join(img_dir, "cache_throughput.png")))
    if "near" in results:
        out.append(cache_plots.near(results["near"]["robustness"], os.path.join(img_dir, "cache_near.png")))
    return out


def main(argv=None) -> int:
    args = _args(argv)
    common.sigterm_as_exit()
    if args.replot:
        return common.replot(args.replot, args.img_dir, args.out, cache_report.render, write_plots)
    parts = {int(x) for x in args.parts.split(",") if x.strip()}
    sizes = SIZES["quick" if args.quick else "full"]
    img_dir = args.img_dir or (args.out if args.quick else os.path.join(REPO, "docs", "img"))
    results = run_all(sizes, parts, lambda msg: print(msg, flush=True))
    results.update(quick=args.quick, parts=sorted(parts), command=sys.argv)
    results["plots"] = write_plots(results, img_dir)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cache.json")
    with open(path, "w") as fh:
        json.dump(results, fh, indent=2)
    print()
    print(cache_report.render(results))
    print(f"\nwrote {path}, {', '.join(results['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
