"""What collecting statistics costs: ``python -m bench.load.metrics_cost [--quick] [--out bench/out]``.

Target (statistics stay on in production only if they are nearly free): throughput with metrics on within 2 % of metrics off. Two daemons serve the
built-in ``shapes`` model (64x64, batches up to 32, the cache off so every frame is computed):

- **off**: ``metrics.enabled = false`` and no HTTP listener (counters only, as always);
- **on**: ``metrics.enabled = true`` (every request timed into the latency and batch-size
  histograms) and ``metrics.listen = 127.0.0.1:0``, scraped once a second by this process for the
  whole round, the way a Prometheus server would.

Both run for the whole benchmark, and rounds alternate off, on, off, on ... against them (3 pairs;
``--quick``: 2 shorter pairs), each the same closed loop of 8 client processes with 4 frames in
flight each (bench/load/daemon_load.py ``run_case``). Alternating, rather than one long run each,
spreads the drift of a shared machine over both sides. The figure is mean img/s on / mean img/s
off, with each pair's own ratio beside it to show the noise. On a shared 2-core machine that noise
(several %) is larger than the effect, so the report adds the costs timed in-process (``micro``):
the histograms per request, a snapshot and its text per scrape, as a share of one core at the
measured throughput. Writes ``OUT/metrics.json``.
"""
from __future__ import annotations

import re
import sys
import threading
import time
import urllib.request

from ..lib import daemons, report
from . import daemon_load

SETTINGS = {"full": {"pairs": 3, "warmup_s": 1.5, "seconds": 12.0},
            "quick": {"pairs": 2, "warmup_s": 1.0, "seconds": 5.0}}
CLIENTS, DEPTH = 8, 4
BASE_ARGS = ["--model", "shapes", "--device", "cpu:2", "--set", "batching.max_batch=32",
             "--set", "batching.max_delay_ms=2.0"]
SIDES = {"off": ["--set", "metrics.enabled=false"],
         "on": ["--set", "metrics.enabled=true", "--set", 'metrics.listen="127.0.0.1:0"',
                "--set", "metrics.allow_anonymous=true"]}
TARGET = 0.98


class Scraper(threading.Thread):
    """GET /metrics once a second while ``active`` is set; keeps each scrape's duration and size."""

    def __init__(self, url: str):
        super().__init__(name="bench-scraper", daemon=True)
        self.url = url
        self.active = threading.Event()
        self.stopped = threading.Event()
        self.seconds: list[float] = []
        self.sizes: list[int] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stopped.is_set():
            if not self.active.wait(timeout=0.2):
                continue
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    self.sizes.append(len(resp.read()))
                self.seconds.append(time.perf_counter() - t0)
            except OSError as exc:                   # reported, not fatal: the figure would be wrong
                self.errors.append(repr(exc))
            self.stopped.wait(max(0.0, 1.0 - (time.perf_counter() - t0)))


def _listen_port(proc) -> int:
    """The port the daemon's metrics listener bound: logged before READY=1, so already there."""
    found = re.search(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", proc.log())
    if not found:
        raise RuntimeError(f"the daemon with metrics.listen logged no port:\n{proc.log()}")
    return int(found.group(1))


def measure(s: dict, log) -> dict:
    """Both daemons up, rounds alternating off / on; returns the rows and the ratio."""
    from inferd.client import Client

    rounds = []
    with daemons.daemon(BASE_ARGS + SIDES["off"]) as off, daemons.daemon(BASE_ARGS + SIDES["on"]) as on:
        scraper = Scraper(f"http://127.0.0.1:{_listen_port(on['proc'])}/metrics")
        scraper.start()
        try:
            with Client(off["socket"]) as probe_off, Client(on["socket"]) as probe_on:
                for pair in range(s["pairs"]):
                    for side, d, probe in (("off", off, probe_off), ("on", on, probe_on)):
                        if side == "on":
                            scraper.active.set()
                        try:
                            row = daemon_load.run_case(d["socket"], d["proc"].pid, probe, CLIENTS, DEPTH,
                                                       s["warmup_s"], s["seconds"], 0.0)
                        finally:
                            scraper.active.clear()
                        row.update(side=side, pair=pair)
                        rounds.append(row)
                        log(f"  pair {pair + 1} {side:3s}: {row['img_s']:8.1f} img/s, p50 "
                            f"{row['latency']['p50_ms']:.2f} ms, mean batch {row.get('mean_batch', 0):.1f}")
        finally:
            scraper.stopped.set()
            scraper.join(timeout=10)
    mean = {side: sum(r["img_s"] for r in rounds if r["side"] == side) / s["pairs"] for side in SIDES}
    pairs = [next(r for r in rounds if r["pair"] == p and r["side"] == "on")["img_s"]
             / next(r for r in rounds if r["pair"] == p and r["side"] == "off")["img_s"]
             for p in range(s["pairs"])]
    return {"rounds": rounds, "img_s": mean, "ratio": mean["on"] / mean["off"], "pair_ratios": pairs,
            "scrapes": len(scraper.seconds), "scrape_errors": scraper.errors,
            "scrape_ms_mean": 1000 * sum(scraper.seconds) / max(len(scraper.seconds), 1),
            "scrape_bytes": max(scraper.sizes, default=0),
            "exit_codes": [off.get("exit_code"), on.get("exit_code")],
            "log_problems": off.get("log_problems", []) + on.get("log_problems", [])}


def micro(batches: int = 3000, size: int = 16) -> dict:
    """What the throughput rounds cannot resolve on a noisy machine, timed in-process: the event
    loop's cost per request of the histograms (Stats.batch with metrics.enabled true minus false,
    batches of ``size``), and per scrape of a snapshot (on the loop) and its text (off it)."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from inferd.daemon.config import Config
    from inferd.daemon.ops.metrics import SnapshotCollector
    from inferd.daemon.ops.stats import Stats

    class Device:                                      # what Stats reads of a device (hashable)
        state, index, name, label, queue, outstanding = "healthy", 0, "cpu", "cpu#0", (), 0
        profile = SimpleNamespace(snapshot=dict)

    dev = Device()
    requests = [SimpleNamespace(arrived=0.0, deadline=1e9) for _ in range(size)]
    per_request = {}
    for timing in (False, True, False, True):          # twice each, the better of two
        cfg = Config()
        cfg.metrics.enabled = timing
        stats = Stats(cfg, [dev], clock=lambda: 0.0)
        result = SimpleNamespace(device=dev, started=0.0, finished=0.0, canary=False, done=requests,
                                 failed=())
        t0 = time.perf_counter()
        for i in range(batches):
            result.started = i * 0.004
            result.finished = result.started + 0.003
            stats.batch(result, requests, result.finished + 0.0002)
        cost = (time.perf_counter() - t0) / (batches * size)
        per_request[timing] = min(per_request.get(timing, cost), cost)
    cache = {k: 0 for k in ("daemon_hits", "client_hits", "misses", "inserts", "inserts_skipped",
                            "evictions", "hit_rate")}
    t0 = time.perf_counter()
    for _ in range(100):
        snap = stats.snapshot()
    snapshot_s = (time.perf_counter() - t0) / 100
    snap.update(model={"name": "shapes", "digest": "0" * 32, "gen": 1}, pid=1, policy="weighted",
                in_flight=0, sessions={"open": 8, "opened": 8}, cache={"enabled": False, **cache})
    t0 = time.perf_counter()
    for _ in range(100):
        text = generate_latest(SnapshotCollector(lambda: snap))
    return {"histogram_us_per_request": 1e6 * (per_request[True] - per_request[False]),
            "stats_us_per_request_off": 1e6 * per_request[False],
            "snapshot_us": 1e6 * snapshot_s, "render_us": 1e6 * (time.perf_counter() - t0) / 100,
            "text_bytes": len(text)}


def render(results: dict) -> str:
    r = results
    lines = [f"metrics on vs off: shapes 64x64 on cpu:2, {CLIENTS} clients x {DEPTH} in flight, "
             f"{r['settings']['pairs']} pairs of {r['settings']['seconds']:.0f} s rounds",
             f"  off {r['img_s']['off']:.1f} img/s, on {r['img_s']['on']:.1f} img/s: ratio on/off "
             f"{r['ratio']:.3f} (pairs: {', '.join(f'{x:.3f}' for x in r['pair_ratios'])})",
             f"  {r['scrapes']} scrapes of {r['scrape_bytes']} bytes, {r['scrape_ms_mean']:.1f} ms each"
             + (f", {len(r['scrape_errors'])} failed" if r["scrape_errors"] else ""),
             f"  target: on/off >= {TARGET}: {'MET' if r['ratio'] >= TARGET else 'MISS'}"]
    m = r.get("micro")
    if m:
        # what the histograms and one scrape a second take, as a share of one core at the
        # throughput measured with them on
        share = (m["histogram_us_per_request"] * r["img_s"]["on"] + m["snapshot_us"] + m["render_us"]) / 1e6
        lines += [f"  in-process: histograms {m['histogram_us_per_request']:.3f} us per request (counters "
                  f"alone {m['stats_us_per_request_off']:.3f} us); a scrape {m['snapshot_us']:.0f} us on "
                  f"the loop + {m['render_us']:.0f} us of text",
                  f"  so at {r['img_s']['on']:.0f} img/s with a scrape a second: {100 * share:.3f} % of one "
                  f"core (target 2 %: {'MET' if share <= 0.02 else 'MISS'})"]
    if r["log_problems"]:
        lines.append(f"  daemon log problems: {r['log_problems'][:3]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return report.settings_main(argv, __doc__, "metrics.json", "2 pairs of 5 s rounds, about 40 s", SETTINGS,
                                measure, render, extra=lambda: {"micro": micro()})


if __name__ == "__main__":
    sys.exit(main())
