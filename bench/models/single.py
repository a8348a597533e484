"""One model, before and after many models: ``python -m bench.models.single [--quick]
[--baseline DIR|REVISION] [--out bench/out]``.

The many-models daemon must serve a one-model configuration exactly as fast as the daemon before
it. This runs the request-path benchmark (bench/load: the in-process ceiling, then 1, 4 and 16
closed-loop clients against a daemon, each row's img/s as a ratio to the in-process model at the
batch its frames in flight allow; and the no-op round trip against a bare ping-pong) on two
copies of the ``inferd`` package, alternately, in one run: the baseline (``--baseline``: a
checkout's root, or a git revision of this repository, extracted for the run; default BASELINE,
the last commit that served one model per daemon) and this checkout. The harness
is this checkout's bench/ for both; only the package the daemon, clients and ceiling import
differs (PYTHONPATH points each run at a folder of links, ``inferd/{daemon,client,shm}``, to one
tree's folders). Rounds alternate baseline, this, baseline, this ..., so drift on a shared machine
hits both; the report gives each run's ratios and the median ratio of this tree's to the
baseline's per row (1.00: as fast).

Those ratios swing by tens of percent between runs of one tree on a shared 2-core machine, so a
second part measures the loop's own work per request on each tree (bench/models/loop_cost.py:
the scheduler driven in process, CPU microseconds and Python function calls per request), also
alternating, ``loop_rounds`` times each. The call count is deterministic: it shows a difference
in work the times cannot resolve. Writes ``OUT/models_single.json``.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from ..lib import report

SETTINGS = {"full": {"rounds": 3, "quick": False, "loop_rounds": 10, "loop_batches": 1000},
            "quick": {"rounds": 2, "quick": True, "loop_rounds": 6, "loop_batches": 400}}
CASES = "1,4,16"
#: The last commit of one model per daemon: what a one-model configuration is compared with.
BASELINE = "b6f0d1f"


def tree_of(baseline: str, tmp: str) -> str:
    """``baseline``'s root: a folder as it is, else a git revision of this repository extracted
    (``git archive``) into ``tmp``."""
    if os.path.isdir(baseline):
        return baseline
    dest = os.path.join(tmp, "baseline-tree")
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", report.REPO, "archive", baseline, "daemon", "client", "shm"],
                             capture_output=True, timeout=120)
    if archive.returncode:
        raise SystemExit(f"--baseline {baseline}: neither a folder nor a revision of {report.REPO}: "
                         f"{archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True, timeout=120)
    return dest


def farm(root: str, where: str) -> str:
    """A folder whose ``inferd`` package is ``root``'s three source folders (setup.cfg's mapping)."""
    pkg = os.path.join(where, "inferd")
    os.makedirs(pkg)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    for part in ("daemon", "client", "shm"):
        os.symlink(os.path.join(os.path.abspath(root), part), os.path.join(pkg, part))
    return where


def one_run(tree: str, path: str, quick: bool, out: str, log) -> dict:
    """bench.load on ``tree``'s package; its results.json."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, report.REPO])}
    cmd = [sys.executable, "-m", "bench.load", "--no-cpu", "--cases", CASES, "--out", out, "--img-dir", out,
           *(["--quick"] if quick else [])]
    log(f"{tree}: {' '.join(cmd[1:])}")
    done = subprocess.run(cmd, cwd=report.REPO, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"bench.load on {tree} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh)


def _rows(results: dict) -> dict:
    """{case: ratio to its ceiling} and the no-op round trip's p50 ratio to the bare ping-pong."""
    out = {f"{r['clients']} clients": r["ratio_to_ceiling"] for r in results["load"]["rows"]}
    out.update({f"{r['clients']} clients img/s": r["img_s"] for r in results["load"]["rows"]})
    if results.get("transport"):
        out["no-op round trip / bare (p50)"] = results["transport"]["ratio_p50"]
    return out


def loop_run(tree: str, path: str, batches: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, report.REPO])}
    done = subprocess.run([sys.executable, "-m", "bench.models.loop_cost", str(batches), "16"], cwd=report.REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"loop_cost on {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(settings: dict, log, baseline: str = BASELINE) -> dict:
    runs = {"baseline": [], "this": []}
    loops = {"baseline": [], "this": []}
    with tempfile.TemporaryDirectory(prefix="inferd-single-") as tmp:
        paths = {"baseline": farm(tree_of(baseline, tmp), os.path.join(tmp, "baseline")),
                 "this": farm(report.REPO, os.path.join(tmp, "this"))}
        for i in range(settings["loop_rounds"]):
            for tree in ("baseline", "this"):
                loops[tree].append(loop_run(tree, paths[tree], settings["loop_batches"]))
        log(f"loop: {loops}")
        for i in range(settings["rounds"]):
            for tree in ("baseline", "this"):
                out = os.path.join(tmp, f"{tree}-{i}")
                runs[tree].append(_rows(one_run(tree, paths[tree], settings["quick"], out, log)))
    keys = list(runs["this"][0]) if runs["this"] else []
    ratio = {k: statistics.median(r[k] for r in runs["this"]) / statistics.median(r[k] for r in runs["baseline"])
             for k in keys}
    return {"machine": report.machine(), "baseline": baseline, "this": report.REPO,
            "baseline_commit": _commit(baseline), "runs": runs, "this_over_baseline": ratio, "loop": loops}


def _commit(baseline: str) -> str:
    """The commit a folder's checkout is at, or a revision's."""
    where, rev = (baseline, "HEAD") if os.path.isdir(baseline) else (report.REPO, baseline)
    try:
        return subprocess.run(["git", "-C", where, "rev-parse", "--short", rev], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


def render(results: dict) -> str:
    keys = list(results["this_over_baseline"])
    base_name = f"{results['baseline']} at {results['baseline_commit']}"
    lines = []
    if keys:
        lines.append(f"One model, bench.load --cases {CASES} on the baseline ({base_name}) and this checkout, "
                     "alternating:")
        runs, rows = results["runs"], []
        for k in keys:
            base, this = [r[k] for r in runs["baseline"]], [r[k] for r in runs["this"]]
            rows.append([k, " ".join(f"{v:.2f}" if v < 100 else f"{v:.0f}" for v in base),
                         " ".join(f"{v:.2f}" if v < 100 else f"{v:.0f}" for v in this),
                         results["this_over_baseline"][k], max(base) / min(base)])
        lines += report.table([("figure", "<30"), ("baseline runs", ">24"), ("this runs", ">24"),
                               ("this / baseline", ">15.3f"), ("baseline spread", ">15.2f")], rows)
        lines.append("(ratios to the in-process ceiling measured in the same bench.load run; img/s as measured; "
                     "this / baseline: the medians' ratio; spread: the baseline's largest run over its smallest)")
    loops = results.get("loop")
    if loops:
        lines += ["", f"The loop's own work per request, one model (bench/models/loop_cost.py, in process, "
                      f"alternating; baseline {base_name}):"]
        rows = []
        for tree in ("baseline", "this"):
            cpu = sorted(r["cpu_us_per_request"] for r in loops[tree])
            rows.append([tree, cpu[0], statistics.median(cpu), cpu[-1],
                         statistics.median(r["calls_per_request"] for r in loops[tree])])
        lines += report.table([("tree", "<9"), ("CPU us min", ">10.2f"), ("median", ">7.2f"), ("max", ">7.2f"),
                               ("calls/request", ">13.2f")], rows)
        lines.append(f"    this / baseline: CPU min {rows[1][1] / rows[0][1]:.3f}, median "
                     f"{rows[1][2] / rows[0][2]:.3f}; calls {rows[1][4] / rows[0][4]:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = report.parser(__doc__, "models_single.json", "2 rounds of bench.load --quick")
    p.add_argument("--baseline", default=BASELINE, help=f"the checkout (a folder) or git revision to compare with (default {BASELINE}, "
                   "the last commit of one model per daemon)")
    p.add_argument("--rounds", type=int, default=None, help="pairs of bench.load runs (default 3; --quick 2; "
                   "0: the loop's work alone)")
    args = p.parse_args(argv)
    settings = dict(SETTINGS["quick" if args.quick else "full"])
    if args.rounds is not None:
        settings["rounds"] = args.rounds
    results = measure(settings, lambda m: print(m, flush=True), args.baseline)
    results["command"] = report.command()
    report.write_results(args.out, "models_single.json", results, render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
