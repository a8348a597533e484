"""One model, before and after many models: ``python -m bench.models.single [--quick] [--baseline DIR]
[--out bench/out]``.

The many-models daemon must serve a one-model configuration exactly as fast as the daemon before
it. This runs the request-path benchmark (bench/load: the in-process ceiling, then 1, 4 and 16
closed-loop clients against a daemon, each row's img/s as a ratio to the in-process model at the
batch its frames in flight allow; and the no-op round trip against a bare ping-pong) on two
copies of the ``inferd`` package, alternately, in one run: the baseline (``--baseline``: a
checkout's root, default /work/main, the code before many models) and this checkout. The harness
is this checkout's bench/ for both; only the package the daemon, clients and ceiling import
differs (PYTHONPATH points each run at a folder of links, ``inferd/{daemon,client,shm}``, to one
tree's folders). Rounds alternate baseline, this, baseline, this ..., so drift on a shared machine
hits both; the report gives each run's ratios and the median ratio of this tree's to the
baseline's per row (1.00: as fast). Writes ``OUT/models_single.json``.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from ..lib import report

SETTINGS = {"full": {"rounds": 3, "quick": False}, "quick": {"rounds": 2, "quick": True}}
CASES = "1,4,16"
BASELINE = "/work/main"


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
        raise RuntimeError(f"bench.load on {tree} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh)


def _rows(results: dict) -> dict:
    """{case: ratio to its ceiling} and the no-op round trip's p50 ratio to the bare ping-pong."""
    out = {f"{r['clients']} clients": r["ratio_to_ceiling"] for r in results["load"]["rows"]}
    out.update({f"{r['clients']} clients img/s": r["img_s"] for r in results["load"]["rows"]})
    if results.get("transport"):
        out["no-op round trip / bare (p50)"] = results["transport"]["ratio_p50"]
    return out


def measure(settings: dict, log, baseline: str = BASELINE) -> dict:
    runs = {"baseline": [], "this": []}
    with tempfile.TemporaryDirectory(prefix="inferd-single-") as tmp:
        paths = {"baseline": farm(baseline, os.path.join(tmp, "baseline")),
                 "this": farm(report.REPO, os.path.join(tmp, "this"))}
        for i in range(settings["rounds"]):
            for tree in ("baseline", "this"):
                out = os.path.join(tmp, f"{tree}-{i}")
                runs[tree].append(_rows(one_run(tree, paths[tree], settings["quick"], out, log)))
    keys = list(runs["this"][0])
    ratio = {k: statistics.median(r[k] for r in runs["this"]) / statistics.median(r[k] for r in runs["baseline"])
             for k in keys}
    return {"machine": report.machine(), "baseline": os.path.abspath(baseline), "this": report.REPO,
            "baseline_commit": _commit(baseline), "runs": runs, "this_over_baseline": ratio}


def _commit(root: str) -> str:
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


def render(results: dict) -> str:
    keys = list(results["this_over_baseline"])
    lines = [f"One model, bench.load --cases {CASES} on the baseline ({results['baseline']} at "
             f"{results['baseline_commit']}) and this checkout, alternating:"]
    rows = []
    for k in keys:
        base = [r[k] for r in results["runs"]["baseline"]]
        this = [r[k] for r in results["runs"]["this"]]
        rows.append([k, " ".join(f"{v:.2f}" if v < 100 else f"{v:.0f}" for v in base),
                     " ".join(f"{v:.2f}" if v < 100 else f"{v:.0f}" for v in this),
                     results["this_over_baseline"][k]])
    lines += report.table([("figure", "<30"), ("baseline runs", ">18"), ("this runs", ">18"),
                           ("this / baseline", ">15.3f")], rows)
    lines.append("(ratios to the in-process ceiling measured in the same bench.load run; img/s as measured; "
                 "the last column: median of this tree's runs over the baseline's)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = report.parser(__doc__, "models_single.json", "2 rounds of bench.load --quick")
    p.add_argument("--baseline", default=BASELINE, help="the checkout to compare with (default /work/main)")
    args = p.parse_args(argv)
    settings = SETTINGS["quick" if args.quick else "full"]
    results = measure(settings, lambda m: print(m, flush=True), args.baseline)
    results["command"] = report.command()
    report.write_results(args.out, "models_single.json", results, render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
