"""What usearch does with a damaged graph file: mapped (``view``) and searched, does it crash?

    python -m bench.ann.damage [SEED] [TRIALS]

A 20,000-row float16 graph (M 16, random 305-float vectors) is saved once under
/tmp/inferd-ann-damage; each trial sets one 4-byte word of a copy, at a random offset, to
0x7fffffff, then a child process maps the copy and runs 200 searches. Each trial prints the
offset and either ``ok`` with how many answers held a key the graph never had, or ``crash rc=-N``
(the signal). Why the index checks a graph file's checksum before searching it: NOTE [ verified
before searched ] in daemon/caching/ann_index.py; figures in docs/benchmarks.md "Near-duplicate index".
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

DIR = "/tmp/inferd-ann-damage"
ROWS = 20_000


def child(path: str) -> int:
    from usearch.index import Index

    index = Index.restore(path, view=True)
    wrong = 0
    for q in np.load(os.path.join(DIR, "q.npy")):
        keys = index.search(q, 10).keys
        wrong += int(((keys < 0) | (keys >= ROWS)).any())
    print(f"ok, {wrong} answers with a key the graph never had")
    return 0


def main(argv: list[str]) -> int:
    from usearch.index import Index

    if argv[:1] == ["child"]:
        return child(argv[1])
    seed = int(argv[0]) if argv else 1
    trials = int(argv[1]) if len(argv) > 1 else 40
    os.makedirs(DIR, exist_ok=True)
    src = os.path.join(DIR, "g.usearch")
    if not os.path.exists(src):
        x = np.random.default_rng(0).standard_normal((ROWS, 305)).astype(np.float32)
        index = Index(ndim=305, metric="cos", dtype="f16", connectivity=16, expansion_add=64)
        index.add(np.arange(ROWS), x)
        index.save(src)
        np.save(os.path.join(DIR, "q.npy"), x[:200])
    data = open(src, "rb").read()
    rng = np.random.default_rng(seed)
    copy = os.path.join(DIR, "damaged.usearch")
    crashes = 0
    for _ in range(trials):
        pos = int(rng.integers(0, len(data))) & ~3
        damaged = bytearray(data)
        damaged[pos:pos + 4] = b"\xff\xff\xff\x7f"
        with open(copy, "wb") as fh:
            fh.write(damaged)
        r = subprocess.run([sys.executable, "-m", "bench.ann.damage", "child", copy],
                           capture_output=True, text=True, timeout=120)
        crashes += r.returncode != 0
        print(pos, len(data), f"crash rc={r.returncode}" if r.returncode else r.stdout.strip(), flush=True)
    print(f"{crashes} of {trials} trials crashed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
