"""Frames out of a client's ring slots into staging rows, several at once: one compiled gather
with the GIL let go once (numba), instead of one numpy copy, one GIL hand-over, per frame.

Why: the collector stages a batch while the event loop serves sessions on the same interpreter.
Every call that lets the GIL go must take it back, and when the loop holds it then, the collector
waits (up to the switch interval, ``threads.switch_interval_ms``). A per-frame copy and a
per-frame hash are two such hand-overs a frame; the gather makes the copies of a chunk one
(NOTE [ request path ] in daemon/pipeline/collector.py).

The gather reads only slots of a sealed (memfd) mapping, which cannot shrink under it, at offsets
the caller computed from the ring's own geometry and checked slot numbers; a posix ring is read
slot by slot (``Ring.read_slot``: a short read is that request's own error). Without numba, or
before its kernel is compiled, it is the same copies one numpy call each.
"""
from __future__ import annotations

import threading

import numpy as np

try:
    import numba
except ImportError:                     # optional: one numpy copy a frame instead
    numba = None

_ready = threading.Event()              # the kernel compiled (or loaded from numba's cache)
_lock = threading.Lock()
_kernel = None


def _gather_py(src, starts, nbytes, out):
    """The kernel numba compiles: row i of ``out`` = ``nbytes`` of ``src`` from ``starts[i]``.
    Unsigned indices: numba's wrap-around of a negative (signed) index kept LLVM from making the
    inner loop a vectorised copy (6x slower than numpy's); this way it runs at a memcpy's speed."""
    for i in range(starts.shape[0]):
        s, row = numba.uint64(starts[i]), out[i]
        for b in range(numba.uint64(nbytes)):
            row[b] = src[s + b]


def warm() -> bool:
    """Compile the kernel (about a second; numba's on-disk cache keeps it for the next start),
    so that no request waits for it: the collector calls this before it collects. True when
    the compiled gather is in use."""
    global _kernel
    if numba is None:
        return False
    with _lock:
        if _kernel is None:
            try:
                try:
                    fn = numba.njit(nogil=True, boundscheck=False, cache=True)(_gather_py)
                except RuntimeError:        # no cache locator: compiled at each start
                    fn = numba.njit(nogil=True, boundscheck=False)(_gather_py)
                src, out = np.zeros(64, np.uint8), np.empty((2, 8), np.uint8)
                fn(src, np.array([0, 8], np.int64), 8, out)
                src.setflags(write=False)   # a mapping may be read-only: numba types it apart
                fn(src, np.array([0, 8], np.int64), 8, out)
                _kernel = fn
            except Exception:               # a numba that cannot compile here: numpy copies
                return False
            _ready.set()
    return True


def gather(ring, slots: list[int], nbytes: int, out: np.ndarray) -> None:
    """Copy the first ``nbytes`` of each of ``slots`` of the mapped ``ring`` into the rows of
    ``out`` (a C-contiguous array of ``len(slots)`` rows of ``nbytes`` bytes), in order. The slot
    numbers were checked against the ring at admission (daemon/front/admission.py); they are
    checked again here, since a wrong one would read another slot's bytes."""
    g = ring.geometry
    if not 0 <= nbytes <= g.slot_bytes or any(not 0 <= s < g.slots for s in slots):
        raise ValueError(f"slots {slots}, {nbytes} bytes are outside a ring of {g.slots} slots "
                         f"of {g.slot_bytes} bytes")
    rows = out.reshape(len(slots), nbytes)
    if _ready.is_set():
        starts = np.fromiter((g.offset(s) for s in slots), np.int64, len(slots))
        _kernel(ring.array, starts, nbytes, rows)
        return
    src = ring.array
    for i, s in enumerate(slots):
        at = g.offset(s)
        rows[i] = src[at:at + nbytes]
