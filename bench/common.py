"""Shared pieces of the benchmark: statistics, test frames, child processes and daemons that are
always cleaned up.

Nothing here imports torch or matplotlib: every client process the benchmark spawns re-imports the
main module (``bench/run.py``) and with it this module, so the imports must stay cheap.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import secrets
import shutil
import signal
import sys
import tempfile
import time

import numpy as np

#: The multiprocessing context of every child: a fresh interpreter, nothing inherited from the parent
#: (no torch state, no open daemon sockets).
CTX = mp.get_context("spawn")
#: How long the parent waits for a child's result beyond the time the child should need.
RESULT_GRACE_S = 120.0
#: Directory of the ring name prefix check: the daemons here use the memfd backend, so nothing
#: should ever appear there; the benchmark checks it anyway.
SHM_DIR = "/dev/shm"


def latency_stats(seconds: list[float] | np.ndarray) -> dict:
    """p50, p99, mean, min and max of a list of durations in seconds, as milliseconds, plus n."""
    a = np.asarray(seconds, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None, "min_ms": None, "max_ms": None}
    p50, p99 = np.percentile(a, [50, 99])
    return {"n": int(a.size), "p50_ms": float(p50), "p99_ms": float(p99), "mean_ms": float(a.mean()),
            "min_ms": float(a.min()), "max_ms": float(a.max())}


def frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` random uint8 RGB frames of ``size`` x ``size`` (NHWC), reproducible by ``seed``."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def short_workdir() -> str:
    """A fresh directory under /tmp with a short path (AF_UNIX socket paths are limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix="inferd-b", dir="/tmp")


def shm_leftovers(prefix: str) -> list[str]:
    """Names in /dev/shm that start with ``prefix`` (there should never be any)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def stop_processes(procs: list, grace: float = 5.0) -> None:
    """Give the multiprocessing children ``grace`` seconds in all to exit, then terminate (SIGTERM),
    then kill, any still running; reap every one."""
    deadline = time.monotonic() + grace
    started = [p for p in procs if p.pid is not None]
    for p in started:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in started:
        if p.is_alive():
            p.terminate()
    for p in started:
        p.join(timeout=5.0)
        if p.is_alive():
            p.kill()
            p.join()


def collect_results(q, procs: list, count: int, timeout: float) -> list:
    """Take ``count`` results from queue ``q`` that the children in ``procs`` put there.

    A child reports ``("ok", value)`` or ``("error", traceback text)``; an error, a child that dies
    without reporting, or ``timeout`` seconds without all results raises RuntimeError.
    """
    out, deadline = [], time.monotonic() + timeout
    while len(out) < count:
        try:
            kind, value = q.get(timeout=0.5)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"child {dead[0].name} exited with {dead[0].exitcode} before reporting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count - len(out)} of {count} child results missing after "
                                   f"{timeout:.0f} s")
            continue
        if kind == "error":
            raise RuntimeError(f"a benchmark child failed:\n{value}")
        out.append(value)
    return out


def run_in_child(target, args: tuple, timeout: float, name: str):
    """Run ``target(result_queue, *args)`` in one spawned process and return the value it reports."""
    q = CTX.Queue()
    p = CTX.Process(target=target, args=(q, *args), name=name, daemon=True)
    try:
        p.start()
        return collect_results(q, [p], 1, timeout)[0]
    finally:
        stop_processes([p])


@contextlib.contextmanager
def daemon(args: list[str], env: dict | None = None, *, keep_log: str | None = None):
    """Start an inferd daemon with ``args`` (and ``env`` added to its environment) in a fresh work
    directory and yield it; always stop it (SIGTERM, then SIGKILL if it overstays 30 s).

    The daemon gets its own ring prefix and its own cache file ``<workdir>/results.cache`` (never
    the system default); unless ``args`` set ``cache.*`` themselves, the cache and embeddings are
    off, since repeated frames would be answered without reaching the model.

    Yields a dict with ``proc`` (the DaemonProcess), ``socket``, ``prefix``, ``workdir``,
    ``cache_path`` and ``args``; after the block ``exit_code``, ``log`` (its whole log, also written
    to ``keep_log`` when given), ``log_problems`` (ERROR and traceback lines) and ``shm_leftovers``.
    """
    from inferd.daemon.launch import DaemonProcess

    workdir = short_workdir()
    prefix = f"inferdbench{secrets.token_hex(3)}"
    info = {"socket": os.path.join(workdir, "d.sock"), "prefix": prefix, "workdir": workdir,
            "cache_path": os.path.join(workdir, "results.cache"), "args": list(args)}
    memory = [] if any(a.startswith("cache.") for a in args) else [
        "--set", "cache.enabled=false", "--set", "embeddings.enabled=false"]
    proc = None
    try:
        proc = DaemonProcess.start([*args, "--set", f'ring.shm_prefix="{prefix}"',
                                    "--set", f'cache.path="{info["cache_path"]}"', *memory],
                                   socket_path=info["socket"], workdir=workdir, env=env)
        info["proc"] = proc
        yield info
    finally:
        try:
            if proc is not None:
                try:
                    info["exit_code"] = proc.stop(timeout=30.0)
                finally:
                    proc.kill()
                info["log"] = proc.log()
                info["log_problems"] = [ln for ln in info["log"].splitlines()
                                        if " ERROR " in ln or ln.startswith("Traceback")]
                if keep_log:
                    os.makedirs(os.path.dirname(keep_log) or ".", exist_ok=True)
                    with open(keep_log, "w") as fh:
                        fh.write(info["log"])
        finally:
            info["shm_leftovers"] = shm_leftovers(prefix)
            shutil.rmtree(workdir, ignore_errors=True)


def sigterm_as_exit() -> None:
    """Turn SIGTERM into SystemExit so every ``finally`` (daemons, children) still runs."""
    def handler(signum, frame):
        """Raise SystemExit so the stack unwinds through every finally."""
        print(f"bench: signal {signum}: stopping the daemons and child processes", file=sys.stderr,
              flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); imported only when drawing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, plt, path: str) -> str:
    """Write ``fig`` to ``path`` (creating its folder), close it, return ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def parser(doc: str, results_name: str, quick: str):
    """The options every benchmark shares: --quick, --out, --img-dir, --replot."""
    import argparse

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"short runs ({quick}): a smoke test")
    p.add_argument("--out", default=os.path.join(repo, "bench", "out"), help=f"where {results_name} goes")
    p.add_argument("--img-dir", default=None,
                   help="where the PNG plots go (default: docs/img; with --quick: the --out folder)")
    p.add_argument("--replot", metavar=results_name.upper().replace(".", "_"),
                   help=f"measure nothing: reprint the report and redraw the plots from a {results_name}")
    return p


def replot(results_path: str, img_dir: str | None, out: str, render, draw) -> int:
    """``--replot FILE``: print the report of a saved results JSON and redraw its figures (into
    ``img_dir``, else docs/img, or ``out`` for a quick run's results); measures nothing."""
    import json

    with open(results_path) as fh:
        results = json.load(fh)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    img_dir = img_dir or (out if results.get("quick") else os.path.join(repo, "docs", "img"))
    print(render(results))
    print(f"\nredrew {', '.join(draw(results, img_dir))}")
    return 0


def settings_main(argv, doc: str, results_name: str, quick: str, settings: dict, measure, render,
                  extra=None) -> int:
    """``main`` of a benchmark whose runs are set by a ``{"full": ..., "quick": ...}`` table
    (bench/metrics.py, bench/isolation.py): parse the shared options, ``--replot`` or
    ``measure(settings, log)`` (plus ``extra()``, merged in), stamp the results (settings, command,
    wall time, date, load), write them to ``--out``/``results_name`` and print the report."""
    import datetime
    import json

    args = parser(doc, results_name, quick).parse_args(argv)
    sigterm_as_exit()
    if args.replot:
        return replot(args.replot, args.img_dir, args.out, render, lambda results, img_dir: [])
    settings = settings["quick" if args.quick else "full"]
    t0 = time.monotonic()
    results = measure(settings, lambda msg: print(msg, flush=True))
    results.update(extra() if extra else {})
    results.update(settings=settings, quick=args.quick, command=sys.argv, wall_s=time.monotonic() - t0,
                   date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   loadavg=os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, results_name)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=2)
    print(render(results))
    print(f"\nwrote {path}")
    return 0
