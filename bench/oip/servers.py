"""The server stacks the OIP front could stand on, with a handler that does nothing: what each
costs a request by itself, so the front's choice is measured, not guessed.

    python -m bench.oip.servers [--quick]

Each server runs in a process of its own and answers a ~12 KB request (a 64x64 frame and its JSON
header) with a ~120-byte reply; one caller sends requests one at a time. For each: the caller's
p50 latency and the server process's CPU per request (all its threads, from /proc).

    http-aiohttp   aiohttp's low-level server (web.Server), uvloop     (the front's HTTP door before)
    http-own       daemon/oip/http_server.py: httptools on uvloop       (the front's HTTP door now)
    grpc-aio       grpc.aio on uvloop                                   (the front's gRPC door)
    grpc-sync      grpc.server(ThreadPoolExecutor), the handler answers in its pool thread
    grpc-handoff   grpc.server(ThreadPoolExecutor), the handler hands the call to an asyncio loop
                   (run_coroutine_threadsafe) and waits: how a sync door would reach the front's
                   asyncio backend (the client library's sessions)
    grpc-aio-lat   grpc.aio with latency-oriented settings: the epoll1 poller, optimization_target
                   "latency", no retries, no BDP probing, 16 KB HTTP/2 frames
    grpc-aio-unix  grpc.aio on a Unix socket (the caller's channel to unix:PATH)
    grpclib        grpclib (pure asyncio over h2) on uvloop, TCP
    grpclib-unix   grpclib on a Unix socket

Every gRPC stack is called by the same client (grpcio's blocking channel), so the rows differ by
their server alone.

The stacks alternate (each runs ``rounds`` times, its figures the median over them), so a change
of the machine's load falls on all of them alike.
"""
from __future__ import annotations

import asyncio
import re
import statistics
import time

from ..lib.report import settings_main, table

SETTINGS = {"full": {"requests": 3000, "rounds": 2, "warmup": 300},
            "quick": {"requests": 800, "rounds": 1, "warmup": 100}}
STACKS = ("http-aiohttp", "http-own", "grpc-aio", "grpc-sync", "grpc-handoff", "grpc-aio-lat", "grpc-aio-unix",
          "grpclib", "grpclib-unix")
#: grpc.aio's latency-oriented settings (grpc-aio-lat), beside GRPC_POLL_STRATEGY=epoll1
LATENCY_OPTIONS = [("grpc.optimization_target", "latency"), ("grpc.enable_retries", 0),
                   ("grpc.http2.bdp_probe", 0), ("grpc.http2.max_frame_size", 16384)]
REQUEST = b"x" * 12400
REPLY = b"y" * 120
HEADER = "Inference-Header-Content-Length"


def _serve(q, stack: str) -> None:
    """The server process: reports its port (or Unix socket path), then serves until killed."""
    import os
    if stack == "grpc-aio-lat":
        os.environ["GRPC_POLL_STRATEGY"] = "epoll1"        # read when grpcio starts, in this process
    import uvloop
    if stack in ("grpc-sync", "grpc-handoff"):
        server, port = _grpc_sync(stack == "grpc-handoff")      # held: a collected server stops
        q.put(("ok", port))
        while server is not None:
            time.sleep(3600)                                # noqa: sleep-ok (serves until killed)
    uvloop.run(_serve_async(q, stack))


async def _serve_async(q, stack: str) -> None:
    if stack == "http-aiohttp":
        from aiohttp import web

        async def handle(request):
            await request.read()
            return web.Response(body=REPLY, content_type="application/octet-stream", headers={HEADER: "100"})
        runner = web.ServerRunner(web.Server(handle, access_log=None), handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
    elif stack == "http-own":
        from inferd.daemon.oip.http_server import HttpServer, Response

        async def handle(request):
            return Response(200, REPLY, "application/octet-stream", {HEADER: "100"})
        port = await HttpServer(handle, max_body=1 << 26, idle_timeout_s=600).start(host="127.0.0.1", port=0)
    elif stack.startswith("grpclib"):
        port = await _grpclib(stack.endswith("-unix"))
    else:
        import grpc

        async def infer(request, context):
            return REPLY
        server = grpc.aio.server(options=LATENCY_OPTIONS if stack == "grpc-aio-lat" else None)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Svc", {"Infer": grpc.unary_unary_rpc_method_handler(infer)}),))
        if stack == "grpc-aio-unix":
            port = _unix_path()
            server.add_insecure_port(f"unix:{port}")
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    q.put(("ok", port))
    await asyncio.Event().wait()


def _unix_path() -> str:
    import tempfile
    return tempfile.mktemp(prefix="oip-bench-", suffix=".sock", dir="/tmp")


async def _grpclib(unix: bool):
    """A grpclib server of the one method, its messages raw bytes (no protobuf either side)."""
    from grpclib.const import Cardinality, Handler
    from grpclib.encoding.base import CodecBase
    from grpclib.server import Server

    class Raw(CodecBase):
        __content_subtype__ = "proto"

        def encode(self, message, message_type):
            return message

        def decode(self, data, message_type):
            return data

    class Svc:
        async def infer(self, stream):
            await stream.recv_message()
            await stream.send_message(REPLY)

        def __mapping__(self):
            return {"/bench.Svc/Infer": Handler(self.infer, Cardinality.UNARY_UNARY, bytes, bytes)}

    server = Server([Svc()], codec=Raw())
    _grpclib.server = server                                # held: a collected server stops
    if unix:
        path = _unix_path()
        await server.start(path=path)
        return path
    await server.start("127.0.0.1", 0)
    return server._server.sockets[0].getsockname()[1]


def _grpc_sync(handoff: bool):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import uvloop
    loop = None
    if handoff:
        loop = uvloop.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

    async def answer():
        return REPLY

    def infer(request, context):
        if loop is not None:
            return asyncio.run_coroutine_threadsafe(answer(), loop).result()
        return REPLY
    server = grpc.server(ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Svc", {"Infer": grpc.unary_unary_rpc_method_handler(infer)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _http_caller(port: int):
    import socket
    request = (f"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
               f"{HEADER}: 100\r\nContent-Length: {len(REQUEST)}\r\n\r\n").encode() + REQUEST
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    length = re.compile(rb"(?im)^content-length: *(\d+)")
    buf = bytearray()

    def call():
        sock.sendall(request)
        while b"\r\n\r\n" not in buf:
            buf.extend(sock.recv(65536))
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        need = int(length.search(head).group(1))
        while len(rest) < need:
            rest += sock.recv(65536)
        buf.clear()
        buf.extend(rest[need:])
    return call, sock.close


def measure_stack(stack: str, s: dict) -> dict:
    import psutil
    from ..lib.procs import CTX, stop_processes
    import os
    q = CTX.Queue()
    port = None
    proc = CTX.Process(target=_serve, args=(q, stack), name=f"oip-{stack}", daemon=True)
    proc.start()
    try:
        status, port = q.get(timeout=60)
        server = psutil.Process(proc.pid)
        if stack.startswith("http-"):
            call, close = _http_caller(port)
        else:
            import grpc
            channel = grpc.insecure_channel(f"unix:{port}" if isinstance(port, str) else f"127.0.0.1:{port}")
            rpc = channel.unary_unary("/bench.Svc/Infer")
            call, close = (lambda: rpc(REQUEST)), channel.close
        try:
            for _ in range(s["warmup"]):
                call()
            c0, lat = sum(server.cpu_times()[:2]), []
            for _ in range(s["requests"]):
                t0 = time.perf_counter()
                call()
                lat.append(time.perf_counter() - t0)
            cpu = sum(server.cpu_times()[:2]) - c0
        finally:
            close()
        lat.sort()
        return {"p50_us": 1e6 * lat[len(lat) // 2], "cpu_us": 1e6 * cpu / s["requests"]}
    finally:
        stop_processes([proc])
        if isinstance(port, str):
            try:
                os.unlink(port)
            except FileNotFoundError:
                pass


def measure(s: dict, log) -> dict:
    runs: dict = {k: [] for k in STACKS}
    for r in range(s["rounds"]):
        for stack in STACKS:
            got = measure_stack(stack, s)                  # this process is the caller
            runs[stack].append(got)
            log(f"round {r + 1} {stack}: p50 {got['p50_us']:.0f} us, server CPU {got['cpu_us']:.0f} us a request")
    return {"stacks": {k: {"p50_us": statistics.median(v["p50_us"] for v in runs[k]),
                           "cpu_us": statistics.median(v["cpu_us"] for v in runs[k]), "runs": runs[k]}
                       for k in STACKS}}


def render(r: dict) -> str:
    lines = [f"The OIP front's server stacks, a handler that does nothing, one caller ({' '.join(r['command'])})", ""]
    cols = [("stack", "<14"), ("p50 us", ">8.0f"), ("server CPU us/req", ">18.0f")]
    lines += table(cols, [(k, v["p50_us"], v["cpu_us"]) for k, v in r["stacks"].items()])
    return "\n".join(lines)


def main(argv=None) -> int:
    return settings_main(argv, __doc__, "oip_servers.json", "800 requests a stack, one round", SETTINGS,
                         measure, render)


if __name__ == "__main__":
    raise SystemExit(main())
