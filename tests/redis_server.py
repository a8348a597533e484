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


@pytest.fixture
def redis_server():
    """A started RedisServer, stopped after the test."""
    server = RedisServer().start()
    yield server
    server.stop()
