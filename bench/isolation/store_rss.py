"""The daemon's RSS while its embedding store fills: ``python -m bench.isolation.store_rss [--quick] [--out bench/out]``.

What a long-running daemon's memory should do: grow while the result cache and the embedding store
are written for the first time, then level off. Both are files mapped into the daemon (MAP_SHARED):
a page counts in its RSS (RssFile) once touched. Both files are written whole when they are
created (their blocks reserved, so a full disk can never SIGBUS the daemon), so a daemon that
creates them has them resident from start-up: a fresh store of the default capacity puts its
whole file in RSS at once, not as it fills (measured below from /proc/PID/smaps); a reopened file's
pages come back as they are read or written. What grows as the store fills is the heap (RssAnon):
the store's per-row index (content hash and tag of each row) and the first batches' buffers; it
must stop growing once the store is full.

Expected RSS of a full store, from its layout (daemon/caching/embedding_store.py):

    store file  = 4096 + capacity x (4 x dim + 112) bytes    (shapes, dim 305: 1,332 bytes a row;
                                                              the default capacity 100,000: 127 MiB)
    cache file  = cache.size_mb (64 MiB by default), touched as distinct frames are inserted
    heap        = the store's row index (a content hash and tag a row) and the first batches'
                  buffers: bounded by HEAP_MIB here
    expected    = RSS before the files + store file + cache file + heap (the files' part is
                  resident from the start when the daemon creates them)

One run: the built-in ``shapes`` model on one CPU device, ``embeddings.capacity`` set to
``capacity``, one client classifying distinct random frames (64 per call) until ``fill_factor`` x
capacity have been stored or refused; RSS (VmRSS, RssAnon, RssFile) and the store's row count
sampled every ``sample_s``. Targets: RSS within the expected bound at every sample; RSS over the
last third of the run (store full) grows by at most ``FLAT_MIB``. Writes
``OUT/store_rss.json``. About 2 minutes; ``--quick`` about 40 s.
"""
from __future__ import annotations

import os
import sys
import time

from ..lib import daemons, report
from ..lib.measure import frames

SETTINGS = {"full": {"capacity": 20_000, "fill_factor": 3.0, "sample_s": 1.0},
            "quick": {"capacity": 5_000, "fill_factor": 3.0, "sample_s": 0.5}}
CACHE_MIB = 64
HEAP_MIB = 64.0         # heap allowed to grow: the first batches' buffers, the store's row index
FLAT_MIB = 4.0         # RSS growth allowed once the store is full (the last third of the run)
MiB = 1 << 20


def rss_parts(pid: int) -> dict:
    """VmRSS, RssAnon, RssFile and RssShmem of ``pid`` in MiB (a mapped file on tmpfs, as /tmp
    often is, counts in RssShmem; on a disk file system in RssFile)."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) / 1024
    return out


def files_rss(pid: int) -> dict:
    """Resident MiB of the daemon's mappings of its store and its result cache (/proc/PID/smaps;
    a mapping's name may carry the temporary name the file was created under)."""
    out, name = {"store": 0.0, "cache": 0.0}, None
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                path = " ".join(fields[5:])
                name = "store" if ".store" in path else "cache" if "results.cache" in path else None
            elif name and fields[0] == "Rss:":
                out[name] += int(fields[1]) / 1024
    return out


def measure(s: dict, log) -> dict:
    from inferd.client import Client

    capacity = s["capacity"]
    args = ["--model", "shapes", "--device", "cpu:1", "--set", "cache.enabled=true",
            "--set", "embeddings.enabled=true", "--set", f"embeddings.capacity={capacity}"]
    samples = []
    with daemons.daemon(args) as d:
        pid = d["proc"].pid
        with Client(d["socket"], cache=False, timeout=60) as c:
            start = rss_parts(pid)

            def sample(stored: int) -> None:
                files = files_rss(pid)
                samples.append({"t": time.monotonic(), "stored": stored, **rss_parts(pid),
                                "store_rss": files["store"], "cache_rss": files["cache"]})

            sample(0)
            sent, seed, last = 0, 1, time.monotonic()
            while sent < s["fill_factor"] * capacity:
                c.classify_many(list(frames(64, 64, seed=seed)), top_k=1)
                sent, seed = sent + 64, seed + 1
                if time.monotonic() - last >= s["sample_s"]:
                    info = c.info()
                    sample(info["cache"]["embeddings"])
                    last = time.monotonic()
            sample(c.info()["cache"]["embeddings"])
        stores = [n for n in os.listdir(d["workdir"]) if n.endswith(".store")]
        size = os.path.getsize(os.path.join(d["workdir"], stores[0]))
    # the file is 4096 + capacity x (4 x dim + 112) bytes
    return {"capacity": capacity, "sent": sent, "start": start, "samples": samples,
            "dim": ((size - 4096) // capacity - 112) // 4}


def _dim(r: dict) -> int:
    return r["dim"]


def expected(r: dict) -> dict:
    """The bound from the layouts: the two mapped files whole, plus HEAP_MIB of heap (the first
    batches' buffers and the store's per-row index); what the run's heap and mappings grew by."""
    capacity, dim = r["capacity"], _dim(r)
    store = (4096 + capacity * (4 * dim + 112)) / MiB
    first, last = r["samples"][0], r["samples"][-1]
    mapped = (last["RssFile"] + last["RssShmem"]) - (first["RssFile"] + first["RssShmem"])
    return {"store_mib": store, "cache_mib": CACHE_MIB, "heap_mib": last["RssAnon"] - first["RssAnon"],
            "mapped_mib": mapped,       # the files' pages not yet resident at start may still come
            "bound_mib": r["start"]["VmRSS"] + HEAP_MIB + max(0.0, store - first["store_rss"])
            + max(0.0, CACHE_MIB - first["cache_rss"]),
            "default_store_mib": (4096 + 100_000 * (4 * dim + 112)) / MiB}


def verdicts(r: dict) -> list[tuple[str, str, bool]]:
    e, xs = expected(r), r["samples"]
    peak = max(x["VmRSS"] for x in xs)
    tail = xs[len(xs) * 2 // 3:]
    growth = tail[-1]["VmRSS"] - tail[0]["VmRSS"] if len(tail) > 1 else 0.0
    full = xs[-1]["stored"] >= r["capacity"]
    return [(f"RSS <= start + the files' pages not resident at start + {HEAP_MIB} MiB of heap "
             f"= {e['bound_mib']:.0f} MiB",
             f"peak {peak:.0f} MiB", peak <= e["bound_mib"]),
            (f"the store filled ({r['capacity']} rows) and RSS over the last third grew <= {FLAT_MIB} MiB",
             f"{xs[-1]['stored']} rows; RSS {growth:+.1f} MiB", full and growth <= FLAT_MIB)]


def render(r: dict) -> str:
    e = expected(r)
    xs = r["samples"]
    lines = [f"store_rss: shapes on cpu:1, embeddings.capacity {r['capacity']} (dim {_dim(r)}), "
             f"{r['sent']} distinct frames classified",
             f"  expected: store file {e['store_mib']:.1f} MiB + cache file {e['cache_mib']} MiB, mapped "
             f"(RssFile, or RssShmem on tmpfs) as their pages are first written, + heap; at the default "
             f"capacity 100,000 the store file alone is {e['default_store_mib']:.0f} MiB",
             f"  measured: mappings {e['mapped_mib']:+.1f} MiB, heap {e['heap_mib']:+.1f} MiB over the run",
             f"  resident of the mapped files: store {xs[0]['store_rss']:.1f} MiB at start, "
             f"{xs[-1]['store_rss']:.1f} at the end; cache {xs[0]['cache_rss']:.1f}, {xs[-1]['cache_rss']:.1f}",
             "  rows stored   VmRSS   RssAnon   RssFile   RssShmem (MiB)"]
    xs = r["samples"]
    step = max(1, len(xs) // 12)
    for x in xs[::step] + ([xs[-1]] if (len(xs) - 1) % step else []):
        lines.append(f"  {x['stored']:>11}  {x['VmRSS']:6.0f}  {x['RssAnon']:8.0f}  {x['RssFile']:8.0f}  "
                     f"{x['RssShmem']:8.0f}")
    met = verdicts(r)
    lines.append(f"  targets ({sum(m for *_, m in met)} of {len(met)} met):")
    lines += [f"    {target}: {measured}: {'MET' if ok else 'MISS'}" for target, measured, ok in met]
    return "\n".join(lines)


def main(argv=None) -> int:
    return report.settings_main(argv, __doc__, "store_rss.json", "capacity 5,000: about 40 s",
                                SETTINGS, measure, render)


if __name__ == "__main__":
    sys.exit(main())
