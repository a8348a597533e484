"""What the embedding costs a CPU batch, in one process: the built-in model's forward pass with and
without the embedding, and the pooling alone, the torch ops (the definition) against the compiled
pass (daemon/models/pooling_jit.py), interleaved, one torch thread, per batch size.

    python -m bench.ann.pooling [--reps 200]

CPU microseconds of the calling thread per frame. docs/benchmarks.md, "Near-duplicate index".
"""
from __future__ import annotations

import argparse
import time

from ..lib.report import prog


def per_frame(fns: dict, n: int, reps: int) -> dict:
    """CPU us a frame of each of ``fns`` (name -> call), interleaved: each rep runs them all, in
    turns, so a neighbour's burst lands on all alike."""
    spent = dict.fromkeys(fns, 0.0)
    for fn in fns.values():
        for _ in range(10):
            fn()
    order = list(fns.items())
    for r in range(reps):
        for name, fn in (order if r % 2 else order[::-1]):
            t0 = time.thread_time()
            fn()
            spent[name] += time.thread_time() - t0
    return {name: 1e6 * s / reps / n for name, s in spent.items()}


def main(argv=None) -> int:
    import torch

    from inferd.daemon.config import ModelConfig
    from inferd.daemon.models import loading as model_mod
    from inferd.daemon.models import pooling_jit
    from inferd.daemon.models.embedding_pooling import Pool
    from inferd.daemon.models.zoo.shapes import make_dataset
    from inferd.daemon.pipeline.engine import Engine, Staging

    p = argparse.ArgumentParser(prog=prog(), description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--batches", default="1,2,4,8")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    engine = Engine(torch.device("cpu"), model_mod.load(ModelConfig()), keep_k=3)
    engine.load()
    engine.team = None
    images = make_dataset(32, 1)[0]
    staging = Staging(torch.device("cpu"), 32, images.shape[1:])
    staging.arrays[0][:32] = images
    pool, covers = Pool.parse("grid:4+thumbnail:4"), pooling_jit.covers
    for n in map(int, args.batches.split(",")):
        launch = lambda want: engine.launch(staging.tensors[0], n, 3, want_embedding=want).result()
        forward = per_frame({"off": lambda: launch(False), "on": lambda: launch(True)}, n, args.reps)
        off, on = forward["off"], forward["on"]
        feats = torch.relu(torch.randn(n, 16, 64, 64))
        frames = staging.tensors[0][:n]

        def torch_ops():
            pooling_jit.covers = lambda *a: False
            try:
                pool(feats, frames)
            finally:
                pooling_jit.covers = covers

        with torch.inference_mode():
            pooled = per_frame({"ops": torch_ops, "fused": lambda: pool(feats, frames)}, n, args.reps)
        ops, fused = pooled["ops"], pooled["fused"]
        print(f"batch {n}: forward {off:.0f} us a frame, with the embedding {on:.0f} (+{on - off:.0f}); "
              f"pooling: torch ops {ops:.0f}, compiled {fused:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
