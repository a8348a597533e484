"""Every cache of answers the daemon keeps, and how it uses them: :class:`Caches`.

The result cache (inferd.shm.cache, an mmap'ed file clients read too), the embedding store
(daemon/caching/embedding_store.py), the fleet cache (daemon/caching/fleet/cache.py, Redis) and
the verification of encoded uploads (a decode thread; NOTE [ encoded uploads ]).

The content hash that keys both is computed by the daemon over its own private copy of the
frame: the row its device's collector staged it into (``hash_row``, on the collector thread,
NOTE [ request path ] in daemon/pipeline/collector.py), which is also what the model computes on.
So the answer stored under a hash is the answer for exactly the bytes that hash covers, and no
client can make another receive an answer for different bytes: whatever it writes into its slot,
before or after submitting, is either what gets staged, hashed and computed, or nothing (a client
that rewrites its slot after staging changes nothing we read again). The hash a client computes
for its own lookups is never trusted for writing. Two kinds of request are still copied and hashed
on the loop at admission (``private_copy``): every request while the fleet cache is on (Redis is
asked on the loop before a device is) and ``embed`` / ``near`` (their stored vector is looked up
at admission).

Insert sampling (no decay on unique traffic): the hit rate is an exponentially weighted average
over lookups (daemon-side) and the hits clients report (client-side). While it is below
``cache.min_hit_rate`` only 1 in ``cache.sample_every`` misses is inserted, so a stream of unique
images costs a hash and a lookup per frame but almost no inserts; once repeats show up, inserts
resume for every miss.

NOTE [ unhashed misses ]

A client that maps the cache looks every frame up itself before it sends it, and says so
(``looked`` in the request, docs/protocol.md): such a request is already a miss, and on unique
traffic the daemon's hash and lookup of it buy nothing but device-thread time. So while the
hit rate is below ``cache.min_hit_rate``, only 1 in ``cache.sample_every`` of the looked-up
requests is hashed (by its collector), and remember() inserts those (``hashing_for``: the same
insert rate as sampling gives hashed misses); the others count as misses and go to a device
unhashed: staged and computed, answered, never inserted, never coalesced. Nothing
changes in what may be written: every insert is still of a frame the daemon copied and hashed
itself, and a client that claims ``looked`` falsely only gives up the daemon-side lookup for its
own requests. Requests that name a tag, embed or near, and any request while the embedding store
or the fleet cache is on, are always hashed (those key by content whatever the hit rate).

NOTE [ encoded uploads ]

A client that classifies JPEG/PNG/WebP bytes looks their hash up in the read-only cache before it
decodes them (inferd.shm.uploads), under ``encoded_key(digest, preprocess_id, decoder_id,
BLAKE3(bytes))`` (inferd.shm.cache). Only the daemon writes, and it writes such a key only for
bytes it decoded itself to exactly the frame it computed the answer for:

    client: miss -> decode -> frame in slot S, the bytes in the run of slots U..U+m-1
            --classify(slot S, upload_slot U, upload_nbytes n)-->
    admission (loop): refuse first (S and every slot of the run checked, m <= half the ring,
                      n <= MAX_ENCODED_BYTES); n over cache.max_upload_bytes: no entry, nothing copied
    collector:        stage S (its row, hashed as ever) and copy that row (private frame) and
                      the run (private bytes, one copy)
    answer (loop):    -> decode pool (one thread, at most MAX_UPLOADS and MAX_UPLOAD_BYTES
                         waiting; else no entry):
                         decode(copy of U) == copy of S ?  (the client's own decode: inferd.shm.uploads)
                         equal: BLAKE3(copy of U)          (hashed here: a large upload's hash
                                                            is not the loop's either)
                      top of the frame  --+
    verdict (loop):   hash / not equal  --+--> both in, equal: insert
                                               encoded_key(model, decoder, hash) -> top; else nothing

So an entry under an encoded key always holds the answer for the frame those bytes decode to with
that decoder: a client that sends bytes that do not decode to its frame gets the right answer for
its frame and makes no entry; a client whose decoder differs (another Pillow, libjpeg-turbo) makes
keys that never meet the daemon's. The copies are private, so nothing the client writes after
admission changes what is verified. Every slot of the run is held (``session.inflight``) from
admission to the request's reply, like its frame's slot, and let go in Scheduler._finish, the one
place every reply, error, expiry and drop passes. The copies are the collector's and the decode runs
off the loop; its CPU (one decode per first upload, bounded by inferd.shm.uploads.MAX_ENCODED_BYTES
and MAX_PIXELS) is the price of the repeat answered without decoding; nothing of it is the loop's,
and an upload over ``cache.max_upload_bytes`` (4 MiB) is not even copied: it is classified from
its frame and makes no entry. Uploads of requests
answered at once (cache hit, coalesced) and of a model that changed before the verdict make no
entry.

Who sees what (docs/operations.md, "Who can see and write what"). The result cache file is the
daemon's alone (0600, in a directory the daemon makes 0700): clients map the read-only descriptor
handed to them at hello, never the path. Every client can read every byte of that mapping, so each
entry is sealed under its lookup key (inferd.shm.cache: a stored tag, the answer masked and
checked under key-derived secrets, no stamps or counts in the file): a client reads the answer of a
frame (or encoded bytes) it holds and nothing of anyone else's. Frame entries and encoded-upload
entries are sealed alike (``ResultCache.insert`` and ``lookup`` take the lookup key and do the
rest); nothing here stores a lookup key anywhere a client can read it. Embeddings are kept per (uid, content hash): a uid's
near-duplicate search, its tags and its ``embed`` shortcuts see only the rows it stored itself,
unless ``embeddings.shared`` opens every row to every uid (the store applies that rule: see
daemon/caching/embedding_store.py).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import time

import numpy as np

from ..front.admission import Rejected
from ...shm import cache as cachefile
from ...shm import limits, uploads, wire
from ...shm.ring import RingError
from .embedding_store import EmbeddingStore, index_options

log = logging.getLogger("inferd.caching")

RATE_ALPHA = 0.01          # weight of one lookup in the smoothed hit rate
#: Where admission decides a request's frame is hashed (Caches.hashing_for).
LOOP, STAGED, UNHASHED = "loop", "staged", "unhashed"
MAX_UPLOADS = 32           # encoded uploads waiting for the decode thread, at most (NOTE [ encoded uploads ])
MAX_UPLOAD_BYTES = 64 * 2**20   # ... and their copies' bytes, at most: the daemon's memory for them


class Upload:
    """One encoded upload being verified: inserted under its encoded key once both the answer
    (``top``) and an equal decode (``verdict``: the BLAKE3 of the bytes, hashed on the decode
    thread) are in, on the loop thread (NOTE [ encoded uploads ])."""

    __slots__ = ("digest", "preprocess_id", "decoder", "top", "verdict", "caches")

    def __init__(self, caches: "Caches", decoder: str):
        self.caches, self.digest, self.preprocess_id = caches, caches.digest, caches.spec.preprocess_id
        self.decoder = decoder
        self.top = self.verdict = None

    def answered(self, top: list) -> None:
        self.top = top
        self._settle()

    def decided(self, future) -> None:
        self.verdict = future.result() if not future.cancelled() and future.exception() is None else None
        self.caches.counters["uploads_verified" if self.verdict else "uploads_mismatched"] += 1
        self._settle()

    def _settle(self) -> None:
        caches = self.caches
        if self.verdict and self.top is not None and caches.cache is not None and caches.digest == self.digest:
            key = cachefile.encoded_key(self.digest, self.preprocess_id, self.decoder, self.verdict)
            if caches.cache.insert(key, self.top):
                caches.counters["evictions"] += 1
            caches.counters["uploads_inserted"] += 1
            self.verdict = None             # once


def _decodes_to(data: np.ndarray, frame: np.ndarray) -> bytes | None:
    """The BLAKE3 of ``data`` (inferd.shm.uploads.encoded_hash) when it decodes to exactly
    ``frame``, else None. Runs on the decode thread: neither the decode nor the hash of a large
    upload (up to MAX_ENCODED_BYTES) is the loop's."""
    try:
        if not np.array_equal(uploads.decode(data, frame.shape[0], frame.shape[1]), frame):
            return None
    except uploads.UndecodableImage:
        return None
    return uploads.encoded_hash(data)


class Caches:
    """Every cache of answers, and the counters and sampling that decide what goes in them (the
    module docstring): ``cache`` the result cache (inferd.shm.cache), ``store`` the embedding
    store, ``l2`` the fleet cache, each None when off; and the thread that verifies encoded
    uploads (started by the first). Loop thread only, but for the decode thread's verdicts, which
    come back on the loop."""

    def __init__(self, cfg, spec, digest: str, counters: collections.Counter):
        self.cfg = cfg
        self.spec = spec
        self.digest = digest
        self.counters = counters
        self.cache: cachefile.ResultCache | None = None
        self.store = None                   # the first (default) model's embedding store
        # with several models, the stores of the others, by model id (daemon/models/catalog.py):
        # each model's embeddings in a file of its own digest, so versions never share rows
        self.stores: dict = {}
        self.first_mid = 0                  # the model whose store is ``store`` (the scheduler's first)
        self.hit_rate = 1.0                 # optimistic until traffic says otherwise
        self._misses = 0
        self._written = [0.0, 0]            # seconds in ``keep``, rows it wrote
        self._looked = 0                    # looked-up misses seen at a low hit rate
        # what keys a row, swapped in one assignment by a reload: device threads read it
        self.keying = (digest, spec.preprocess_id)
        self.keep_k = 0
        self.l2 = None                      # the fleet cache (daemon/caching/fleet/cache.py), when l2.enabled
        self._decoder = None                # the upload decode thread, started by the first upload
        self._uploads_waiting = 0
        self._upload_bytes = 0              # bytes of the uploads waiting (MAX_UPLOAD_BYTES)

    @property
    def hashing(self) -> bool:
        return self.cache is not None or self.store is not None or bool(self.stores)

    def store_for(self, mid: int):
        """Model ``mid``'s embedding store, or None."""
        return self.store if mid == self.first_mid else self.stores.get(mid)

    # what a new session is handed at hello (daemon/front/handshake.py) ---------------------------
    def share_cache(self) -> int | None:
        """A new read-only (O_RDONLY) descriptor of the result cache for a client to map (the
        caller closes its copy after sending it), or None without a result cache."""
        return self.cache.share_fd() if self.cache is not None else None

    def hello_cache(self) -> dict | None:
        """The ``cache`` part of a hello reply: what a client needs to look answers up itself
        (most pairs kept, the preprocessing id of its keys), or None without a result cache."""
        if self.cache is None:
            return None
        return {"max_k": self.keep_k, "preprocess": self.spec.preprocess_id}

    def open_cache(self, path: str) -> None:
        c = self.cfg.cache
        private_directory(os.path.dirname(path) or ".")
        self.cache = cachefile.ResultCache.open_writer(path, c.size_mb * 2**20, mode=0o600, log=log)
        self.keep_k = min(self.cache.geometry.max_k, len(self.spec.labels))
        log.info("result cache %s: %d MiB", path, c.size_mb)

    def open_store(self, path: str, dim: int, embedding: str = "", mid: int | None = None):
        """Open the embedding store (``embedding``: the definition's id, daemon/models/embedding_pooling.py)
        of the first model, or of model ``mid``; returns it."""
        private_directory(os.path.dirname(path) or ".")
        store = EmbeddingStore.open(path, self.cfg.embeddings.capacity, dim,
                                    shared=self.cfg.embeddings.shared, log=log, embedding=embedding,
                                    index=index_options(self.cfg.embeddings))
        if mid is None or mid == self.first_mid:
            self.store = store
        else:
            self.stores[mid] = store
        log.info("embedding store %s: %d of %d rows, dim %d", path, len(store),
                 self.cfg.embeddings.capacity, dim)
        return store

    def hashing_for(self, looked, op: str, tag) -> tuple[str, bool]:
        """Where a request's frame is hashed, decided at admission in O(1) (the caller checks
        ``hashing`` first): (``LOOP``: copied and hashed now, ``private_copy``; ``STAGED``: its
        collector hashes the staged row; ``UNHASHED``: a miss its client already looked up that the
        cache would not insert, counted here as a miss and an insert skipped (NOTE [ unhashed
        misses ]), and whether a STAGED request is sampled for insert)."""
        if op != "classify" or self.l2 is not None:
            return LOOP, False
        if looked is not True or tag is not None or self.store is not None or self.stores or self.cache is None \
                or self.hit_rate >= self.cfg.cache.min_hit_rate:
            return STAGED, False
        self._looked += 1
        if self._looked % self.cfg.cache.sample_every == 0:
            return STAGED, True                     # remember() inserts it
        c = self.counters
        c["misses"] += 1
        c["inserts_skipped"] += 1
        c["unhashed"] += 1
        self.hit_rate -= RATE_ALPHA * self.hit_rate
        return UNHASHED, False

    # on device threads (the collectors): thread-safe ------------------------------------------------
    def hash_row(self, row: np.ndarray, keying: tuple | None = None) -> tuple[bytes, bytes]:
        """(content hash, cache key) of a staged row, the daemon's own copy of a frame, under
        ``keying`` (its model's, daemon/models/catalog.py ``Served.keying``; None: the first
        model's). BLAKE3 lets go of the GIL over a frame, so devices hash in parallel. Any thread."""
        content = cachefile.content_hash(row)
        digest, preprocess_id = keying or self.keying
        return content, cachefile.cache_key(digest, preprocess_id, content)

    def peek(self, key: bytes, top_k: int):
        """Cached top pairs (at least ``top_k``) for a staged row's key, or None; counted by the
        loop (``count_lookups``) when the batch comes back. Any thread: a lookup reads the file
        under its seqlock, as clients do."""
        cache = self.cache
        hit = cache.lookup(key) if cache is not None else None
        return hit if hit is not None and len(hit) >= top_k else None

    def count_lookups(self, hits: int, misses: int) -> None:
        """A batch's lookups made by its collector (``peek``), counted on the loop at once: the
        hit rate moves as if the misses came first, then the hits (n steps toward one value in
        closed form: ``(1 - RATE_ALPHA) ** n`` of the distance is left)."""
        c = self.counters
        if misses:
            c["misses"] += misses
            self.hit_rate *= (1 - RATE_ALPHA) ** misses
        if hits:
            c["daemon_hits"] += hits
            self.hit_rate = 1 - (1 - self.hit_rate) * (1 - RATE_ALPHA) ** hits

    def private_copy(self, ring, slot: int, served=None) -> tuple[np.ndarray, bytes, bytes]:
        """(frame copy, content hash, cache key) for a checked slot of model ``served`` (None: the
        first model), on the loop (``LOOP`` requests). Rejected (invalid_input) when the slot cannot
        be read whole: a posix ring its client shrank (inferd.shm.ring)."""
        t0 = time.perf_counter()
        spec = served.spec if served is not None else self.spec
        try:
            frame = ring.read_slot(slot, spec.frame_bytes).reshape(spec.frame_shape)
        except RingError as exc:
            raise Rejected(wire.E_INVALID_INPUT, f"slot {slot} cannot be read: {exc}") from None
        content = cachefile.content_hash(frame)
        key = self.key(content, served.keying if served is not None else None)
        self.counters["hash_seconds"] += time.perf_counter() - t0
        self.counters["hashed"] += 1
        return frame, content, key

    def upload_bytes(self, nbytes: int) -> int:
        """At admission: how many bytes of a checked upload its collector should copy for
        verification, 0 when no entry can be made (no cache, over cache.max_upload_bytes)."""
        if self.cache is None:
            return 0
        if nbytes > self.cfg.cache.max_upload_bytes:
            self.counters["uploads_skipped"] += 1
            return 0
        return nbytes

    def verify_upload(self, data: np.ndarray, frame: np.ndarray, top: list) -> None:
        """The answer ``top`` of a frame whose collector copied its encoded bytes (``data``) and
        its staged row (``frame``): verify them on the decode thread and insert the encoded key
        when they agree (NOTE [ encoded uploads ]); nothing when the decode thread is busy
        (MAX_UPLOADS uploads or MAX_UPLOAD_BYTES bytes waiting). Loop thread."""
        nbytes = data.nbytes
        if self.cache is None or self._uploads_waiting >= MAX_UPLOADS \
                or self._upload_bytes + nbytes > MAX_UPLOAD_BYTES:
            self.counters["uploads_skipped"] += 1
            return
        h, w = self.spec.frame_shape[:2]
        record = Upload(self, uploads.decoder_id(h, w))
        if self._decoder is None:
            self._decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inferd-decode")
        self._uploads_waiting += 1
        self._upload_bytes += nbytes
        future = asyncio.get_running_loop().run_in_executor(self._decoder, _decodes_to, data, frame)
        future.add_done_callback(lambda _f, n=nbytes: self._upload_done(n))
        future.add_done_callback(record.decided)
        record.answered(top)

    def _upload_done(self, nbytes: int) -> None:
        self._uploads_waiting -= 1
        self._upload_bytes -= nbytes

    def key(self, content: bytes, keying: tuple | None = None) -> bytes:
        """The cache key of a content hash under a model's ``keying`` (None: the first model's)."""
        digest, preprocess_id = keying or self.keying
        return cachefile.cache_key(digest, preprocess_id, content)

    def flush(self) -> tuple[int, int]:
        """Empty the result cache: (entries dropped, new generation). The count is of entries
        written since this daemon opened the file: the file keeps no count (inferd.shm.cache)."""
        dropped = self.cache.stats()["used"]
        return dropped, self.cache.flush()

    def switch_model(self, model) -> None:
        """Key by ``model`` from now on (a reload). The cache is emptied: no entry of the old
        model can be answered under a key a client still makes with the old digest."""
        self.spec, self.digest = model.spec, model.digest
        self.keying = (model.digest, model.spec.preprocess_id)
        if self.cache is not None:
            self.keep_k = min(self.cache.geometry.max_k, len(model.spec.labels))
            self.cache.flush()

    def lookup(self, key: bytes, top_k: int):
        """Cached top pairs (at least top_k of them), or None. Counts the lookup."""
        hit = self.cache.lookup(key)
        ok = hit is not None and len(hit) >= top_k
        self.counters["daemon_hits" if ok else "misses"] += 1
        self.hit_rate += RATE_ALPHA * (ok - self.hit_rate)
        return hit if ok else None

    def client_hits(self, n) -> None:
        """Hits a client answered itself, reported with its next request or a ``hits``
        notification; anything but a count within inferd.shm.limits.MAX_HITS_REPORT is ignored."""
        if limits.hits_ok(n):
            self.counters["client_hits"] += n
            self.hit_rate += (1 - self.hit_rate) * (1 - (1 - RATE_ALPHA) ** min(n, 1000))

    def seal(self, key: bytes, top: list, insert: bool = False):
        """For a pipeline thread delivering a computed answer: the cache entry ``remember`` would
        insert, sealed beforehand (ResultCache.seal: the BLAKE3 work of an insert, off the loop),
        where it will surely be inserted (the hit rate at or over ``cache.min_hit_rate``, or
        ``insert``); else None (a sampled insert is sealed on the loop). Any thread."""
        cache = self.cache
        if cache is None or not key or not (insert or self.hit_rate >= self.cfg.cache.min_hit_rate):
            return None
        try:
            return cache.seal(key, top)
        except (cachefile.CacheError, ValueError):    # closed or set aside meanwhile; pairs it cannot hold
            return None

    def remember(self, key: bytes, content: bytes, top: list, vector, tag, uid: int, insert: bool = False,
                 mid: int | None = None, sealed=None, rows: list | None = None) -> None:
        """After a computed answer: insert (sampled while the hit rate is low, always when
        ``insert``: sampled at admission, NOTE [ unhashed misses ]), keep the embedding as
        ``uid``'s (the uid of the request's session) in its model's (``mid``) store: at once, or
        with ``rows`` (a list) appended there for :meth:`keep` to write with the rest of its batch
        (NOTE [ rows written per batch ] in embedding_store.py). ``sealed``: the entry ``seal`` made
        off the loop, or None."""
        if self.cache is not None and key:
            self._misses += 1
            if self.hit_rate >= self.cfg.cache.min_hit_rate or self._misses % self.cfg.cache.sample_every == 0 \
                    or insert:
                if self.cache.insert(key, top, sealed):
                    self.counters["evictions"] += 1
                self.counters["inserts"] += 1
            else:
                self.counters["inserts_skipped"] += 1
        store = self.store if mid is None or mid == self.first_mid else self.stores.get(mid)
        if store is not None and vector is not None and content:
            if rows is None:
                store.add(content, vector, tag, uid=uid)
            else:
                rows.append((store, content, vector, tag, uid))
        if self.l2 is not None and key:     # write-through to the fleet (NOTE [ fleet cache ])
            self.l2.store(key, top)

    def keep(self, rows: list) -> None:
        """Write the embeddings :meth:`remember` collected in ``rows`` for one batch: one
        ``add_many`` a store (a batch is one model's: one store). Timed, for the stats
        (``embeddings_write_us_mean``: the loop's CPU a stored row; its thread's CPU clock, as
        the wall clock counts the turns other threads take the core)."""
        t0 = time.thread_time()
        by: dict = {}
        for store, content, vector, tag, uid in rows:
            by.setdefault(id(store), (store, []))[1].append((content, vector, tag, uid))
        for store, entries in by.values():
            contents, vectors, tags, uids = zip(*entries)
            store.add_many(list(contents), np.stack(vectors), list(tags), list(uids))
        self._written[0] += time.thread_time() - t0
        self._written[1] += len(rows)

    def adopt(self, key: bytes, top: list) -> None:
        """An answer another host computed (a fleet cache hit): stored locally without sampling
        (it is a repeat by definition), so this host's clients answer the next one themselves."""
        if self.cache is not None:
            if self.cache.insert(key, top):
                self.counters["evictions"] += 1
            self.counters["inserts"] += 1

    def retag(self, content: bytes, tag, uid: int, mid: int | None = None) -> None:
        """A tagged request of ``uid`` answered from the cache: ``uid``'s row for the frame takes
        the tag. The vector may come from any uid's row (it depends on the bytes alone and is not
        sent anywhere); no other uid's row or tag changes."""
        store = self.store if mid is None or mid == self.first_mid else self.stores.get(mid)
        if tag is not None and store is not None:
            vector = store.get(content, uid=None)
            if vector is not None:
                store.add(content, vector, tag, uid=uid)

    def stats(self) -> dict:
        c = self.counters
        lookups = c["daemon_hits"] + c["misses"] + c["client_hits"]
        out = {"enabled": self.cache is not None, "hit_rate_smoothed": round(self.hit_rate, 4),
               "hit_rate": round((c["daemon_hits"] + c["client_hits"]) / lookups, 4) if lookups else 0.0,
               "hash_us_mean": round(1e6 * c["hash_seconds"] / max(c["hashed"], 1), 2)}
        for k in ("daemon_hits", "client_hits", "misses", "inserts", "inserts_skipped", "evictions",
                  "coalesced", "unhashed", "uploads_verified", "uploads_mismatched", "uploads_inserted",
                  "uploads_skipped"):
            out[k] = c[k]
        if self.cache is not None:
            out["file"] = self.cache.stats()
        if self.store is not None:
            out["embeddings"] = len(self.store)
            out["embeddings_checking"] = self.store.checking
            out["embeddings_write_us_mean"] = round(1e6 * self._written[0] / max(self._written[1], 1), 2)
            if (index := self.store.index_stats()) is not None:
                out["embedding_index"] = index
        if self.l2 is not None:
            out["l2"] = self.l2.stats()
        return out

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)
        for thing in (self.cache, self.store, *self.stores.values()):
            if thing is not None:
                thing.close()


def private_directory(path: str) -> None:
    """Make ``path`` 0700 when it is missing; warn when an existing one lets other users list it
    (the files in it are 0600 either way, but their names tell which models this host runs)."""
    try:
        os.makedirs(path, mode=0o700)
        return
    except FileExistsError:
        pass
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o044:
        log.warning("directory %s is mode %03o: other users can list the cache and embedding files in "
                    "it (not read them: those are 0600); chmod 0700 it, or CacheDirectoryMode=0700 "
                    "under systemd", path, mode)
