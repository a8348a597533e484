"""What sealing the result cache's entries costs: ``python -m bench.cache.privacy [--quick] [--out FILE]``.

The cache file's entries are sealed under their lookup keys (shm/cache.py, format version 2): a
lookup now derives a tag, a MAC key and a keystream from the key and unmasks and checks the entry;
an insert masks and checks it. This measures, in one run and one process, the sealed format beside
the format it replaced (version 1, loaded from git: ``--baseline-rev``, default the last commit
before the change), rounds alternating between the two so load on the machine hits both alike:

- client-side hit: ``lookup`` of a stored key (a read-only mapping, as a client holds), alone and
  as a client pays it for a 64x64 and a 224x224 uint8 frame (content hash + key + lookup);
- client-side miss: ``lookup`` of a key never stored;
- daemon insert: ``insert`` of a 5-pair answer (the writer, with its lock), cycling over more keys
  than the table has ways, so evictions are part of it;
- creating a 64 MiB file (version 2 fills every entry with random bytes once).

Each figure is the median over rounds of the mean time per call, in microseconds, with the ratio
sealed / baseline. Nothing is asserted. Run with the package importable (``PYTHONPATH`` or an
installed inferd).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from inferd.shm import cache as sealed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASELINE_REV = "acf97c1"             # the last commit with the version 1 entry format
SIZES = {"full": {"rounds": 9, "calls": 20000, "keys": 4096, "create_mb": 64},
         "quick": {"rounds": 5, "calls": 4000, "keys": 1024, "create_mb": 64}}


def load_baseline(rev: str):
    """shm/cache.py as of ``rev``, imported beside today's as inferd.shm._cache_baseline."""
    try:
        source = subprocess.run(["git", "-C", REPO, "show", f"{rev}:shm/cache.py"], check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(f"cannot read shm/cache.py at {rev} from git in {REPO} ({exc}); pass --baseline-rev "
                 "naming a commit with the version 1 format")
    spec = importlib.util.spec_from_loader("inferd.shm._cache_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "inferd.shm"                # its relative import of ownedfile resolves
    exec(compile(source, f"{rev}:shm/cache.py", "exec"), module.__dict__)
    if module.FORMAT_VERSION == sealed.FORMAT_VERSION:
        sys.exit(f"{rev} already has format version {module.FORMAT_VERSION}: not a baseline")
    return module


def per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def one_round(impl, workdir: str, size: dict, frames: dict) -> dict:
    """Every figure of one format, once."""
    path = os.path.join(workdir, f"v{impl.FORMAT_VERSION}.cache")
    writer = impl.ResultCache.open_writer(path, 4 << 20)
    reader = impl.ResultCache.open_reader(path)
    rng = np.random.default_rng(1)
    keys = [rng.bytes(32) for _ in range(size["keys"])]
    top = [(int(c), float(np.float32(s))) for c, s in zip(range(5), (0.5, 0.25, 0.125, 0.0625, 0.03125))]
    for key in keys:
        writer.insert(key, top)
    calls = size["calls"]
    out = {}
    present = keys[-1]
    absent = rng.bytes(32)
    out["hit_lookup_us"] = per_call_us(lambda: reader.lookup(present), calls)
    out["miss_lookup_us"] = per_call_us(lambda: reader.lookup(absent), calls)
    for name, frame in frames.items():
        key = impl.cache_key("digest", "pre", impl.content_hash(frame))
        writer.insert(key, top)
        out[f"hit_{name}_us"] = per_call_us(
            lambda: reader.lookup(impl.cache_key("digest", "pre", impl.content_hash(frame))), calls // 4)
    cycle = iter(range(1 << 62))
    out["insert_us"] = per_call_us(lambda: writer.insert(keys[next(cycle) % len(keys)], top), calls)
    reader.close()
    writer.close()
    os.unlink(path)
    created = os.path.join(workdir, f"create-v{impl.FORMAT_VERSION}.cache")
    t0 = time.perf_counter()
    impl.ResultCache.open_writer(created, size["create_mb"] << 20).close()
    out["create_64mib_ms"] = (time.perf_counter() - t0) * 1e3
    os.unlink(created)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and calls (about 15 s)")
    p.add_argument("--baseline-rev", default=BASELINE_REV, help="a commit with the version 1 format")
    p.add_argument("--out", help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    baseline = load_baseline(args.baseline_rev)
    rng = np.random.default_rng(2)
    frames = {"64x64": rng.integers(0, 256, (64, 64, 3), np.uint8),
              "224x224": rng.integers(0, 256, (224, 224, 3), np.uint8)}
    workdir = tempfile.mkdtemp(prefix="inferd-bench-seal")
    rounds: dict[str, list[dict]] = {"baseline": [], "sealed": []}
    try:
        for r in range(size["rounds"]):               # alternate, and alternate who goes first
            order = [("baseline", baseline), ("sealed", sealed)]
            for name, impl in (order if r % 2 == 0 else order[::-1]):
                rounds[name].append(one_round(impl, workdir, size, frames))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rounds.items()}
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "load": os.getloadavg()},
              "baseline_rev": args.baseline_rev, "rounds": size["rounds"], "calls": size["calls"],
              "median": medians,
              "ratio": {k: medians["sealed"][k] / medians["baseline"][k] for k in medians["sealed"]}}
    print(f"{'figure':<18}{'v1 (baseline)':>16}{'v2 (sealed)':>14}{'ratio':>8}")
    for k in medians["sealed"]:
        print(f"{k:<18}{medians['baseline'][k]:>16.2f}{medians['sealed'][k]:>14.2f}{result['ratio'][k]:>8.2f}")
    print(f"median of {size['rounds']} alternating rounds; load average {result['machine']['load']}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
