"""A trusted front names the principal a session serves (the OIP front, daemon/oip/).

The daemon keys fair share, per-uid quotas, cache privacy and the embedding store by the uid of a
session's peer (SO_PEERCRED). A front that serves other callers (HTTP and gRPC, daemon/oip/)
connects as one process, so its hello may carry the principal the session serves::

    hello {"principal": {"uid": 1000, "gid": 1000, "groups": [27, 100]}}   a local caller, read
                                                                          by the front's SO_PEERCRED
    hello {"principal": {"tenant": "web-tier"}}                            a network tenant, named
                                                                          by a bearer token

Only a trusted peer may say this: root or the daemon's own user (the trust model's "who is
trusted"), checked by the kernel's SO_PEERCRED of this connection, never by anything the peer
sends. Anyone else who names a principal is refused (permission_denied), so an ordinary client
cannot act as another uid. The session then counts as the principal everywhere a uid counts: a
local caller still passes the allow-list (server.allow_uids / allow_gids) with its own uid and
groups; a tenant was authorised by the front's token check, and its number (daemon/oip/tenants.py)
must lie in the tenant range, as a local uid must lie below it.
"""
from __future__ import annotations

import os

from ...shm import wire
from ..oip.tenants import fair_share_weights, is_tenant_uid, tenant_uid
from .admission import Rejected

_MAX_GROUPS = 65536


def trusted(uid: int) -> bool:
    """Whether a peer of this uid may name the principal of its session."""
    return uid in (0, os.geteuid())


def adopt(hello: dict, peer: tuple, groups: tuple) -> tuple[tuple, tuple, bool]:
    """(peer, groups, authorised) for the session: the connection's own when hello names no
    principal; the principal's when a trusted peer names one (``authorised``: a tenant, whose
    token the front checked, passes the allow-list). Rejected otherwise."""
    claim = hello.get("principal")
    if claim is None:
        return peer, groups, False
    pid, uid, _ = peer
    if not trusted(uid):
        raise Rejected(wire.E_PERMISSION_DENIED, f"uid {uid} may not name another principal: only root "
                       "and the daemon's own user (a front such as the OIP front) may")
    if not isinstance(claim, dict):
        raise Rejected(wire.E_BAD_REQUEST, "principal must be a map: {uid, gid, groups} or {tenant}")
    if "tenant" in claim:
        name = claim["tenant"]
        if type(name) is not str or not 0 < len(name.encode()) <= 256:
            raise Rejected(wire.E_BAD_REQUEST, "principal tenant must be a name of 1 to 256 bytes")
        number = tenant_uid(name)
        return (pid, number, number), (), True
    p_uid, p_gid, p_groups = claim.get("uid"), claim.get("gid"), claim.get("groups", [])
    if not (_u32(p_uid) and _u32(p_gid) and isinstance(p_groups, list) and len(p_groups) <= _MAX_GROUPS
            and all(_u32(g) for g in p_groups)):
        raise Rejected(wire.E_BAD_REQUEST, "principal uid, gid and groups must be numbers from 0 to 2**32-2")
    if is_tenant_uid(p_uid):
        raise Rejected(wire.E_BAD_REQUEST, f"principal uid {p_uid} lies in the tenants' range; name a "
                       "tenant as {tenant: NAME}")
    return (pid, p_uid, p_gid), tuple(p_groups), False


def _u32(value) -> bool:
    return type(value) is int and 0 <= value < 0xFFFFFFFF


def weights(cfg) -> dict:
    """dispatch.weights with the network tenants' weights from oip.tokens_file added (keyed by
    their principal numbers), for the fair share of devices and of the loop's turns. Read once at
    start: a changed weight takes effect at the daemon's next start."""
    return {**fair_share_weights(cfg.oip.tokens_file), **(cfg.dispatch.weights or {})}
