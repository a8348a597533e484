"""Part (e), the daemon's CPU per frame at a steady moderate load, embeddings off against on.

``SENDERS`` client processes each send unique frames at a fixed pace (open loop: the next call is
due at its own time, whatever the last one took; a call that runs late is counted, and the next
one starts at once), ``RATE`` frames/s in all, of the built-in model the daemon serves by default
(``shapes``: about a millisecond a frame, so 200 frames/s is a moderate load on one core). The
parent reads the daemon's CPU time (/proc/PID/stat: user + system, every thread) and its frame
counter at the window's edges: CPU per frame = CPU seconds / frames answered.

Cases, each with its own daemon (cache off, one CPU device of one thread):

    off          embeddings.enabled = false
    on           embeddings on, the store holding ``ROWS`` (100,000) rows, filled before start
    on+near      as on, and one sender asks a near-duplicate search every ``NEAR_EVERY`` calls:
                 one matrix-vector product over every row, numpy's BLAS (NOTE [ thread pools ])
    on+near/b2   as on+near with threads.blas = 2, numpy's own default here: an idle OpenBLAS
                 worker that spins after each search (the soak's 0.3 -> 1.1 cores)

Target: "on" within 10% of "off" (a stored embedding per frame must not make every frame dearer).
"""
from __future__ import annotations

import os
import shutil
import struct
import time
import traceback

import numpy as np

from ..lib.daemons import daemon, short_workdir
from ..lib.measure import cpu_seconds, latency_stats, sleep_until
from ..lib.procs import RESULT_GRACE_S, children, report_ready

MODEL = "shapes"
RATE = 200.0
SENDERS = 4
ROWS = 100_000
START_LEAD_S = 0.2             # the shared start lies this far after the last sender connected
NEAR_EVERY = 25                # sender 0: 1 call in 25 is a search (2 searches/s at 200 frames/s)
CASES = (("off", False, 0, 1), ("on", True, 0, 1), ("on+near", True, NEAR_EVERY, 1),
         ("on+near/b2", True, NEAR_EVERY, 2))


def _sender(q, index: int, socket_path: str, rate: float, near_every: int, warmup_s: float,
            seconds: float, start, go, stop) -> None:
    """Client process body: paced calls on unique frames from ``start`` until the window ends."""
    try:
        from inferd.client import Client

        with Client(socket_path) as client:
            shape = tuple(client.model.input_shape)
            frame = np.random.default_rng(index).integers(0, 256, shape, dtype=np.uint8)
            client.classify(frame)
            report_ready(q, index, go)
            t_measure, period, n, lat = start.value + warmup_s, 1.0 / rate, 0, []
            due = start.value
            while due < t_measure + seconds:
                time.sleep(max(0.0, due - time.monotonic()))
                n += 1
                frame[0, 0, :3] = np.frombuffer((n * 64 + index).to_bytes(3, "little"), np.uint8)
                t0 = time.perf_counter()
                if near_every and n % near_every == 0:
                    client.near_duplicates(frame, k=5, min_similarity=0.0)
                else:
                    client.classify(frame)
                if time.monotonic() >= t_measure:
                    lat.append(time.perf_counter() - t0)
                due += period
        q.put(("ok", ("done", index, lat)))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def _fill(path: str, rows: int) -> int:
    """Fill the (stopped daemon's) store at ``path`` with ``rows`` random unit rows; its dim."""
    from inferd.daemon.caching.embedding_store import EmbeddingStore

    with open(path, "rb") as fh:
        dim = struct.unpack_from("<I", fh.read(16), 12)[0]
    store = EmbeddingStore.open(path, rows, dim)
    vectors = np.random.default_rng(5).standard_normal((rows, dim)).astype(np.float32)
    for n in range(rows):
        store.add((n + 1 << 8).to_bytes(32, "little"), vectors[n], uid=os.getuid())
    store.close()
    return dim


def _args(store: str, embeddings: bool, blas: int) -> list[str]:
    return ["--model", MODEL, "--device", "cpu:1", "--set", "cache.enabled=false",
            "--set", f"embeddings.enabled={'true' if embeddings else 'false'}",
            "--set", f'embeddings.path="{store}"', "--set", f"embeddings.capacity={ROWS}",
            "--set", f"threads.blas={blas}"]


def run_case(name: str, store: str, embeddings: bool, near_every: int, blas: int,
             warmup_s: float, seconds: float) -> dict:
    """One daemon, ``SENDERS`` paced senders over one window: CPU per frame and latency."""
    from inferd.client import Client

    with daemon(_args(store, embeddings, blas)) as d, Client(d["socket"]) as probe:
        pid = d["proc"].pid
        specs = [(_sender, (d["socket"], RATE / SENDERS, near_every if i == 0 else 0, warmup_s, seconds))
                 for i in range(SENDERS)]
        with children(specs, lead_s=START_LEAD_S, name="bench-sender") as group:
            sleep_until(group.start + warmup_s)
            f0, c0, t0 = probe.info()["counters"]["frames"], cpu_seconds(pid), time.monotonic()
            sleep_until(group.start + warmup_s + seconds)
            f1, c1, t1 = probe.info()["counters"]["frames"], cpu_seconds(pid), time.monotonic()
            done = group.collect(warmup_s + seconds + RESULT_GRACE_S)
        memory = probe.info()["cache"]
    frames, cpu = f1 - f0, c1 - c0
    return {"case": name, "embeddings": embeddings, "near_every": near_every, "blas": blas,
            "frames_s": frames / (t1 - t0), "cpu_cores": cpu / (t1 - t0),
            "cpu_us_per_frame": 1e6 * cpu / frames if frames else None,
            "latency": latency_stats(np.concatenate([np.asarray(x[0]) for x in done])),
            "memory": memory, "log_problems": d.get("log_problems", [])}


def measure(warmup_s: float, seconds: float, cases=CASES, log=print) -> dict:
    """Every case in order; the store is made by a first daemon, filled, then reused by each."""
    work = short_workdir()
    store = os.path.join(work, "embeddings.store")
    try:
        with daemon(_args(store, True, 1)):
            pass                                   # creates the empty store at its capacity
        t0 = time.monotonic()
        dim = _fill(store, ROWS)
        log(f"    store: {ROWS} rows of dim {dim} filled in {time.monotonic() - t0:.1f} s")
        rows = []
        for name, embeddings, near_every, blas in cases:
            rows.append(run_case(name, store, embeddings, near_every, blas, warmup_s, seconds))
            r = rows[-1]
            log(f"    {name:<11} {r['frames_s']:7.1f} frames/s  {r['cpu_cores']:.3f} cores  "
                f"{r['cpu_us_per_frame'] or 0:8.0f} us/frame  p50 {r['latency']['p50_ms']:.2f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    off = next(r for r in rows if r["case"] == "off")
    on = next((r for r in rows if r["case"] == "on"), None)
    ratio = on["cpu_us_per_frame"] / off["cpu_us_per_frame"] if on and off["cpu_us_per_frame"] else None
    return {"model": MODEL, "rate": RATE, "senders": SENDERS, "rows_stored": ROWS, "dim": dim,
            "near_every": NEAR_EVERY, "cases": rows, "ratio_on_off": ratio}
