"""Give the heap that closed sessions freed back to the system (glibc ``malloc_trim``).

A session that does not read its replies holds up to ``server.reply_buffer_bytes`` of them in its
transport, and a flooding one a read's worth of frames in its reader. Python frees those when the
session closes, but glibc's malloc keeps most freed heap pages mapped for later use (only a free
block at the very top of the heap is returned, and the mmap threshold grows after large frees), so
32 such sessions left the daemon's RSS tens of MiB higher after they had gone. ``malloc_trim(0)``
returns every free page of every arena (``madvise(MADV_DONTNEED)`` inside the heap too).

It walks the arenas, so it runs off the loop (ctypes releases the GIL during the call), at most
once per ``min_interval_s``, and only after a session that held a large buffer closed. Elsewhere
than glibc (musl, macOS) there is no ``malloc_trim``: ``request`` does nothing.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import time

log = logging.getLogger("inferd.memory")


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


class HeapTrim:
    """``request()``: trim soon (after ``delay_s``, so buffers released with the transport are
    freed first), at most once per ``min_interval_s``; requests meanwhile fold into one."""

    def __init__(self, delay_s: float = 0.2, min_interval_s: float = 1.0, clock=time.monotonic):
        self._trim = _malloc_trim()
        if self._trim is not None:
            self._trim.argtypes, self._trim.restype = [ctypes.c_size_t], ctypes.c_int
        self._delay, self._interval, self._clock = delay_s, min_interval_s, clock
        self._last = -min_interval_s
        self._due = False                   # a trim is scheduled or running
        self.trims = 0                      # done so far (stats, tests)

    def request(self) -> None:
        if self._trim is None or self._due:
            return
        self._due = True
        loop = asyncio.get_running_loop()
        wait = max(self._delay, self._last + self._interval - self._clock())
        loop.call_later(wait, self._start, loop)

    def _start(self, loop) -> None:
        try:
            task = loop.run_in_executor(None, self._timed_trim)
        except RuntimeError:                # the loop's executor is shutting down: so is the daemon
            self._due = False
            return
        task.add_done_callback(self._done)

    def _timed_trim(self) -> float:
        t0 = time.perf_counter()
        self._trim(0)
        return time.perf_counter() - t0

    def _done(self, future) -> None:
        self._due = False
        self._last = self._clock()
        self.trims += 1
        if future.cancelled():
            return
        if future.exception() is not None:
            log.warning("malloc_trim failed: %r", future.exception())
        else:
            log.debug("malloc_trim: %.1f ms", future.result() * 1e3)
