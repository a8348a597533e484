"""The admin socket: operators' operations, apart from the socket applications use.

A second Unix socket (``server.admin_socket``, default ``admin.sock`` beside the client socket),
mode 0600, or 0660 with group ``server.admin_group``. Every peer's credentials come from the
kernel (SO_PEERCRED, and SO_PEERGROUPS for supplementary groups): root, the daemon's own uid, and
members of the admin group are served; anyone else gets ``permission_denied`` and is disconnected.

Same framing as the client protocol (inferd.shm.wire: u32 length + one msgpack map), one request
at a time per connection, each answered before the next is read::

    op           fields                         reply (besides id, ok)
    health       -                              state (starting|ready|draining), ready, reason
                                                (why not ready, or None), live, door (why new
                                                connections are refused, or None), capacity_fps,
                                                agent {address, line, reference_fps} or None,
                                                model {name, digest, gen}, devices [{index, name,
                                                state}], in_rotation (daemon/ops/readiness.py)
    stats        -                              the structured statistics (Server.stats_snapshot)
    metrics      -                              text: Prometheus exposition format
    reload       model (optional: built-in      changed, model {name, digest, gen}, previous,
                 name or file path); section    seconds; error reload_failed: the old model serves
                 (optional: a whole [model]
                 table); set (optional: [model]
                 keys on top), checked as at
                 start-up (daemon/ops/reload.py);
                 name, version: which served
                 model it swaps (required when
                 several are served)
    drain        -                              draining, outstanding: the daemon drains and exits
    flush_cache  -                              dropped, generation
    device       index, action (disable|enable) device {index, name, state}, in_rotation
    promote      model (a name), version        promoted {name, version}, route: every request
                 (optional: the canary)         naming no version gets it from now on
                                                (daemon/models/catalog.py); unknown_model else
    models       -                              models [{name, version, route, default, devices,
                                                share, digest, gen, inflight, state (serving |
                                                unloading)}, ...], routes, default_model
    load         name, model (a file path or    loaded {name, version, digest, gen}, route,
                 a built-in name), version,     seconds: served from the next request on
                 devices, share, canary_percent, (NOTE [ live models ] in daemon/ops/model_ops.py);
                 canary_uids; set: any other    invalid_input (a bad key, served already),
                 [[models]] keys                reload_failed (does not load): nothing changed
    unload       name, version (optional:       unloaded [{name, version, digest, gen}], answered
                 every version of the name)     (its requests admitted before, all answered),
                                                seconds: replied once it is freed; unknown_model

Errors are the client protocol's (``bad_request``, ``unknown_op``, ``invalid_input``, ...) plus
``reload_failed``. ``inferctl`` (inferd.client.cli) is the command-line face of this socket.
"""
from __future__ import annotations

import asyncio
import logging
import os

from .listener import Listener, group_gid, peer_credentials, peer_groups
from ..ops.logs import RateLimitedLog
from ..ops.model_ops import ModelOpError
from ..ops.reload import ReloadError
from .admission import Rejected
from ...shm import wire

from ..pipeline import thread_pools

log = logging.getLogger("inferd.admin")
_refused = RateLimitedLog(log, interval=10.0)

MAX_CONNECTIONS = 32            # concurrent admin connections (inferctl top holds one)
MAX_FRAME = 64 * 1024
OPS = ("health", "stats", "metrics", "reload", "drain", "flush_cache", "device", "promote", "models", "load",
       "unload")


class AdminServer:
    """Serves the admin socket for ``server`` (daemon/server.py) until closed."""

    def __init__(self, server, path: str, group: str):
        self.server = server
        self.gid = group_gid("server.admin_group", group)
        self.listener = Listener.bind(path, 0o660 if self.gid is not None else 0o600)
        if self.gid is not None:
            os.chown(path, -1, self.gid)
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()

    @property
    def path(self) -> str:
        return self.listener.path

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, sock=self.listener.sock)

    def close(self) -> None:
        """Stop serving, drop connections, unlink the socket; idempotent."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._conns):
            task.cancel()
        self.listener.close()

    def allowed(self, sock) -> tuple[bool, tuple]:
        pid, uid, gid = peer = peer_credentials(sock)
        if uid in (0, os.geteuid()):
            return True, peer
        if self.gid is not None and (gid == self.gid or self.gid in peer_groups(sock)):
            return True, peer
        return False, peer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            ok, peer = self.allowed(writer.get_extra_info("socket"))
            if not ok or len(self._conns) > MAX_CONNECTIONS:
                why = (f"uid {peer[1]} may not use the admin socket; it is for root, the daemon's user"
                       " and members of server.admin_group" if not ok else
                       f"{MAX_CONNECTIONS} admin connections are open")
                code = wire.E_PERMISSION_DENIED if not ok else wire.E_OVERLOADED
                _refused.warning("admin connection from pid %d refused: %s", peer[0], why)
                writer.write(wire.encode(wire.error(None, code, why)))
                await writer.drain()
                return
            while True:
                try:
                    header = await reader.readexactly(wire.HEADER_SIZE)
                except asyncio.IncompleteReadError:
                    return
                (length,) = wire.HEADER.unpack(header)
                if length > MAX_FRAME:
                    writer.write(wire.encode(wire.error(None, wire.E_FRAME_TOO_LARGE,
                                                        f"frame of {length} bytes; the limit is {MAX_FRAME}")))
                    await writer.drain()
                    return
                body = await reader.readexactly(length)
                try:
                    msg = wire.decode_body(body)
                except wire.FrameError as exc:
                    reply = wire.error(None, exc.code, str(exc))
                else:
                    reply = await self.handle(msg, peer)
                writer.write(wire.encode(reply))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._conns.discard(task)
            writer.close()

    async def handle(self, msg: dict, peer: tuple) -> dict:
        rid = msg.get("id")
        if type(rid) is not int:
            return wire.error(None, wire.E_BAD_REQUEST, f"id must be an integer, got {rid!r}")
        op = msg.get("op")
        server = self.server
        try:
            if op == "health":
                body = server.health()
            elif op == "stats":
                body = server.stats_snapshot()
                body["threads"] = thread_pools.snapshot()     # NOTE [ thread pools ] in daemon/pipeline/thread_pools.py
            elif op == "metrics":
                body = {"text": server.metrics_text().decode()}
            elif op == "reload":
                source = msg.get("model")
                if source is not None and (not isinstance(source, str) or not source or len(source) > 4096):
                    raise Rejected(wire.E_INVALID_INPUT, "model must be a built-in name or a file path")
                section, settings = msg.get("section"), msg.get("set")
                log.info("reload asked by pid %d uid %d: %s%s%s", peer[0], peer[1], source or "the configured model",
                         f", section {section}" if section is not None else "", f", set {settings}" if settings else "")
                try:
                    name, version = msg.get("name"), msg.get("version")
                    served = server.swap.target(name, version)     # several models: the one named
                    configured = served.config if served.config is not None else server.cfg.model
                    body = await server.swap.reload(configured, source, section, settings, served)
                except ReloadError as exc:
                    raise Rejected(wire.E_RELOAD_FAILED, str(exc)) from None
            elif op == "drain":
                body = server.request_drain(f"admin drain by pid {peer[0]} uid {peer[1]}")
            elif op == "flush_cache":
                body = server.flush_cache(peer)
            elif op == "promote":
                body = server.promote(msg.get("model"), msg.get("version"), f"pid {peer[0]} uid {peer[1]}")
            elif op == "models":
                body = server.models.describe()
            elif op in ("load", "unload"):
                body = await self._model_op(op, msg, peer)
            elif op == "device":
                index, action = msg.get("index"), msg.get("action")
                if type(index) is not int or not 0 <= index < len(server.devices):
                    raise Rejected(wire.E_INVALID_INPUT, f"index {index!r} is out of range: 0 to "
                                   f"{len(server.devices) - 1} (inferctl stats lists the devices)")
                if action not in ("disable", "enable"):
                    raise Rejected(wire.E_INVALID_INPUT, f"action {action!r} is not disable or enable")
                body = server.set_device(index, action == "enable", f"pid {peer[0]} uid {peer[1]}")
            else:
                raise Rejected(wire.E_UNKNOWN_OP, f"unknown op {op!r}; admin ops are {', '.join(OPS)}")
        except Rejected as exc:
            return wire.error(rid, exc.code, str(exc), **exc.extra)
        except Exception as exc:  # a bug here must not cost the operator the connection unanswered
            log.exception("admin op %r failed", op)
            return wire.error(rid, wire.E_INTERNAL, f"{type(exc).__name__}: {exc}")
        return {"id": rid, "ok": True, **body}

    async def _model_op(self, op: str, msg: dict, peer: tuple) -> dict:
        """load or unload (daemon/ops/model_ops.py); Rejected with its code says why nothing changed."""
        models = self.server.models
        who = f"pid {peer[0]} uid {peer[1]}"
        try:
            if op == "load":
                entry = models.entry(msg)
                log.info("load of model %s version %d asked by %s", entry.name, entry.version, who)
                return await models.load(entry)
            log.info("unload of model %s%s asked by %s", msg.get("name"),
                     f" version {msg['version']}" if msg.get("version") is not None else "", who)
            return await models.unload(msg.get("name"), msg.get("version"))
        except ModelOpError as exc:
            log.error("%s refused: %s", op, exc)
            raise Rejected(exc.code, str(exc)) from None
