"""Where the OIP front listens and who each caller is: addresses, the listen policy, TLS, and
a caller's principal from its door.

    door                     caller is                                   how the front knows
    Unix socket, HTTP        the peer's uid (and gid, groups), as a      SO_PEERCRED, SO_PEERGROUPS of
                             client of the daemon's own socket is        the accepted connection
    Unix socket, gRPC        a tenant (bearer token), else "anonymous"   grpcio does not tell a server
                                                                         its peer's credentials
    TCP (HTTP or gRPC)       a tenant named by its bearer token; with    Authorization: Bearer TOKEN
                             no tokens_file, "anonymous"                 (gRPC: authorization metadata)

A TCP door on an address that is not loopback is refused without ``oip.tokens_file`` unless
``oip.allow_anonymous_network`` says so: every host that reaches the port would be served.
"""
from __future__ import annotations

import logging
import ssl
from ..errors import ConfigError
from .addresses import Address
from .backend import Principal
from .errors import OipError
from .tenants import ANONYMOUS, Tokens

log = logging.getLogger("inferd.oip")


def check_policy(address: Address, key: str, oip) -> None:
    """Refuse a non-loopback TCP door without tokens unless configured (module docstring)."""
    if address.unix or address.loopback or oip.tokens_file or oip.allow_anonymous_network:
        return
    raise ConfigError(f"{key} = {address}: not a loopback address, and without oip.tokens_file every "
                      "host that reaches it would be served; give tokens (oip.tokens_file), or set "
                      "oip.allow_anonymous_network = true if a firewall or balancer guards it")


def tls_context(oip) -> ssl.SSLContext | None:
    """The server-side TLS context of the TCP doors, or None (plain TCP)."""
    if not oip.tls_cert and not oip.tls_key:
        return None
    if not (oip.tls_cert and oip.tls_key):
        raise ConfigError("oip.tls_cert and oip.tls_key go together: give both, or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(oip.tls_cert, oip.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"oip.tls_cert / oip.tls_key: {exc}") from None
    return context


class Authenticator:
    """A caller's principal from its door: ``unix_peer`` for the HTTP Unix socket, ``bearer`` for
    every other door. The tokens file is re-read when it changes (at most once a second)."""

    def __init__(self, tokens_file: str, clock):
        self._tokens = Tokens.load(tokens_file) if tokens_file else None
        self._clock = clock
        self._checked = clock()

    @staticmethod
    def unix_peer(uid: int, gid: int, groups: tuple) -> Principal:
        return Principal.local(uid, gid, groups)

    def bearer(self, authorization: str | None, *, network: bool) -> Principal:
        """The tenant an ``Authorization`` value names. Without a tokens file every caller is the
        tenant "anonymous"; with one, a network caller must name a tenant (OipError
        unauthenticated), and a Unix-socket gRPC caller without a token is "anonymous"."""
        tokens = self._current()
        if tokens is None:
            return Principal.tenant(ANONYMOUS)
        if not authorization:
            if not network:
                return Principal.tenant(ANONYMOUS)
            raise OipError("unauthenticated", "this door needs a bearer token: send Authorization: Bearer "
                           "TOKEN (gRPC: authorization metadata); the operator lists tokens in oip.tokens_file")
        scheme, _, token = authorization.strip().partition(" ")
        tenant = tokens.tenant(token.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise OipError("unauthenticated", "the bearer token is not known; ask the operator for one "
                           "(oip.tokens_file)")
        return Principal.tenant(tenant.name)

    def _current(self) -> Tokens | None:
        if self._tokens is not None and self._clock() - self._checked >= 1.0:
            self._checked = self._clock()
            try:
                self._tokens = self._tokens.refresh()
            except ConfigError as exc:
                log.error("%s; the tokens read before stay in force", exc)
        return self._tokens
