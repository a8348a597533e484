"""The admin socket's client: what ``inferctl`` uses for stats, metrics, health, reload, drain.

    with AdminClient() as admin:                  # $INFERD_ADMIN_SOCKET, or admin.sock beside
        print(admin.call("health")["state"])      # the client socket
        admin.call("reload", model="resnet18")

One request at a time; replies and errors as in the client protocol (the op list is in
inferd.daemon.front.admin). Only root, the daemon's user and members of ``server.admin_group`` are served.
"""
from __future__ import annotations

import itertools
import socket

from . import errors
from ..shm import paths, wire


def default_admin_path(socket_path: str | None = None) -> str:
    """$INFERD_ADMIN_SOCKET, else ``admin.sock`` in the directory of the client socket (the
    daemon's own default for ``server.admin_socket``): inferd.shm.paths."""
    return paths.client_admin_socket_path(socket_path)


class AdminClient:
    def __init__(self, path: str | None = None, *, timeout: float = 60.0):
        self.path = path or default_admin_path()
        self._ids = itertools.count(1)
        self._reader = wire.FrameReader(wire.MAX_REPLY_FRAME)
        self._ready: list = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise errors.DaemonUnavailable(f"no inferd admin socket answers on {self.path} "
                                           f"({exc.strerror})") from None
        except OSError as exc:
            self._sock.close()
            if isinstance(exc, PermissionError):
                raise errors.PermissionDenied(f"cannot connect to {self.path}: {exc.strerror}; the admin "
                                              "socket is for root, the daemon's user and server.admin_group") from None
            raise errors.DaemonUnavailable(f"cannot connect to {self.path}: {exc}") from None

    def call(self, op: str, **fields) -> dict:
        """Send one admin request and return its reply; typed errors (inferd.client.errors)."""
        rid = next(self._ids)
        try:
            try:
                self._sock.sendall(wire.encode({"op": op, "id": rid, **fields}))
            except (BrokenPipeError, ConnectionResetError):
                pass    # a refusal (permission_denied) may already be waiting: read it below
            while not self._ready:
                data = self._sock.recv(1 << 16)
                if not data:
                    raise errors.DaemonUnavailable(f"the daemon closed the admin connection ({self.path})")
                self._ready.extend(self._reader.feed(data))
        except socket.timeout:
            raise errors.DaemonUnavailable(f"no reply on {self.path} within {self._sock.gettimeout():.0f} s") from None
        except OSError as exc:
            raise errors.DaemonUnavailable(f"admin connection to {self.path} failed: {exc}") from None
        except wire.FrameError as exc:
            raise errors.ProtocolError(f"unreadable admin reply: {exc}") from None
        reply = self._ready.pop(0)
        if isinstance(reply, wire.FrameError) or not isinstance(reply, dict):
            raise errors.ProtocolError(f"unreadable admin reply: {reply}")
        if not reply.get("ok"):
            raise errors.from_reply(reply)
        reply.pop("id", None)
        reply.pop("ok", None)
        return reply

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
