"""Insert CPU against recall: usearch HNSW at several connectivity (M) / expansion_add, and a faiss IVF layout.

    python -m bench.ann.inserts --vectors /tmp/inferd-ann-bench/real.npy [--rows 50000] [--queries 500]
    python -m bench.ann.inserts --vectors /tmp/inferd-ann-bench/real.npy --graph STORE.index/scope-0-1.usearch

``--rows`` real embeddings (305 floats, unit) are inserted one 256-row batch at a time, as the
index's inserter thread does; the CPU seconds of the process per row inserted are reported (the
last 10 % of the rows alone too: the cost at the full size), then ``--queries`` changed copies (a
stored row plus noise, cosine ~0.95 to it) and as many other real rows (not stored) are asked for
the index's candidates (k + 16 = 26, what the store re-ranks): recall is the fraction whose
original (changed copies) or exact nearest stored row (other rows) is among them, query p50 / p99
one query at a time. faiss ``IndexIDMap(IndexIVFScalarQuantizer(fp16))``: an insert is one
centroid assignment and an append; a query scans ``nprobe`` lists; rows can be removed by id.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

CAND = 26


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def fill(add, x):
    n, c0 = len(x), cpu()
    tail = int(n * 0.9)
    for s in range(0, n, 256):
        if s <= tail < s + 256:
            c1 = cpu()
        add(np.arange(s, min(n, s + 256)), x[s:s + 256])
    c2 = cpu()
    return {"insert_ms_cpu": round(1e3 * (c2 - c0) / n, 3), "insert_ms_cpu_last10pct": round(1e3 * (c2 - c1) / (n - tail), 3)}


def ask(search, queries, want):
    times, hits = [], 0
    for q, w in zip(queries, want):
        t = time.perf_counter()
        keys = search(q)
        times.append(time.perf_counter() - t)
        hits += int(w in set(np.asarray(keys).tolist()))
    t = np.sort(times)
    return {"recall": round(hits / len(want), 4), "p50_ms": round(1e3 * t[len(t) // 2], 3),
            "p99_ms": round(1e3 * t[int(len(t) * 0.99)], 3)}


def graph_costs(path: str, vectors: str, batches: list[int], ef_add: list[int]) -> dict:
    """In a saved graph (the daemon's ``scope-*.usearch``, loaded writable): CPU a row of an
    insert call of ``batch`` new keys, and of one after removing ``batch`` keys (as a full store
    recycles rows): what NOTE [ batched inserts ] and [ deferred removals ] in
    daemon/caching/ann_index.py are about."""
    from usearch.index import Index

    ix = Index.restore(path, view=False)
    real = np.load(vectors, mmap_mode="r")
    rng = np.random.default_rng(1)
    out, new_key, old_key = {"rows": len(ix), "dtype": ix.dtype.name, "connectivity": ix.connectivity}, 1 << 40, 0
    for ef in ef_add:
        ix.expansion_add = ef
        for b in batches:
            v = np.ascontiguousarray(real[rng.integers(0, len(real), 2 * b)])
            c = cpu()
            ix.add(np.arange(new_key, new_key + b), v[:b], threads=1)
            fresh = cpu() - c
            new_key += b
            keys = np.arange(old_key, old_key + b)
            old_key += b
            c = cpu()
            ix.remove(keys)
            ix.add(keys, v[b:], threads=1)
            recycled = cpu() - c
            out[f"ef_add{ef} batch{b}"] = {"new_ms_a_row": round(1e3 * fresh / b, 3),
                                           "recycled_ms_a_row": round(1e3 * recycled / b, 3),
                                           "recycled_call_ms": round(1e3 * recycled, 1)}
            print(json.dumps({f"ef_add{ef} batch{b}": out[f"ef_add{ef} batch{b}"]}), flush=True)
    return out


def ivf_costs(spec, x, rng, args, copies, pick, others, nearest):
    """One faiss IVF layout, ``nlist/quantizer/scalar`` (quantizer: flat = every centroid compared,
    batched through BLAS; hnsw = an HNSW graph over the centroids; scalar: 8bit or fp16): training,
    insert CPU a row in batches of ``--batch``, list sizes, query costs at each nprobe, and the
    cost of removing 1/64 of the rows at once (NOTE [ deferred removals ] in ann_index.py)."""
    import faiss

    nlist, qkind, scalar = spec.split("/")
    if args.pad:                                        # faiss' SIMD scan wants dim % 16 == 0 (else scalar code)
        padded = -(-x.shape[1] // args.pad) * args.pad
        pad = lambda a: np.pad(np.asarray(a, np.float32), ((0, 0), (0, padded - a.shape[1])))
        x, copies, others = pad(x), pad(copies), pad(others)
    nlist, dim = int(nlist), x.shape[1]
    quant = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT) if qkind == "hnsw" else faiss.IndexFlatIP(dim)
    if qkind == "hnsw":
        quant.hnsw.efConstruction, quant.hnsw.efSearch = 40, args.quantizer_ef
    qt = {"8bit": faiss.ScalarQuantizer.QT_8bit, "fp16": faiss.ScalarQuantizer.QT_fp16}[scalar]
    ivf = faiss.IndexIVFScalarQuantizer(quant, dim, nlist, qt, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.niter = args.train_iter
    t = time.perf_counter()
    faiss.omp_set_num_threads(2)                        # training is set-up, not an insert
    first = args.train_first or args.rows               # drift: centroids of the early rows only
    ivf.train(x[rng.choice(first, min(first, args.train_per_list * nlist), replace=False)])
    faiss.omp_set_num_threads(1)
    res = {"nlist": nlist, "quantizer": qkind, "dim": dim, "trained_on_first": args.train_first or args.rows,
           "scalar": scalar, "train_s": round(time.perf_counter() - t, 2)}
    n, c0 = len(x), cpu()
    tail = int(n * 0.9)
    for s in range(0, n, args.batch):
        if s <= tail < s + args.batch:
            c1 = cpu()
        ivf.add_with_ids(x[s:s + args.batch], np.arange(s, min(n, s + args.batch), dtype=np.int64))
    c2 = cpu()
    res.update({"insert_ms_cpu": round(1e3 * (c2 - c0) / n, 4),
                "insert_ms_cpu_last10pct": round(1e3 * (c2 - c1) / (n - tail), 4)})
    sizes = np.array([ivf.invlists.list_size(i) for i in range(nlist)])
    res["list_rows"] = {"mean": round(float(sizes.mean()), 1), "p99": int(np.percentile(sizes, 99)), "max": int(sizes.max())}
    res["bytes_per_row"] = round((ivf.code_size + 8) + nlist * dim * 4 * (2 if qkind == "hnsw" else 1) / n, 1)
    for nprobe in map(int, args.nprobe.split(",")):
        ivf.nprobe = nprobe
        s = lambda q: ivf.search(q[None], CAND)[1][0]
        res[f"nprobe{nprobe}"] = {"changed": ask(s, copies, pick), "other": ask(s, others, nearest)}
        print(json.dumps({f"nprobe{nprobe}": res[f"nprobe{nprobe}"]}), flush=True)
    gone = np.arange(0, n, 64, dtype=np.int64)
    c = cpu()
    ivf.remove_ids(faiss.IDSelectorBatch(gone))
    res["remove_1_64th_s_cpu"] = round(cpu() - c, 3)
    return f"faiss IVF{nlist}-{qkind}-SQ{scalar}", res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ann.inserts", description=__doc__.split("\n")[0])
    ap.add_argument("--vectors", default="", help=".npy of real unit embeddings (rows x dim)")
    ap.add_argument("--store", default="", help="instead: the vectors of an embedding store file "
                    "(bench.ann --build-only's), its last --queries rows asked as the other rows")
    ap.add_argument("--dim", type=int, default=305)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--hnsw", default="16/64,16/32,16/16,12/32,8/32",
                    help="M/expansion_add[/scalar] (f16 unless said: i8, bf16)")
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (default: 4 * sqrt(rows); -1: no IVF)")
    ap.add_argument("--nprobe", default="8,16,32,64")
    ap.add_argument("--ivf", default="", help="IVF layouts nlist/quantizer/scalar, e.g. 4096/hnsw/8bit,4096/flat/8bit "
                    "(default: one --nlist/flat/fp16)")
    ap.add_argument("--pad", type=int, default=0, help="IVF: zero-pad vectors to a multiple of this many floats")
    ap.add_argument("--batch", type=int, default=256, help="IVF rows an insert call")
    ap.add_argument("--quantizer-ef", type=int, default=32, help="efSearch of an HNSW quantizer")
    ap.add_argument("--train-per-list", type=int, default=40, help="IVF training rows per list")
    ap.add_argument("--train-first", type=int, default=0, help="IVF: train on the first N rows only "
                    "(bench.ann's stores: 100k real rows, then synthetic ones: recall of rows stored after)")
    ap.add_argument("--train-iter", type=int, default=10, help="k-means iterations of IVF training")
    ap.add_argument("--graph", default="", help="instead: insert costs in this saved graph file "
                    "(a store's .index/scope-*.usearch), --batches rows a call, with --vectors")
    ap.add_argument("--batches", default="8,64,1024")
    ap.add_argument("--ef-add", default="32", help="expansion_add values for --graph")
    args = ap.parse_args(argv)
    if args.graph:
        graph_costs(args.graph, args.vectors, [int(b) for b in args.batches.split(",")],
                    [int(e) for e in args.ef_add.split(",")])
        return 0
    import faiss
    from usearch.index import Index

    faiss.omp_set_num_threads(1)
    if args.store:                                      # header 4096 bytes, then rows of dim float32
        real = np.memmap(args.store, np.float32, "r", 4096, (args.rows + args.queries, args.dim))
    else:
        real = np.load(args.vectors, mmap_mode="r")
    x = np.ascontiguousarray(real[:args.rows], np.float32)
    rng = np.random.default_rng(7)
    pick = rng.integers(0, args.rows, args.queries)
    noise = rng.standard_normal((args.queries, x.shape[1])).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    copies = x[pick] + 0.33 * noise
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    others = np.ascontiguousarray(real[args.rows:args.rows + args.queries], np.float32)
    nearest = np.argmax(others @ x.T, axis=1)
    out = {"rows": args.rows, "queries": args.queries, "copy_cosine": round(float(np.mean(np.sum(copies * x[pick], 1))), 3)}
    for pair in filter(None, args.hnsw.split(",")):
        m, ef, scalar = (pair + "/f16").split("/")[:3]
        m, ef = int(m), int(ef)
        ix = Index(ndim=x.shape[1], metric="cos", dtype=scalar, connectivity=m, expansion_add=ef, expansion_search=64)
        res = fill(lambda k, v: ix.add(k, v, threads=1), x)
        s = lambda q: ix.search(q, CAND, threads=1).keys
        res["changed"], res["other"] = ask(s, copies, pick), ask(s, others, nearest)
        res["graph_bytes_per_row"] = round(ix.serialized_length / len(ix))
        name = f"usearch {scalar} M{m} ef_add{ef}"
        out[name] = res
        print(json.dumps({name: res}), flush=True)
        del ix
    if args.nlist < 0:
        return 0
    specs = args.ivf.split(",") if args.ivf else [f"{args.nlist or int(4 * np.sqrt(args.rows))}/flat/fp16"]
    for spec in specs:
        name, res = ivf_costs(spec, x, rng, args, copies, pick, others, nearest)
        out[name] = res
        print(json.dumps({name: res}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
