"""The prepared GPU check: ``bench/gpu.sh`` runs this (``python -m bench.gpu``); see
docs/benchmarks.md, "GPU".

(a) The in-process ceiling: ResNet-50-style (daemon/zoo, random weights, no download) at 224x224
    on cuda:0, per batch size up to 256, in fp32 and bf16 (channels_last both), in a child process.
    Each batch is the daemon's own per-batch work, through the same Engine (daemon/pipeline/engine.py): frames
    already in pinned staging memory, copy to the device, preprocessing, model, softmax, top-5 and
    the copy back, with two batches in flight, so the device never waits for the host. That is the
    best this model does on this GPU with the daemon's code path and no daemon around it.
(b) The daemon: one daemon per precision (cuda:0, max_batch 64, max_delay 2 ms, cache off), and
    16 then 64 closed-loop client processes with one 224x224 frame in flight each; img/s, p50/p99,
    the mean batch, how busy the model was (its counters), and the ratio to (a) at batch N, the
    largest batch N clients with one frame each can form (the target: >= 0.9 at N = 64).

``--cpu-smoke`` runs the same code on the CPU at toy sizes (ResNet-18 at 32x32, 2 and 4 clients) in
well under a minute, to show the script works end to end where no GPU is. Writes OUT/gpu.json.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
import traceback

import numpy as np

from .lib.daemons import counters, daemon
from .lib.measure import frames, latency_stats, sleep_until
from .lib.procs import RESULT_GRACE_S, children, report_ready, run_in_child, sigterm_as_exit
from .lib.report import DEFAULT_OUT, command, prog, write_results

SETTINGS = {
    "gpu": {"device": "cuda:0", "model": "resnet50", "size": 224, "batches": (16, 32, 64, 128, 256),
            "precisions": ("fp32", "bf16"), "channels_last": True, "clients": (16, 64), "max_batch": 64,
            "max_delay_ms": 2.0, "ceiling_warmup_s": 1.0, "ceiling_s": 3.0, "warmup_s": 2.0, "seconds": 6.0},
    "smoke": {"device": "cpu", "model": "resnet18", "size": 32, "batches": (1, 2, 4, 8),
              "precisions": ("fp32", "bf16"), "channels_last": False, "clients": (2, 4), "max_batch": 4,
              "max_delay_ms": 2.0, "ceiling_warmup_s": 0.2, "ceiling_s": 0.6, "warmup_s": 0.5, "seconds": 1.5},
}
TOP_K = 5
IN_FLIGHT = 2             # batches the ceiling keeps queued on the device
START_LEAD_S = 0.3


# (a) the ceiling -----------------------------------------------------------------------------------
def _ceiling_child(q, s: dict) -> None:
    """Child body: ``("ok", rows)``, one row per (precision, batch), or ``("error", traceback)``."""
    try:
        import torch

        from inferd.daemon.models import loading as model_mod
        from inferd.daemon.config import ModelConfig
        from inferd.daemon.pipeline.engine import Engine, Staging
        from inferd.daemon.pipeline.engine_options import EngineOptions

        if s["device"] == "cpu":
            torch.set_num_threads(1)
        device = torch.device(s["device"])
        model = model_mod.load(ModelConfig(builtin=s["model"], input_height=s["size"], input_width=s["size"]))
        rows = []
        for precision in s["precisions"]:
            engine = Engine(device, model, TOP_K, options=EngineOptions(precision, s["channels_last"]))
            engine.load()
            for batch in s["batches"]:
                staging = Staging(device, batch, model.spec.frame_shape, IN_FLIGHT)
                for a in staging.arrays:
                    a[:] = frames(batch, s["size"], seed=batch)
                rows.append({"precision": precision, "batch": batch,
                             **_time_engine(engine, staging, batch, s["ceiling_warmup_s"], s["ceiling_s"])})
                print(f"  ceiling {precision} batch {batch}: {rows[-1]['img_s']:.1f} img/s", flush=True)
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
        q.put(("ok", {"rows": rows, "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def _time_engine(engine, staging, batch: int, warmup_s: float, seconds: float) -> dict:
    """Run ``batch``-frame launches back to back, IN_FLIGHT deep, for ``warmup_s`` then ``seconds``."""
    def run(until: float) -> tuple[int, list]:
        pending, done, times, i = [], 0, [], 0
        while time.perf_counter() < until or pending:
            if time.perf_counter() < until:
                pending.append((time.perf_counter(), engine.launch(staging.tensors[i % IN_FLIGHT], batch,
                                                                   TOP_K, wait_copy=False)))
                i += 1
            if len(pending) >= IN_FLIGHT or time.perf_counter() >= until:
                t0, p = pending.pop(0)
                p.result()
                times.append(time.perf_counter() - t0)
                done += batch
        return done, times

    run(time.perf_counter() + warmup_s)
    start = time.perf_counter()
    done, times = run(start + seconds)
    elapsed = time.perf_counter() - start
    return {"img_s": done / elapsed, "batch_ms_p50": 1000.0 * float(np.median(times)), "batches": len(times)}


# (b) the daemon ------------------------------------------------------------------------------------
def _client(q, index: int, socket_path: str, size: int, warmup_s: float, seconds: float,
            start, go, stop) -> None:
    """Client process: connect, report ready, wait for the shared start, classify in a closed loop,
    report the latencies of calls that ended inside the measured window."""
    try:
        from inferd.client import Client

        frame = frames(1, size, seed=1000 + index)[0]
        with Client(socket_path, ring_slots=2, cache=False) as client:
            client.classify(frame)
            report_ready(q, index, go)
            t_measure = start.value + warmup_s
            t_end = t_measure + seconds
            sleep_until(start.value)
            lat = []
            while time.monotonic() < t_end:
                t0 = time.perf_counter()
                client.classify(frame)
                t1 = time.perf_counter()
                if t_measure <= time.monotonic() <= t_end:
                    lat.append(t1 - t0)
        q.put(("ok", ("done", index, lat)))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def run_clients(socket_path: str, probe, n: int, s: dict) -> dict:
    """``n`` client processes against the daemon at ``socket_path``; one result row."""
    specs = [(_client, (socket_path, s["size"], s["warmup_s"], s["seconds"]))] * n
    with children(specs, lead_s=START_LEAD_S, name="bench-gpu-client") as group:
        t_measure = group.start + s["warmup_s"]
        sleep_until(t_measure)
        before = counters(probe)
        sleep_until(t_measure + s["seconds"])
        after = counters(probe)
        done = group.collect(s["warmup_s"] + s["seconds"] + RESULT_GRACE_S)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("frames", "batches", "model_seconds")}
    lats = np.concatenate([np.asarray(d[0]) for d in done])
    return {"clients": n, "img_s": lats.size / s["seconds"], "latency": latency_stats(lats),
            "mean_batch": delta["frames"] / delta["batches"] if delta["batches"] else None,
            "model_busy": delta["model_seconds"] / s["seconds"]}


def daemon_args(s: dict, precision: str) -> list[str]:
    device = s["device"] if s["device"] != "cpu" else "cpu:1"
    return ["--model", s["model"], "--set", f"model.input_height={s['size']}",
            "--set", f"model.input_width={s['size']}", "--device", device,
            "--set", f"model.precision={precision}",
            "--set", f"model.channels_last={'true' if s['channels_last'] else 'false'}",
            "--set", f"batching.max_batch={s['max_batch']}", "--set", f"batching.max_delay_ms={s['max_delay_ms']}",
            "--set", "server.max_sessions_per_uid=200", "--set", "server.max_clients=256"]


def measure_daemon(s: dict, precision: str, ceiling_at: dict) -> dict:
    from inferd.client import Client

    args = daemon_args(s, precision)
    t0 = time.monotonic()
    with daemon(args) as d:
        start_s = time.monotonic() - t0
        with Client(d["socket"], cache=False) as probe:
            rows = []
            for n in s["clients"]:
                row = run_clients(d["socket"], probe, n, s)
                row["in_process_img_s"] = ceiling_at.get(min(n, s["max_batch"]))
                row["ratio"] = row["img_s"] / row["in_process_img_s"] if row["in_process_img_s"] else None
                rows.append(row)
                print(f"  daemon {precision} {n} clients: {row['img_s']:.1f} img/s", flush=True)
    return {"precision": precision, "args": args, "start_s": start_s, "rows": rows,
            "exit_code": d.get("exit_code"), "log_problems": d.get("log_problems", [])}


# report --------------------------------------------------------------------------------------------
def render(r: dict) -> str:
    s = r["settings"]
    out = [f"inferd GPU check ({r['mode']}): {s['model']} {s['size']}x{s['size']} on {s['device']}"
           f" ({r['ceiling'].get('gpu') or 'CPU'}), torch {r['ceiling']['torch']}", "",
           "(a) in-process ceiling (the daemon's Engine, 2 batches in flight, no daemon)",
           "precision  batch      img/s   ms launch->result"]
    for row in r["ceiling"]["rows"]:
        out.append(f"{row['precision']:<9} {row['batch']:>6} {row['img_s']:>10.1f} {row['batch_ms_p50']:>10.2f}")
    for p, best in r["best"].items():
        out.append(f"best {p}: {best['img_s']:.1f} img/s at batch {best['batch']}")
    out += ["", f"(b) the daemon (max_batch {s['max_batch']}, max_delay {s['max_delay_ms']} ms, cache off), "
                "N clients with one frame in flight each",
            "precision  N      img/s    p50 ms    p99 ms  mean batch  model busy  in-process@N  ratio"]
    for d in r["daemon"]:
        for row in d["rows"]:
            lat, ip = row["latency"], row["in_process_img_s"]
            out.append(f"{d['precision']:<9} {row['clients']:>3} {row['img_s']:>10.1f} {lat['p50_ms']:>9.2f} "
                       f"{lat['p99_ms']:>9.2f} {row['mean_batch'] or 0:>11.1f} {row['model_busy']:>11.2f} "
                       f"{ip or 0:>13.1f} {row['ratio'] or 0:>6.2f}")
        if d["log_problems"] or d["exit_code"] not in (0, None):
            out.append(f"  daemon {d['precision']}: exit {d['exit_code']}, log problems: {d['log_problems'][:3]}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=prog(), description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU, to check the script")
    p.add_argument("--out", default=DEFAULT_OUT, help="where gpu.json goes")
    args = p.parse_args(argv)
    sigterm_as_exit()
    mode = "smoke" if args.cpu_smoke else "gpu"
    s = SETTINGS[mode]
    if mode == "gpu":
        import torch

        if not torch.cuda.is_available():
            print(f"bench.gpu: no CUDA device: torch {torch.__version__} at {sys.executable} sees none "
                  f"(a CPU build of torch, or no GPU); use bench/gpu.sh --cpu-smoke to check the script",
                  file=sys.stderr)
            return 2
    t0 = time.monotonic()
    print(f"(a) in-process ceiling, {len(s['precisions']) * len(s['batches'])} runs", flush=True)
    ceiling = run_in_child(_ceiling_child, (s,), 600.0, "bench-gpu-ceiling")
    best = {pr: max((r for r in ceiling["rows"] if r["precision"] == pr), key=lambda r: r["img_s"])
            for pr in s["precisions"]}
    print("(b) the daemon", flush=True)
    results = []
    for precision in s["precisions"]:
        at = {r["batch"]: r["img_s"] for r in ceiling["rows"] if r["precision"] == precision}
        results.append(measure_daemon(s, precision, at))
    report = {"mode": mode, "settings": s, "ceiling": ceiling, "best": best, "daemon": results,
              "wall_s": time.monotonic() - t0, "command": command(),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    write_results(args.out, f"gpu{'-smoke' if args.cpu_smoke else ''}.json", report,
                  render(report) + f"\n\n{report['wall_s']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
