"""The socket-path rules (inferd.shm.paths) and the places that use them: the daemon's
configuration, the client library and inferctl's admin client resolve the same paths from the same
environment. In-process, no daemon."""
import os
import socket
import stat

import pytest

from inferd.client import client as client_module
from inferd.client.admin import default_admin_path
from inferd.daemon.config import from_dict
from inferd.shm import paths


@pytest.fixture
def env(monkeypatch):
    for name in (paths.SOCKET_ENV, paths.ADMIN_SOCKET_ENV, "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    return monkeypatch


def test_the_default_socket_follows_the_user(env):
    assert paths.default_socket_path() == "/tmp/inferd-1234/inferd.sock"
    env.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert paths.default_socket_path() == "/run/user/1234/inferd/inferd.sock"
    env.setattr(os, "geteuid", lambda: 0)
    assert paths.default_socket_path() == "/run/inferd/inferd.sock"


def test_configured_beats_the_environment_beats_the_default(env):
    assert paths.socket_path() == paths.default_socket_path()
    env.setenv(paths.SOCKET_ENV, "/srv/env/d.sock")
    assert paths.socket_path() == "/srv/env/d.sock"
    assert paths.socket_path("/srv/cfg/d.sock") == "/srv/cfg/d.sock"
    assert paths.socket_path("") == "/srv/env/d.sock"                  # an empty setting is none


def test_the_admin_socket_lies_beside_the_client_socket_unless_named(env):
    assert paths.admin_socket_path() == "/tmp/inferd-1234/admin.sock"
    assert paths.admin_socket_path(socket="/srv/a/d.sock") == "/srv/a/admin.sock"
    assert paths.admin_socket_path("/srv/b/adm.sock", "/srv/a/d.sock") == "/srv/b/adm.sock"
    env.setenv(paths.SOCKET_ENV, "/srv/env/d.sock")
    assert paths.admin_socket_path() == "/srv/env/admin.sock"


def test_only_clients_read_the_admin_socket_variable(env):
    env.setenv(paths.SOCKET_ENV, "/srv/env/d.sock")
    env.setenv(paths.ADMIN_SOCKET_ENV, "/srv/ops/admin.sock")
    assert paths.client_admin_socket_path() == "/srv/ops/admin.sock"
    assert default_admin_path("/srv/other/d.sock") == "/srv/ops/admin.sock"
    assert from_dict({}).admin_socket_path == "/srv/env/admin.sock"    # the daemon ignores it
    env.delenv(paths.ADMIN_SOCKET_ENV)
    assert default_admin_path("/srv/other/d.sock") == "/srv/other/admin.sock"


@pytest.mark.parametrize("socket_env", [None, "/srv/env/d.sock"])
@pytest.mark.parametrize("xdg", [None, "/run/user/1234"])
def test_daemon_client_and_inferctl_agree(env, socket_env, xdg):
    if socket_env:
        env.setenv(paths.SOCKET_ENV, socket_env)
    if xdg:
        env.setenv("XDG_RUNTIME_DIR", xdg)
    cfg = from_dict({})
    assert cfg.socket_path == client_module.default_socket_path() == paths.socket_path()
    assert cfg.admin_socket_path == default_admin_path() == os.path.join(os.path.dirname(cfg.socket_path),
                                                                         "admin.sock")
    named = from_dict({"server": {"socket": "/srv/cfg/d.sock"}})
    assert named.socket_path == "/srv/cfg/d.sock" and named.admin_socket_path == "/srv/cfg/admin.sock"


def test_the_socket_path_appears_only_listening_and_with_its_final_mode(tmp_path, monkeypatch):
    """Listener.bind binds, chmods and listens under a temporary name, then renames: whoever finds
    the path can connect at once, with the configured mode, and nothing else is left in the folder."""
    from inferd.daemon.front.listener import Listener

    path = str(tmp_path / "d.sock")
    seen = []
    real_rename = os.rename

    def rename(src, dst):
        assert not os.path.exists(dst)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(src)                      # already listening under the temporary name
        probe.close()
        seen.append(stat.S_IMODE(os.stat(src).st_mode))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    listener = Listener.bind(path, 0o660)
    try:
        assert seen == [0o660]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert os.listdir(tmp_path) == ["d.sock"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
    finally:
        listener.close()
    assert os.listdir(tmp_path) == []
