"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, or nothing when it is unset.

Tests use the same channel as systemd to learn that the daemon is ready (READY=1 is sent only after
the model is loaded and warmed on every device and the socket accepts), so no test polls a path.
"""
from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (such as "READY=1" or "STOPPING=1"); returns whether a manager was told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True
