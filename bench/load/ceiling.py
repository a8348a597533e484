"""Part (a), the ceiling: what the model alone can do on this machine, with no daemon in the way.

In a child process of its own (torch.set_num_threads(2), as the daemon's ``--device cpu:2``), the
built-in ResNet-18-style model at 64x64 runs the same per-batch work as a daemon batching thread:
copy uint8 frames into a staging tensor, ``to_input``, the model, softmax, top-k, ``tolist()``, under
``torch.inference_mode``. For each batch size it warms up, then runs for a fixed time; img/s is
frames done / elapsed.

The ceiling is the model at its fastest settings on this machine, never at the daemon's own. Each
setting of ``SETTINGS`` is measured in a fresh child (the environment must be set before torch
loads libgomp): torch's defaults (2 threads), what a user who runs the model in their own process
gets; ``OMP_WAIT_POLICY=PASSIVE``, which spares the cores between batches but wakes its threads
slower; and torch's defaults on one thread, since the daemon may run a batch on one thread
(threads.per_batch, daemon/pipeline/team_size.py) and a user could too; and the model in two faster
forms a user could run it in, at torch's defaults (``FORMS``: traced and frozen, as the daemon's
``model.compile = "freeze"`` runs it, or FX-fused in channels_last; bench/load/prepared.py). A run
adds the daemon's own OpenMP setting (``GOMP_SPINCOUNT=10000`` with threads.omp_wait_policy = auto
on cpu:2) as one more candidate (``candidates``). At each batch size the fastest of them is the ceiling
(``fastest``), and the report says which one that was, beside each setting's own figure. The best
img/s over the batch sizes is the overall ceiling.
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
#: The settings the ceiling is measured at, by name: ``(name, OpenMP environment[, torch threads[,
#: form]])`` (threads: THREADS unless given; form: "eager" unless given, see ``FORMS``): torch's
#: defaults (nothing set), passive waiting, torch's defaults on one thread, and the model in the
#: two faster forms bench/load/prepared.py found, at torch's defaults. Names are what the report
#: shows.
SETTINGS = (("default", {}), ("passive", {"OMP_WAIT_POLICY": "PASSIVE"}), ("1 thread", {}, 1),
            ("traced", {}, THREADS, "traced"), ("fx fused", {}, THREADS, "fx fused"))
#: The forms of the model a setting may run: eager (as built, the daemon's default), traced
#: (in channels_last, traced and frozen: model.compile = "freeze"), fx fused (FX conv-bn
#: fusion, the weights and the input in channels_last). Each computes the same model within float
#: rounding (bench/load/prepared.py, tests/unit/test_bench_measures.py).
FORMS = ("eager", "traced", "fx fused")


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


def _load(omp_env: dict, threads: int, form: str = "eager"):
    """In a measuring child: ``omp_env`` set before torch (and with it libgomp) loads, torch on
    ``threads`` threads, the model built in ``form``; returns (torch, model, spec)."""
    import os

    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        os.environ.pop(name, None)
    os.environ.update(omp_env)
    import torch

    torch.set_num_threads(threads)
    from inferd.daemon.models import zoo

    model, spec = zoo.build(MODEL, input_size=INPUT_SIZE)
    return torch, in_form(model, form, (1, 3, spec.input_height, spec.input_width)), spec


def in_form(model, form: str, shape: tuple):
    """``model`` (eval mode) in ``form`` of ``FORMS``, for inputs of ``shape`` but any batch size."""
    import torch

    from inferd.daemon.pipeline.engine_options import frozen

    from .prepared import fx_fused

    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; one of {', '.join(FORMS)}")
    if form == "eager":
        return model
    if form == "traced":
        return frozen(model, torch.zeros(shape))

    class ChannelsLast(torch.nn.Module):
        """The FX-fused model, whose weights are in channels_last, given its input so."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.contiguous(memory_format=torch.channels_last))

    return ChannelsLast(fx_fused(model))


def _child(q, batch_sizes, warmup_s: float, seconds: float, omp_env: dict, threads: int = THREADS,
           form: str = "eager") -> None:
    """Child process body: report ``("ok", [per-batch-size dicts])`` or ``("error", traceback)``.
    ``omp_env`` goes into the environment before torch (and with it libgomp) is loaded."""
    try:
        torch, model, spec = _load(omp_env, threads, form)
        rows = [_time_batch(_make_step(model, spec, b), b, warmup_s, seconds) for b in batch_sizes]
        q.put(("ok", {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "omp_env": omp_env}))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def _serve(q, commands, omp_env: dict, threads: int = THREADS, form: str = "eager") -> None:
    """Child body of :class:`Worker`: load the model once under ``omp_env``, report ready, then
    measure each ``(batch, warmup_s, seconds)`` from ``commands`` until None. Each reply is
    ``_time_batch``'s row plus what the machine did meanwhile, read from /proc/stat around the
    timed part: ``busy_cores`` (every process) and ``own_cores`` (this child), so that
    ``busy_cores - own_cores`` is the load the rest of the machine put beside the measurement."""
    try:
        from ..lib.measure import machine_cpu

        torch, model, spec = _load(omp_env, threads, form)
        steps = {}
        q.put(("ok", ("ready", torch.get_num_threads())))
        while (cmd := commands.get()) is not None:
            batch, warmup_s, seconds = cmd
            step = steps.get(batch) or steps.setdefault(batch, _make_step(model, spec, batch))
            end = time.perf_counter() + warmup_s
            while time.perf_counter() < end:
                step()
            m0, c0, t0 = machine_cpu(), time.process_time(), time.perf_counter()
            row = _time_batch(step, batch, 0.0, seconds)
            m1, c1, t1 = machine_cpu(), time.process_time(), time.perf_counter()
            row.update(busy_cores=(m1["busy_s"] - m0["busy_s"]) / (t1 - t0),
                       steal_cores=(m1["steal_s"] - m0["steal_s"]) / (t1 - t0),
                       own_cores=(c1 - c0) / (t1 - t0))
            q.put(("ok", row))
    except BaseException:
        q.put(("error", traceback.format_exc()))


class Worker:
    """One ceiling setting kept loaded in a child process of its own, measured on demand, so that
    a benchmark can take the ceiling again and again between its daemon windows (rounds) without
    paying the model's load each time. ``measure(batch, warmup_s, seconds)`` returns
    ``_time_batch``'s row plus ``busy_cores``, ``own_cores`` and ``steal_cores`` (``_serve``).
    ``close()`` is safe twice; use it as a context manager."""

    def __init__(self, name: str, omp_env: dict, threads: int = THREADS, form: str = "eager"):
        from ..lib.procs import CTX

        self.name, self.omp_env = name, dict(omp_env)
        self.q, self.commands = CTX.Queue(), CTX.Queue()
        self.proc = CTX.Process(target=_serve, args=(self.q, self.commands, self.omp_env, threads, form),
                                name=f"bench-ceiling-{name.replace(' ', '-')}", daemon=True)
        self.proc.start()
        try:
            self.threads = self._reply(120.0)[1]
        except BaseException:
            self.close()
            raise

    def _reply(self, timeout: float):
        from ..lib.procs import collect_results

        return collect_results(self.q, [self.proc], 1, timeout)[0]

    def measure(self, batch: int, warmup_s: float, seconds: float) -> dict:
        self.commands.put((batch, warmup_s, seconds))
        return {**self._reply(warmup_s + seconds + 120.0), "setting": self.name}

    def close(self) -> None:
        from ..lib.procs import stop_processes

        if self.proc.is_alive():
            self.commands.put(None)
        stop_processes([self.proc])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fair(ceiling: dict, max_batch: int):
    """``in_flight -> (batch, img/s)``: the in-process figure at the largest batch ``in_flight``
    frames allow under ``max_batch`` (the fair ceiling of a row; measured batch sizes only, the
    nearest one below when that batch was not measured)."""
    rows = {r["batch"]: r["img_s"] for r in ceiling["rows"]}

    def at(in_flight: int) -> tuple[int, float]:
        batch = max((b for b in rows if b <= min(in_flight, max_batch)), default=min(rows))
        return batch, rows[batch]

    return at


def candidates(daemon_omp: dict | None = None) -> tuple:
    """``SETTINGS``, plus the daemon's own OpenMP environment as ``"daemon"`` when a run gives the
    daemon one that is not already among them (``--daemon-set threads.omp_wait_policy=active``):
    a setting found faster is a ceiling too."""
    if daemon_omp is None or any(env == dict(daemon_omp) for _, env, *_ in SETTINGS):
        return SETTINGS
    return (*SETTINGS, ("daemon", dict(daemon_omp)))


def fastest(by_setting: dict) -> dict:
    """The ceiling from each setting's measurement (``{name: {"rows": [...], "omp_env", "torch",
    "threads"}}``): at each batch size measured by every setting, the row of the faster one, with
    ``setting`` naming it and ``img_s_by_setting`` beside it; the overall ceiling (best img/s over
    the batch sizes, and its setting) and the model time at batch 1 come from those rows. Settings
    measured at different batch sizes leave a batch out rather than compare it with nothing."""
    names = list(by_setting)
    per_batch = {name: {r["batch"]: r for r in m["rows"]} for name, m in by_setting.items()}
    batches = sorted(set.intersection(*(set(rows) for rows in per_batch.values())))
    rows = []
    for b in batches:
        name = max(names, key=lambda n: per_batch[n][b]["img_s"])
        rows.append({**per_batch[name][b], "setting": name,
                     "img_s_by_setting": {n: per_batch[n][b]["img_s"] for n in names}})
    best = max(rows, key=lambda r: r["img_s"])
    b1 = next((r for r in rows if r["batch"] == 1), None)
    first = by_setting[names[0]]
    return {"rows": rows, "ceiling_img_s": best["img_s"], "ceiling_batch": best["batch"],
            "ceiling_setting": best["setting"], "model_ms_b1": b1["batch_ms_p50"] if b1 else None,
            "settings": {n: {"omp_env": m["omp_env"], "threads": m["threads"], "rows": m["rows"]}
                         for n, m in by_setting.items()},
            "torch": first["torch"], "threads": first["threads"]}


def measure(warmup_s: float, seconds: float, batch_sizes=BATCH_SIZES, settings=SETTINGS) -> dict:
    """Part (a): img/s per batch size at each of ``settings`` (``(name, OpenMP environment)``
    pairs), each in a child process of its own, one after another; the ceiling is the faster at
    each batch size (``fastest``).

    Returns ``fastest``'s dict plus ``model`` and ``input_size``: ``rows`` (the ceiling per batch
    size, each naming its setting), ``ceiling_img_s``, ``ceiling_batch``, ``ceiling_setting``,
    ``model_ms_b1`` (the median time of one batch of 1: the least a lone request can cost),
    ``settings`` (every setting's own rows), ``torch``, ``threads``.
    """
    budget = len(batch_sizes) * (warmup_s + seconds) + 60.0
    by_setting = {name: run_in_child(_child, (tuple(batch_sizes), warmup_s, seconds, dict(env), *threads),
                                     budget, f"bench-ceiling-{name.replace(' ', '-')}")
                  for name, env, *threads in settings}
    out = fastest(by_setting)
    out.update(model=MODEL, input_size=INPUT_SIZE)
    return out
