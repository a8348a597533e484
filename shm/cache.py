"""The result cache: top-k answers in one fixed-size mmap'ed file the daemon writes and clients read.

Lookup key = BLAKE3(model digest, preprocessing spec, frame content hash) (:func:`cache_key`): a new
model or spec makes keys no old entry can match. The lookup key is never stored. Only the daemon
maps the file writable (under an exclusive ``flock``) and inserts answers computed from its own
private copy of the frame; clients map it ``ACCESS_READ``.

Who may read it: the file is mode 0600, the daemon's user's alone. A client maps the descriptor
the daemon hands it at hello (:meth:`ResultCache.share_fd`, opened ``O_RDONLY`` by the daemon) and
never opens a path: with an ``O_RDONLY`` descriptor the kernel refuses a shared writable mapping
(``PROT_WRITE`` with ``MAP_SHARED`` needs ``O_RDWR``: EACCES), ``write``/``pwrite`` (EBADF) and
``ftruncate`` (EINVAL), for root too; a private (copy-on-write) mapping never reaches the file.
Reopening ``/proc/self/fd/N`` would check the file's mode again, which is why clients of other
uids map the descriptor itself.

What a reader of the mapping learns (every client of every allowed uid holds one): entries are
sealed under secrets derived from their lookup key, so an entry can be found and read only by
whoever can compute that key, i.e. holds the same frame (or encoded bytes) and knows the model
digest and preprocessing (hello tells everyone those). How, in inferd.shm.cacheseal: the key
derives a 16-byte *tag*, stored, that finds the entry (set = tag[:8] % sets), a MAC key and
keystreams. The stored bytes are never the key itself, and nothing else in the file depends on the
key, the answer or the time of the insert:

- the body (k and the pairs, padded to max_k pairs, so every answer has one size) is stored
  XORed with a keystream chosen by the entry's check (a synthetic IV, as in SIV modes): two
  different answers, or one answer in two generations, never share a keystream;
- no stamps, no counts: eviction recency lives in the daemon's memory alone (lost at a restart:
  entries written before it are then the first evicted), and ``used`` is the writer's own count;
- at creation every entry is filled with random bytes (seq even, like a written entry's), so an
  empty entry and a full one look the same; a flush only bumps the generation (see below), and
  the old entries stay as they were: random-looking bytes nobody can open any more.

What a reader still learns: the geometry and the generation (flushes) in the header, and the
seqlock counters: a scan that compares two snapshots sees which entries were rewritten in between
(that some answer was written at some time, not for which frame, nor its classes or scores). An
entry rewritten with the same answer in the same generation gets the same bytes (sealing is
deterministic), so a watcher can tell "same answer again" from "another answer" for one entry, not
what either is. A client can tell whether a frame it holds was classified here (a hit), as with
any shared cache.

Integrity: a check over the plaintext body under a key-derived MAC key, which also picks the
keystream (SIV-style; inferd.shm.cacheseal says why this construction): an entry opens only whole,
for this key and this generation, else it is a miss, never a wrong answer.

File layout (all integers little-endian)::

    offset  size  field                                                   written by the daemon
    0       8     magic            b"INFDRCCH"                           \\
    8       4     format version   u32, currently 2                       |
    12      4     sets             u32                                    |  once, into a temporary
    16      4     ways             u32, entries per set                   |  file that is linked or
    20      4     entry size       u32, = 48 + 8 * max_k                  |  renamed into place only
    24      4     max_k            u32, most (class, score) pairs         |  when complete
    28      4     reserved         zero                                   |
    32      8     file size        u64, bytes; the configured size        |
    40      8     header check     BLAKE3(bytes 0..40)[:8]               /
    48      16    reserved         zero
    64      8     generation       u64 flush counter, written at flush; not under the check
                                   (any value is valid: a kill mid-flush cannot spoil the header)
    72      8     filled           u64, 1 once every entry holds random bytes (at the first open);
                                   not under the check (a kill mid-fill leaves 0: filled again)
    4096 + (set * ways + way) * entry size: one entry (80..4096 and the slack after the last: zero)

Entry layout (written by the daemon only; every byte but seq looks random to a reader without
the key)::

    offset  size         field
    0       8            seq     u64 seqlock counter, even at rest, odd while the daemon writes
                                 the entry; starts at a random even value below 2**62
    8       16           tag     EntrySecrets(key).tag (inferd.shm.cacheseal)
    24      16           check   BLAKE3-keyed(MAC key, generation u64 || body)[:16]
    40      8 + 8*max_k  masked  body XOR keystream(check); body = k u32 (1..max_k), reserved u32
                                 zero, max_k times (class index u32, score f32), the pairs after
                                 the k-th zero

Eviction: per-set LRU over recency the writer keeps in memory (``ResultCache._stamps``, one u64 per
entry, 0 = not written since this open). Its clock grows at insert and when the daemon's own
``lookup`` hits (clients never write: their hits do not count). An insert takes the way holding
the key's tag, else one whose seq is odd (a kill mid-write), else the least recently stamped (a
way never written since the open first).

Why a reader never returns a wrong answer, with no lock while the daemon writes: the daemon stores
seq odd, then bytes 8.. of the entry, then seq even (seq only grows, so a write in between cannot
look unchanged). A reader loads seq, copies the entry into a private bytes object, loads seq
again, and answers only if both loads are the same even value and the copy opens (its tag is the
key's, and unmasked, it verifies its check under this key and the current generation). A Python
slice of an mmap is not atomic and nothing orders the loads on memory models weaker than x86's: the
check over the private copy is what guarantees the answer is exactly one the daemon wrote for this
key (a torn copy passes with probability 2**-128).
A daemon killed mid-write leaves seq odd or the check wrong: a miss, repaired by the next insert
there.

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
from .cacheseal import EntrySecrets

MAGIC = b"INFDRCCH"
FORMAT_VERSION = 2
HEADER_SIZE = 4096
GENERATION_OFFSET = 64
FILLED_OFFSET = 72
TAG_OFFSET = 8
CHECK_OFFSET = 24
MASKED_OFFSET = 40
ENTRY_FIXED = 48                                         # entry size = ENTRY_FIXED + 8 * max_k
SEQ_START_MASK = (1 << 62) - 2                           # a random start: even, far from overflow
FILL_CHUNK = 4 << 20                                     # bytes of random fill generated at once

_HEADER = struct.Struct("<8sIIIIIIQ")                    # bytes 0..40; the check follows at 40..48
_KPAD = struct.Struct("<II")                             # k, reserved: the first 8 bytes of the body
_U64 = struct.Struct("<Q")
_log = logging.getLogger("inferd.cache")


class CacheError(ownedfile.OwnedFileError):
    """A result cache that cannot be used as asked: the message says what to change."""


class CacheUnavailable(CacheError):
    """A client cannot map the cache; it sends every request to the daemon instead."""


class CacheLocked(CacheError, ownedfile.OwnedFileLocked):
    """Another process holds the writer lock on the cache file."""


class CacheNoSpace(CacheError, ownedfile.OwnedFileNoSpace):
    """The cache file's filesystem has no room for its blocks; no file was left at the path."""


_CONTENT = blake3.blake3(derive_key_context="inferd 2026-01 frame content hash v1")
_KEY = blake3.blake3(derive_key_context="inferd 2026-01 result cache key v1")


@functools.lru_cache(maxsize=64)
def _frame_header(dtype: str, shape: tuple) -> bytes:
    """The bytes :func:`content_hash` hashes before a frame's own: dtype and shape, length-prefixed."""
    code = dtype.encode()
    return struct.pack(f"<I{len(code)}sI{len(shape)}Q", len(code), code, len(shape), *shape)


def content_hash(frame: np.ndarray) -> bytes:
    """32-byte BLAKE3 of a frame's dtype (byte order included), shape and C-contiguous bytes.
    (The derive-key state is made once and copied: the same hash, without a key derivation per
    call; BLAKE3 lets go of the GIL over a large frame.)"""
    arr = np.ascontiguousarray(frame)
    if arr.dtype.hasobject:                              # its bytes would be pointers
        raise ValueError("content_hash needs a numeric array, got an object array")
    h = _CONTENT.copy()
    h.update(_frame_header(arr.dtype.str, arr.shape))
    h.update(memoryview(arr).cast("B"))
    return h.digest()


def cache_key(model_digest: str, preprocess: str, content_hash: bytes) -> bytes:
    """32-byte cache key. Every field is length-prefixed, so ("ab", "c") and ("a", "bc") differ."""
    if len(content_hash) != 32:
        raise ValueError(f"content_hash must be 32 bytes (from content_hash()), got {len(content_hash)}")
    h = _key_prefix(model_digest, preprocess).copy()
    h.update(_U64.pack(32) + bytes(content_hash))
    return h.digest()


@functools.lru_cache(maxsize=64)
def _key_prefix(model_digest: str, preprocess: str):
    """The key hasher with a model's digest and preprocessing fed: copied for each key, so a key
    costs one small update (the bytes are those :func:`cache_key` always hashed)."""
    h = _KEY.copy()
    for part in (model_digest.encode(), preprocess.encode()):
        h.update(_U64.pack(len(part)) + part)
    return h


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
        return ENTRY_FIXED + 8 * self.max_k


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
        self._clock = 0
        # The writer's private recency, one stamp per entry (0: not written since this open), and
        # its count of entries written since the open: nothing in the file can say either (the
        # module docstring), so both start from zero at every open.
        self._stamps = np.zeros(geom.sets * geom.ways, np.uint64) if fd is not None else None
        self.used = 0

    @classmethod
    def open_writer(cls, path, size_bytes: int, max_k: int = 16, *, ways: int = 8,
                    mode: int = 0o600, log=None) -> "ResultCache":
        """The daemon's mapping; creates PATH, or rebuilds it (one line to ``log``: a Logger, a
        callable or None for ``inferd.cache``). ``mode`` is exact, not umasked, and an existing
        file is narrowed to it: clients read through :meth:`share_fd`, not the path. Raises
        CacheLocked (another daemon has it), CacheNoSpace (its blocks cannot be reserved), CacheError."""
        set_bytes = ways * (ENTRY_FIXED + 8 * max_k)
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
        if _U64.unpack_from(mm, FILLED_OFFSET)[0] != 1:
            try:
                cache._fill()
            except BaseException:
                cache.close()
                raise
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
        generation, mm = self._generation(), self._mm    # raises once closed
        secrets = EntrySecrets(key)
        off = self._find(secrets.tag)
        top = self._read(mm, off, secrets, generation) if off is not None else None
        if top is None:
            self._misses += 1
            return None
        self._hits += 1
        if self._stamps is not None:                     # the daemon's own hits refresh recency
            self._clock += 1                             # a race with insert only blurs recency
            self._stamps[(off - HEADER_SIZE) // self._entry] = self._clock
        return top

    def _set_offset(self, tag: bytes) -> int:
        return HEADER_SIZE + int.from_bytes(tag[:8], "little") % self.geometry.sets * self._set_bytes

    def _find(self, tag: bytes) -> int | None:
        """Offset of the entry of ``tag`` in its set, or None: one C scan of the set. A match off
        an entry's tag field (random bytes that happen to equal it, 2**-128 a place) is skipped."""
        mm, base = self._mm, self._set_offset(tag)
        end = base + self._set_bytes
        at = mm.find(tag, base + TAG_OFFSET, end)
        while at >= 0:
            if not (at - TAG_OFFSET - base) % self._entry:
                return at - TAG_OFFSET
            at = mm.find(tag, at + 1, end)
        return None

    def _read(self, mm: mmap.mmap, off: int, secrets: EntrySecrets,
              gen: int) -> list[tuple[int, float]] | None:
        """Seqlock read into a private copy; opened (unmasked and checked) on the copy."""
        seq = _U64.unpack_from(mm, off)[0]
        entry = mm[off:off + self._entry]
        body = None if seq & 1 or _U64.unpack_from(mm, off)[0] != seq else secrets.open(gen, entry[TAG_OFFSET:])
        if body is None:
            self._torn += 1                              # being written, torn, corrupt, or of an older generation
            return None
        k = _KPAD.unpack_from(body)[0]
        if not 0 < k <= self.geometry.max_k:             # only a daemon bug could seal this
            self._torn += 1
            return None
        flat = _pairs(k).unpack_from(body, 8)
        return list(zip(flat[0::2], flat[1::2]))

    def seal(self, key: bytes, top) -> tuple:
        """What ``insert`` computes before it takes the lock, for any thread: the entry's secrets
        (BLAKE3 key derivation), its body and the body sealed for the current flush generation
        (MAC and mask). ``insert(key, top, sealed)`` stores it, sealing again only if the cache was
        flushed meanwhile. ValueError for pairs that do not fit an entry."""
        k, max_k = len(top), self.geometry.max_k
        secrets = EntrySecrets(key)
        if not 1 <= k <= max_k:
            raise ValueError(f"an answer has 1..{max_k} pairs (max_k), got {k}")
        try:
            payload = _pairs(k).pack(*[v for pair in top for v in pair])
        except (struct.error, OverflowError, TypeError) as exc:
            raise ValueError(f"pairs must be (class index 0..2**32-1, float32 score): {exc}") from None
        body = _KPAD.pack(k, 0) + payload + bytes(8 * (max_k - k))      # every answer the same size
        generation = self._generation()
        return key, secrets, body, generation, secrets.seal(generation, body)

    def insert(self, key: bytes, top, sealed: tuple | None = None) -> bool:
        """Store 1..max_k (class index, score) pairs under ``key``; True if another key was evicted.
        ``sealed``: ``seal(key, top)`` made beforehand (another thread), or None."""
        if self._fd is None:
            raise CacheError(f"insert needs open_writer; result cache {self.path} is read-only or closed")
        if sealed is None or sealed[0] != key:
            sealed = self.seal(key, top)
        _, secrets, body, generation, record = sealed
        with self._lock:
            current = self._generation()
            sealed = record if generation == current else secrets.seal(current, body)
            off, evicted, was_empty = self._choose_way(secrets.tag)
            self._write(off, sealed)
            self._clock += 1
            self._stamps[(off - HEADER_SIZE) // self._entry] = self._clock
            self._inserts += 1
            self._evictions += evicted
            self.used += was_empty
        return evicted

    def _choose_way(self, tag: bytes) -> tuple[int, bool, bool]:
        """(offset, evicted, was empty) of the way for ``tag``: its own, else one a kill left
        mid-write, else the least recently stamped (stamp 0: not written since the open)."""
        base = self._set_offset(tag)
        own = self._find(tag)
        first = (base - HEADER_SIZE) // self._entry
        stamps = self._stamps[first:first + self.geometry.ways]
        if own is not None:
            return own, False, not stamps[(own - base) // self._entry]
        for way in range(self.geometry.ways):
            if _U64.unpack_from(self._mm, base + way * self._entry)[0] & 1:
                return base + way * self._entry, False, not stamps[way]
        way = int(stamps.argmin())
        return base + way * self._entry, bool(stamps[way]), not stamps[way]

    def _write(self, off: int, record: bytes) -> None:
        """Bytes 8.. of the entry at ``off``, under its seqlock."""
        mm = self._mm
        seq = _U64.unpack_from(mm, off)[0] | 1           # odd: being written (one left by a kill stays odd)
        _U64.pack_into(mm, off, seq)
        mm[off + TAG_OFFSET:off + self._entry] = record
        _U64.pack_into(mm, off, seq + 1)                 # even, and larger than any earlier value

    def _fill(self) -> None:
        """Random bytes in every entry (seq: a random even start), then ``filled`` = 1: run once,
        when the writer finds the flag unset (a new file, or a kill during an earlier fill). The
        bytes come from BLAKE3's XOF under a fresh random key, a few MiB at a time, and go in with
        ``pwrite``, not through the mapping: a file system with no room for them is an error
        naming the file here, not a SIGBUS."""
        entry, n = self._entry, self.geometry.sets * self.geometry.ways
        stream = blake3.blake3(key=os.urandom(32))
        per_chunk = max(FILL_CHUNK // entry, 1)
        with self._lock:
            for start in range(0, n, per_chunk):
                rows = min(per_chunk, n - start)
                chunk = np.frombuffer(stream.digest(rows * entry, seek=start * entry), np.uint8).copy()
                seqs = chunk.reshape(rows, entry)[:, :8].copy().view("<u8")
                seqs &= np.uint64(SEQ_START_MASK)
                chunk.reshape(rows, entry)[:, :8] = seqs.view(np.uint8).reshape(rows, 8)
                try:
                    os.pwrite(self._fd, chunk, HEADER_SIZE + start * entry)
                except OSError as exc:
                    raise CacheError(f"cannot fill result cache {self.path} ({HEADER_SIZE + n * entry} "
                                     f"bytes): {exc.strerror}; free space on its file system or lower "
                                     "cache.size_mb") from None
            self._stamps[:] = 0
            self.used = 0
            _U64.pack_into(self._mm, FILLED_OFFSET, 1)

    def flush(self) -> int:
        """Empty the cache; returns the new generation. Readers miss everything from the bump on
        (every check covers the generation); the entries stay as they were, random-looking bytes
        no key opens any more, so a flush rewrites nothing but the header's generation."""
        if self._fd is None:
            raise CacheError(f"flush needs open_writer; result cache {self.path} is read-only or closed")
        with self._lock:
            generation = self._generation() + 1
            _U64.pack_into(self._mm, GENERATION_OFFSET, generation)
            self._stamps[:] = 0
            self._clock = 0
            self.used = 0
        return generation

    def stats(self) -> dict:
        """Geometry, entries in use, counters; ``torn``: misses refused by seq or check. ``used``
        is the writer's count of entries written since it opened the file (None for a reader:
        the file does not say which entries hold an answer)."""
        generation = self._generation()                  # raises once closed
        used = self.used if self._fd is not None else None
        return {**self.geometry._asdict(), "entries": self.geometry.sets * self.geometry.ways,
                "used": used, "generation": generation, "hits": self._hits, "misses": self._misses,
                "torn": self._torn, "inserts": self._inserts, "evictions": self._evictions}

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

    def seqs(self) -> np.ndarray:
        """A copy of every entry's seqlock counter (tests and tools: what a scan sees change)."""
        return self._seq_view().copy()

    def _seq_view(self) -> np.ndarray:
        """Every entry's seqlock counter, a live view of the mapping (delete it before close)."""
        return np.ndarray((self.geometry.sets * self.geometry.ways,), "<u8", self._mm, HEADER_SIZE,
                          (self._entry,))
