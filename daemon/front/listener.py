"""The daemon's listening Unix socket: bind safely, know the peer, pass descriptors, unlink on exit.
A socket that a group may open (the admin socket, the metrics socket) names that group in its
setting; ``group_gid`` reads it, one rule and one message for every such setting.

Binding follows asyncio's ``create_unix_server`` rule, made stricter: a path that exists is removed
only if it is a socket *and* nobody answers on it (a crashed predecessor's leftover). A path that is
not a socket, or a socket a live daemon answers on, stops start-up with a message naming it. On exit
the path is unlinked only if it still is the inode this daemon bound, so a successor that already
took the path over keeps it.

Socket activation (systemd's inferd.socket, or ``systemd-socket-activate -l PATH``): the manager
binds the path and passes the listening socket as fd 3 with LISTEN_FDS / LISTEN_PID
(sd_listen_fds(3)). :meth:`Listener.from_systemd` takes it, checks it is a listening AF_UNIX stream
socket, and removes the LISTEN_* variables so no child of ours takes them for its own. Such a
listener never unlinks its path: the manager owns it, and keeps accepting into the backlog while
the daemon restarts.
"""
from __future__ import annotations

import array
import asyncio
import errno
import grp
import os
import socket
import stat
import struct

from ..errors import ConfigError

_PEERCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)    # Linux; Python names it from 3.13 only
SUN_PATH_MAX = 107                # bytes of sockaddr_un.sun_path, less the terminating NUL
SD_LISTEN_FDS_START = 3           # sd_listen_fds(3): passed descriptors start here


class ListenerError(Exception):
    """The socket path cannot be used; the message says why and what to do."""


def check_path_length(path: str, key: str = "server.socket / --socket") -> None:
    """ListenerError unless ``path`` fits in sockaddr_un (the kernel would refuse it with EINVAL,
    which says nothing); ``key`` names the setting to change."""
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        raise ListenerError(f"socket path is {size} bytes; AF_UNIX allows at most {SUN_PATH_MAX}: "
                            f"choose a shorter {key} ({path})")


def group_gid(key: str, group: str) -> int | None:
    """The gid of the group a socket's file is given to, as the setting ``key`` names it (a group
    name or a number), or None when unset (the socket stays its owner's alone). ConfigError naming
    ``key`` when this host has no such group."""
    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"{key}: no group named {group!r} on this host") from None


class Listener:
    def __init__(self, sock: socket.socket, path: str, inode: int | None):
        self.sock = sock
        self.path = path
        self._inode = inode                # None: not ours to unlink (an inherited socket)

    @property
    def inherited(self) -> bool:
        return self._inode is None

    @classmethod
    def from_systemd(cls, environ=os.environ) -> "Listener | None":
        """The listening socket systemd passed us, or None when LISTEN_FDS is not for this process.
        Removes LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES from ``environ`` either way (as
        sd_listen_fds(1) does). Raises ListenerError for anything but exactly one listening AF_UNIX
        stream socket."""
        count, owner = environ.get("LISTEN_FDS"), environ.get("LISTEN_PID")
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            environ.pop(name, None)
        if count is None or owner != str(os.getpid()):
            return None
        if count != "1":
            raise ListenerError(f"systemd passed LISTEN_FDS={count} descriptors; inferd takes exactly one "
                                "(the client socket): give inferd.socket a single ListenStream=")
        return cls.inherited_fd(SD_LISTEN_FDS_START)

    @classmethod
    def inherited_fd(cls, fd: int) -> "Listener":
        """Take over listening socket ``fd`` (bound and listening already, by a manager that keeps
        its path). ListenerError unless it is a listening AF_UNIX SOCK_STREAM socket."""
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise ListenerError(f"inherited descriptor {fd}: {exc.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise ListenerError(f"inherited descriptor {fd} is not a socket; the socket unit must use "
                                "ListenStream=/path (not ListenFIFO= or a file)")
        sock = socket.socket(fileno=fd)
        kind = (sock.family, sock.type)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if kind != (socket.AF_UNIX, socket.SOCK_STREAM) or not listening:
            sock.detach()
            raise ListenerError(f"inherited descriptor {fd} is a {_describe(*kind)} socket"
                                f"{'' if listening else ' that is not listening'}; inferd needs a listening "
                                "AF_UNIX stream socket: ListenStream=/path with Accept=no in the socket unit")
        os.set_inheritable(fd, False)      # passed without CLOEXEC; our children must not hold it
        sock.setblocking(False)
        path = sock.getsockname()
        return cls(sock, path if isinstance(path, str) else os.fsdecode(path), None)

    @classmethod
    def bind(cls, path: str, mode: int, backlog: int = 512) -> "Listener":
        check_path_length(path)
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o750, exist_ok=True)
        remove_if_stale(path)
        # Bound, chmod-ed and listening under a temporary name, then renamed into place: a client
        # polling for the path finds it only once it accepts connections with its final mode, never a
        # socket that refuses (not yet listening) or denies (not yet chmod-ed) it.
        staging = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}")
        if len(os.fsencode(staging)) > SUN_PATH_MAX:
            staging = path                 # no room for a longer name: bind in place (path fits)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)   # the socket file is never wider than 0600 before chmod
        try:
            if staging != path and os.path.lexists(staging):
                os.unlink(staging)         # our own pid's leftover: nobody else names it so
            sock.bind(staging)
            os.chmod(staging, mode)
            sock.listen(backlog)
            if staging != path:
                os.rename(staging, path)
        except OSError as exc:
            sock.close()
            if staging != path and os.path.lexists(staging):
                os.unlink(staging)
            raise ListenerError(f"cannot bind {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        sock.setblocking(False)
        return cls(sock, path, os.stat(path).st_ino)

    def close(self) -> None:
        """Stop listening and unlink the path if it is still ours (never an inherited one's).
        Idempotent."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._inode is None:
            return
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def _describe(family: int, kind: int) -> str:
    names = {socket.AF_UNIX: "AF_UNIX", socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6"}
    kinds = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram", socket.SOCK_SEQPACKET: "seqpacket"}
    return f"{names.get(family, f'family {family}')} {kinds.get(kind, f'type {kind}')}"


def remove_if_stale(path: str, who: str = "daemon") -> None:
    """Unlink ``path`` if it is a socket nobody listens on (a crashed predecessor's leftover); a
    ListenerError if it is not a socket, or a ``who`` answers there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; remove it or choose another socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)            # nobody listens: a crashed predecessor's leftover
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenerError(f"cannot tell whether a {who} answers on {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ListenerError(f"another {who} answers on {path}; stop it or choose another socket path")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return _PEERCRED.unpack(raw)


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """Supplementary gids of the peer process (SO_PEERGROUPS, Linux 4.13+), as they were at its
    connect(); () where the kernel won't say."""
    size = 4 * 64
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < 4 * 65536:     # more groups than room
                size *= 4
                continue
            return ()
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) - len(raw) % 4])


async def send_with_fds(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes,
                        fds: list[int]) -> None:
    """Send ``data`` on a non-blocking socket with ``fds`` attached (SCM_RIGHTS) to its first byte."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    while True:
        try:
            sent = sock.sendmsg([data], ancillary)
            break
        except (BlockingIOError, InterruptedError):
            writable = loop.create_future()
            loop.add_writer(sock.fileno(), writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(sock.fileno())
    if sent < len(data):
        await loop.sock_sendall(sock, data[sent:])
