"""The near-duplicate index's inverted-file scopes (``embeddings.index_kind = "ivf"``): faiss
IndexIVFScalarQuantizer lists over one set of trained centroids, behind the interface the index
(daemon/caching/ann_index.py) asks of a usearch graph.

Why an inverted file beside the HNSW graphs (docs/benchmarks.md "Near-duplicate index"): an HNSW
insert at a million rows walks the graph, ~ef_construction x M distances a layer, 0.3-0.4 ms of
the inserter's CPU per stored frame; an IVF insert is one assignment to the nearest of ``nlist``
centroids (a walk of a small HNSW graph over the centroids) and an append of the row's int8 code
(one byte a float) and key to that centroid's list: ~0.04 ms at any size. A query finds the
``nprobe`` nearest centroids the same way and scans their lists. The store re-ranks every candidate by its own float32
vectors (NOTE [ searching ] in embedding_store.py), so the int8 codes only have to find them.

Centroids. They are trained (k-means, faiss) once on a sample of the store's rows, by the
inserter thread, once the store holds ``train_rows`` of them (before that the store answers by
its exact scan, as during a rebuild: NOTE [ IVF training ] in ann_index.py), and then shared by
every scope (a uid's lists, or every row's with ``embeddings.shared``): one copy in memory
(``nlist * dim`` floats: 5 MB at 4,096 lists) and one file. Rows stored later than the sample are
assigned to the same centroids; new kinds of image make some lists longer (slower queries), not
wrong ones (a near copy lands in its original's list or a neighbouring one).

Files (in the index directory, named by ann_file.py; their checksums in ``meta``):

``centroids-<generation>.ivf``: faiss ``write_index`` of an empty trained IndexIVFScalarQuantizer
(the centroids in their HNSW graph, and the scalar quantizer's ranges); read with ``read_index``.

``scope-<uid or all>-<generation>.ivf``, one scope's lists (all integers little-endian; written
by the daemon alone)::

    offset          size             field
    0               8                magic            b"INFDIVFS"
    8               4                format version   u32, currently 1
    12              4                nlist            u32, lists (the centroids')
    16              4                code size        u32, bytes a row's code (dim, int8)
    20              4                reserved         zero
    24              8                rows             u64, N
    32              nlist * 8        list sizes       u64 each, summing to N
    32 + nlist * 8  N * 8            keys             i64, list by list (row | version << 32)
    ...             N * code size    codes            u8, list by list, in the keys' order
"""
from __future__ import annotations

import os
import struct
import threading
import types

import numpy as np

MAGIC = b"INFDIVFS"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sIIIIQ")                 # 32 bytes

PAD = 16                                          # faiss scans int8 codes with SIMD only when dim % 16 == 0
QUANTIZER_M, QUANTIZER_EF = 32, 32                # the centroids' HNSW graph (Centroids.train)
SLACK = 8                                         # a restored list's room: 1/SLACK of its rows

# NOTE [ room to grow ]
# A list read back from its file (IvfScope.restore) is allocated at its exact size, so the first
# row appended to it after a restart copies the whole list to a larger allocation (faiss keeps a
# list's ids and codes in a std::vector each): at a million rows ~80 KB and ~20 fresh pages per
# insert for the first few thousand inserts, 0.098 against 0.051 ms an insert in-process
# (2,048 rows 64 at a time into the restored million-row lists, then 2,048 more), and what the
# daemon's CPU per frame measured after a restart was mostly that. So each list is restored with
# room for 1/SLACK more rows (~40 bytes a row at a million rows: 12 % of the lists, 2 % of the
# store and lists together), the growth of ~125,000 inserts spread over the lists before any copy.
_local = threading.local()


def padded(dim: int) -> int:
    """The width the lists keep: ``dim`` zero-padded to a multiple of PAD (305 -> 320). The
    scalar fallback faiss takes for any other width scanned 3.5x slower (bench/ann/inserts.py ``--pad``)."""
    return -(-dim // PAD) * PAD


def _pad(vectors: np.ndarray, width: int) -> np.ndarray:
    v = np.asarray(vectors, np.float32)
    v = v.reshape(1, -1) if v.ndim == 1 else v
    if v.shape[1] == width:
        return np.ascontiguousarray(v)
    out = np.zeros((len(v), width), np.float32)
    out[:, :v.shape[1]] = v
    return out


def _faiss():
    """faiss, with its OpenMP team at one thread for the calling thread: a query or an insert of
    the daemon must never wake a second team beside the CPU devices' (the bundled OpenBLAS, which
    the inserts' assignment calls, is OpenMP's too). OpenMP's thread count is a per-thread
    setting, so each thread that calls faiss sets it once (training asks for more, explicitly)."""
    import faiss

    if not getattr(_local, "one", False):
        faiss.omp_set_num_threads(1)
        _local.one = True
    return faiss


def auto_lists(capacity: int) -> int:
    """The lists for a store of ``capacity`` rows: the power of two nearest 4 * sqrt(capacity)
    (4,096 at a million rows: ~250 rows a list), 64 at least."""
    return max(64, 1 << int(round(np.log2(4 * np.sqrt(max(1, capacity))))))


class Centroids:
    """The trained part every scope shares: the coarse quantizer and the int8 ranges."""

    def __init__(self, template):
        self.template = template                  # an empty, trained IndexIVFScalarQuantizer
        self.nlist, self.dim = template.nlist, template.d

    @classmethod
    def train(cls, sample: np.ndarray, nlist: int, threads: int = 1, iterations: int = 10) -> "Centroids":
        """k-means over ``sample`` (rows x dim float32, unit) into ``nlist`` centroids, on
        ``threads`` OpenMP threads (set back to one after)."""
        faiss = _faiss()
        dim = padded(sample.shape[1])
        sample = _pad(sample, dim)
        # the centroids in a small HNSW graph: an insert's assignment walks it (~0.04 ms a row at
        # 4,096 lists) instead of comparing the row with every centroid (0.14-0.16 ms, batched
        # through BLAS: bench/ann/inserts.py --ivf 4096/flat/8bit,4096/hnsw/8bit)
        quantizer = faiss.IndexHNSWFlat(dim, QUANTIZER_M, faiss.METRIC_INNER_PRODUCT)
        quantizer.hnsw.efConstruction, quantizer.hnsw.efSearch = 40, QUANTIZER_EF
        template = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                 faiss.METRIC_INNER_PRODUCT, False)
        template.own_fields = True                # the quantizer goes with the template
        quantizer.this.disown()
        template.cp.niter = iterations
        template.cp.max_points_per_centroid = max(1, len(sample) // nlist + 1)  # no second sampling
        faiss.omp_set_num_threads(max(1, threads))
        try:
            template.train(sample)
        finally:
            faiss.omp_set_num_threads(1)
        return cls(template)

    def save(self, path: str) -> None:
        _faiss().write_index(self.template, path)

    @classmethod
    def load(cls, path: str, dim: int) -> "Centroids":
        faiss = _faiss()
        try:
            template = faiss.read_index(path)
        except RuntimeError as exc:
            raise ValueError(f"centroids file {os.path.basename(path)} unreadable: {exc}") from None
        if not isinstance(template, faiss.IndexIVFScalarQuantizer) or template.d != padded(dim) \
                or not template.is_trained:
            raise ValueError(f"centroids file {os.path.basename(path)} is not a trained {padded(dim)}-dim IVF-SQ")
        return cls(template)

    def new_scope(self) -> "IvfScope":
        faiss = _faiss()
        t = self.template
        ivf = faiss.IndexIVFScalarQuantizer(t.quantizer, t.d, t.nlist, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT, False)
        ivf.sq = t.sq                             # the trained ranges (copied)
        ivf.is_trained = True
        return IvfScope(ivf, self)


class IvfScope:
    """One scope's lists, answering as much of usearch's Index as AnnIndex asks: ``add(keys,
    vectors)``, ``remove(keys)``, ``search(query, count).keys``, ``save(path)``, ``len``."""

    def __init__(self, ivf, centroids: Centroids):
        self.ivf, self.centroids = ivf, centroids     # centroids: keeps the shared quantizer alive
        self.width, self.nprobe = ivf.d, 16

    def __len__(self) -> int:
        return int(self.ivf.ntotal)

    @property
    def serialized_length(self) -> int:
        return _HEAD.size + 8 * self.ivf.nlist + len(self) * (8 + self.ivf.code_size)

    def add(self, keys: np.ndarray, vectors: np.ndarray, threads: int = 1) -> None:
        _faiss()                                  # this thread's OpenMP team: one
        self.ivf.add_with_ids(_pad(vectors, self.width), np.asarray(keys, np.uint64).view(np.int64))

    def remove(self, keys: np.ndarray) -> None:
        """One pass over every list (no direct map kept: 8+ bytes a row); the index batches removals
        (NOTE [ deferred removals ] in ann_index.py)."""
        self.ivf.remove_ids(_faiss().IDSelectorBatch(np.asarray(keys, np.uint64).view(np.int64)))

    def search(self, query: np.ndarray, count: int, threads: int = 1):
        faiss = _faiss()
        params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        _, keys = self.ivf.search(_pad(query, self.width), count, params=params)
        keys = keys[0]
        return types.SimpleNamespace(keys=keys[keys != -1].view(np.uint64))

    # the file ----------------------------------------------------------------------------------
    def _lists(self):
        faiss, il, cs = _faiss(), self.ivf.invlists, self.ivf.code_size
        for l in range(self.ivf.nlist):
            n = il.list_size(l)
            if n:
                yield l, n, faiss.rev_swig_ptr(il.get_ids(l), n), faiss.rev_swig_ptr(il.get_codes(l), n * cs)

    def save(self, path: str) -> None:
        """Write the lists to ``path`` (the caller renames and fsyncs: ann_index.py's save)."""
        nlist = self.ivf.nlist
        sizes = np.zeros(nlist, "<u8")
        lists = list(self._lists())
        for l, n, _, _ in lists:
            sizes[l] = n
        with open(path, "wb") as fh:
            fh.write(_HEAD.pack(MAGIC, FORMAT_VERSION, nlist, self.ivf.code_size, 0, int(sizes.sum())))
            fh.write(sizes.tobytes())
            for _, _, ids, _ in lists:
                fh.write(memoryview(ids.astype("<i8", copy=False)).cast("B"))
            for _, _, _, codes in lists:
                fh.write(memoryview(codes).cast("B"))

    @classmethod
    def restore(cls, path: str, centroids: Centroids) -> "IvfScope":
        """The scope saved at ``path``, read whole into memory (~313 bytes a row). Raises
        ValueError if the file is not one for ``centroids``."""
        faiss = _faiss()
        data = np.fromfile(path, np.uint8)
        if len(data) < _HEAD.size:
            raise ValueError(f"{os.path.basename(path)} truncated to {len(data)} bytes")
        magic, version, nlist, code_size, _, rows = _HEAD.unpack_from(data)
        scope = centroids.new_scope()
        ivf = scope.ivf
        lists_end = _HEAD.size + 8 * nlist
        if magic != MAGIC or version != FORMAT_VERSION or nlist != ivf.nlist or code_size != ivf.code_size \
                or len(data) != lists_end + rows * (8 + code_size):
            raise ValueError(f"{os.path.basename(path)} is not a scope of these centroids "
                             f"(magic {magic!r} version {version}, {nlist} lists, {len(data)} bytes)")
        sizes = data[_HEAD.size:lists_end].view("<u8")
        if int(sizes.sum()) != rows:
            raise ValueError(f"{os.path.basename(path)}: list sizes add up to {int(sizes.sum())}, not {rows}")
        keys = data[lists_end:lists_end + 8 * rows].view("<i8")
        codes = data[lists_end + 8 * rows:]
        at, lists = 0, ivf.invlists
        for l in np.flatnonzero(sizes).tolist():
            n = int(sizes[l])
            k = np.ascontiguousarray(keys[at:at + n])
            c = np.ascontiguousarray(codes[at * code_size:(at + n) * code_size])
            lists.resize(l, n + n // SLACK + 1)     # the room (NOTE [ room to grow ]), kept at size 0
            lists.resize(l, 0)
            lists.add_entries(l, n, faiss.swig_ptr(k), faiss.swig_ptr(c))
            at += n
        ivf.ntotal = rows
        return scope
