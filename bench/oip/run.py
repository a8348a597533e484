"""The OIP front against the client library's ring path, on one daemon, in one run.

    python -m bench.oip [--quick]

For each placement of the front, one after the other: one daemon (the built-in model, 64x64
frames, one CPU device of one thread; the result cache off, so every request reaches the model)
and its OIP front (daemon/oip/, loopback TCP doors), as a process of its own (``process``), on
the daemon's loop straight into admission (``daemon``, daemon/oip/direct.py), and on the daemon's
loop through a client-library session over the daemon's socket (``daemon-client``: what the direct
way saves). Each placement's figures are against its own daemon's ring path. Three
kinds of caller, each one process with ``callers`` requests in flight (asyncio tasks):

    ring   AsyncClient over the Unix socket and its shared-memory ring (the baseline)
    http   aiohttp POST /v2/models/shapes/infer with binary tensor data (Inference-Header-Content-Length)
    grpc   grpc.aio ModelInfer with raw_input_contents (what tritonclient[grpc] sends)

Each asks for the top 5 (the ring's classify(top_k=5); OIP's classification: 5). Rounds interleave
the kinds (ring, http, grpc, ring, ...); each kind's throughput is summed over its rounds and its
latency percentiles taken over all its requests. Targets (docs/oip.md): HTTP binary and gRPC
carry >= 0.8 of the ring's throughput at 16 callers, and add <= 0.5 ms to the p50 of a request.

The added latency, three views:
1. one caller alone sends one request of each kind in turn (ring, http, http-raw, grpc,
   triton-http, triton-grpc, ring, ...; http-raw: the same HTTP request from a bare HTTP/1.1
   client, the front's part without aiohttp's client's): the latency a kind adds is the median of
   its differences to the mean of the ring requests either side of it;
2. the same, for the callers a Triton user has: tritonclient.http and tritonclient.grpc, unmodified
   (their own client-side cost included, as a Triton user pays it);
3. the front's own time a request over that one caller's run (daemon/oip/timings.py): request read
   to reply written (HTTP), handler start to reply handed to grpcio (gRPC), against the ring's p50;
   and of it, the front's work outside its wait for the daemon's answer.

CPU per request: the daemon's (all threads, and its event loop thread alone) and the front's CPU
seconds over each window divided by its answers, from /proc: on the daemon's loop, the loop's
figure holds the front's work (its process's figure is 0), the cost that placement puts on the
daemon's busiest thread (docs/oip.md, "Where it runs"). bench/oip/servers.py measures the server
stacks alone.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import time

from ..lib.daemons import daemon, short_workdir
from ..lib.measure import cpu_seconds, frames, latency_stats, thread_cpu_seconds
from ..lib.procs import run_in_child
from ..lib.report import settings_main, table

SETTINGS = {
    "full": {"size": 64, "callers": 16, "seconds": 6.0, "rounds": 3, "seq_seconds": 10.0, "warmup_s": 1.0},
    "quick": {"size": 64, "callers": 16, "seconds": 2.0, "rounds": 1, "seq_seconds": 1.5, "warmup_s": 0.5},
}
KINDS = ("ring", "http", "grpc")
#: the one-caller alternation adds "http-raw": the same HTTP request from a bare HTTP/1.1 client (one
#: keep-alive connection, the request's bytes built once), so the latency the front adds is not
#: mixed with aiohttp's client's own (a caller's HTTP stack is the caller's, whatever it is)
#: and the clients a Triton user has, unmodified: "triton-http" (tritonclient.http, binary tensor
#: data) and "triton-grpc" (tritonclient.grpc), when installed
SEQ_KINDS = ("ring", "http", "http-raw", "grpc", "triton-http", "triton-grpc")
TOP_K = 5
#: the model the daemon serves, as the callers name it
MODEL = "shapes"


def _caller(q, kind: str, target: str, size: int, callers: int, seconds: float, warmup_s: float) -> None:
    """One caller process: ``callers`` tasks send requests of ``kind`` for ``warmup_s``, then for
    ``seconds``; reports the latencies of the measured window."""
    try:
        import uvloop                                   # every kind of caller on the same loop
        q.put(("ok", uvloop.run(_callers(kind, target, size, callers, seconds, warmup_s))))
    except Exception:                                       # noqa: reported to the parent
        import traceback
        q.put(("error", traceback.format_exc()))


async def _callers(kind, target, size, callers, seconds, warmup_s) -> dict:
    frame = frames(1, size, seed=1)[0]
    call, close = await _client(kind, target, frame, callers)
    try:
        await call()
        lat: list[float] = []
        start = time.monotonic() + warmup_s
        end = start + seconds

        async def task():
            while True:
                t0 = time.perf_counter()
                await call()
                now = time.monotonic()
                if now >= end:
                    return
                if now >= start:
                    lat.append(time.perf_counter() - t0)
        await asyncio.gather(*(task() for _ in range(callers)))
        return {"count": len(lat), "seconds": seconds, "lat": lat}
    finally:
        await close()


async def _client(kind, target, frame, callers, model=MODEL):
    """(an awaitable making one request, an awaitable closing the client)."""
    if kind == "ring":
        from inferd.client import AsyncClient
        c = await AsyncClient.open(target, cache=False, ring_slots=max(callers, 1) * 2)
        return (lambda: c.classify(frame, TOP_K)), c.aclose
    shape = [1, *frame.shape]
    if kind.startswith("triton-"):
        return _triton(kind, target, frame, model)
    if kind == "http-raw":
        return await _raw_http(target, frame, shape, model)
    if kind == "http":
        import aiohttp
        head = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": shape,
                                       "parameters": {"binary_data_size": frame.nbytes}}],
                           "outputs": [{"name": "SCORES", "parameters": {"classification": TOP_K,
                                                                         "binary_data": True}}]}).encode()
        body, headers = head + frame.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                                 "Content-Type": "application/octet-stream"}
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=callers))
        url = f"http://{target}/v2/models/{model}/infer"

        async def post():
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
        return post, session.close
    import grpc
    from inferd.daemon.oip import oip_pb2 as pb
    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[frame.tobytes()])
    request.inputs.add(name="IMAGE", datatype="UINT8", shape=shape)
    request.outputs.add(name="SCORES").parameters["classification"].int64_param = TOP_K
    raw = request.SerializeToString()
    channel = grpc.aio.insecure_channel(target)
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")   # bytes in, bytes out
    return (lambda: infer(raw)), channel.close


async def _raw_http(target: str, frame, shape, model: str):
    """A bare HTTP/1.1 client of one keep-alive connection: the request's bytes built once, the
    reply read by its Content-Length."""
    head = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": shape,
                                   "parameters": {"binary_data_size": frame.nbytes}}],
                       "outputs": [{"name": "SCORES", "parameters": {"classification": TOP_K,
                                                                     "binary_data": True}}]}).encode()
    body = head + frame.tobytes()
    request = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {target}\r\n"
               f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(head)}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    host, port = target.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    length_re = re.compile(rb"(?im)^content-length: *(\d+)")

    async def post():
        writer.write(request)
        reply = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(length_re.search(reply).group(1)))
        if reply[9:12] != b"200":
            raise RuntimeError(f"HTTP {reply[9:12].decode()}")

    async def close():
        writer.close()
        await writer.wait_closed()
    return post, close


def _triton(kind: str, target: str, frame, model: str):
    """tritonclient's own client (blocking calls: the caller is alone when these run)."""
    if kind == "triton-http":
        import tritonclient.http as tc
    else:
        import tritonclient.grpc as tc
    client = tc.InferenceServerClient(target)
    image = tc.InferInput("IMAGE", [1, *frame.shape], "UINT8")
    if kind == "triton-http":
        image.set_data_from_numpy(frame[None], binary_data=True)
        out = tc.InferRequestedOutput("SCORES", binary_data=True, class_count=TOP_K)
    else:
        image.set_data_from_numpy(frame[None])
        out = tc.InferRequestedOutput("SCORES", class_count=TOP_K)

    async def infer():
        client.infer(model, [image], outputs=[out]).as_numpy("SCORES")

    async def close():
        client.close()
    return infer, close


def _alternating(q, targets: dict, size: int, seconds: float, warmup_s: float, model: str = MODEL) -> None:
    """One caller process, one request at a time, the kinds in turn (ring, http, http-raw, grpc,
    ring, ...): the latency each kind adds is the median of its differences to the mean of the
    ring requests either side of it (the one before it and the one after), so a change of the
    machine's load during the run falls on all kinds alike and a drift cancels."""
    try:
        import uvloop
        q.put(("ok", uvloop.run(_alternate(targets, size, seconds, warmup_s, model))))
    except Exception:                                       # noqa: reported to the parent
        import traceback
        q.put(("error", traceback.format_exc()))


def _door(kind: str) -> str:
    return kind.split("-")[-1] if kind.startswith("triton-") else kind.split("-")[0]


async def _alternate(targets, size, seconds, warmup_s, model=MODEL) -> dict:
    frame = frames(1, size, seed=2)[0]
    clients = {k: await _client(k, targets[_door(k)], frame, 1, model) for k in SEQ_KINDS
               if not k.startswith("triton-") or importlib.util.find_spec("tritonclient") is not None}
    try:
        lat = {k: [] for k in clients}
        start = time.monotonic() + warmup_s
        end = start + seconds
        while (now := time.monotonic()) < end:
            for kind, (call, _) in clients.items():
                t0 = time.perf_counter()
                await call()
                if now >= start:
                    lat[kind].append(time.perf_counter() - t0)
        return lat
    finally:
        for _, close in clients.values():
            await close()


def _front(d: dict):
    """The front as a process of its own beside the daemon ``d``, with its own time per request
    recorded (daemon/oip/timings.py): (its process, the timings file, the addresses of each kind)."""
    from inferd.daemon.launch import DaemonProcess
    from inferd.daemon.oip.timings import ENV
    timings = os.path.join(d["workdir"], "front-timings.json")
    proc = DaemonProcess.start(["--set", "oip.http=127.0.0.1:0", "--set", "oip.grpc=127.0.0.1:0"],
                               socket_path=d["socket"], workdir=d["workdir"], wait=False, module="inferd.daemon.oip",
                               env={ENV: timings})
    status = proc.wait_notify("READY=1", timeout=120)
    http, grpc_at = re.search(r"HTTP (\S+) gRPC (\S+)", status).groups()
    return proc, timings, {"ring": d["socket"], "http": http, "grpc": grpc_at}


#: the daemon's arguments that place the front on its own loop (oip.placement = "daemon")
RESIDENT = ["--set", "oip.enabled=true", "--set", 'oip.placement="daemon"',
            "--set", 'oip.http="127.0.0.1:0"', "--set", 'oip.grpc="127.0.0.1:0"']


def _resident(d: dict) -> dict:
    """The addresses of each kind of a daemon whose front runs on its loop, once its doors are
    bound (the daemon's ``health`` names them)."""
    from inferd.client import AdminClient
    deadline = time.monotonic() + 120
    while True:
        with AdminClient(os.path.join(d["workdir"], "admin.sock")) as admin:
            doors = admin.call("health").get("oip") or {}
        if ":" in str(doors.get("http")) and ":" in str(doors.get("grpc")):
            return {"ring": d["socket"], "http": doors["http"], "grpc": doors["grpc"]}
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon's OIP doors were not bound within 120 s: {doors}")
        time.sleep(0.05)                                    # noqa: sleep-ok (polls with a deadline)


def _front_timings(pid: int, path: str) -> dict:
    """What the front recorded since it was last asked (SIGUSR1; the file appears when written)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError("the front wrote no timings within 30 s of SIGUSR1")
        time.sleep(0.02)                                    # noqa: sleep-ok (polls with a deadline)
    with open(path) as fh:
        return json.load(fh)


#: process: the front's own process; daemon: on the daemon's loop, straight into admission
#: (daemon/oip/direct.py); daemon-client: on the daemon's loop, but through a client-library
#: session over the daemon's own socket (as the front's process reaches it): what the direct
#: way saves
PLACEMENTS = ("process", "daemon", "daemon-client")


def measure(s: dict, log) -> dict:
    """Each placement of the front against its own daemon's ring path, one after the other in
    this run."""
    out = {"placements": {}}
    for placement in PLACEMENTS:
        log(f"front placement: {placement}")
        out["placements"][placement] = _measure(s, log, placement)
    return out


def _measure(s: dict, log, placement: str) -> dict:
    from inferd.daemon.oip.timings import ENV
    out: dict = {"kinds": {}, "sequential": {}}
    args = ["--model", MODEL, "--device", "cpu:1"]
    from inferd.daemon.oip.resident import CLIENT_BACKEND_ENV
    resident = placement.startswith("daemon")
    timings_file = os.path.join(short_workdir(), "front-timings.json") if resident else None
    env = {ENV: timings_file, **({CLIENT_BACKEND_ENV: "client"} if placement == "daemon-client" else {})}
    with daemon(args + (RESIDENT if resident else []), env=env if resident else None) as d:
        if resident:
            front, timings_path, targets = None, timings_file, _resident(d)
        else:
            front, timings_path, targets = _front(d)
        try:
            # the front's process, or (on the daemon's loop) none: its CPU is the daemon's
            dpid = d["proc"].pid
            fpid = front.pid if front is not None else dpid
            runs = {k: {"count": 0, "seconds": 0.0, "lat": [], "daemon_cpu": 0.0, "front_cpu": 0.0,
                        "loop_cpu": 0.0} for k in KINDS}
            for r in range(s["rounds"]):
                for kind in KINDS:
                    c0 = (cpu_seconds(dpid), cpu_seconds(fpid), thread_cpu_seconds(dpid).get(dpid, 0.0))
                    got = run_in_child(_caller, (kind, targets[kind], s["size"], s["callers"], s["seconds"],
                                                 s["warmup_s"]), s["seconds"] + 120, f"oip-{kind}")
                    c1 = (cpu_seconds(dpid), cpu_seconds(fpid), thread_cpu_seconds(dpid).get(dpid, 0.0))
                    # the CPU of the warm-up goes in too: per request, over the warm-up's requests as well
                    total = s["seconds"] + s["warmup_s"]
                    run = runs[kind]
                    run["count"] += got["count"]
                    run["seconds"] += got["seconds"]
                    run["lat"] += got["lat"]
                    run["daemon_cpu"] += (c1[0] - c0[0]) * s["seconds"] / total
                    run["front_cpu"] += (c1[1] - c0[1]) * s["seconds"] / total if front is not None else 0.0
                    run["loop_cpu"] += (c1[2] - c0[2]) * s["seconds"] / total
                    log(f"round {r + 1} {kind}: {got['count'] / got['seconds']:.0f} req/s")
            for kind, run in runs.items():
                out["kinds"][kind] = {"rps": run["count"] / run["seconds"], **latency_stats(run["lat"]),
                                      "daemon_cpu_us": 1e6 * run["daemon_cpu"] / max(run["count"], 1),
                                      "front_cpu_us": 1e6 * run["front_cpu"] / max(run["count"], 1),
                                      "loop_cpu_us": 1e6 * run["loop_cpu"] / max(run["count"], 1)}
            _front_timings(fpid, timings_path)               # from here on: the one caller's requests
            lat = run_in_child(_alternating, (targets, s["size"], s["seq_seconds"], s["warmup_s"]),
                               s["seq_seconds"] + 120, "oip-alternating")
            own = _front_timings(fpid, timings_path)
            # per door: the front's time a request (request read to reply written, HTTP; handler start
            # to reply handed back, gRPC), and of it the front's own work outside the wait for the daemon
            out["front_own"] = {door: {"total": latency_stats([t for t, _ in v]),
                                       "outside_wait": latency_stats([t - w for t, w in v])}
                                for door, v in own.items() if v}
            ring = lat["ring"]
            for kind in lat:
                n = min(len(lat[kind]), len(ring) - 1)
                added = [lat[kind][i] - (ring[i] + ring[i + 1]) / 2 for i in range(n)]
                out["sequential"][kind] = {**latency_stats(lat[kind]), "added_p50_ms": latency_stats(added)["p50_ms"]}
                log(f"one caller {kind}: p50 {out['sequential'][kind]['p50_ms']:.3f} ms")
        finally:
            if front is not None:
                front.stop(timeout=30)
                front.kill()
            if timings_file is not None:
                shutil.rmtree(os.path.dirname(timings_file), ignore_errors=True)
    ring = out["kinds"]["ring"]
    for kind in ("http", "grpc"):
        k, q = out["kinds"][kind], out["sequential"][kind]
        out[kind] = {"throughput_ratio": k["rps"] / ring["rps"], "added_p50_ms_16": k["p50_ms"] - ring["p50_ms"],
                     "added_p50_ms_1": q["added_p50_ms"],
                     "target_met": k["rps"] / ring["rps"] >= 0.8 and q["added_p50_ms"] <= 0.5}
    out["http"]["added_p50_ms_1_raw"] = out["sequential"]["http-raw"]["added_p50_ms"]
    for kind in ("http", "grpc"):
        if f"triton-{kind}" in out["sequential"]:
            out[kind]["added_p50_ms_1_triton"] = out["sequential"][f"triton-{kind}"]["added_p50_ms"]
        if kind in out.get("front_own", {}):
            own = out["front_own"][kind]
            out[kind]["front_p50_ms"] = own["total"]["p50_ms"]
            # the front's time against the ring's whole round trip, both medians of the one caller's run
            out[kind]["front_added_p50_ms"] = own["total"]["p50_ms"] - out["sequential"]["ring"]["p50_ms"]
            out[kind]["front_outside_wait_p50_ms"] = own["outside_wait"]["p50_ms"]
    return out


def render(results: dict) -> str:
    s = results["settings"]
    lines = [f"OIP front vs the ring path: {s['callers']} callers, {s['size']}x{s['size']} frames, the built-in "
             f"model on one CPU device ({results['command'] and ' '.join(results['command'])})"]
    placements = results.get("placements") or {"process": results}     # (results of runs before placements)
    for placement, r in placements.items():
        where = {"process": "as a process of its own (oip.placement = 'process')",
                 "daemon": "on the daemon's event loop, straight into admission (oip.placement = 'daemon')",
                 "daemon-client": "on the daemon's event loop, through a client-library session over "
                                  "its socket (what the direct way saves)"}[placement]
        lines += ["", f"the front {where}", ""]
        lines += _render(s, r)
    return "\n".join(lines)


def _render(s: dict, r: dict) -> list:
    lines = []
    cols = [("caller", "<6"), ("req/s", ">8.0f"), ("vs ring", ">8.2f"), ("p50 ms", ">8.3f"), ("p99 ms", ">8.3f"),
            ("1-caller p50", ">12.3f"), ("daemon us/req", ">13.0f"), ("its loop", ">8.0f"),
            ("front us/req", ">12.0f")]
    ring = r["kinds"]["ring"]["rps"]
    rows = [(k, v["rps"], v["rps"] / ring, v["p50_ms"], v["p99_ms"], r["sequential"][k]["p50_ms"],
             v["daemon_cpu_us"], v["loop_cpu_us"], v["front_cpu_us"]) for k, v in r["kinds"].items()]
    lines += table(cols, rows)
    lines.append("")
    for kind in ("http", "grpc"):
        k = r[kind]
        lines.append(f"    {kind}: {k['throughput_ratio']:.2f} of the ring's throughput (target >= 0.80); "
                     f"added p50 {k['added_p50_ms_1'] * 1000:.0f} us with one caller, "
                     f"{k['added_p50_ms_16'] * 1000:.0f} us at {s['callers']} (target <= 500 us): "
                     f"{'met' if k['target_met'] else 'NOT met'}")
        if "added_p50_ms_1_raw" in k:
            lines.append(f"    {kind}: added p50 {k['added_p50_ms_1_raw'] * 1000:.0f} us with one caller whose "
                         "HTTP client is a bare HTTP/1.1 one (http-raw): the front's part without aiohttp's client")
        if "added_p50_ms_1_triton" in k:
            lines.append(f"    {kind}: added p50 {k['added_p50_ms_1_triton'] * 1000:.0f} us with one caller on "
                         f"tritonclient.{kind}")
        if "front_p50_ms" in k:
            what = "request read to reply written" if kind == "http" else "handler start to reply handed to grpcio"
            lines.append(f"    {kind}: the front's own time a request ({what}), one caller: p50 "
                         f"{k['front_p50_ms'] * 1000:.0f} us, {k['front_added_p50_ms'] * 1000:.0f} us over the ring's "
                         f"p50; outside its wait for the daemon's answer "
                         f"{k['front_outside_wait_p50_ms'] * 1000:.0f} us")
    return lines


def main(argv=None) -> int:
    return settings_main(argv, __doc__, "oip.json", "one round of 2 s", SETTINGS, measure, render)
