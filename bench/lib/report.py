"""The command line and the results file every benchmark shares: the common options, ``--replot``,
the machine a run measured, writing ``OUT/<name>.json`` beside the printed report, and the layout
of that report's tables (``table``)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

from .procs import sigterm_as_exit

#: The repository root (bench/lib/ is two levels below it).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: Where results go unless --out says otherwise (git-ignored).
DEFAULT_OUT = os.path.join(REPO, "bench", "out")
#: Where the documented figures live; a --quick run draws into --out instead.
DOCS_IMG = os.path.join(REPO, "docs", "img")


def prog() -> str:
    """How this run was started, for --help: ``python -m bench.<family>`` (not ``__main__.py``)."""
    rel = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    if not rel.startswith("bench" + os.sep) or not rel.endswith(".py"):
        return os.path.basename(sys.argv[0])
    return "python -m " + rel[:-3].replace(os.sep, ".").removesuffix(".__main__")


def command() -> list[str]:
    """The command line of this run as one would type it again (``python -m bench.pool --quick``)."""
    return [*prog().split(), *sys.argv[1:]]


def parser(doc: str, results_name: str, quick: str) -> argparse.ArgumentParser:
    """The options every benchmark shares: --quick, --out, --img-dir, --replot."""
    p = argparse.ArgumentParser(prog=prog(), description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"short runs ({quick}): a smoke test")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"where {results_name} goes")
    p.add_argument("--img-dir", default=None,
                   help="where the PNG plots go (default: docs/img; with --quick: the --out folder)")
    p.add_argument("--replot", metavar=results_name.upper().replace(".", "_"),
                   help=f"measure nothing: reprint the report and redraw the plots from a {results_name}")
    return p


def img_dir(args) -> str:
    """Where a run's figures go: --img-dir, else docs/img, or --out for a --quick run (so a smoke
    run does not replace the documented figures)."""
    return args.img_dir or (args.out if args.quick else DOCS_IMG)


def replot(results_path: str, img_dir: str | None, out: str, render, draw) -> int:
    """``--replot FILE``: print the report of a saved results JSON and redraw its figures (into
    ``img_dir``, else docs/img, or ``out`` for a quick run's results); measures nothing."""
    with open(results_path) as fh:
        results = json.load(fh)
    img_dir = img_dir or (out if results.get("quick") else DOCS_IMG)
    print(render(results))
    print(f"\nredrew {', '.join(draw(results, img_dir))}")
    return 0


def table(columns, rows) -> list[str]:
    """A printed report's table as lines: the column titles, then one line per row, every line
    indented by four spaces, its cells two apart. ``columns`` are ``(title, spec)`` pairs: ``spec``
    formats the column's values (``">8.1f"``, ``">6.0%"``, ``"<11"``) and, by its alignment and
    width alone, its title; each row is the sequence of its values, one per column."""
    heads = [re.match(r"[<>^]?\d*", spec).group() for _, spec in columns]
    lines = [[format(title, head) for (title, _), head in zip(columns, heads)]]
    lines += [[format(value, spec) for value, (_, spec) in zip(row, columns, strict=True)] for row in rows]
    return ["    " + "  ".join(cells) for cells in lines]


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or ""."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        return ""


def git_commit() -> str:
    """The checked-out commit, with "+N modified" when tracked files differ from it ("" without git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + (f" +{len(dirty)} modified" if dirty else "")


def machine() -> dict:
    """What the figures depend on: cores, CPU, Python, the commit, the load other processes put on
    the machine at the start."""
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git": git_commit(), "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "cpu_model": cpu_model(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_start": os.getloadavg()}


def print_json(data, out: str | None = None) -> int:
    """Print ``data`` as indented JSON and, with ``out``, write the same text there; returns 0 (a
    ``main``'s exit status). For the measuring scripts without a report of their own (bench/ann)."""
    text = json.dumps(data, indent=1)
    if out:
        with open(out, "w") as fh:
            fh.write(text)
    print(text)
    return 0


def write_results(out: str, name: str, results: dict, report: str, *, indent: int = 2) -> str:
    """Write ``results`` to ``out``/``name``, print ``report`` and where the results (and their
    ``plots``, when listed) went; returns the file's path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=indent)
    print()
    print(report)
    print(f"\nwrote {', '.join([path, *results.get('plots', [])])}")
    return path


def settings_main(argv, doc: str, results_name: str, quick: str, settings: dict, measure, render,
                  extra=None) -> int:
    """``main`` of a benchmark whose runs are set by a ``{"full": ..., "quick": ...}`` table
    (bench/load/metrics_cost.py, bench/isolation/run.py): parse the shared options, ``--replot`` or
    ``measure(settings, log)`` (plus ``extra()``, merged in), stamp the results (settings, command,
    wall time, date, load), write them to ``--out``/``results_name`` and print the report."""
    args = parser(doc, results_name, quick).parse_args(argv)
    sigterm_as_exit()
    if args.replot:
        return replot(args.replot, args.img_dir, args.out, render, lambda results, img_dir: [])
    settings = settings["quick" if args.quick else "full"]
    t0 = time.monotonic()
    results = measure(settings, lambda msg: print(msg, flush=True))
    results.update(extra() if extra else {})
    results.update(settings=settings, quick=args.quick, command=command(), wall_s=time.monotonic() - t0,
                   date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   loadavg=os.getloadavg())
    write_results(args.out, results_name, results, render(results))
    return 0
