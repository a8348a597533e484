"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, or nothing when it is unset.

Tests use the same channel as systemd to learn that the daemon is ready (READY=1 is sent only after
the model is loaded and warmed on every device and the socket accepts), so no test polls a path.
:func:`watchdog_interval` is sd_watchdog_enabled(3): how often systemd wants WATCHDOG=1 from us
(daemon/ops/sd_watchdog.py decides whether we have earned it).
"""
from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (such as "READY=1" or "STOPPING=1"); returns whether a manager was told.

    Never blocks: it is called on the event loop, and a manager that stops reading (a full
    datagram queue: Linux keeps net.unix.max_dgram_qlen of them) would otherwise freeze every
    client. Such a message is dropped; the next STATUS= or WATCHDOG=1 says the same again."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.connect(address)
            sock.send(state.encode())
    except OSError:          # BlockingIOError (queue full) included; EMFILE: no descriptor left
        return False         # for the socket (the watchdog task must not die of it)
    return True


def watchdog_interval(environ=os.environ, pid: int | None = None) -> float | None:
    """The watchdog timeout in seconds that systemd set for this process (``WatchdogSec=``), or
    None when there is none. Same rules as sd_watchdog_enabled(3): WATCHDOG_USEC must be a positive
    integer, and WATCHDOG_PID, when set, must be this process (a child that inherited the variables
    from us is not the one being watched). The variables are left in place: a child sees our
    WATCHDOG_PID and knows they are not for it."""
    raw = environ.get("WATCHDOG_USEC", "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(raw) / 1e6
