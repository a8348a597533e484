"""Part (c), transport alone: a no-op model through the daemon against a bare Unix-socket ping-pong.

Daemon side: ``--model noop --device cpu:1``, max_batch 1 and max_delay 0, so a request never waits
for company; one client process times ``client.classify(frame)`` round trips of a 32x32 frame.

Bare side: two processes, blocking AF_UNIX SOCK_STREAM sockets, each message a 4-byte length
prefix plus a payload. The messages are byte-for-byte as long as the daemon's: the request is as long
as ``wire.encode`` of a representative classify frame, the reply as long as ``wire.encode`` of a
representative reply (both include their own 4-byte length header, so the bare payload is the
msgpack body's length). The ratio daemon/bare is what the daemon's protocol, event loop, batching
thread hand-off and (no-op) model cost on top of the two socket hops nobody can avoid.
"""
from __future__ import annotations

import os
import socket
import struct
import time
import traceback

from ..lib.daemons import daemon, short_workdir
from ..lib.measure import frames, latency_stats, time_calls
from ..lib.procs import CTX, RESULT_GRACE_S, collect_results, run_in_child, stop_processes
from . import handoff

DAEMON_ARGS = ["--model", "noop", "--device", "cpu:1",
               "--set", "batching.max_batch=1", "--set", "batching.max_delay_ms=0"]
FRAME_SIZE = 32
_LEN = struct.Struct("<I")


def frame_sizes() -> dict:
    """Bytes on the wire of a classify request and of its reply, as the client and daemon send them."""
    from inferd.shm import wire

    request = {"op": "classify", "id": 123, "slot": 0, "shape": [FRAME_SIZE, FRAME_SIZE, 3],
               "dtype": "uint8", "nbytes": FRAME_SIZE * FRAME_SIZE * 3, "top_k": 5, "timeout_ms": 30000.0}
    reply = {"id": 123, "ok": True, "top": [[i, 0.1] for i in range(5)]}
    return {"request_bytes": len(wire.encode(request)), "reply_bytes": len(wire.encode(reply))}


def _daemon_client(q, socket_path: str, warmup: int, count: int) -> None:
    """Client process: ``warmup`` untimed, then ``count`` timed ``classify`` round trips; then the
    same for ``ping`` (protocol and event loop only: no batching thread, no model)."""
    try:
        from inferd.client import Client

        frame = frames(1, FRAME_SIZE, seed=7)[0]
        out = {}
        with Client(socket_path) as client:
            for name, call in (("classify", lambda: client.classify(frame)), ("ping", client.ping)):
                out[name] = time_calls(call, count, warmup)
        q.put(("ok", out))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``; False if the peer closed first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _recv_frame(sock: socket.socket, header: memoryview, body: memoryview) -> bool:
    """Read one length-prefixed message into ``body``; False if the peer closed first."""
    if not _recv_exact(sock, header):
        return False
    (length,) = _LEN.unpack(header)
    return _recv_exact(sock, body[:length])


def _echo_server(q, path: str, reply_bytes: int) -> None:
    """Bare server process: for each length-prefixed request, answer one reply of ``reply_bytes``."""
    try:
        reply = _LEN.pack(reply_bytes - _LEN.size) + os.urandom(reply_bytes - _LEN.size)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(1)
            q.put(("ok", "listening"))
            conn, _ = listener.accept()
        header, body = memoryview(bytearray(_LEN.size)), memoryview(bytearray(1 << 16))
        with conn:
            while _recv_frame(conn, header, body):
                conn.sendall(reply)
        q.put(("ok", "closed"))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def _bare_client(q, path: str, request_bytes: int, warmup: int, count: int) -> None:
    """Bare client process: ``warmup`` + ``count`` timed request/reply round trips."""
    try:
        request = _LEN.pack(request_bytes - _LEN.size) + os.urandom(request_bytes - _LEN.size)
        header, body = memoryview(bytearray(_LEN.size)), memoryview(bytearray(1 << 16))
        lat = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            for i in range(warmup + count):
                t0 = time.perf_counter()
                sock.sendall(request)
                if not _recv_frame(sock, header, body):
                    raise RuntimeError("the echo server closed the connection")
                if i >= warmup:
                    lat.append(time.perf_counter() - t0)
        q.put(("ok", lat))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def measure_daemon(warmup: int, count: int, env: dict | None = None) -> dict:
    """Round trips of ``classify`` through a no-op daemon; also of ``ping``, and the daemon's own
    model time per frame (its counters: staging copy, to_input, model, softmax, top-k)."""
    from inferd.client import Client

    with daemon(DAEMON_ARGS, env) as d:
        lat = run_in_child(_daemon_client, (d["socket"], warmup, count), RESULT_GRACE_S, "bench-noop-client")
        with Client(d["socket"]) as probe:
            c = probe.info()["counters"]
    out = latency_stats(lat["classify"])
    out["ping"] = latency_stats(lat["ping"])
    out["daemon_model_us_per_frame"] = 1e6 * c.get("model_seconds", 0.0) / max(c.get("frames", 0), 1)
    out.update(daemon_args=DAEMON_ARGS, daemon_env=env or {}, daemon_exit_code=d.get("exit_code"),
               shm_leftovers=d["shm_leftovers"])
    return out


def measure_bare(request_bytes: int, reply_bytes: int, warmup: int, count: int) -> dict:
    """Round trips of the bare ping-pong between two spawned processes."""
    import shutil

    workdir = short_workdir()
    path = os.path.join(workdir, "echo.sock")
    q = CTX.Queue()
    server = CTX.Process(target=_echo_server, args=(q, path, reply_bytes), name="bench-echo", daemon=True)
    client = CTX.Process(target=_bare_client, args=(q, path, request_bytes, warmup, count),
                         name="bench-echo-client", daemon=True)
    try:
        server.start()
        collect_results(q, [server], 1, RESULT_GRACE_S)           # listening
        client.start()
        results = collect_results(q, [server, client], 2, RESULT_GRACE_S)
    finally:
        stop_processes([client, server])
        shutil.rmtree(workdir, ignore_errors=True)
    return latency_stats(next(r for r in results if isinstance(r, list)))


def measure(warmup: int, count: int, env: dict | None = None) -> dict:
    """Part (c): the bare ping-pong, the no-op daemon, and the ratio of their p50 and mean round
    trips; beside them the thread hand-offs alone (bench/load/handoff.py) and the floor they set: the
    bare round trip plus the loop -> thread -> loop hops of a one-thread and of a two-thread batcher."""
    sizes = frame_sizes()
    bare = measure_bare(sizes["request_bytes"], sizes["reply_bytes"], warmup, count)
    via_daemon = measure_daemon(warmup, count, env)
    hops = handoff.measure(count, warmup)
    floor = {kind: (bare["p50_ms"] + hops[kind]["all_hops"]["p50_ms"]) / bare["p50_ms"]
             for kind in ("cond", "two_threads")}
    return {**sizes, "round_trips": count, "bare": bare, "daemon": via_daemon, "handoff": hops,
            "floor_ratio_p50": floor,
            "ratio_p50": via_daemon["p50_ms"] / bare["p50_ms"],
            "ratio_mean": via_daemon["mean_ms"] / bare["mean_ms"]}
