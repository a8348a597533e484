"""Which approximate-nearest-neighbour library backs the embedding store's index: measured.

    python -m bench.ann.libs [--rows 100000] [--vectors FILE.npy] [--libs usearch,hnswlib,faiss,voyager]
                             [--queries 1000] [--uids U] [--out FILE]

Every library builds an HNSW graph of the same shape (M / connectivity 16, ef_construction 128)
over the same unit vectors (``--vectors``: an ``.npy`` of real embeddings, e.g. the built-in model's
305-float ones that ``python -m bench.ann --save-vectors`` writes; rows beyond the file, or all of
them without one, are synthetic: mixtures of two real rows plus noise, or Gaussian when there is
no file), one insert call per row from one thread (how the daemon adds), cosine similarity. Then:

* **build**: rows per second; **memory per row**: the process's resident growth over the build and
  the saved file's size, both divided by the rows (the raw vector is 4 * dim bytes);
* **query** p50 / p99 of one k=10 search at a time, one thread, at ef 32 / 64 / 128, and its
  **recall** against the exact scan (float32 product over all rows): recall@1 (the exact best is
  the first answer) and recall@10, for queries that are changed copies of stored rows (a stored row
  plus noise, cosine ~0.95 to it) and for unrelated rows;
* **save** time, **reopen** time (memory-mapped where the library can: usearch ``view``, faiss
  ``IO_FLAG_MMAP``; hnswlib and voyager read the whole file) and the first query after it.

The exact scan runs in the same process as the reference (its p50 / p99 are reported too).

``--uids U``: instead, how a uid's search is kept to its own rows (usearch, float16): one graph
per uid against one graph of every row whose answers are filtered by uid (asked for 10x and 100x
k), rows spread over U uids by a Zipf law: recall@1 and p50 / p99 for the small uids and the large
ones, build time and memory per row.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from ..lib.measure import latency_stats
from ..lib.report import print_json, prog

M, EF_CONSTRUCTION, K = 16, 128, 10
EFS = (32, 64, 128)


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float32)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def dataset(rows: int, path: str, seed: int) -> np.ndarray:
    """``rows`` unit vectors: the file's first, then synthetic ones (see the module)."""
    rng = np.random.default_rng(seed)
    real = np.load(path, mmap_mode="r") if path else None
    dim = real.shape[1] if real is not None else 305
    out = np.empty((rows, dim), np.float32)
    have = 0 if real is None else min(rows, len(real))
    if have:
        out[:have] = real[:have]
    for start in range(have, rows, 100_000):
        n = min(100_000, rows - start)
        if real is not None:
            a, b = rng.integers(0, len(real), n), rng.integers(0, len(real), n)
            w = rng.uniform(0.2, 0.8, (n, 1)).astype(np.float32)
            mix = w * real[np.sort(a)][rng.permutation(n)] + (1 - w) * real[np.sort(b)][rng.permutation(n)]
            out[start:start + n] = unit(mix + rng.standard_normal((n, dim)).astype(np.float32) * 0.02)
        else:
            out[start:start + n] = unit(rng.standard_normal((n, dim)))
    return out


def changed_copies(vecs: np.ndarray, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Stored rows plus noise of cosine ~0.95 to them: (rows, queries)."""
    rows = rng.choice(len(vecs), n, replace=False)
    noise = unit(rng.standard_normal((n, vecs.shape[1]))) * 0.33
    return rows, unit(vecs[rows] + noise)


class Lib:
    """One library's HNSW, behind the four calls this benchmark makes."""
    name = ""

    def __init__(self, dim: int, rows: int):
        self.dim, self.rows = dim, rows

    def add(self, key: int, v: np.ndarray): ...
    def search(self, q: np.ndarray, k: int) -> np.ndarray: ...
    def set_ef(self, ef: int): ...
    def save(self, path: str): ...
    def reopen(self, path: str) -> "Lib": ...


class USearch(Lib):
    name = "usearch"

    def __init__(self, dim, rows, dtype="f32", index=None):
        super().__init__(dim, rows)
        from usearch.index import Index
        self.dtype = dtype
        self.name = f"usearch-{dtype}"
        self.ix = index or Index(ndim=dim, metric="cos", dtype=dtype, connectivity=M,
                                 expansion_add=EF_CONSTRUCTION, expansion_search=64)

    def add(self, key, v):
        self.ix.add(key, v, threads=1)

    def search(self, q, k):
        return self.ix.search(q, k, threads=1).keys

    def set_ef(self, ef):
        self.ix.expansion_search = ef

    def save(self, path):
        self.ix.save(path)

    def reopen(self, path):
        from usearch.index import Index
        return USearch(self.dim, self.rows, self.dtype, Index.restore(path, view=True))


class HnswLib(Lib):
    name = "hnswlib"

    def __init__(self, dim, rows, index=None):
        super().__init__(dim, rows)
        import hnswlib
        self.ix = index
        if index is None:
            self.ix = hnswlib.Index(space="cosine", dim=dim)
            self.ix.init_index(max_elements=rows, ef_construction=EF_CONSTRUCTION, M=M, allow_replace_deleted=True)
        self.ix.set_num_threads(1)

    def add(self, key, v):
        self.ix.add_items(v[None], [key], num_threads=1, replace_deleted=True)

    def search(self, q, k):
        return self.ix.knn_query(q[None], k, num_threads=1)[0][0]

    def set_ef(self, ef):
        self.ix.set_ef(ef)

    def save(self, path):
        self.ix.save_index(path)

    def reopen(self, path):
        import hnswlib
        ix = hnswlib.Index(space="cosine", dim=self.dim)
        ix.load_index(path, max_elements=self.rows, allow_replace_deleted=True)
        return HnswLib(self.dim, self.rows, ix)


class Faiss(Lib):
    name = "faiss"

    def __init__(self, dim, rows, index=None):
        super().__init__(dim, rows)
        import faiss
        faiss.omp_set_num_threads(1)
        self.ix = index
        if index is None:
            self.ix = faiss.IndexHNSWFlat(dim, M, faiss.METRIC_INNER_PRODUCT)
            self.ix.hnsw.efConstruction = EF_CONSTRUCTION
        self.params = faiss.SearchParametersHNSW(efSearch=64)

    def add(self, key, v):               # faiss HNSW numbers rows itself, in order (no removal)
        self.ix.add(v[None])

    def search(self, q, k):
        return self.ix.search(q[None], k, params=self.params)[1][0]

    def set_ef(self, ef):
        import faiss
        self.params = faiss.SearchParametersHNSW(efSearch=ef)

    def save(self, path):
        import faiss
        faiss.write_index(self.ix, path)

    def reopen(self, path):
        import faiss
        return Faiss(self.dim, self.rows, faiss.read_index(path, faiss.IO_FLAG_MMAP))


class Voyager(Lib):
    name = "voyager"

    def __init__(self, dim, rows, index=None):
        super().__init__(dim, rows)
        import voyager
        self.ix = index or voyager.Index(voyager.Space.Cosine, num_dimensions=dim, M=M,
                                         ef_construction=EF_CONSTRUCTION, max_elements=rows)
        self.ef = 64

    def add(self, key, v):
        self.ix.add_item(v, key)

    def search(self, q, k):
        return self.ix.query(q, k, num_threads=1, query_ef=self.ef)[0]

    def set_ef(self, ef):
        self.ef = ef

    def save(self, path):
        self.ix.save(path)

    def reopen(self, path):
        import voyager
        return Voyager(self.dim, self.rows, voyager.Index.load(path))


LIBS = {"usearch": lambda d, r: USearch(d, r, "f32"), "usearch-f16": lambda d, r: USearch(d, r, "f16"),
        "usearch-i8": lambda d, r: USearch(d, r, "i8"), "hnswlib": HnswLib, "faiss": Faiss, "voyager": Voyager}


def exact_top(vecs, qs, k):
    out = np.empty((len(qs), k), np.int64)
    for i in range(0, len(qs), 256):
        sims = qs[i:i + 256] @ vecs.T
        best = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, best, 1), axis=1)
        out[i:i + 256] = np.take_along_axis(best, order, 1)
    return out


def measure(name: str, vecs: np.ndarray, queries: dict, truth: dict, log) -> dict:
    rows, dim = vecs.shape
    gc.collect()
    before = rss()
    lib = LIBS[name](dim, rows)
    t0 = time.perf_counter()
    for i in range(rows):
        lib.add(i, vecs[i])
    build = time.perf_counter() - t0
    out = {"build_rows_per_s": round(rows / build), "build_s": round(build, 1),
           "rss_bytes_per_row": round((rss() - before) / rows)}
    log(f"  {name}: built {rows} rows in {build:.1f} s")

    def probe(ix, ef):
        ix.set_ef(ef)
        res = {}
        for kind, qs in queries.items():
            got, times = [], []
            for q in qs:
                t = time.perf_counter()
                got.append(ix.search(q, K))
                times.append(time.perf_counter() - t)
            got = np.asarray(got)
            st = latency_stats(times)
            t = truth[kind]
            res[kind] = {"p50_ms": round(st["p50_ms"], 3), "p99_ms": round(st["p99_ms"], 3),
                         "recall_at_1": round(float(np.mean(got[:, 0] == t[:, 0])), 4),
                         "recall_at_10": round(float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got, t)])), 4)}
        return res

    out["search"] = {f"ef{ef}": probe(lib, ef) for ef in EFS}
    tmp = tempfile.mkdtemp(prefix="inferd-annlib", dir="/tmp")
    try:
        path = os.path.join(tmp, "index")
        t0 = time.perf_counter()
        lib.save(path)
        out["save_s"] = round(time.perf_counter() - t0, 3)
        out["file_bytes_per_row"] = round(os.path.getsize(path) / rows)
        lib.ix = None                    # the built index goes; the wrapper knows how to reopen
        gc.collect()
        t0 = time.perf_counter()
        again = lib.reopen(path)
        out["reopen_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        again.set_ef(64)
        again.search(queries["changed"][0], K)
        out["first_query_after_reopen_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        out["after_reopen_ef64"] = probe(again, 64)
        del again
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def scoping(vecs: np.ndarray, uids: int, queries: int, rng, log) -> dict:
    """One graph per uid against one graph of every row filtered afterwards (usearch has no filter
    inside the search: the shared graph is asked for ``over`` times k and the other uids' rows
    dropped), rows spread over ``uids`` uids by a Zipf law (a few large holders, many small).
    recall@1: the uid's exact best (among its own rows) comes first."""
    from usearch.index import Index

    rows, dim = vecs.shape
    weights = 1.0 / np.arange(1, uids + 1)
    owner = rng.choice(uids, rows, p=weights / weights.sum())
    new = lambda: Index(ndim=dim, metric="cos", dtype="f16", connectivity=M, expansion_add=EF_CONSTRUCTION,
                        expansion_search=64)
    gc.collect()
    r0, t0 = rss(), time.perf_counter()
    shared = new()
    shared.add(np.arange(rows), vecs, threads=1)
    shared_s, shared_rss = time.perf_counter() - t0, rss() - r0
    gc.collect()
    r0, t0 = rss(), time.perf_counter()
    graphs = {}
    for u in range(uids):
        mine = np.flatnonzero(owner == u)
        if len(mine):
            graphs[u] = new()
            graphs[u].add(mine, vecs[mine], threads=1)
    per_uid_s, per_uid_rss = time.perf_counter() - t0, rss() - r0
    out = {"uids": uids, "rows": rows, "largest_uid_rows": int(np.bincount(owner).max()),
           "smallest_uid_rows": int(np.bincount(owner, minlength=uids).min()),
           "build_s": {"shared": round(shared_s, 1), "per_uid": round(per_uid_s, 1)},
           "rss_bytes_per_row": {"shared": round(shared_rss / rows), "per_uid": round(per_uid_rss / rows)}}
    picks = rng.choice(rows, queries, replace=False)
    noise = unit(rng.standard_normal((queries, dim))) * 0.33
    qs = unit(vecs[picks] + noise)
    for group, chosen in (("small_uids", [i for i in range(queries) if owner[picks[i]] >= uids // 2]),
                          ("large_uids", [i for i in range(queries) if owner[picks[i]] < 3])):
        res = {}
        truth = []
        for i in chosen:
            mine = np.flatnonzero(owner == owner[picks[i]])
            truth.append(mine[np.argmax(vecs[mine] @ qs[i])])
        for name in ("per_uid", "shared_x10", "shared_x100"):
            got, times = [], []
            for i in chosen:
                u = owner[picks[i]]
                t = time.perf_counter()
                if name == "per_uid":
                    keys = graphs[u].search(qs[i], K, threads=1).keys
                else:
                    over = 10 if name == "shared_x10" else 100
                    keys = shared.search(qs[i], min(rows, K * over), threads=1).keys
                    keys = keys[owner[keys] == u]
                times.append(time.perf_counter() - t)
                got.append(keys[0] if len(keys) else -1)
            st = latency_stats(times)
            res[name] = {"recall_at_1": round(float(np.mean(np.asarray(got) == np.asarray(truth))), 4),
                         "p50_ms": round(st["p50_ms"], 3), "p99_ms": round(st["p99_ms"], 3)}
        out[group] = {"queries": len(chosen), **res}
        log(f"  scoping, {group}: {json.dumps(out[group])}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=prog(), description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--vectors", default="", help=".npy of real unit embeddings (rows x dim)")
    p.add_argument("--libs", default="usearch,usearch-f16,hnswlib,faiss,voyager")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--uids", type=int, default=0, help="instead: per-uid graphs against one filtered graph, at this many uids")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)            # numpy's BLAS on one thread, as the daemon runs it (threads.blas)
    rng = np.random.default_rng(args.seed)
    vecs = dataset(args.rows, args.vectors, args.seed)
    _, changed = changed_copies(vecs, args.queries, rng)
    others = dataset(args.queries, "", args.seed + 1) if not args.vectors else \
        unit(dataset(args.rows + args.queries, args.vectors, args.seed + 1)[args.rows:])
    if args.uids:
        return print_json(scoping(vecs, args.uids, args.queries, rng, log), args.out)
    queries = {"changed": changed, "unrelated": others}
    t0 = time.perf_counter()
    truth = {kind: exact_top(vecs, qs, K) for kind, qs in queries.items()}
    exact_times = []
    for q in changed[:200]:
        t = time.perf_counter()
        sims = vecs @ q
        np.argpartition(-sims, K - 1)[:K]
        exact_times.append(time.perf_counter() - t)
    st = latency_stats(exact_times)
    report = {"rows": args.rows, "dim": vecs.shape[1], "vectors": args.vectors or "gaussian",
              "M": M, "ef_construction": EF_CONSTRUCTION, "k": K, "raw_vector_bytes": 4 * vecs.shape[1],
              "exact": {"p50_ms": round(st["p50_ms"], 3), "p99_ms": round(st["p99_ms"], 3)}, "libs": {}}
    log(f"data and exact answers in {time.perf_counter() - t0:.1f} s; exact p50 {st['p50_ms']:.2f} ms")
    for name in args.libs.split(","):
        report["libs"][name] = measure(name, vecs, queries, truth, log)
        log(json.dumps({name: report["libs"][name]}))
    return print_json(report, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
