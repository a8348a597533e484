"""Child processes of the benchmarks: spawned, reporting through one queue, always reaped.

A child reports ``("ok", value)`` or ``("error", traceback text)`` on its queue. Client processes
that measure one window together are started by ``children``: each connects, reports
``("ready", index)`` (``report_ready``) and waits for the parent's go; the parent then hands them
one shared start time (CLOCK_MONOTONIC is system-wide), so every client warms up until the same
moment and measures over the same window, while the parent reads the daemon's counters at the
window's edges. Every child is joined, terminated or killed on the way out, whatever happened.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import signal
import sys
import time

#: The multiprocessing context of every child: a fresh interpreter, nothing inherited from the parent
#: (no torch state, no open daemon sockets).
CTX = mp.get_context("spawn")
#: How long the parent waits for a child's result beyond the time the child should need.
RESULT_GRACE_S = 120.0


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


def report_ready(q, index: int, go, timeout: float = RESULT_GRACE_S) -> None:
    """Child side of ``children``: say this child is ready, then wait for the parent's go."""
    q.put(("ok", ("ready", index)))
    if not go.wait(timeout=timeout):
        raise RuntimeError("no start signal from the parent")


class Group:
    """Child processes started together against one shared start time; see ``children``."""

    def __init__(self, q, procs, start: float, stop):
        self.q, self.procs, self.start, self.stop = q, procs, start, stop

    def collect(self, timeout: float) -> list:
        """Every child's final report ``("done", index, *values)``, as ``values`` in index order."""
        done = collect_results(self.q, self.procs, len(self.procs), timeout)
        return [d[2:] for d in sorted(done, key=lambda d: d[1])]

    def finish(self, timeout: float) -> list:
        """Set ``stop`` (for children that run until told), then ``collect``."""
        self.stop.set()
        return self.collect(timeout)


@contextlib.contextmanager
def children(specs: list, *, lead_s: float = 0.3, name: str = "bench-client", grace: float = 20.0):
    """Start ``target(q, index, *args, start, go, stop)`` for each ``(target, args)`` in ``specs``,
    wait until every one reported ready (``report_ready``), give them one start time ``lead_s`` from
    now (``start.value``, monotonic), yield a Group. ``stop`` is an Event set by ``Group.finish`` and
    on the way out; every child is joined (``grace`` seconds in all) or killed on the way out."""
    q, go, start, stop = CTX.Queue(), CTX.Event(), CTX.Value("d", 0.0), CTX.Event()
    procs = [CTX.Process(target=t, args=(q, i, *a, start, go, stop), name=f"{name}-{i}", daemon=True)
             for i, (t, a) in enumerate(specs)]
    try:
        for p in procs:
            p.start()
        collect_results(q, procs, len(procs), RESULT_GRACE_S)
        start.value = time.monotonic() + lead_s
        go.set()
        yield Group(q, procs, start.value, stop)
    finally:
        go.set()
        stop.set()
        stop_processes(procs, grace=grace)


def counts_per_second(specs: list, seconds: float, *, name: str) -> float:
    """``children`` that each count what they did in one shared window of ``seconds`` from the start
    and report ``("done", index, count)``: the counts summed, per second."""
    with children(specs, lead_s=0.2, name=name) as group:
        counts = group.collect(seconds + RESULT_GRACE_S)
    return sum(c[0] for c in counts) / seconds


def sigterm_as_exit() -> None:
    """Turn SIGTERM into SystemExit so every ``finally`` (daemons, children) still runs."""
    def handler(signum, frame):
        """Raise SystemExit so the stack unwinds through every finally."""
        print(f"bench: signal {signum}: stopping the daemons and child processes", file=sys.stderr,
              flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
