"""The bare baseline of the feed rate: what one frame costs with nothing but the two steps no
daemon can avoid, measured in the same run.

- **Ring write**: one spawned process creates a ring of the daemon's kind (inferd.shm.ring, memfd,
  ``2 x IN_FLIGHT`` slots of the frame's size) and copies frames into its slots the way the client
  library does (``ring.slot(i, nbytes)[:] = frame``), cycling through ``IN_FLIGHT`` source frames
  and every slot; each copy is timed.
- **Socket ping-pong**: bench/load/transport.py's bare ping-pong, two processes and blocking
  AF_UNIX sockets with messages as long as the daemon's classify request and reply.

Bare frames/s at a frame size = 1 / (ring write p50 + ping-pong p50): one process doing, per frame,
the copy into shared memory and one round trip of a small message, and nothing else. The daemon's
clients send 16 frames a round trip and run 4 processes at once, so the daemon can beat it: the
ratio says how the daemon's whole path compares with the floor of its two unavoidable steps done
one frame at a time.
"""
from __future__ import annotations

import time
import traceback

from ..lib.measure import frames, us_stats
from ..lib.procs import RESULT_GRACE_S, run_in_child
from ..load import transport
from .clients import IN_FLIGHT


def _ring_child(q, size: int, warmup: int, count: int) -> None:
    """Child process body: time ``count`` frame copies into a fresh ring after ``warmup``."""
    try:
        import os

        from inferd.shm.ring import Ring, RingGeometry

        source = frames(IN_FLIGHT, size, seed=17).reshape(IN_FLIGHT, -1)
        nbytes = source.shape[1]
        ring, fd = Ring.create(RingGeometry(slots=2 * IN_FLIGHT, slot_bytes=nbytes), prefix="inferdbench")
        os.close(fd)
        try:
            times = []
            for i in range(warmup + count):
                t0 = time.perf_counter()
                ring.slot(i % (2 * IN_FLIGHT), nbytes)[:] = source[i % IN_FLIGHT]
                t1 = time.perf_counter()
                if i >= warmup:
                    times.append(t1 - t0)
        finally:
            ring.close()
        q.put(("ok", times))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def ring_write(size: int, warmup: int, count: int) -> dict:
    """Per-copy time of a ``size`` x ``size`` x 3 frame into a ring slot (us statistics)."""
    out = us_stats(run_in_child(_ring_child, (size, warmup, count), RESULT_GRACE_S, "bench-ring-write"))
    out.update(size=size, frame_bytes=size * size * 3)
    return out


def measure(sizes, warmup: int, count: int) -> dict:
    """The ping-pong once, the ring write at each size, and the bare frames/s of each size."""
    wire = transport.frame_sizes()
    ping = transport.measure_bare(wire["request_bytes"], wire["reply_bytes"], warmup, count)
    out = {"ping_pong": {**ping, **wire}, "sizes": {}}
    for size in sizes:
        write = ring_write(size, warmup, count)
        per_frame_us = write["p50_us"] + ping["p50_ms"] * 1e3
        out["sizes"][str(size)] = {"ring_write": write, "per_frame_us": per_frame_us,
                                   "frames_s": 1e6 / per_frame_us}
    return out
