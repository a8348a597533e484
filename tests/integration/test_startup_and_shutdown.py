"""Start-up and shutdown: socket path rules, configuration errors, draining, and a killed daemon."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

from helpers import RawClient, sample_images, shm_leftovers, short_dir, wait_until
from inferd.client import Client, DaemonUnavailable
from inferd.shm import wire

pytestmark = pytest.mark.timeout(180)

FRAME = np.zeros((64, 64, 3), np.uint8)


def _run_daemon(*args, timeout=120):
    """A daemon run to its exit, with a cache file of its own (never the system default)."""
    cache = ["--set", f'cache.path="{short_dir()}/results.cache"']
    return subprocess.run([sys.executable, "-m", "inferd.daemon", "--device", "cpu:1", *cache, *args],
                          capture_output=True, text=True, timeout=timeout)


def test_sigterm_finishes_admitted_work_then_exits_cleanly(fresh_daemon):
    # resnet50 with batches of 2: 32 admitted requests take several batches to finish.
    d = fresh_daemon("--set", "batching.max_batch=2", "--set", "server.drain_timeout_s=120", model="resnet50")
    c = RawClient(d.socket_path, ring_slots=32)
    try:
        frame = np.full((64, 64, 3), 3, np.uint8)
        for i in range(32):
            c.classify(i, i, frame)
        c.send({"op": "ping", "id": 100})           # its pong proves all 32 were admitted
        replies = [c.recv()]
        while replies[-1]["id"] != 100:
            replies.append(c.recv())
        d.proc.send_signal(signal.SIGTERM)
        d.wait_notify("STOPPING=1")
        while (r := c.recv()) is not None:
            replies.append(r)
        assert d.proc.wait(120) == 0, d.log()
    finally:
        c.close()
    answered = {r["id"]: r for r in replies}
    lost = {i: answered.get(i) for i in range(32) if not (answered.get(i, {}).get("ok") and len(answered[i]["top"]) == 5)}
    assert not lost, ("admitted work lost", lost, d.log()[-20000:])
    assert not os.path.exists(d.socket_path)
    assert not shm_leftovers(d.prefix)
    assert "SIGTERM: draining" in d.log() and "stopped" in d.log()


def test_requests_during_drain_are_refused_with_shutting_down(fresh_daemon):
    """A request sent during the drain, on a free slot, gets shutting_down; the one admitted before
    the SIGTERM is still answered. The admitted request is held in its batch (the synthetic model's
    ``hang`` fault) until the refusal has come back, so the drain cannot end first."""
    from inferd.daemon.models.zoo.synthetic import level_of

    workdir = short_dir()
    control = os.path.join(workdir, "synthetic.json")

    def fault(what):
        with open(control + ".tmp", "w") as fh:
            json.dump({"fault": {"0": what}}, fh)
        os.replace(control + ".tmp", control)

    fault("none")
    os.environ["INFERD_SYNTHETIC"] = control                 # inherited by the daemon
    try:
        d = fresh_daemon("--set", "server.drain_timeout_s=120", "--set", "health.watchdog_floor_s=120",
                         "--set", "cache.enabled=false", model="synthetic", workdir=workdir)
    finally:
        del os.environ["INFERD_SYNTHETIC"]
    frame = np.full((16, 16, 3), 200, np.uint8)
    c = RawClient(d.socket_path, ring_slots=2)
    try:
        fault("hang")
        c.classify(1, 0, frame)
        c.send({"op": "ping", "id": 50})                     # its pong proves request 1 was admitted
        assert c.recv()["id"] == 50
        d.proc.send_signal(signal.SIGTERM)
        d.wait_notify("STOPPING=1")
        c.classify(2, 1, frame)                              # slot 1 is free: only the drain refuses it
        refused = c.recv()
        fault("none")                                        # let request 1 finish, and the drain end
        replies = []
        while (r := c.recv()) is not None:
            replies.append(r)
    finally:
        fault("none")
        c.close()
    assert refused["id"] == 2 and refused["code"] == wire.E_SHUTTING_DOWN, refused
    assert [r["id"] for r in replies] == [1] and replies[0]["ok"], replies
    assert replies[0]["top"][0][0] == level_of(200)
    assert d.proc.wait(120) == 0, d.log()


def test_stale_socket_is_replaced_and_a_file_is_not(fresh_daemon):
    workdir = short_dir()
    path = os.path.join(workdir, "stale.sock")
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(path)                 # bound, never listening, then closed: a crashed daemon's leftover
    leftover.close()
    d = fresh_daemon(socket_path=path, workdir=workdir)
    with Client(path) as client:
        assert client.ping() > 0
    assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert d.stop(signal.SIGINT) == 0 and not os.path.exists(path)     # SIGINT drains like SIGTERM

    regular = os.path.join(workdir, "file.sock")
    open(regular, "w").close()
    out = _run_daemon("--socket", regular)
    assert out.returncode == 69 and f"{regular} exists and is not a socket" in out.stderr
    assert os.path.exists(regular)


def test_a_live_daemon_on_the_path_is_named_and_kept(daemon):
    out = _run_daemon("--socket", daemon.socket_path)
    assert out.returncode == 69
    assert f"another daemon answers on {daemon.socket_path}" in out.stderr
    with Client(daemon.socket_path) as client:        # the first daemon is untouched
        assert client.ping() > 0


@pytest.mark.parametrize("args, message", [
    (["--set", "batching.max_batch=0"], "batching.max_batch: 0 is out of range; allowed 1 to 4096"),
    (["--model", "nosuchmodel"], "model.builtin: 'nosuchmodel' is not one of shapes, resnet18, resnet50, noop"),
    (["--model", "/nonexistent/model.pt"], "model.path: /nonexistent/model.pt does not exist"),
    (["--device", "gpu7"], "device[0].name: 'gpu7' is not cpu or cuda:N"),
])
def test_configuration_errors_exit_78_naming_the_key(args, message):
    workdir = short_dir()
    out = _run_daemon("--socket", os.path.join(workdir, "d.sock"), *args)
    assert out.returncode == 78, out.stderr
    assert message in out.stderr
    assert not os.path.exists(os.path.join(workdir, "d.sock"))


def test_usage_error_exits_64():
    out = _run_daemon("--no-such-flag")
    assert out.returncode == 64 and "unrecognized arguments: --no-such-flag" in out.stderr


def test_no_daemon_means_daemon_unavailable():
    with pytest.raises(DaemonUnavailable, match="no inferd daemon answers on"):
        Client(os.path.join(short_dir(), "none.sock"), connect_timeout=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["memfd", "posix"])
def test_daemon_sigkilled_mid_request(fresh_daemon, backend):
    """The client waiting on a reply raises DaemonUnavailable at once (EOF), nothing is left in
    /dev/shm, and a new daemon takes over the stale socket path."""
    d = fresh_daemon("--set", f'ring.backend="{backend}"', model="resnet50")
    client = Client(d.socket_path, ring_slots=64, reconnect=False)
    errors = []

    def flood():
        try:
            client.classify_many([FRAME] * 5000)
        except DaemonUnavailable as exc:
            errors.append(exc)
    t = threading.Thread(target=flood)
    t.start()
    with Client(d.socket_path) as watcher:
        wait_until(lambda: watcher.info()["outstanding"] > 0, what="requests in flight")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(30)
    t.join(30)
    client.close()
    assert not t.is_alive() and len(errors) == 1 and "closed the connection" in str(errors[0])
    assert not shm_leftovers(d.prefix)
    successor = fresh_daemon(socket_path=d.socket_path, workdir=d.workdir)
    label, image = sample_images()[2]
    with Client(successor.socket_path) as c:
        assert c.classify(image)[0].label == label
    assert successor.stop() == 0


@pytest.mark.slow
def test_posix_backend_serves_and_leaves_no_names(fresh_daemon):
    d = fresh_daemon("--set", 'ring.backend="posix"')
    label, image = sample_images()[4]
    with Client(d.socket_path) as c:
        assert c.classify(image)[0].label == label
        assert not shm_leftovers(d.prefix)           # the name went away before the reply
        assert d.ring_maps() == 1
    assert d.stop() == 0
