"""The fleet benchmark's workload and client processes (bench/fleet/run.py).

A workload is a sequence of uploads spread over two hosts (daemons): each request is, with
probability ``repeat``, the second upload of a frame uploaded once before (chosen uniformly among
those not yet repeated), else a new frame, sent to either host at random. Each frame is uploaded at
most twice, so two daemons emulate a larger fleet faithfully: with many repeats of one frame, its
third upload would find it on the daemon playing "any other host", where in a fleet of 20 it would
most likely land on an 18th host that never saw it. A repeat goes back to the host that first computed its frame
with probability ``1 / fleet``, else to the other daemon: ``fleet = 2`` is two hosts behind a
random load balancer; ``fleet = 20`` stands for a fleet of 20, where a repeat lands on another host
19 times in 20 (the case a fleet cache is for), with two daemons playing the computing host and
"any other host". Frames are random 64x64 RGB, made from their id, so every process builds them
alike and no frame is sent through a queue.

Each host's requests are dealt round robin to its client processes, which keep ``depth`` frames in
flight (``classify_many``), time every call, and count errors instead of stopping: a failed request
is a finding (bench/fleet/run.py's outage part must see none).
"""
from __future__ import annotations

import time
import traceback

import numpy as np

from ..lib.measure import sleep_until
from ..lib.procs import RESULT_GRACE_S, children, report_ready

SIZE = 64


def frame(seed: int, fid: int) -> np.ndarray:
    return np.random.default_rng((seed, fid)).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def schedule(seed: int, total: int, repeat: float, fleet: int) -> tuple[list, dict]:
    """([frame ids for host 0], [for host 1]) and counts (new, repeats, repeats back home)."""
    rng = np.random.default_rng(seed)
    hosts: list = [[], []]
    home: list = []                         # fid -> host that got it first
    once: list = []                         # fids uploaded once (not yet repeated)
    counts = {"new": 0, "repeats": 0, "home": 0}
    for _ in range(total):
        if once and rng.random() < repeat:
            i = int(rng.integers(len(once)))
            fid = once[i]
            once[i] = once[-1]
            once.pop()
            back = rng.random() < 1.0 / fleet
            host = home[fid] if back else 1 - home[fid]
            counts["repeats"] += 1
            counts["home"] += int(back)
        else:
            fid, host = len(home), int(rng.integers(2))
            home.append(host)
            once.append(fid)
            counts["new"] += 1
        hosts[host].append(fid)
    return hosts, counts


def _client(q, index: int, socket_path: str, seed: int, fids: list, depth: int, start, go, stop) -> None:
    """Send ``fids`` in chunks of ``depth`` after the shared start; report (start time, seconds,
    frames, failed) per chunk and the end time."""
    try:
        from inferd.client import Client

        chunks = [fids[i:i + depth] for i in range(0, len(fids), depth)]
        with Client(socket_path) as client:
            client.ping()
            report_ready(q, index, go)
            sleep_until(start.value)
            rows, errors = [], []
            for chunk in chunks:
                imgs = [frame(seed, fid) for fid in chunk]
                t0 = time.monotonic()
                failed = 0
                try:
                    client.classify_many(imgs, top_k=1)
                except Exception as exc:  # a failed request is the finding; keep going, count it
                    failed = len(chunk)
                    if len(errors) < 3:
                        errors.append(repr(exc)[:300])
                rows.append((t0, time.monotonic() - t0, len(chunk), failed))
            q.put(("ok", ("done", index, {"rows": rows, "end": time.monotonic(),
                                          "client_hits": client.cache_hits, "errors": errors})))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def run(sockets: list, hosts: list, seed: int, clients_per_host: int, depth: int,
        during=None) -> dict:
    """Run one workload (``hosts[i]`` to ``sockets[i]``) to the end; ``during(start)`` runs in the
    parent meanwhile (the outage part stops Redis there). Returns rows, wall time, img/s."""
    specs = [(_client, (sock, seed, hosts[h][c::clients_per_host], depth))
             for h, sock in enumerate(sockets) for c in range(clients_per_host)]
    with children(specs, lead_s=0.2, name="fleet-client", grace=5.0) as group:
        if during is not None:
            during(group.start)
        results = [r[0] for r in group.collect(RESULT_GRACE_S + 300)]
    rows = [row for r in results for row in r["rows"]]
    wall = max(r["end"] for r in results) - group.start
    frames = sum(row[2] for row in rows)
    return {"rows": rows, "wall_s": wall, "img_s": frames / wall, "frames": frames,
            "failed": sum(row[3] for row in rows), "client_hits": sum(r["client_hits"] for r in results),
            "errors": [e for r in results for e in r["errors"]][:5],
            "start": group.start}
