"""The prepared GPU check: ``bench/gpu.sh`` runs this (``python -m bench.gpu``); see
docs/benchmarks.md, "GPU". Sections run in this order, the headline first, and OUT/gpu.json is
rewritten after each one, so a run cut short by its timeout still leaves what it measured.

(a) The in-process ceiling: ResNet-50-style (daemon/zoo, random weights, no download) at 224x224
    on cuda:0, per batch size up to 256, in bf16 and fp32 (channels_last both), in a child process.
    Each batch is the daemon's own per-batch work, through the same Engine (daemon/pipeline/engine.py): frames
    already in pinned staging memory, copy to the device, preprocessing, model, softmax, top-5 and
    the copy back, with two batches in flight, so the device never waits for the host. That is the
    best this model does on this GPU with the daemon's code path and no daemon around it; its
    fastest batch is the ceiling.
(b) The daemon, each row one daemon on cuda:0 (max_batch 64, max_delay 2 ms) and N closed-loop
    client processes with one 224x224 frame in flight each, every frame unique (a counter stamped
    into it, so a cache never answers it): img/s, p50/p99, the mean batch, how busy the model was
    (its counters), and the ratio to (a) at batch N (the largest batch N clients with one frame
    each can form) and to (a)'s fastest batch. First the headline, bf16 with 64 clients and the
    result cache on (the daemon's default, clients' too; embeddings off), the target being >= 0.9
    of the fastest batch; then bf16 and fp32 with the cache off at 16 and 64 clients.
(c) The feed rate (bench/feed/: the uint8 no-op, no preprocessing, as a GPU model that
    normalises inside would): 64x64 and 224x224 frames, cache off and on, on cuda:0 and, where
    the host has several GPUs, on all of them; each daemon gets bench.feed's unique and 30 %-repeat
    frame mixes from its 4 client processes, with frames/s into the daemon, its CPU per frame and
    the event loop's share, and the ratio to the bare ring-write + ping-pong baseline of the same run.

``--cpu-smoke`` runs the same code on the CPU at toy sizes (ResNet-18 at 32x32, 2 and 4 clients;
the feed rows at 16x16 and 32x32 on one and two ``cpu:1`` devices) in about a minute and a half,
to show the script works end to end where no GPU is. Writes OUT/gpu.json (gpu-smoke.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
import traceback

import numpy as np

from .lib.daemons import counters, daemon, short_workdir
from .lib.measure import frames, latency_stats, sleep_until
from .lib.procs import RESULT_GRACE_S, children, report_ready, run_in_child, sigterm_as_exit
from .lib.report import DEFAULT_OUT, command, prog, write_results

SETTINGS = {
    "gpu": {"device": "cuda:0", "model": "resnet50", "size": 224, "batches": (16, 32, 64, 128, 256),
            "precisions": ("bf16", "fp32"), "channels_last": True, "max_batch": 64,
            "max_delay_ms": 2.0, "ceiling_warmup_s": 1.0, "ceiling_s": 3.0, "warmup_s": 2.0, "seconds": 6.0,
            # (b): (precision, result cache on, client counts), in the order they run
            "daemons": (("bf16", True, (64,)), ("bf16", False, (16, 64)), ("fp32", False, (16, 64))),
            # (c): (frame size, cache on, devices: 1 or "all"), and bench.feed's windows
            "feed": tuple((size, cache, n) for size in (64, 224) for cache in (False, True) for n in (1, "all")),
            "feed_warmup_s": 1.0, "feed_seconds": 4.0, "bare_warmup": 300, "bare_count": 3000},
    "smoke": {"device": "cpu", "model": "resnet18", "size": 32, "batches": (1, 2, 4, 8),
              "precisions": ("bf16", "fp32"), "channels_last": False, "max_batch": 4,
              "max_delay_ms": 2.0, "ceiling_warmup_s": 0.2, "ceiling_s": 0.6, "warmup_s": 0.5, "seconds": 1.5,
              "daemons": (("bf16", True, (4,)), ("fp32", False, (2, 4))),
              # every value of each dimension once, as bench.feed --quick does
              "feed": ((16, False, 1), (32, True, 2)),
              "feed_warmup_s": 0.3, "feed_seconds": 0.7, "bare_warmup": 50, "bare_count": 300},
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
def _client(q, index: int, socket_path: str, size: int, cache: bool, warmup_s: float, seconds: float,
            start, go, stop) -> None:
    """Client process: connect, report ready, wait for the shared start, classify in a closed loop
    (a counter stamped into the frame each call: every frame unique), report the latencies of
    calls that ended inside the measured window. ``cache``: the client's own result-cache look-up."""
    try:
        from inferd.client import Client

        from .feed.clients import stamp

        frame = frames(1, size, seed=1000 + index)[0]
        with Client(socket_path, ring_slots=2, cache=cache) as client:
            client.classify(frame)
            report_ready(q, index, go)
            t_measure = start.value + warmup_s
            t_end = t_measure + seconds
            sleep_until(start.value)
            lat, n = [], 0
            while time.monotonic() < t_end:
                n += 1
                stamp(frame, 1, index, n)
                t0 = time.perf_counter()
                client.classify(frame)
                t1 = time.perf_counter()
                if t_measure <= time.monotonic() <= t_end:
                    lat.append(t1 - t0)
        q.put(("ok", ("done", index, lat)))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def run_clients(socket_path: str, probe, n: int, cache: bool, s: dict) -> dict:
    """``n`` client processes against the daemon at ``socket_path``; one result row."""
    specs = [(_client, (socket_path, s["size"], cache, s["warmup_s"], s["seconds"]))] * n
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


def daemon_args(s: dict, precision: str, cache: bool) -> list[str]:
    device = s["device"] if s["device"] != "cpu" else "cpu:1"
    return ["--model", s["model"], "--set", f"model.input_height={s['size']}",
            "--set", f"model.input_width={s['size']}", "--device", device,
            "--set", f"model.precision={precision}",
            "--set", f"model.channels_last={'true' if s['channels_last'] else 'false'}",
            "--set", f"batching.max_batch={s['max_batch']}", "--set", f"batching.max_delay_ms={s['max_delay_ms']}",
            "--set", f"cache.enabled={'true' if cache else 'false'}", "--set", "embeddings.enabled=false",
            "--set", "server.max_sessions_per_uid=200", "--set", "server.max_clients=256"]


def measure_daemon(s: dict, precision: str, cache: bool, clients, ceiling: dict) -> dict:
    """One daemon, ``clients`` (client counts) against it in turn; ``ceiling`` the rows of (a)."""
    from inferd.client import Client

    at = {r["batch"]: r["img_s"] for r in ceiling["rows"] if r["precision"] == precision}
    best = max(at.values())
    args = daemon_args(s, precision, cache)
    t0 = time.monotonic()
    with daemon(args) as d:
        start_s = time.monotonic() - t0
        with Client(d["socket"], cache=False) as probe:
            rows = []
            for n in clients:
                row = run_clients(d["socket"], probe, n, cache, s)
                row["in_process_img_s"] = at.get(min(n, s["max_batch"]))
                row["ratio"] = row["img_s"] / row["in_process_img_s"] if row["in_process_img_s"] else None
                row["best_img_s"], row["ratio_best"] = best, row["img_s"] / best
                rows.append(row)
                print(f"  daemon {precision} cache {'on' if cache else 'off'} {n} clients: {row['img_s']:.1f} img/s "
                      f"({row['ratio_best']:.2f} of the fastest in-process batch)", flush=True)
    return {"precision": precision, "cache": cache, "args": args, "start_s": start_s, "rows": rows,
            "exit_code": d.get("exit_code"), "log_problems": d.get("log_problems", [])}


# (c) the feed rate ---------------------------------------------------------------------------------
def feed_devices(s: dict, n) -> list[str] | None:
    """The ``--device`` names of a feed daemon of ``n`` devices ("all": every GPU, None when the
    host has one, so the row would repeat n = 1)."""
    if s["device"] == "cpu":
        return ["cpu:1"] * (1 if n == "all" else n)
    import torch

    count = torch.cuda.device_count()
    if n == "all" and count < 2:
        return None
    return [f"cuda:{i}" for i in range(count if n == "all" else n)]


def measure_feed(s: dict, log) -> dict:
    """bench.feed's rows on this host's devices: the bare baseline, then one daemon per row of
    ``s["feed"]`` with every frame mix against it."""
    from inferd.client import Client

    from .feed import baseline, model as feed_model, run as feed_run

    sizes = sorted({size for size, _, _ in s["feed"]})
    bare = baseline.measure(sizes, s["bare_warmup"], s["bare_count"])
    out = {"baseline": bare, "clients": feed_run.CLIENTS, "rows": [], "daemons": []}
    work = short_workdir()
    try:
        path = feed_model.save(work)
        for k, (size, cache, n) in enumerate(s["feed"]):
            devices = feed_devices(s, n)
            if devices is None:
                continue
            args = feed_model.daemon_args(path, size, 0, cache, feed_run.MAX_BATCH)
            args += [a for dev in devices for a in ("--device", dev)]
            with daemon(args) as d:
                with Client(d["socket"]) as probe:
                    for m, (mix, repeat) in enumerate(feed_run.FRAMES):
                        row = feed_run.run_case(d, probe, size, repeat, 2 * k + m, s["feed_warmup_s"],
                                                s["feed_seconds"])
                        row.update(size=size, cache=cache, devices=len(devices), frames=mix,
                                   x_bare=row["frames_s"] / bare["sizes"][str(size)]["frames_s"])
                        out["rows"].append(row)
                        log(f"  feed {size}x{size} cache {'on ' if cache else 'off'} {len(devices)} dev {mix:<8}"
                            f"{row['frames_s']:9.0f} frames/s  {row['cpu_us_per_frame'] or 0:6.1f} us/frame, "
                            f"loop {row['loop_us_per_frame'] or 0:5.1f} us")
            out["daemons"].append({k: d.get(k) for k in ("args", "exit_code", "log_problems")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


# report --------------------------------------------------------------------------------------------
def render(r: dict) -> str:
    s = r["settings"]
    c = r.get("ceiling")
    out = [f"inferd GPU check ({r['mode']}): {s['model']} {s['size']}x{s['size']} on {s['device']}"
           f" ({(c or {}).get('gpu') or 'CPU'}), torch {(c or {}).get('torch')}"]
    if c:
        out += ["", "(a) in-process ceiling (the daemon's Engine, 2 batches in flight, no daemon)",
                "precision  batch      img/s   ms launch->result"]
        for row in c["rows"]:
            out.append(f"{row['precision']:<9} {row['batch']:>6} {row['img_s']:>10.1f} {row['batch_ms_p50']:>10.2f}")
        for p, best in r["best"].items():
            out.append(f"best {p}: {best['img_s']:.1f} img/s at batch {best['batch']}")
    if r.get("daemon"):
        out += ["", f"(b) the daemon (max_batch {s['max_batch']}, max_delay {s['max_delay_ms']} ms, embeddings off), "
                    "N clients with one unique frame in flight each",
                "precision cache  N      img/s    p50 ms    p99 ms  mean batch  model busy  in-process@N  "
                "ratio  x fastest"]
        for d in r["daemon"]:
            for row in d["rows"]:
                lat, ip = row["latency"], row["in_process_img_s"]
                out.append(f"{d['precision']:<9} {'on' if d['cache'] else 'off':<5} {row['clients']:>3} "
                           f"{row['img_s']:>10.1f} {lat['p50_ms']:>9.2f} {lat['p99_ms']:>9.2f} "
                           f"{row['mean_batch'] or 0:>11.1f} {row['model_busy']:>11.2f} {ip or 0:>13.1f} "
                           f"{row['ratio'] or 0:>6.2f} {row['ratio_best']:>10.2f}")
            if d["log_problems"] or d["exit_code"] not in (0, None):
                out.append(f"  daemon {d['precision']}: exit {d['exit_code']}, log problems: {d['log_problems'][:3]}")
        head = r["daemon"][0]
        if head["cache"] and head["rows"]:
            row = head["rows"][-1]
            out.append(f"target: {head['precision']}, cache on, {row['clients']} clients >= 0.9 of the fastest "
                       f"in-process batch: {row['ratio_best']:.2f} "
                       f"({'MET' if row['ratio_best'] >= 0.9 else 'MISS'})")
    f = r.get("feed")
    if f:
        out += ["", f"(c) feed rate: bench.feed's uint8 no-op, {f['clients']} client processes x 16 frames in "
                    "flight; bare = ring write + socket ping-pong per frame, same run",
                "size  cache  dev  frames     frames/s  us/frame  loop us  loop share  mean batch  x bare"]
        for row in f["rows"]:
            out.append(f"{row['size']:>4}  {'on' if row['cache'] else 'off':<5} {row['devices']:>4}  {row['frames']:<8} "
                       f"{row['frames_s']:>10.0f} {row['cpu_us_per_frame'] or 0:>9.1f} {row['loop_us_per_frame'] or 0:>8.1f} "
                       f"{row['loop_share'] or 0:>11.0%} {row['mean_batch'] or 0:>11.1f} {row['x_bare']:>7.2f}")
        for size, b in f["baseline"]["sizes"].items():
            out.append(f"bare {size}x{size}: {b['frames_s']:.0f} frames/s ({b['per_frame_us']:.1f} us a frame)")
    if r.get("unfinished"):
        out.append(f"\nunfinished: {r['unfinished']}")
    return "\n".join(out)


def _save(out: str, name: str, report: dict) -> None:
    """OUT/name as it stands (after each section: a run stopped by its timeout keeps what it did)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as fh:
        json.dump(report, fh, indent=2, default=str)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=prog(), description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU, to check the script")
    p.add_argument("--out", default=DEFAULT_OUT, help="where gpu.json goes (gpu-smoke.json with --cpu-smoke)")
    p.add_argument("--skip-feed", action="store_true", help="leave out (c), the feed-rate rows")
    args = p.parse_args(argv)
    sigterm_as_exit()
    mode = "smoke" if args.cpu_smoke else "gpu"
    s = SETTINGS[mode]
    name = f"gpu{'-smoke' if args.cpu_smoke else ''}.json"
    if mode == "gpu":
        import torch

        if not torch.cuda.is_available():
            print(f"bench.gpu: no CUDA device: torch {torch.__version__} at {sys.executable} sees none "
                  f"(a CPU build of torch, or no GPU); use bench/gpu.sh --cpu-smoke to check the script",
                  file=sys.stderr)
            return 2
    t0 = time.monotonic()
    report = {"mode": mode, "settings": s, "command": command(), "daemon": [], "unfinished": "everything",
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        print(f"(a) in-process ceiling, {len(s['precisions']) * len(s['batches'])} runs", flush=True)
        report["unfinished"] = "(a) the ceiling"
        ceiling = report["ceiling"] = run_in_child(_ceiling_child, (s,), 600.0, "bench-gpu-ceiling")
        report["best"] = {pr: max((r for r in ceiling["rows"] if r["precision"] == pr), key=lambda r: r["img_s"])
                          for pr in s["precisions"]}
        _save(args.out, name, report)
        print("(b) the daemon", flush=True)
        head, *rest = s["daemons"]
        report["unfinished"] = "(b) the daemon"
        report["daemon"].append(measure_daemon(s, *head, ceiling))
        _save(args.out, name, report)
        if not args.skip_feed:
            print("(c) the feed rate", flush=True)
            report["unfinished"] = "(c) the feed rate"
            report["feed"] = measure_feed(s, lambda msg: print(msg, flush=True))
            _save(args.out, name, report)
        print("(b) the daemon, cache off", flush=True)
        report["unfinished"] = "(b) the daemon, cache off"
        for spec in rest:
            report["daemon"].append(measure_daemon(s, *spec, ceiling))
            _save(args.out, name, report)
        report["unfinished"] = None
    finally:
        report["wall_s"] = time.monotonic() - t0
        if report["unfinished"]:
            _save(args.out, name, report)
            print(render(report) if report.get("ceiling") else "", flush=True)
    write_results(args.out, name, report, render(report) + f"\n\n{report['wall_s']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
