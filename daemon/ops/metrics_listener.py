"""The HTTP listener of the Prometheus text (``[metrics]``): where it listens and who may read it.

The admin socket (``inferctl metrics``) serves the full text to root, the daemon's user and
``server.admin_group``. The HTTP listener is for a scraper, and a host serves many users: what it
shows, and to whom, is the operator's choice, and the defaults show nobody anything they should
not see.

    door                      reachable by                         guarded by
    metrics.listen HOST:PORT  every local user (loopback TCP)      metrics.token_file, required
                                                                    unless metrics.allow_anonymous
    metrics.socket PATH       who may open the file (socket_mode,  the file mode; the token too
                              socket_group; 0600 by default)        when metrics.token_file is set

- Bearer token (``metrics.token_file``): a file of at least MIN_TOKEN_BYTES printable ASCII
  characters (surrounding whitespace ignored, as Prometheus's ``authorization: credentials_file``
  reads it), a regular file no other user may read. Every request must carry
  ``Authorization: Bearer TOKEN`` (compared in constant time), else 401 and nothing else. The file
  is read again when it changes (rotation needs no restart; one stat per request tells); if it
  goes missing or becomes readable by others, every request is refused (fail closed) until it is
  fixed.
- A door every local user can open without a token (TCP without a token, a socket whose mode lets
  others connect) needs ``metrics.allow_anonymous = true``: the operator's explicit choice to show
  the aggregate text to every local user.
- Per-uid series (``inferd_uid_*``: who uses the daemon, and how much) are never on these doors
  unless ``metrics.per_uid = true`` (daemon/ops/metrics.py picks the registry).

Both doors serve prometheus_client's MetricsHandler (text or OpenMetrics as the scraper asks, gzip)
from threads of their own; a scrape hands its snapshot call to the event loop (metrics.py).
"""
from __future__ import annotations

import grp
import hmac
import ipaddress
import logging
import os
import socket
import socketserver
import threading
from http.server import ThreadingHTTPServer

from prometheus_client.exposition import MetricsHandler

from ..caching.fleet.codec import read_secret     # one home for private files' checks
from ..errors import ConfigError
from ..front.listener import Listener, ListenerError, check_path_length

log = logging.getLogger("inferd.metrics")

#: A shorter token is refused at start-up: `openssl rand -hex 32` makes a good one.
MIN_TOKEN_BYTES = 16


def parse_listen(value: str) -> tuple[str, int]:
    """(host, port) of ``metrics.listen`` (HOST:PORT, [V6]:PORT); ConfigError unless loopback."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"metrics.listen: {value!r} is not HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"metrics.listen: {host!r} is not a loopback address; the listener binds "
                              "127.0.0.1, ::1 or localhost only (scrape from another host through a "
                              "proxy you secure)")
    return host, int(port)


def socket_gid(group: str) -> int | None:
    """The gid of ``metrics.socket_group`` (a name or a number), or None when unset."""
    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"metrics.socket_group: no group named {group!r} on this host") from None


def load_token(path: str) -> bytes:
    """The bearer token in ``metrics.token_file``; ConfigError if the file is missing, readable by
    others, or holds no usable token."""
    token = read_secret("metrics.token_file", path).strip()
    if len(token) < MIN_TOKEN_BYTES or not all(0x21 <= b <= 0x7E for b in token):
        raise ConfigError(f"metrics.token_file: {path} must hold one token of at least {MIN_TOKEN_BYTES} "
                          "printable ASCII characters without spaces (`openssl rand -hex 32 > FILE; "
                          "chmod 600 FILE`)")
    return token


def check_config(m) -> None:
    """Checks of ``[metrics]`` that involve several keys or a file (config.py runs them at
    start-up and reload). Raises ConfigError naming the key and what to do."""
    if m.listen:
        parse_listen(m.listen)
    if m.socket:
        check_path_length(m.socket, "metrics.socket")
        socket_gid(m.socket_group)
    if m.token_file:
        if not (m.listen or m.socket):
            raise ConfigError("metrics.token_file: there is no HTTP listener to guard; set metrics.listen "
                              "or metrics.socket (the admin socket needs no token)")
        load_token(m.token_file)
        return
    if m.allow_anonymous:
        return
    if m.listen:
        raise ConfigError(f"metrics.listen: every local user can connect to {m.listen}; set "
                          "metrics.token_file (the bearer token Prometheus sends with `authorization: "
                          "credentials_file`), or serve on metrics.socket instead, or set "
                          "metrics.allow_anonymous = true to show the aggregate metrics to every local user")
    if m.socket and m.socket_mode & 0o002:
        raise ConfigError(f"metrics.socket_mode: {m.socket_mode:04o} lets every local user connect to "
                          f"{m.socket}; use 0600 or 0660 with metrics.socket_group, or set "
                          "metrics.token_file, or metrics.allow_anonymous = true")


class BearerToken:
    """The token of ``metrics.token_file``, read again whenever the file changes (inode, size,
    mtime or ctime: a chmod too), and refusing everything while the file is unusable (fail
    closed)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._token: bytes | None = load_token(path)

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns     # ctime: chmod, chown

    def _current(self) -> bytes | None:
        with self._lock:
            signature = self._stat()
            if signature != self._signature:
                self._signature = signature
                try:
                    self._token = load_token(self.path)
                except ConfigError as exc:
                    self._token = None
                    log.error("metrics: refusing every scrape until metrics.token_file is usable: %s", exc)
            return self._token

    def admits(self, authorization: str | None) -> bool:
        token = self._current()
        scheme, _, given = (authorization or "").partition(" ")
        if token is None or scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("latin-1", "replace"), token)


class _Handler(MetricsHandler):
    """prometheus_client's handler behind the bearer token (``token`` None: no token asked)."""

    token: BearerToken | None = None

    def do_GET(self) -> None:
        if self.token is not None and not self.token.admits(self.headers.get("Authorization")):
            body = b"401 Unauthorized: send the bearer token of metrics.token_file\n"
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="inferd metrics"')
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()


class _TCPServer(ThreadingHTTPServer):
    daemon_threads = True


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class HttpListeners:
    """The doors ``m`` asks for, serving ``registry``; ``close()`` is idempotent. Raises ConfigError
    when a door cannot be opened."""

    def __init__(self, m, registry):
        check_config(m)
        token = BearerToken(m.token_file) if m.token_file else None
        handler = type("InferdMetricsHandler", (_Handler,), {"registry": registry, "token": token})
        guard = f"bearer token from {m.token_file}" if token else "no token"
        self._servers: list[tuple[socketserver.BaseServer, threading.Thread]] = []
        self._unix = None
        self.address: tuple[str, int] | None = None
        try:
            if m.listen:
                self.address = self._tcp(m.listen, handler)
                host, port = self.address
                log.info("metrics: http://%s:%d/metrics (%s)", f"[{host}]" if ":" in host else host, port, guard)
            if m.socket:
                self._unix_socket(m, handler)
                log.info("metrics: unix:%s /metrics (mode %04o%s; %s)", m.socket, m.socket_mode,
                         f", group {m.socket_group}" if m.socket_group else "", guard)
        except BaseException:
            self.close()
            raise

    def _tcp(self, listen: str, handler) -> tuple[str, int]:
        host, port = parse_listen(listen)

        class Server(_TCPServer):
            address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        try:
            server = Server((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"metrics.listen: cannot listen on {listen}: {exc.strerror or exc}") from None
        self._serve(server)
        return host, server.server_address[1]

    def _unix_socket(self, m, handler) -> None:
        gid = socket_gid(m.socket_group)
        try:
            self._unix = Listener.bind(m.socket, m.socket_mode)
        except ListenerError as exc:
            raise ConfigError(f"metrics.socket: {exc}") from None
        if gid is not None:
            os.chown(m.socket, -1, gid)
        server = _UnixServer(m.socket, handler, bind_and_activate=False)
        server.socket.close()
        server.socket = self._unix.sock
        server.socket.setblocking(True)
        self._serve(server)

    def _serve(self, server) -> None:
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                  name="inferd-metrics", daemon=True)
        thread.start()
        self._servers.append((server, thread))

    def close(self) -> None:
        """Stop serving (blocks up to the 0.5 s poll interval) and unlink the socket if ours."""
        servers, self._servers = self._servers, []
        for server, thread in servers:
            server.shutdown()
            thread.join(timeout=5.0)
            if not isinstance(server, _UnixServer):
                server.server_close()
        unix, self._unix = self._unix, None
        if unix is not None:
            unix.close()                        # closes the socket and unlinks the path if still ours
