"""The client processes of the feed-rate benchmark: each keeps ``IN_FLIGHT`` frames in flight.

Each is a spawned process with its own ``inferd.client.Client(cache=False)``: the client library's
own look-up in the result cache is off, so every frame reaches the daemon, and what the daemon's
cache saves is the daemon's to show. It calls ``classify_many`` on ``IN_FLIGHT`` frames at a time,
back to back, from the shared start until the window ends (bench/lib/procs.py: every client warms
up until the same moment and measures over the same window). A call counts when it *ends* inside
the window; the frames counted, the calls' latencies and the process's CPU use are reported.

Frames. Every client holds ``IN_FLIGHT`` random frames of its own and stamps each one before a
call with (case salt, client index, frame counter) in its first 12 bytes, so no two frames of a run
are alike however many cases share one daemon (its cache would otherwise answer a later case from
an earlier one). With ``repeat`` = 0.3, each frame is instead, with probability 0.3, one of
``POPULAR`` frames every client shares (seeded alike): after the warm-up every one has been seen,
so those are repeats the daemon's cache can answer (or coalesce while one is in flight).
Stamping 12 bytes costs the client next to nothing beside the 150 KB the library writes into the
ring per 224x224 frame.
"""
from __future__ import annotations

import struct
import time
import traceback

import numpy as np

from ..lib.measure import frames, sleep_until
from ..lib.procs import report_ready

#: Frames each client keeps in flight: one classify_many of this many at a time.
IN_FLIGHT = 16
#: Frames every client shares, drawn for the repeats.
POPULAR = 64
SEED = 4242
_STAMP = struct.Struct("<HHQ")


def stamp(frame: np.ndarray, salt: int, index: int, n: int) -> None:
    """Write (salt, client index, counter) into the first 12 bytes of ``frame`` (in place)."""
    frame.reshape(-1)[:_STAMP.size] = np.frombuffer(_STAMP.pack(salt, index, n), dtype=np.uint8)


def feeder(q, index: int, socket_path: str, size: int, repeat: float, salt: int, warmup_s: float,
           seconds: float, start, go, stop) -> None:
    """Client process body: connect, report ready, wait for the shared start, then classify_many
    on ``IN_FLIGHT`` frames at a time until the window ends. Reports ``("done", index, frames
    counted, repeats counted, call latencies, CPU cores)``."""
    try:
        from inferd.client import Client

        rng = np.random.default_rng(SEED + 1 + index + 1000 * salt)
        own = frames(IN_FLIGHT, size, seed=SEED + 1 + index)
        popular = frames(POPULAR, size, seed=SEED) if repeat else None
        with Client(socket_path, cache=False) as client:
            client.classify_many(list(own))            # the session works before anyone starts
            report_ready(q, index, go)
            t_measure, t_end = start.value + warmup_s, start.value + warmup_s + seconds
            sleep_until(start.value)
            n, counted, repeats, lat = 0, 0, 0, []
            wall0, cpu0 = time.monotonic(), time.process_time()
            while time.monotonic() < t_end:
                batch, popular_here = [], 0
                for i in range(IN_FLIGHT):
                    if repeat and rng.random() < repeat:
                        batch.append(popular[rng.integers(POPULAR)])
                        popular_here += 1
                    else:
                        n += 1
                        stamp(own[i], salt, index, n)
                        batch.append(own[i])
                t0 = time.perf_counter()
                client.classify_many(batch)
                t1 = time.perf_counter()
                if t_measure <= time.monotonic() <= t_end:
                    counted += len(batch)
                    repeats += popular_here
                    lat.append(t1 - t0)
            cpu = (time.process_time() - cpu0) / max(time.monotonic() - wall0, 1e-9)
        q.put(("ok", ("done", index, counted, repeats, lat, cpu)))
    except BaseException:
        q.put(("error", traceback.format_exc()))
