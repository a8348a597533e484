"""A real HAProxy in front of inferd hosts, for the fleet tests (tests/system/test_haproxy_fleet.py)
and ``python -m bench.fleet.balancer``: Debian's ``haproxy`` binary with a generated configuration,
in a directory of its own, on a free loopback port, started and stopped by its user (never the
system service the package may install).

The backend is what docs/fleet.md recommends, with shorter intervals so a run takes seconds:
every server ``weight 100``, its regular check an HTTP GET of the front's readiness, its weight and
drain/down from inferd's agent-check (``[fleet] agent``), L7 retries to another server on a
connection failure or a 503. ``servers()`` reads HAProxy's own view through its stats socket
(``show stat``): status, effective weight, requests sent, per server.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

import tempfile

INSTALL_HINT = "haproxy is not installed: apt-get install --no-install-recommends haproxy (.ci/run does it)"


def binary() -> str | None:
    """Debian's haproxy (in /usr/sbin, which a user's PATH may lack), or None."""
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Backend:
    name: str
    port: int                   # the front's HTTP port (requests and the regular check)
    agent_port: int             # inferd's [fleet] agent


def config(frontend_port: int, stats_socket: str, backends: list[Backend], *, check_path: str,
           inter_ms: int = 300, agent_inter_ms: int = 300) -> str:
    servers = "\n".join(
        f"    server {b.name} 127.0.0.1:{b.port} weight 100 check inter {inter_ms}ms fall 3 rise 1 "
        f"agent-check agent-port {b.agent_port} agent-inter {agent_inter_ms}ms" for b in backends)
    return f"""\
global
    stats socket {stats_socket} mode 600 level admin
    maxconn 1000
    log stdout format raw local0 notice

defaults
    mode http
    log global
    option httplog
    option log-separate-errors
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    option redispatch 1
    retries 3
    retry-on conn-failure empty-response response-timeout 500 503
    # a request is retried only if HAProxy holds all of it when it sends it: wait for the whole
    # body first (a client that sends headers and body in two writes is otherwise never retried);
    # bodies over tune.bufsize (16 KiB by default) are never retried
    option http-buffer-request

frontend fleet
    bind 127.0.0.1:{frontend_port}
    default_backend inferd

backend inferd
    balance roundrobin
    option httpchk GET {check_path}
    http-check expect status 200
    http-response set-header X-Inferd-Host %[srv_name]
{servers}
"""


class HAProxy:
    """``start(backends, check_path=...)``, ``servers()``, ``wait_for(predicate)``, ``stop()``.
    RuntimeError without the binary (INSTALL_HINT); ``workdir``: by default a fresh one, removed by
    ``stop()``."""

    def __init__(self, workdir: str | None = None):
        self.binary = binary()
        if self.binary is None:
            raise RuntimeError(INSTALL_HINT)
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="inferd-h", dir="/tmp")
        self.stats_socket = os.path.join(self.workdir, "haproxy.sock")
        self.config_path = os.path.join(self.workdir, "haproxy.cfg")
        self.log_path = os.path.join(self.workdir, "haproxy.log")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, backends: list[Backend], *, check_path: str, timeout: float = 20.0, **intervals) -> "HAProxy":
        with open(self.config_path, "w") as fh:
            fh.write(config(self.port, self.stats_socket, backends, check_path=check_path, **intervals))
        subprocess.run([self.binary, "-c", "-q", "-f", self.config_path], check=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-db", "-f", self.config_path],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}: {self.log()}")
            try:
                self.command("show info")
                return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy's stats socket did not answer within {timeout} s: {self.log()}")
            time.sleep(0.02)  # noqa: sleep-ok: polling a starting server with a deadline

    def command(self, line: str) -> str:
        """One command on the stats socket (HAProxy's runtime API), its whole answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5.0)
            s.connect(self.stats_socket)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    return b"".join(chunks).decode()
                chunks.append(data)

    def servers(self) -> dict[str, dict]:
        """HAProxy's view of each server of the backend: status (UP, DOWN, DRAIN, ...), weight,
        stot (requests sent), check_status, agent_status, and the rest of ``show stat``."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {r["svname"]: r for r in rows if r["pxname"] == "inferd" and r["svname"] not in
                ("FRONTEND", "BACKEND")}

    def wait_for(self, predicate, timeout: float, what: str) -> float:
        """Poll ``predicate(servers())`` until true; the seconds it took (AssertionError past timeout)."""
        t0 = time.monotonic()
        while True:
            servers = self.servers()
            if predicate(servers):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{what}: not within {timeout} s; haproxy sees "
                                     f"{ {k: (v['status'], v['weight'], v.get('agent_status')) for k, v in servers.items()} }")
            time.sleep(0.02)  # noqa: sleep-ok: polling HAProxy's view with a deadline

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()[-4000:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop haproxy (SIGTERM, then SIGKILL) and remove its files; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            return
        for path in (self.stats_socket, self.config_path, self.log_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
