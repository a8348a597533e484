"""The OIP front as a process: its doors (HTTP, gRPC) over one backend, from start to stop.

    start   config -> check every door's address and policy (daemon/oip/doors.py), the tokens
            file and TLS -> open the front's own session to the daemon (waits for it) -> bind the
            doors -> READY=1 (sd_notify, when NOTIFY_SOCKET is set)
    stop    SIGTERM / SIGINT -> stop accepting, let requests under way finish (grace), close the
            daemon sessions, unlink the Unix sockets

It runs on uvloop (as the daemon does; grpc.aio runs on it too, and a gRPC call costs about half
the CPU it costs on asyncio's own loop) in a process of its own, so its HTTP parsing, JSON and
protobuf work never take turns from the daemon's event loop (docs/oip.md, "Where it runs").
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from importlib import metadata

from ..config import Config
from ..errors import ConfigError
from ..front.listener import Listener
from ..ops.sd_notify import notify
from . import addresses, doors
from .backend import Backend
from .http_front import HttpDoor
from .timings import Recorder

log = logging.getLogger("inferd.oip")
STOP_GRACE_S = 5.0


def version() -> str:
    try:
        return metadata.version("inferd")
    except metadata.PackageNotFoundError:
        return "0"


def plan(cfg: Config) -> tuple[addresses.Address | None, addresses.Address | None]:
    """The HTTP and gRPC addresses, checked against the listen policy; ConfigError otherwise."""
    oip = cfg.oip
    http = addresses.parse(oip.http, "oip.http", "oip-http.sock", cfg.server.socket)
    grpc_at = addresses.parse(oip.grpc, "oip.grpc", "oip-grpc.sock", cfg.server.socket)
    if http is None and grpc_at is None:
        raise ConfigError("oip.http and oip.grpc are both \"off\": the front would serve nothing")
    for address, key in ((http, "oip.http"), (grpc_at, "oip.grpc")):
        if address is not None:
            doors.check_policy(address, key, oip)
    return http, grpc_at


def backend_options(cfg: Config) -> dict:
    """The Backend's settings from the configuration."""
    oip = cfg.oip
    return {"ring_slots": oip.ring_slots, "max_principals": oip.max_principals,
            "timeout_s": oip.request_timeout_ms / 1000.0, "admin_path": cfg.admin_socket_path}


async def serve(cfg: Config, stop: asyncio.Event, on_ready=None, backend: Backend | None = None) -> None:
    """Serve the doors until ``stop`` is set. ``on_ready(http, grpc)`` is told the addresses bound
    (ports resolved); without it, the front is a process of its own and tells systemd (READY=1
    and the addresses in STATUS=, which tests and scripts read). ``backend``: the daemon's side,
    when not a client-library session per principal (daemon/oip/direct.py, on the daemon's loop)."""
    oip = cfg.oip
    http_at, grpc_at = plan(cfg)
    tls = doors.tls_context(oip)
    auth = doors.Authenticator(oip.tokens_file, time.monotonic)
    if backend is None:
        backend = Backend(cfg.socket_path, **backend_options(cfg))
    await backend.start()
    recorder = Recorder.from_env()              # benchmarks only: the front's own time per request
    if recorder is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, recorder.dump)
    http_server = listener = grpc_door = None
    try:
        if http_at is not None:
            door = HttpDoor(backend, auth, network=not http_at.unix, max_batch=oip.max_batch, version=version())
            http_server = door.server(oip.max_request_bytes, oip.idle_timeout_s)
            if recorder is not None:
                http_server.timings = recorder.doors["http"]
            if http_at.unix:
                listener = Listener.bind(http_at.path, oip.socket_mode)
                await http_server.start(sock=listener.sock)
            else:
                port = await http_server.start(host=http_at.host, port=http_at.port, ssl=tls)
                http_at = addresses.Address(host=http_at.host, port=port)     # port 0: the one the kernel chose
        if grpc_at is not None:
            from .grpc_front import GrpcDoor        # grpcio loads only when a gRPC door is configured
            grpc_door = GrpcDoor(backend, auth, grpc_at, oip, version=version())
            if recorder is not None:
                grpc_door.timings = recorder.doors["grpc"]
            await grpc_door.start()
            grpc_at = grpc_door.address
        log.info("OIP front ready: HTTP on %s, gRPC on %s, serving %s for the daemon on %s",
                 http_at or "off", grpc_at or "off", backend.model.name, cfg.socket_path)
        if on_ready is not None:
            on_ready(http_at, grpc_at)
        else:   # the addresses bound (a port 0 resolved): tests and scripts read them from STATUS=
            notify(f"READY=1\nSTATUS=OIP front: HTTP {http_at or 'off'} gRPC {grpc_at or 'off'}")
        await stop.wait()
        if on_ready is None:
            notify("STOPPING=1")
    finally:
        if grpc_door is not None:
            await grpc_door.stop(STOP_GRACE_S)
        if http_server is not None:
            await http_server.close(STOP_GRACE_S)
        if listener is not None:
            listener.close()
        await backend.close()


def run(cfg: Config) -> int:
    """Serve until SIGTERM or SIGINT; the exit status."""
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, stop)
    try:
        import uvloop
    except ImportError:                         # the daemon extra brings it; asyncio's loop works too
        asyncio.run(main())
    else:
        uvloop.run(main())
    return 0
