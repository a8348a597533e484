"""The client socket's door: accept, bound what waits for hello, and never lock anyone out.

NOTE [ the door ]

    backlog --accept--> descriptor below the reserve? --no--> typed error, closed at once
                              | yes                            (refused: descriptors)
                        peer credentials (SO_PEERCRED)
                              |
                        uid under server.max_prehello_per_uid? --no--> typed error, closed at once
                              | yes                                    (refused: prehello_uid)
                        all waiting under server.max_prehello? --no--> the uid holding the most
                              | yes                                    closes its oldest (evicted),
                              |                                        or the newcomer if that is
                              v                                        its own uid (prehello_total)
                        handshake task (daemon/front/handshake.py) ... hello done or dropped: leave

    accept fails with EMFILE / ENFILE --> release the spare descriptor, accept and close what waits
                                          with a typed error, take the spare back; back off
                                          (10 ms doubling to 0.5 s) and accept again
    any other error                   --> logged, back off, accept again

What each bound is for:
- **Connections that have not said hello** cost a descriptor and a task each until
  server.hello_timeout_s. One uid may hold server.max_prehello_per_uid of them; past that its new
  ones are refused. All uids together hold at most server.max_prehello; when that is full a
  newcomer takes the place of the oldest connection of the uid holding the most, so several uids
  together cannot lock out another one (the newcomer is refused only when its own uid holds the most).
- **The descriptor reserve.** The kernel hands out the lowest free descriptor, so a connection
  that lands on one of the top server.reserved_fds descriptors below RLIMIT_NOFILE (at most half
  of them) means fewer than that many are left: the door closes it at once, and those descriptors
  stay for the admin socket, hello's ring and cache descriptors, and a model reload. The test is
  one comparison.
- **Out of descriptors anyway** (a limit below what the bounds need, or descriptors held
  elsewhere): accept fails with EMFILE. The accept loop must not end there (it used to, and the
  socket then stayed deaf until a restart); as nginx and libuv do, a spare descriptor held for this
  is released so the pending connections can be accepted and closed with a typed error (clients
  learn at once instead of waiting on a full backlog), and the loop backs off before it tries again.

While the door would turn a newcomer away for lack of descriptors, :meth:`Door.blocked` says why,
and the daemon's health is not ready (a load balancer sends clients elsewhere): asked, it probes
with one ``dup`` what an accept would get. Counters (``refused`` by reason, ``accept_errors`` by
errno) go to the admin ``stats`` and the Prometheus text; each kind of event logs one line per 10 s.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import resource
import socket
import time
import traceback
from typing import Callable

from .listener import peer_credentials
from ..ops.logs import RateLimitedLog
from ...shm import wire

log = logging.getLogger("inferd.door")
# an attacker can cause each of these in a loop: one line per 10 s for each kind
_over_uid = RateLimitedLog(log, interval=10.0)
_over_total = RateLimitedLog(log, interval=10.0)
_reserve = RateLimitedLog(log, interval=10.0)
_exhausted = RateLimitedLog(log, interval=10.0)
_resumed = RateLimitedLog(log, interval=10.0)
_unexpected = RateLimitedLog(log, interval=10.0)

BACKOFF_FIRST_S = 0.01
BACKOFF_MAX_S = 0.5          # well under a second: a client arriving after the flood is served soon
TURN_AWAY_MAX = 256          # pending connections accepted and closed per round out of descriptors
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
# accept(2) errors that concern one connection that went away, not the door
CONNECTION_GONE = (errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN)
# descriptors the daemon holds whatever its clients do (model, cache, store, sockets, epoll, logs)
OWN_DESCRIPTORS = 64


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force.

    systemd starts services with a soft limit of 1024 for programs that still use select(); the
    daemon waits with epoll (uvloop) and may raise it, as systemd.exec(5) advises. The hard limit
    is the operator's (``LimitNOFILE=`` in inferd.service); an unlimited one is capped by the
    kernel's /proc/sys/fs/nr_open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("RLIMIT_NOFILE: cannot raise the soft limit %d to the hard limit %d: %s",
                        soft, target, exc)
            return soft
        log.info("RLIMIT_NOFILE: soft limit raised from %d to %d (the hard limit)", soft, target)
        return target
    log.info("RLIMIT_NOFILE: %d (the hard limit)", soft)
    return soft


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 1 << 20                     # the kernel's default


def descriptors_needed(limits) -> int:
    """Descriptors the [server] bounds may take at once: two per session (socket, and a posix
    ring's), one per connection waiting for hello, the reserve, and the daemon's own."""
    return 2 * limits.max_clients + limits.max_prehello + limits.reserved_fds + OWN_DESCRIPTORS


class Door:
    """The accept loop of the client socket ``sock`` (NOTE [ the door ]). ``spawn(conn, peer)``
    starts the hello handshake of a connection kept and returns its task; ``fd_limit`` is the
    soft RLIMIT_NOFILE; ``limits`` the [server] configuration. Loop thread only."""

    def __init__(self, sock: socket.socket, limits, spawn: Callable[[socket.socket, tuple], asyncio.Task],
                 fd_limit: int, clock: Callable[[], float] = time.monotonic):
        self._sock = sock
        self._limits = limits
        self._spawn = spawn
        self._clock = clock
        self.fd_limit = fd_limit
        # the door keeps no descriptor from here up; a reserve never takes more than half the
        # limit, so a low limit still leaves clients some
        self.ceiling = max(fd_limit - limits.reserved_fds, fd_limit // 2)
        # uid -> {handshake task: its connection}, oldest first
        self._waiting: dict[int, dict[asyncio.Task, socket.socket]] = {}
        self.waiting = 0                   # connections accepted that have not finished hello
        self.refused: collections.Counter = collections.Counter()        # reason -> connections
        self.accept_errors: collections.Counter = collections.Counter()  # errno name -> failures
        self.stuck_since: float | None = None   # accept failed for lack of descriptors; backing off
        self._episode_since: float | None = None  # ... and no connection kept since
        self._spare: int | None = _open_spare()
        need = descriptors_needed(limits)
        if fd_limit < need:
            log.warning("RLIMIT_NOFILE %d is below the %d descriptors that server.max_clients (%d), "
                        "server.max_prehello (%d) and server.reserved_fds (%d) may take with the "
                        "daemon's own; past %d new clients are refused until others leave: raise "
                        "LimitNOFILE= in inferd.service, or lower those keys", fd_limit, need,
                        limits.max_clients, limits.max_prehello, limits.reserved_fds, self.ceiling)

    def close(self) -> None:
        """Release the spare descriptor; idempotent. (The listener is its owner's to close.)"""
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    # the loop ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Accept until cancelled: nothing else ends it. The spare descriptor goes with it."""
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST_S
        try:
            while True:
                try:
                    conn, _ = await loop.sock_accept(self._sock)
                    delay = BACKOFF_FIRST_S
                    self.admit(conn)
                    continue
                except asyncio.CancelledError:
                    raise
                except OSError as exc:
                    if exc.errno in CONNECTION_GONE:
                        continue
                    self.accept_errors[errno.errorcode.get(exc.errno, str(exc.errno))] += 1
                    if exc.errno in OUT_OF_DESCRIPTORS:
                        self._out_of_descriptors(exc, delay)
                    else:
                        _unexpected.error("accept on the client socket failed: %s; accepting again in "
                                          "%.2f s", exc, delay)
                except Exception as exc:   # a bug: logged, and the door stays open
                    self.accept_errors["other"] += 1
                    _unexpected.error("accept loop: %r; accepting again in %.2f s\n%s", exc, delay,
                                      "".join(traceback.format_exception(exc)).rstrip())
                await asyncio.sleep(delay)     # back off, then try again
                self.stuck_since = None
                delay = min(delay * 2, BACKOFF_MAX_S)
        finally:
            self.close()

    def _out_of_descriptors(self, exc: OSError, delay: float) -> None:
        now = self._clock()
        if self._episode_since is None:
            self._episode_since = now
        turned = self._turn_away_pending()
        self.stuck_since = now             # cleared when the loop tries again
        _exhausted.warning("accept on the client socket failed: %s (RLIMIT_NOFILE %d, %d connections "
                           "waiting for hello); %d pending connections refused, accepting again in "
                           "%.2f s", os.strerror(exc.errno), self.fd_limit, self.waiting, turned, delay)

    def _turn_away_pending(self) -> int:
        """Out of descriptors: release the spare, accept and close what waits in the backlog (at
        most TURN_AWAY_MAX) with a typed error, take the spare back. Returns how many."""
        if self._spare is None:
            self._spare = _open_spare()    # lost to another thread last time: try to take it back
            return 0
        os.close(self._spare)
        self._spare = None
        turned = 0
        try:
            while turned < TURN_AWAY_MAX:
                try:
                    conn, _ = self._sock.accept()
                except OSError:            # empty backlog (EAGAIN), or out of descriptors again
                    break
                self._turn_away(conn, "descriptors", "the daemon is out of file descriptors; retry "
                                "shortly (operators: raise LimitNOFILE=, or lower server.max_clients)")
                turned += 1
        finally:
            self._spare = _open_spare()
        return turned

    # one connection ---------------------------------------------------------------------------
    def admit(self, conn: socket.socket) -> None:
        """Keep ``conn`` for its hello handshake, or close it at once with a typed error."""
        try:
            self._admit(conn)
        except BaseException:
            conn.close()                   # whatever went wrong, the descriptor is not kept
            raise

    def _admit(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        if fd >= self.ceiling:
            self._turn_away(conn, "descriptors", f"the daemon has only its reserve of file descriptors "
                            "left; retry shortly")
            _reserve.warning("connection refused: it got descriptor %d, in the last %d below RLIMIT_NOFILE "
                             "%d (server.reserved_fds, kept for the admin socket and hello); %d "
                             "connections wait for hello", fd, self.fd_limit - self.ceiling, self.fd_limit,
                             self.waiting)
            return
        peer = peer_credentials(conn)
        uid = peer[1]
        mine = self._waiting.get(uid)
        held = len(mine) if mine else 0
        per_uid, total = self._limits.max_prehello_per_uid, self._limits.max_prehello
        if held >= per_uid:
            self._turn_away(conn, "prehello_uid", f"uid {uid} has {held} connections that have not said "
                            f"hello (server.max_prehello_per_uid {per_uid}); say hello on those first")
            _over_uid.warning("connection from pid %d uid %d refused: %d of its connections have not said "
                              "hello (server.max_prehello_per_uid %d)", peer[0], uid, held, per_uid)
            return
        if self.waiting >= total and not self._evict_for(uid, held):
            self._turn_away(conn, "prehello_total", f"{self.waiting} connections have not said hello "
                            f"(server.max_prehello {total}), uid {uid} holding the most; retry shortly")
            _over_total.warning("connection from pid %d uid %d refused: %d connections wait for hello "
                                "(server.max_prehello %d) and its uid holds the most (%d)", peer[0], uid,
                                self.waiting, total, held)
            return
        if self._episode_since is not None:
            _resumed.info("accepting again after %.2f s out of file descriptors",
                          self._clock() - self._episode_since)
            self._episode_since = None
        task = self._spawn(conn, peer)
        if mine is None:
            mine = self._waiting[uid] = {}
        mine[task] = conn
        self.waiting += 1
        task.add_done_callback(lambda t: self._leave(uid, t))

    def _evict_for(self, uid: int, held: int) -> bool:
        """All waiting places taken: close the oldest connection of the uid holding the most, if
        it holds more than ``uid`` (which holds ``held``). Returns whether a place was freed."""
        largest = max(self._waiting, key=lambda u: len(self._waiting[u]))
        if len(self._waiting[largest]) <= held:
            return False
        task, conn = next(iter(self._waiting[largest].items()))
        self._leave(largest, task)         # its place is free now, not when the task has unwound
        try:
            # the handshake reads EOF (or fails to send) and closes it on its own path; shutdown
            # frees no descriptor number that a later accept could take while it still holds it
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.refused["evicted"] += 1
        _over_total.warning("connection of uid %d waiting for hello closed to make room for uid %d: %d "
                            "connections wait (server.max_prehello %d), uid %d holding the most",
                            largest, uid, self.waiting + 1, self._limits.max_prehello, largest)
        return True

    def _leave(self, uid: int, task: asyncio.Task) -> None:
        """A handshake ended (or was evicted): its place is free. Safe to call twice."""
        mine = self._waiting.get(uid)
        if mine is None or task not in mine:
            return
        del mine[task]
        self.waiting -= 1
        if not mine:
            del self._waiting[uid]

    def _turn_away(self, conn: socket.socket, reason: str, message: str) -> None:
        """Close ``conn`` at once, after one try at telling it why (its buffer is empty, so the
        error fits without waiting on the peer)."""
        self.refused[reason] += 1
        try:
            conn.send(wire.encode(wire.error(None, wire.E_OVERLOADED, message)), socket.MSG_DONTWAIT)
        except OSError:
            pass
        finally:
            conn.close()

    # readiness and stats ----------------------------------------------------------------------
    def blocked(self) -> str | None:
        """Why a connection arriving now would be turned away whatever its uid, or None. One
        ``dup`` finds the descriptor an accept would get (the lowest free one)."""
        if self._sock.fileno() < 0:
            return None                    # closed by the drain: health says draining
        if self.stuck_since is not None:
            return (f"accepting failed for lack of file descriptors {self._clock() - self.stuck_since:.2f} s "
                    f"ago (RLIMIT_NOFILE {self.fd_limit}); retrying")
        try:
            fd = os.dup(self._sock.fileno())
        except OSError as exc:
            return f"no file descriptor is left ({os.strerror(exc.errno)}; RLIMIT_NOFILE {self.fd_limit})"
        os.close(fd)
        if fd >= self.ceiling:
            return (f"only the reserve of file descriptors is left (the last {self.fd_limit - self.ceiling} "
                    f"below RLIMIT_NOFILE {self.fd_limit}: server.reserved_fds); {self.waiting} "
                    "connections wait for hello")
        return None

    def snapshot(self) -> dict:
        """Plain data for the admin ``stats`` and the Prometheus text (daemon/ops/metrics.py)."""
        why = self.blocked()
        return {"open": why is None, "blocked": why, "waiting_hello": self.waiting,
                "waiting_uids": len(self._waiting), "fd_limit": self.fd_limit,
                "reserved_fds": self.fd_limit - self.ceiling, "refused": dict(self.refused),
                "accept_errors": dict(self.accept_errors)}


def _open_spare() -> int | None:
    """The descriptor released to accept-and-close when the others run out (None if even this
    one cannot be had now)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
