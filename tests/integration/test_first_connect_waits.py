"""A new client waits for a daemon that is not there yet or is restarting, within its
connect_timeout (``reconnect=True``); with ``reconnect=False`` the first failure is raised at once.

Boot ordering (an application started before inferd) and ``systemctl restart`` (an application
started while the old daemon drains and its successor loads) both look, to a new client, like a
missing socket path, a refused connection or one reset during hello: what a connected client
already rides out. Each case runs against real daemons, for Client and AsyncClient; the client of
the restart case is another uid (65534) when the tests run as root.
"""
from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from helpers import FakeDaemon, sample_images, short_dir, spawn_daemon, wait_until
from inferd.client import AsyncClient, Client, DaemonUnavailable
from inferd.client import connection as connection_mod
from inferd.client.errors import ConnectionLost

pytestmark = pytest.mark.timeout(240)

KINDS = ["Client", "AsyncClient"]
NOBODY = 65534
#: Generous bound on "answered soon after the daemon is ready" under a loaded test machine; the
#: figure itself is printed (what a new client waits is one backoff step, at most 1 s, or nothing
#: when it already waits in the successor's listen backlog).
ANSWERED_WITHIN_S = 5.0


def _classify_once(kind: str, path: str, image, **kwargs) -> tuple[str, int, int]:
    """Open a client of ``kind`` (its constructor or ``open`` is where the wait happens),
    classify ``image``; (label, daemon pid, reconnects)."""
    if kind == "Client":
        with Client(path, **kwargs) as c:
            return c.classify(image)[0].label, c.info()["pid"], c.reconnects

    async def main():
        async with AsyncClient(path, **kwargs) as c:
            return (await c.classify(image))[0].label, (await c.info())["pid"], c.reconnects
    return asyncio.run(main())


# boot ordering ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_client_made_before_the_daemon_starts_is_answered_once_it_is_up(kind):
    workdir = short_dir()
    path = os.path.join(workdir, "d.sock")
    label, image = sample_images()[0]
    started, out = threading.Event(), {}

    def application():
        started.set()
        try:
            out["result"] = _classify_once(kind, path, image, connect_timeout=180.0, cache=False)
        except Exception as exc:  # handed to the test's thread
            out["error"] = exc
        out["at"] = time.monotonic()

    thread = threading.Thread(target=application)
    thread.start()
    d = None
    try:
        assert started.wait(30)
        assert not os.path.exists(path)                 # nothing to connect to yet
        d = spawn_daemon(workdir=workdir, socket_path=path)
        ready = time.monotonic()
        assert thread.is_alive() or "error" not in out, out.get("error")
        thread.join(120)
        assert not thread.is_alive()
        assert "error" not in out, out.get("error")
        got, pid, reconnects = out["result"]
        print(f"{kind}: answered {out['at'] - ready:.3f} s after READY=1")
        assert (got, pid, reconnects) == (label, d.pid, 0)
        assert out["at"] - ready < ANSWERED_WITHIN_S
        assert d.stop() == 0
    finally:
        thread.join(120)
        if d is not None:
            d.cleanup()


# a SIGTERM restart, seen by a client of another uid ---------------------------------------------
APPLICATION = """
import asyncio, concurrent.futures.thread, json, os, sys, time   # imported before the uid drops
import numpy as np
from inferd.client import AsyncClient, Client
path, kind, npy, uid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
image = np.load(npy)
if uid != os.getuid():
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
print("constructing", flush=True)
t0 = time.monotonic()
try:
    if kind == "Client":
        with Client(path, connect_timeout=180.0, cache=False) as c:
            label, pid = c.classify(image)[0].label, c.info()["pid"]
    else:
        async def main():
            async with AsyncClient(path, connect_timeout=180.0, cache=False) as c:
                return (await c.classify(image))[0].label, (await c.info())["pid"]
        label, pid = asyncio.run(main())
    print(json.dumps({"label": label, "pid": pid, "uid": os.getuid(), "at": time.monotonic(),
                      "waited": time.monotonic() - t0}), flush=True)
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
"""


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no line from the application within {timeout} s"
    return proc.stdout.readline()


@pytest.mark.parametrize("kind", KINDS)
def test_a_client_made_during_a_sigterm_restart_gets_the_successor(kind):
    uid = NOBODY if os.geteuid() == 0 else os.getuid()
    workdir = short_dir()
    os.chmod(workdir, 0o755)                            # the socket must be reachable; the files not
    path = os.path.join(workdir, "d.sock")
    args = ("--set", "server.socket_mode=0o666", "--set", f"server.allow_uids=[{uid}]")
    label, image = sample_images()[0]
    npy = os.path.join(workdir, "image.npy")
    np.save(npy, image)
    os.chmod(npy, 0o644)
    old = spawn_daemon(*args, workdir=workdir, socket_path=path)
    successor = app = None
    try:
        old.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: not os.path.exists(path), timeout=60, what="the draining daemon's socket gone")
        app = subprocess.Popen([sys.executable, "-c", APPLICATION, path, kind, npy, str(uid)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert _read_line(app, 60).strip() == "constructing"
        assert old.proc.wait(60) == 0
        assert app.poll() is None, app.communicate()     # still waiting: no daemon to answer it
        successor = spawn_daemon(*args, workdir=workdir, socket_path=path)
        ready = time.monotonic()
        out = json.loads(_read_line(app, 120))
        assert app.wait(60) == 0, app.stderr.read()
        assert "error" not in out, out
        print(f"{kind} as uid {out['uid']}: answered {out['at'] - ready:.3f} s after the successor's "
              f"READY=1 (constructed {out['waited']:.1f} s before)")
        assert (out["label"], out["pid"], out["uid"]) == (label, successor.pid, uid)
        assert out["at"] - ready < ANSWERED_WITHIN_S
        assert successor.stop() == 0
    finally:
        if app is not None and app.poll() is None:
            app.kill()
            app.wait()
        old.cleanup()
        if successor is not None:
            successor.cleanup()


# a daemon that resets connections during hello ---------------------------------------------------
class Resetter:
    """A listener on ``path`` that reads each connection's hello and resets it (RST, as a daemon
    stopping mid-handshake does), ``n`` times; then it unlinks the path and closes."""

    def __init__(self, path: str, n: int):
        self.path, self.n, self.reset = path, n, 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.sock:
            while self.reset < self.n:
                conn, _ = self.sock.accept()
                conn.recv(65536)                           # the hello
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                self.reset += 1
            os.unlink(self.path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_connections_reset_during_hello_are_retried_until_a_daemon_answers(kind):
    path = os.path.join(short_dir(), "d.sock")
    first = Resetter(path, 1)
    with pytest.raises(ConnectionLost, match="during hello"):   # what a new client used to raise
        Client(path, reconnect=False)
    first.thread.join(10)
    resetter = Resetter(path, 3)
    model = {"name": "fake", "digest": "d1", "input": [8, 8, 3], "dtype": "uint8", "labels": ["a", "b"],
             "top_k": 1, "gen": 1}
    out = {}

    def daemon_after_resets():
        resetter.thread.join(30)
        out["fake"] = FakeDaemon(path, model, lambda msg: {"ok": True})

    thread = threading.Thread(target=daemon_after_resets)
    thread.start()
    try:
        if kind == "Client":
            with Client(path, connect_timeout=30.0) as c:
                c.ping()
                name = c.model.name
        else:
            async def main():
                async with AsyncClient(path, connect_timeout=30.0) as c:
                    await c.ping()
                    return c.model.name
            name = asyncio.run(main())
        thread.join(30)
        assert resetter.reset == 3 and name == "fake"
        assert [m["op"] for m in out["fake"].received] == ["ping"]
    finally:
        thread.join(30)
        if "fake" in out:
            out["fake"].close()


# the deadline ---------------------------------------------------------------------------------------
@pytest.fixture
def attempts(monkeypatch):
    """Every connection attempt (Connection.open) the clients of this test make."""
    made = []
    real = connection_mod.Connection.open.__func__

    def counted(cls, *args, **kwargs):
        made.append(time.monotonic())
        return real(cls, *args, **kwargs)
    monkeypatch.setattr(connection_mod.Connection, "open", classmethod(counted))
    return made


def _open_and_fail(kind: str, path: str, **kwargs) -> tuple[Exception, float]:
    t0 = time.monotonic()
    try:
        if kind == "Client":
            Client(path, **kwargs).close()
        else:
            async def main():
                await (await AsyncClient.open(path, **kwargs)).aclose()
            asyncio.run(main())
    except Exception as exc:
        return exc, time.monotonic() - t0
    raise AssertionError("the client connected to nothing")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_connect_timeout_bounds_the_wait_with_backoff_not_a_busy_loop(kind, attempts):
    path = os.path.join(short_dir(), "nobody.sock")
    exc, took = _open_and_fail(kind, path, connect_timeout=2.0)
    assert type(exc) is DaemonUnavailable, exc
    assert str(exc).startswith(f"no inferd daemon answered on {path} within connect_timeout (2 s)"), exc
    assert "last attempt: no inferd daemon answers on" in str(exc), exc
    assert 2.0 <= took < 2.0 + 3.0, took
    # backoff from 50 ms doubling to 1 s: about 7 attempts in 2 s, not thousands
    print(f"{kind}: {len(attempts)} attempts in {took:.2f} s")
    assert 4 <= len(attempts) <= 12, attempts


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_a_listener_that_never_says_hello_is_given_up_on_at_connect_timeout(kind):
    path = os.path.join(short_dir(), "silent.sock")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(path)
    silent.listen(8)                                     # never accepts: hello waits in the backlog
    try:
        exc, took = _open_and_fail(kind, path, connect_timeout=2.0)
    finally:
        silent.close()
    assert isinstance(exc, DaemonUnavailable) and "no hello reply in time" in str(exc), exc
    assert 1.5 <= took < 2.0 + 3.0, took


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_without_reconnect_the_first_failure_is_raised_at_once(kind, attempts):
    path = os.path.join(short_dir(), "nobody.sock")
    exc, took = _open_and_fail(kind, path, connect_timeout=30.0, reconnect=False)
    assert isinstance(exc, ConnectionLost) and "no inferd daemon answers on" in str(exc), exc
    assert took < 5.0 and len(attempts) == 1, (took, attempts)
