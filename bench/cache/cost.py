"""What the result cache costs when it cannot help: ``python -m bench.cache.cost [--quick]``.

16 closed-loop client processes (one frame in flight each) send unique frames only, to a daemon
with the result cache on and to one with it off (resnet18 @ 64x64, cpu:2), alternating on/off and
off/on over the rounds so that a drift of the shared machine's load falls on both sides. With
unique frames the cache answers nothing; what it costs is the daemon's private copy and hash of
every frame at admission, the lookup, and the clients' own hash and lookup before each round
trip. Target: img/s with the cache on at least 0.97 of off (a cache that cannot help must cost
almost nothing, or turning it on by default would be a loss). Beside it, the CPU the
daemon's event loop spends per computed frame, on and off: on a shared machine the throughput of
one window moves by more than 3 % with other processes' load, the loop's CPU per frame hardly.

Nothing is asserted; prints the rows and the ratio of the means, writes ``OUT/cache_cost.json``.
See docs/benchmarks.md, section "Result cache and embeddings".
"""
from __future__ import annotations

import json
import os
import sys

from ..lib import procs, report
from ..lib.daemons import cache_daemon
from .load import MODEL_ARGS, run_case

SIZES = {"full": {"clients": 16, "rounds": 4, "warmup_s": 2.5, "seconds": 6.0},
         "quick": {"clients": 16, "rounds": 2, "warmup_s": 2.0, "seconds": 3.0}}
TARGET = 0.97


def measure(clients: int, rounds: int, warmup_s: float, seconds: float, log=print) -> dict:
    """``rounds`` pairs of windows, cache on and off (order alternating); img/s of each and the
    ratio of the means, on / off."""
    from inferd.client import Client

    rows, run = [], 500
    for r in range(rounds):
        for cache in ((True, False) if r % 2 == 0 else (False, True)):
            run += 1
            with cache_daemon(MODEL_ARGS, cache=cache) as d:
                with Client(d["socket"], cache=False) as probe, _LoopSampler(d["proc"].pid, probe) as loop:
                    row = run_case(d, probe, clients, 0.0, run, warmup_s, seconds)
            row["round"] = r + 1
            row["loop_us_per_frame"] = loop.us_per_frame(seconds)
            rows.append(row)
            log(f"  round {r + 1}, cache {'on ' if cache else 'off'}: {row['img_s']:7.1f} img/s, daemon "
                f"{row['daemon_cpu_cores']:.2f} cores, clients {row['clients_cpu_cores']:.2f}, other "
                f"{row['other_cpu_cores']:.2f}; event loop {row['loop_us_per_frame']:.1f} us CPU per frame")
    on = [x["img_s"] for x in rows if x["cache"]]
    off = [x["img_s"] for x in rows if not x["cache"]]
    ratio = (sum(on) / len(on)) / (sum(off) / len(off))
    loop = {k: sum(x["loop_us_per_frame"] for x in rows if x["cache"] == v) / rounds
            for k, v in (("on", True), ("off", False))}
    return {"clients": clients, "rounds": rounds, "seconds": seconds, "rows": rows,
            "on_img_s": on, "off_img_s": off, "ratio": ratio, "target": TARGET, "met": ratio >= TARGET,
            "loop_us_per_frame": loop}


class _LoopSampler:
    """Samples the event loop's CPU and the frames computed every half second while a case runs,
    so that the loop's CPU per frame is taken over the measured window (the last ``seconds``), not
    over the warm-up, where a fresh daemon's optimistic hit rate still hashes and inserts every
    miss."""

    def __init__(self, pid: int, probe):
        import threading

        self._pid, self._probe, self.samples = pid, probe, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_LoopSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import time

        while not self._stop.wait(0.5):
            self.samples.append((time.monotonic(), _loop_cpu(self._pid),
                                 self._probe.info()["counters"].get("frames", 0)))

    def us_per_frame(self, seconds: float) -> float:
        """Loop CPU per computed frame between the last sample and the one ``seconds`` before it."""
        last = self.samples[-1]
        first = min(self.samples, key=lambda s: abs(s[0] - (last[0] - seconds)))
        return 1e6 * (last[1] - first[1]) / max(last[2] - first[2], 1)


def _loop_cpu(pid: int) -> float:
    """CPU seconds of the daemon's main thread (its event loop): what admission, the cache's
    copy, hash and lookup, and replies cost, apart from the batching threads."""
    with open(f"/proc/{pid}/task/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> int:
    args = report.parser(__doc__, "cache_cost.json", "about 2 minutes").parse_args(argv)
    procs.sigterm_as_exit()
    s = SIZES["quick" if args.quick else "full"]
    print(f"{s['clients']} clients, unique frames, {s['rounds']} rounds of cache on / off ...", flush=True)
    out = measure(s["clients"], s["rounds"], s["warmup_s"], s["seconds"], lambda m: print(m, flush=True))
    out.update(quick=args.quick, command=report.command())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cache_cost.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"img/s cache on / off = {sum(out['on_img_s']) / len(out['on_img_s']):.1f} / "
          f"{sum(out['off_img_s']) / len(out['off_img_s']):.1f} = {out['ratio']:.3f} "
          f"(target >= {TARGET}: {'met' if out['met'] else 'MISS'}); event loop CPU per frame "
          f"{out['loop_us_per_frame']['on']:.1f} us on, {out['loop_us_per_frame']['off']:.1f} us off; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
