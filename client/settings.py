"""What a client is opened with, one home for Client and AsyncClient: both constructors take the
same arguments and hand them to ClientSettings, so the two cannot read them differently, and both
open a session (connect + hello, blocking) through ``_open_connection``; what differs is only how
each waits for it (inferd.client.client: under its lock; inferd.client.aio: in a worker thread).
"""
from __future__ import annotations

import time

from . import errors
from .connection import Connection
from ..shm import paths


def default_socket_path() -> str:
    """$INFERD_SOCKET, else the daemon's own default (inferd.shm.paths, the rules both sides share)."""
    return paths.socket_path()


class ClientSettings:
    """The settings of one client, as its constructor was given them:

    - ``socket_path``: the daemon's socket; None: default_socket_path().
    - ``ring_slots``: the slots wanted in this client's ring; 0: the daemon's default.
    - ``timeout``: seconds, the default deadline of each request.
    - ``connect_timeout``: seconds a new client waits for a daemon (with ``reconnect``), and the
      bound on one connect.
    - ``cache``: answer repeated frames from the daemon's read-only result cache.
    - ``reconnect``: wait for a daemon at first and ride out its restarts (inferd.client.client).
    - ``model``: the model (name) a call that names none asks for; None: the daemon's default.
      ``version``: its version; None: whichever the daemon's route gives (docs/protocol.md).

    ``socket_path``, ``timeout`` and ``reconnect`` are public attributes; the others are read
    only by ``_open_connection``. ``_clock`` is the monotonic clock deadlines are taken from.
    """

    def __init__(self, socket_path: str | None, *, ring_slots: int, timeout: float,
                 connect_timeout: float, cache: bool, reconnect: bool, model: str | None = None,
                 version: int | None = None):
        self.socket_path = socket_path or default_socket_path()
        self.model_name = model
        self.model_version = version
        self.timeout = timeout
        self.reconnect = reconnect
        self._ring_slots = ring_slots
        self._connect_timeout = connect_timeout
        self._use_cache = cache
        self._clock = time.monotonic

    def _target(self, model: str | None, version: int | None) -> tuple:
        """(ModelInfo, request fields, local lookups allowed) of a call's model: its argument, else
        the client's (inferd.client.protocol ProtocolCore.target). UnknownModel if not served."""
        if model is None and version is None:
            model, version = self.model_name, self.model_version
        return self._core.target(model, version)

    def _should_list_models(self, exc: Exception) -> bool:
        """After UnknownModel from ``_target``: ask the daemon's ``info`` for its models now (a
        model loaded live since hello), then try once more? (ProtocolCore.may_list_models)"""
        return isinstance(exc, errors.UnknownModel) and self._core is not None \
            and self._core.may_list_models(self._clock())

    def _open_connection(self, hello_timeout: float) -> Connection:
        """Connect and say hello with these settings, blocking; the connect is bounded by
        ``connect_timeout`` (or ``hello_timeout`` if shorter), the hello by ``hello_timeout``.
        Raises what Connection.open raises."""
        return Connection.open(self.socket_path, ring_slots=self._ring_slots, use_cache=self._use_cache,
                               connect_timeout=min(self._connect_timeout, hello_timeout),
                               hello_timeout=hello_timeout)
