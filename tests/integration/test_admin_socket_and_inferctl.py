"""The admin socket and inferctl: health, stats, metrics, reload, drain, flush, devices, access.

Real daemons, real sockets, real client processes. What each bad admin input gets is said in the
test that sends it.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import TESTS, RawClient, admin_path, sample_images, short_dir, spawn_daemon, wait_until
from inferd.client import AdminClient, Client, ProtocolError, ReloadFailed
from inferd.client.errors import InvalidInput, PermissionDenied
from inferd.shm import wire

pytestmark = pytest.mark.timeout(180)

SHAPES_LABELS = {"circle", "square", "triangle", "star", "stripes", "cross", "ring", "ellipse"}


def inferctl(*args, env=None, timeout=60, input=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferd.client.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, input=input)


# access -----------------------------------------------------------------------------------------
def test_admin_socket_is_owner_only_and_beside_the_client_socket(daemon):
    path = admin_path(daemon)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    with AdminClient(path) as admin:
        health = admin.call("health")
    assert health["state"] == "ready" and health["ready"] and health["in_rotation"] == 1
    assert health["model"]["name"] == "shapes" and health["pid"] == daemon.pid


def _as_nobody(script: str, *args, groups=()) -> subprocess.CompletedProcess:
    """Run ``script`` as uid/gid 65534 with supplementary ``groups`` (imports done as root first:
    the interpreter's files may be under root-only /root)."""
    prelude = ("import os, sys\nfrom inferd.client import AdminClient, PermissionDenied\n"
               f"os.setgroups({list(groups)!r}); os.setgid(65534); os.setuid(65534)\n")
    return subprocess.run([sys.executable, "-c", prelude + script, *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_other_users_are_refused_by_credentials_not_only_file_mode(fresh_daemon):
    d = fresh_daemon()
    os.chmod(d.workdir, 0o755)
    os.chmod(admin_path(d), 0o666)     # past the file mode: the kernel's peer credentials decide
    out = _as_nobody("try:\n    AdminClient(sys.argv[1]).call('flush_cache')\n"
                     "except PermissionDenied as e:\n    print('denied:', e)\n", admin_path(d))
    assert "denied: uid 65534 may not use the admin socket" in out.stdout, out.stderr
    with AdminClient(admin_path(d)) as admin:                          # the daemon is unharmed
        assert admin.call("health")["ready"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_admin_group_members_by_supplementary_group(fresh_daemon):
    group = 4242                                       # a gid nobody has as primary group
    d = fresh_daemon("--set", f'server.admin_group="{group}"')
    os.chmod(d.workdir, 0o755)
    st = os.stat(admin_path(d))
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group
    member = _as_nobody("print(AdminClient(sys.argv[1]).call('health')['state'])\n", admin_path(d),
                        groups=(group,))
    assert member.stdout.strip() == "ready", member.stderr
    outsider = _as_nobody("try:\n    AdminClient(sys.argv[1]).call('health')\n"
                          "except PermissionDenied as e:\n    print('denied')\n", admin_path(d))
    assert outsider.stdout.strip() == "denied", outsider.stderr


def test_unknown_admin_group_stops_start_up_naming_the_key():
    with pytest.raises(Exception) as info:
        spawn_daemon("--set", 'server.admin_group="no-such-group-here"')
    assert "server.admin_group" in str(info.value) and "no group named" in str(info.value)


def test_bad_admin_requests_get_typed_errors(daemon):
    with AdminClient(admin_path(daemon)) as admin:
        with pytest.raises(ProtocolError, match="unknown op 'classify'; admin ops are"):
            admin.call("classify")                                 # unknown_op, names the ops
        with pytest.raises(InvalidInput, match="index 7 is out of range"):
            admin.call("device", index=7, action="disable")        # invalid_input
        with pytest.raises(InvalidInput, match="action 'pause' is not disable or enable"):
            admin.call("device", index=0, action="pause")
        with pytest.raises(InvalidInput, match="model must be"):
            admin.call("reload", model=12)
        assert admin.call("health")["ready"]                       # the connection goes on
    raw = RawClient(admin_path(daemon), hello=False)
    try:
        raw.send_raw(wire.HEADER.pack(1 << 20) + b"x")              # frame over 64 KiB: closed
        reply = raw.recv()
        assert reply["code"] == wire.E_FRAME_TOO_LARGE
        assert raw.recv() is None
    finally:
        raw.close()


def test_client_socket_no_longer_flushes_the_cache(daemon):
    c = RawClient(daemon.socket_path)
    try:
        c.send({"op": "flush_cache", "id": 5})
        reply = c.recv()
    finally:
        c.close()
    assert reply["code"] == wire.E_UNKNOWN_OP and "admin socket" in reply["message"]


# inferctl ---------------------------------------------------------------------------------------
def test_inferctl_stats_metrics_top_json(daemon):
    images = [img for _, img in sample_images()]
    with Client(daemon.socket_path, cache=False) as c:
        c.classify_many(images)
    env = {"INFERD_SOCKET": daemon.socket_path}
    stats = inferctl("stats", env=env)
    assert stats.returncode == 0, stats.stderr
    assert "cpu#0" in stats.stdout and "latency" in stats.stdout
    snap = json.loads(inferctl("stats", "--json", env=env).stdout)
    assert snap["devices"][0]["frames"] >= len(images)
    metrics = inferctl("metrics", env=env)
    assert metrics.returncode == 0 and "# TYPE inferd_" in metrics.stdout
    top = inferctl("top", "--iterations", "2", "--interval", "0.1", env=env)
    assert top.returncode == 0 and top.stdout.count("frames/s") == 2, top.stderr


def test_inferctl_broken_pipe_exits_quietly(daemon):
    out = subprocess.run(f"set -o pipefail; {sys.executable} -m inferd.client.cli metrics | head -1",
                         shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60,
                         env={**os.environ, "INFERD_SOCKET": daemon.socket_path})
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith("#")


def test_inferctl_errors_name_flags_and_environment():
    missing = os.path.join(short_dir(), "none.sock")
    out = inferctl("health", env={"INFERD_SOCKET": missing})
    assert out.returncode == 69
    assert "--admin-socket / $INFERD_ADMIN_SOCKET" in out.stderr and "socket_path=" not in out.stderr
    out = inferctl("ping", env={"INFERD_SOCKET": missing})
    assert out.returncode == 69 and "--socket / $INFERD_SOCKET" in out.stderr
    out = inferctl("classify", "-k", "0", "x.png")
    assert out.returncode == 2 and "-k/--top-k" in out.stderr
    out = inferctl("--timeout", "-1", "ping")
    assert out.returncode == 2 and "--timeout" in out.stderr


@pytest.mark.timeout(240)
def test_start_wait_ping_verbatim():
    """`inferd & inferctl health --wait && inferctl ping`, word for word, with the socket and the
    cache moved by the environment only."""
    work = short_dir()
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "INFERD_SOCKET": os.path.join(work, "d.sock"), "CACHE_DIRECTORY": work,
           "PATH": f"{bindir}:{os.environ['PATH']}"}
    script = "inferd & inferctl health --wait && inferctl ping; status=$?; kill -TERM %1; wait %1; exit $status"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=200, env=env, cwd=work)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ready:" in out.stdout and "pong from" in out.stdout


def test_health_exit_code_follows_readiness(fresh_daemon):
    d = fresh_daemon()
    env = {"INFERD_SOCKET": d.socket_path}
    assert inferctl("health", env=env).returncode == 0
    assert inferctl("device", "disable", "0", env=env).returncode == 0
    out = inferctl("health", "--json", env=env)
    assert out.returncode == 1 and json.loads(out.stdout)["in_rotation"] == 0
    assert inferctl("device", "enable", "0", env=env).returncode == 0
    assert inferctl("health", env=env).returncode == 0


# devices, drain, flush --------------------------------------------------------------------------
def test_device_disable_moves_work_and_enable_brings_it_back(fresh_daemon):
    d = fresh_daemon("--device", "cpu:1", "--device", "cpu:1", "--set", "cache.enabled=false")
    images = [img for _, img in sample_images()]
    with AdminClient(admin_path(d)) as admin, Client(d.socket_path, cache=False) as c:
        reply = admin.call("device", index=0, action="disable")
        assert reply["device"]["state"] == "disabled" and reply["in_rotation"] == 1
        before = admin.call("stats")["devices"]
        for _ in range(5):
            c.classify_many(images)
        after = admin.call("stats")["devices"]
        assert after[0]["frames"] == before[0]["frames"]             # nothing ran on device 0
        assert after[1]["frames"] >= before[1]["frames"] + 5 * len(images)
        health = admin.call("health")
        assert [x["state"] for x in health["devices"]] == ["disabled", "healthy"]
        assert admin.call("device", index=0, action="enable")["device"]["state"] == "healthy"
        assert admin.call("health")["in_rotation"] == 2


def test_admin_drain_stops_the_daemon_cleanly(fresh_daemon):
    d = fresh_daemon()
    with AdminClient(admin_path(d)) as admin:
        assert admin.call("drain")["draining"] is True
    assert d.proc.wait(60) == 0
    assert not os.path.exists(d.socket_path) and not os.path.exists(admin_path(d))


# model swap -------------------------------------------------------------------------------------
def test_reload_switches_the_model_and_the_cache_never_answers_for_the_old_one(fresh_daemon):
    d = fresh_daemon()
    (_, img), *_ = sample_images()
    with Client(d.socket_path) as c, AdminClient(admin_path(d)) as admin:
        first = c.classify(img, top_k=1)
        assert first[0].label in SHAPES_LABELS and c.model.gen == 1
        assert c.classify(img, top_k=1) == first and c.cache_hits == 1    # cached, answered here
        reply = admin.call("reload", model="resnet18")
        assert reply["changed"] and reply["model"]["gen"] == 2 and reply["model"]["name"] == "resnet18"
        swapped = c.classify(img, top_k=1)
        assert swapped[0].label.startswith("class_"), swapped           # not the cached shapes answer
        assert c.model.name == "resnet18" and c.model.gen == 2 and len(c.labels()) == 1000
        assert c.classify(img, top_k=1)[0].index == swapped[0].index     # and resnet's is cached now
        with Client(d.socket_path) as late:                                # a new session: the new model
            assert late.model.name == "resnet18" and late.model.gen == 2
        again = admin.call("reload", model="resnet18")
        assert again["changed"] is False                                    # same digest: nothing to do
        stats = admin.call("stats")
        assert stats["reloads"]["ok"] >= 1


def test_failed_reload_keeps_the_old_model_serving(fresh_daemon):
    d = fresh_daemon()
    (_, img), *_ = sample_images()
    with Client(d.socket_path, cache=False) as c, AdminClient(admin_path(d)) as admin:
        before = c.classify(img, top_k=1)
        with pytest.raises(ReloadFailed, match="model.path: /nonexistent/model.pt2 does not exist"):
            admin.call("reload", model="/nonexistent/model.pt2")
        with pytest.raises(ReloadFailed, match="a new input size needs a restart"):
            admin.call("reload", model="noop")                          # 32x32 frames, not 64x64
        assert c.classify(img, top_k=1) == before
        health = admin.call("health")
        assert health["model"]["gen"] == 1 and health["model"]["name"] == "shapes"
        assert admin.call("stats")["reloads"]["failed"] == 2
    assert "reload failed; still serving shapes" in d.log()


def test_sighup_reloads_the_model_named_in_the_config_file(fresh_daemon):
    work = short_dir()
    config = Path(work) / "inferd.toml"
    config.write_text('[model]\nbuiltin = "shapes"\n')
    d = fresh_daemon("--config", str(config), model=None, workdir=work)
    with AdminClient(admin_path(d)) as admin:
        config.write_text("[model]\nbuiltin = 'resnet18\n")              # not TOML: nothing changes
        os.kill(d.pid, signal.SIGHUP)
        wait_until(lambda: "SIGHUP: the configuration no longer loads; still serving shapes" in d.log(),
                   what="a broken file refused")
        assert admin.call("health")["model"]["gen"] == 1
        config.write_text('[model]\nbuiltin = "resnet18"\n')
        os.kill(d.pid, signal.SIGHUP)
        wait_until(lambda: admin.call("health")["model"]["gen"] == 2, what="the swap")
        assert admin.call("health")["model"]["name"] == "resnet18"
        assert admin.call("stats")["reloads"] == {"ok": 1, "failed": 1}


SWAP_WORKER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, sys.argv[3])
    from helpers import sample_images
    from inferd.client import Client
    socket_path, out, stop = sys.argv[1], sys.argv[2], sys.argv[4]
    images = sample_images()
    counts = {"shapes": 0, "resnet": 0, "errors": 0, "wrong": 0}
    errors = []
    last = 0.0
    with Client(socket_path, cache=False, timeout=30) as c:
        i = 0
        while not os.path.exists(stop):
            truth, img = images[i % len(images)]
            i += 1
            try:
                label = c.classify(img, top_k=1)[0].label
            except Exception as exc:
                counts["errors"] += 1
                errors.append(repr(exc))
                continue
            if label.startswith("class_"):
                counts["resnet"] += 1
            else:
                counts["shapes"] += 1
                counts["wrong"] += label != truth
            if time.monotonic() - last > 0.05:
                last = time.monotonic()
                with open(out + ".tmp", "w") as fh:
                    json.dump(counts, fh)
                os.replace(out + ".tmp", out)
    with open(out + ".tmp", "w") as fh:
        json.dump({**counts, "error_list": errors[:5], "done": True}, fh)
    os.replace(out + ".tmp", out)
""")


@pytest.mark.timeout(300)
def test_model_swap_under_load_fails_no_request(fresh_daemon):
    d = fresh_daemon("--set", "cache.enabled=false")
    work = Path(d.workdir)
    (work / "worker.py").write_text(SWAP_WORKER)
    tests_dir = str(TESTS)
    stop = str(work / "stop")
    outs = [str(work / f"w{i}.json") for i in range(3)]
    procs = [subprocess.Popen([sys.executable, str(work / "worker.py"), d.socket_path, out, tests_dir, stop])
             for out in outs]

    def counts():
        got = []
        for out in outs:
            try:
                got.append(json.loads(Path(out).read_text()))
            except (FileNotFoundError, json.JSONDecodeError):
                return None
        return got

    try:
        wait_until(lambda: (c := counts()) and all(x["shapes"] >= 10 for x in c), timeout=60, what="load")
        with AdminClient(admin_path(d)) as admin:
            assert admin.call("reload", model="resnet18")["model"]["gen"] == 2
            wait_until(lambda: all(x["resnet"] >= 10 for x in counts()), timeout=60, what="resnet answers")
            mark = [x["shapes"] for x in counts()]
            assert admin.call("reload", model="shapes")["model"]["gen"] == 3
            wait_until(lambda: all(x["shapes"] >= m + 10 for x, m in zip(counts(), mark)), timeout=60,
                       what="shapes answers again")
    finally:
        Path(stop).touch()
        for p in procs:
            p.wait(60)
    final = counts()
    assert all(x.get("done") for x in final)
    assert sum(x["errors"] for x in final) == 0, final
    assert sum(x["wrong"] for x in final) == 0, final
