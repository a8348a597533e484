"""Where the sockets are: the rules the daemon, the client library and inferctl share.

    client socket   the configured path (server.socket, --socket, Client(path)), else
                    $INFERD_SOCKET, else default_socket_path():
                      /run/inferd/inferd.sock                 as root
                      $XDG_RUNTIME_DIR/inferd/inferd.sock     else, when XDG_RUNTIME_DIR is set
                      /tmp/inferd-<uid>/inferd.sock           else
    admin socket    the configured path (server.admin_socket in the daemon; --admin-socket or
                    $INFERD_ADMIN_SOCKET for inferctl), else admin.sock in the client socket's
                    directory

The daemon never reads $INFERD_ADMIN_SOCKET: it is how an operator points inferctl at a daemon
whose admin socket was configured elsewhere. Pure functions of their arguments and the
environment; nothing here touches the file system.
"""
from __future__ import annotations

import os

#: The environment variable naming the client socket (read by the daemon and by clients).
SOCKET_ENV = "INFERD_SOCKET"
#: The environment variable naming the admin socket (read by clients: inferctl, AdminClient).
ADMIN_SOCKET_ENV = "INFERD_ADMIN_SOCKET"
#: The admin socket's file name beside the client socket when none is configured.
ADMIN_SOCKET_NAME = "admin.sock"


def default_socket_path() -> str:
    """Where the daemon listens when nothing names a socket: ``/run/inferd/inferd.sock`` as root,
    else ``$XDG_RUNTIME_DIR/inferd/inferd.sock``, else ``/tmp/inferd-<uid>/inferd.sock``."""
    if os.geteuid() == 0:
        return "/run/inferd/inferd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "inferd", "inferd.sock")
    return f"/tmp/inferd-{os.geteuid()}/inferd.sock"


def socket_path(configured: str | None = None) -> str:
    """The client socket: ``configured`` when given (not empty), else $INFERD_SOCKET, else
    default_socket_path()."""
    return configured or os.environ.get(SOCKET_ENV) or default_socket_path()


def admin_socket_path(configured: str | None = None, socket: str | None = None) -> str:
    """The admin socket: ``configured`` when given (not empty), else ``admin.sock`` in the
    directory of the client socket (``socket_path(socket)``). The daemon's rule for
    ``server.admin_socket``."""
    return configured or os.path.join(os.path.dirname(socket_path(socket)), ADMIN_SOCKET_NAME)


def client_admin_socket_path(socket: str | None = None) -> str:
    """The admin socket a client should use: $INFERD_ADMIN_SOCKET, else the daemon's default
    beside the client socket (``admin_socket_path(socket=socket)``)."""
    return admin_socket_path(os.environ.get(ADMIN_SOCKET_ENV), socket)
