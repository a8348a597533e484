"""Two daemons on one host whose sockets collide: the second stops at once with exit 69 (a taken
path, which no restart cures, so the unit does not restart it) and one clean log line naming the
path and the key to change, whether the client socket or the admin socket is the one taken; the
first daemon keeps serving both."""
from __future__ import annotations

import os

import pytest

from helpers import admin_path, shm_leftovers, spawn_daemon
from inferd.client import AdminClient, Client
from inferd.daemon import exitcodes

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def first():
    d = spawn_daemon()
    yield d
    rc = d.stop()
    d.cleanup()
    assert rc == 0, d.log()
    assert not shm_leftovers(d.prefix)


def _second(first, socket_name: str):
    """A second daemon in the first one's folder, with its own cache file; its exit status."""
    d = spawn_daemon("--set", f'cache.path="{first.workdir}/second.cache"', wait=False,
                     workdir=first.workdir, socket_path=os.path.join(first.workdir, socket_name))
    try:
        return d.proc.wait(120), d.log()
    finally:
        d.kill()


def _first_still_serves(first) -> None:
    with AdminClient(admin_path(first)) as admin:
        assert admin.call("health")["pid"] == first.pid
    with Client(first.socket_path) as c:
        c.ping()


@pytest.mark.parametrize("socket_name, taken", [("d.sock", "d.sock"), ("other.sock", "admin.sock")],
                         ids=["client socket", "admin socket"])
def test_a_taken_socket_path_exits_69_with_one_clean_line(first, socket_name, taken):
    rc, log = _second(first, socket_name)
    assert rc == exitcodes.UNAVAILABLE == 69, log
    assert "Traceback" not in log, log
    assert f"another daemon answers on {os.path.join(first.workdir, taken)}" in log, log
    if taken == "admin.sock":
        assert "server.admin_socket" in log, log
        assert not os.path.exists(os.path.join(first.workdir, socket_name))   # its own socket went too
    _first_still_serves(first)
