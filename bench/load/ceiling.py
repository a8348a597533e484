"""Part (a), the ceiling: what the model alone can do on this machine, with no daemon in the way.

In a child process of its own (torch.set_num_threads(2), as the daemon's ``--device cpu:2``, and
the daemon's OpenMP wait policy: ``OMP_WAIT_POLICY=PASSIVE`` unless the run compares another), the
built-in ResNet-18-style model at 64x64 runs the same per-batch work as a daemon batching thread:
copy uint8 frames into a staging tensor, ``to_input``, the model, softmax, top-k, ``tolist()``, under
``torch.inference_mode``. For each batch size it warms up, then runs for a fixed time; img/s is
frames done / elapsed. The ceiling is the best img/s over the batch sizes.
"""
from __future__ import annotations

import time
import traceback

from ..lib.measure import frames
from ..lib.procs import run_in_child

BATCH_SIZES = (1, 4, 8, 16, 32, 64)
MODEL = "resnet18"
INPUT_SIZE = 64
THREADS = 2
TOP_K = 5


def _make_step(model, spec, batch: int):
    """A closure doing one batch of daemon-equivalent work on ``batch`` frames."""
    import numpy as np
    import torch

    from inferd.daemon.models.loading import logits_of
    from inferd.daemon.pipeline.preprocess import to_input

    source = frames(batch, spec.input_height, seed=batch)
    staging = torch.empty((batch, spec.input_height, spec.input_width, 3), dtype=torch.uint8)
    staging_np = staging.numpy()
    mean = torch.tensor(spec.mean, dtype=torch.float32)
    std = torch.tensor(spec.std, dtype=torch.float32)

    def step():
        """Copy the frames in, preprocess, run the model, softmax, top-k, to Python lists."""
        np.copyto(staging_np, source)
        with torch.inference_mode():
            logits = logits_of(model(to_input(staging, mean, std)))
            scores, indices = torch.softmax(logits.float(), dim=1).topk(TOP_K, dim=1)
        return indices.tolist(), scores.tolist()

    return step


def _time_batch(step, batch: int, warmup_s: float, seconds: float) -> dict:
    """Warm up for ``warmup_s``, then run ``step`` for ``seconds``; img/s and per-batch times."""
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        step()
    times = []
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        step()
        times.append(time.perf_counter() - now)
    elapsed = time.perf_counter() - start
    times.sort()
    return {"batch": batch, "batches": len(times), "img_s": len(times) * batch / elapsed,
            "batch_ms_p50": 1000.0 * times[len(times) // 2],
            "batch_ms_mean": 1000.0 * sum(times) / len(times)}


def _child(q, batch_sizes, warmup_s: float, seconds: float, omp_env: dict) -> None:
    """Child process body: report ``("ok", [per-batch-size dicts])`` or ``("error", traceback)``.
    ``omp_env`` goes into the environment before torch (and with it libgomp) is loaded."""
    try:
        import os

        for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
            os.environ.pop(name, None)
        os.environ.update(omp_env)
        import torch

        torch.set_num_threads(THREADS)
        from inferd.daemon.models import zoo

        model, spec = zoo.build(MODEL, input_size=INPUT_SIZE)
        rows = [_time_batch(_make_step(model, spec, b), b, warmup_s, seconds) for b in batch_sizes]
        q.put(("ok", {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "omp_env": omp_env}))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def fair(ceiling: dict, max_batch: int):
    """``in_flight -> (batch, img/s)``: the in-process figure at the largest batch ``in_flight``
    frames allow under ``max_batch`` (the fair ceiling of a row; measured batch sizes only, the
    nearest one below when that batch was not measured)."""
    rows = {r["batch"]: r["img_s"] for r in ceiling["rows"]}

    def at(in_flight: int) -> tuple[int, float]:
        batch = max((b for b in rows if b <= min(in_flight, max_batch)), default=min(rows))
        return batch, rows[batch]

    return at


def measure(warmup_s: float, seconds: float, batch_sizes=BATCH_SIZES, omp_env=None) -> dict:
    """Part (a): img/s per batch size in a separate child process; the ceiling and batch-1 model time.

    Returns ``{"rows": [...], "ceiling_img_s", "ceiling_batch", "model_ms_b1", "torch", "threads"}``;
    ``model_ms_b1`` is the median time of one batch of 1 (the daemon's model time for a lone request).
    """
    budget = len(batch_sizes) * (warmup_s + seconds) + 60.0
    omp_env = {"OMP_WAIT_POLICY": "PASSIVE"} if omp_env is None else dict(omp_env)
    out = run_in_child(_child, (tuple(batch_sizes), warmup_s, seconds, omp_env), budget, "bench-ceiling")
    best = max(out["rows"], key=lambda r: r["img_s"])
    out["ceiling_img_s"], out["ceiling_batch"] = best["img_s"], best["batch"]
    b1 = next((r for r in out["rows"] if r["batch"] == 1), None)
    out["model_ms_b1"] = b1["batch_ms_p50"] if b1 else None
    out.update(model=MODEL, input_size=INPUT_SIZE)
    return out
