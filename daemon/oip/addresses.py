"""Where an OIP door listens: ``oip.http`` / ``oip.grpc`` read into an Address.

Apart from daemon/oip/doors.py (which knows callers, and so the client library) because the
daemon's own process reads these too, to name the front's doors in ``health`` and ``info``
(daemon/oip/supervisor.py), and the daemon never imports the client library.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from ..errors import ConfigError
from ...shm import paths


@dataclass(frozen=True)
class Address:
    """A Unix socket path, or a TCP host and port."""
    path: str = ""
    host: str = ""
    port: int = 0

    @property
    def unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        return self.path or (f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}")

    @property
    def loopback(self) -> bool:
        if self.unix:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse(value: str, key: str, default_name: str, socket_path: str) -> Address | None:
    """``oip.http`` / ``oip.grpc``: "off" -> None; "" -> ``default_name`` beside the client
    socket; a value with a "/" -> a Unix socket path; else HOST:PORT ([v6]:PORT)."""
    if value == "off":
        return None
    if not value:
        return Address(path=os.path.join(os.path.dirname(paths.socket_path(socket_path)), default_name))
    if "/" in value:
        return Address(path=value)
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key} = {value!r}: a Unix socket path (with a /), HOST:PORT or \"off\"")
    return Address(host=host, port=int(port))
