"""The daemon's listening Unix socket: bind safely, know the peer, pass descriptors, unlink on exit.

Binding follows asyncio's ``create_unix_server`` rule, made stricter: a path that exists is removed
only if it is a socket *and* nobody answers on it (a crashed predecessor's leftover). A path that is
not a socket, or a socket a live daemon answers on, stops start-up with a message naming it. On exit
the path is unlinked only if it still is the inode this daemon bound, so a successor that already
took the path over keeps it.
"""
from __future__ import annotations

import array
import asyncio
import os
import socket
import stat
import struct

_PEERCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid


class ListenerError(Exception):
    """The socket path cannot be used; the message says why and what to do."""


class Listener:
    def __init__(self, sock: socket.socket, path: str, inode: int):
        self.sock = sock
        self.path = path
        self._inode = inode

    @classmethod
    def bind(cls, path: str, mode: int, backlog: int = 512) -> "Listener":
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o750, exist_ok=True)
        _remove_if_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)   # the socket file is never wider than 0600 before chmod
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ListenerError(f"cannot bind {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
        return cls(sock, path, os.stat(path).st_ino)

    def close(self) -> None:
        """Stop listening and unlink the path if it is still ours. Idempotent."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def _remove_if_stale(path: str) -> None:
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
        raise ListenerError(f"cannot tell whether a daemon answers on {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ListenerError(f"another daemon answers on {path}; stop it or choose another socket path")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return _PEERCRED.unpack(raw)


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
