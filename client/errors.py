"""Typed exceptions of the client library, one per error code the daemon sends.

Every exception carries ``code`` (the wire code, see inferd.shm.wire) and a message that says what
to do. Catch :class:`InferdError` for all of them.
"""
from __future__ import annotations

from ..shm import wire


class InferdError(Exception):
    """Base of every error this library raises."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class DaemonUnavailable(InferdError, ConnectionError):
    """No daemon answered within the request's deadline, or the connection broke on a Client made
    with ``reconnect=False`` (then open a new Client)."""

    code = "unavailable"


class ConnectionLost(DaemonUnavailable):
    """The connection broke (EOF, reset, broken pipe) or nothing listens on the socket path: what a
    daemon restart looks like from the client. A Client with ``reconnect=True`` retries it within
    the request's deadline; the application sees it only from a Client with ``reconnect=False``."""


class ShuttingDown(DaemonUnavailable):
    """The daemon is draining; its successor will take new connections."""

    code = wire.E_SHUTTING_DOWN


class ProtocolError(InferdError):
    """A frame or message the other side could not read (or a reply this library cannot)."""

    code = wire.E_BAD_FRAME


class InvalidInput(InferdError, ValueError):
    """The image or a request field is not acceptable; the message names the field and the range."""

    code = wire.E_INVALID_INPUT


class Overloaded(InferdError):
    """Admission refused: the daemon cannot take this request now. Retry after ``retry_after`` s."""

    code = wire.E_OVERLOADED

    def __init__(self, message: str, *, code: str | None = None, retry_after: float = 0.0):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class DeadlineExceeded(InferdError, TimeoutError):
    """The request's deadline passed before it was computed."""

    code = wire.E_DEADLINE_EXCEEDED


class PermissionDenied(InferdError, PermissionError):
    """This process's uid/gid is not on the daemon's allow-list."""

    code = wire.E_PERMISSION_DENIED


class InferenceFailed(InferdError):
    """The model raised on this request's batch; the message carries the daemon's error."""

    code = wire.E_INTERNAL


class NoHealthyDevice(InferdError):
    """Every device of the daemon is out of rotation (failed its health checks); retry later."""

    code = wire.E_NO_HEALTHY_DEVICE


class ReloadFailed(InferdError):
    """Admin socket: the new model could not be loaded or warmed; the old one still serves."""

    code = wire.E_RELOAD_FAILED


class UnknownModel(InvalidInput):
    """The request named a model (or a version) the daemon does not serve; the message lists the
    models it does (``Client.models``). A subclass of InvalidInput: the request was the fault."""

    code = wire.E_UNKNOWN_MODEL


_BY_CODE = {
    wire.E_BAD_FRAME: ProtocolError, wire.E_FRAME_TOO_LARGE: ProtocolError,
    wire.E_UNSUPPORTED_VERSION: ProtocolError, wire.E_UNKNOWN_OP: ProtocolError,
    wire.E_BAD_REQUEST: ProtocolError, wire.E_INVALID_INPUT: InvalidInput,
    wire.E_SLOT_BUSY: ProtocolError, wire.E_OVERLOADED: Overloaded,
    wire.E_DEADLINE_EXCEEDED: DeadlineExceeded, wire.E_PERMISSION_DENIED: PermissionDenied,
    wire.E_SHUTTING_DOWN: ShuttingDown, wire.E_INTERNAL: InferenceFailed,
    wire.E_NO_HEALTHY_DEVICE: NoHealthyDevice, wire.E_RELOAD_FAILED: ReloadFailed,
    wire.E_UNKNOWN_MODEL: UnknownModel,
}


def from_reply(reply: dict) -> InferdError:
    """The exception for an error reply (``ok`` false)."""
    code = reply.get("code")
    message = str(reply.get("message", "no message"))
    cls = _BY_CODE.get(code, ProtocolError)
    if cls is Overloaded:
        return Overloaded(message, code=code, retry_after=float(reply.get("retry_after_ms", 0)) / 1000.0)
    return cls(message, code=code if isinstance(code, str) else None)
