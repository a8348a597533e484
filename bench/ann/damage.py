"""What usearch does with a damaged graph file: a 4-byte word of a saved graph (a copy) set to 0x7fffffff, then mapped (view) and searched in a child process.

    python -m bench.ann.damage [SEED] [TRIALS]

Each trial prints the offset and "ok" (with the answers holding a key the graph never had) or
"crash rc=-N" (the signal). The index checks its graph files before it searches them for this
(daemon/caching/ann_index.py NOTE [ verified before searched ]).
"""
import os, sys, subprocess, numpy as np
from usearch.index import Index
d = "/tmp/inferd-ann-damage"; os.makedirs(d, exist_ok=True)
src = f"{d}/g.usearch"
if not os.path.exists(src):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 305)).astype(np.float32)
    ix = Index(ndim=305, metric="cos", dtype="f16", connectivity=16, expansion_add=64)
    ix.add(np.arange(20000), x); ix.save(src); np.save(f"{d}/q.npy", x[:200])
if sys.argv[1:2] == ["child"]:
    ix = Index.restore(sys.argv[2], view=True)
    q = np.load(f"{d}/q.npy")
    bad = 0
    for v in q:
        k = ix.search(v, 10).keys
        bad += int(((k < 0) | (k >= 20000)).any())
    print("ok", len(ix), "out-of-range answers", bad); sys.exit(0)
size = os.path.getsize(src); data = open(src, "rb").read()
rng = np.random.default_rng(int(sys.argv[1]) if sys.argv[1:] else 1)
res = {}
for t in range(int(sys.argv[2]) if len(sys.argv) > 2 else 40):
    pos = int(rng.integers(0, size)); b = bytearray(data); pos -= pos % 4; b[pos:pos + 4] = b"\xff\xff\xff\x7f"
    p = f"{d}/f.usearch"; open(p, "wb").write(b)
    r = subprocess.run([sys.executable, "-m", "bench.ann.damage", "child", p], capture_output=True, text=True, timeout=60)
    out = "crash rc=%d" % r.returncode if r.returncode else r.stdout.strip()
    if r.returncode == 0 and "holds" in r.stdout: out = "ok"
    print(pos, size, out, r.stderr.strip()[-120:], flush=True)
