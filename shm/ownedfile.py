"""A fixed-size file that one daemon owns: open it locked and checked, or build it afresh, without
its path ever naming a half-built file. Used by the result cache and the embedding store.

``acquire`` opens PATH and takes an exclusive ``flock`` on the file itself. Because a previous
owner may have replaced the file between our open and our lock, PATH must still name the inode we
locked; otherwise we start over. A file that fails its owner's check (``problem(fd)`` returns a
reason) is set aside as ``PATH.corrupt-<unix time>`` and replaced, with one log line. A fresh file
is built under a temporary name (size, header, lock) and then linked to PATH (when PATH is missing)
or renamed over it (when replacing; we hold the old file's lock), so readers never see it half
written and a file never shrinks under a reader's mapping (which would be a SIGBUS).

Its mode is ``mode`` exactly, whoever made it: a fresh file is fchmod'ed (the umask does not
decide), and an existing file of a wider mode (one an older daemon made 0644) is narrowed before
anything else, with one log line, so neither it nor the copy set aside can be read by others.

Its blocks are reserved (``posix_fallocate``) before it is used: a fresh file before it is linked
to PATH, an existing one (a sparse file an older daemon made) right after its lock is taken. The
owner writes the file through a shared mapping, and a store into a page the filesystem has no room
for is not an error the writer can catch: the kernel sends SIGBUS and the process dies. Reserved
blocks are never given back while the file lives, so once ``acquire`` returns, a full filesystem
cannot touch the owner (on ext4, xfs and tmpfs; copy-on-write filesystems such as btrfs and ZFS
cannot promise it, so keep these files off them). When the blocks cannot be had, ``acquire``
raises the caller's ``no_space`` error naming the path and the size, and a fresh file is removed
again: nothing is left at PATH.

At most one set-aside copy of PATH is kept: setting one aside removes the earlier
``PATH.corrupt-*`` copies (each up to the file's full size), and the log line names them. A
temporary file that a killed predecessor was building (``PATH.tmp-<pid>-*``, its blocks reserved)
is removed at the next ``acquire`` once its pid is gone and nobody holds its lock.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import stat
import time
from typing import Callable

_log = logging.getLogger("inferd.ownedfile")


class OwnedFileError(Exception):
    """The file cannot be opened or kept; the message says which and why."""


class OwnedFileLocked(OwnedFileError):
    """Another process (another daemon) holds the file's lock."""


class OwnedFileNoSpace(OwnedFileError):
    """The file's filesystem has no room for its blocks (full, or over a quota)."""


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _reserve(fd: int, path: str, size: int, what: str, no_space: type) -> None:
    """Give the file behind ``fd`` real blocks for all ``size`` bytes (see the module)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in _NO_ROOM:
            raise
        raise no_space(f"{what} {path}: cannot reserve its {size} bytes ({size / 2**20:.1f} MiB) on its "
                       f"filesystem: {exc.strerror}; free space there, configure a smaller file, or "
                       "put it on another filesystem") from None


def _prune_aside(path: str) -> list[str]:
    """Remove the copies of PATH set aside earlier (``PATH.corrupt-*``); return their names."""
    directory, prefix = os.path.dirname(path) or ".", os.path.basename(path) + ".corrupt-"
    removed = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:                    # another daemon's start pruned it first
                continue
            removed.append(os.path.join(directory, name))
    return removed


def _sweep_tmp(path: str, what: str, log) -> None:
    """Remove the temporary files of PATH that a killed process left half built: its pid is not
    alive and nobody holds the file's lock (a live builder holds it from the first moment)."""
    directory, prefix = os.path.dirname(path) or ".", os.path.basename(path) + ".tmp-"
    try:
        names = os.listdir(directory)
    except OSError:                                      # missing or unlistable: acquire says which
        return
    for name in names:
        pid = name[len(prefix):].split("-", 1)[0] if name.startswith(prefix) else ""
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue                                     # alive (or not ours to signal): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        leftover = os.path.join(directory, name)
        try:
            fd = os.open(leftover, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(leftover)
        except OSError:                                  # locked, or gone meanwhile
            continue
        finally:
            os.close(fd)
        log = _log if log is None else log
        (log.warning if isinstance(log, logging.Logger) else log)(
            f"{what} {path}: removed {leftover}, left half built by process {pid}, which is gone")


def _install(path: str, size: int, header: bytes, mode: int, problem: str | None, what: str,
             log, no_space: type) -> int | None:
    """Build an empty locked file, its blocks reserved, under a temporary name and put it at PATH:
    by link if PATH is missing (None if another process got there first), else (the caller holds
    PATH's lock) by hard-linking PATH aside and renaming over it. Earlier set-aside copies go
    first: their blocks may be what the new file needs."""
    pruned = _prune_aside(path) if problem is not None else []
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # ours while built: _sweep_tmp leaves it
        os.fchmod(fd, mode)                              # exactly: the umask must not decide who reads
        _reserve(fd, path, size, what, no_space)         # sets the size too
        os.pwrite(fd, header, 0)
        if problem is None:
            os.link(tmp, path)
        else:
            aside = f"{path}.corrupt-{int(time.time())}"
            aside += f".{secrets.token_hex(3)}" if os.path.lexists(aside) else ""
            os.link(path, aside)
            os.rename(tmp, path)
    except BaseException as exc:
        os.close(fd)
        os.unlink(tmp)
        if problem is None and isinstance(exc, FileExistsError):
            return None
        raise
    if problem is None:
        os.unlink(tmp)
    else:
        log = _log if log is None else log
        kept = (f"; the earlier set-aside {'copy' if len(pruned) == 1 else 'copies'} "
                f"{', '.join(pruned)} removed" if pruned else "")
        (log.warning if isinstance(log, logging.Logger) else log)(
            f"{what} {path}: {problem}; set aside as {aside} and rebuilt empty (only the latest "
            f"set-aside copy is kept{kept})")
    return fd


def _narrow(fd: int, path: str, mode: int, what: str, log) -> None:
    """Give the open file exactly ``mode`` (it is ours: we hold its lock)."""
    found = stat.S_IMODE(os.fstat(fd).st_mode)
    if found != mode:
        os.fchmod(fd, mode)
        log = _log if log is None else log
        (log.warning if isinstance(log, logging.Logger) else log)(
            f"{what} {path}: mode {found:04o} narrowed to {mode:04o}")


def acquire(path: str, *, size: int, header: bytes, problem: Callable[[int], str | None], mode: int,
            what: str, log=None, locked: type = OwnedFileLocked, error: type = OwnedFileError,
            no_space: type = OwnedFileNoSpace) -> int:
    """A descriptor of PATH, locked, that passed ``problem`` (or was rebuilt with ``header``), with
    all ``size`` bytes' blocks reserved. ``what`` names the file in messages; ``locked`` /
    ``no_space`` / ``error`` are the exception types to raise."""
    _sweep_tmp(path, what, log)
    for _ in range(8):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if (fd := _install(path, size, header, mode, None, what, log, no_space)) is not None:
                return fd
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise locked(f"{what} {path} is locked by another process (another inferd daemon); "
                             "stop that daemon or give this one its own path") from None
            try:
                current = os.path.samestat(os.stat(path), os.fstat(fd))
            except FileNotFoundError:
                current = False
            if current:
                _narrow(fd, path, mode, what, log)
            reason = problem(fd) if current else None
            new_fd = _install(path, size, header, mode, reason, what, log, no_space) if reason else None
            if current and new_fd is None:
                _reserve(fd, path, size, what, no_space)  # a sparse file an older daemon made
        except BaseException:
            os.close(fd)
            raise
        if current and new_fd is None:
            return fd
        os.close(fd)
        if new_fd is not None:
            return new_fd
    raise error(f"{what} {path} kept being replaced while opening it; what else recreates it?")
