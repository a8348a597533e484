"""The result cache: top-k answers in one fixed-size mmap'ed file the daemon writes and clients read.

Key = BLAKE3(model digest, preprocessing spec, frame content hash): a new model or spec makes keys
no old entry can match. Only the daemon maps it writable (under an exclusive ``flock``) and inserts
answers computed from its own private copy of the frame; clients map it ``ACCESS_READ``.

Who may read it: the file is mode 0600, the daemon's user's alone, so no other local user can list
what this host classified. A client maps the descriptor the daemon hands it at hello
(:meth:`ResultCache.share_fd`, opened ``O_RDONLY`` by the daemon) and never opens a path: with an
``O_RDONLY`` descriptor the kernel refuses a shared writable mapping (``PROT_WRITE`` with
``MAP_SHARED`` needs ``O_RDWR``: EACCES), ``write``/``pwrite`` (EBADF) and ``ftruncate`` (EINVAL), for
root too; a private (copy-on-write) mapping never reaches the file. Reopening ``/proc/self/fd/N``
would check the file's mode again, which is why clients of other uids map the descriptor itself.
A client can still tell whether an image it holds was classified here (a hit), as with any shared
cache; it cannot enumerate entries it cannot name.

File layout (all integers little-endian)::

    offset  size  field                                                   written by the daemon
    0       8     magic            b"INFDRCCH"                           \\
    8       4     format version   u32, currently 1                       |
    12      4     sets             u32                                    |  once, into a temporary
    16      4     ways             u32, entries per set                   |  file that is linked or
    20      4     entry size       u32, = 72 + 8 * max_k                  |  renamed into place only
    24      4     max_k            u32, most (class, score) pairs         |  when complete
    28      4     reserved         zero                                   |
    32      8     file size        u64, bytes; the configured size        |
    40      8     header check     BLAKE3(bytes 0..40)[:8]               /
    48      16    reserved         zero
    64      8     generation       u64 flush counter, written at flush; not under the check
                                   (any value is valid: a kill mid-flush cannot spoil the header)
    4096 + (set * ways + way) * entry size: one entry (72..4096 and the slack after the last: zero)

Entry layout (written by the daemon only)::

    offset  size     field
    0       8        seq         u64 seqlock counter: odd while the daemon writes the entry
    8       8        stamp       u64 recency for eviction (not under the check)
    16      8        check       BLAKE3(bytes 24 .. 72 + 8k)[:8]
    24      4        k           u32, pairs in this answer, 1..max_k; 0 = empty
    28      4        reserved    zero
    32      8        generation  u64, the header generation when written; another value = empty
    40      32       key         see cache_key; the set is int.from_bytes(key[:8], "little") % sets
    72      8*max_k  pairs       k times (class index u32, score f32); bytes after them are not read

Eviction: per-set LRU. The daemon stamps an entry from a clock that only grows at insert and when
its own ``lookup`` hits (clients never write: their hits do not count). An insert takes the key's
way, else an empty one (k = 0, odd seq left by a kill, older generation), else the oldest stamp.

Why a reader never returns a wrong answer, with no lock while the daemon writes: the daemon stores
seq odd, then body and check, then seq even (seq only grows, so a write in between cannot look
unchanged). A reader loads seq, copies the entry into a private bytes object, loads seq again, and
answers only if both loads are the same even value and the copy's key, generation and check match.
A Python slice of an mmap is not atomic and nothing orders the loads on memory models weaker than
x86's: the check over the private copy is what guarantees the answer is exactly one the daemon wrote
for this key (a torn copy passes with probability 2**-64). A daemon killed mid-write leaves seq odd
or the check wrong: a miss, repaired by the next insert there.

At daemon start a truncated, garbage, wrong-version or wrong-size file is set aside as
``PATH.corrupt-<unix time>`` and rebuilt (one log line), never resized in place (readers: SIGBUS);
only the latest set-aside copy is kept. The file's blocks are reserved when it is created or opened
(inferd.shm.ownedfile), so a full filesystem never turns an insert into a SIGBUS: a cache that
cannot have them is a start-up error (CacheNoSpace) naming the path and the size.
"""
from __future__ import annotations

import functools
import logging
import mmap
import os
import struct
import threading
from typing import NamedTuple

import blake3
import numpy as np

from . import ownedfile

MAGIC = b"INFDRCCH"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
GENERATION_OFFSET = 64
KEY_OFFSET = 40
PAIRS_OFFSET = 72

_HEADER = struct.Struct("<8sIIIIIIQ")                    # bytes 0..40; the check follows at 40..48
_ENTRY = struct.Struct("<QQ8sIIQ32s")                    # bytes 0..72 of an entry
_BODY = struct.Struct("<IIQ32s")                         # bytes 24..72: k, reserved, generation, key
_U64 = struct.Struct("<Q")
_FIELDS = {"names": ["seq", "stamp", "k", "generation"], "formats": ["<u8", "<u8", "<u4", "<u8"],
           "offsets": [0, 8, 24, 32]}
_log = logging.getLogger("inferd.cache")


class CacheError(ownedfile.OwnedFileError):
    """A result cache that cannot be used as asked: the message says what to change."""


class CacheUnavailable(CacheError):
    """A client cannot map the cache; it sends every request to the daemon instead."""


class CacheLocked(CacheError, ownedfile.OwnedFileLocked):
    """Another process holds the writer lock on the cache file."""


class CacheNoSpace(CacheError, ownedfile.OwnedFileNoSpace):
    """The cache file's filesystem has no room for its blocks; no file was left at the path."""


def content_hash(frame: np.ndarray) -> bytes:
    """32-byte BLAKE3 of a frame's dtype (byte order included), shape and C-contiguous bytes."""
    arr = np.ascontiguousarray(frame)
    if arr.dtype.hasobject:                              # its bytes would be pointers
        raise ValueError("content_hash needs a numeric array, got an object array")
    dtype = arr.dtype.str.encode()
    h = blake3.blake3(derive_key_context="inferd 2026-01 frame content hash v1")
    h.update(struct.pack(f"<I{len(dtype)}sI{arr.ndim}Q", len(dtype), dtype, arr.ndim, *arr.shape))
    h.update(memoryview(arr).cast("B"))
    return h.digest()


def cache_key(model_digest: str, preprocess: str, content_hash: bytes) -> bytes:
    """32-byte cache key. Every field is length-prefixed, so ("ab", "c") and ("a", "bc") differ."""
    if len(content_hash) != 32:
        raise ValueError(f"content_hash must be 32 bytes (from content_hash()), got {len(content_hash)}")
    h = blake3.blake3(derive_key_context="inferd 2026-01 result cache key v1")
    for part in (model_digest.encode(), preprocess.encode(), bytes(content_hash)):
        h.update(_U64.pack(len(part)) + part)
    return h.digest()


def encoded_key(model_digest: str, preprocess: str, decoder: str, encoded_hash: bytes) -> bytes:
    """32-byte cache key of an encoded upload (JPEG/PNG/WebP bytes, hashed by
    ``inferd.shm.uploads.encoded_hash``) under a model, its preprocessing and the decoder that
    turns the bytes into a frame (``inferd.shm.uploads.decoder_id``: library versions, steps,
    target size). Its own derivation context, so it can never equal a frame's key. The daemon
    inserts under it only bytes it decoded itself to the frame it computed (NOTE [ encoded uploads ]
    in daemon/caching/results.py)."""
    if len(encoded_hash) != 32:
        raise ValueError(f"encoded_hash must be 32 bytes, got {len(encoded_hash)}")
    h = blake3.blake3(derive_key_context="inferd 2026-11 result cache encoded-upload key v1")
    for part in (model_digest.encode(), preprocess.encode(), decoder.encode(), bytes(encoded_hash)):
        h.update(_U64.pack(len(part)) + part)
    return h.digest()


class CacheGeometry(NamedTuple):
    sets: int
    ways: int
    max_k: int

    @property
    def entry_size(self) -> int:
        return PAIRS_OFFSET + 8 * self.max_k


def _parse_header(head: bytes, size: int) -> tuple[str | None, CacheGeometry | None]:
    """(problem, None) or (None, geometry), from the first 48 bytes of a file of ``size`` bytes."""
    if size < HEADER_SIZE:
        return f"truncated to {size} bytes, less than the {HEADER_SIZE}-byte header", None
    magic, version, sets, ways, entry_size, max_k, _, total = _HEADER.unpack_from(head)
    geom = CacheGeometry(sets, ways, max_k)
    if magic != MAGIC or version != FORMAT_VERSION:
        return f"magic {magic!r} version {version}, expected {MAGIC!r} version {FORMAT_VERSION}", None
    if blake3.blake3(head[:40]).digest(8) != head[40:48]:
        return "header check does not match", None
    if sets < 1 or entry_size != geom.entry_size or total != size \
            or HEADER_SIZE + sets * ways * entry_size > total:
        return f"truncated or inconsistent: header {geom}, {entry_size}-byte entries, {total} bytes; " \
               f"the file has {size} bytes", None
    return None, geom


def _acquire(path: str, geom: CacheGeometry, size: int, mode: int, log) -> int:
    """Open (locked), check, and create or rebuild PATH: see inferd.shm.ownedfile."""
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, geom.sets, geom.ways, geom.entry_size, geom.max_k, 0, size)

    def problem(fd: int) -> str | None:
        actual = os.fstat(fd).st_size
        reason, found = _parse_header(os.pread(fd, 48, 0), actual)
        if reason is None and (found, actual) != (geom, size):
            reason = f"holds {found} in {actual} bytes; configured {geom} in {size} bytes"
        return reason

    return ownedfile.acquire(path, size=size, header=head + blake3.blake3(head).digest(8),
                             problem=problem, mode=mode, what="result cache", log=log or _log,
                             locked=CacheLocked, error=CacheError, no_space=CacheNoSpace)


@functools.lru_cache(maxsize=None)
def _pairs(k: int) -> struct.Struct:
    return struct.Struct("<" + "If" * k)


class ResultCache:
    """One mapping of the cache file: ``open_writer`` in the daemon, ``open_reader`` in clients.
    ``insert`` and ``flush`` need the writer (any thread: they take a lock). Counters (hits, misses,
    torn, inserts, evictions) are this instance's, not the file's. ``close()`` is idempotent."""

    def __init__(self, path: str, mm: mmap.mmap, fd: int | None, geom: CacheGeometry):
        self.path = path
        self.geometry = geom
        self._mm = mm
        self._fd = fd                                    # the writer's descriptor holds the flock
        self._ro_fd: int | None = None                   # the writer's read-only one, for share_fd
        self._entry = geom.entry_size
        self._set_bytes = geom.ways * geom.entry_size
        self._lock = threading.Lock()
        self._hits = self._misses = self._torn = self._inserts = self._evictions = 0
        self._clock = int(self._view()["stamp"].max()) if fd is not None else 0
        # The writer counts its entries in use once, here, then keeps the count at insert and
        # flush: the daemon reports it on every stats request, and a scan reads the whole file.
        self.used = self._count_used() if fd is not None else 0

    @classmethod
    def open_writer(cls, path, size_bytes: int, max_k: int = 16, *, ways: int = 8,
                    mode: int = 0o600, log=None) -> "ResultCache":
        """The daemon's mapping; creates PATH, or rebuilds it (one line to ``log``: a Logger, a
        callable or None for ``inferd.cache``). ``mode`` is exact, not umasked, and an existing
        file is narrowed to it: clients read through :meth:`share_fd`, not the path. Raises
        CacheLocked (another daemon has it), CacheNoSpace (its blocks cannot be reserved), CacheError."""
        set_bytes = ways * (PAIRS_OFFSET + 8 * max_k)
        if not 1 <= max_k <= 1024 or ways < 1 or size_bytes < HEADER_SIZE + set_bytes:
            raise ValueError(f"cache of {size_bytes} bytes with max_k={max_k}, ways={ways}: needs max_k "
                             f"1..1024, ways >= 1 and at least {HEADER_SIZE + set_bytes} bytes")
        geom = CacheGeometry(min((size_bytes - HEADER_SIZE) // set_bytes, 2**32 - 1), ways, max_k)
        try:
            fd = _acquire(path, geom, size_bytes, mode, log)
        except OSError as exc:
            raise CacheError(f"cannot open result cache {path}: {exc.strerror}; check that its "
                             f"directory exists and the daemon's user may write there") from exc
        ro = None
        try:
            # The descriptor clients get (share_fd): read-only, and of this very inode; opened
            # through the path only now, while the writer's lock keeps the path on this inode.
            ro = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if not os.path.samestat(os.fstat(ro), os.fstat(fd)):
                raise CacheError(f"result cache {path} was replaced while opening it")
            mm = mmap.mmap(fd, size_bytes)
        except BaseException:
            os.close(fd)
            if ro is not None:
                os.close(ro)
            raise
        cache = cls(path, mm, fd, geom)
        cache._ro_fd = ro
        return cache

    def share_fd(self) -> int:
        """A new read-only (``O_RDONLY``) descriptor of the writer's file, for a client to map (the
        caller closes it once sent). Nobody holding it can write the file: see the module."""
        if self._ro_fd is None:
            raise CacheError(f"share_fd needs open_writer; result cache {self.path} is read-only or closed")
        return os.dup(self._ro_fd)                       # dup: close-on-exec is not inherited

    @classmethod
    def open_reader(cls, source: int | str) -> "ResultCache":
        """A client's ``ACCESS_READ`` mapping of ``source``: the descriptor the daemon handed over
        (mapped as it is, never reopened; it stays the caller's to close) or, for tools and tests
        run as the daemon's user, a path. CacheUnavailable if missing, unreadable or not valid."""
        if isinstance(source, int):
            return cls._map_reader(source, f"result cache (descriptor {source} from the daemon)")
        try:
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CacheUnavailable(f"cannot read result cache {source}: {exc.strerror}") from None
        try:
            return cls._map_reader(fd, f"result cache {source}")
        finally:
            os.close(fd)                                 # the mapping keeps its own reference

    @classmethod
    def _map_reader(cls, fd: int, what: str) -> "ResultCache":
        try:
            size = os.fstat(fd).st_size
            problem, geom = _parse_header(os.pread(fd, 48, 0), size)
            if problem is not None:
                raise CacheUnavailable(f"{what}: {problem}; the daemon rebuilds it at start")
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise CacheUnavailable(f"cannot map {what}: {exc.strerror}") from None
        return cls(what, mm, None, geom)

    def lookup(self, key: bytes) -> list[tuple[int, float]] | None:
        """The stored answer for ``key``, or None (absent, being written, torn or corrupt)."""
        generation, mm, base = self._generation(), self._mm, self._set_offset(key)   # raises once closed
        off = mm.find(key, base + KEY_OFFSET, base + self._set_bytes) - KEY_OFFSET   # one C scan of the set
        # Found off an entry's key field (only by a 2**-256 accident), or not at all: a miss.
        top = self._read(mm, off, key, generation) if off >= base and not (off - base) % self._entry else None
        if top is None:
            self._misses += 1
            return None
        self._hits += 1
        if self._fd is not None:                         # the daemon's own hits refresh recency
            self._clock += 1                             # a race with insert only blurs recency
            _U64.pack_into(mm, off + 8, self._clock)
        return top

    def _set_offset(self, key: bytes) -> int:
        if len(key) != 32:
            raise ValueError(f"a cache key is 32 bytes (from cache_key()), got {len(key)}")
        return HEADER_SIZE + int.from_bytes(key[:8], "little") % self.geometry.sets * self._set_bytes

    def _read(self, mm: mmap.mmap, off: int, key: bytes, gen: int) -> list[tuple[int, float]] | None:
        """Seqlock read into a private copy; every check is made on the copy."""
        seq = _U64.unpack_from(mm, off)[0]
        body = mm[off:off + self._entry]
        _, _, check, k, _, generation, stored = _ENTRY.unpack_from(body)
        if seq & 1 or _U64.unpack_from(mm, off)[0] != seq or not 0 < k <= self.geometry.max_k \
                or blake3.blake3(memoryview(body)[24:PAIRS_OFFSET + 8 * k]).digest(8) != check:
            self._torn += 1                              # being written, torn or corrupt
            return None
        if stored != key or generation != gen:
            return None
        flat = _pairs(k).unpack_from(body, PAIRS_OFFSET)
        return list(zip(flat[0::2], flat[1::2]))

    def insert(self, key: bytes, top) -> bool:
        """Store 1..max_k (class index, score) pairs under ``key``; True if another key was evicted."""
        if self._fd is None:
            raise CacheError(f"insert needs open_writer; result cache {self.path} is read-only or closed")
        key, k = bytes(key), len(top)
        base = self._set_offset(key)
        if not 1 <= k <= self.geometry.max_k:
            raise ValueError(f"an answer has 1..{self.geometry.max_k} pairs (max_k), got {k}")
        try:
            payload = _pairs(k).pack(*[v for pair in top for v in pair])
        except (struct.error, OverflowError, TypeError) as exc:
            raise ValueError(f"pairs must be (class index 0..2**32-1, float32 score): {exc}") from None
        with self._lock:
            off, evicted, was_empty = self._choose_way(base, key)
            self._write(off, key, k, payload)
            self._inserts += 1
            self._evictions += evicted
            self.used += was_empty
        return evicted

    def _choose_way(self, base: int, key: bytes) -> tuple[int, bool, bool]:
        """(offset, evicted, was empty) of the way for ``key``: its own, else an empty one, else
        the least recently stamped."""
        generation = self._generation()
        empty = victim = None
        oldest = 2**64
        for off in range(base, base + self._set_bytes, self._entry):
            seq, stamp, _, k, _, gen, stored = _ENTRY.unpack_from(self._mm, off)
            vacant = bool(seq & 1 or k == 0 or gen != generation)
            if stored == key:
                return off, False, vacant          # its own way, or what a kill left of it
            if vacant:
                empty = off if empty is None else empty
            elif stamp < oldest:
                victim, oldest = off, stamp
        return (empty, False, True) if empty is not None else (victim, True, False)

    def _write(self, off: int, key: bytes, k: int, payload: bytes) -> None:
        mm = self._mm
        seq = _U64.unpack_from(mm, off)[0] | 1           # odd: being written (one left by a kill stays odd)
        _U64.pack_into(mm, off, seq)
        body = _BODY.pack(k, 0, self._generation(), key) + payload       # bytes 24.. of the entry
        mm[off + 24:off + 24 + len(body)] = body
        mm[off + 16:off + 24] = blake3.blake3(body).digest(8)
        self._clock += 1
        _U64.pack_into(mm, off + 8, self._clock)
        _U64.pack_into(mm, off, seq + 1)                 # even, and larger than any earlier value

    def flush(self) -> int:
        """Empty the cache; returns the new generation. Readers miss everything from the bump on;
        then every entry is cleared under its seqlock."""
        if self._fd is None:
            raise CacheError(f"flush needs open_writer; result cache {self.path} is read-only or closed")
        with self._lock:
            generation = self._generation() + 1
            _U64.pack_into(self._mm, GENERATION_OFFSET, generation)
            view = self._view()
            raw = view.view(np.uint8).reshape(len(view), self._entry)
            view["seq"] |= 1
            raw[:, 8:] = 0
            view["seq"] += 1
            del view, raw                                # the mapping cannot close while viewed
            self._clock = 0
            self.used = 0
        return generation

    def stats(self) -> dict:
        """Geometry, entries in use, counters; ``torn``: misses refused by seq or check. O(1) for
        the writer (``used`` is kept); a reader scans the file for ``used``."""
        generation = self._generation()                  # raises once closed
        used = self.used if self._fd is not None else self._count_used()
        return {**self.geometry._asdict(), "entries": self.geometry.sets * self.geometry.ways,
                "used": used, "generation": generation, "hits": self._hits, "misses": self._misses,
                "torn": self._torn, "inserts": self._inserts, "evictions": self._evictions}

    def _count_used(self) -> int:
        """Entries that hold an answer of the current generation: a scan of the whole file."""
        generation, view = self._generation(), self._view()
        return int(np.count_nonzero(((view["seq"] & 1) == 0) & (view["k"] > 0)
                                    & (view["generation"] == generation)))

    def close(self) -> None:
        mm, self._mm = self._mm, None
        fd, self._fd = self._fd, None
        ro, self._ro_fd = self._ro_fd, None
        if mm is not None:
            mm.close()
        if ro is not None:
            os.close(ro)
        if fd is not None:
            os.close(fd)                                 # releases the writer lock

    def _generation(self) -> int:
        if self._mm is None:
            raise CacheError(f"result cache {self.path} is closed")
        return _U64.unpack_from(self._mm, GENERATION_OFFSET)[0]

    def _view(self) -> np.ndarray:
        dtype = np.dtype({**_FIELDS, "itemsize": self._entry})
        return np.frombuffer(self._mm, dtype=dtype, count=self.geometry.sets * self.geometry.ways,
                             offset=HEADER_SIZE)
