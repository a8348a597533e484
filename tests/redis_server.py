"""A real redis-server for a test: on a Unix socket in a directory of its own, started and stopped by
the fixture, never a system service (Debian's package starts one under systemd where systemd runs;
nothing here talks to it).

Missing binary: the tests that need it skip, saying how to install it (``.ci/run`` installs it).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from helpers import short_dir

INSTALL_HINT = "redis-server is not installed: apt-get install redis-server (.ci/run does it)"


def _answers(path: str) -> bool:
    import redis

    try:
        with redis.Redis(unix_socket_path=path, socket_timeout=1.0) as r:
            return bool(r.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


class RedisServer:
    """``start()`` / ``kill()`` (SIGKILL) / ``stop()``; ``url`` for inferd's ``l2.url``; ``client()``
    a sync redis-py client. The socket path stays the same across restarts."""

    def __init__(self, workdir: str | None = None):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip(INSTALL_HINT)
        self.workdir = workdir or short_dir()
        self.path = os.path.join(self.workdir, "redis.sock")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def start(self, timeout: float = 20.0) -> "RedisServer":
        args = [self.binary, "--port", "0", "--unixsocket", self.path, "--unixsocketperm", "700",
                "--save", "", "--appendonly", "no", "--dir", self.workdir, "--daemonize", "no",
                "--logfile", os.path.join(self.workdir, "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not _answers(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on {self.path} within {timeout} s")
            time.sleep(0.02)  # noqa: sleep-ok: polling a starting server with a deadline
        return self

    def client(self):
        import redis

        return redis.Redis(unix_socket_path=self.path, socket_timeout=5.0)

    def log(self) -> str:
        try:
            with open(os.path.join(self.workdir, "redis.log")) as fh:
                return fh.read()[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, reaped; the socket file is removed so a restart binds it afresh."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def free_port(bus: bool = False) -> int:
    """A free loopback port; with ``bus``, one whose cluster bus port (port + 10000) is valid and
    free too (a cluster node binds both)."""
    import socket

    for _ in range(100):
        with socket.socket() as s, socket.socket() as t:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if not bus:
                return port
            if port + 10000 > 65535:
                continue
            try:
                t.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _start_tcp(binary: str, workdir: str, name: str, args: list, timeout: float = 20.0):
    """A redis-server (or sentinel) on a free loopback port: (process, port)."""
    import redis

    port = free_port(bus="--cluster-enabled" in args)
    proc = subprocess.Popen([binary, *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
                             "--logfile", os.path.join(workdir, f"{name}.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with redis.Redis(port=port, socket_timeout=1.0) as r:
                if r.ping():
                    return proc, port
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{name} did not answer on 127.0.0.1:{port}")
        time.sleep(0.02)  # noqa: sleep-ok: polling a starting server with a deadline


@pytest.fixture
def redis_sentinel():
    """A master on a loopback port and one Sentinel watching it as ``mymaster``: yields
    (sentinel address "127.0.0.1:PORT", master port)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(INSTALL_HINT)
    workdir = short_dir()
    procs = []
    try:
        master, master_port = _start_tcp(binary, workdir, "master", ["--save", "", "--appendonly", "no"])
        procs.append(master)
        conf = os.path.join(workdir, "sentinel.conf")
        with open(conf, "w") as fh:
            fh.write(f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n")
        sentinel, port = _start_tcp(binary, workdir, "sentinel", [conf, "--sentinel"])
        procs.append(sentinel)
        yield f"127.0.0.1:{port}", master_port
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_cluster():
    """Three masters on loopback ports joined into one Redis Cluster (no replicas): yields their
    ports once the cluster says ``cluster_state:ok``."""
    import redis

    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        pytest.skip(INSTALL_HINT)
    workdir = short_dir()
    procs, ports = [], []
    try:
        for i in range(3):
            node_dir = os.path.join(workdir, f"n{i}")
            os.mkdir(node_dir)
            proc, port = _start_tcp(binary, node_dir, f"node{i}", [
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--save", "",
                "--appendonly", "no"])
            procs.append(proc)
            ports.append(port)
        made = subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                               "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if made.returncode:
            raise RuntimeError(f"redis-cli --cluster create failed: {made.stdout[-1000:]}{made.stderr[-1000:]}")
        deadline = time.monotonic() + 30
        for port in ports:
            with redis.Redis(port=port) as r:
                while b"cluster_state:ok" not in r.execute_command("CLUSTER", "INFO"):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the test cluster did not reach cluster_state:ok")
                    time.sleep(0.05)  # noqa: sleep-ok: polling the cluster's state with a deadline
        yield ports
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_server():
    """A started RedisServer, stopped after the test."""
    server = RedisServer().start()
    yield server
    server.stop()
