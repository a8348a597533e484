"""systemd integration: the units (verify, security), socket activation, the watchdog, journald
log lines, and the start-up error messages an operator reads first."""
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import ROOT, RUN, Clock, Daemon, sample_images, short_dir, wait_until
from inferd.client import Client
from inferd.daemon.ops import logs, sd_notify as notify, sd_watchdog as watchdog
from inferd.daemon.config import ConfigError, from_dict, parse_override
from inferd.daemon.front.listener import Listener, ListenerError

ANALYZE = shutil.which("systemd-analyze")
ACTIVATE = shutil.which("systemd-socket-activate")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed "
                                   "(Debian package systemd; .ci/run installs it)")
needs_activate = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed "
                                    "(Debian package systemd; .ci/run installs it)")


# units ----------------------------------------------------------------------------------------
def _install(stage: Path, home: Path) -> Path:
    """`make install-systemd` into ``stage`` with the venv at ``home``; the unit directory."""
    subprocess.run(["make", "-s", "-C", str(ROOT), "install-systemd", f"DESTDIR={stage}",
                    f"INFERD_HOME={home}"], check=True, capture_output=True, timeout=60)
    return stage / "usr/local/lib/systemd/system"


def _install_venv(home: Path, scratch: Path) -> None:
    """What `make install-venv` does, less the torch download: a venv at ``home`` and this project
    installed into it (pip install ., here from a wheel built without network)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True, timeout=60)
    pip = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(scratch), str(ROOT)],
                   check=True, capture_output=True, timeout=120)
    wheel, = scratch.glob("inferd-*.whl")
    subprocess.run([*pip, "--python", str(home / "bin/python"), "install", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=120)


def _verify(units: Path) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, "verify", str(units / "inferd.service"), str(units / "inferd.socket")],
                          capture_output=True, text=True, timeout=60)


@needs_analyze
@pytest.mark.timeout(300)
def test_units_verify_with_the_executable_the_install_creates(tmp_path):
    home, stage = tmp_path / "opt/inferd", tmp_path / "stage"
    units = _install(stage, home)
    service = (units / "inferd.service").read_text()
    assert f"ExecStart={home}/bin/inferd " in service
    # Documentation= names a file the install put there
    doc, = re.findall(r"^Documentation=file://(\S+)$", service, re.M)
    assert (stage / doc.lstrip("/")).is_file(), doc
    for name in ("sysusers.d/inferd.conf", "tmpfiles.d/inferd.conf"):
        assert (stage / "usr/local/lib" / name).is_file()
    assert (stage / "etc/inferd/inferd.toml").is_file()
    # before the venv exists, verify must fail on ExecStart: the check below can fail
    missing = _verify(units)
    assert missing.returncode != 0 and f"{home}/bin/inferd is not executable" in missing.stderr
    _install_venv(home, tmp_path / "wheel")
    out = _verify(units)
    assert out.returncode == 0 and out.stderr == "" and out.stdout == "", out.stderr + out.stdout


@needs_analyze
@pytest.mark.timeout(60)
def test_security_exposure_is_ok_and_gpus_stay_reachable():
    out = subprocess.run([ANALYZE, "security", "--offline=yes", str(ROOT / "systemd/inferd.service")],
                         capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for inferd\.service: (\d+\.\d+) (\w+)", out.stdout)
    assert level, out.stdout + out.stderr
    print("systemd-analyze security:", level.group(0))
    assert float(level.group(1)) <= 4.0 and level.group(2) == "OK", level.group(0)
    device_line = next(line for line in out.stdout.splitlines() if "DeviceAllow=" in line)
    assert "char-nvidia*:rw" in device_line
    unit = (ROOT / "systemd/inferd.service").read_text()
    assert re.search(r"^PrivateDevices=no$", unit, re.M) and re.search(r"^DevicePolicy=closed$", unit, re.M)


# socket activation, watchdog --------------------------------------------------------------------
@needs_activate
@pytest.mark.timeout(180)
def test_socket_activation_serves_a_client_and_leaves_the_path_to_systemd():
    workdir = short_dir()
    path = os.path.join(workdir, "act.sock")
    wrapper = [ACTIVATE, "-l", path, "-E", "NOTIFY_SOCKET", "-E", "PYTHONUNBUFFERED", "-E", "WATCHDOG_USEC"]
    prefix = f"inferdt{RUN}sa"                   # this run's token: the session-end leftover check
    d = Daemon.start(["--model", "shapes", "--device", "cpu:1", "--set", "model.warmup_batches=1",
                      "--set", f'cache.path="{workdir}/results.cache"', "--set", f'ring.shm_prefix="{prefix}"'],
                     socket_path=path, workdir=workdir, wait=False, env={"WATCHDOG_USEC": "1000000"},
                     wrapper=wrapper)
    d.prefix, d.workdir = prefix, workdir
    try:
        def activator_listens():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)       # the first connection starts the daemon (exec)
                return probe
            except OSError:
                probe.close()
                return None
        first = wait_until(activator_listens, timeout=30, what="systemd-socket-activate listening")
        d.wait_notify("MAINPID=")         # the daemon's own READY=1 (the activator may send one too)
        first.close()
        label, image = sample_images()[0]
        with Client(path) as client:
            assert client.classify(image, top_k=1)[0].label == label
        assert "WATCHDOG=1" in d.wait_notify("WATCHDOG=1", timeout=30)
        inode = os.stat(path).st_ino
        assert d.stop() == 0, d.log()
        # systemd owns the path: the daemon left it (same inode), still a socket
        assert stat.S_ISSOCK(os.stat(path).st_mode) and os.stat(path).st_ino == inode
        assert "not on server.socket" not in d.log()
    finally:
        d.cleanup()


@pytest.mark.timing
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_device_out_of_rotation_does_not_stop_the_pings(tmp_path):
    import json

    import numpy as np

    workdir = short_dir()
    control = tmp_path / "synthetic.json"
    control.write_text(json.dumps({"fault": {}}))
    d = Daemon.start(["--model", "synthetic", "--device", "cpu:1", "--device", "cpu:1",
                      "--set", "model.warmup_batches=1", "--set", "cache.enabled=false",
                      "--set", "health.backoff_s=60", "--set", "health.backoff_max_s=60",
                      "--set", f'ring.shm_prefix="inferdt{RUN}wd"'],
                     socket_path=os.path.join(workdir, "d.sock"), workdir=workdir,
                     env={"WATCHDOG_USEC": "1000000", "INFERD_SYNTHETIC": str(control)})
    d.prefix, d.workdir = f"inferdt{RUN}wd", workdir
    try:
        control.write_text(json.dumps({"fault": {"1": "hang"}}))     # device 1's batches now hang
        frames = [np.full((16, 16, 3), 28 * (i % 10), np.uint8) for i in range(40)]
        with Client(d.socket_path) as client:
            answers = client.classify_many(frames, top_k=1)        # device 1's share moves to device 0
        assert [a[0].label for a in answers] == [f"level_{i % 10}" for i in range(40)]
        # health took device 1 out (it stays out: backoff 60 s) and the pings go on
        status = d.wait_notify("1 of 2 devices in rotation", timeout=30)
        assert "WATCHDOG=1" in status and "withheld" not in status, status
        assert "WATCHDOG=1" in d.wait_notify("WATCHDOG=1", timeout=10)
        assert "not sending WATCHDOG=1" not in d.log()
        control.write_text(json.dumps({"fault": {}}))               # let the hung batch return
        assert d.stop() == 0, d.log()
    finally:
        d.cleanup()


def test_listen_fds_for_another_process_are_not_taken_but_are_cleared():
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "x", "OTHER": "1"}
    assert Listener.from_systemd(env) is None
    assert env == {"OTHER": "1"}
    assert Listener.from_systemd({}) is None


def test_more_than_one_passed_socket_is_refused():
    env = {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid())}
    with pytest.raises(ListenerError, match="LISTEN_FDS=2 .* exactly one"):
        Listener.from_systemd(env)
    assert env == {}


@pytest.mark.parametrize("kind", ["datagram", "not listening", "file"])
def test_an_inherited_descriptor_that_is_no_listening_stream_socket_is_named(tmp_path, kind):
    if kind == "file":
        holder = open(tmp_path / "f", "wb")
        message = "is not a socket"
    else:
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM if kind == "datagram" else socket.SOCK_STREAM)
        holder.bind(str(tmp_path / "s"))
        message = "AF_UNIX datagram socket" if kind == "datagram" else "stream socket that is not listening"
    with holder, pytest.raises(ListenerError, match=message):
        Listener.inherited_fd(holder.fileno())


def test_an_inherited_listener_serves_and_never_unlinks(tmp_path):
    path = str(tmp_path / "s")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    manager.bind(path)
    manager.listen()
    listener = Listener.inherited_fd(os.dup(manager.fileno()))
    assert listener.inherited and listener.path == path
    assert not os.get_inheritable(listener.sock.fileno())
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    listener.sock.setblocking(True)
    conn, _ = listener.sock.accept()
    conn.close(), client.close()
    listener.close()
    listener.close()
    assert os.path.exists(path)
    manager.close()


def test_watchdog_interval_follows_sd_watchdog_enabled():
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert notify.watchdog_interval({}) is None


# the watchdog decision ----------------------------------------------------------------------------
class FakeThread:
    def __init__(self, alive=True):
        self._alive = alive

    def is_alive(self):
        return self._alive


def fake_device(label="cpu#0", state="healthy", beat=100.0, running_since=None, size=0, alive=True):
    return SimpleNamespace(label=label, state=state, beat=beat, running_since=running_since,
                           running_size=size, collector=FakeThread(), executor=FakeThread(alive), frames=0)


def bound(dev, size):
    return 1.0                            # health's watchdog bound: 1 s for any batch


def test_idle_devices_that_beat_are_progress():
    devs = [fake_device("cpu#0", beat=99.95), fake_device("cpu#1", beat=99.9)]
    assert watchdog.stalls(devs, 100.0, bound=bound, max_delay=0.002) == []


def test_a_batch_within_its_bound_is_progress_even_without_a_beat():
    dev = fake_device(beat=90.0, running_since=99.5, size=8)
    assert watchdog.stalls([dev], 100.0, bound=bound, max_delay=0.002) == []


def test_a_batch_just_past_its_bound_is_left_to_health():
    """Health takes a stuck device out within its bound and a tick, on the loop the watchdog runs
    on too; on a loaded host the watchdog's look may come first, and must not blame it."""
    assert watchdog.stalls([fake_device(beat=90.0, running_since=98.5, size=8)], 100.0, bound=bound,
                           max_delay=0.002) == []
    assert watchdog.stalls([fake_device(beat=90.0, running_since=97.9, size=8)], 100.0, bound=bound,
                           max_delay=0.002) != []


def test_a_stuck_in_rotation_device_withholds_the_ping():
    dev = fake_device(beat=90.0, running_since=97.0, size=8)
    reasons = watchdog.stalls([dev], 100.0, bound=bound, max_delay=0.002)
    assert reasons == ["cpu#0: batch of 8 running for 3.0 s, past its bound of 1.0 s"]


def test_a_dead_thread_of_an_in_rotation_device_withholds_the_ping():
    dev = fake_device(alive=False)
    assert watchdog.stalls([dev], 100.0, bound=bound, max_delay=0.002) == [
        "cpu#0: its device thread has exited"]


def test_a_silent_thread_outside_a_batch_withholds_the_ping():
    # limit: bound(1 s) + max_delay + IDLE_TIMEOUT + SLACK = 2.102 s after the last beat
    assert watchdog.stalls([fake_device(beat=98.0)], 100.0, bound=bound, max_delay=0.002) == []
    reasons = watchdog.stalls([fake_device(beat=97.5)], 100.0, bound=bound, max_delay=0.002)
    assert len(reasons) == 1 and "silent for 2.5 s" in reasons[0]


def test_during_a_model_swap_a_silent_thread_is_loading_but_a_dead_one_still_counts():
    silent = fake_device(beat=90.0)
    assert watchdog.stalls([silent], 100.0, bound=bound, max_delay=0.002, loading=True) == []
    assert watchdog.stalls([silent], 100.0, bound=bound, max_delay=0.002) != []
    dead = fake_device(alive=False)
    assert watchdog.stalls([dead], 100.0, bound=bound, max_delay=0.002, loading=True) != []


@pytest.mark.parametrize("state", ["out", "probing"])
def test_devices_out_of_rotation_are_ignored(state):
    stuck = fake_device("cpu#1", state=state, beat=0.0, running_since=10.0, size=4, alive=False)
    assert watchdog.stalls([fake_device(), stuck], 100.0, bound=bound, max_delay=0.002) == []


class FakeServer:
    def __init__(self, devices):
        self.devices = devices
        self.draining = False
        self.sessions = {1: None, 2: None}
        self.cfg = SimpleNamespace(batching=SimpleNamespace(max_delay_ms=2.0))
        self.scheduler = SimpleNamespace(health=SimpleNamespace(bound=bound))
        self.model = SimpleNamespace(spec=SimpleNamespace(name="shapes"), digest="1a2b3c4d5e6f7a8b9c")


def test_the_task_pings_only_while_progress_is_made_and_looks_again_soon_after_a_miss():
    clock, sent = Clock(100.0), []
    dev = fake_device()
    dog = watchdog.Watchdog(FakeServer([dev]), 30.0, clock=clock, send=lambda s: sent.append(s) or True)
    assert dog.tick() == 5.0 and sent[-1].startswith("WATCHDOG=1\nSTATUS=serving shapes (digest 1a2b3c4d5e6f)")
    assert "2 sessions" in sent[-1] and "1 of 1 devices in rotation" in sent[-1]
    dev.collector._alive = False
    clock.now += 5.0
    sent.clear()
    assert dog.tick() == watchdog.MISS_RETRY
    assert sent and all("WATCHDOG=1" not in s for s in sent)
    assert "watchdog withheld: cpu#0: its device thread has exited" in sent[-1]
    dev.state = "out"                     # health took it out: no reason to restart the daemon
    clock.now += 1.0
    sent.clear()
    assert dog.tick() == 5.0 and sent == ["WATCHDOG=1"]      # STATUS= waits its 5 s
    clock.now += 5.0
    dog.tick()
    assert sent[-1].startswith("WATCHDOG=1\nSTATUS=") and "0 of 1 devices in rotation" in sent[-1]


def test_a_thread_that_has_not_beaten_since_ready_counts_from_ready():
    """The task starts at READY=1, when every device thread has just warmed up: one slow to take
    its first batch on a loaded host has not beaten yet, and is silent only from READY on."""
    clock, sent = Clock(100_000.0), []
    dev = fake_device(beat=0.0)
    dog = watchdog.Watchdog(FakeServer([dev]), 2.0, clock=clock, send=sent.append)
    assert dev.beat == 100_000.0
    assert dog.tick() == 1.0 and sent[-1].startswith("WATCHDOG=1")
    clock.now += 3.0                                      # never beat since: past bound + SLACK
    sent.clear()
    dog.tick()
    assert dog.missing == ["cpu#0: device thread silent for 3.0 s (limit 2.1 s)"]
    assert all("WATCHDOG=1" not in s for s in sent)


def test_while_draining_only_the_loop_counts():
    clock, sent = Clock(100.0), []
    server = FakeServer([fake_device(alive=False)])
    server.draining = True
    dog = watchdog.Watchdog(server, 2.0, clock=clock, send=sent.append)
    assert dog.tick() == 1.0 and sent[-1].startswith("WATCHDOG=1\nSTATUS=draining shapes")


def test_status_alone_without_a_watchdog():
    clock, sent = Clock(100.0), []
    dog = watchdog.Watchdog(FakeServer([fake_device(alive=False)]), None, clock=clock, send=sent.append)
    assert dog.tick() == watchdog.STATUS_EVERY and sent[-1].startswith("STATUS=serving")


# logs ---------------------------------------------------------------------------------------------
def _journal_env(fileobj) -> dict:
    st = os.fstat(fileobj.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_journal_lines_carry_the_priority_and_no_time(tmp_path):
    with open(tmp_path / "err", "w") as stream:
        assert logs.stderr_is_journal(_journal_env(stream), stream)
        assert not logs.stderr_is_journal({"JOURNAL_STREAM": "1:2"}, stream)
        assert not logs.stderr_is_journal({}, stream)
    record = logging.LogRecord("inferd.health", logging.WARNING, __file__, 1, "a\nb", (), None)
    assert logs.JournalFormatter().format(record) == "<4>inferd.health: a\n<4>b"   # each line keeps it
    assert [logs.priority(level) for level in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("journal", [True, False])
def test_the_daemon_logs_for_the_journal_only_when_stderr_is_the_journal(tmp_path, journal):
    taken = tmp_path / "taken"
    taken.write_text("")                  # not a socket: start-up fails with one ERROR line, exit 69
    with open(tmp_path / "err", "w") as err:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        env.update(_journal_env(err) if journal else {})
        rc = subprocess.run([sys.executable, "-m", "inferd.daemon", "--socket", str(taken)], stderr=err,
                            env=env, timeout=60).returncode
    text = (tmp_path / "err").read_text()
    assert rc == 69
    if journal:
        assert text.startswith(f"<3>inferd: {taken} exists and is not a socket"), text
    else:
        assert re.match(rf"\d{{4}}-\d\d-\d\d [\d:,]+ ERROR inferd: {taken} exists", text), text


def test_rate_limited_log_counts_what_it_held_back(caplog):
    clock = Clock(0.0)
    limited = logs.RateLimitedLog(logging.getLogger("test.ratelimit"), interval=10.0, clock=clock)
    caplog.set_level(logging.INFO, logger="test.ratelimit")
    assert limited.info("refused %d", 1)
    for i in range(5):
        clock.now += 1.0
        assert not limited.info("refused %d", i)
    clock.now = 10.0
    assert limited.info("refused %d", 7)
    lines = [r.getMessage() for r in caplog.records if r.name == "test.ratelimit"]
    assert lines == ["refused 1", "refused 7 (5 more like this since the previous one, not logged)"]


# start-up error messages ------------------------------------------------------------------------
def test_a_missing_model_file_is_named():
    with pytest.raises(ConfigError, match="model.path: /nope.pt2 does not exist"):
        from_dict({}, {"model.path": "/nope.pt2"})
    with pytest.raises(ConfigError, match="model.path: / is not a file"):
        from_dict({}, {"model.path": "/"})


def test_a_socket_path_too_long_for_af_unix_is_named():
    path = "/tmp/" + "s" * 103                 # 108 bytes
    with pytest.raises(ConfigError, match=r"socket path is 108 bytes; AF_UNIX allows at most 107: "
                                          r"choose a shorter server.socket / --socket"):
        from_dict({}, {"server.socket": path})
    with pytest.raises(ListenerError, match="socket path is 108 bytes"):
        Listener.bind(path, 0o600)
    from_dict({}, {"server.socket": "/tmp/" + "s" * 97, "server.admin_socket": "/tmp/a.sock"})  # 102: fine


@pytest.mark.timeout(60)
def test_a_too_long_socket_path_stops_the_daemon_with_exit_78():
    path = os.path.join(short_dir(), "s" * 110)
    out = subprocess.run([sys.executable, "-m", "inferd.daemon", "--socket", path], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 78 and "AF_UNIX allows at most 107: choose a shorter server.socket" in out.stderr


@pytest.mark.parametrize("text, value", [
    ("model.builtin=resnet18", "resnet18"), ("model.path=/srv/models/m.pt2", "/srv/models/m.pt2"),
    ("batching.max_batch=16", 16), ("model.mean=[0.5, 0.5, 0.5]", [0.5, 0.5, 0.5]),
    ('server.socket=""', ""),
])
def test_set_takes_toml_and_bare_words(text, value):
    assert parse_override(text)[1] == value


@pytest.mark.parametrize("text", ["batching.max_batch=[1,", "model.mean=[0.5", "server.socket=", "model.labels=a b"])
def test_set_values_that_are_not_toml_are_refused(text):
    with pytest.raises(ConfigError, match=re.escape(f"--set {text}: not a TOML value: ")):
        parse_override(text)


@pytest.mark.timeout(20)
def test_notify_never_blocks_when_the_manager_stops_reading(tmp_path, monkeypatch):
    """A manager that stops reading fills its datagram queue; notify runs on the event loop, so it
    must drop the message rather than wait (this froze long benchmark runs, whose launcher reads
    only up to READY=1, after about ten STATUS= lines)."""
    import socket as socketmod

    from inferd.daemon.ops.sd_notify import notify

    path = str(tmp_path / "notify")
    manager = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_DGRAM)
    manager.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        told = [notify(f"STATUS=line {i}") for i in range(2000)]
    finally:
        manager.close()
    assert told[0] is True
    assert told[-1] is False                 # the queue is full: dropped, not waited for
