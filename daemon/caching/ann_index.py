"""The near-duplicate index: HNSW graphs (usearch) over the embedding store's rows, one per scope;
or, with ``embeddings.index_kind = "ivf"``, inverted lists of int8 codes (faiss) over centroids
trained once the store holds enough rows (daemon/caching/ann_ivf.py: cheaper inserts at a million
rows; NOTE [ IVF training ] below). Everything else here holds for both kinds: a "graph" below is
either a usearch graph or one scope's lists.

The embedding store (daemon/caching/embedding_store.py) is the truth; this index only proposes
candidate rows, and the store answers from its own float32 vectors: every candidate is checked
against the store's current row (valid, visible to the asking uid) and its similarity computed
exactly there. So the index can cost a miss (the approximation: recall, measured in bench/ann),
never a wrong answer, another uid's row, or a stale tag.

Why usearch (bench/ann/libs.py, docs/benchmarks.md "Near-duplicate index"): on this machine, with
the built-in 305-float embeddings, it was the one library that memory-maps a saved graph (reopening
a million rows takes milliseconds, not a read of the file), stores vectors as float16 or int8 (the
graph takes ~760 or ~420 bytes a row beside the store's 1,332, within 2x of the raw vector in all),
removes keys (a full store recycles rows), and releases the GIL in search and insert. int8 with M
12 and ef_construction 32 is the default: at a million rows it finds the same near-duplicates as
float16 with M 16 and ef 64 for a third of the insert CPU (the store re-ranks every candidate by
its float32 vectors, so the int8 copy only has to find them). hnswlib searched fastest
but keeps float32 vectors and reads the whole file at open; faiss' HNSW cannot remove a row;
voyager was slowest.

Scopes. With ``embeddings.shared`` one graph holds every row; otherwise one graph per uid holds
that uid's rows (a uid's search walks its own graph only, so a small uid's rows are never drowned by
a large one's, which a filter over one shared graph would do: bench/ann/libs.py ``--uids``). The
graph key of a row is its store row number and a version (NOTE [ deferred removals ]).

NOTE [ index rows ]
A row is *indexed* when the graph of its scope holds it under the store row's current stamp, uid
and content hash (``self.rows``); a row the store wrote since is *pending* (``self.pending``, row ->
sequence number, filled by the store under its lock at every new row). A search asks the graph
for candidates and skips the pending ones, then scans the pending rows exactly: every row is in
one of the two. The inserter thread takes pending rows in batches, reads each row's vector under
the store lock, re-inserts it into its scope's graph (after removing the key from the scope it
had), and drops it from ``pending`` only if its sequence number did not move meanwhile (the store
wrote it again: it stays pending). While more than ``max_pending`` rows wait (a rebuild, a burst
of inserts on a fast device), the index does not answer; the store then scans exactly when it is
small enough (``exact_max``) and says overloaded otherwise (EmbeddingIndexBusy).

Saved every ``save_interval_s`` while rows changed, and at close (ann_file.py: layout and the
crash-safe order); reopened memory-mapped (usearch ``view``), checked on the inserter thread (NOTE
[ verified before searched ]) and served from the mapping once checked, while the same thread loads
a writable copy of each graph and swaps it in.

NOTE [ verified before searched ]
A restart must not wait for the checksum of a large graph (420 MB at a million rows: about half a
second warm, more cold), and must not search a damaged one either: usearch maps a graph file
without looking at its links, and a flipped byte in a link sends its search outside the mapping
(bench/ann/damage.py: a crash of the process, or keys the graph never held). The store would drop
a wrong key (it re-ranks every candidate with its own vectors), but not a crash. So ``open`` checks
only ``meta`` (its own checksums) and each graph file's size, maps the graphs, and returns: the
daemon classifies at once. The inserter thread then checks each graph file's checksum before it
does anything else; until every one passed, :meth:`answers` is False, and the store answers a near
query as it does during a rebuild: by its exact scan where the store is small enough
(``exact_max``), else with EmbeddingIndexBusy, a typed "retry in a moment" (the daemon's
overloaded answer) for the second or two the check takes. A graph that fails is dropped with
one log line and its rows are inserted again from the store (a rebuild).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time

import numpy as np

from ..pipeline.thread_pools import name_native_thread
from . import ann_file, ann_ivf
from .ann_file import ALL, CENTROIDS, IndexFileError

_log = logging.getLogger("inferd.embeddings")


@dataclasses.dataclass(frozen=True)
class IndexOptions:
    """What shapes the graphs and when they answer (EmbeddingsConfig documents each)."""
    kind: str = "hnsw"                  # or "ivf": daemon/caching/ann_ivf.py
    lists: int = 0                      # IVF lists; 0: ann_ivf.auto_lists(capacity)
    probe: int = 16                     # IVF lists scanned a query
    train_rows: int = 0                 # IVF: rows stored before training; 0: NOTE [ IVF training ]
    connectivity: int = 12
    expansion_add: int = 32
    scalar: str = "i8"
    expansion_search: int = 64
    exact_below: int = 5_000
    exact_max: int = 100_000
    max_pending: int = 4_096
    save_interval_s: float = 300.0
    batch_wait_s: float = 5.0
    threads: int = 1
    nice: int = 10


BATCH = 1024

# NOTE [ the kind follows the capacity ]
# ``embeddings.index_kind = "auto"`` (the default) takes IVF lists for a store of more than
# IVF_ABOVE rows of capacity and HNSW graphs up to it. At a million rows an HNSW insert walks the
# graph (0.35-0.44 ms of the inserter's CPU a stored frame, 1.11-1.29x the daemon's CPU a frame
# of the store off), where a list's is one assignment among trained centroids (~0.05 ms at any
# size) with the same recall and a query as fast (docs/benchmarks.md "Near-duplicate index").
# Up to ~100k rows a graph insert is ~0.1 ms, and a graph answers from index_exact_below rows
# with no training, where lists wait for 39 rows a list (~40k rows at 100k of capacity) and
# the exact scan answers until then: graphs there.
IVF_ABOVE = 100_000


def kind_for(kind: str, capacity: int) -> str:
    """The index kind ``embeddings.index_kind`` means for a store of ``capacity`` rows: "auto"
    resolved (NOTE [ the kind follows the capacity ]), "hnsw" and "ivf" as they are."""
    if kind != "auto":
        return kind
    return "ivf" if capacity > IVF_ABOVE else "hnsw"

# NOTE [ batched inserts ]
# A row the store recycles (a full store, every new image) must leave its graph before its new
# vector enters it, and usearch pays for removals at the next insert call, once per call: 40-65
# ms at a million rows (the earlier float16 graph: 44), whether one row was removed or a thousand (an
# insert alone: 0.3 ms, int8, M 12; bench/ann/inserts.py ``--graph``). So the inserter waits until
# BATCH rows are pending or ``batch_wait_s`` has passed since its last insert ended, and inserts
# them in one go; the removals themselves wait longer still (NOTE [ deferred removals ]). The
# pending rows are scanned exactly meanwhile (1024 rows: a tenth of a millisecond), so nothing is
# missed while they wait.

# NOTE [ deferred removals ]
# usearch's pass after removals (NOTE [ batched inserts ]) is paid once per insert call however
# few rows were removed, so at a few frames a second (a batch of tens of rows every
# ``batch_wait_s``) it cost more than the inserts. So a row's graph key is ``row | version << 32``,
# its version one more at each insert (``meta`` keeps it); a recycled row's old key stays in its
# graph, stale, and is removed with the others once they are 1/STALE_SHARE of the graph's nodes
# (at a million rows: one pass per ~16,000 rows) and before every save. A search drops the stale
# keys it meets (their version is not the row's), so they cost a few candidates, never an answer.
STALE_SHARE = 64


# NOTE [ the inserter yields ]
# On a host whose cores the request path keeps busy, the inserter is one more runnable thread
# beside a CPU device's OpenMP team: each time it takes a core from a team member, the other
# members wait at the next op's barrier (spinning, then a futex sleep and wake-up), CPU the
# frames pay for and no insert needs. Inserts can wait (the rows pending are scanned exactly
# meanwhile, up to ``max_pending``), frames cannot: so the inserter runs at a lower priority
# (Linux nice is per thread), ``nice`` steps below the daemon. At nice 10 it still gets about a
# tenth of a core that the request path wants whole (CFS weights 110 against 1024), enough for a
# few hundred inserts a second, and all of any idle core. The start-up's work (the graphs'
# checksums, their loading), which near queries wait for, runs at the daemon's priority.
def _lower_priority(nice: int, log) -> None:
    """Lower the calling thread's priority by ``nice`` steps (0: unchanged); a refusal costs a
    log line, never the thread."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:
        log.info("near-duplicate index: the inserter keeps the daemon's priority (%s)", exc)


class EmbeddingIndexBusy(Exception):
    """The index is rebuilding or far behind the store, and the store is too large to scan."""


class _Graph:
    """One scope's usearch graph, memory-mapped (read-only) or loaded (writable). ``size`` and
    ``bytes`` are copies for readers without the graph lock (stats on the event loop): usearch
    must not be asked while the inserter grows it."""

    def __init__(self, index, path: str | None = None):
        self.index, self.view_path = index, path       # view_path: the mapped file, until loaded
        self.dirty = path is None
        self.stale: list[int] = []                     # NOTE [ deferred removals ]
        if isinstance(index, ann_ivf.IvfScope):                                       # estimated
            self.per_row = index.width + 8
        else:
            self.per_row = index.ndim * ann_file.SCALAR_BYTES[index.dtype.name.lower()] + 10 * index.connectivity
        self.size = self.bytes = 0
        self.measure()

    def refresh(self) -> None:
        """Under the graph lock, after a change."""
        self.size = len(self.index)
        self.bytes = self.size * self.per_row

    def measure(self) -> None:
        """``refresh`` with the bytes a row takes measured: the serialized length, what the graph
        holds in memory (usearch's ``memory_usage`` counts a 16 MiB arena reservation per graph
        that stays virtual). O(rows): at open, load and save only."""
        self.size = len(self.index)
        if self.size:
            self.per_row = self.index.serialized_length / self.size
        self.refresh()

    def __len__(self) -> int:
        return self.size


class AnnIndex:
    """Opened by the store with :meth:`open`, fed by :meth:`changed` under the store's lock,
    asked by :meth:`candidates`. ``source`` is the store's side (see EmbeddingStore._index_source):
    ``lock``, ``state()`` -> (valid, stamp, uid, hash8) arrays, ``read(rows)`` -> same plus vectors."""

    def __init__(self, directory: str, ident: dict, options: IndexOptions, source, log=None):
        self.directory, self.ident, self.options, self.source = directory, ident, options, source
        self.log = log or _log
        self.rows = np.zeros(ident["capacity"], ann_file.ROW)   # what the graphs hold (NOTE above)
        self.pending: dict[int, int] = {}                   # row -> sequence number; store lock
        self._seq = 0
        self._pending_since = 0.0                           # when the oldest pending row came
        self.graphs: dict[int, _Graph] = {}
        self._lock = threading.Lock()                       # the graphs: one call at a time
        self._wake = threading.Condition(threading.Lock())
        self._stop = False
        self._generation = 0
        self._saved_at = time.monotonic()
        self._changed = False
        self.counters = {"reopened": 0, "rebuilt": 0, "inserted": 0, "saves": 0, "save_s": 0.0,
                         "searches": 0, "exact_searches": 0, "busy": 0, "thread_cpu_s": 0.0}
        self._thread: threading.Thread | None = None
        self._drop: list[int] = []
        self._held = 0                                      # rows the graphs hold
        self._checks: list[tuple[str, int]] = []            # (graph file, checksum) still to verify
        self._reopened: tuple = ()                          # its log line, said once verified
        self.verified = True                                # NOTE [ verified before searched ]
        self.centroids: ann_ivf.Centroids | None = None     # IVF: trained (NOTE [ IVF training ])
        self._ivf_files: tuple = ()                         # IVF: (centroids path, [(uid, path, rows)]) to load
        self._centroids_saved = False                       # IVF: the centroids file of _generation is theirs

    # opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str, ident: dict, options: IndexOptions, source, log=None) -> "AnnIndex":
        """Reopen the index saved in ``directory`` (memory-mapped) or start an empty one that the
        inserter thread fills from the store; either way its thread is running on return."""
        self = cls(directory, ident, options, source, log)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)                          # as private as the store beside it
        with source.lock:                                   # no add between the check and pending
            valid, stamp, uid, hash8 = source.state()
            try:
                self._reopen()
                held = self.rows["stamp"] != 0
                current = held & valid & (self.rows["stamp"] == stamp) & (self.rows["uid"] == uid) \
                    & (self.rows["hash"] == hash8)
                if held.any() and not current.any():        # a store rebuilt empty, or another one
                    raise IndexFileError("the store holds none of its rows")
                self.counters["reopened"] = 1
                stale = int((valid & ~current).sum())
                self._reopened = ("near-duplicate index %s reopened: %d rows, %d to insert", directory,
                                  int(current.sum()), stale)
                if self.verified:                           # else once its graphs passed their check
                    self.log.info(*self._reopened)
            except (IndexFileError, RuntimeError, ValueError, OSError) as exc:
                self.graphs, self.rows, self._held = {}, np.zeros(ident["capacity"], ann_file.ROW), 0
                current = np.zeros(len(valid), bool)
                if valid.any() or os.path.exists(ann_file.meta_path(directory)):
                    self.counters["rebuilt"] = 1
                    self.log.warning("near-duplicate index %s rebuilt from the store (%d rows): %s",
                                     directory, int(valid.sum()), exc)
            for row in np.flatnonzero(valid & ~current).tolist():
                self._seq += 1
                self.pending[row] = self._seq
            ann_file.remove_others(directory, {os.path.basename(g.view_path) for g in self.graphs.values()}
                                   | {os.path.basename(p) for p in (self._ivf_files[:1] + tuple(
                                       path for _, path, _ in (self._ivf_files[1] if self._ivf_files else ())))})
            # rows a graph holds that the store no longer has (not pending): removed by the thread
            self._drop = np.flatnonzero((self.rows["stamp"] != 0) & ~current & ~valid).tolist()
        self._thread = threading.Thread(target=self._run, name="inferd-ann", daemon=True)
        self._thread.start()
        return self

    def _reopen(self) -> None:
        generation, scopes, rows = ann_file.read_meta(self.directory, self.ident)
        if self.ident["kind"] == "ivf":                     # read whole once checked: on the thread
            cent = [path for uid, path, _, _ in scopes if uid == CENTROIDS]
            if len(cent) != 1:
                raise IndexFileError("an IVF index without its centroids file")
            self._ivf_files = (cent[0], [(uid, path, n) for uid, path, n, _ in scopes if uid != CENTROIDS])
            self.rows, self._generation = rows, generation
            self._held = int((rows["stamp"] != 0).sum())
            self._checks = [(path, crc) for _, path, _, crc in scopes]
            self.verified = False
            return
        from usearch.index import Index

        graphs = {}
        for uid, path, count, _ in scopes:
            index = Index.restore(path, view=True)
            if index is None or len(index) != count or index.ndim != self.ident["dim"]:
                raise IndexFileError(f"graph file {os.path.basename(path)} holds "
                                     f"{None if index is None else len(index)} rows, meta says {count}")
            self._tune(index)
            graphs[uid] = _Graph(index, path)
        self.graphs, self.rows, self._generation = graphs, rows, generation
        self._held = int((rows["stamp"] != 0).sum())
        self._checks = [(path, crc) for _, path, _, crc in scopes]
        self.verified = not self._checks

    def _new_graph(self):
        if self.ident["kind"] == "ivf":
            scope = self.centroids.new_scope()
            scope.nprobe = self.options.probe
            return scope
        from usearch.index import Index

        o = self.options
        return Index(ndim=self.ident["dim"], metric="cos", dtype=o.scalar, connectivity=o.connectivity,
                     expansion_add=o.expansion_add, expansion_search=o.expansion_search)

    def _tune(self, index) -> None:
        """A restored graph's expansions: a usearch file keeps neither, and a graph restored
        without them inserts with usearch's own ef 128 (twice the CPU of 64 an insert)."""
        index.expansion_add = self.options.expansion_add
        index.expansion_search = self.options.expansion_search

    # the store's side ------------------------------------------------------------------------
    def changed(self, row: int) -> None:
        """Row ``row`` holds a new image (the store calls this under its lock)."""
        self.changed_many((row,))

    def changed_many(self, rows) -> None:
        """:meth:`changed` for several rows (the store's batch write, under its lock): one wake-up
        at most, where the first pending row or a full BATCH comes (NOTE [ batched inserts ])."""
        pending, before = self.pending, len(self.pending)
        if not before:
            self._pending_since = time.monotonic()
        for row in rows:
            self._seq += 1
            pending[row] = self._seq
        after = len(pending)
        if after and (before == 0 or after // BATCH > before // BATCH):
            with self._wake:
                self._wake.notify()

    def answers(self) -> bool:
        """Whether the graphs plus an exact scan of the pending rows answer now (store lock): the
        graphs verified (NOTE [ verified before searched ]) and not too far behind the store (an
        IVF index not trained yet is all behind: NOTE [ IVF training ])."""
        return self.verified and len(self.pending) <= self.options.max_pending and \
            (self.centroids is not None or self.ident["kind"] != "ivf")

    def scope(self, uid: int | None) -> list[int]:
        if self.ident["shared"]:
            return [ALL]
        return list(self.graphs) if uid is None else [uid]

    def candidates(self, query: np.ndarray, count: int, uid: int | None) -> np.ndarray:
        """Up to ``count`` rows per scope ``uid`` searches, nearest first by the graph (its scalar kind).
        The caller checks each against the store and :meth:`pending` (NOTE [ index rows ])."""
        out = []
        with self._lock:
            self.counters["searches"] += 1
            for key in self.scope(uid):
                g = self.graphs.get(key)
                if g is not None and len(g):
                    keys = np.asarray(g.index.search(query, min(count, len(g)), threads=1).keys, np.uint64)
                    keys = keys[(keys & np.uint64(0xFFFFFFFF)) < len(self.rows)]
                    rows = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
                    # a stale key (NOTE [ deferred removals ]) is an older image of its row: dropped
                    live = (self.rows["ver"][rows] == (keys >> np.uint64(32))) & (self.rows["stamp"][rows] != 0)
                    out.append(rows[live])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def scope_rows(self, uid: int | None) -> int:
        return sum(len(self.graphs[k]) for k in self.scope(uid) if k in self.graphs)

    def stats(self) -> dict:
        """Counters for the daemon's stats: O(graphs), and no call into usearch (event loop)."""
        graphs = list(self.graphs.values())
        return {"rows": self._held, "pending": len(self.pending), "graphs": len(graphs), "verified": self.verified,
                "mapped": sum(g.view_path is not None for g in graphs), "bytes": sum(g.bytes for g in graphs),
                **self.counters}

    # the inserter thread ---------------------------------------------------------------------
    def _run(self) -> None:
        name_native_thread("inferd-ann")                    # its CPU apart in /proc, top -H, py-spy
        try:
            self._load_views()
            # after the start-up's checks and loads, which a near query waits for (busy)
            _lower_priority(self.options.nice, self.log)
            while not self._stop:
                # the inserter's own CPU (inserts, removals, checks, saves), for the daemon's stats
                self.counters["thread_cpu_s"] = round(time.thread_time(), 3)
                if self.ident["kind"] == "ivf" and self.centroids is None and not self._train():
                    with self._wake:                        # NOTE [ IVF training ]: not enough rows yet
                        if not self._stop:
                            self._wake.wait(self.options.batch_wait_s)
                    continue
                with self.source.lock:
                    batch = list(itertools.islice(self.pending.items(), 4 * BATCH))
                    wait = self._pending_since + self.options.batch_wait_s - time.monotonic()
                if batch and len(batch) < BATCH and wait > 0:   # NOTE [ batched inserts ]
                    with self._wake:
                        if not self._stop:
                            self._wake.wait(wait)
                    continue
                if batch:
                    self._insert(batch)
                    continue
                interval = self.options.save_interval_s
                with self._wake:
                    if not self._stop and not self.pending:
                        wait = max(0.0, self._saved_at + interval - time.monotonic()) if self._changed else None
                        if wait is None or wait > 0:
                            self._wake.wait(wait)
                if self._changed and time.monotonic() >= self._saved_at + interval:
                    self._try_save()
            with self.source.lock:
                batch = list(self.pending.items()) if len(self.pending) <= self.options.max_pending else []
            # a few: inserted now rather than at reopen (lists: only once trained)
            if batch and (self.centroids is not None or self.ident["kind"] != "ivf"):
                self._insert(batch)
            if self._changed:
                self._try_save()                            # the rest is pending at reopen
        except Exception:                                   # never silently: the index stops answering
            self.log.exception("near-duplicate index %s: inserter thread failed; exact search only",
                               self.directory)
            self.options = dataclasses.replace(self.options, max_pending=-1)

    def _verify(self) -> None:
        """Check the reopened graph files' checksums (NOTE [ verified before searched ]); on a
        mismatch drop every graph and make every row of the store pending: a rebuild."""
        try:
            for path, crc in self._checks:
                if self._stop:
                    return
                ann_file.check_graph(path, crc)
        except (IndexFileError, OSError) as exc:
            self._rebuild(exc)
        else:
            if self._ivf_files and not self._load_ivf():
                return
            if self._reopened:
                self.log.info(*self._reopened)
        self._checks = []
        self.verified = True

    def _rebuild(self, exc) -> None:
        """Drop every graph (and IVF centroids) and make every row of the store pending: one log line."""
        with self.source.lock:
            valid = self.source.state()[0]
            for row in np.flatnonzero(valid).tolist():      # pending first: stats never see neither
                self._seq += 1
                self.pending[row] = self._seq
            self._pending_since = time.monotonic()
            with self._lock:
                self.graphs, self._held, self._drop = {}, 0, []
                self.rows = np.zeros(self.ident["capacity"], ann_file.ROW)
                self.centroids, self._ivf_files = None, ()
        self.counters["reopened"], self.counters["rebuilt"] = 0, 1
        self._changed = True
        self._checks = []
        self.verified = True
        self.log.warning("near-duplicate index %s rebuilt from the store (%d rows): %s",
                         self.directory, int(valid.sum()), exc)

    def _load_ivf(self) -> bool:
        """Read the checked IVF files (centroids, then each scope's lists) into memory and serve
        from them; a file that does not read is a rebuild (False)."""
        path, scopes = self._ivf_files
        try:
            centroids = ann_ivf.Centroids.load(path, self.ident["dim"])
            if centroids.nlist != self.ident["lists"]:
                raise IndexFileError(f"centroids of {centroids.nlist} lists, {self.ident['lists']} configured")
            graphs = {}
            for uid, gpath, count in scopes:
                if self._stop:
                    return False                            # the next start reads them again
                scope = ann_ivf.IvfScope.restore(gpath, centroids)
                scope.nprobe = self.options.probe
                if len(scope) != count:
                    raise IndexFileError(f"{os.path.basename(gpath)} holds {len(scope)} rows, meta says {count}")
                g = graphs[uid] = _Graph(scope)
                g.dirty = False
        except (IndexFileError, ValueError, RuntimeError, OSError) as exc:
            self._rebuild(exc)
            return False
        with self._lock:
            self.graphs, self.centroids, self._ivf_files = graphs, centroids, ()
        self._centroids_saved = True
        return True

    # NOTE [ IVF training ]
    # An IVF index (daemon/caching/ann_ivf.py) needs centroids before its first row, trained on
    # rows like the ones it will hold. So until the store holds ``train_rows`` rows (by default
    # 39 a list, faiss' own minimum for a good k-means, but at most ``embeddings.index_exact_max``
    # and half the capacity) every row stays pending and the store answers by its exact scan (a
    # store over index_exact_max would answer busy: it never waits here, as train_rows is at
    # most that). Then the inserter samples up to 40 rows a list from the pending ones, trains
    # the centroids (k-means, 10 rounds: a minute of the niced thread at 4,096 lists and 100k
    # rows on this machine), and inserts every pending row as usual. The centroids are saved
    # with the lists and kept for the index's life: rows of later kinds are assigned to the
    # nearest of them (``bench.ann.inserts --train-first``: trained on the first 100k of a
    # million rows, every changed copy of the 900k after them found; docs/benchmarks.md). They
    # are trained again only when the index is rebuilt (its files removed or damaged,
    # ``embeddings.index_lists`` or the kind changed); not when lists grow uneven.
    def train_rows(self) -> int:
        nlist = self.ident["lists"]
        auto = min(self.options.exact_max, self.ident["capacity"] // 2, 39 * nlist)
        return self.options.train_rows or max(nlist, auto)

    def _train(self) -> bool:
        """Train the IVF centroids once enough rows wait (NOTE [ IVF training ]); False: not yet."""
        nlist = self.ident["lists"]
        with self.source.lock:
            if len(self.pending) < self.train_rows():
                return False
            rows = np.fromiter(self.pending, np.int64, len(self.pending))
        t0 = time.monotonic()
        rng = np.random.default_rng(len(rows))
        rows = np.sort(rng.choice(rows, min(len(rows), 40 * nlist), replace=False))
        parts = []
        for chunk in np.array_split(rows, max(1, len(rows) // 8192)):
            with self.source.lock:                          # a slice at a time: adds go on meanwhile
                valid, _, _, _, vectors = self.source.read(chunk)
            parts.append(vectors[valid])
        sample = np.concatenate(parts)
        if len(sample) < nlist:
            return False
        centroids = ann_ivf.Centroids.train(sample, nlist, self.options.threads)
        with self._lock:
            self.centroids = centroids
        self._centroids_saved, self._changed = False, True
        self.log.info("near-duplicate index %s: IVF centroids trained (%d lists, %d rows, %.1f s)",
                      self.directory, nlist, len(sample), time.monotonic() - t0)
        return True

    def _load_views(self) -> None:
        """Verify the reopened graphs, swap each memory-mapped graph for a writable copy, and
        remove the keys of rows the store no longer has."""
        from usearch.index import Index

        self._verify()
        if not self.verified:                               # stopped while checking
            return
        for key, g in list(self.graphs.items()):
            if g.view_path is None or self._stop:
                continue
            index = Index.restore(g.view_path, view=False)
            self._tune(index)
            loaded = _Graph(index)                          # measured outside the lock
            loaded.dirty = False
            with self._lock:
                self.graphs[key] = loaded
        if any(g.view_path is not None for g in self.graphs.values()):
            return                                      # stopped first: the next start drops them
        with self._lock:
            for row in self._drop:
                self._remove(row)
        self._changed |= bool(self._drop)
        self._drop = []

    def _remove(self, row: int) -> None:
        """Take ``row`` out of its graph (NOTE [ deferred removals ]: its key is left there, stale,
        until the graph's next flush). Graph lock."""
        r = self.rows[row]
        if r["stamp"]:
            g = self.graphs.get(ALL if self.ident["shared"] else int(r["uid"]))
            if g is not None:
                g.stale.append(row | int(r["ver"]) << 32)
            self.rows["stamp"][row] = self.rows["uid"][row] = self.rows["hash"][row] = 0   # ver kept
            self._held -= 1

    def _flush(self, g: "_Graph", force: bool = False) -> None:
        """Remove ``g``'s stale keys from it once they are STALE_SHARE of its nodes (or ``force``:
        before a save). Graph lock."""
        if g.stale and g.view_path is None and (force or len(g.stale) * STALE_SHARE >= len(g.index)):
            g.index.remove(np.asarray(g.stale, np.uint64))
            g.stale = []
            g.dirty = True
            g.refresh()

    def _insert(self, batch: list[tuple[int, int]]) -> None:
        """Insert ``batch`` (row, sequence number) into the graphs, 64 rows per hold of the graph
        lock (searches wait for one such step at most), then drop from ``pending`` the rows the
        store did not write again meanwhile."""
        rows = np.asarray([r for r, _ in batch], np.int64)
        with self.source.lock:
            valid, stamp, uid, hash8, vectors = self.source.read(rows)
        with self._lock:
            for row in rows.tolist():
                self._remove(row)
        keys = [ALL] if self.ident["shared"] and valid.any() else np.unique(uid[valid]).tolist()
        for key in keys:
            mine = np.flatnonzero(valid if key == ALL else valid & (uid == key))
            for part in np.array_split(mine, max(1, len(mine) // 64)):
                with self._lock:
                    g = self.graphs.get(key)
                    if g is None:
                        g = self.graphs[key] = _Graph(self._new_graph())
                    self._flush(g)
                    at = rows[part]
                    ver = self.rows["ver"][at] + np.uint32(1)   # wraps after 2**32 reuses of a row
                    g.index.add(at.astype(np.uint64) | ver.astype(np.uint64) << np.uint64(32), vectors[part],
                                threads=self.options.threads)
                    g.dirty = True
                    g.refresh()
                    self.rows["stamp"][at], self.rows["uid"][at], self.rows["hash"][at] = stamp[part], uid[part], hash8[part]
                    self.rows["ver"][at] = ver
                    self._held += len(at)
        self.counters["inserted"] += int(valid.sum())
        with self.source.lock:
            for row, seq in batch:
                if self.pending.get(row) == seq:
                    del self.pending[row]
            # the rows stored meanwhile wait for a batch of their own (NOTE [ batched inserts ]):
            # from the oldest pending row's time, a tiny batch would go at once, each paying the pass
            self._pending_since = time.monotonic()
        self._changed = True

    def _try_save(self) -> None:
        """Save; a filesystem that refuses (full, read-only) costs a warning and a retry at the
        next interval, never the index: it serves from memory meanwhile."""
        try:
            self.save()
        except OSError as exc:
            self._saved_at = time.monotonic()
            self.log.warning("near-duplicate index %s not saved (retried in %.0f s): %s",
                             self.directory, self.options.save_interval_s, exc)

    def save(self) -> None:
        """Write the graphs and ``meta`` (ann_file.py: crash-safe order). Inserter thread only
        (or after it stopped): searches go on meanwhile, a save only reads the graphs."""
        t0 = time.monotonic()
        generation = self._generation + 1
        scopes, keep = [], {"meta"}
        with self._lock:
            for g in self.graphs.values():              # a saved graph holds no stale key
                self._flush(g, force=True)
            rows = self.rows.copy()
            graphs = dict(self.graphs)
            centroids = self.centroids
        kind = self.ident["kind"]
        if centroids is not None:                           # first: the lists are nothing without them
            path = os.path.join(self.directory, ann_file.centroids_name(generation))
            old = os.path.join(self.directory, ann_file.centroids_name(self._generation))
            if self._centroids_saved and os.path.exists(old):
                os.link(old, path)
            else:
                self._write(centroids.save, path)
                self._centroids_saved = True
            scopes.append((CENTROIDS, path, centroids.nlist))
            keep.add(os.path.basename(path))
        for key, g in graphs.items():
            path = os.path.join(self.directory, ann_file.graph_name(key, generation, kind))
            old = g.view_path or os.path.join(self.directory, ann_file.graph_name(key, self._generation, kind))
            if not g.dirty and os.path.exists(old):
                os.link(old, path)                          # unchanged: the same bytes under the new name
            else:
                self._write(g.index.save, path)
                g.dirty = False
                if len(g):                                  # the file is the serialized graph
                    g.per_row = os.path.getsize(path) / len(g)
            scopes.append((key, path, len(g)))
            keep.add(os.path.basename(path))
        if graphs:
            ann_file.fsync_dir(self.directory)
        ann_file.write_meta(self.directory, self.ident, generation, scopes, rows)
        ann_file.remove_others(self.directory, keep)
        self._generation, self._changed, self._saved_at = generation, False, time.monotonic()
        self.counters["saves"] += 1
        self.counters["save_s"] = round(time.monotonic() - t0, 3)

    @staticmethod
    def _write(save, path: str) -> None:
        """``save(tmp)``, then the temporary file made private, fsync'ed and renamed to ``path``."""
        save(path + ".tmp")
        with open(path + ".tmp", "rb+") as fh:
            os.fchmod(fh.fileno(), 0o600)                   # other uids' vectors: the daemon's alone
            os.fsync(fh.fileno())
        os.replace(path + ".tmp", path)

    def close(self) -> None:
        """Stop the inserter thread (it saves what changed first). Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with self._wake:
            self._stop = True
            self._wake.notify()
        thread.join()
