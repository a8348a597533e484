"""The HAProxy agent-check listener (``[fleet] agent = HOST:PORT``): the host's weight and state, one
line per connection, for a balancer in front of a fleet (docs/fleet.md).

HAProxy's ``agent-check`` connects to ``agent-port`` every ``agent-inter``, may send its
``agent-send`` string, reads one line terminated by ``\\n`` and closes. The line is made of words
(HAProxy's configuration manual, "agent-check")::

    readiness (daemon/ops/readiness.py)   line sent                      HAProxy does
    ready                                 "up ready NN%"                 operational state UP (if its
                                                                         regular check agrees), admin
                                                                         state READY (undoes a drain),
                                                                         weight = configured x NN/100
    draining (SIGTERM, inferctl drain)    "drain #draining ..."          admin state DRAIN: no new
                                                                         requests, those in flight end
    starting, no device in rotation,      "down #REASON"                 operational state DOWN
    the door blocked

NN% is the host's capacity on one scale the whole fleet shares: ``100 x capacity_fps /
fleet.reference_fps``, rounded, at least 1 (0% would read as a drain) and at most MAX_PERCENT
(HAProxy caps a server's weight at 256: with the recommended ``weight 100`` on every server line,
256% is the most it can take). Servers configured with equal weights therefore get requests in
proportion to what their devices deliver; a host that loses a device reports less at the next check.
``maint`` is never sent: it stops HAProxy's own checks, and only the agent could undo it.

An agent that cannot be reached changes nothing in HAProxy (its regular ``check`` decides up or
down), so the listener comes up with the server, once the model is loaded and before the devices
warm it, and says ``down #starting`` until they have. A line that cannot be made (a bug) closes
that connection without one and is logged; the thread goes on.

Off the event loop: one thread of its own accepts, computes the line from ``assess`` (it reads a few
attributes, O(devices): daemon/ops/readiness.py says why that is safe beside the loop), writes it
and closes. A connection is never waited on: the reply goes out at once; what the peer sent
(``agent-send``) is read and dropped until it closes, for at most LINGER_S, so that closing never
resets the connection under a reply HAProxy has not read yet. At most MAX_LINGERING connections are
held so; beyond, the oldest is closed. A flood of connections costs this thread, never the loop.
"""
from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
from typing import Callable

from ..errors import ConfigError
from .logs import RateLimitedLog
from .readiness import DRAINING, Readiness

log = logging.getLogger("inferd.fleet")
_failed = RateLimitedLog(log)

MAX_PERCENT = 256
LINGER_S = 2.0                  # longest a replied connection is kept open waiting for the peer's close
MAX_LINGERING = 64


def parse_agent(value: str) -> tuple[str, int]:
    """(host, port) of ``fleet.agent`` (HOST:PORT, [V6]:PORT; port 0: any free port, for tests)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"fleet.agent: {value!r} is not HOST:PORT (e.g. 0.0.0.0:9777, [::]:9777, "
                          "10.0.0.5:9777: the address HAProxy's agent-port reaches)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port)


def agent_line(r: Readiness, reference_fps: float) -> str:
    """The agent-check reply for readiness ``r`` (the table in this module's docstring)."""
    if r.ready:
        return f"up ready {weight_percent(r.capacity_fps, reference_fps)}%\n"
    why = _one_line(r.reason or r.state)
    if r.state == DRAINING:
        return f"drain #{why}\n"
    return f"down #{why}\n"


def weight_percent(capacity_fps: float, reference_fps: float) -> int:
    """``capacity_fps`` as a percentage of ``reference_fps``, within 1..MAX_PERCENT."""
    return max(1, min(MAX_PERCENT, round(100.0 * capacity_fps / reference_fps)))


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


class AgentCheck:
    """Serves the agent line of ``readiness()`` on ``fleet.agent`` from a thread of its own until
    ``close()``. ConfigError if the address cannot be bound (exit 78 at start-up)."""

    def __init__(self, listen: str, reference_fps: float, readiness: Callable[[], Readiness]):
        host, port = parse_agent(listen)
        self.reference_fps = reference_fps
        self._readiness = readiness
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            self._sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise ConfigError(f"fleet.agent: cannot listen on {listen}: {exc.strerror or exc}") from None
        self._sock.setblocking(False)
        self.address = self._sock.getsockname()[:2]
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._capped = False
        self.checks = 0                     # lines sent (read by tests and stats; this thread writes)
        self._thread = threading.Thread(target=self._serve, name="inferd-agent-check", daemon=True)
        self._thread.start()
        log.info("fleet: HAProxy agent-check on %s:%d (100%% = %.1f frames/s, fleet.reference_fps)",
                 self.address[0], self.address[1], reference_fps)

    @property
    def port(self) -> int:
        return self.address[1]

    def line(self) -> str:
        r = self._readiness()
        if r.ready and 100.0 * r.capacity_fps / self.reference_fps > MAX_PERCENT and not self._capped:
            self._capped = True             # once: the scale is the operator's to fix
            log.warning("fleet: capacity %.0f frames/s is above %d%% of fleet.reference_fps (%.0f); "
                        "reporting %d%%: raise fleet.reference_fps on every host so that the fastest "
                        "reports 100%%", r.capacity_fps, MAX_PERCENT, self.reference_fps, MAX_PERCENT)
        return agent_line(r, self.reference_fps)

    # the thread -------------------------------------------------------------------------------
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        lingering: dict[socket.socket, float] = {}     # replied, waiting for the peer's close
        try:
            while True:
                now = time.monotonic()
                timeout = max(0.0, min(lingering.values()) - now) if lingering else None
                for key, _ in sel.select(timeout):
                    if key.data == "wake":
                        return
                    if key.data == "accept":
                        self._accept(sel, lingering)
                    else:
                        self._drop_input(sel, lingering, key.fileobj)
                now = time.monotonic()
                for conn in [c for c, until in lingering.items() if until <= now]:
                    self._forget(sel, lingering, conn)
        except Exception:  # a bug here must not pass silently: the balancer keeps the last state
            log.exception("fleet: the agent-check thread stopped")
        finally:
            for conn in list(lingering):
                self._forget(sel, lingering, conn)
            sel.close()

    def _accept(self, sel, lingering: dict) -> None:
        for _ in range(64):                 # what is waiting now, then back to select
            try:
                conn, _peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # EMFILE and kin: the connection waits in the backlog
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("fleet: agent-check cannot accept: %s", exc.strerror)
                    time.sleep(0.05)  # noqa: sleep-ok: back-off on descriptor exhaustion, this thread only
                    return
                raise
            conn.setblocking(False)
            try:
                line = self.line()
            except Exception as exc:        # a bug: no line (HAProxy keeps its last word), the thread goes on
                _failed.error("fleet: agent-check line failed: %r", exc)
                conn.close()
                continue
            try:
                conn.send(line.encode())    # a few bytes into an empty buffer: never blocks
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                conn.close()
                continue
            self.checks += 1
            if len(lingering) >= MAX_LINGERING:
                self._forget(sel, lingering, min(lingering, key=lingering.get))
            lingering[conn] = time.monotonic() + LINGER_S
            sel.register(conn, selectors.EVENT_READ, "conn")

    def _drop_input(self, sel, lingering: dict, conn) -> None:
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                        # the peer closed: so do we
            self._forget(sel, lingering, conn)

    @staticmethod
    def _forget(sel, lingering: dict, conn) -> None:
        lingering.pop(conn, None)
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def close(self) -> None:
        """Stop the thread and close the listener; idempotent."""
        if self._wake_w is None:
            return
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(timeout=5.0)
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_w = None
