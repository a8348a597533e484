"""The embedding store: unit vectors kept per (uid, frame content hash), with near-duplicate search.

The daemon alone opens it (an exclusive ``flock`` on the file, mode 0600; clients ask through the
daemon). A bounded set of rows in one mmap'ed file, each stamped with its age. Adding a (uid,
content hash) already present rewrites its row in place (it keeps its age); a new one takes a free
row while there is one, and once the store is full NOTE [ a full store is shared by uid ] decides
whose oldest row it takes: a uid can never push out the rows of another that holds no more than
its share.

Who sees a row. Every row records the uid whose request stored it. A store opened per uid
(``shared=False``, the default: ``embeddings.shared``) shows a uid only its own rows: ``search``
ranks them alone, ``get`` finds them alone, and ``add`` writes the caller's row only, so no uid
learns or changes another's content hashes or tags. ``shared=True`` lets ``search`` and ``get`` see
every row (rows stay per uid: two uids tagging one image keep two tags). ``uid=None`` means the
daemon itself (every row), for what it never sends to a client.

File layout (all integers little-endian; every byte written by the daemon)::

    offset  size  field
    0       8     magic            b"INFDEMBD"                           \\   written once, into a
    8       4     format version   u32, currently 4 (1 had no uid, 2 no   |  temporary file that is
                                   embedding id, 3 no row stamps)         |  linked or renamed into
    12      4     dim              u32, floats per vector                 |  place only when complete
    16      8     capacity         u64, rows                              |
    24      8     file size        u64, = 4096 + capacity * (4 * dim + 112)
    32      16    embedding id     blake2b-128 of the embedding's definition (daemon/models/embedding_pooling.py
                                   ``embedding_id``: layer and pooling); zero: unnamed
    48      4     header check     zlib.crc32 of bytes 0..48             /
    52      12    reserved         zero
    64            zero up to 4096
    4096                           vectors: capacity rows of dim float32, unit length
    4096 + capacity * 4 * dim      metadata: capacity rows of 112 bytes:

        offset  size  field
        0       1     valid        u8: 1 = the row holds an embedding; 0 while it is rewritten
        1       1     tag length   u8, 0..64 bytes of UTF-8; 255 = no tag
        2       2     reserved     zero
        4       4     uid          u32, the uid whose request stored the row
        8       32    content hash the frame's content hash (inferd.shm.cache.content_hash)
        40      64    tag          UTF-8, zero padded
        104     8     stamp        u64, the row's age: one more than the largest stamp in the store
                                   when the row was taken (a rewrite in place keeps it)

An add clears ``valid``, writes vector and metadata, then sets ``valid``: a daemon killed mid-add
loses that row only. At open, rows with a bad flag or tag, or a (uid, content hash) already seen
are dropped; a vector that is not unit length is dropped too, but found later (NOTE [ vectors
checked when first used ]). A truncated or garbage file, another format (a version 1
file, whose rows have no owner, or a version 3 one, whose rows have no age, included), or another
capacity, dimension or embedding id than configured is set aside as ``PATH.corrupt-<unix time>``
and rebuilt empty, with one log line (only the latest set-aside copy is kept). The file's blocks
are reserved when it is created or opened (inferd.shm.ownedfile): a store the filesystem cannot
hold is an error at open (EmbeddingStoreNoSpace), and a full filesystem later never turns an add
into a SIGBUS. The embedding id is there because two definitions of the embedding (another layer
or pooling, ``model.embedding_layer`` / ``model.embedding_pool``) may have the same width, and
their vectors must never be compared; the default file name carries it too (:func:`default_path`),
so each definition keeps its own file.

Search. Exact: one float32 matrix-vector product over the rows in use, rows of other uids masked
out (per uid), then ``np.argpartition`` for the top k; O(N * D) a query, memory bound: with the
built-in 305-float embedding about 0.2 ms at 10k rows, 7 ms at 100k and 70 ms at a million.
With an index (``embeddings.index``, daemon/caching/ann_index.py) and at least
``embeddings.index_exact_below`` rows, NOTE [ searching ] instead: about a millisecond at a
million rows (docs/benchmarks.md "Near-duplicate index"). The exact scan stays the reference the
index is measured against, answers small stores, and answers while a store of at most
``embeddings.index_exact_max`` rows has its index rebuilt; a larger one then raises
EmbeddingIndexBusy (the daemon answers overloaded).

NOTE [ searching ]
The index proposes candidates (HNSW over int8 copies of the vectors by default, or IVF lists of
int8 codes, one graph or set of lists per uid unless shared), outside the store's lock; under it,
the store keeps the candidates that are valid, visible
to the asking uid and not pending (written since the index took them), adds every pending row the
uid may see, and ranks them all by their float32 vectors here. Similarities are exact, rows are
the store's current ones: the index can only miss a row (recall), never return a wrong, stale or
foreign one. A new image's row (and a rewrite with another vector) is handed to the index under the
store's lock (``AnnIndex.changed``), so no row is ever neither pending nor indexed. A uid holding
fewer than ``embeddings.index_exact_below`` rows is scanned exactly over its own rows instead (its
deque of rows): as fast there, and exact, where a small graph that recycled its rows many times
can lose a row (measured: 1 in 150 after eight rounds, none in 5,000 after five).

NOTE [ vectors checked when first used ]
Reading every vector at open to check its length (1.2 GB at a million rows: seconds, most of a
restart) would keep the daemon from serving for that long. So open reads the row data only
(112 bytes a row), and a vector is checked the first time it leaves the store: ``get`` checks the
row it returns, :meth:`_best` the rows it is about to answer with (a damaged one is dropped and
the next best taken), the index's reads the rows it inserts; a background thread
(``inferd-embcheck``) checks the rest in slices under the lock and drops the damaged ones, so
``len`` and the free rows are right a few seconds after start (a store of at most
``CHECK_AT_OPEN`` rows is checked whole at open, in milliseconds). No answer is ever made from a
vector that was not checked; a row written by this process is checked by construction.

NOTE [ a full store is shared by uid ]
Once every row is taken, a new row of uid U takes the oldest row of

    U itself,               when U holds at least capacity // H rows (H: the uids holding rows,
                            U counted too), its fair share;
    the uid holding most    otherwise (ties: the one whose oldest row is oldest). It holds more
    rows                    than its share, since the H shares add up to the capacity.

So a uid past its share recycles its own rows, and one below it grows at the expense of the
largest holder only: however many rows one uid adds, every other uid keeps all its rows up to
capacity // H of them (8 rows of a victim survive any flood of another uid in a store of 16 or
more). With one uid this is the ring it was: the oldest row goes. ``shared`` changes who sees a
row, not who may replace it. Each uid's rows are kept in a deque in stamp order, so finding the
oldest is O(1) and choosing whose is O(uids).
"""
from __future__ import annotations

import collections
import fcntl
import hashlib
import logging
import mmap
import os
import shutil
import struct
import threading
import types
import zlib

import numpy as np

from ...shm import ownedfile
from . import ann_ivf
from ..pipeline.thread_pools import name_native_thread
from .ann_index import AnnIndex, EmbeddingIndexBusy, IndexOptions, kind_for

# Why one module of ~580 lines: the file layout drawn above, the start-up checks that read it and
# the store that writes it are one format; split, a change to a row's bytes would have to be made
# in two files that only agree by convention. The per-uid share and the search are methods of the
# store because both act on the same rows under the same lock; the index is a module of its own
# (ann_index.py, its file ann_file.py): it holds no truth of the store's.

MAGIC = b"INFDEMBD"
FORMAT_VERSION = 4
HEADER_SIZE = 4096
META_SIZE = 112
TAG_MAX = 64
NO_TAG = 255

_HEADER = struct.Struct("<8sIIQQ16s")                    # bytes 0..48; the check follows at 48..52
_U32 = struct.Struct("<I")
_META = np.dtype({"names": ["valid", "tag_len", "uid", "hash", "tag", "stamp"],
                  "formats": ["u1", "u1", "<u4", ("u1", (32,)), ("u1", (TAG_MAX,)), "<u8"],
                  "offsets": [0, 1, 4, 8, 40, 104], "itemsize": META_SIZE})
_UNIT_LOW, _UNIT_HIGH = (1 - 1e-5) ** 2, (1 + 1e-5) ** 2   # a norm within 1e-5 of one, squared
_RECORD = struct.Struct("<BBxxI32s64sQ")         # one _META row as bytes (valid, tag length, uid, hash, tag, stamp)
assert _RECORD.size == META_SIZE
_log = logging.getLogger("inferd.embeddings")


class EmbeddingStoreError(ownedfile.OwnedFileError):
    """An embedding store that cannot be opened or used as asked: the message says what to change."""


class EmbeddingStoreLocked(EmbeddingStoreError, ownedfile.OwnedFileLocked):
    """Another process holds the lock on the store's file."""


class EmbeddingStoreNoSpace(EmbeddingStoreError, ownedfile.OwnedFileNoSpace):
    """The store file's filesystem has no room for its blocks; no new file was left at the path."""


def _file_size(capacity: int, dim: int) -> int:
    return HEADER_SIZE + capacity * (4 * dim + META_SIZE)


def _embedding_key(embedding: str | None) -> bytes:
    """The 16 bytes that name an embedding definition in the header (zero for none named)."""
    return hashlib.blake2b(embedding.encode(), digest_size=16).digest() if embedding else bytes(16)


def default_path(directory: str, digest: str, embedding: str) -> str:
    """The store file of a model (its digest) and embedding definition, in ``directory``."""
    name = f"embeddings-{digest[:16]}"
    if embedding:
        name += "-" + _embedding_key(embedding).hex()[:8]
    return os.path.join(directory, name + ".store")


def index_options(cfg) -> IndexOptions | None:
    """The index options an ``[embeddings]`` section (EmbeddingsConfig) asks for, or None."""
    if not cfg.index:
        return None
    return IndexOptions(kind=kind_for(cfg.index_kind, cfg.capacity), lists=cfg.index_lists, probe=cfg.index_probe,
                        train_rows=cfg.index_train_rows, connectivity=cfg.index_m, expansion_add=cfg.index_ef_construction,
                        scalar=cfg.index_scalar, expansion_search=cfg.index_ef, exact_below=cfg.index_exact_below,
                        exact_max=cfg.index_exact_max, max_pending=cfg.index_max_pending,
                        save_interval_s=cfg.index_save_interval_s, nice=cfg.index_nice)


def remove_stale(directory: str, keep: str | list[str], log=_log) -> list[str]:
    """Remove from ``directory`` the stores that :func:`default_path` named for other models or
    embedding definitions than ``keep``'s (one path, or a list: a daemon of several models keeps
    a store each) (and their ``.corrupt-*`` set-asides): one file per
    model ever served otherwise piles up in the cache directory (a GB at the default capacity),
    with the near-duplicate index directory (``.index``) of each. A store another process holds
    (its ``flock``: a daemon sharing the folder) is left alone, and so is its index. Returns the
    names of the stores removed; one log line says what and how much."""
    keep_names = {os.path.basename(k) for k in ([keep] if isinstance(keep, str) else keep)}
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    removed, freed = [], 0
    for name in names:
        base = name.split(".corrupt-")[0]
        if name.startswith("embeddings-") and name.endswith(".store.index") and name[:-len(".index")] not in keep_names \
                and not os.path.exists(os.path.join(directory, name[:-len(".index")])):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)   # its store went before
            continue
        if not (name.startswith("embeddings-") and base.endswith(".store")) or base in keep_names:
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue                                    # gone, or not ours to look at
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while we unlink: nobody opens it meanwhile
            size = os.fstat(fd).st_size
            os.unlink(path)
        except OSError:
            continue                                    # locked: another daemon's store
        finally:
            os.close(fd)
        removed.append(name)
        freed += size
    if removed:
        log.info("removed %d embedding stores of models no longer configured from %s (%.1f MB): %s",
                 len(removed), directory, freed / 1e6, ", ".join(removed))
    return removed


def _header(capacity: int, dim: int, embedding: str | None) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, dim, capacity, _file_size(capacity, dim),
                        _embedding_key(embedding))
    return head + _U32.pack(zlib.crc32(head))


def _problem(fd: int, capacity: int, dim: int, embedding: str | None) -> str | None:
    """Why the file behind ``fd`` is not this store as configured, or None."""
    size = os.fstat(fd).st_size
    if size < HEADER_SIZE:
        return f"truncated to {size} bytes, less than the {HEADER_SIZE}-byte header"
    head = os.pread(fd, _HEADER.size + 4, 0)
    magic, version, found_dim, found_cap, total, found_id = _HEADER.unpack_from(head)
    if magic != MAGIC or version != FORMAT_VERSION:
        return f"magic {magic!r} version {version}, expected {MAGIC!r} version {FORMAT_VERSION}"
    if _U32.unpack_from(head, _HEADER.size)[0] != zlib.crc32(head[:_HEADER.size]):
        return "header check does not match"
    if (found_dim, found_cap, total) != (dim, capacity, size) or total != _file_size(found_cap, found_dim):
        return (f"holds dim {found_dim} x {found_cap} rows in {size} bytes (header: {total}); "
                f"configured dim {dim} x {capacity} rows")
    if embedding is not None and found_id != _embedding_key(embedding):
        return (f"holds embeddings of another definition (id {found_id.hex()[:8]}); this model's is "
                f"{embedding or '(unnamed)'} (id {_embedding_key(embedding).hex()[:8]}): "
                f"model.embedding_layer or model.embedding_pool changed")
    return None


def _acquire(path: str, capacity: int, dim: int, embedding: str | None, mode: int, log) -> int:
    """Open (locked), check, and create or rebuild PATH: see inferd.shm.ownedfile."""
    return ownedfile.acquire(path, size=_file_size(capacity, dim), header=_header(capacity, dim, embedding),
                             problem=lambda fd: _problem(fd, capacity, dim, embedding), mode=mode,
                             what="embedding store", log=log or _log, locked=EmbeddingStoreLocked,
                             error=EmbeddingStoreError, no_space=EmbeddingStoreNoSpace)


class _Lines:
    """A callable taking one line, as a Logger for the index (``open``'s ``log`` may be either)."""

    def __init__(self, fn):
        self.fn = fn

    def info(self, msg, *args):
        self.fn(msg % args)

    warning = exception = info


def _as_logger(log):
    return log if log is None or isinstance(log, logging.Logger) else _Lines(log)


class EmbeddingStore:
    """Open with :meth:`open`. Every method takes an internal lock, so device threads may add
    while the loop thread searches. ``close()`` is idempotent. ``shared``: see the module."""

    def __init__(self, path: str, mm: mmap.mmap, fd: int, capacity: int, dim: int, shared: bool = False):
        self.path, self.capacity, self.dim, self.shared = path, capacity, dim, shared
        self._mm, self._fd = mm, fd
        self._lock = threading.Lock()
        self._vectors = np.frombuffer(mm, np.float32, capacity * dim, HEADER_SIZE).reshape(capacity, dim)
        self._meta = np.frombuffer(mm, _META, capacity, HEADER_SIZE + capacity * dim * 4)
        self._meta_bytes = self._meta.view(np.uint8).reshape(capacity, META_SIZE)   # the same, as rows of bytes
        self._uids, self._stamps = self._meta["uid"], self._meta["stamp"]   # field views, made once
        self._valid = np.zeros(capacity, dtype=bool)     # a copy of the flags, for masking searches
        self._index: dict[bytes, dict[int, int]] = {}    # content hash -> {uid: row}
        self._owned: dict[int, collections.deque] = {}   # uid -> its rows, oldest first (NOTE above)
        self._count = 0                                  # rows in use: len() is asked on every info
        self._hashes: list = [None] * capacity
        self._tags: list = [None] * capacity
        self._high = 0                                   # rows at and past this one were never used
        self._free: list[int] = []                       # unused rows below _high, lowest last
        self._stamp = 0                                  # the largest stamp in use
        self._ann: AnnIndex | None = None                # the near-duplicate index, when asked for
        self._checked = np.zeros(capacity, dtype=bool)   # NOTE [ vectors checked when first used ]
        self._log = _log
        self._load()
        self._sweeper: threading.Thread | None = None

    @classmethod
    def open(cls, path, capacity: int, dim: int, *, shared: bool = False, mode: int = 0o600,
             log=None, embedding: str | None = None, index: IndexOptions | None = None) -> "EmbeddingStore":
        """Open or create the store at ``path``; rebuild it (one line to ``log``: a Logger, a callable
        or None for ``inferd.embeddings``) if it is damaged, of another format, or was made for
        another capacity, dim or ``embedding`` (the definition's id, daemon/models/embedding_pooling.py
        ``embedding_id``; None: whatever the file was made for, unnamed when it is created, for
        tools and tests). ``shared``: every uid sees every row (see the module). ``index``: search
        through a near-duplicate index (daemon/caching/ann_index.py) kept in ``PATH.index/``,
        reopened or rebuilt from the rows here; None: exact search only."""
        if not 1 <= capacity < 2**40 or not 1 <= dim < 2**20:
            raise ValueError(f"capacity must be 1..2**40 and dim 1..2**20, got {capacity} and {dim}")
        try:
            fd = _acquire(path, capacity, dim, embedding, mode, log)
        except OSError as exc:
            raise EmbeddingStoreError(f"cannot open embedding store {path}: {exc.strerror}; check that "
                                      f"its directory exists and the daemon's user may write there") from exc
        try:
            mm = mmap.mmap(fd, _file_size(capacity, dim))
        except BaseException:
            os.close(fd)
            raise
        store = cls(path, mm, fd, capacity, dim, shared)
        store._log = _as_logger(log) or _log
        store._start_sweep()
        if index is not None:
            try:
                store._open_index(index, log)
            except BaseException:
                store.close()
                raise
        return store

    def _open_index(self, options: IndexOptions, log) -> None:
        ident = {"dim": self.dim, "capacity": self.capacity, "embedding": bytes(self._mm[32:48]),
                 "shared": self.shared, "kind": options.kind, "lists": 0, "scalar": options.scalar,
                 "connectivity": options.connectivity, "expansion_add": options.expansion_add}
        if options.kind == "ivf":                        # meta's fields for it (daemon/caching/ann_file.py)
            lists = options.lists or ann_ivf.auto_lists(self.capacity)
            ident.update(lists=lists, scalar="ivf-i8", connectivity=0, expansion_add=lists)
        source = types.SimpleNamespace(lock=self._lock, state=self._index_state, read=self._index_read)
        self._ann = AnnIndex.open(self.path + ".index", ident, options, source, _as_logger(log))

    # NOTE [ vectors checked when first used ] ------------------------------------------------
    SWEEP_ROWS = 8192                                    # a slice: ~10 MB of vectors, a few ms under the lock
    CHECK_AT_OPEN = 65_536                               # a store this small is checked whole at open (~30 ms)

    def _check(self, rows: np.ndarray) -> np.ndarray:
        """Check the vectors of ``rows`` not checked yet, drop the damaged ones; returns which of
        ``rows`` are valid now. Under the lock."""
        rows = np.asarray(rows, np.int64)
        todo = rows[~self._checked[rows] & self._valid[rows]]
        if len(todo):
            v = self._vectors[todo]
            with np.errstate(all="ignore"):
                good = np.abs(np.einsum("ij,ij->i", v, v) - 1.0) < 1e-3
            self._checked[todo] = True
            bad = todo[~good]
            for row in bad.tolist():
                self._discard(row)
            if len(bad):
                self._log.warning("embedding store %s: dropped %d rows whose vector is not unit length "
                                  "(damaged)", self.path, len(bad))
        return self._valid[rows]

    def _discard(self, row: int) -> None:
        """Drop a damaged row as open drops one: its flag cleared on disk, its row free."""
        uid = int(self._meta["uid"][row])
        owned = self._owned.get(uid)
        if owned is not None:
            try:
                owned.remove(row)
            except ValueError:
                pass
            if not owned:
                del self._owned[uid]
        self._forget(row)
        self._meta["valid"][row] = 0
        self._free.append(row)

    def _start_sweep(self) -> None:
        if self._high <= self.CHECK_AT_OPEN:
            if self._high:
                self._check(np.arange(self._high))
            self._checked[:] = True
            return
        self._sweeper = threading.Thread(target=self._sweep, name="inferd-embcheck", daemon=True)
        self._sweeper.start()

    def _sweep(self) -> None:
        """Check every vector not yet checked, a slice at a time (NOTE [ vectors checked when
        first used ]); ends at close."""
        name_native_thread("inferd-embcheck")
        for start in range(0, self.capacity, self.SWEEP_ROWS):
            with self._lock:
                if self._mm is None:
                    return
                end = min(self._high, start + self.SWEEP_ROWS)
                if start >= end:
                    break
                self._check(np.arange(start, end))
        with self._lock:
            if self._mm is not None:
                self._checked[:] = True                  # rows past _high are written before use

    def _hash8(self, rows) -> np.ndarray:
        return np.ascontiguousarray(self._meta["hash"][rows, :8]).view("<u8").reshape(-1)

    def _index_state(self):
        """(valid, stamp, uid, first 8 bytes of the content hash) of every row: what the index
        checks its saved rows against (daemon/caching/ann_file.py). Under the lock."""
        m = self._meta
        return self._valid.copy(), m["stamp"].copy(), m["uid"].copy(), self._hash8(slice(None))

    def _index_read(self, rows: np.ndarray):
        """The same for ``rows``, and their vectors (copies). Under the lock."""
        m = self._meta
        valid = self._check(rows)
        return valid, m["stamp"][rows], m["uid"][rows], self._hash8(rows), self._vectors[rows]

    def _load(self) -> None:
        """Rebuild the in-memory index, dropping rows an interrupted add or damage left behind."""
        meta = self._meta
        flagged = meta["valid"] == 1
        # the row data only: the vectors are checked when first used (NOTE [ vectors checked
        # when first used ]), so a new or sparse store's vectors are never paged in here
        cand = np.flatnonzero(flagged)
        tag_len = meta["tag_len"]
        ok = np.zeros(self.capacity, bool)
        ok[cand] = (tag_len[cand] <= TAG_MAX) | (tag_len[cand] == NO_TAG)
        rows = np.flatnonzero(ok)
        # one bytes object per column, sliced per row: a million rows load in about a second
        # (numpy's per-row indexing took four)
        # tags first, decoded only where a row has one (most rows of a photo service have none):
        # an undecodable one drops its row
        row_tags = self._tags
        tagged = rows[tag_len[rows] != NO_TAG]
        if len(tagged):
            tags = np.ascontiguousarray(meta["tag"][tagged]).tobytes()
            for j, (row, n) in enumerate(zip(tagged.tolist(), tag_len[tagged].tolist())):
                try:
                    row_tags[row] = tags[TAG_MAX * j:TAG_MAX * j + n].decode("utf-8")
                except UnicodeDecodeError:
                    ok[row] = False
            rows = np.flatnonzero(ok)
        hashes = np.ascontiguousarray(meta["hash"][rows]).tobytes()
        keys = [hashes[i:i + 32] for i in range(0, len(hashes), 32)]
        index, row_hashes, count = self._index, self._hashes, 0
        for key, uid, row in zip(keys, meta["uid"][rows].tolist(), rows.tolist()):
            owners = index.get(key)
            if owners is None:
                index[key] = {uid: row}
            elif uid in owners:
                ok[row] = False
                row_tags[row] = None
                continue
            else:
                owners[uid] = row
            row_hashes[row] = key
            count += 1
        self._count = count
        meta["valid"][flagged & ~ok] = 0                 # dropped for good, not re-examined next time
        self._valid = ok
        kept = np.flatnonzero(ok)
        self._high = int(kept[-1]) + 1 if len(kept) else 0
        self._free = np.flatnonzero(~ok[:self._high])[::-1].tolist()
        oldest_first = kept[np.argsort(meta["stamp"][kept], kind="stable")]
        for row, uid in zip(oldest_first.tolist(), meta["uid"][oldest_first].tolist()):
            self._owned.setdefault(uid, collections.deque()).append(row)
        self._stamp = int(meta["stamp"][kept].max()) if len(kept) else 0

    def add(self, content_hash: bytes, vector: np.ndarray, tag: str | None = None, *, uid: int) -> int:
        """Store ``vector`` (normalised here) as ``uid``'s for ``content_hash``, replacing that
        uid's row for the hash if present, else taking a free row or, once the store is full, the
        oldest row of ``uid`` or of the largest holder (NOTE [ a full store is shared by uid ]).
        Other uids' rows for the same hash are left as they are. Returns the row. ValueError for a
        bad hash, uid, tag, or a vector that is not finite and non-zero."""
        self._check_entry(content_hash, uid, tag)
        return self._write([bytes(content_hash)], self._unit(vector).reshape(1, -1), [tag], [uid])[0]

    def add_many(self, content_hashes: list, vectors: np.ndarray, tags: list, uids: list) -> list[int]:
        """:meth:`add` for a batch's rows (NOTE [ rows written per batch ]): entry i is
        ``content_hashes[i]``, ``vectors[i]``, ``tags[i]``, ``uids[i]``; what is stored is what
        :meth:`add` of each in turn would store. Returns each entry's row; -1 for a vector that is not
        finite and non-zero (the others are written). ValueError for a bad hash, uid or tag,
        before anything is written."""
        for key, uid, tag in zip(content_hashes, uids, tags):
            self._check_entry(key, uid, tag)
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) != len(content_hashes):
            raise ValueError(f"{len(content_hashes)} vectors of ({self.dim},) expected, got {vectors.shape}")
        units, ok = self._units(vectors)
        if ok is None or ok.all():
            return self._write([bytes(k) for k in content_hashes], units, list(tags), list(uids))
        at = np.flatnonzero(ok)
        out = [-1] * len(content_hashes)
        if len(at):
            rows = self._write([bytes(content_hashes[i]) for i in at], units[at], [tags[i] for i in at],
                               [uids[i] for i in at])
            for i, row in zip(at.tolist(), rows):
                out[i] = row
        return out

    @staticmethod
    def _check_entry(content_hash, uid, tag) -> None:
        if len(content_hash) != 32:
            raise ValueError(f"content_hash must be 32 bytes (inferd.shm.cache.content_hash), got {len(content_hash)}")
        if type(uid) is not int or not 0 <= uid < 2**32:
            raise ValueError(f"uid must be an int 0..2**32-1 (the storing request's uid), got {uid!r}")
        if tag is not None and len(tag.encode("utf-8")) > TAG_MAX:
            raise ValueError(f"a tag is at most {TAG_MAX} bytes of UTF-8, got {len(tag.encode('utf-8'))}")

    # NOTE [ rows written per batch ]
    # The daemon stores a computed batch's embeddings on the event loop, once a batch
    # (daemon/caching/results.py ``Caches.keep``): one hold of the lock, the vectors' lengths
    # checked in one pass, and each field written for every row of the batch by one numpy
    # assignment rather than about a dozen numpy calls a row (~11 us a row in-process, the
    # store's part of the loop's cost a frame). What stays a row at a time is what is a row's own:
    # which row it takes (its uid's oldest, a free one), the hash's owners, the index's pending
    # entry. A batch clears ``valid`` of all its rows, writes them, then sets it: a daemon killed
    # mid-write loses that batch's rows only.
    def _write(self, keys: list, units: np.ndarray, tags: list, uids: list) -> list[int]:
        """Write checked entries (``units``: unit float32 rows); their rows, in order."""
        raw = [b"" if t is None else t.encode("utf-8") for t in tags]
        with self._lock:
            self._require_open()
            rows, stamp, owned, index, hashes = [], self._stamps, self._owned, self._index, self._hashes
            records, moved, ages = [], [], {}            # ages: rows taken by this batch
            for key, uid, tag, r in zip(keys, uids, tags, raw):
                row = index.get(key, {}).get(uid)
                if row is None:                          # a new image: a row of its own
                    row = self._take_row(uid)
                    # taken now (a later entry of the batch must not take it again), written below
                    index.setdefault(key, {})[uid] = row
                    hashes[row] = key
                    self._stamp += 1
                    age = ages[row] = self._stamp
                    owned.setdefault(uid, collections.deque()).append(row)
                    self._valid[row] = True
                    self._count += 1
                    if row >= self._high:
                        self._high = row + 1
                    moved.append(True)
                elif row in ages:                        # taken by this batch: a rewrite of it
                    age = ages[row]
                    moved.append(True)
                else:                                    # its rewrite keeps the row's age
                    age = int(stamp[row])
                    moved.append(None)                   # decided below, by the vector
                self._checked[row] = True
                self._tags[row] = tag
                rows.append(row)
                # the record with ``valid`` 0: set once vector and record are written
                records.append(_RECORD.pack(0, NO_TAG if tag is None else len(r), uid, key, r, age))
            at = rows
            if len(set(rows)) < len(rows):               # a row twice (a rewrite, or recycled by a
                last = sorted({row: i for i, row in enumerate(rows)}.values())   # tiny store): the
                at, units = [rows[i] for i in last], units[last]   # later entry's record and vector
                records, moved = [records[i] for i in last], [moved[i] for i in last]
            # the index re-inserts a new image, or a rewrite with another vector (the daemon's
            # rewrites carry the same frame's, so equal up to float noise: kept where they are)
            if None in moved:
                again = [i for i, m in enumerate(moved) if m is None]
                diff = np.abs(self._vectors[[at[i] for i in again]] - units[again]).max(axis=1) > 1e-4
                for i, m in zip(again, diff.tolist()):
                    moved[i] = m
            meta, vectors = self._meta_bytes, self._vectors
            if len(at) < 4:                              # a few rows: by row (no index arrays)
                for i, row in enumerate(at):
                    meta[row, 0] = 0                     # a kill loses this row only
                    meta[row] = np.frombuffer(records[i], np.uint8)
                    vectors[row] = units[i]
                    meta[row, 0] = 1
            else:                                        # each field of every row at once
                at = np.asarray(at, np.intp)
                meta[at, 0] = 0                          # a kill loses this batch's rows only
                meta[at] = np.frombuffer(b"".join(records), np.uint8).reshape(len(at), META_SIZE)
                vectors[at] = units
                meta[at, 0] = 1
            if self._ann is not None and any(moved):     # new images in these rows: to (re)index
                self._ann.changed_many([row for row, m in zip(np.asarray(at).tolist(), moved) if m])
        return rows

    def _take_row(self, uid: int) -> int:
        """The row a new (uid, content hash) goes to: a free one, else one taken from its owner
        (NOTE [ a full store is shared by uid ]) and forgotten."""
        if self._free:
            return self._free.pop()
        if self._high < self.capacity:
            return self._high
        owned = self._owned
        mine = owned.get(uid)
        if not mine or len(mine) < self.capacity // (len(owned) + (mine is None)):
            stamps = self._stamps
            uid = max(owned, key=lambda u: (len(owned[u]), -int(stamps[owned[u][0]])))
        rows = owned[uid]
        row = rows.popleft()
        if not rows:
            del owned[uid]
        self._forget(row)
        return row

    def _forget(self, row: int) -> None:
        """Drop what the index knows of ``row`` before it is reused (its owner's entry only; the
        caller took it off its owner's deque)."""
        if not self._valid[row]:
            return
        owners = self._index.get(self._hashes[row], {})
        owners.pop(int(self._uids[row]), None)
        if not owners:
            self._index.pop(self._hashes[row], None)
        self._valid[row] = False
        self._count -= 1

    def get(self, content_hash: bytes, *, uid: int | None) -> np.ndarray | None:
        """A copy of the stored unit vector for ``content_hash`` that ``uid`` may see (its own row;
        any row when shared, its own first), or None. ``uid=None``: any row, for the daemon's own
        use (a vector that is never sent to a client)."""
        with self._lock:
            self._require_open()
            owners = self._index.get(bytes(content_hash))
            if not owners:
                return None
            row = owners.get(uid) if uid is not None else None
            if row is None and (uid is None or self.shared):
                row = next(iter(owners.values()))
            if row is None or not self._check(np.array([row]))[0]:
                return None
            return self._vectors[row].copy()

    def search(self, vector: np.ndarray, k: int = 5, min_similarity: float = 0.9, *,
               uid: int | None) -> list[tuple[bytes, str | None, float]]:
        """The up to ``k`` rows ``uid`` may see (its own; every row when shared or ``uid`` is None)
        most similar to ``vector`` with cosine similarity at least ``min_similarity``, best first:
        (content hash, tag, similarity). Through the index when there is one and the store is not
        small (NOTE [ searching ]); similarities are always computed here, exactly. Raises
        EmbeddingIndexBusy while the index rebuilds, or checks its graphs after a restart (NOTE
        [ verified before searched ] in ann_index.py), for a store too large to scan."""
        query = self._unit(vector)
        ann = self._ann
        if k < 1:
            return []
        if ann is not None and self._high >= ann.options.exact_below:
            if uid is not None and not self.shared and len(self._owned.get(uid, ())) < ann.options.exact_below:
                with self._lock:                         # a small uid in a large store: its own rows
                    self._require_open()
                    rows = np.fromiter(self._owned.get(uid, ()), np.int64)
                    return self._best(rows, self._vectors[rows] @ query, k, min_similarity)
            if ann.answers():
                return self._search_index(ann, query, k, min_similarity, uid)
            if self._high > ann.options.exact_max:
                ann.counters["busy"] += 1
                behind = (f"{len(ann.pending)} rows behind the store" if ann.verified else
                          "checking its saved graphs after the restart")
                raise EmbeddingIndexBusy(
                    f"the near-duplicate index is {behind} ({self._high} rows, more than "
                    f"embeddings.index_exact_max to scan instead); retry in a few seconds")
            ann.counters["exact_searches"] += 1
        with self._lock:
            self._require_open()
            return self._search_exact(query, k, min_similarity, uid)

    def _search_exact(self, query, k, min_similarity, uid):
        n = self._high
        if n == 0:
            return []
        sims = self._vectors[:n] @ query                 # the one O(N * D) step
        hidden = ~self._valid[:n]
        if uid is not None and not self.shared:
            hidden |= self._meta["uid"][:n] != uid
        sims[hidden] = -np.inf
        return self._best(np.arange(n), sims, k, min_similarity)

    def _search_index(self, ann: AnnIndex, query, k, min_similarity, uid):
        """NOTE [ searching ]: the graph proposes rows (outside the store's lock: it takes the
        index's), the store keeps those it may show that are not pending, adds the pending rows
        (exact), and ranks all by their own vectors. Fewer than k kept from the graph while its
        scope holds more: ask again for four times as many."""
        count = k + 16
        while True:
            cand = ann.candidates(query, count, uid)
            with self._lock:
                self._require_open()
                pend = np.fromiter(ann.pending, np.int64, len(ann.pending))
                got = cand[self._valid[cand] & ~np.isin(cand, pend)] if len(pend) else cand[self._valid[cand]]
                if uid is not None and not self.shared:
                    got = got[self._meta["uid"][got] == uid]
                if len(got) >= k or count >= ann.scope_rows(uid):
                    pend = pend[self._valid[pend]]
                    if uid is not None and not self.shared:
                        pend = pend[self._meta["uid"][pend] == uid]
                    rows = np.concatenate([got, pend])
                    return self._best(rows, self._vectors[rows] @ query, k, min_similarity)
            count *= 4

    def _best(self, rows: np.ndarray, sims: np.ndarray, k: int, min_similarity: float):
        """The best ``k`` of ``rows`` by ``sims`` (a copy of theirs, changed here): rows whose vector
        was never checked are checked first, and a damaged one gives its place to the next
        (NOTE [ vectors checked when first used ]). Under the lock."""
        if len(rows) == 0:
            return []
        k = min(k, len(rows))
        while True:
            best = np.argpartition(-sims, k - 1)[:k]
            ok = self._check(rows[best])
            if ok.all() or np.isneginf(sims[best[~ok]]).all():
                break
            sims[best[~ok]] = -np.inf                    # dropped: the next best takes its place
        best = best[ok]
        best = best[np.argsort(-sims[best], kind="stable")]
        return [(self._hashes[i], self._tags[i], float(sims[j]))
                for i, j in zip(rows[best].tolist(), best.tolist()) if sims[j] >= min_similarity]

    @property
    def checking(self) -> bool:
        """Whether the vectors of a reopened store are still being checked (NOTE [ vectors checked
        when first used ]): a start-up cost, about a second of a core at a million rows."""
        sweeper = self._sweeper
        return sweeper is not None and sweeper.is_alive()

    def index_stats(self) -> dict | None:
        """The near-duplicate index's counters (rows, pending, reopened, rebuilt ...), or None."""
        return None if self._ann is None else self._ann.stats()

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        ann, self._ann = self._ann, None
        if ann is not None:
            ann.close()                                  # saves; its thread takes our lock meanwhile
        sweeper, self._sweeper = self._sweeper, None
        with self._lock:
            mm, self._mm = self._mm, None
            fd, self._fd = self._fd, None
            self._vectors = self._meta = self._meta_bytes = self._uids = self._stamps = None   # views first: a viewed mapping cannot close
            if mm is not None:
                mm.close()
            if fd is not None:
                os.close(fd)                             # releases the lock
        if sweeper is not None:
            sweeper.join()                               # it stops at its next slice: the mapping is gone

    def _units(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(unit rows, ok): ``vectors`` (N, dim) float32 normalised, each row whose norm is
        within 1e-5 of one kept bit for bit (the device normalised it: an embed answered from the
        store returns exactly what the computed embed returned); ``ok`` False for a row that is
        not finite or all zero (its unit row is garbage), None when every row is fine."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"a vector here has shape ({self.dim},), got {vectors.shape[1:]}")
        # the usual case, the device's unit rows, in one numpy call: float32 sums of squares are
        # within ~1e-6 of one for them, far inside the 2e-5 this asks
        if all(_UNIT_LOW < x < _UNIT_HIGH for x in np.einsum("ij,ij->i", vectors, vectors).tolist()):
            return vectors, None
        squares = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
        unit = (squares > _UNIT_LOW) & (squares < _UNIT_HIGH)
        norms = np.sqrt(squares)
        ok = np.isfinite(norms) & (norms > 0)
        scale = np.where(unit | ~ok, 1.0, norms).astype(np.float32)
        with np.errstate(invalid="ignore"):
            return vectors / scale[:, None], ok

    def _unit(self, vector: np.ndarray) -> np.ndarray:
        """One vector of shape (dim,) as :meth:`_units` makes it; ValueError if it is not finite
        and non-zero."""
        v = np.asarray(vector, dtype=np.float32)
        if v.shape != (self.dim,):
            raise ValueError(f"a vector here has shape ({self.dim},), got {v.shape}")
        units, ok = self._units(v.reshape(1, -1))
        if ok is not None and not ok[0]:
            raise ValueError("a vector must be finite and not all zero to be normalised")
        return units[0]

    def _require_open(self) -> None:
        if self._mm is None:
            raise EmbeddingStoreError(f"embedding store {self.path} is closed")
