"""Is there a faster way to run the model in process than torch's defaults? ``python -m
bench.load.prepared [--batches 1,4,16] [--rounds 5] [--seconds 0.8]`` times the built-in
ResNet-18-style model at 64x64 on 2 threads, per batch size, in three forms taking turns (each
round in the other order): eager (what bench/load/ceiling.py measures and the daemon runs), FX
conv-bn fusion in channels_last (``torch.fx.experimental.optimization.fuse``), in channels_last,
traced and frozen (``torch.jit.freeze``, the daemon's ``model.compile = "freeze"``), and the same
also through ``torch.jit.optimize_for_inference`` (which the daemon does not use: shown so the
choice can be checked). It prints the median ms a batch over the rounds (with the range) and how
far each form's outputs are from eager's.

Why it exists: the ceiling of the CPU benchmarks is meant to be the model at the fastest settings
found on the machine, and these forms compute the same model (float rounding apart) faster at
some batch sizes here. So bench/load/ceiling.py takes both as candidates, and the daemon runs the
frozen form with ``model.compile = "freeze"`` (docs/benchmarks.md, Thread pools and the CPU
layout, "A faster form of the model").
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def fx_fused(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with FX conv-bn fusion, its weights in channels_last (its input must be)."""
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model)).to(memory_format=torch.channels_last)


def forms(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """(name, module, its input) for eager, FX fused in channels_last, traced and frozen as the
    daemon's ``model.compile = "freeze"`` does it (daemon/pipeline/engine_options.py ``frozen``),
    and that through ``torch.jit.optimize_for_inference``."""
    from inferd.daemon.pipeline.engine_options import frozen

    with torch.inference_mode():
        optimised = torch.jit.optimize_for_inference(frozen(model, x))
    return [("eager", model, x), ("fx fused, channels_last", fx_fused(model), x.contiguous(memory_format=torch.channels_last)),
            ("traced, frozen", frozen(model, x), x), ("+ optimize_for_inference", optimised, x)]


def ms_a_batch(module, x: torch.Tensor, seconds: float) -> float:
    """Median milliseconds of one forward pass over ``seconds``, after three to warm up."""
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def main(argv=None) -> int:
    from inferd.daemon.models import zoo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.8, help="per form, batch size and round")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = zoo.build("resnet18")[0].eval()
    print(f"ResNet-18-style @ 64x64, {a.threads} threads, ms a batch: median [min-max] of {a.rounds} rounds")
    for batch in (int(b) for b in a.batches.split(",")):
        x = torch.randn(batch, 3, 64, 64)
        each = forms(model, x)
        with torch.inference_mode():
            ref = model(x)
            diff = {name: float((m(xx) - ref).abs().max()) for name, m, xx in each}
        got: dict[str, list[float]] = {name: [] for name, *_ in each}
        for r in range(a.rounds):
            for name, m, xx in (each if r % 2 == 0 else each[::-1]):
                got[name].append(ms_a_batch(m, xx, a.seconds))
        eager = statistics.median(got["eager"])
        cells = [f"{name} {statistics.median(v):6.2f} [{min(v):.2f}-{max(v):.2f}] "
                 f"({eager / statistics.median(v):.2f}x, max diff {diff[name]:.1e})" for name, v in got.items()]
        print(f"  batch {batch:3d}: " + "   ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
