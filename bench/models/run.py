"""Several models on one device: ``python -m bench.models [--quick] [--out bench/out]``.

Two measurements, written to ``OUT/models.json``:

- **share**: one daemon, one CPU device, two ``[[models]]`` entries of the synthetic model (a known
  cost per batch: base_ms + per_frame_ms x n, slept, so the device's time is what the models are
  given) with ``share`` 2 and 1. Client threads keep both models backlogged (each model: clients
  with a classify_many of max_batch frames in flight in a loop) for ``seconds``; the figure is
  each model's frames in the window (the same cost per frame, so frames are device time) over
  the total, against its configured share (target: within 10 % of it), and the device seconds
  the policy charged each lane (``model_seconds`` in info) beside it. The operator's view of the
  same window comes beside them: each model's device seconds and share of the device from the
  admin socket's ``stats`` (its ``models`` rows, daemon/ops/stats.py), against the configured share
  the same rows give, so what ``inferctl top`` and the metrics report is checked against the load.
- **switch**: what changing models costs a CPU device, in process, one torch thread: batches of
  model A timed after a batch of A and after a batch of B (shapes and resnet18 at 64x64, batch 8),
  interleaved so drift hits both, medians and their ratio. This is what NOTE [ model share ] in
  daemon/dispatch/model_share.py plans around (RUN_S).
"""
from __future__ import annotations

import os
import statistics
import threading
import time

import numpy as np

from ..lib import daemons, report

SETTINGS = {"full": {"seconds": 20.0, "warmup_s": 3.0, "clients": 2, "switch_rounds": 60},
            "quick": {"seconds": 6.0, "warmup_s": 2.0, "clients": 2, "switch_rounds": 20}}
SHARES = {"heavy": 2.0, "light": 1.0}
MAX_BATCH = 16
TARGET = 0.10           # each model's part of the device within 10 % of its configured share


def models_config(workdir: str) -> str:
    path = os.path.join(workdir, "models.toml")
    with open(path, "w") as fh:
        for name, share in SHARES.items():
            fh.write(f'[[models]]\nbuiltin = "synthetic"\nname = "{name}"\nshare = {share}\n'
                     f'warmup_batches = 1\n\n')
    return path


def _device_seconds(admin) -> dict:
    """{model name: (seconds on device 0, its configured share there)} from the admin stats."""
    rows = admin.call("stats")["models"]
    return {m["name"]: (m["devices"][0]["seconds"], m["devices"][0]["share_configured"]) for m in rows}


def measure_share(settings: dict, log) -> dict:
    from inferd.client import AdminClient, Client
    from inferd.shm.paths import admin_socket_path

    workdir = daemons.short_workdir()
    config = models_config(workdir)
    control = os.path.join(workdir, "synthetic.json")
    with open(control, "w") as fh:
        fh.write('{"base_ms": 2.0, "per_frame_ms": 0.5}')
    args = ["--config", config, "--device", "cpu:1", "--set", f"batching.max_batch={MAX_BATCH}",
            "--set", "batching.max_delay_ms=2.0"]
    stop = threading.Event()
    errors: list[str] = []

    def load(name: str, socket: str) -> None:
        frames = [np.full((16, 16, 3), (i * 29) % 256, np.uint8) for i in range(MAX_BATCH)]
        try:
            with Client(socket, ring_slots=MAX_BATCH, model=name, cache=False) as c:
                while not stop.is_set():
                    c.classify_many(frames, top_k=1)
        except Exception as exc:  # reported: a failed client spoils the ratio
            errors.append(f"{name}: {exc!r}")

    with daemons.daemon(args, env={"INFERD_SYNTHETIC": control}) as d:
        threads = [threading.Thread(target=load, args=(name, d["socket"]), daemon=True)
                   for name in SHARES for _ in range(settings["clients"])]
        for t in threads:
            t.start()
        time.sleep(settings["warmup_s"])  # noqa: sleep-ok  the load settles before the window
        with Client(d["socket"]) as c, AdminClient(admin_socket_path(None, d["socket"])) as admin:
            before, seen_before = c.info(), _device_seconds(admin)
            time.sleep(settings["seconds"])  # noqa: sleep-ok  the measured window
            after, seen_after = c.info(), _device_seconds(admin)
        stop.set()
        for t in threads:
            t.join(30)
    frames = [after["counters"].get(f"frames_model_{i}", 0) - before["counters"].get(f"frames_model_{i}", 0)
              for i in range(len(SHARES))]
    charged = [a - b for a, b in zip(after["devices"][0]["model_seconds"], before["devices"][0]["model_seconds"])]
    total, want_total = sum(frames) or 1, sum(SHARES.values())
    seen = {name: seen_after[name][0] - seen_before[name][0] for name in SHARES}
    seen_total = sum(seen.values()) or 1.0
    rows = []
    for (name, share), n, s in zip(SHARES.items(), frames, charged):
        want = share / want_total
        got = n / total
        rows.append({"model": name, "share": share, "want": want, "frames": n, "got": got,
                     "error": got / want - 1.0, "charged_s": s, "stats_s": seen[name],
                     "stats_share": seen[name] / seen_total, "stats_configured": seen_after[name][1],
                     "stats_error": seen[name] / seen_total / want - 1.0})
    log(f"share: {rows}")
    return {"rows": rows, "fps": total / settings["seconds"], "mixed_batches": after["counters"].get("mixed_batches", 0),
            "errors": errors, "daemon": daemons.daemon_summary(d)}


def measure_switch(settings: dict, log) -> dict:
    import torch

    from inferd.daemon.models import zoo
    from inferd.daemon.pipeline.preprocess import to_input

    torch.set_num_threads(1)
    models = {}
    for name in ("shapes", "resnet18"):
        module, spec = zoo.build(name, input_size=64)
        x = to_input(torch.from_numpy(np.random.default_rng(1).integers(0, 255, (8, 64, 64, 3), np.uint8)),
                     torch.tensor(spec.mean), torch.tensor(spec.std))
        models[name] = (module.eval(), x)

    def run(name: str) -> float:
        module, x = models[name]
        t0 = time.perf_counter()
        with torch.inference_mode():
            module(x)
        return time.perf_counter() - t0

    for name in models:
        for _ in range(3):
            run(name)
    out = {}
    for a, b in (("shapes", "resnet18"), ("resnet18", "shapes")):
        same, switched = [], []
        for _ in range(settings["switch_rounds"]):
            run(a)
            same.append(run(a))             # A after A
            run(b)
            switched.append(run(a))         # A after B
        out[a] = {"after_same_ms": statistics.median(same) * 1e3, "after_other_ms": statistics.median(switched) * 1e3,
                  "ratio": statistics.median(switched) / statistics.median(same)}
    log(f"switch: {out}")
    return out


def measure(settings: dict, log) -> dict:
    return {"machine": report.machine(), "share": measure_share(settings, log), "switch": measure_switch(settings, log)}


def render(results: dict) -> str:
    share = results["share"]
    lines = [f"Two synthetic models on one CPU device, shares {SHARES} ({share['fps']:.0f} frames/s in all, "
             f"mixed batches {share['mixed_batches']}, client errors {len(share['errors'])}):"]
    lines += report.table([("model", "<6"), ("share", ">6.1f"), ("want", ">6.3f"), ("got", ">6.3f"),
                           ("error", ">+7.1%"), ("frames", ">7d"), ("charged s", ">9.2f"),
                           ("stats s", ">8.2f"), ("stats share", ">11.3f"), ("configured", ">10.3f"),
                           ("stats error", ">+11.1%")],
                          [[r["model"], r["share"], r["want"], r["got"], r["error"], r["frames"], r["charged_s"],
                            r.get("stats_s", 0.0), r.get("stats_share", 0.0), r.get("stats_configured") or 0.0,
                            r.get("stats_error", 0.0)]
                           for r in share["rows"]])
    ok = all(abs(r["error"]) <= TARGET for r in share["rows"])
    lines.append(f"target: each within {TARGET:.0%} of its share: {'met' if ok else 'NOT met'}")
    lines.append("(got: frames over the window; stats: the device seconds of each model in the admin "
                 "stats over the same window, and the configured share those rows give)")
    lines.append("")
    lines.append("Switching models on a CPU device (batch 8 at 64x64, one thread): a batch of A after A / after B")
    lines += report.table([("model A", "<8"), ("after A ms", ">10.2f"), ("after B ms", ">10.2f"), ("ratio", ">6.3f")],
                          [[a, r["after_same_ms"], r["after_other_ms"], r["ratio"]]
                           for a, r in results["switch"].items()])
    return "\n".join(lines)


def main(argv=None) -> int:
    return report.settings_main(argv, __doc__, "models.json", "6 s window, 20 switch rounds", SETTINGS,
                                measure, render)
