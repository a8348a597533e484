"""The metrics HTTP listener shows nothing a local user should not see: the loopback TCP door asks
for a bearer token (or the operator's explicit allow_anonymous), the Unix socket door has the file
mode it was configured with, the per-uid series stay on the admin socket unless metrics.per_uid
asks for them, and a listener every local user could open without a token stops start-up.

Real daemons; the tests that act as another uid need root (they run a client as uid 65534).
"""
from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import admin_path, sample_images, short_dir, spawn_daemon, wait_until
from inferd.client import AdminClient, Client
from inferd.daemon import config as config_mod
from inferd.daemon import exitcodes
from inferd.daemon.config import ConfigError

pytestmark = pytest.mark.timeout(240)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
NOBODY = 65534
GROUP = 4242                  # a gid nobody has (it need not exist in /etc/group)
UID_FAMILIES = ("inferd_uid_sessions", "inferd_uid_requests_in_flight", "inferd_uid_requests")


def _token_file(workdir: str, token: str, mode: int = 0o600) -> str:
    path = os.path.join(workdir, "metrics.token")
    with open(path, "w") as fh:
        fh.write(token + "\n")                           # a trailing newline, as `echo` writes it
    os.chmod(path, mode)
    return path


def _port(d) -> int:
    return int(re.search(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", d.log()).group(1))


def _get(port: int, token: str | None = None) -> tuple[int, str, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def _families(text: str) -> set[str]:
    return {fam.name for fam in text_string_to_metric_families(text)}


def _uid_samples(text: str) -> dict:
    return {(fam.name, s.labels["uid"]): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if fam.name in UID_FAMILIES}


def _unix_get(path: str, token: str | None = None) -> tuple[int, str]:
    """GET /metrics over a Unix socket (HTTP/1.0: the reply ends at EOF)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        sock.sendall(f"GET /metrics HTTP/1.0\r\nHost: localhost\r\n{auth}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


# the TCP door ---------------------------------------------------------------------------------------
def test_the_tcp_listener_answers_401_without_the_token_and_the_text_with_it():
    workdir = short_dir()
    token = "s3cret-" + os.urandom(16).hex()
    token_path = _token_file(workdir, token)
    d = spawn_daemon("--set", 'metrics.listen="127.0.0.1:0"', "--set", f'metrics.token_file="{token_path}"',
                     workdir=workdir)
    try:
        port = _port(d)
        assert f"bearer token from {token_path}" in d.log()
        label, image = sample_images()[0]
        with Client(d.socket_path, cache=False) as c:    # a session open and a request counted
            assert c.classify(image)[0].label == label
            status, body, headers = _get(port)
            assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer")
            assert "inferd_" not in body
            for wrong in (token[:-1], token + "x", "", token.upper()):
                assert _get(port, wrong)[0] == 401, wrong
            status, text, _ = _get(port, token)
            assert status == 200 and "inferd_requests_in_flight" in _families(text)
            # no per-uid series on HTTP by default; present through the admin socket
            assert not _families(text) & set(UID_FAMILIES), _families(text)
            with AdminClient(admin_path(d)) as admin:
                full = admin.call("metrics")["text"]
            uid = str(os.getuid())
            assert _uid_samples(full)[("inferd_uid_sessions", uid)] == 1
            assert _uid_samples(full)[("inferd_uid_requests", uid)] == 1

        # rotation: the file is read again when it changes; the old token no longer opens the door
        new = "rotated-" + os.urandom(16).hex()
        _token_file(workdir, new)
        assert _get(port, new)[0] == 200 and _get(port, token)[0] == 401
        # a token file others could read refuses every scrape until it is private again
        os.chmod(token_path, 0o644)
        assert _get(port, new)[0] == 401
        assert "refusing every scrape until metrics.token_file is usable" in d.log()
        os.chmod(token_path, 0o600)
        assert _get(port, new)[0] == 200
        assert d.stop() == 0
    finally:
        d.cleanup()


def test_per_uid_series_on_http_only_when_asked_for():
    d = spawn_daemon("--set", 'metrics.listen="127.0.0.1:0"', "--set", "metrics.allow_anonymous=true",
                     "--set", "metrics.per_uid=true")
    try:
        assert "(no token)" in d.log()
        with Client(d.socket_path, cache=False):
            status, text, _ = _get(_port(d))
            assert status == 200
            assert _uid_samples(text)[("inferd_uid_sessions", str(os.getuid()))] == 1
        assert d.stop() == 0
    finally:
        d.cleanup()


# start-up refuses a door every local user could open -------------------------------------------
def _load(**keys) -> config_mod.Config:
    return config_mod.load(None, {f"metrics.{k}": v for k, v in keys.items()})


def test_config_refuses_a_listener_every_local_user_can_open_without_a_token(tmp_path):
    with pytest.raises(ConfigError, match="metrics.listen: every local user can connect.*metrics.token_file"):
        _load(listen="127.0.0.1:9464")
    with pytest.raises(ConfigError, match="metrics.socket_mode: 0666 lets every local user connect"):
        _load(socket=str(tmp_path / "m.sock"), socket_mode=0o666)
    _load(socket=str(tmp_path / "m.sock"), socket_mode=0o660)                   # the file mode guards it
    _load(listen="127.0.0.1:9464", allow_anonymous=True)                        # the operator's choice
    with pytest.raises(ConfigError, match="mode 644: other users could read"):
        _load(listen="127.0.0.1:9464", token_file=_token_file(str(tmp_path), "t" * 32, 0o644))
    with pytest.raises(ConfigError, match="at least 16 printable"):
        _load(listen="127.0.0.1:9464", token_file=_token_file(str(tmp_path), "short"))
    with pytest.raises(ConfigError, match="no HTTP listener to guard"):
        _load(token_file=_token_file(str(tmp_path), "t" * 32))
    with pytest.raises(ConfigError, match="metrics.token_file: .*No such file"):
        _load(listen="127.0.0.1:9464", token_file=str(tmp_path / "absent"))
    _load(listen="127.0.0.1:9464", token_file=_token_file(str(tmp_path), "t" * 32))


def test_a_daemon_with_an_open_listener_stops_at_start_up_naming_the_key():
    d = spawn_daemon("--set", 'metrics.listen="127.0.0.1:0"', wait=False)
    try:
        assert d.proc.wait(timeout=100) == exitcodes.CONFIG == 78
        assert "metrics.token_file" in d.log() and "Traceback" not in d.log()
    finally:
        d.cleanup()


# the Unix socket door -------------------------------------------------------------------------------
AS_NOBODY = """
import socket, sys, os
os.setgroups([]); os.setgid(65534); os.setuid(65534)
try:
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(sys.argv[1])
    print("connected")
except PermissionError:
    print("denied")
"""


def test_the_unix_socket_listener_serves_with_its_file_mode():
    workdir = short_dir()
    os.chmod(workdir, 0o755)                              # reachable, so only the socket's mode decides
    path = os.path.join(workdir, "metrics.sock")
    d = spawn_daemon("--set", f'metrics.socket="{path}"', "--set", "metrics.socket_mode=0o660",
                     "--set", f'metrics.socket_group="{GROUP}"', workdir=workdir)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == GROUP
        with Client(d.socket_path, cache=False):
            status, text = _unix_get(path)
        assert status == 200 and "inferd_sessions" in _families(text)
        assert not _families(text) & set(UID_FAMILIES)
        if os.geteuid() == 0:                            # another uid, not in the group: the mode refuses it
            out = subprocess.run([sys.executable, "-c", AS_NOBODY, path], capture_output=True, text=True,
                                 timeout=60)
            assert out.stdout.strip() == "denied", out
        assert d.stop() == 0
        assert not os.path.exists(path)                   # unlinked at stop
    finally:
        d.cleanup()


def test_the_unix_socket_listener_asks_for_the_token_when_one_is_set():
    workdir = short_dir()
    token = os.urandom(20).hex()
    path = os.path.join(workdir, "metrics.sock")
    d = spawn_daemon("--set", f'metrics.socket="{path}"', "--set",
                     f'metrics.token_file="{_token_file(workdir, token)}"', workdir=workdir)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600          # the default mode
        assert _unix_get(path)[0] == 401
        status, text = _unix_get(path, token)
        assert status == 200 and "inferd_model_info" in _families(text)
        assert d.stop() == 0
    finally:
        d.cleanup()
