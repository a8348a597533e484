#!/usr/bin/env bash
# The prepared GPU check (docs/benchmarks.md, "GPU"): about 5 minutes on one GPU (7 at most), no downloads.
# Prints, in this order, and rewrites OUT/gpu.json after each: (a) the in-process ceiling
# (ResNet-50-style, 224x224, bf16 and fp32, batch sizes up to 256); (b) the daemon with 64 client
# processes, bf16, result cache on, against the fastest in-process batch (the target: >= 0.9);
# (c) bench.feed's feed-rate rows (uint8 no-op, 64x64 and 224x224, cache off and on, one GPU and
# all of them where there are several); then (b) with the cache off at 16 and 64 clients, bf16 and fp32.
#
#   bench/gpu.sh [--out DIR]      on a host with a CUDA device (DIR/gpu.json; default bench/out)
#   bench/gpu.sh --cpu-smoke      the same script at toy sizes on the CPU (about 1.5 minutes): does it work?
#   PYTHON=/opt/torch/bin/python bench/gpu.sh
#
# On a lent device machine (Python 3.12 with its own CUDA torch; blake3 and posix_ipc carried as
# wheels in .whl/, see docs/benchmarks.md "GPU"), one command, results under $OUT:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && PYTHON=python3 bench/gpu.sh --out "$OUT"
#
# Python: $PYTHON if set, else the project's .venv/bin/python. The project's venv pins a CPU build of
# torch; on a GPU host point PYTHON at an interpreter whose torch is a CUDA build (the host's). If
# that interpreter has no inferd installed, this script maps the source folders into a temporary
# inferd package (what setup.cfg's package_dir does), so nothing is installed or downloaded; the
# daemon's other dependencies (numpy, uvloop, msgpack, posix_ipc, psutil, blake3, ...) must be there.
# BENCH_TIMEOUT (seconds, default 420) bounds the whole run; what was measured by then is in gpu.json.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else
        echo "bench/gpu.sh: no .venv/bin/python; run 'make .venv/.installed' (CPU torch) or set PYTHON=" >&2
        exit 2
    fi
fi
smoke=0
for a in "$@"; do [ "$a" = "--cpu-smoke" ] && smoke=1; done

if ! "$py" -c "import torch" 2>/dev/null; then
    echo "bench/gpu.sh: $py cannot import torch; set PYTHON= to an interpreter with a CUDA build of torch" >&2
    exit 2
fi
if [ "$smoke" = 0 ] && ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu.sh: no CUDA device: $("$py" -c 'import torch; print("torch", torch.__version__, "(CUDA build)" if torch.version.cuda else "(a CPU build)")') at $py sees none." >&2
    echo "  On a GPU host: PYTHON=/path/to/python-with-CUDA-torch bench/gpu.sh;  to check the script here: bench/gpu.sh --cpu-smoke" >&2
    exit 2
fi

overlay=""
cleanup() { [ -n "$overlay" ] && rm -rf "$overlay"; return 0; }
trap cleanup EXIT
if ! "$py" -c "import inferd.daemon.pipeline.engine" 2>/dev/null; then
    overlay="$(mktemp -d /tmp/inferd-gpu-XXXXXX)"
    mkdir "$overlay/inferd"
    for part in daemon client shm; do ln -s "$repo/$part" "$overlay/inferd/$part"; done
    export PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}"
fi
missing="$("$py" - <<'PY'
import importlib
names = ["numpy", "uvloop", "msgpack", "posix_ipc", "psutil", "PIL", "blake3", "prometheus_client", "threadpoolctl",
         "inferd.daemon.pipeline.engine", "inferd.client"]
bad = []
for n in names:
    try:
        importlib.import_module(n)
    except Exception as exc:
        bad.append(f"{n} ({type(exc).__name__}: {exc})")
print("; ".join(bad))
PY
)"
if [ -n "$missing" ]; then
    echo "bench/gpu.sh: $py lacks what the daemon imports: $missing" >&2
    echo "  install them into that interpreter from a local wheelhouse, or use an interpreter that has them" >&2
    exit 2
fi
rc=0
timeout -k 20 "${BENCH_TIMEOUT:-420}" "$py" -m bench.gpu "$@" || rc=$?
[ "$rc" = 124 ] && echo "bench/gpu.sh: stopped after ${BENCH_TIMEOUT:-420} s" >&2
exit "$rc"
