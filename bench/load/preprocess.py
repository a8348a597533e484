"""CPU preprocessing against the memory limit: ``python -m bench.load.preprocess [--quick] [--threads N]``.

What an executor thread spends turning a batch of uint8 NHWC frames into the model's float32
input (daemon/pipeline/preprocess.py, NOTE [ preprocessing on a CPU ]), per frame, beside what
a plain memory copy of that float32 output costs in the same run. In this one process, with
``--threads`` torch threads (default 1: a CPU device of one thread), under inference mode:

    float_nchw      the executor's Preprocess (reuse): normalised float32 NCHW, by the fused
                    pass where numba is installed (daemon/pipeline/preprocess_jit.py)
    channels_last   the same with ``model.channels_last``: float32, NHWC in memory
    torch passes    float_nchw by the torch passes (``fused=False``: the daemon without numba)
    previous        the three whole-batch ops the CPU passes replaced (permute + to(float32),
                    addcmul with per-channel factors, contiguous), as they ran before
    u8->f32         a contiguous uint8 -> float32 conversion of the frames alone (copy_)
    np.copyto       a float32 array the size of the output copied into another: the limit
    copy_           the same with torch.Tensor.copy_

at 64x64 and 224x224, batches of 1, 8 and 32 (random frames). Methods alternate within each
round, so a shared machine's drift reaches all of them alike; a figure is the median over rounds
of a round's mean time per frame. The ratios are against np.copyto. Before timing, each case
checks that float_nchw and channels_last equal ``previous`` bit for bit.

Target: float_nchw at 224x224 within 2x of np.copyto at every batch size. Writes
``OUT/preprocess.json``.
"""
from __future__ import annotations

import datetime
import os
import sys
import time

import numpy as np

from ..lib import report
from ..lib.measure import frames as random_frames

SETTINGS = {"full": {"rounds": 7, "frame_bytes_per_round": 64 << 20},
            "quick": {"rounds": 3, "frame_bytes_per_round": 8 << 20}}
SIZES = (64, 224)
BATCHES = (1, 8, 32)
METHODS = ("float_nchw", "channels_last", "torch passes", "previous", "u8->f32", "np.copyto", "copy_")
TARGET = 2.0             # float_nchw at 224x224 against np.copyto, at most
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)     # ImageNet's, as the built-in resnets


def _methods(size: int, batch: int) -> dict:
    """The timed calls of one case, each doing one batch of ``batch`` frames; checks the
    preprocessing against the previous ops first (AssertionError when a bit differs)."""
    import torch

    from inferd.daemon.pipeline.preprocess import NUMBA, Preprocess

    frames = torch.from_numpy(random_frames(batch, size, seed=size + batch))
    fused = True if NUMBA else False        # True: the fused pass at once (a daemon loads it in the background)
    nchw = Preprocess(MEAN, STD, reuse=True, fused=fused)
    nhwc = Preprocess(MEAN, STD, channels_last=True, reuse=True, fused=fused)
    torch_passes = Preprocess(MEAN, STD, reuse=True, fused=False)
    mean_t, std_t = torch.tensor(MEAN), torch.tensor(STD)
    scale, bias = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1), (-mean_t / std_t).view(1, 3, 1, 1)

    def previous(channels_last: bool = False):
        x = frames.permute(0, 3, 1, 2).to(torch.float32)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.addcmul(bias, x, scale).contiguous(memory_format=fmt)

    for pre, cl in ((nchw, False), (nhwc, True), (torch_passes, False)):
        got, want = pre(frames), previous(cl)
        assert got.stride() == want.stride() and torch.equal(got.view(torch.int32), want.view(torch.int32)), \
            f"{size}x{size} batch {batch}: the preprocessing differs from the previous ops"
    converted = torch.empty((batch, size, size, 3), dtype=torch.float32)
    src = np.random.default_rng(1).random((batch, 3, size, size), dtype=np.float32)
    dst = np.empty_like(src)
    src_t, dst_t = torch.from_numpy(src), torch.from_numpy(dst)
    return {"float_nchw": lambda: nchw(frames), "channels_last": lambda: nhwc(frames),
            "torch passes": lambda: torch_passes(frames), "previous": previous, "u8->f32": lambda: converted.copy_(frames),
            "np.copyto": lambda: np.copyto(dst, src), "copy_": lambda: dst_t.copy_(src_t)}


def measure_case(size: int, batch: int, rounds: int, frame_bytes: int) -> dict:
    """Median over ``rounds`` of each method's mean microseconds per frame; each round runs
    every method on about ``frame_bytes`` of frames."""
    import torch

    calls = max(2, frame_bytes // (batch * size * size * 3))
    methods = _methods(size, batch)
    per_round = {name: [] for name in methods}
    with torch.inference_mode():
        for fn in methods.values():                  # first touch of every buffer, untimed
            fn()
        for _ in range(rounds):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                per_round[name].append((time.perf_counter() - t0) / (calls * batch))
    us = {name: 1e6 * float(np.median(times)) for name, times in per_round.items()}
    return {"size": size, "batch": batch, "calls_per_round": calls, "us": us,
            "spread_us": {name: [1e6 * min(t), 1e6 * max(t)] for name, t in per_round.items()},
            "ratio": {name: us[name] / us["np.copyto"] for name in us}}


def measure(settings: dict, threads: int, log) -> dict:
    import torch

    torch.set_num_threads(threads)
    cases = []
    for size in SIZES:
        for batch in BATCHES:
            case = measure_case(size, batch, settings["rounds"], settings["frame_bytes_per_round"])
            log(f"  {size}x{size} batch {batch}: float_nchw {case['us']['float_nchw']:.1f} us a frame, "
                f"{case['ratio']['float_nchw']:.2f}x np.copyto")
            cases.append(case)
    from inferd.daemon.pipeline.preprocess import NUMBA

    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "fused": NUMBA,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cases": cases}


def render(results: dict) -> str:
    lines = [f"CPU preprocessing, uint8 NHWC -> float32, per frame, "
             f"{'fused pass (numba)' if results.get('fused') else 'torch passes (no numba)'}, "
             f"{results['threads']} torch thread(s) "
             f"(torch {results['torch']}, {results['cpu_capability']}); ratio = against np.copyto "
             f"of the float32 output"]
    columns = [("size", ">7"), ("batch", ">5")] + [(f"{m} us", ">16.1f") for m in METHODS] + \
              [("float_nchw x", ">12.2f"), ("channels_last x", ">15.2f"), ("torch passes x", ">14.2f"),
               ("previous x", ">10.1f")]
    rows = [[f"{c['size']}x{c['size']}", c["batch"], *(c["us"].get(m, float("nan")) for m in METHODS),
             c["ratio"]["float_nchw"], c["ratio"]["channels_last"], c["ratio"].get("torch passes", float("nan")),
             c["ratio"]["previous"]]
            for c in results["cases"]]
    lines += report.table(columns, rows)
    worst = max(c["ratio"]["float_nchw"] for c in results["cases"] if c["size"] == 224)
    lines.append(f"  target: float_nchw at 224x224 <= {TARGET:.0f}x np.copyto at every batch: "
                 f"worst {worst:.2f}x: {'MET' if worst <= TARGET else 'MISS'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = report.parser(__doc__, "preprocess.json", "3 short rounds, about 10 s")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, a 1-thread CPU device)")
    args = p.parse_args(argv)
    if args.replot:
        return report.replot(args.replot, args.img_dir, args.out, render, lambda results, img_dir: [])
    settings = SETTINGS["quick" if args.quick else "full"]
    t0 = time.monotonic()
    results = measure(settings, args.threads, lambda msg: print(msg, flush=True))
    results.update(settings=settings, quick=args.quick, command=report.command(), machine=report.machine(),
                   wall_s=time.monotonic() - t0, loadavg=os.getloadavg(),
                   date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    report.write_results(args.out, "preprocess.json", results, render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
