"""No lockout by file descriptors (NOTE [ the door ] in daemon/front/door.py).

The attack: a daemon whose RLIMIT_NOFILE is low (256, set by prlimit before it starts), an attacker
of another uid (65534; root runs these tests and the attacker drops to that uid after its imports)
that opens hundreds of bare connections, never says hello, and holds them. Before the door, accept
failed with EMFILE, the accept loop ended, and the socket stayed deaf for good. Now, while a
well-behaved client keeps classifying through it:

    bounds                                what the attack gets
    max_prehello_per_uid 16               16 kept, the rest closed at once with `overloaded`
    max_prehello 24, a second uid         the uid holding the most gives up its oldest: neither
                                          attacker nor both together lock another uid out
    bounds above the descriptor limit     kept up to the reserve, the rest closed at once; the
                                          admin socket answers, health says not ready and why
    no reserve (server.reserved_fds 0)    accept meets EMFILE: pending connections are turned away,
                                          the loop backs off and accepts again (counted, logged)

and after the attacker exits a new client of another uid is answered within 1 s. The last two
tests drive parts alone: the door on a real socket (an unexpected exception is logged and the
loop goes on), and sd_notify in a process with no descriptor left (the message is dropped; it
used to raise and end the watchdog task).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import resource
import secrets
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import Daemon, admin_path, sample_images, shm_leftovers, short_dir, wait_until
from inferd.client import Client
from inferd.client.admin import AdminClient
from inferd.daemon.config import ServerConfig
from inferd.daemon.front.door import Door
from inferd.shm import wire

LIMIT = 256
ATTACKER, OTHER_ATTACKER = 65534, 4242
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")

# Opens argv[2] bare connections as uid argv[3], prints how many, holds them until a line on
# stdin, then reports what each got: an error frame (its code and message), EOF alone, or nothing
# yet (kept, waiting for hello). Imports before the drop: the interpreter lives under /root.
ATTACK = """
import collections, json, os, socket, sys
from inferd.shm import wire
path, n, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
conns, failed = [], 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
    except OSError:                         # EAGAIN: the backlog is full
        s.close()
        failed += 1
        continue
    conns.append(s)
print(json.dumps({"opened": len(conns), "failed": failed}), flush=True)
sys.stdin.readline()
kept, closed, codes, messages = 0, 0, collections.Counter(), set()
for s in conns:
    try:
        data = s.recv(65536)
    except BlockingIOError:
        kept += 1
        continue
    except OSError:
        data = b""
    replies = wire.FrameReader(wire.MAX_REPLY_FRAME).feed(data) if data else []
    if not replies:
        closed += 1
    for r in replies:
        codes[r["code"]] += 1
        messages.add(r["message"])
print(json.dumps({"kept": kept, "closed": closed, "codes": codes, "messages": sorted(messages)}), flush=True)
"""


class Attacker:
    """The ATTACK script as a process: ``start`` opens and holds, ``finish`` reports and exits."""

    def __init__(self, socket_path: str, n: int, uid: int = ATTACKER):
        self.proc = subprocess.Popen([sys.executable, "-c", ATTACK, socket_path, str(n), str(uid)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        self.opened = json.loads(line)["opened"]

    def finish(self) -> dict:
        """Report what each connection got, then exit (every connection closed); returns the report."""
        out, err = self.proc.communicate("go\n", timeout=60)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


class Victim:
    """A well-behaved client classifying the samples in a loop (on its own thread), each answer
    checked against the sample's true label, until ``stop``. Client-side cache lookups are off,
    so every answer crosses the daemon."""

    def __init__(self, socket_path: str):
        self.samples = sample_images()
        self.client = Client(socket_path, cache=False)
        self.answers, self.wrong, self.errors = 0, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for label, image in self.samples:
                try:
                    got = self.client.classify(image, top_k=1)[0].label
                except Exception as exc:   # recorded and asserted on by the test
                    self.errors.append(repr(exc))
                    return
                self.answers += 1
                if got != label:
                    self.wrong.append((label, got))

    def answered_more_than(self, n: int) -> bool:
        return self.answers > n

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()
        assert not self.errors and not self.wrong, (self.errors, self.wrong[:5])


@pytest.fixture
def door_daemon():
    """Start a daemon under ``prlimit --nofile=SOFT:HARD`` that uid 65534 and 4242 may reach;
    removed after the test."""
    started = []

    def start(*args: str, soft: int = LIMIT, hard: int = LIMIT) -> Daemon:
        workdir = short_dir()
        os.chmod(workdir, 0o755)            # the socket must be reachable by the attacker's uid
        prefix = f"inferdt{secrets.token_hex(4)}"
        d = Daemon.start(["--model", "shapes", "--device", "cpu:1", "--set", f'ring.shm_prefix="{prefix}"',
                          "--set", "model.warmup_batches=1", "--set", f'cache.path="{workdir}/results.cache"',
                          "--set", "server.socket_mode=0o666",
                          "--set", f"server.allow_uids=[{ATTACKER}, {OTHER_ATTACKER}]",
                          "--set", "server.hello_timeout_s=120", *args],   # the attack holds, not the timer
                         socket_path=os.path.join(workdir, "d.sock"), workdir=workdir,
                         wrapper=["prlimit", f"--nofile={soft}:{hard}", "--"])
        d.prefix, d.workdir = prefix, workdir
        started.append(d)
        return d

    yield start
    for d in started:
        d.cleanup()
        assert not shm_leftovers(d.prefix)


def admin(d, op: str) -> dict:
    with AdminClient(admin_path(d), timeout=10.0) as a:
        return a.call(op)


def door(d) -> dict:
    return admin(d, "stats")["door"]


def answered_within(d, bound: float = 1.0) -> float:
    """Seconds for a new client (root: not the attacker's uid) to connect and get an answer;
    asserts ``bound``."""
    label, image = sample_images()[0]
    t0 = time.monotonic()
    with Client(d.socket_path, cache=False, reconnect=False) as c:
        assert c.classify(image, top_k=1)[0].label == label
    took = time.monotonic() - t0
    print(f"a new client was answered {took * 1e3:.0f} ms after the attacker left")
    assert took < bound, f"a new client took {took:.2f} s to be answered"
    return took


def refused_frame(d) -> dict | None:
    """What a bare connection made now gets within 5 s: an error reply (turned away) or None
    (kept, waiting for hello)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5.0)
    try:
        s.connect(d.socket_path)
        try:
            data = s.recv(65536)
        except TimeoutError:
            return None
        replies = wire.FrameReader(wire.MAX_REPLY_FRAME).feed(data)
        return replies[0] if replies else {}
    finally:
        s.close()


@needs_root
@pytest.mark.timeout(240)
def test_one_uid_cannot_hold_the_door(door_daemon):
    d = door_daemon("--set", "server.max_prehello_per_uid=16", soft=LIMIT, hard=4 * LIMIT)
    # start-up raised the soft limit to the hard one, and said so
    assert re.search(r"Max open files\s+1024\s+1024", open(f"/proc/{d.pid}/limits").read())
    assert f"RLIMIT_NOFILE: soft limit raised from {LIMIT} to {4 * LIMIT} (the hard limit)" in d.log()
    victim = Victim(d.socket_path)
    attacker = Attacker(d.socket_path, 300)
    try:
        wait_until(lambda: door(d)["refused"].get("prehello_uid", 0) >= attacker.opened - 16, 30,
                   "the excess refused")
        answers = victim.answers
        wait_until(lambda: victim.answered_more_than(answers), 30, "the victim answered during the attack")
        health = admin(d, "health")
        assert health["ready"] and health["door"] is None, health     # open to every other uid
        answered_within(d, 5.0)                                        # another uid gets in meanwhile
        snap = door(d)
        assert snap["waiting_hello"] == 16 and snap["refused"] == {"prehello_uid": attacker.opened - 16}, snap
        report = attacker.finish()
        answered_within(d)
    finally:
        attacker.kill()
        victim.stop()
    assert report["kept"] == 16 and report["codes"] == {"overloaded": attacker.opened - 16}, report
    assert any("server.max_prehello_per_uid 16" in m for m in report["messages"]), report
    assert re.search(r"connection from pid \d+ uid 65534 refused: 16 of its connections have not said "
                     r"hello \(server\.max_prehello_per_uid 16\)", d.log())
    text = admin(d, "metrics")["text"]
    assert f'inferd_door_refused_total{{reason="prehello_uid"}} {float(attacker.opened - 16)}' in text
    assert victim.answers > 0
    assert d.stop() == 0


@needs_root
@pytest.mark.timeout(240)
def test_several_uids_cannot_fill_the_waiting_room(door_daemon):
    """Two attacker uids at max_prehello: each newcomer takes the place of the oldest connection
    of the uid holding the most, so a third uid still gets in."""
    d = door_daemon("--set", "server.max_prehello_per_uid=16", "--set", "server.max_prehello=24")
    first = Attacker(d.socket_path, 16, ATTACKER)
    second = None
    try:
        wait_until(lambda: door(d)["waiting_hello"] == 16, 30, "the first attacker's 16 waiting")
        second = Attacker(d.socket_path, 16, OTHER_ATTACKER)
        # 8 fit; 4 take the first's oldest places until both hold 12; the last 4 find their own
        # uid holding the most and are refused
        wait_until(lambda: door(d)["refused"].get("prehello_total", 0) == 4, 30, "the last 4 refused")
        assert door(d)["refused"] == {"evicted": 4, "prehello_total": 4}
        answered_within(d, 5.0)              # root gets in: the first attacker's oldest gives way
        snap = door(d)
        assert snap["waiting_hello"] == 23 and snap["refused"] == {"evicted": 5, "prehello_total": 4}, snap
        one, two = first.finish(), second.finish()
    finally:
        first.kill()
        if second is not None:
            second.kill()
    assert (one["kept"], one["closed"], one["codes"]) == (11, 5, {}), one
    assert (two["kept"], two["codes"]) == (12, {"overloaded": 4}), two
    assert "uid 4242 holding the most" in " ".join(two["messages"]), two
    assert "connection of uid 65534 waiting for hello closed to make room for uid 4242" in d.log()
    answered_within(d)
    assert d.stop() == 0


@needs_root
@pytest.mark.timeout(240)
def test_the_descriptor_reserve_keeps_the_admin_socket_and_the_door(door_daemon):
    """Bounds above what the descriptor limit holds: the door keeps none of the top
    server.reserved_fds descriptors, so the admin socket answers through the attack, health
    says not ready and why, and a newcomer is refused at once rather than left hanging."""
    d = door_daemon("--set", "server.max_prehello_per_uid=1000", "--set", "server.max_prehello=1000")
    assert "RLIMIT_NOFILE 256 is below the" in d.log()       # start-up warned about the bounds
    victim = Victim(d.socket_path)
    attacker = Attacker(d.socket_path, 400)
    try:
        wait_until(lambda: (lambda s: s["waiting_hello"] + s["refused"].get("descriptors", 0))(door(d))
                   >= attacker.opened, 30, "every attacker connection kept or refused")
        snap = door(d)
        assert snap["refused"]["descriptors"] > 0 and not snap["open"], snap
        assert LIMIT - 64 - 40 < snap["waiting_hello"] < LIMIT - 64, snap    # up to the reserve
        answers = victim.answers
        health = admin(d, "health")
        assert not health["ready"] and "only the reserve of file descriptors" in health["door"], health
        cli = subprocess.run([sys.executable, "-m", "inferd.client.cli", "--admin-socket", admin_path(d),
                              "health"], capture_output=True, text=True, timeout=30)
        assert cli.returncode == 1 and "new connections are refused: only the reserve" in cli.stdout, cli
        reply = refused_frame(d)             # a newcomer learns at once, not after a timeout
        assert reply and reply["code"] == "overloaded", reply
        wait_until(lambda: victim.answered_more_than(answers), 30, "the victim answered during the attack")
        report = attacker.finish()
        answered_within(d)
        wait_until(lambda: admin(d, "health")["ready"], 5, "ready again")
    finally:
        attacker.kill()
        victim.stop()
    assert report["kept"] + report["codes"].get("overloaded", 0) == attacker.opened, report
    assert "connection refused: it got descriptor" in d.log()
    text = admin(d, "metrics")["text"]
    assert re.search(r'inferd_door_refused_total\{reason="descriptors"\} [1-9]', text)
    assert "inferd_door_open 1.0" in text and f"inferd_door_fd_limit {float(LIMIT)}" in text
    assert d.stop() == 0


@needs_root
@pytest.mark.timeout(240)
def test_out_of_descriptors_the_door_backs_off_and_accepts_again(door_daemon):
    """No reserve: the attack drives accept into EMFILE. The door turns the pending connections
    away (a spare descriptor lets it accept and close them), backs off, and accepts again; the
    victim's session is untouched and a new client is answered within 1 s of the attacker leaving."""
    d = door_daemon("--set", "server.max_prehello_per_uid=1000", "--set", "server.max_prehello=1000",
                    "--set", "server.reserved_fds=0")
    victim = Victim(d.socket_path)
    attacker = Attacker(d.socket_path, 400)
    try:
        wait_until(lambda: "accept on the client socket failed: Too many open files" in d.log(), 30,
                   "accept meeting EMFILE")
        answers = victim.answers
        wait_until(lambda: victim.answered_more_than(answers), 30, "the victim answered during the attack")
        reply = refused_frame(d)             # one arriving now is turned away on the next try, told why
        assert reply and reply["code"] == "overloaded", reply
        assert "out of file descriptors" in reply["message"], reply
        report = attacker.finish()
        answered_within(d)
    finally:
        attacker.kill()
        victim.stop()
    assert report["kept"] > LIMIT // 2, report
    snap = door(d)
    assert snap["accept_errors"].get("EMFILE", 0) >= 1 and snap["open"], snap
    assert re.search(r"Too many open files \(RLIMIT_NOFILE 256, \d+ connections waiting for hello\); \d+ "
                     r"pending connections refused, accepting again in", d.log())
    assert re.search(r'inferd_door_accept_errors_total\{errno="EMFILE"\} [1-9]', admin(d, "metrics")["text"])
    assert admin(d, "health")["ready"]
    assert d.stop() == 0


@pytest.mark.timeout(60)
def test_an_unexpected_error_in_the_accept_loop_is_logged_and_the_loop_goes_on(caplog):
    """The door alone, on a real listening socket: the first connection's handshake cannot be
    started (a bug); that connection is closed, the error logged with its traceback, and the next
    connection is handed over as usual."""
    workdir = short_dir()
    path = os.path.join(workdir, "door.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    listener.setblocking(False)
    clients = []

    async def main():
        loop = asyncio.get_running_loop()
        spawned = asyncio.Queue()

        def spawn(conn, peer):
            if not spawned_any:
                spawned_any.append(True)
                raise RuntimeError("a bug in starting the handshake")
            task = loop.create_task(asyncio.sleep(0))
            spawned.put_nowait((conn, peer, task))
            return task

        spawned_any = []
        door_ = Door(listener, ServerConfig(), spawn, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        accept = loop.create_task(door_.run())
        try:
            for _ in range(2):
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.settimeout(10)
                c.connect(path)
                clients.append(c)
            conn, peer, task = await asyncio.wait_for(spawned.get(), 10)
            conn.close()
            await task
            await asyncio.sleep(0)        # noqa: sleep-ok: one turn, for the task's done callbacks
            assert peer[1] == os.geteuid() and door_.accept_errors == {"other": 1}
            assert door_.waiting == 0     # the one handed over finished; the failed one never counted
        finally:
            accept.cancel()
            await asyncio.gather(accept, return_exceptions=True)
        assert door_._spare is None       # released with the loop

    try:
        with caplog.at_level(logging.ERROR, logger="inferd.door"):
            asyncio.run(main())
        assert clients[0].recv(100) == b""                 # the first was closed, not leaked
        assert "accept loop: RuntimeError('a bug in starting the handshake')" in caplog.text
        assert "Traceback" in caplog.text
    finally:
        for c in clients:
            c.close()
        listener.close()
        os.unlink(path)
        os.rmdir(workdir)


NOTIFY_WITHOUT_DESCRIPTORS = """
import os, resource, socket, sys
from inferd.daemon.ops.sd_notify import notify
os.environ["NOTIFY_SOCKET"] = sys.argv[1]
held = []
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass                                    # every descriptor taken
print(notify("WATCHDOG=1"))
"""


@pytest.mark.timeout(60)
def test_notify_without_a_descriptor_drops_the_message(tmp_path):
    """Out of descriptors, sd_notify returns False instead of raising (which ended the watchdog
    task, and systemd would restart a daemon that was only short of descriptors)."""
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    try:
        out = subprocess.run([sys.executable, "-c", NOTIFY_WITHOUT_DESCRIPTORS, path],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    finally:
        listener.close()
