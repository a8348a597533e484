"""The OIP front on the daemon's own event loop (``oip.placement = "daemon"``).

    daemon READY=1 -> the front's ``serve`` (daemon/oip/front.py) as a task on the daemon's loop:
                      the same doors, routes, errors and principals as the front's process; its
                      inferences go straight into admission (daemon/oip/direct.py: a session per
                      principal on the loop, no socket, no client library)
    serve fails    -> logged, and started again after a back-off (1 s, doubling to 30 s; reset
                      once it has run for a minute), as the supervisor restarts a process
    daemon drains  -> its doors close first (requests under way finish, within the bound), then
                      the daemon's own drain

The same face as FrontSupervisor (daemon/oip/supervisor.py): ``start``, ``stop``, ``describe``,
``pid``; the server holds what ``place`` gives: the supervisor, this, or (``"http-daemon"``) the
HTTP door here and the gRPC door in the supervised process (SplitFront). What it saves and what it costs: a request wakes one
process (the daemon) where the front's process made two more wake-ups and two more socket hops;
the front's Python (HTTP parsing, JSON, tensors, and grpcio's callbacks for a gRPC call) runs on
the loop that admits and answers every request, so the loop's CPU a request grows by that much
(docs/oip.md, "Where it runs", measured by bench/oip/).

Decoding BYTES inputs and resizing frames stay off the loop (a small thread pool), and large JSON
bodies are parsed in a worker thread too.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time

from ..errors import ConfigError

log = logging.getLogger("inferd.oip")
#: "client" here makes the resident front reach the daemon as the front's process does (a
#: client-library session per principal, over the daemon's own socket, on the same loop) instead
#: of directly: for bench/oip/ to measure what the direct way saves; nothing else sets it
CLIENT_BACKEND_ENV = "INFERD_OIP_RESIDENT_BACKEND"
BACKOFF_S, BACKOFF_MAX_S, HEALTHY_RUN_S = 1.0, 30.0, 60.0


class ResidentFront:
    def __init__(self, cfg, server, clock=time.monotonic):
        self._cfg = cfg
        self._server = server                   # what the direct backend submits to
        self._clock = clock
        self._doors = {"http": "starting", "grpc": "starting"}
        self.restarts = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_running())

    def describe(self) -> dict:
        """The doors bound (ports resolved) and where they run, for ``health`` and ``info``."""
        return {**self._doors, "pid": self.pid, "restarts": self.restarts, "placement": "daemon"}

    @property
    def pid(self) -> int | None:
        return os.getpid() if self._task is not None and not self._task.done() else None

    def _ready(self, http, grpc_at) -> None:
        self._doors = {"http": str(http) if http is not None else "off",
                       "grpc": str(grpc_at) if grpc_at is not None else "off"}

    async def _keep_running(self) -> None:
        from .direct import DirectBackend   # the front's modules load only when it is placed here
        from .front import backend_options, serve
        backoff = BACKOFF_S
        while not self._stop.is_set():
            started = self._clock()
            try:
                if os.environ.get(CLIENT_BACKEND_ENV) == "client":     # benchmarks only (the docstring)
                    backend = None                  # serve's own: the client library over the socket
                else:
                    backend = DirectBackend(self._server, self._cfg.socket_path, **backend_options(self._cfg))
                await serve(self._cfg, self._stop, on_ready=self._ready, backend=backend)
                return
            except asyncio.CancelledError:
                raise
            except ConfigError as exc:      # nothing a retry would change
                log.error("the OIP front cannot start: %s", exc)
                self._doors = {"http": f"invalid: {exc}", "grpc": f"invalid: {exc}"}
                return
            except Exception:
                log.exception("the OIP front on the daemon's loop failed; starting it again in %.0f s", backoff)
                self.restarts += 1
                self._doors = {"http": "restarting", "grpc": "restarting"}
            if self._clock() - started >= HEALTHY_RUN_S:
                backoff = BACKOFF_S
            try:
                await asyncio.wait_for(self._stop.wait(), backoff)     # the restart back-off, cut by stop
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def stop(self, timeout: float) -> None:
        """Close the doors (requests under way finish), waiting up to ``timeout``; then cancel
        what is left. Idempotent."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            log.warning("the OIP front did not stop within %.1f s; cancelling it", timeout)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        except Exception:
            log.exception("the OIP front failed while stopping")


class SplitFront:
    """``oip.placement = "http-daemon"``: the HTTP door on the daemon's loop (ResidentFront), the
    gRPC door in the front's supervised process (FrontSupervisor), so grpcio's own cost a call
    (several hundred microseconds of CPU, bench/oip/servers.py) stays off the loop. One face."""

    def __init__(self, cfg, server):
        from .supervisor import FrontSupervisor
        only = lambda **door: dataclasses.replace(cfg, oip=dataclasses.replace(cfg.oip, **door))
        self.http = ResidentFront(only(grpc="off"), server)
        self.grpc = FrontSupervisor(only(http="off"))

    def start(self) -> None:
        self.http.start()
        self.grpc.start()

    @property
    def pid(self) -> int | None:
        return self.grpc.pid

    @property
    def restarts(self) -> int:
        return self.http.restarts + self.grpc.restarts

    def describe(self) -> dict:
        http, grpc_door = self.http.describe(), self.grpc.describe()
        return {"http": http["http"], "grpc": grpc_door["grpc"], "pid": grpc_door["pid"],
                "restarts": http["restarts"] + grpc_door["restarts"], "placement": "http-daemon"}

    async def stop(self, timeout: float) -> None:
        await asyncio.gather(self.http.stop(timeout), self.grpc.stop(timeout))


def place(cfg, server):
    """The front the daemon runs with ``[oip] enabled``, where ``oip.placement`` puts it."""
    from .supervisor import FrontSupervisor
    placement = cfg.oip.placement
    if placement == "process":
        return FrontSupervisor(cfg)
    if placement == "http-daemon":
        return SplitFront(cfg, server)
    return ResidentFront(cfg, server)
