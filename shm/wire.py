"""The socket protocol between a client and the daemon: frames, messages, error codes.

Frame (both directions)::

    0        4                      4 + length
    +--------+----------------------+
    | length |  msgpack body        |      length: u32, little-endian, bytes of body only
    +--------+----------------------+

The body is one msgpack map. The receiver checks ``length`` against its limit *before* it reads
the body, so a header announcing 4 GiB costs it nothing; such a frame is answered with
``frame_too_large`` and the connection is closed (the stream cannot be resynchronised). A body that
is not a msgpack map, or has trailing bytes, is ``bad_frame``; the framing is intact, so the
connection stays open. No pickle, no msgpack extension types: only maps, lists, str, int, float,
bool, nil.

Requests carry ``op`` and ``id`` (an int the client picks; replies are matched by id, so a client
may pipeline any number of requests up to its ring's slot count). Every reply carries ``id`` and
``ok``. The full message list is in docs/protocol.md; the keys live here as constants only where
code on both sides spells them.

Image bytes never travel in a frame: ``classify`` names a slot of the client's shared-memory ring
(see :mod:`inferd.shm.ring`) together with shape, dtype and byte count.
"""
from __future__ import annotations

import os
import struct

import msgpack

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<I")
HEADER_SIZE = HEADER.size

#: Default limit on a frame the daemon accepts from a client (requests are small).
DEFAULT_MAX_REQUEST_FRAME = 64 * 1024
#: Limit on a frame a client accepts from the daemon (hello carries the label list).
MAX_REPLY_FRAME = 16 * 1024 * 1024

# Error codes: the wire spelling. The client maps each to one exception class (inferd.client.errors).
E_BAD_FRAME = "bad_frame"                # body is not a msgpack map; connection stays open
E_FRAME_TOO_LARGE = "frame_too_large"    # length over the limit; connection is closed
E_UNSUPPORTED_VERSION = "unsupported_version"
E_UNKNOWN_OP = "unknown_op"
E_BAD_REQUEST = "bad_request"            # a field missing or of the wrong type
E_INVALID_INPUT = "invalid_input"        # slot/shape/dtype/nbytes/top_k fails validation
E_SLOT_BUSY = "slot_busy"                # the slot already has a request in flight
E_OVERLOADED = "overloaded"              # admission refused; see retry_after_ms
E_DEADLINE_EXCEEDED = "deadline_exceeded"
E_PERMISSION_DENIED = "permission_denied"
E_SHUTTING_DOWN = "shutting_down"
E_INTERNAL = "internal"                  # the model raised; the message says what
E_NO_HEALTHY_DEVICE = "no_healthy_device"  # every device is out of rotation
E_RELOAD_FAILED = "reload_failed"        # admin socket: the new model cannot serve; the old one does

ERROR_CODES = frozenset({
    E_BAD_FRAME, E_FRAME_TOO_LARGE, E_UNSUPPORTED_VERSION, E_UNKNOWN_OP, E_BAD_REQUEST,
    E_INVALID_INPUT, E_SLOT_BUSY, E_OVERLOADED, E_DEADLINE_EXCEEDED, E_PERMISSION_DENIED,
    E_SHUTTING_DOWN, E_INTERNAL, E_NO_HEALTHY_DEVICE, E_RELOAD_FAILED,
})

_packer = msgpack.Packer(use_bin_type=True)


def default_socket_path() -> str:
    """Where the daemon listens unless configured: ``/run/inferd/inferd.sock`` as root, else
    ``$XDG_RUNTIME_DIR/inferd/inferd.sock``, else ``/tmp/inferd-<uid>/inferd.sock``."""
    if os.geteuid() == 0:
        return "/run/inferd/inferd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "inferd", "inferd.sock")
    return f"/tmp/inferd-{os.geteuid()}/inferd.sock"


class FrameError(Exception):
    """A frame that cannot be decoded. ``code`` is one of the E_* constants."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def encode(message: dict) -> bytes:
    """One frame: header plus msgpack body."""
    body = _packer.pack(message)
    return HEADER.pack(len(body)) + body


def _no_ext(code: int, data: bytes):
    raise FrameError(E_BAD_FRAME, f"msgpack extension type {code} is not allowed")


def decode_body(body: bytes | memoryview) -> dict:
    """Decode one frame body; raises FrameError(bad_frame) unless it is exactly one msgpack map."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext,
                                  timestamp=0)
    except FrameError:
        raise
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        # ExtraData, OutOfData, FormatError and StackError are ValueError subclasses.
        raise FrameError(E_BAD_FRAME, f"frame body is not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError(E_BAD_FRAME, f"frame body must be a msgpack map, got {type(message).__name__}")
    return message


class FrameReader:
    """Splits a byte stream into decoded messages, enforcing ``max_frame`` before buffering a body.

    ``feed(data)`` returns the messages completed by ``data``; a body that fails to decode is
    returned in place as a FrameError instance (the stream stays in sync, the caller answers it).
    An over-long header raises FrameError(frame_too_large): the caller must close the stream.
    """

    __slots__ = ("_buf", "_max")

    def __init__(self, max_frame: int):
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list:
        buf = self._buf
        buf += data
        out = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > self._max:
                raise FrameError(E_FRAME_TOO_LARGE,
                                 f"frame of {length} bytes announced; the limit is {self._max} bytes")
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            try:
                out.append(decode_body(bytes(buf[start:start + length])))
            except FrameError as exc:
                out.append(exc)
            pos = start + length
        if pos:
            del buf[:pos]
        return out

    def pending(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buf)


def error(request_id, code: str, message: str, **extra) -> dict:
    """An error reply. ``request_id`` is None when the failing frame had no usable id."""
    reply = {"id": request_id, "ok": False, "code": code, "message": message}
    reply.update(extra)
    return reply
