"""The socket protocol between a client and the daemon: frames, messages, error codes.

Frame (both directions)::

    0        4                      4 + length
    +--------+----------------------+
    | length |  msgpack body        |      length: u32, little-endian, bytes of body only
    +--------+----------------------+

The body is one msgpack map. The receiver checks ``length`` against its limit *before* it reads
the body, so a header announcing 4 GiB costs it nothing; such a frame is answered with
``frame_too_large`` and the connection is closed (the stream cannot be resynchronised). A body that
is not a msgpack map, has trailing bytes, or nests maps and lists deeper than the reader allows
(``MAX_REQUEST_DEPTH`` levels in a request) is ``bad_frame``; the framing is intact, so the
connection stays open. No pickle, no msgpack extension types: only maps, lists, str, int, float,
bool, nil.

Why a depth bound: msgpack itself refuses nesting past 1024 levels (StackError), but a body of
1000 nested lists decodes, and then any ``repr`` of it (an error message naming the bad field)
raises RecursionError far from the frame that caused it. A request has no use for more than two
levels, so the reader refuses more before anything looks at the message.

Requests carry ``op`` and ``id`` (an int the client picks; replies are matched by id, so a client
may pipeline any number of requests up to its ring's slot count). Every reply carries ``id`` and
``ok``. The full message list is in docs/protocol.md; the keys live here as constants only where
code on both sides spells them. The bounds on their values are in :mod:`inferd.shm.limits`, the
socket paths in :mod:`inferd.shm.paths`.

A client may send many classify requests in one ``classify_many`` message, and the daemon then
answers it a ``replies`` message carrying every reply of one batch for that client, so a client
feeding a device pays one frame a batch rather than one a request either way.

Image bytes never travel in a frame: ``classify`` names a slot of the client's shared-memory ring
(see :mod:`inferd.shm.ring`) together with shape, dtype and byte count. A classify of a frame the
client decoded from a JPEG/PNG/WebP file may also name a second slot holding those encoded bytes
(``upload_slot``, ``upload_nbytes``); the daemon verifies them and keys the answer by them too
(NOTE [ encoded uploads ] in daemon/caching/results.py).
"""
from __future__ import annotations

import struct
from itertools import chain

import msgpack

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<I")
HEADER_SIZE = HEADER.size

#: Default limit on a frame the daemon accepts from a client (requests are small).
DEFAULT_MAX_REQUEST_FRAME = 64 * 1024
#: Limit on a frame a client accepts from the daemon (hello carries the label list).
MAX_REPLY_FRAME = 16 * 1024 * 1024

#: Nesting a request body may have: its map (1), a list in it such as ``shape`` (2), two to spare.
MAX_REQUEST_DEPTH = 4
#: Nesting accepted by default (replies: info, stats); far below what repr() can recurse through.
MAX_DEPTH = 32

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
E_UNKNOWN_MODEL = "unknown_model"        # the request names a model or version not served; the message lists them

ERROR_CODES = frozenset({
    E_BAD_FRAME, E_FRAME_TOO_LARGE, E_UNSUPPORTED_VERSION, E_UNKNOWN_OP, E_BAD_REQUEST,
    E_INVALID_INPUT, E_SLOT_BUSY, E_OVERLOADED, E_DEADLINE_EXCEEDED, E_PERMISSION_DENIED,
    E_SHUTTING_DOWN, E_INTERNAL, E_NO_HEALTHY_DEVICE, E_RELOAD_FAILED, E_UNKNOWN_MODEL,
})

#: classify: the ring slot holding the encoded file the frame was decoded from, and its length.
UPLOAD_SLOT = "upload_slot"
UPLOAD_NBYTES = "upload_nbytes"

#: Many classify requests in one message: ``id`` is the first request's id, ``slots`` their slots
#: (request i: id + i, slots[i]), every other field shared (docs/protocol.md). At most
#: MAX_BATCH_REQUESTS slots; the daemon says it takes them in hello (``limits.max_batch_requests``).
CLASSIFY_MANY = "classify_many"
MAX_BATCH_REQUESTS = 256
#: A message of many replies, one per request (a batch's replies to one session, in one write):
#: ``{"replies": [reply, ...]}``, no ``id`` of its own. Sent only to a client that sent classify_many.
REPLIES = "replies"
#: Plain classify answers of one batch to one session, packed: no map per answer, no list per
#: pair, so neither side walks K small objects (docs/protocol.md, "answers"):
#: ``{"answers": [id, ...], "k": <int32 pairs per answer>, "top": <(int32 index, float64 score)
#: pairs, answer after answer>, "gen": generation, "cached": <a byte per answer, 1: cached>}``,
#: little-endian, no ``id`` of its own (``gen`` and ``cached`` only where some answer has one). Sent
#: only to a client whose classify_many said ``"answers": 1`` (it reads them); anything an answer
#: needs beyond id, top, gen and cached (an error, a model's description, logits) goes as a reply.
ANSWERS = "answers"
_chain = chain.from_iterable
_K = struct.Struct("<i")
_PAIR = struct.Struct("<id")
_packs: dict[int, struct.Struct] = {}

_packer = msgpack.Packer(use_bin_type=True)


def pack_answers(ids: list, ks: list, tops: list, gen: int, cached: list | None = None) -> bytes:
    """One ``answers`` frame: request ``ids[i]`` answered with the pairs ``tops[i]`` (``ks[i]`` of
    them: [[index, score], ...], best first) by generation ``gen`` (0: unstamped); ``cached[i]``
    true: that answer came from the daemon's result cache (as a reply's ``cached``)."""
    n = len(ids)
    flat = list(_chain(_chain(tops)))         # index, score, index, score, ... (C loops)
    pairs = len(flat) // 2
    fmt, ks_fmt = _packs.get(pairs), _packs.get(-n)
    if fmt is None or ks_fmt is None:
        if len(_packs) > 256:               # (sizes come and go with the load: keep a few)
            _packs.clear()
        fmt = _packs[pairs] = struct.Struct("<" + "id" * pairs)
        ks_fmt = _packs[-n] = struct.Struct(f"<{n}i")
    body = {ANSWERS: ids, "k": ks_fmt.pack(*ks), "top": fmt.pack(*flat)}
    if gen:
        body["gen"] = gen
    if cached is not None and any(cached):
        body["cached"] = bytes(map(bool, cached))
    return encode(body)


def unpack_answers(message: dict) -> list[dict]:
    """The replies an ``answers`` message carries, each as the ``{"id", "ok", "top", "gen"}`` reply
    it stands for (``top`` as (index, score) tuples). Raises FrameError(bad_frame) for one that
    does not add up."""
    ids, ks, top, gen = message.get(ANSWERS), message.get("k"), message.get("top"), message.get("gen")
    if (type(ids) is not list or type(ks) is not bytes or type(top) is not bytes
            or len(ks) != _K.size * len(ids) or len(top) % _PAIR.size or (gen is not None and type(gen) is not int)):
        raise FrameError(E_BAD_FRAME, "an answers message whose ids, k and top do not match")
    counts = struct.unpack(f"<{len(ids)}i", ks)
    flat = list(_PAIR.iter_unpack(top))
    cached = message.get("cached", b"")
    if sum(counts) != len(flat) or any(k < 0 for k in counts) or type(cached) is not bytes \
            or len(cached) not in (0, len(ids)):
        raise FrameError(E_BAD_FRAME, "an answers message whose ids, k, top and cached do not match")
    out, pos = [], 0
    for n, (rid, k) in enumerate(zip(ids, counts)):
        reply = {"id": rid, "ok": True, "top": flat[pos:pos + k]}
        if gen is not None:
            reply["gen"] = gen
        if cached and cached[n]:
            reply["cached"] = True
        out.append(reply)
        pos += k
    return out


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


def _depth_over(message: dict, limit: int) -> bool:
    """Whether maps and lists nest deeper than ``limit`` in ``message`` (a flat map is depth 1).
    Iterative, and it stops descending at the limit: msgpack allows 1024 levels, we never recurse."""
    stack = [(message, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > limit:
            return True
        for item in (obj.values() if type(obj) is dict else obj):
            if type(item) is list or type(item) is dict:
                stack.append((item, depth + 1))
    return False


#: Every byte that is not the first byte of a msgpack map or array header (fixmap, fixarray,
#: array 16/32, map 16/32): deleting them from a body leaves at most one byte per container.
_NOT_CONTAINER = bytes(b for b in range(256) if not (0x80 <= b <= 0x9f or 0xdc <= b <= 0xdf))


def _surely_shallow(body, limit: int) -> bool:
    """Whether ``body`` cannot nest deeper than ``limit``: each level needs one container header,
    so a body with at most ``limit`` bytes that could start one (payload bytes of strings and
    numbers may look like one too: those only make this answer False) has at most ``limit``
    levels. One C pass over the body, where walking the decoded message costs a Python loop."""
    return len(bytes(body).translate(None, _NOT_CONTAINER)) <= limit


def decode_body(body: bytes | memoryview, max_depth: int = MAX_DEPTH) -> dict:
    """Decode one frame body; raises FrameError(bad_frame) unless it is exactly one msgpack map
    whose maps and lists nest at most ``max_depth`` levels (the map itself is level 1)."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext,
                                  timestamp=0)
    except FrameError:
        raise
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        # ExtraData, OutOfData, FormatError and StackError (over 1024 levels) are ValueError
        # subclasses; RecursionError only from msgpack's pure-Python fallback.
        reason = exc or type(exc).__name__
        raise FrameError(E_BAD_FRAME, f"frame body is not valid msgpack: {reason}") from None
    if not isinstance(message, dict):
        raise FrameError(E_BAD_FRAME, f"frame body must be a msgpack map, got {type(message).__name__}")
    if not _surely_shallow(body, max_depth) and _depth_over(message, max_depth):
        raise FrameError(E_BAD_FRAME, f"frame body nests maps and lists deeper than {max_depth} levels")
    return message


class FrameReader:
    """Splits a byte stream into decoded messages, enforcing ``max_frame`` before buffering a body.

    ``feed(data)`` returns the messages completed by ``data``; a body that fails to decode is
    returned in place as a FrameError instance (the stream stays in sync, the caller answers it).
    An over-long header raises FrameError(frame_too_large): the caller must close the stream.

    A server that must bound its work per event splits ``feed`` in two: ``append(data)``, then
    ``take(max_frames, max_bytes)`` as often as it likes; what is not taken stays buffered
    (``has_frame()`` says whether a whole frame waits, ``pending()`` counts the bytes).
    """

    __slots__ = ("_buf", "_pos", "_max", "_depth", "taken")

    def __init__(self, max_frame: int, max_depth: int = MAX_DEPTH):
        self._buf = bytearray()
        self._pos = 0                      # start of the first frame not yet taken
        self._max = max_frame
        self._depth = max_depth
        self.taken = 0                     # frames taken so far (tells one partial frame from the next)

    def feed(self, data: bytes) -> list:
        self.append(data)
        return self.take()

    def append(self, data: bytes) -> None:
        self._buf += data

    def take(self, max_frames: int | None = None, max_bytes: int | None = None) -> list:
        """Decode whole frames from the buffer: at most ``max_frames``, and stop after the frame
        that reaches ``max_bytes`` of bodies (None: no bound). Raises FrameError(frame_too_large)
        on a header over the limit, before its body is buffered."""
        buf = self._buf
        out = []
        pos = self._pos
        end = len(buf)
        budget = max_bytes if max_bytes is not None else -1
        while end - pos >= HEADER_SIZE and (max_frames is None or len(out) < max_frames):
            (length,) = HEADER.unpack_from(buf, pos)
            if length > self._max:
                self._pos = pos
                raise FrameError(E_FRAME_TOO_LARGE,
                                 f"frame of {length} bytes announced; the limit is {self._max} bytes")
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            try:
                out.append(decode_body(bytes(buf[start:start + length]), self._depth))
            except FrameError as exc:
                out.append(exc)
            pos = start + length
            if budget >= 0:
                budget -= length
                if budget <= 0:
                    break
        self.taken += len(out)
        # Drop what was taken only once it is most of the buffer: a backlog taken a few frames
        # per turn then costs one move of the rest now and then, not one per turn.
        if pos and (pos >= 65536 or 2 * pos >= end):
            del buf[:pos]
            pos = 0
        self._pos = pos
        return out

    def has_frame(self) -> bool:
        """Whether a whole frame (or a header over the limit, which ``take`` raises on) waits."""
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            return False
        (length,) = HEADER.unpack_from(self._buf, self._pos)
        return length > self._max or avail - HEADER_SIZE >= length

    def pending(self) -> int:
        """Bytes received but not yet taken (when ``has_frame()`` is false: one partial frame)."""
        return len(self._buf) - self._pos


def error(request_id, code: str, message: str, **extra) -> dict:
    """An error reply. ``request_id`` is None when the failing frame had no usable id."""
    reply = {"id": request_id, "ok": False, "code": code, "message": message}
    reply.update(extra)
    return reply
