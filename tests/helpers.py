"""Test helpers shared by tests/unit, tests/integration and tests/system (pyproject.toml puts tests/
on the path): a real daemon process, a raw protocol client, fakes, and leak probes.

A daemon is forked from a process that imported torch once (ForkServer; ``fork=False`` runs
``python -m inferd.daemon`` through inferd.daemon.launch), and either way the test waits for its
sd_notify READY=1 (the signal systemd waits for), so no test sleeps or polls a path. Every daemon gets its own socket path and
ring name prefix, so tests run side by side (pytest-xdist) never share a name.

Every name the suite makes in /tmp or /dev/shm carries this run's token (``RUN``, from
``$INFERD_TEST_RUN``, set once by the controlling pytest process and inherited by its workers): a
directory from :func:`short_dir` is ``/tmp/inferd-t{RUN}-*``, a daemon's ring prefix
``inferdt{RUN}*``. tests/conftest.py removes each test's directories when it ends, pass or fail, and
fails the session when anything carrying the token is left over (:func:`leftovers`).
"""
from __future__ import annotations

import array
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inferd.daemon.launch import DaemonProcess
#: tests/ (where this module, redis_server.py and conftest.py live) and the repository root above it
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

from inferd.shm import wire
from inferd.shm.ring import Ring

#: This run's token, in every name the suite makes; the controller sets it before workers start.
RUN = os.environ.setdefault("INFERD_TEST_RUN", secrets.token_hex(3))

#: Every directory short_dir made, in order; tests/conftest.py removes those of a test (a module, the
#: session) when it ends.
made_dirs: list[str] = []


def short_dir() -> str:
    """A fresh directory with a short path (AF_UNIX paths are limited to 107 bytes), removed when
    the test (or the module or session fixture) that made it ends."""
    path = tempfile.mkdtemp(prefix=f"inferd-t{RUN}-", dir="/tmp")
    made_dirs.append(path)
    return path


def remove_dirs_made_since(mark: int) -> None:
    """Remove the short_dir directories made after ``made_dirs[:mark]``."""
    while len(made_dirs) > mark:
        shutil.rmtree(made_dirs.pop(), ignore_errors=True)


def leftovers() -> list[str]:
    """Whatever this run made and left in /tmp or /dev/shm: names carrying its token."""
    found = [f"/tmp/{n}" for n in os.listdir("/tmp") if n.startswith(f"inferd-t{RUN}-")]
    found += [f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(f"inferdt{RUN}")]
    return sorted(found)


class Daemon(DaemonProcess):
    """A test's daemon: its own socket path, ring prefix and work directory."""

    prefix: str
    workdir: str

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def ring_maps(self) -> int:
        """How many rings the daemon process holds: memfd rings by their mapping in /proc/PID/maps
        (``/memfd:PREFIX-ring``), posix rings by their descriptor in /proc/PID/fd (the daemon never
        maps those, see inferd.shm.ring: ``/dev/shm/PREFIX.PID.N.X (deleted)``)."""
        with open(f"/proc/{self.pid}/maps") as fh:
            mapped = sum(f"memfd:{self.prefix}-ring" in line for line in fh)
        held = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                held += os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith(f"/dev/shm/{self.prefix}.")
            except FileNotFoundError:                    # closed since the listing
                pass
        return mapped + held


def _daemon_args(args, model: str, workdir: str, prefix: str) -> list[str]:
    default_device = [] if "--device" in args else ["--device", "cpu:1"]
    return [*(["--model", model] if model else []), "--set", f'ring.shm_prefix="{prefix}"',
            "--set", "model.warmup_batches=1", "--set", f'cache.path="{workdir}/results.cache"',
            *default_device, *args]


#: ``INFERD_TEST_FORK=0`` starts every daemon as ``python -m inferd.daemon`` (see ForkServer)
FORK = os.environ.get("INFERD_TEST_FORK", "1") != "0"
_fork_server: "ForkServer | None" = None


def fork_server() -> "ForkServer":
    """This process's ForkServer, started on first use; tests/conftest.py closes it at the end."""
    global _fork_server
    if _fork_server is None:
        _fork_server = ForkServer()
    return _fork_server


def close_fork_server() -> None:
    global _fork_server
    if _fork_server is not None:
        _fork_server.close()
        _fork_server = None


def spawn_daemon(*args: str, model: str = "shapes", wait: bool = True, workdir: str | None = None,
                 socket_path: str | None = None, forks: "ForkServer | None" = None,
                 fork: bool | None = None) -> Daemon:
    """Start a daemon with its own socket and ring prefix (one CPU device of one torch thread
    unless ``args`` name devices); wait for READY=1. The daemon is forked from ``forks`` (by
    default this process's fork_server()); ``fork=False`` (or INFERD_TEST_FORK=0) starts it as
    ``python -m inferd.daemon`` instead, for a test of what a fresh interpreter does at start-up."""
    workdir = workdir or short_dir()
    prefix = f"inferdt{RUN}{secrets.token_hex(4)}"
    argv = _daemon_args(args, model, workdir, prefix)
    socket_path = socket_path or os.path.join(workdir, "d.sock")
    if forks is None and (FORK if fork is None else fork):
        forks = fork_server()
    if forks is None:
        d = Daemon.start(argv, socket_path=socket_path, workdir=workdir, wait=wait)
    else:
        d = forks.start(argv, socket_path=socket_path, workdir=workdir, wait=wait)
    d.prefix, d.workdir = prefix, workdir
    return d


_FORK_SERVER = r"""
import json, os, signal, sys, traceback
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")    # what omp_wait_policy = auto picks for the tests' 1-thread devices, before torch
import psutil, uvloop  # noqa: F401  what every start imports again (torch, the pipeline, ...)
from inferd.daemon import __main__ as entry
from inferd.daemon import config, server  # noqa: F401
from inferd.daemon.front import listener  # noqa: F401
from inferd.daemon.models import loading  # noqa: F401
from inferd.daemon.models.zoo import shapes, synthetic  # noqa: F401
from inferd.daemon.ops import logs  # noqa: F401
from inferd.daemon.pipeline import thread_pools  # noqa: F401
from inferd.shm import cache, ring  # noqa: F401
signal.signal(signal.SIGCHLD, signal.SIG_IGN)          # the kernel reaps the daemons
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        rc = 70
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.environ.clear()
            os.environ.update(job["env"])
            log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            rc = entry.main(job["argv"])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            with open(job["status"], "w") as fh:
                fh.write(str(rc))
            os._exit(rc)
    print(pid, flush=True)
"""


class ForkedProcess:
    """The part of subprocess.Popen that DaemonProcess uses, for a daemon forked by a ForkServer
    (not our child: signalled and awaited through its pidfd). Its exit status is what the daemon
    wrote to ``status`` as it returned; killed before that: -9 after our SIGKILL, else 1."""

    def __init__(self, pid: int, status: str):
        self.pid, self.status = pid, status
        self._pidfd = os.pidfd_open(pid)
        self._killed = False
        self.returncode = None

    def poll(self):
        return self.wait(0) if self.returncode is None and self._ended(0) else self.returncode

    def _ended(self, timeout) -> bool:
        return bool(select.select([self._pidfd], [], [], timeout)[0])

    def wait(self, timeout=None):
        if self.returncode is None:
            if not self._ended(timeout):
                raise subprocess.TimeoutExpired(f"inferd (pid {self.pid})", timeout)
            try:
                with open(self.status) as fh:
                    self.returncode = int(fh.read())
            except (OSError, ValueError):
                self.returncode = -signal.SIGKILL if self._killed else 1
            os.close(self._pidfd)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self._killed |= sig == signal.SIGKILL
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:            # ended already
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """A process that imported the daemon (and torch) once and forks a daemon per ``start``: a
    start then costs the daemon's own start-up (configuration, model, cache, READY=1), not the 2 s
    of CPU of importing torch again, which was most of the suite's CPU time. The daemons are
    separate processes like any other (signals, SIGKILL, /proc, pidfd, exit status), but not
    exec'ed afresh: torch was loaded with the default OMP_WAIT_POLICY, so a test of what a fresh
    interpreter does at start-up passes ``fork=False`` to spawn_daemon."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def start(self, argv: list[str], *, socket_path: str, workdir: str, wait: bool = True) -> Daemon:
        notify_path = os.path.join(workdir, f"notify-{secrets.token_hex(3)}")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind(notify_path)
        log_path = os.path.join(workdir, f"daemon-{secrets.token_hex(3)}.log")
        env = {**os.environ, "NOTIFY_SOCKET": notify_path, "PYTHONUNBUFFERED": "1"}
        status = os.path.join(workdir, f"status-{secrets.token_hex(3)}")
        job = {"argv": ["--socket", socket_path, *argv], "env": env, "log": log_path, "status": status}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server exited with {self.proc.wait()}")
        d = Daemon(ForkedProcess(int(line), status), socket_path, log_path, notify)
        if wait:
            try:
                d.wait_notify("READY=1")
            except BaseException:
                d.kill()
                raise
        return d

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)
        self.proc.stdout.close()


def admin_path(daemon) -> str:
    """The daemon's admin socket: admin.sock beside its client socket (server.admin_socket's default)."""
    return os.path.join(os.path.dirname(daemon.socket_path), "admin.sock")


def client_hits(info: dict) -> int:
    """The daemon's count of hits clients answered themselves, wherever the stats put it."""
    def find(node):
        if isinstance(node, dict):
            if type(node.get("client_hits")) is int:
                return node["client_hits"]
            for value in node.values():
                if (found := find(value)) is not None:
                    return found
        return None
    found = find(info)
    assert found is not None, f"no client_hits in {sorted(info)}"
    return found


def shm_leftovers(prefix: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


class RawClient:
    """Speaks the wire protocol by hand, so tests can send what the library never would."""

    def __init__(self, socket_path: str, hello: bool = True, **hello_fields):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(socket_path)
        self.reader = wire.FrameReader(wire.MAX_REPLY_FRAME)
        self.ready: list = []
        self.ring = None
        if hello:
            self.hello_reply = self.hello(**hello_fields)

    def hello(self, **fields) -> dict:
        self.send({"op": "hello", "id": 0, "version": wire.PROTOCOL_VERSION, **fields})
        data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
        fds = [fd for lvl, typ, p in anc if typ == socket.SCM_RIGHTS for fd in array.array("i", p)]
        self.ready.extend(self.reader.feed(data))
        reply = self.recv()
        if fds:
            self.ring = Ring.attach(fds[0])
            self.fd = fds[0]
        return reply

    def send(self, message: dict) -> None:
        self.sock.sendall(wire.encode(message))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict | None:
        """The next reply, or None when the daemon closed the connection."""
        while not self.ready:
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            self.ready.extend(self.reader.feed(data))
        return self.ready.pop(0)

    def classify(self, rid: int, slot: int, frame, **overrides) -> None:
        self.ring.slot(slot, frame.nbytes)[:] = frame.reshape(-1)
        msg = {"op": "classify", "id": rid, "slot": slot, "shape": list(frame.shape),
               "dtype": "uint8", "nbytes": frame.nbytes}
        msg.update(overrides)
        self.send(msg)

    def close(self) -> None:
        self.sock.close()
        if self.ring is not None:
            self.ring.close()
            os.close(self.fd)
            self.ring = None


class Clock:
    """An injected clock a test moves by hand (``clock.now += 1.5``)."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeSession:
    """What the scheduler touches of a Session, for unit tests that drive a Scheduler by hand;
    ``sent`` collects its replies."""

    def __init__(self, uid: int, frame_bytes: int, slots: int = 8):
        from types import SimpleNamespace

        from inferd.shm.ring import RingGeometry

        self.peer = (4242, uid, uid)
        self.ring = SimpleNamespace(geometry=RingGeometry(slots, frame_bytes))
        self.inflight, self.pending = {}, {}
        self.closed, self.told_gen, self.batches = False, 0, False
        self.sent = []
        from inferd.daemon.dispatch.queues import ThinkTime
        self.think = ThinkTime()

    def send(self, message):
        self.sent.append(message)

    def claim(self, key, request):
        leader = self.pending.get(key)
        if leader is None or leader.done:
            self.pending[key] = leader = request
        return leader

    def unclaim(self, key, request):
        if self.pending.get(key) is request:
            del self.pending[key]

    def write(self, data):
        self.sent.append(data)

    def release_ring(self):
        pass


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value or ``timeout`` passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.01)  # noqa: sleep-ok: polling with a deadline, not waiting for things to settle


def wait_fused_preprocessing(daemon, timeout: float = 60.0) -> None:
    """Until the daemon's fused preprocessing (numba, 20+ MiB, loaded on a thread of its own after
    READY) has loaded or given up: a test that measures the daemon's RSS takes its baseline after."""
    from inferd.client import AdminClient
    with AdminClient(admin_path(daemon)) as admin:
        wait_until(lambda: admin.call("stats")["threads"]["fused_preprocessing"] not in ("idle", "loading"),
                   timeout=timeout, what="the fused preprocessing loaded")


def sample_images() -> list[tuple[str, "object"]]:
    """The committed sample PNGs as (true label, uint8 HxWx3 array)."""
    import numpy as np
    from PIL import Image

    root = ROOT / "samples"
    out = []
    for path in sorted(root.glob("*.png")):
        with Image.open(path) as img:
            out.append((path.stem.rsplit("_", 1)[0], np.array(img.convert("RGB"))))
    return out


class FakeDaemon:
    """A scripted daemon on a real socket: a real hello (a 4-slot ring of 8x8x3 frames over
    SCM_RIGHTS, ``hello_model`` as the model), then ``answer(msg)`` for each request (None: no
    reply). ``hold = True`` keeps replies back until ``release()``. One connection at a time."""

    def __init__(self, path, hello_model, answer):
        import threading

        self.path, self.hello_model, self.answer = path, hello_model, answer
        self.received, self.held = [], []
        self.hold = False
        self.conn = None
        self.lock = threading.Lock()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        from inferd.shm.ring import RingGeometry

        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.conn = conn
        with conn:
            reader = wire.FrameReader(wire.MAX_REPLY_FRAME)
            ring, fd = Ring.create(RingGeometry(4, 8 * 8 * 3), prefix="inferdfake")
            messages = []
            while not messages:
                messages = reader.feed(conn.recv(65536))
            reply = {"id": 0, "ok": True, "session": 1, "version": 1, "ring": {"slots": 4, "slot_bytes": 192},
                     "model": self.hello_model, "cache": None, "limits": {}}
            conn.sendmsg([wire.encode(reply)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            os.close(fd)
            while data := conn.recv(65536):
                for msg in reader.feed(data):
                    with self.lock:
                        self.received.append(msg)
                        out = self.answer(msg)
                        if out is not None:
                            frame = wire.encode({"id": msg["id"], **out})
                            self.held.append(frame) if self.hold else conn.sendall(frame)
            ring.close()

    def release(self):
        """Send the replies held back, and stop holding."""
        with self.lock:
            self.hold = False
            held, self.held = self.held, []
            for frame in held:
                self.conn.sendall(frame)

    def close(self):
        """Stop listening (waking an accept that waits); the serving thread ends when the client
        closes its connection."""
        if self.listener.fileno() >= 0:
            self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
        self.thread.join(10)


def during_attack(script: str, args: list[str], work):
    """Run the attacker ``script`` (``python -c script *args``) until it prints ``flooding``, call
    ``work()`` meanwhile, then close its stdin: it stops and prints its counts as its last line,
    a JSON object. Returns ``(work(), counts)``; the attacker is killed however this ends."""
    attacker = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert attacker.stdout.readline().strip() == "flooding", attacker.stderr.read()
        result = work()
        out, err = attacker.communicate("", timeout=60)
    finally:
        attacker.kill()
        attacker.wait()
    assert attacker.returncode == 0, err
    return result, json.loads(out.strip().splitlines()[-1])
