"""Where the near-duplicate index starts to beat the exact scan: ``embeddings.index_exact_below``.

    python -m bench.ann.crossover [--sizes 1000,2000,5000,10000,20000,50000] [--vectors FILE.npy]

Per size, one store of that many real embeddings (``--vectors``, as bench/ann/run.py) with its
index settled; then the same 300 queries (stored rows plus noise, cosine ~0.95) both ways in the
same process, interleaved: ``search`` through the index and the store's exact scan, p50 / p99 of
one query (k=10) and whether the top match agreed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from ..lib.measure import latency_stats
from ..lib.report import print_json, prog
from .libs import changed_copies, dataset


def main(argv=None) -> int:
    from inferd.daemon.caching.embedding_store import EmbeddingStore, IndexOptions

    p = argparse.ArgumentParser(prog=prog(), description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,2000,5000,10000,20000,50000")
    p.add_argument("--vectors", default="/tmp/inferd-ann-bench/real.npy")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    rows_out = []
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)            # numpy's BLAS on one thread, as the daemon runs it (threads.blas)
    rng = np.random.default_rng(11)
    for n in (int(x) for x in args.sizes.split(",")):
        vecs = dataset(n, args.vectors if os.path.exists(args.vectors) else "", 11)
        _, qs = changed_copies(vecs, min(args.queries, n), rng)
        tmp = tempfile.mkdtemp(prefix="inferd-annx", dir="/tmp")
        try:
            store = EmbeddingStore.open(os.path.join(tmp, "e.store"), n, vecs.shape[1], index=IndexOptions(exact_below=0))
            try:
                for i in range(n):
                    store.add(i.to_bytes(32, "little"), vecs[i], None, uid=0)
                while store.index_stats()["pending"]:
                    time.sleep(0.05)  # noqa: sleep-ok (waiting for the inserter thread)

                def exact(q):
                    with store._lock:
                        return store._search_exact(store._unit(q), 10, -1.0, 0)

                t_index, t_exact, agree = [], [], 0
                for q in qs:
                    t = time.perf_counter()
                    a = store.search(q, 10, -1.0, uid=0)
                    t_index.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    b = exact(q)
                    t_exact.append(time.perf_counter() - t)
                    agree += a[0][0] == b[0][0]
            finally:
                store.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        si, se = latency_stats(t_index), latency_stats(t_exact)
        row = {"rows": n, "index_p50_ms": round(si["p50_ms"], 3), "index_p99_ms": round(si["p99_ms"], 3),
               "exact_p50_ms": round(se["p50_ms"], 3), "exact_p99_ms": round(se["p99_ms"], 3),
               "top1_agree": round(agree / len(qs), 4)}
        rows_out.append(row)
        log(json.dumps(row))
    return print_json(rows_out, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
