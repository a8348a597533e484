"""The fleet cache (hosts sharing results on Redis): ``python -m bench.fleet [--quick] [--out bench/out]``.

One redis-server on a loopback TCP port (started and stopped here; Debian's package), four daemons
serving the built-in ``resnet18`` (64x64, one CPU thread each, batches up to 32, their own local
caches: compute dominates, as on the GPU hosts a fleet runs): A and B share the fleet cache, C and D have none. Three parts:

1. **hit**: A computes N frames (written to Redis); then, one request at a time with the client's
   own cache off, A answers them again from its local cache (the baseline) and B answers them from
   L2. Reported: B's daemon-side wait for a hit (admission to the L2 verdict, its histogram's p50),
   and the client round trips of both (their difference is what L2 adds over a local hit).
2. **throughput**: the same 30%-repeat workload (bench/fleet/load.py) on C+D (no L2) and on A+B
   (L2), alternating, fresh frames each round; img/s over the whole workload, ratio L2 / no L2. Run
   for ``fleet = 20`` (a repeat lands on another host 19 times in 20, as in a fleet of 20) and
   ``fleet = 2`` (two hosts behind a random balancer: half the repeats go home anyway).
3. **outage**: the workload (twice as long) on A+B while Redis is SIGKILLed a third of the way: failed requests (target 0)
   and the p99 of client calls before and after, against C+D's p99 of part 2 (target: grows by at
   most the L2 budget over no L2).

Also Redis memory per entry (INFO used_memory over DBSIZE). Writes ``OUT/fleet.json``.
``FLEET_BUDGET_MS=10`` runs A and B with another ``l2.budget_ms`` than the default 2.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

from ..lib import daemons, report
from ..lib.measure import latency_stats
from . import load as fleet_load

SETTINGS = {"full": {"hit_frames": 300, "total": 2400, "pairs": 2, "clients": 3, "depth": 4},
            "quick": {"hit_frames": 100, "total": 1000, "pairs": 1, "clients": 2, "depth": 4}}
REPEAT = 0.3
BUDGET_MS = float(os.environ.get("FLEET_BUDGET_MS", "2.0"))     # l2.budget_ms of A and B
BASE = ["--model", "resnet18", "--device", "cpu:1", "--set", "batching.max_batch=32",
        "--set", "cache.enabled=true", "--set", "embeddings.enabled=false",
        "--set", "server.max_sessions_per_uid=64",
        # a loaded shared machine stalls a batch past the default 1 s watchdog now and then: a
        # device taken out of rotation would fail requests that have nothing to do with L2
        "--set", "health.watchdog_floor_s=30"]
TARGETS = {"hit_p50_ms": 0.5, "ratio": 1.3}


@contextlib.contextmanager
def redis_server():
    """redis-server on a free loopback port in a directory of its own; SIGKILLed at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("python -m bench.fleet needs redis-server: apt-get install redis-server")
    workdir = daemons.short_workdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    info = {"proc": proc, "url": f"redis://127.0.0.1:{port}/0", "port": port}
    try:
        import redis

        client = redis.Redis(port=port, socket_timeout=2)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        info["client"] = client
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def fleet_key(workdir: str) -> str:
    path = os.path.join(workdir, "fleet.key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(32))
    return path


def l2_stats(d) -> dict:
    from inferd.client import AdminClient

    with AdminClient(os.path.join(d["workdir"], "admin.sock")) as admin:
        return admin.call("stats")["cache"]["l2"]


def frames_computed(d) -> int:
    from inferd.client import AdminClient

    with AdminClient(os.path.join(d["workdir"], "admin.sock")) as admin:
        return sum(dev["frames"] for dev in admin.call("stats")["devices"])


def _round_trips(socket_path: str, imgs: list) -> list[float]:
    from inferd.client import Client

    with Client(socket_path, cache=False) as c:
        out = []
        for img in imgs:
            t0 = time.perf_counter()
            c.classify(img, top_k=1)
            out.append(time.perf_counter() - t0)
        return out


def part_hit(a, b, n: int, log) -> dict:
    imgs = [fleet_load.frame(7, i) for i in range(n)]
    _round_trips(a["socket"], imgs)                               # computed by A, written behind
    deadline = time.monotonic() + 30
    while l2_stats(a)["writes"] < n and time.monotonic() < deadline:
        time.sleep(0.05)
    local = latency_stats(_round_trips(a["socket"], imgs))     # A's local cache
    before = l2_stats(b)
    fleet = latency_stats(_round_trips(b["socket"], imgs))     # B: from L2
    after = l2_stats(b)
    row = {"local_hit_rtt": local, "l2_hit_rtt": fleet, "hits": after["hits"] - before["hits"],
           "daemon_wait_hit": after["wait_hit"], "added_p50_ms": fleet["p50_ms"] - local["p50_ms"]}
    log(f"  hit: daemon-side wait p50 {after['wait_hit']['p50_ms']:.3f} ms; client round trip p50 "
        f"{fleet['p50_ms']:.3f} ms (L2) vs {local['p50_ms']:.3f} ms (local daemon hit); "
        f"{row['hits']}/{n} hits")
    return row


def part_throughput(on: list, off: list, s: dict, fleet: int, seed0: int, log) -> dict:
    rounds = []
    for pair in range(s["pairs"]):
        for side, pair_daemons in (("off", off), ("on", on)):
            seed = seed0 + 10 * pair + (side == "on")
            hosts, counts = fleet_load.schedule(seed, s["total"], REPEAT, fleet)
            before = [l2_stats(d) for d in on] if side == "on" else None
            computed0 = sum(frames_computed(d) for d in pair_daemons)
            r = fleet_load.run([d["socket"] for d in pair_daemons], hosts, seed, s["clients"], s["depth"])
            computed = sum(frames_computed(d) for d in pair_daemons) - computed0
            l2 = {k: sum(x[k] - y[k] for x, y in zip([l2_stats(d) for d in on], before))
                  for k in ("hits", "misses", "errors", "timeouts", "loop_late", "skipped", "breaker_opened")} \
                if side == "on" else None
            p99 = latency_stats([row[1] for row in r["rows"]])["p99_ms"]
            rounds.append({"side": side, "pair": pair, "img_s": r["img_s"], "failed": r["failed"],
                           "client_hits": r["client_hits"], "p99_ms": p99, "counts": counts, "l2": l2,
                           "computed": computed,
                           "errors": r["errors"]})
            log(f"  fleet={fleet} pair {pair + 1} {side:3s}: {r['img_s']:7.1f} img/s, call p99 {p99:.1f} ms, "
                f"{computed} computed, {r['client_hits']} answered in the client, {r['failed']} failed {r['errors'][:1]}"
                + (f"; L2 {l2}" if l2 else ""))
    mean = {side: sum(r["img_s"] for r in rounds if r["side"] == side) / s["pairs"] for side in ("off", "on")}
    computed = {side: sum(r["computed"] for r in rounds if r["side"] == side) for side in ("off", "on")}
    # a device-bound host's throughput goes as 1 / (frames computed per request): counted, not timed
    return {"fleet": fleet, "rounds": rounds, "img_s": mean, "ratio": mean["on"] / mean["off"],
            "computed": computed, "work_ratio": computed["off"] / max(computed["on"], 1),
            "p99_off_ms": max(r["p99_ms"] for r in rounds if r["side"] == "off")}


def wait_quantiles(before: list, after: list) -> dict:
    """p50 / p99 (ms) of the L2 waits of misses between two readings of each daemon's stats: what
    L2 added to the requests it did not answer (read off the histogram's buckets)."""
    from inferd.daemon.ops.stats import LATENCY_BOUNDS, quantile

    index = {b: i for i, b in enumerate((*LATENCY_BOUNDS, None))}
    counts = [0] * (len(LATENCY_BOUNDS) + 1)
    for x, y in zip(after, before):
        for sign, stats in ((1, x), (-1, y)):
            for bound, n in stats["wait_miss"]["buckets"]:
                counts[index[bound]] += sign * n
    q = {f"p{round(p * 100)}_ms": quantile(LATENCY_BOUNDS, counts, p) for p in (0.5, 0.99, 1.0)}
    return {k: (None if v is None else v * 1000) for k, v in q.items()} | {"n": sum(counts)}


def part_outage(on: list, redis, s: dict, seed: int, log) -> dict:
    total = 2 * s["total"]
    hosts, _ = fleet_load.schedule(seed, total, REPEAT, 20)
    stop_at = {}
    computed0 = sum(frames_computed(d) for d in on)

    def kill(start: float) -> None:
        # a third of the way: about 0.8 frames computed per request (bench/fleet/load.py)
        while sum(frames_computed(d) for d in on) - computed0 < 0.8 * total / 3:
            time.sleep(0.05)
        stop_at["stats"] = [l2_stats(d) for d in on]
        stop_at["t"] = time.monotonic()
        redis["proc"].send_signal(signal.SIGKILL)

    before = [l2_stats(d) for d in on]
    r = fleet_load.run([d["socket"] for d in on], hosts, seed, s["clients"], s["depth"], during=kill)
    after = [l2_stats(d) for d in on]
    t = stop_at["t"]
    up = latency_stats([row[1] for row in r["rows"] if row[0] + row[1] < t])
    down = latency_stats([row[1] for row in r["rows"] if row[0] >= t])
    delta = {k: sum(x[k] - y[k] for x, y in zip(after, before)) for k in ("errors", "timeouts", "skipped")}
    down_wait = wait_quantiles(stop_at["stats"], after)
    row = {"failed": r["failed"], "errors": r["errors"], "frames": r["frames"], "down_wait": down_wait, "p99_up_ms": up["p99_ms"], "p99_down_ms": down["p99_ms"],
           "p50_up_ms": up["p50_ms"], "p50_down_ms": down["p50_ms"], "img_s": r["img_s"], **delta,
           "breaker_opened": sum(x["breaker_opened"] for x in after), "wait_miss": after[0]["wait_miss"]}
    log(f"  outage: {r['failed']} of {r['frames']} failed; call p99 {up['p99_ms']:.1f} ms before the kill, "
        f"{down['p99_ms']:.1f} ms after; L2 errors {delta['errors']}, timeouts {delta['timeouts']}, "
        f"skipped (breaker open) {delta['skipped']}")
    return row


def measure(s: dict, log) -> dict:
    workdir = daemons.short_workdir()
    key = fleet_key(workdir)
    results = {"budget_ms": BUDGET_MS}
    try:
        with redis_server() as redis:
            l2 = ["--set", "l2.enabled=true", "--set", f'l2.url="{redis["url"]}"',
                  "--set", f'l2.key_file="{key}"', "--set", f"l2.budget_ms={BUDGET_MS}"]
            with daemons.daemon(BASE + l2) as a, daemons.daemon(BASE + l2) as b, \
                    daemons.daemon(BASE) as c, daemons.daemon(BASE) as d:
                used0 = redis["client"].info("memory")["used_memory"]
                results["hit"] = part_hit(a, b, s["hit_frames"], log)
                results["throughput"] = [part_throughput([a, b], [c, d], s, fleet, 100 * fleet, log)
                                         for fleet in (20, 2)]
                entries = redis["client"].dbsize()
                results["redis"] = {"entries": entries, "bytes_per_entry":
                                    (redis["client"].info("memory")["used_memory"] - used0) / max(entries, 1)}
                results["miss_wait"] = l2_stats(a)["wait_miss"]
                results["outage"] = part_outage([a, b], redis, s, 9999, log)
            results["log_problems"] = [p for x in (a, b, c, d) for p in x.get("log_problems", [])
                                       if "fleet cache" not in p]
            results["exit_codes"] = [x.get("exit_code") for x in (a, b, c, d)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def render(results: dict) -> str:
    r, h = results, results["hit"]
    wait = h["daemon_wait_hit"]["p50_ms"]
    lines = [f"fleet cache: resnet18 64x64, 4 daemons on cpu:1, Redis on loopback TCP, budget {BUDGET_MS} ms",
             f"  hit: daemon-side p50 {wait:.3f} ms (target <= {TARGETS['hit_p50_ms']}: "
             f"{'MET' if wait <= TARGETS['hit_p50_ms'] else 'MISS'}); client round trip p50 "
             f"{h['l2_hit_rtt']['p50_ms']:.3f} ms from L2, {h['local_hit_rtt']['p50_ms']:.3f} ms from the "
             f"local cache (L2 adds {h['added_p50_ms']:.3f} ms)"]
    for t in r["throughput"]:
        pairs = [next(x for x in t["rounds"] if x["pair"] == p and x["side"] == "on")["img_s"] /
                 next(x for x in t["rounds"] if x["pair"] == p and x["side"] == "off")["img_s"]
                 for p in range(r["settings"]["pairs"])]
        lines.append(f"  30% repeats, fleet={t['fleet']}: {t['img_s']['off']:.0f} img/s without L2, "
                     f"{t['img_s']['on']:.0f} with: ratio {t['ratio']:.2f} (pairs {', '.join(f'{x:.2f}' for x in pairs)})"
                     + (f" (target >= {TARGETS['ratio']}: {'MET' if t['ratio'] >= TARGETS['ratio'] else 'MISS'})"
                        if t["fleet"] == 20 else ""))
        lines.append(f"    frames computed: {t['computed']['off']} without L2, {t['computed']['on']} with: "
                     f"{t['work_ratio']:.2f}x less device work per request")
    o = r["outage"]
    p99_off = r["throughput"][0]["p99_off_ms"]
    lines += [f"  outage: {o['failed']} of {o['frames']} requests failed (target 0: "
              f"{'MET' if o['failed'] == 0 else 'MISS'}); call p99 {o['p99_up_ms']:.1f} ms with Redis, "
              f"{o['p99_down_ms']:.1f} ms without, {p99_off:.1f} ms with no L2 at all (target: <= no L2 + "
              f"{BUDGET_MS} ms: {'MET' if o['p99_down_ms'] <= p99_off + BUDGET_MS else 'MISS'}); "
              f"breaker opened {o['breaker_opened']}x, L2 errors {o['errors']}, timeouts {o['timeouts']}",
              f"    what L2 added to a request with Redis gone: p99 {o['down_wait']['p99_ms']:.3f} ms of waiting, "
              f"over {o['down_wait']['n']} lookups, {o['skipped']} skipped by the open breaker (target <= "
              f"{BUDGET_MS} ms: {'MET' if (o['down_wait']['p99_ms'] or 0) <= BUDGET_MS else 'MISS'})",
              f"  miss: daemon-side wait p50 {r['miss_wait']['p50_ms']:.3f} ms, p99 {r['miss_wait']['p99_ms']:.3f} ms",
              f"  Redis: {r['redis']['entries']} entries, {r['redis']['bytes_per_entry']:.0f} bytes each "
              f"({r['redis']['bytes_per_entry'] * 1e6 / 2**20:.0f} MiB per million)"]
    if r.get("log_problems"):
        lines.append(f"  daemon log problems: {r['log_problems'][:3]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return report.settings_main(argv, __doc__, "fleet.json", "1 pair of 1500-request rounds, about 1 min",
                                SETTINGS, measure, render)

