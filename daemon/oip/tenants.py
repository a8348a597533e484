"""Network tenants: the bearer tokens file, and the principal each tenant is to the daemon.

A caller over TCP is named by a bearer token. The tokens file (``oip.tokens_file``) maps each token
to a tenant and its fair-share weight, one line each::

    # TOKEN                              TENANT      WEIGHT (default 1)
    3f6c0d...a9 (at least 16 characters) web-tier    2
    77e1b2...04                          batch-jobs

The file must belong to the daemon's user and be readable by it alone (no group or other bits),
else it is refused: anyone who reads it can act as every tenant.

A tenant is a principal as a local uid is: the daemon keys fair share, per-uid quotas, cache
privacy and the embedding store by a number, so a tenant gets one of its own, ``tenant_uid``: the
top bit set (0x80000000 and up, a range no login uid uses: Linux allocates users, containers
included, below 2**31) and 31 bits of a hash of the tenant's name. The number depends on the name
alone, so a tenant keeps its rows in the embedding store across restarts and edits of the file;
two names whose numbers collide are refused when the file is read. The daemon checks (in
daemon/front/principal.py) that a principal named as a tenant lies in this range and one named as
a local uid does not.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass

from ..errors import ConfigError

#: the first principal number of a tenant; local uids lie below
TENANT_BASE = 0x80000000
MIN_TOKEN_CHARS = 16
MAX_WEIGHT = 1000.0
#: the tenant every caller is when a door needs no token (oip.allow_anonymous_network, a loopback
#: TCP door without tokens_file, or gRPC on the Unix socket: grpcio does not tell a server its peer's uid)
ANONYMOUS = "anonymous"


def tenant_uid(name: str) -> int:
    """The principal number of tenant ``name`` (module docstring)."""
    digest = hashlib.blake2b(name.encode(), digest_size=4, person=b"inferd-tenant").digest()
    return TENANT_BASE | (int.from_bytes(digest, "little") & 0x7FFFFFFF)


def is_tenant_uid(uid: int) -> bool:
    return TENANT_BASE <= uid <= 0xFFFFFFFF


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float
    uid: int


class Tokens:
    """The tokens file, read once (``load``) and again by ``refresh`` when its mtime or size
    changed. ``tenant(token)`` compares in constant time per entry."""

    def __init__(self, path: str, entries: dict[bytes, Tenant], stamp: tuple):
        self.path = path
        self._entries = entries
        self._stamp = stamp

    @classmethod
    def load(cls, path: str) -> "Tokens":
        """Read and check ``path``; ConfigError says what is wrong and how to fix it."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise ConfigError(f"oip.tokens_file {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            check_private(path, st)
            with os.fdopen(os.dup(fd), encoding="utf-8") as fh:
                text = fh.read()
        finally:
            os.close(fd)
        return cls(path, parse(text, path), (st.st_mtime_ns, st.st_size, st.st_ino))

    def refresh(self) -> "Tokens":
        """This file read again if it changed (self if not, or if the new one is unreadable: a
        half-written edit must not lock every tenant out; the caller logs the error)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return self
        if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
            return self
        return Tokens.load(self.path)

    def tenant(self, token: str) -> Tenant | None:
        given = token.encode()
        found = None
        for known, tenant in self._entries.items():
            if hmac.compare_digest(known, given):
                found = tenant
        return found

    def tenants(self) -> list[Tenant]:
        return sorted(set(self._entries.values()), key=lambda t: t.name)


def check_private(path: str, st: os.stat_result) -> None:
    """A tokens file must be a regular file of the daemon's user, closed to group and others."""
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"oip.tokens_file {path}: not a regular file")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"oip.tokens_file {path}: owned by uid {st.st_uid}, not the daemon's user "
                          f"(uid {os.geteuid()}); chown it to the daemon's user")
    if st.st_mode & 0o077:
        raise ConfigError(f"oip.tokens_file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users "
                          "read it, and whoever reads it can act as every tenant; chmod 600 it")


def parse(text: str, path: str = "tokens") -> dict[bytes, Tenant]:
    """token -> Tenant from the file's text (module docstring); ConfigError names the line."""
    entries: dict[bytes, Tenant] = {}
    by_uid: dict[int, str] = {}
    weights: dict[str, float] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"oip.tokens_file {path} line {number}"
        if len(fields) not in (2, 3):
            raise ConfigError(f"{where}: expected TOKEN TENANT [WEIGHT], got {len(fields)} fields")
        token, name = fields[0], fields[1]
        if len(token) < MIN_TOKEN_CHARS or not token.isprintable():
            raise ConfigError(f"{where}: a token needs at least {MIN_TOKEN_CHARS} printable characters "
                              "(`openssl rand -hex 32` makes one)")
        try:
            weight = float(fields[2]) if len(fields) == 3 else 1.0
        except ValueError:
            raise ConfigError(f"{where}: weight {fields[2]!r} is not a number") from None
        if not 0 < weight <= MAX_WEIGHT:
            raise ConfigError(f"{where}: weight {weight:g} is out of range: more than 0, at most {MAX_WEIGHT:g}")
        if name in weights and weights[name] != weight:
            raise ConfigError(f"{where}: tenant {name!r} was given weight {weights[name]:g} before; "
                              "give every token of a tenant the same weight")
        uid = tenant_uid(name)
        if by_uid.setdefault(uid, name) != name:
            raise ConfigError(f"{where}: tenants {by_uid[uid]!r} and {name!r} map to the same principal "
                              f"number {uid}; rename one")
        if token.encode() in entries:
            raise ConfigError(f"{where}: this token is listed twice")
        weights[name] = weight
        entries[token.encode()] = Tenant(name, weight, uid)
    return entries


def fair_share_weights(path: str) -> dict:
    """The tenants' weights as dispatch.weights spells them ({"<principal number>": weight}), for
    the daemon's fair share; {} without a tokens file."""
    if not path:
        return {}
    return {str(t.uid): t.weight for t in Tokens.load(path).tenants()}
