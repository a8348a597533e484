"""Restart with a full store: how long until the daemon could classify, and until near queries are answered.

    python -m bench.ann.restart [--store /tmp/inferd-ann-bench/s1000000-seed3-stored1000.store] [--rows N] [--repeat 2] [--index ...]

Opens a store that ``python -m bench.ann --build-only`` left (with its saved index) the way the
daemon does (``EmbeddingStore.open`` with the index), and reports: ``open_s``, when open returns
(the daemon serves classify requests from then on); ``near_s``, when the first near query is
answered through the index (until its graphs' checksums passed, a store larger than
``embeddings.index_exact_max`` answers EmbeddingIndexBusy, retried here every 10 ms); ``checked_s``,
when the background check of the store's vectors is done; ``writable_s``, when the graphs are loaded
writable. The page cache is whatever the previous run left (the first repeat may be cold).
Targets: docs/benchmarks.md "Near-duplicate index" (serving within 5 s at a million rows).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def once(path: str, rows: int, dim: int, index: dict) -> dict:
    from inferd.daemon.caching.embedding_store import EmbeddingIndexBusy, EmbeddingStore, IndexOptions

    query = np.random.default_rng(0).standard_normal(dim).astype(np.float32)
    t0 = time.perf_counter()
    store = EmbeddingStore.open(path, rows, dim, index=IndexOptions(exact_below=0, **index))
    out = {"open_s": round(time.perf_counter() - t0, 3), "busy_answers": 0}
    try:
        while True:
            try:
                store.search(query, 10, -1.0, uid=0)
                break
            except EmbeddingIndexBusy:
                out["busy_answers"] += 1
                time.sleep(0.01)  # noqa: sleep-ok (a client's retry after the typed busy answer)
        out["near_s"] = round(time.perf_counter() - t0, 3)
        sweeper = getattr(store, "_sweeper", None)
        if sweeper is not None:
            sweeper.join()
        out["checked_s"] = round(time.perf_counter() - t0, 3)
        while store.index_stats()["mapped"]:
            time.sleep(0.01)  # noqa: sleep-ok (waiting for the graphs to load, reported)
        out["writable_s"] = round(time.perf_counter() - t0, 3)
        out["rebuilt"] = store.index_stats()["rebuilt"]
    finally:
        store.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ann.restart", description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="/tmp/inferd-ann-bench/s1000000-seed3-stored1000.store")
    ap.add_argument("--rows", type=int, default=None, help="its capacity (default: from the file name)")
    ap.add_argument("--dim", type=int, default=305)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--index", default="", help="the index parameters the store was built with "
                    "(bench.ann --index: scalar=i8,m=12,ef_add=32; its store name carries them)")
    args = ap.parse_args(argv)
    rows = args.rows or int(os.path.basename(args.store)[1:].split("-")[0])
    from .run import index_spec

    runs = [once(args.store, rows, args.dim, index_spec(args.index)[0]) for _ in range(args.repeat)]
    for r in runs:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
