"""Applications: what the programs that use inferd see (an asyncio client, uploads of encoded
images). One function per measurement; each prints and returns ratios against a baseline measured
in the same run.

    python -m bench.apps [--quick] [--only async]

- ``async_vs_sync``: one AsyncClient with 64 requests in flight on one connection (64 tasks, one
  process) against 16 sync Clients in 16 processes, on one daemon; rounds interleaved
  (sync, async, sync, async ...), each side's requests/s summed over its rounds. Target: the
  AsyncClient carries >= 95 % of the 16 processes' throughput.
- ``jpeg_throughput`` (classify from JPEG with N client processes decoding against one) and
  ``repeat_upload`` (a repeated upload against a first one): the encoded-images part, in
  bench/apps/encoded.py.

Daemons come from bench/lib/daemons.py (cache and embeddings off, so every request reaches the model);
in ``async_vs_sync`` clients run with ``cache=False`` and classify one frame over and over.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from ..lib.daemons import daemon
from ..lib.measure import frames
from ..lib.measure import sleep_until
from ..lib.procs import counts_per_second, report_ready
from ..lib.report import DEFAULT_OUT, prog
from .encoded import jpeg_throughput, repeat_upload

#: How the daemon runs for ``async_vs_sync``: "noop" isolates what the clients cost (the hardest
#: case for one client process: the daemon answers faster than Python sends); "shapes" is the
#: built-in model, where the device is the limit.
ASYNC_MODELS = {
    "noop": ["--model", "noop", "--device", "cpu:1"],
    "shapes": ["--model", "shapes", "--device", "cpu:1"],
}
SYNC_PROCESSES = 16
ASYNC_IN_FLIGHT = 64


# -- async_vs_sync ----------------------------------------------------------------------------------
def _sync_client(q, index: int, socket_path: str, size: int, seconds: float, start, go, stop) -> None:
    """One process, one Client: connected and warm, it waits for the shared start with the other
    processes of its round, then classifies for ``seconds``; the count of answers."""
    try:
        from inferd.client import Client

        frame = frames(1, size, seed=os.getpid())[0]
        with Client(socket_path, cache=False) as c:
            c.classify(frame)                              # connected and warm before the window
            report_ready(q, index, go)
            sleep_until(start.value)
            n, end = 0, start.value + seconds
            while time.monotonic() < end:
                c.classify(frame)
                n += 1
        q.put(("ok", ("done", index, n)))
    except Exception:                                     # noqa: reported to the parent
        import traceback
        q.put(("error", traceback.format_exc()))


def _async_client(q, index: int, socket_path: str, size: int, seconds: float, in_flight: int,
                  loop: str, start, go, stop) -> None:
    """One process, one AsyncClient, ``in_flight`` tasks classifying until the window ends, on
    asyncio's default loop or uvloop."""
    try:
        from inferd.client import AsyncClient

        frame = frames(1, size, seed=os.getpid())[0]

        async def main() -> int:
            async with AsyncClient(socket_path, cache=False, ring_slots=in_flight) as c:
                await c.classify(frame)
                await asyncio.get_running_loop().run_in_executor(None, report_ready, q, index, go)
                await asyncio.sleep(max(0.0, start.value - time.monotonic()))
                end, count = start.value + seconds, [0]

                async def task():
                    while time.monotonic() < end:
                        await c.classify(frame)
                        count[0] += 1
                await asyncio.gather(*(task() for _ in range(in_flight)))
                return count[0]
        if loop == "uvloop":
            import uvloop
            q.put(("ok", ("done", index, uvloop.run(main()))))
        else:
            q.put(("ok", ("done", index, asyncio.run(main()))))
    except Exception:                                     # noqa: reported to the parent
        import traceback
        q.put(("error", traceback.format_exc()))


def async_vs_sync(model: str = "noop", rounds: int = 2, seconds: float = 4.0) -> dict:
    """AsyncClient (64 in flight, one connection) against 16 sync processes, on one daemon."""
    size = 32 if model == "noop" else 64
    out = {"model": model, "rounds": rounds, "seconds": seconds, "sync": [], "async": [], "uvloop": []}
    with daemon(ASYNC_MODELS[model]) as d:
        path = d["socket"]
        for _ in range(rounds):
            out["sync"].append(counts_per_second([(_sync_client, (path, size, seconds))] * SYNC_PROCESSES,
                                                 seconds, name="bench-sync"))
            for loop in ("asyncio", "uvloop"):
                out["async" if loop == "asyncio" else loop].append(counts_per_second(
                    [(_async_client, (path, size, seconds, ASYNC_IN_FLIGHT, loop))], seconds, name="bench-async"))
    for side in ("sync", "async", "uvloop"):
        out[f"{side}_rps"] = sum(out[side]) / rounds
    out["ratio"] = out["async_rps"] / out["sync_rps"]
    out["ratio_uvloop"] = out["uvloop_rps"] / out["sync_rps"]
    print(f"[async_vs_sync {model}] 16 sync processes {out['sync_rps']:.0f} req/s, one AsyncClient "
          f"with {ASYNC_IN_FLIGHT} in flight {out['async_rps']:.0f} req/s (ratio {out['ratio']:.2f}), "
          f"on uvloop {out['uvloop_rps']:.0f} req/s (ratio {out['ratio_uvloop']:.2f}); rounds: "
          + ", ".join(f"{side} {[round(x) for x in out[side]]}" for side in ("sync", "async", "uvloop")),
          flush=True)
    return out


MEASUREMENTS = {"async": lambda quick: [async_vs_sync(m, rounds=1 if quick else 2,
                                                      seconds=3.0 if quick else 4.0)
                                        for m in ("noop", "shapes")]}
# encoded images (bench/apps/encoded.py)
MEASUREMENTS["jpeg"] = lambda quick: jpeg_throughput(seconds=3.0 if quick else 4.0)
MEASUREMENTS["repeat"] = lambda quick: repeat_upload()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog(), description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter rounds")
    parser.add_argument("--only", choices=sorted(MEASUREMENTS), action="append")
    parser.add_argument("--out", default=os.path.join(DEFAULT_OUT, "apps.json"))
    args = parser.parse_args(argv)
    results = {}
    if os.path.exists(args.out):                       # --only keeps the other parts' last figures
        with open(args.out) as fh:
            results = json.load(fh)
    results.update({name: MEASUREMENTS[name](args.quick) for name in (args.only or MEASUREMENTS)})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"results: {args.out}")
    return 0

