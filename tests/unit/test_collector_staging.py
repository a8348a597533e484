"""The collector's staging of a batch (NOTE [ request path ] in daemon/pipeline/collector.py), in one
process: frames copied out of real rings (a run of one ring's slots in one gather,
daemon/pipeline/slot_copy.py; a posix ring slot by slot), hashed a pass at a time, claimed and looked
up; hits and coalesced frames settled and their rows given to the next frame. Every staged row is
checked against the frame its request named, byte for byte, and its key against the hash of
that frame."""
import os

import blake3
import numpy as np
import pytest

from inferd.daemon.front.session import Leaders
from inferd.daemon.pipeline import collector as collector_mod
from inferd.daemon.pipeline import slot_copy
from inferd.daemon.pipeline.records import BatchEntry, BatchResult, Outcome, Request
from inferd.shm import cache as cachefile
from inferd.shm.ring import Ring, RingGeometry

pytestmark = pytest.mark.timeout(60)

SHAPE = (8, 8, 3)
NBYTES = int(np.prod(SHAPE))
KEYING = ("d" * 64, "uint8_nhwc")


class _Caches:
    """What a collector asks of daemon/caching/results.py's Caches, over a real cache file."""

    keying = KEYING

    def __init__(self, path):
        self.cache = cachefile.ResultCache.open_writer(path, 1 << 20)

    def hash_row(self, row, keying=None):
        content = cachefile.content_hash(row)
        return content, cachefile.cache_key(*(keying or self.keying), content)

    def peek(self, key, top_k):
        hit = self.cache.lookup(key)
        return hit if hit is not None and len(hit) >= top_k else None


class _Session(Leaders):
    def __init__(self):
        self._init_leaders()


@pytest.fixture
def rings():
    """Two sealed (memfd) rings and a posix one, their slots filled with seeded random frames:
    (rings, the frame of each (ring index, slot))."""
    made, fds, frames = [], [], {}
    rng = np.random.default_rng(7)
    try:
        for k, backend in enumerate(("memfd", "memfd", "posix")):
            ring, fd = Ring.create(RingGeometry(16, NBYTES), backend=backend, prefix=f"inferd-test-{os.getpid()}")
            made.append(ring)
            fds.append(fd)
            for slot in range(16):
                frame = rng.integers(0, 256, SHAPE, dtype=np.uint8)
                frames[k, slot] = frame
                os.pwrite(fd, frame.tobytes(), ring.geometry.offset(slot))
        yield made, frames
    finally:
        for ring in made:
            ring.close()
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("compiled", [True, False])
def test_a_gather_copies_each_named_slot_into_its_row_in_order(rings, monkeypatch, compiled):
    made, frames = rings
    if compiled:
        if not slot_copy.warm():
            pytest.skip("numba is not installed: the gather is numpy copies")
    else:
        monkeypatch.setattr(slot_copy, "_ready", type(slot_copy._ready)())    # not compiled yet
    out = np.zeros((5, *SHAPE), np.uint8)
    slots = [9, 0, 15, 3, 9]
    slot_copy.gather(made[1], slots, NBYTES, out)
    for row, slot in zip(out, slots):
        assert np.array_equal(row, frames[1, slot])
    with pytest.raises(ValueError, match="outside"):
        slot_copy.gather(made[1], [16], NBYTES, out[:1])


@pytest.mark.parametrize("pass_bytes", [NBYTES, 3 * NBYTES, 1 << 20])
def test_staging_copies_hashes_and_settles_a_pass_at_a_time(rings, tmp_path, monkeypatch, pass_bytes):
    """Passes of one frame, of three, and the whole batch: the rows of the entries to compute are
    their own frames, in order, whatever was settled between them; hashes are of those frames;
    the second identical frame of a session is COALESCED behind the first, a frame whose key is in
    the cache is a HIT, and neither keeps a row."""
    monkeypatch.setattr(collector_mod, "PASS_BYTES", pass_bytes)
    made, frames = rings
    caches = _Caches(str(tmp_path / "cache"))
    sessions = [_Session() for _ in made]
    hit_frame = frames[0, 4]
    caches.cache.insert(caches.hash_row(hit_frame)[1], [(3, 0.5), (1, 0.25)])
    # (ring, slot) in the batch's order: a run of ring 0, ring 1, the posix ring, a repeat of
    # (0, 2) in the same session (coalesced), (0, 4) a hit, a private copy and a canary
    order = [(0, 2), (0, 5), (0, 2), (1, 7), (1, 1), (2, 3), (2, 8), (0, 4), (1, 9), ("frame", 0), (None, 0)]
    entries, expected = [], []
    for i, (k, slot) in enumerate(order):
        if k == "frame":
            private = np.full(SHAPE, 200, np.uint8)
            r = Request(None, None, i, -1, 1, 0.0, 1e9, frame=private)
        elif k is None:
            r = Request(None, None, i, -1, 1, 0.0, 1e9)                 # canary: a blank row
        else:
            r = Request(sessions[k], made[k], i, slot, 1, 0.0, 1e9, hash=True)
        entries.append(BatchEntry(r, 0))
    col = object.__new__(collector_mod.Collector)
    col._caches = caches
    rows = np.full((len(order), *SHAPE), 99, np.uint8)
    staged = col._stage(BatchResult(None, entries), list(entries), rows)

    by_outcome = {e.request.id: e.outcome for e in entries}
    assert by_outcome[2] is Outcome.COALESCED and entries[2].leader is entries[0].request
    assert by_outcome[7] is Outcome.HIT and entries[7].top == [(3, 0.5), (1, 0.25)]
    assert [e.request.id for e in staged] == [0, 1, 3, 4, 5, 6, 8, 9, 10]
    for row, e in zip(rows, staged):
        k, slot = order[e.request.id]
        want = (np.full(SHAPE, 200, np.uint8) if k == "frame" else np.zeros(SHAPE, np.uint8) if k is None
                else frames[k, slot])
        assert np.array_equal(row, want), e.request.id
        if e.request.hash:
            assert e.content == cachefile.content_hash(want)
            assert e.key == cachefile.cache_key(*KEYING, e.content)
    caches.cache.close()


def test_content_hash_and_cache_key_are_those_clients_compute():
    """The prepared hashers (one derive-key state copied per call) give the bytes the format
    defines: a key derived from context, every field length-prefixed (shm/cache.py)."""
    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    h = blake3.blake3(derive_key_context="inferd 2026-01 frame content hash v1")
    code = frame.dtype.str.encode()
    h.update(len(code).to_bytes(4, "little") + code + (3).to_bytes(4, "little")
             + b"".join(n.to_bytes(8, "little") for n in frame.shape))
    h.update(frame.tobytes())
    assert cachefile.content_hash(frame) == h.digest()
    k = blake3.blake3(derive_key_context="inferd 2026-01 result cache key v1")
    for part in (b"digest", b"prep", h.digest()):
        k.update(len(part).to_bytes(8, "little") + part)
    assert cachefile.cache_key("digest", "prep", h.digest()) == k.digest()
    assert cachefile.cache_key("digest", "prep2", h.digest()) != k.digest()
