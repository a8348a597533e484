"""Parts 1-3 of the cache benchmark: hit latency against the miss path, and throughput with the cache
on against off (30 % repeats, and unique images only).

Model: the built-in ``resnet18`` at 64x64 on ``--device cpu:2``, embeddings off in every daemon of
these parts, so "cache off" is a daemon that neither hashes nor looks up anything and the two
configurations differ by the result cache alone.

Frames: 64 random base frames (the same in every process, fixed seed); frame ``(run, client, j)`` is
base frame ``j % 64`` with its first 24 bytes overwritten by the three numbers. Making one costs a
12 KiB copy (about a microsecond), so the client loop's own cost stays far below a cache hit's, and
any process can rebuild a frame another one sent, which is how repeats of frames "seen before by
anyone" are drawn (each client publishes how many fresh frames it has had answered).
"""
from __future__ import annotations

import os
import struct
import tempfile
import time
import traceback

import numpy as np

from ..lib.daemons import cache_daemon, daemon_summary, snapshot
from ..lib.measure import cpu_seconds, delta, frames, machine_cpu, sleep_until, time_calls, us_stats
from ..lib.procs import CTX, RESULT_GRACE_S, children, report_ready

MODEL_ARGS = ["--model", "resnet18"]
SIZE = 64
BASE_FRAMES = 64
BASE_SEED = 4242
START_LEAD_S = 0.3
_STAMP = struct.Struct("<QQQ")


def make_frame(base: np.ndarray, run: int, client: int, j: int) -> np.ndarray:
    """Frame ``(run, client, j)``: a base frame with the three numbers in its first 24 bytes."""
    f = base[j % len(base)].copy()
    f.reshape(-1)[:_STAMP.size] = np.frombuffer(_STAMP.pack(run, client, j), np.uint8)
    return f


# ---------------------------------------------------------------------------------------------
# Part 1: hit latency
# ---------------------------------------------------------------------------------------------
def _same(a, b) -> bool:
    """Two answers (lists of Prediction) name the same classes with the same float32 scores."""
    return [(p.index, np.float32(p.score)) for p in a] == [(p.index, np.float32(p.score)) for p in b]


def writer_costs(count: int) -> dict:
    """The daemon-side cache operations alone, on a private 64 MiB writer in a temp dir: insert of
    a 16-pair answer (what the daemon stores for a 1000-class model), lookup hit and lookup miss."""
    from inferd.shm import cache as cf

    tmp = tempfile.mkdtemp(prefix="inferd-cbw", dir="/tmp")
    try:
        w = cf.ResultCache.open_writer(os.path.join(tmp, "w.cache"), 64 * 2**20)
        try:
            rng = np.random.default_rng(5)
            keys = [rng.bytes(32) for _ in range(count)]
            absent = [rng.bytes(32) for _ in range(count)]
            top = [(int(i), 0.01) for i in range(16)]
            it = iter(keys)
            ins = time_calls(lambda: w.insert(next(it), top), count)
            it = iter(keys)
            hit = time_calls(lambda: w.lookup(next(it)), count)
            it = iter(absent)
            miss = time_calls(lambda: w.lookup(next(it)), count)
        finally:
            w.close()
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return {"insert": us_stats(ins), "lookup_hit": us_stats(hit), "lookup_miss": us_stats(miss)}


def hit_latency(n_hit: int, n_rt: int, n_miss: int) -> dict:
    """Part 1. One resnet18 daemon with the cache on; a client with the local cache (cache=True)
    and one without (cache=False). Times, per call: a client-side hit, its pieces (content hash,
    key, lookup), a daemon-side hit, a ping, and misses (fresh frames) through either client."""
    from inferd.client import Client
    from inferd.shm import cache as cf

    out: dict = {"problems": []}
    with cache_daemon(MODEL_ARGS) as d:
        with Client(d["socket"], cache=True) as local, Client(d["socket"], cache=False) as remote:
            f = frames(1, SIZE, seed=11)[0]
            first = local.classify(f)                           # a miss: computed and inserted
            again = local.classify(f)
            if local.cache_hits != 1:
                out["problems"].append(f"second classify of the same frame was not a local hit "
                                       f"(cache_hits {local.cache_hits})")
            via_daemon = remote.classify(f)
            info0 = remote.info()["cache"]
            if info0.get("daemon_hits") != 1:
                out["problems"].append(f"Client(cache=False) classify of a cached frame: daemon_hits "
                                       f"{info0.get('daemon_hits')}, expected 1")
            if not (_same(first, again) and _same(first, via_daemon)):
                out["problems"].append(f"cached answers differ from the computed one: {first[:2]} / "
                                       f"{again[:2]} / {via_daemon[:2]}")

            hits0 = local.cache_hits
            out["client_hit"] = us_stats(time_calls(lambda: local.classify(f), n_hit, warmup=200))
            if local.cache_hits - hits0 != n_hit + 200:
                out["problems"].append(f"client hit loop: {local.cache_hits - hits0} local hits for "
                                       f"{n_hit + 200} calls")
            # The same lookup, piece by piece, on a read-only mapping of our own.
            reader = cf.ResultCache.open_reader(d["cache_path"])
            try:
                digest = local.model.digest
                pre = getattr(local, "preprocess_id", None) or getattr(local, "_preprocess_id", None)
                h = cf.content_hash(f)
                key = cf.cache_key(digest, pre, h)
                hit = reader.lookup(key)
                if hit is None or [i for i, _ in hit[:5]] != [p.index for p in first]:
                    out["problems"].append("lookup with a key built here (client's digest and preprocess "
                                           "id) did not find the client's answer")
                out["content_hash"] = us_stats(time_calls(lambda: cf.content_hash(f), n_hit, 200))
                out["cache_key"] = us_stats(time_calls(lambda: cf.cache_key(digest, pre, h), n_hit, 200))
                out["lookup"] = us_stats(time_calls(lambda: reader.lookup(key), n_hit, 200))
                out["hash_key_lookup"] = us_stats(time_calls(
                    lambda: reader.lookup(cf.cache_key(digest, pre, cf.content_hash(f))), n_hit, 200))
            finally:
                reader.close()

            out["daemon_hit"] = us_stats(time_calls(lambda: remote.classify(f), n_rt, warmup=100))
            out["ping"] = us_stats(time_calls(remote.ping, n_rt, warmup=100))

            fresh = frames(2 * n_miss + 20, SIZE, seed=12)
            it = iter(fresh)
            time_calls(lambda: remote.classify(next(it)), 0, warmup=20)        # warm the miss path
            m0, d0, s0, w0 = machine_cpu(), cpu_seconds(d["proc"].pid), time.process_time(), time.monotonic()
            out["miss"] = us_stats(time_calls(lambda: remote.classify(next(it)), n_miss))
            hits0 = local.cache_hits
            out["miss_local_client"] = us_stats(time_calls(lambda: local.classify(next(it)), n_miss))
            m1, d1, s1, w1 = machine_cpu(), cpu_seconds(d["proc"].pid), time.process_time(), time.monotonic()
            # cores used by anything but this daemon and this process while the misses ran
            out["miss_other_cpu_cores"] = ((m1["busy_s"] - m0["busy_s"]) - (d1 - d0) - (s1 - s0)) / (w1 - w0)
            out["miss_steal_cores"] = (m1["steal_s"] - m0["steal_s"]) / (w1 - w0)
            if local.cache_hits != hits0:
                out["problems"].append("a fresh frame was answered from the local cache")
            info = remote.info()
            out["daemon_cache"] = {k: v for k, v in info["cache"].items() if k != "file"}
            out["daemon_cache_file"] = info["cache"].get("file")
            c = info["counters"]
            out["daemon_model_ms_per_batch"] = 1000.0 * c.get("model_seconds", 0) / max(c.get("batches", 1), 1)
            out["daemon_frames"] = c.get("frames")
    out["daemon"] = daemon_summary(d)
    out["writer"] = writer_costs(max(n_hit // 5, 1000))
    miss = out["miss"]["p50_us"]
    out["ratios"] = {"client_hit_over_miss_p50": out["client_hit"]["p50_us"] / miss,
                     "daemon_hit_over_miss_p50": out["daemon_hit"]["p50_us"] / miss,
                     "client_hit_over_miss_p99": out["client_hit"]["p99_us"] / out["miss"]["p99_us"],
                     "daemon_hit_over_miss_p99": out["daemon_hit"]["p99_us"] / out["miss"]["p99_us"],
                     "daemon_hit_over_ping_p50": out["daemon_hit"]["p50_us"] / out["ping"]["p50_us"]}
    return out


# ---------------------------------------------------------------------------------------------
# Parts 2 and 3: throughput
# ---------------------------------------------------------------------------------------------
def _client(q, index: int, n: int, socket_path: str, repeat_frac: float, run: int, progress,
            warmup_s: float, seconds: float, start, go, stop) -> None:
    """Client process: closed loop of ``classify`` (one frame in flight), a share ``repeat_frac``
    of the frames repeats of frames some client already had answered, the rest fresh."""
    try:
        from inferd.client import Client

        base = frames(BASE_FRAMES, SIZE, seed=BASE_SEED)
        rng = np.random.default_rng([run, index, 77])
        with Client(socket_path, cache=True) as client:
            client.classify(make_frame(base, run, 1000 + index, 0))     # the session works
            report_ready(q, index, go)
            t_measure = start.value + warmup_s
            t_end = t_measure + seconds
            sleep_until(start.value)
            j = 0
            n_img = n_rep = n_local = 0
            lat_fresh, lat_rep = [], []
            wall0, cpu0 = time.monotonic(), time.process_time()
            while time.monotonic() < t_end:
                repeat = False
                if repeat_frac and rng.random() < repeat_frac:
                    c = int(rng.integers(n))
                    seen = progress[c]
                    if seen > 0:
                        frame = make_frame(base, run, c, int(rng.integers(seen)))
                        repeat = True
                if not repeat:
                    frame = make_frame(base, run, index, j)
                hits0 = client.cache_hits
                t0 = time.perf_counter()
                client.classify(frame)
                t1 = time.perf_counter()
                if not repeat:
                    j += 1
                    progress[index] = j
                if t_measure <= time.monotonic() <= t_end:
                    n_img += 1
                    n_rep += repeat
                    n_local += client.cache_hits - hits0
                    (lat_rep if repeat else lat_fresh).append(t1 - t0)
            cpu = (time.process_time() - cpu0) / max(time.monotonic() - wall0, 1e-9)
        q.put(("ok", ("done", index, n_img, n_rep, n_local, lat_fresh, lat_rep, cpu)))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def run_case(d: dict, probe, n: int, repeat_frac: float, run: int, warmup_s: float, seconds: float) -> dict:
    """``n`` client processes against daemon ``d`` for one window; img/s and what explains it."""
    progress = CTX.RawArray("q", n)
    specs = [(_client, (n, d["socket"], repeat_frac, run, progress, warmup_s, seconds))] * n
    pid = d["proc"].pid
    with children(specs, lead_s=START_LEAD_S, name="bench-cache-client") as group:
        t_measure = group.start + warmup_s
        sleep_until(t_measure)
        before = snapshot(probe, pid)
        sleep_until(t_measure + seconds)
        after = snapshot(probe, pid)
        done = group.collect(warmup_s + seconds + RESULT_GRACE_S)
    dd = delta(before, after)
    n_img = sum(r[0] for r in done)
    n_rep = sum(r[1] for r in done)
    n_local = sum(r[2] for r in done)
    lat_fresh = np.concatenate([np.asarray(r[3], dtype=float) for r in done])
    lat_rep = np.concatenate([np.asarray(r[4], dtype=float) for r in done])
    lookups = dd["daemon_hits"] + dd["misses"]
    row = {"cache": d["cache"], "repeat_frac": repeat_frac, "clients": n, "run": run,
           "img_s": n_img / seconds, "computed_img_s": dd.get("c_frames", 0) / seconds,
           "repeats": n_rep / max(n_img, 1), "local_hits": n_local / max(n_img, 1),
           "per_client_img_s": [r[0] / seconds for r in done],
           "latency_fresh_ms": {k: (v / 1000.0 if k.endswith("_us") and v is not None else v)
                                for k, v in us_stats(lat_fresh).items()},
           "latency_repeat_us": us_stats(lat_rep),
           "daemon_cpu_cores": dd["cpu_s"] / seconds, "clients_cpu_cores": sum(r[5] for r in done),
           "machine_busy_cores": dd["busy_s"] / seconds, "steal_cores": dd["steal_s"] / seconds,
           # what neither the daemon nor its clients used: other processes (the parent's two
           # info() calls are negligible), i.e. how disturbed this window was
           "other_cpu_cores": dd["busy_s"] / seconds - dd["cpu_s"] / seconds - sum(r[5] for r in done),
           "daemon": {k: dd.get(k, 0) for k in ("daemon_hits", "client_hits", "misses", "inserts",
                                                 "inserts_skipped", "coalesced", "c_frames", "c_batches",
                                                 "c_model_seconds", "c_hash_seconds")}}
    if dd.get("c_batches"):
        row["mean_batch"] = dd["c_frames"] / dd["c_batches"]
        row["model_ms_per_batch"] = 1000.0 * dd["c_model_seconds"] / dd["c_batches"]
    row["model_busy"] = dd.get("c_model_seconds", 0) / seconds
    row["daemon_hash_us"] = 1e6 * dd.get("c_hash_seconds", 0) / lookups if lookups else None
    return row


def throughput(n_clients: int, warmup_s: float, seconds: float, repeat_frac: float, rounds: int,
               log=print) -> dict:
    """Parts 2 and 3. ``rounds`` times, interleaved: repeats with the cache on, off, then unique on,
    off. Every case gets a fresh daemon (its own empty cache file, identical command line but for
    cache.enabled), so each starts from the same state: the daemon's smoothed hit rate, which
    decides insert sampling, would otherwise carry over from the case before (after unique
    traffic, a new 30 %-repeat workload takes some hundreds of requests to be inserted in full
    again). Every case also uses its own frame namespace, so no frame is ever seen in two cases."""
    from inferd.client import Client

    rows, daemons = [], []
    run = 100
    for r in range(rounds):
        for frac in (repeat_frac, 0.0):
            for cache in (True, False):
                run += 1
                with cache_daemon(MODEL_ARGS, cache=cache) as d:
                    with Client(d["socket"], cache=False) as probe:
                        row = run_case(d, probe, n_clients, frac, run, warmup_s, seconds)
                daemons.append(daemon_summary(d))
                row["round"] = r + 1
                rows.append(row)
                log(f"    round {r + 1}: {int(frac * 100):>2}% repeats, cache "
                    f"{'on ' if cache else 'off'}: {row['img_s']:7.1f} img/s "
                    f"(computed {row['computed_img_s']:.1f}/s, local hits {row['local_hits']:.0%}, "
                    f"other CPU {row['other_cpu_cores']:.2f})")
    out = {"rows": rows, "clients": n_clients, "warmup_s": warmup_s, "seconds": seconds,
           "repeat_frac": repeat_frac, "daemons": daemons}
    out["ratios"] = _ratios(rows, repeat_frac)
    return out


def _ratios(rows: list, repeat_frac: float) -> dict:
    """Per round and over all rounds: img/s with the cache on / off, for repeats and unique."""
    out = {}
    for name, frac in (("repeats", repeat_frac), ("unique", 0.0)):
        on = [r["img_s"] for r in rows if r["repeat_frac"] == frac and r["cache"]]
        off = [r["img_s"] for r in rows if r["repeat_frac"] == frac and not r["cache"]]
        out[name] = {"per_round": [a / b for a, b in zip(on, off)], "on_img_s": on, "off_img_s": off,
                     "mean_ratio": float(np.mean(on) / np.mean(off)) if on and off else None}
    return out
