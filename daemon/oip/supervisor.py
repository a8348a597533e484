"""The OIP front as the daemon's supervised child (``[oip] enabled``): one systemd unit still.

    daemon READY=1 -> start `python -m inferd.daemon.oip --socket S --set ...` (the daemon's own
                      [server] and [oip] values, so both read one configuration)
    child exits    -> started again after a back-off (1 s, doubling to 30 s; reset once it has
                      run for a minute), and logged with its exit status
    daemon drains  -> SIGTERM to the child first (its doors close, requests under way finish),
                      then the daemon's own drain; SIGKILL if it overstays the bound

Runs in the daemon's process, so it imports neither the front nor the client library: it only
starts, watches and stops a process (asyncio's child watcher tells it when the front exits);
the front dies with the daemon (PR_SET_PDEATHSIG, set by ``--parent-pid``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time

from ..errors import ConfigError
from .addresses import parse

log = logging.getLogger("inferd.oip")
BACKOFF_S, BACKOFF_MAX_S, HEALTHY_RUN_S = 1.0, 30.0, 60.0


def toml_value(value) -> str:
    """A configuration value as the TOML that --set reads back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def front_argv(cfg) -> list[str]:
    """The front's command line: the daemon's socket, and every [server] and [oip] value that
    differs from its default (all the front reads)."""
    argv = [sys.executable, "-m", "inferd.daemon.oip", "--socket", cfg.socket_path, "--parent-pid", str(os.getpid())]
    for name in ("server", "oip"):
        section = getattr(cfg, name)
        default = type(section)()
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if value != getattr(default, f.name) and value is not None and not (name == "oip" and f.name == "enabled"):
                argv += ["--set", f"{name}.{f.name}={toml_value(value)}"]
    return argv


class FrontSupervisor:
    def __init__(self, cfg, clock=time.monotonic):
        self._argv = front_argv(cfg)
        self._doors = {}
        for key, value, name in (("http", cfg.oip.http, "oip-http.sock"), ("grpc", cfg.oip.grpc, "oip-grpc.sock")):
            try:
                address = parse(value, f"oip.{key}", name, cfg.server.socket)
            except ConfigError as exc:                  # the front says so too, and exits 78
                self._doors[key] = f"invalid: {exc}"
            else:
                self._doors[key] = str(address) if address is not None else "off"
        self.restarts = 0
        self._clock = clock
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_running())

    def describe(self) -> dict:
        """The front's doors and process, for the daemon's ``health`` and ``info`` (inferctl)."""
        return {**self._doors, "pid": self.pid, "restarts": self.restarts, "placement": "process"}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def _keep_running(self) -> None:
        backoff = BACKOFF_S
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                                                 "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
        while not self._stopping:
            started = self._clock()
            try:
                self._proc = await asyncio.create_subprocess_exec(*self._argv, env=env,
                                                                  stdin=asyncio.subprocess.DEVNULL)
            except OSError as exc:
                log.error("cannot start the OIP front: %s", exc)
            else:
                log.info("OIP front started (pid %d)", self._proc.pid)
                status = await self._proc.wait()
                if self._stopping:
                    return
                log.error("the OIP front exited with status %d; starting it again in %.0f s", status, backoff)
                self.restarts += 1
            if self._clock() - started >= HEALTHY_RUN_S:
                backoff = BACKOFF_S
            await asyncio.sleep(backoff)        # noqa: sleep-ok  the restart back-off
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def stop(self, timeout: float) -> None:
        """SIGTERM the front, wait up to ``timeout``, then SIGKILL. Idempotent."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("the OIP front did not stop within %.1f s; killing it", timeout)
                proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            self._task = None
