"""Start a daemon as a child process and know when it is ready, the way systemd does.

The child gets NOTIFY_SOCKET pointing at a datagram socket we own; :meth:`DaemonProcess.wait_notify`
waits (select on that socket and the child's pidfd) for READY=1, so a caller neither sleeps nor
polls the socket path, and learns at once if the daemon died instead. Used by the quick-start
demo, the benchmarks and the tests.
"""
from __future__ import annotations

import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT = 120.0


class LaunchError(Exception):
    """The daemon exited or stayed silent before the awaited notification; the message has its log."""


class DaemonProcess:
    """A daemon child process: ``start`` it, ``wait_notify("READY=1")``, ``stop()``."""

    def __init__(self, proc: subprocess.Popen, socket_path: str, log_path: str, notify: socket.socket):
        self.proc = proc
        self.socket_path = socket_path
        self.log_path = log_path
        self._notify = notify

    @classmethod
    def start(cls, args: list[str], *, socket_path: str, workdir: str, wait: bool = True,
              env: dict | None = None, wrapper: list[str] = (),
              module: str = "inferd.daemon") -> "DaemonProcess":
        """Run ``python -m inferd.daemon --socket socket_path *args``; its log goes to a file in
        ``workdir``. With ``wait``, return only once it sent READY=1. ``wrapper`` goes before the
        command, for a program that execs it (such as ``systemd-socket-activate -l PATH``);
        ``module``: another program that takes --socket and notifies (the OIP front,
        ``inferd.daemon.oip``)."""
        notify_path = os.path.join(workdir, f"notify-{secrets.token_hex(3)}")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind(notify_path)
        log_path = os.path.join(workdir, f"daemon-{secrets.token_hex(3)}.log")
        child_env = {**os.environ, **(env or {}), "NOTIFY_SOCKET": notify_path, "PYTHONUNBUFFERED": "1"}
        command = [*wrapper, sys.executable, "-m", module, "--socket", socket_path, *args]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env)
        daemon = cls(proc, socket_path, log_path, notify)
        if wait:
            try:
                daemon.wait_notify("READY=1")
            except BaseException:
                daemon.kill()
                raise
        return daemon

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def wait_notify(self, word: str, timeout: float = START_TIMEOUT) -> str:
        """Wait for a notification containing ``word``; LaunchError if the daemon exits first."""
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([self._notify, pidfd], [], [], left)
                if self._notify in readable:
                    message = self._notify.recv(4096).decode()
                    if word in message:
                        return message
                elif pidfd in readable:
                    raise LaunchError(f"daemon exited with {self.proc.wait()} before {word}:\n{self.log()}")
            raise LaunchError(f"no {word} from the daemon within {timeout} s:\n{self.log()}")
        finally:
            os.close(pidfd)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the daemon and return its exit status; kill it if it overstays ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise LaunchError(f"daemon did not stop within {timeout} s after signal {sig}:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL if still running, reap, close the notify socket. Idempotent."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._notify.close()
