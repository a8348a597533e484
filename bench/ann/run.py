"""The near-duplicate index against the exact scan, in one run, at 10k, 100k and 1M stored rows.

    python -m bench.ann [--sizes 10000,100000,1000000] [--vectors FILE.npy] [--quick] [--out FILE]

Real images and their changed copies: ``--stored`` images of the built-in model's dataset
(``inferd.daemon.models.zoo.shapes.make_dataset``) are embedded in this process by the built-in
model as the daemon embeds them (``Engine``, ``features.0`` pooled ``grid:4+thumbnail:4``: the
vectors the daemon stores), with changed copies of them made as bench/cache/near.py makes them
(resize, JPEG-60, crop, brightness; ``--copies`` per change), and ``--fresh`` different images
(another seed). The rest of each store is filler: real embeddings of other images from
``--vectors`` (an .npy this benchmark writes with ``--save-vectors N``, e.g. 100,000 rows, once),
then synthetic rows (mixtures of two real ones plus noise) up to the size: "1M rows" is 100k real
and 900k synthetic rows plus the stored originals.

Per size, one store (``EmbeddingStore`` with the index, capacity = rows), filled through ``add``
(insert rate: rows per second until the index holds them all), then per query kind both searches
in the same process: the index (``search``) and the exact scan (the store's own product over
every row): p50 / p99 of one query (k=10), the fraction of changed copies whose original comes
first and passes the default threshold, the fraction of different images whose best match passes
it; memory per row (graph bytes in memory, graph file, store file) against the raw vector (4 *
dim bytes); start-up with the full store: ``EmbeddingStore.open`` until the first search is
answered, and until the graphs are writable again; at the largest size, three real daemons
(``--model shapes``, result cache off) side by side, the store off, a copy of it with the index, a
copy without, take ``--cpu-rounds`` rounds of ``--cpu-frames`` new images each in turn: daemon
CPU per frame, inserts included (``daemon_cpu``); on / off is everything storing costs (the
embedding's pooling, hashing, the row and the index), on / on-without-index what the index adds.
``--index`` measures other index parameters on a copy of the store whose index the daemon's own
path rebuilt. Stores are kept under ``--keep`` (in /tmp) and reused by the next run of the same
size, seed and index. Targets: docs/benchmarks.md "Near-duplicate index".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from ..lib.measure import latency_stats
from ..lib.report import print_json, prog

KINDS = ("resize", "jpeg", "crop", "brightness")
K = 10


def embed(images: np.ndarray, batch: int = 64) -> np.ndarray:
    """The built-in model's embeddings of uint8 images, as the daemon computes them (1 torch thread)."""
    import torch

    from inferd.daemon.config import ModelConfig
    from inferd.daemon.models import loading as model_mod
    from inferd.daemon.pipeline.engine import Engine, Staging

    torch.set_num_threads(1)
    engine = Engine(torch.device("cpu"), model_mod.load(ModelConfig()), keep_k=3)
    engine.load()
    staging = Staging(torch.device("cpu"), batch, images.shape[1:])
    out = np.empty((len(images), engine.embedding_dim), np.float32)
    for i in range(0, len(images), batch):
        n = min(batch, len(images) - i)
        staging.arrays[0][:n] = images[i:i + n]
        out[i:i + n] = engine.launch(staging.tensors[0], n, 3, want_embedding=True).result()[2]
    return out


def images(stored: int, copies: int, fresh: int, seed: int) -> dict:
    """Embeddings of the stored originals, their changed copies (per kind: indices, vectors) and
    the different images."""
    from inferd.daemon.models.zoo.shapes import make_dataset

    from ..cache.near import change

    rng = np.random.default_rng(seed)
    originals, _ = make_dataset(stored, seed)
    others, _ = make_dataset(fresh, seed + 1)
    batches, copy_idx = [originals, others], {}
    for kind in KINDS:
        idx = rng.choice(stored, size=min(copies, stored), replace=False)
        copy_idx[kind] = idx
        batches.append(np.stack([change(originals[i], kind, rng) for i in idx]))
    vecs = embed(np.concatenate(batches))
    out = {"stored": vecs[:stored], "fresh": vecs[stored:stored + fresh], "copies": {}}
    at = stored + fresh
    for kind in KINDS:
        n = len(copy_idx[kind])
        out["copies"][kind] = (copy_idx[kind], vecs[at:at + n])
        at += n
    return out


def filler(rows: int, path: str, seed: int, dim: int) -> np.ndarray:
    from .libs import dataset

    return dataset(rows, path, seed) if rows else np.zeros((0, dim), np.float32)


def embedding() -> str:
    """The built-in model's embedding id: stores built here are ones the daemon opens as they are."""
    from inferd.daemon.config import ModelConfig
    from inferd.daemon.models import loading as model_mod
    from inferd.daemon.models.embedding_pooling import embedding_id

    return embedding_id(model_mod.load(ModelConfig()).spec)


#: The index the stores under --keep are first built with (the defaults until 2026-12-07); a
#: store for other parameters is a copy of that one whose index the daemon's own path rebuilt.
BASE_INDEX = {"scalar": "f16", "connectivity": 16, "expansion_add": 64, "kind": "hnsw", "lists": 0}


def index_spec(text: str) -> tuple[dict, str]:
    """``--index`` ("scalar=i8,m=12,ef_add=32", or "kind=ivf[,lists=4096][,probe=16]": the
    daemon's defaults for what it leaves out) as
    IndexOptions fields, and the store name's suffix: the built parameters that differ from
    BASE_INDEX (the search-time ``ef`` builds nothing)."""
    from inferd.daemon.caching.ann_index import IndexOptions

    names = {"scalar": "scalar", "m": "connectivity", "ef_add": "expansion_add", "ef": "expansion_search",
             "nice": "nice", "kind": "kind", "lists": "lists", "probe": "probe"}
    defaults = IndexOptions()
    fields = {f: getattr(defaults, f) for f in BASE_INDEX}
    for part in filter(None, text.split(",")):
        key, value = part.split("=")
        fields[names[key]] = value if key in ("scalar", "kind") else int(value)
    built = (("kind", "kind"), ("lists", "lists")) if fields["kind"] == "ivf" else \
        (("scalar", "scalar"), ("m", "connectivity"), ("ef_add", "expansion_add"))
    tail = "".join(f"-{key}{fields[f]}" for key, f in built if fields[f] != BASE_INDEX[f])
    return fields, tail


def build(path: str, rows: int, data: dict, vectors: str, seed: int, log, index: dict | None = None,
          base: str = "") -> dict:
    """A store of ``rows`` rows at ``path`` with the index (``index``: IndexOptions fields) settled:
    the originals among filler. Reused when a previous run left it complete. With ``base`` (the
    same store built with the default index), a copy of its store file whose index is rebuilt from
    the rows under ``index``: the daemon's own path when the index parameters change."""
    import shutil

    from inferd.daemon.caching.embedding_store import EmbeddingStore, IndexOptions

    stored = data["stored"]
    done = path + ".complete"
    if os.path.exists(done):
        with open(done) as fh:
            return json.load(fh)
    for leftover in (path, path + ".index"):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
        elif os.path.exists(leftover):
            os.unlink(leftover)
    if base:
        build(base, rows, data, vectors, seed, log, BASE_INDEX)
        shutil.copyfile(base, path)
        t0 = time.perf_counter()
        store = EmbeddingStore.open(path, rows, stored.shape[1], embedding=embedding(),
                                    index=IndexOptions(exact_below=0, threads=2, **index))
        try:
            while (stats := store.index_stats())["pending"] or not stats["verified"]:
                time.sleep(0.2)  # noqa: sleep-ok (waiting for the inserter thread, reported as its rate)
            settled = time.perf_counter() - t0
        finally:
            store.close()
        log(f"  {rows} rows: index {index} rebuilt from the store in {settled:.1f} s (2 threads)")
        info = {"rebuilt_from": os.path.basename(base), "rebuild_s": round(settled, 1), "rebuild_threads": 2,
                "insert_rows_per_s": round(rows / settled)}
        with open(done, "w") as fh:
            json.dump(info, fh)
        return info
    fill = filler(rows - len(stored), vectors, seed, stored.shape[1])
    store = EmbeddingStore.open(path, rows, stored.shape[1], index=IndexOptions(exact_below=0, **(index or BASE_INDEX)),
                                embedding=embedding())
    try:
        t0 = time.perf_counter()
        for i in range(len(fill)):
            store.add(b"F" + i.to_bytes(31, "little"), fill[i], None, uid=0)
        for i in range(len(stored)):
            store.add(b"S" + i.to_bytes(31, "little"), stored[i], str(i), uid=0)
        added = time.perf_counter() - t0
        while store.index_stats()["pending"]:
            time.sleep(0.2)  # noqa: sleep-ok (waiting for the inserter thread, reported as its rate)
        settled = time.perf_counter() - t0
        log(f"  {rows} rows: added in {added:.1f} s, indexed in {settled:.1f} s")
        info = {"add_rows_per_s": round(rows / added), "insert_rows_per_s": round(rows / settled)}
    finally:
        store.close()
    with open(done, "w") as fh:
        json.dump(info, fh)
    return info


def measure(path: str, rows: int, data: dict, queries: int, threshold: float, log, index: dict) -> dict:
    from inferd.daemon.caching.embedding_store import EmbeddingIndexBusy, EmbeddingStore, IndexOptions

    t0 = time.perf_counter()
    store = EmbeddingStore.open(path, rows, data["stored"].shape[1], index=IndexOptions(exact_below=0, **index))
    opened = time.perf_counter() - t0
    try:
        first = data["fresh"][0]
        while True:                                     # busy while the graphs' checksums are read
            try:
                store.search(first, K, -1.0, uid=0)
                break
            except EmbeddingIndexBusy:
                time.sleep(0.01)  # noqa: sleep-ok (a client's retry after the typed busy answer)
        serving = time.perf_counter() - t0
        while store.index_stats()["mapped"]:
            time.sleep(0.01)  # noqa: sleep-ok (waiting for the graphs to be loaded, reported)
        writable = time.perf_counter() - t0
        # the store's start-up check of its vectors holds its lock for a slice at a time, a read
        # of 10 MB from disk when the page cache lost the file: queries timed after it (steady state)
        while store.checking:
            time.sleep(0.01)  # noqa: sleep-ok (waiting for the start-up check, reported)
        checked = time.perf_counter() - t0
        stats = store.index_stats()
        out = {"rows": rows, "start": {"open_s": round(opened, 3), "serving_s": round(serving, 3),
                                       "writable_s": round(writable, 3), "checked_s": round(checked, 3),
                                       "rebuilt": stats["rebuilt"]}}
        dim = data["stored"].shape[1]
        graph_files = [os.path.join(path + ".index", n) for n in os.listdir(path + ".index")
                       if n.startswith(("scope-", "centroids-"))]
        out["memory_bytes_per_row"] = {
            "raw_vector": 4 * dim, "graph_in_memory": round(stats["bytes"] / rows),
            "graph_file": round(sum(os.path.getsize(p) for p in graph_files) / rows),
            "store_file": round(os.path.getsize(path) / rows)}
        out["memory_bytes_per_row"]["store_and_graph_over_raw"] = round(
            (out["memory_bytes_per_row"]["graph_file"] + out["memory_bytes_per_row"]["store_file"]) / (4 * dim), 2)

        def run(fn, qs):
            times, found = [], []
            for q in qs:
                t = time.perf_counter()
                found.append(fn(q))
                times.append(time.perf_counter() - t)
            st = latency_stats(times)
            return found, {"p50_ms": round(st["p50_ms"], 3), "p99_ms": round(st["p99_ms"], 3)}

        index = lambda q: store.search(q, K, -1.0, uid=0)

        def exact(q):
            with store._lock:
                return store._search_exact(store._unit(q), K, -1.0, 0)

        copies = [(str(i), v) for kind in KINDS for i, v in zip(*data["copies"][kind])]
        fresh = list(data["fresh"])
        if rows > 100_000:                              # the exact scan answers an even sample (time)
            copies, fresh = copies[::max(1, len(copies) // queries)], fresh[::max(1, len(fresh) // queries)]
        tops = {}
        for name, fn in (("index", index), ("exact", exact)):
            res = {}
            found, res["copy_query"] = run(fn, [v for _, v in copies])
            tops[name] = [m[0][1] for m in found]
            res["copies_found_first"] = round(float(np.mean(
                [bool(m) and m[0][1] == want and m[0][2] >= threshold for (want, _), m in zip(copies, found)])), 4)
            found, res["different_query"] = run(fn, fresh)
            res["different_above_threshold"] = round(float(np.mean([bool(m) and m[0][2] >= threshold for m in found])), 4)
            res["queries"] = len(copies) + len(fresh)
            out[name] = res
            log(f"  {rows} rows, {name}: {json.dumps(res)}")
        out["index_top1_equals_exact"] = round(float(np.mean([a == b for a, b in zip(tops["index"], tops["exact"])])), 4)
    finally:
        store.close()
    return out


def thread_cpu(pid: int, kernel: bool = False) -> dict:
    """CPU seconds so far of each thread of ``pid``: {"<tid> <name>": seconds}; ``kernel``: its
    system time alone (page faults, syscalls)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                head, rest = fh.read().rsplit(")", 1)
        except FileNotFoundError:                       # ended meanwhile
            continue
        fields = rest.split()
        out[f"{tid} {head.split('(', 1)[1]}"] = (int(fields[12]) + (0 if kernel else int(fields[11]))) \
            / os.sysconf("SC_CLK_TCK")
    return out


def thread_names(pid: int) -> dict:
    """{tid: Python thread name} of ``pid``'s Python threads by ``py-spy dump`` (where py-spy is
    installed; {} otherwise): the collector and the loop share the process's OS name, and an OpenMP
    worker takes its executor's, so the two names together say which thread is which."""
    import re
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    try:
        text = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {int(t): n for t, n in re.findall(r'^Thread (?:0x)?(\d+) \([a-z]+\): "([^"]*)"', text, re.M)}


def thread_roles(pid: int, cpu: dict, names: dict) -> dict:
    """``cpu`` ({"<tid> <comm>": ms}) relabelled "<comm>/<Python name or role>": the loop is the
    process's first thread; a thread of an executor's OS name that Python does not know is its
    OpenMP worker. Threads of the same label are summed; under 0.005 ms dropped."""
    out: dict = {}
    for key, ms in cpu.items():
        tid, comm = key.split(" ", 1)
        tid = int(tid)
        role = "loop" if tid == pid else names.get(tid) or ("omp" if comm.startswith("inferd-dev") else "?")
        label = f"{comm}/{role}"
        out[label] = round(out.get(label, 0.0) + ms, 3)
    return dict(sorted(((k, v) for k, v in out.items() if v >= 0.005), key=lambda kv: -kv[1]))


MODES = (("off", False, False), ("on", True, True), ("no_index", True, False))


def daemon_cpu(path: str, rows: int, frames: int, seed: int, log, index: dict, rounds: int = 8,
               alt: dict | None = None, alt_path: str = "", alt_store: str = "", profile: str = "") -> dict:
    """Daemon CPU per classified frame (new images: each one stored and, with the index, inserted)
    with this store against the store off, in the same run: three daemons side by side (off; a
    copy of the store with its index; another copy without), each started and settled (vectors
    checked, graphs loaded) before anything is counted, then ``rounds`` rounds of ``frames`` new
    images to each in turn from 4 client threads. What other tenants of the machine do lands on
    all three alike, a few seconds apart. Each daemon's CPU is counted over the whole run, its
    idle time between its bursts included, so the inserts the index does after a burst count
    (the last ones waited for at the end); each burst's own figure gives the spread. Result cache
    off in all. ``alt_store``: the fourth daemon's store (with its index), where ``alt`` builds
    another index (another kind: the HNSW graphs beside the IVF lists in one run). ``profile``: a
    file for ``py-spy record --threads`` (raw, 200 Hz) of the store-on daemon over its bursts (its
    samples cost that daemon CPU: a run with a profile judges where, not how much)."""
    import contextlib
    import shutil
    import tempfile

    from inferd.client import Client
    from inferd.daemon.models.zoo.shapes import make_dataset

    from ..cache.embeddings import _parallel
    from ..lib.daemons import cache_daemon, daemon_summary
    from ..lib.measure import cpu_seconds

    alt = alt if alt is not None or not alt_path else {}
    modes = MODES + ((("alt", True, True),) if alt is not None else ())
    imgs = make_dataset(frames * len(modes) * rounds + 4, seed + 7)[0]
    names = {"connectivity": "index_m", "expansion_add": "index_ef_construction", "scalar": "index_scalar",
             "expansion_search": "index_ef", "nice": "index_nice", "kind": "index_kind", "lists": "index_lists",
             "probe": "index_probe"}
    sets = lambda fields: [a for k, v in fields.items() for a in ("--set", f'embeddings.{names[k]}={json.dumps(v)}')]
    tuned = sets(index)
    tmp = tempfile.mkdtemp(prefix="inferd-annd", dir="/tmp")
    out = {"frames_per_burst": frames, "rounds": rounds, "index": index, "alt": alt or {}, "alt_path": alt_path,
           "alt_store": alt_store,
           "daemons": {}}
    try:
        with contextlib.ExitStack() as stack:
            live = {}
            for n, (mode, on, indexed) in enumerate(modes):
                args = ["--model", "shapes"]
                if on:
                    copy, src = os.path.join(tmp, f"{mode}.store"), alt_store if mode == "alt" and alt_store else path
                    shutil.copyfile(src, copy)
                    if indexed:
                        shutil.copytree(src + ".index", copy + ".index")
                    args += ["--set", f"embeddings.capacity={rows}", "--set", f'embeddings.path="{copy}"',
                             "--set", f"embeddings.index={'true' if indexed else 'false'}", *tuned,
                             *(sets(alt) if mode == "alt" else [])]
                t0 = time.perf_counter()
                env = {"PYTHONPATH": alt_path} if mode == "alt" and alt_path else None
                d = stack.enter_context(cache_daemon(args, cache=False, embeddings=on, env=env))
                c = stack.enter_context(Client(d["socket"]))
                c.classify(imgs[n])
                live[mode] = {"d": d, "c": c, "indexed": indexed, "start_s": round(time.perf_counter() - t0, 2)}

            def busy(c, indexed):
                info = c.info()["cache"]
                st = info.get("embedding_index") or {"mapped": 0, "pending": 0, "verified": True}
                return info.get("embeddings_checking") or (indexed and (st["mapped"] or st["pending"] or not st["verified"]))

            for mode, x in live.items():                # start-up: reported apart, never counted
                t0 = time.perf_counter()
                while busy(x["c"], x["indexed"]):
                    time.sleep(0.05)  # noqa: sleep-ok (polling the daemon's start-up, with the index's counters)
                x.update(settled_s=round(time.perf_counter() - t0, 2), bursts=[], wall=0.0,
                         cpu0=cpu_seconds(x["d"]["proc"].pid), threads0=thread_cpu(x["d"]["proc"].pid),
                         sys0=thread_cpu(x["d"]["proc"].pid, kernel=True),
                         ins0=(x["c"].info()["cache"].get("embedding_index") or {}).get("thread_cpu_s", 0.0))
            at, spy = 4, None
            if profile:
                import subprocess
                exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
                spy = subprocess.Popen([exe, "record", "--threads", "--idle", "-n", "-r", "200", "-f", "raw",
                                        "-o", profile, "-p", str(live["on"]["d"]["proc"].pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for r in range(rounds):
                for mode, x in live.items():
                    pid, part = x["d"]["proc"].pid, imgs[at:at + frames]
                    at += frames
                    c0, t0 = cpu_seconds(pid), time.perf_counter()
                    _parallel(4, x["d"]["socket"], range(len(part)), lambda cl, i: cl.classify(part[i]))
                    x["wall"] += time.perf_counter() - t0
                    x["bursts"].append(round(1e3 * (cpu_seconds(pid) - c0) / len(part), 3))
            if spy is not None:
                spy.send_signal(2)                      # SIGINT: py-spy writes its file and ends
                spy.wait(60)
            log("  bursts, ms a frame: " + json.dumps({m: x["bursts"] for m, x in live.items()}))
            for mode, x in live.items():
                while busy(x["c"], x["indexed"]):       # the inserts of the last burst count too
                    time.sleep(0.05)  # noqa: sleep-ok (polling the daemon's counter)
                pid, n = x["d"]["proc"].pid, frames * rounds
                threads, kernel, names = thread_cpu(pid), thread_cpu(pid, kernel=True), thread_names(pid)
                res = {"start_s": x["start_s"], "settled_s": x["settled_s"],
                       "cpu_ms_per_frame": round(1e3 * (cpu_seconds(pid) - x["cpu0"]) / n, 3),
                       "bursts_ms_per_frame": x["bursts"], "frames_per_s": round(n / x["wall"], 1),
                       "threads_ms_per_frame": thread_roles(pid, {
                           t: 1e3 * (v - x["threads0"].get(t, 0.0)) / n for t, v in threads.items()}, names),
                       "threads_kernel_ms_per_frame": thread_roles(pid, {
                           t: 1e3 * (v - x["sys0"].get(t, 0.0)) / n for t, v in kernel.items()}, names)}
                if "embeddings_write_us_mean" in (info := x["c"].info()["cache"]):
                    res["store_write_us_a_row"] = info["embeddings_write_us_mean"]    # on the loop
                    res["hash_us_a_frame"] = info.get("hash_us_mean")                 # on the collector
                st = info.get("embedding_index")
                if st:
                    res["inserter_ms_per_frame"] = round(1e3 * (st["thread_cpu_s"] - x["ins0"]) / n, 3)
                    res["index_stats"] = {k: st[k] for k in ("rows", "reopened", "rebuilt", "inserted")}
                out["daemons"][mode] = res
            for x in live.values():
                x["c"].close()
        for mode, x in live.items():
            out["daemons"][mode]["daemon"] = daemon_summary(x["d"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cpu = {m: r["cpu_ms_per_frame"] for m, r in out["daemons"].items()}
    out["on_over_off"] = round(cpu["on"] / cpu["off"], 3)              # everything storing costs
    out["no_index_over_off"] = round(cpu["no_index"] / cpu["off"], 3)  # the store alone
    out["index_over_no_index"] = round(cpu["on"] / cpu["no_index"], 3)  # what the index adds
    if alt is not None:
        out["alt_over_on"] = round(cpu["alt"] / cpu["on"], 3)
        out["alt_over_off"] = round(cpu["alt"] / cpu["off"], 3)
    b = {m: np.asarray(r["bursts_ms_per_frame"]) for m, r in out["daemons"].items()}
    for m in ("on", "no_index", "alt")[:3 if alt is not None else 2]:    # each round's own ratio: its bursts a few seconds apart
        ratio = b[m] / b["off"]
        out[f"{m}_over_off_bursts"] = {"median": round(float(np.median(ratio)), 3), "min": round(float(ratio.min()), 3),
                                       "max": round(float(ratio.max()), 3)}
    return out


def main(argv=None) -> int:
    from inferd.shm.limits import DEFAULT_MIN_SIMILARITY

    p = argparse.ArgumentParser(prog=prog(), description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--quick", action="store_true", help="sizes 10k and 100k, fewer images")
    p.add_argument("--vectors", default="/tmp/inferd-ann-bench/real.npy",
                   help="real embeddings for filler rows (written by --save-vectors)")
    p.add_argument("--save-vectors", type=int, default=0, help="embed this many images into --vectors and stop")
    p.add_argument("--stored", type=int, default=1000)
    p.add_argument("--copies", type=int, default=250, help="copies per change")
    p.add_argument("--fresh", type=int, default=1000)
    p.add_argument("--exact-queries", type=int, default=300,
                   help="above 100k rows, copies and different images queried (both ways): an even sample")
    p.add_argument("--keep", default="/tmp/inferd-ann-bench", help="where built stores are kept for reuse")
    p.add_argument("--cpu-frames", type=int, default=400,
                   help="at the largest size, daemon CPU per classified frame with the store against without; 0: skip")
    p.add_argument("--cpu-only", action="store_true", help="only the daemon CPU per frame, at the largest size")
    p.add_argument("--cpu-rounds", type=int, default=8, help="rounds of --cpu-frames to each of off / on / "
                   "on without the index (three daemons side by side)")
    p.add_argument("--cpu-alt", default="", help="with --cpu-only: a fourth daemon with the index under "
                   "these settings (e.g. nice=0), beside the others; settings that build another index "
                   "(kind=hnsw,scalar=i8,m=12,ef_add=32) use the store built for them")
    p.add_argument("--cpu-alt-path", default="", help="with --cpu-only: the fourth daemon imports inferd "
                   "from this PYTHONPATH (another version of the code: before a change)")
    p.add_argument("--index", default="", help="index parameters other than the defaults, e.g. "
                   "scalar=i8,m=12,ef_add=32: a copy of the default store, its index rebuilt so; "
                   "without kind=, the kind embeddings.index_kind = \"auto\" takes at each size")
    p.add_argument("--build-only", action="store_true",
                   help="build (or find) the stores and stop: data preparation, run it niced outside the lock")
    p.add_argument("--profile", default="", help="with --cpu-only: py-spy record the store-on daemon's "
                   "threads over its bursts into this file (raw; its CPU figures then include py-spy's cost)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    os.makedirs(args.keep, exist_ok=True)
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)            # numpy's BLAS on one thread, as the daemon runs it (threads.blas)
    if args.save_vectors:
        from inferd.daemon.models.zoo.shapes import make_dataset
        np.save(args.vectors, embed(make_dataset(args.save_vectors, args.seed + 100)[0]))
        return 0
    if args.quick:
        args.sizes, args.copies, args.fresh = "10000,100000", 100, 400
    vectors = args.vectors if os.path.exists(args.vectors) else ""
    t0 = time.perf_counter()
    data = images(args.stored, args.copies, args.fresh, args.seed)
    log(f"embedded {args.stored} originals, {args.copies} copies of each change, {args.fresh} others "
        f"in {time.perf_counter() - t0:.1f} s")
    report = {"stored": args.stored, "copies_per_change": args.copies, "fresh": args.fresh, "k": K,
              "threshold": DEFAULT_MIN_SIMILARITY, "filler": vectors or "synthetic", "sizes": []}
    from inferd.daemon.caching.ann_index import kind_for

    for rows in (int(s) for s in args.sizes.split(",")):
        # the kind the daemon's default (embeddings.index_kind = "auto") takes at this size, unless named
        spec = args.index if "kind=" in args.index else ",".join(filter(None, (args.index, f"kind={kind_for('auto', rows)}")))
        index, tail = index_spec(spec)
        report["index"] = index
        base = os.path.join(args.keep, f"s{rows}-seed{args.seed}-stored{args.stored}.store")
        path = base.replace(".store", f"{tail}.store")
        info = build(path, rows, data, vectors, args.seed, log, index, base if tail else "")
        if args.build_only or args.cpu_only:
            continue
        report["sizes"].append({**measure(path, rows, data, args.exact_queries, DEFAULT_MIN_SIMILARITY, log, index),
                                "build": info})
    if args.build_only:
        return 0
    if args.cpu_only:
        alt_fields, alt_tail = index_spec(args.cpu_alt) if args.cpu_alt else ({}, "")
        alt = {k: v for k, v in alt_fields.items() if index.get(k) != v} if args.cpu_alt else None
        alt_store = ""
        if alt and alt_tail != tail:                    # it builds another index: its own store, as built
            alt_store = base.replace(".store", f"{alt_tail}.store")
            build(alt_store, rows, data, vectors, args.seed, log, alt_fields, base if alt_tail else "")
            alt = alt_fields
        out = daemon_cpu(path, rows, args.cpu_frames, args.seed, log, index, args.cpu_rounds, alt, args.cpu_alt_path,
                         alt_store, args.profile)
        return print_json(out, args.out)
    big = report["sizes"][-1]
    if args.cpu_frames:
        big["daemon_cpu"] = daemon_cpu(path, big["rows"], args.cpu_frames, args.seed, log, index, args.cpu_rounds)
    report["targets"] = {"rows": big["rows"], "p99_ms<=5": bool(big["index"]["copy_query"]["p99_ms"] <= 5.0),
                         "recall_within_0.5pp": bool(big["exact"]["copies_found_first"]
                                                     - big["index"]["copies_found_first"] <= 0.005),
                         "memory<=2x": bool(big["memory_bytes_per_row"]["store_and_graph_over_raw"] <= 2.0),
                         "serving_s<=5": bool(big["start"]["serving_s"] <= 5.0)}
    if "daemon_cpu" in big:
        report["targets"]["daemon_cpu<=1.1x"] = bool(big["daemon_cpu"]["on_over_off"] <= 1.1)
    return print_json(report, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
