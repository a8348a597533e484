"""Errors of the OIP front, each with its HTTP status and gRPC code, and the client library's
errors (inferd.client.errors) mapped onto them.

    kind              HTTP  gRPC                 when
    invalid           400   INVALID_ARGUMENT     a tensor, shape, datatype or parameter the front
                                                 or the daemon cannot use
    unauthenticated   401   UNAUTHENTICATED      a TCP caller without a valid bearer token
    forbidden         403   PERMISSION_DENIED    the daemon's allow-list refuses the caller's uid
    not_found         404   NOT_FOUND            a model name or version this daemon does not serve
    too_large         413   RESOURCE_EXHAUSTED   a body over oip.max_request_bytes
    overloaded        429   RESOURCE_EXHAUSTED   the daemon's admission refused (Retry-After /
                                                 retry-after-ms metadata carry its hint)
    internal          500   INTERNAL             the model raised
    unavailable       503   UNAVAILABLE          no daemon, draining, no device in rotation
    deadline          504   DEADLINE_EXCEEDED    the request's deadline passed

The body of an HTTP error is OIP's ``{"error": "<message>"}``; a gRPC error is the status code
with the message as its details.
"""
from __future__ import annotations

import math

import grpc

from ...client import errors as client_errors

_KINDS = {
    "invalid": (400, grpc.StatusCode.INVALID_ARGUMENT),
    "unauthenticated": (401, grpc.StatusCode.UNAUTHENTICATED),
    "forbidden": (403, grpc.StatusCode.PERMISSION_DENIED),
    "not_found": (404, grpc.StatusCode.NOT_FOUND),
    "too_large": (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "overloaded": (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "internal": (500, grpc.StatusCode.INTERNAL),
    "unavailable": (503, grpc.StatusCode.UNAVAILABLE),
    "deadline": (504, grpc.StatusCode.DEADLINE_EXCEEDED),
}


class OipError(Exception):
    """One refused or failed request: ``kind`` (module docstring), a message that says what to do,
    and for ``overloaded`` the daemon's retry hint in seconds."""

    def __init__(self, kind: str, message: str, *, retry_after: float = 0.0):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after

    @property
    def http_status(self) -> int:
        return _KINDS[self.kind][0]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _KINDS[self.kind][1]

    def http_headers(self) -> dict:
        if self.kind == "overloaded":
            return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}
        return {}

    def grpc_trailers(self) -> tuple:
        if self.kind == "overloaded":
            return (("retry-after-ms", str(max(1, round(self.retry_after * 1000)))),)
        return ()


def from_client(exc: client_errors.InferdError) -> OipError:
    """The OipError for an error of the client library (what the daemon answered)."""
    message = str(exc)
    if isinstance(exc, client_errors.UnknownModel):     # a model unloaded since the front's hello
        return OipError("not_found", message)
    if isinstance(exc, client_errors.InvalidInput):
        return OipError("invalid", message)
    if isinstance(exc, client_errors.Overloaded):
        return OipError("overloaded", message, retry_after=exc.retry_after)
    if isinstance(exc, client_errors.DeadlineExceeded):
        return OipError("deadline", message)
    if isinstance(exc, client_errors.PermissionDenied):
        return OipError("forbidden", message)
    if isinstance(exc, (client_errors.DaemonUnavailable, client_errors.NoHealthyDevice)):
        return OipError("unavailable", message)
    return OipError("internal", message)
