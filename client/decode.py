"""What an application passes to ``classify`` / ``embed`` / ``near_duplicates``, ready to send.

One entry point, :func:`prepare`, takes it and returns a :class:`Prepared`:

- a numpy array or torch tensor: converted by :func:`inferd.client.images.to_frame` (no encoded bytes);
- ``bytes`` / ``bytearray`` / ``memoryview``: the encoded file itself;
- a path (``str`` or ``os.PathLike``): the file is read (at most ``MAX_ENCODED_BYTES``);
- a binary file object (anything with ``read``): read to its end, same limit.

Encoded bytes are *read* by ``prepare`` but decoded only when ``Prepared.frame()`` is first called,
so a client can look a repeated upload up by the hash of its bytes (``encoded_hash``) and answer it
without decoding (NOTE [ encoded uploads ] in daemon/caching/results.py).

The decode itself, its limits and its name (``decoder_id``) are the ones the daemon verifies
uploads with, in inferd.shm.uploads; :func:`decode` and :func:`probe` here raise the client's
InvalidInput instead of its UndecodableImage.
"""
from __future__ import annotations

import os

import numpy as np

from ..shm import uploads
from ..shm.uploads import FORMATS, MAX_ENCODED_BYTES, MAX_PIXELS, decoder_id, encoded_hash
from .errors import InvalidInput
from .images import to_frame

__all__ = ["Prepared", "prepare", "decode", "probe", "decoder_id", "encoded_hash",
           "MAX_ENCODED_BYTES", "MAX_PIXELS", "FORMATS"]


class Prepared:
    """One input, ready to send: ``encoded`` (the file's bytes, or None for an array) and its
    ``encoded_hash``; :meth:`frame` decodes (once) and returns the uint8 HxWx3 frame."""

    __slots__ = ("encoded", "encoded_hash", "_frame", "_size")

    def __init__(self, frame, encoded: bytes | None, height: int, width: int):
        self._frame = frame
        self.encoded = encoded
        self.encoded_hash = encoded_hash(encoded) if encoded is not None else None
        self._size = (height, width)

    def frame(self) -> np.ndarray:
        """The frame; the first call decodes encoded bytes. Raises InvalidInput."""
        if self._frame is None:
            self._frame = decode(self.encoded, *self._size)
        return self._frame


def prepare(image, height: int, width: int) -> Prepared:
    """What a client sends for ``image`` (see the module docstring for what it may be). Reads a
    path or file object now; decodes nothing yet. Raises InvalidInput."""
    data = read_encoded(image)
    if data is None:
        return Prepared(to_frame(image, height, width), None, height, width)
    return Prepared(None, data, height, width)


def read_encoded(image) -> bytes | None:
    """The encoded bytes ``image`` holds, or None when it is an array or tensor. Raises InvalidInput
    for a missing/unreadable path or a file over MAX_ENCODED_BYTES."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                data = f.read(MAX_ENCODED_BYTES + 1)
        except OSError as exc:
            raise InvalidInput(f"cannot read image file {os.fspath(image)!r}: {exc.strerror or exc}") from None
    elif hasattr(image, "read") and not isinstance(image, np.ndarray):
        data = image.read(MAX_ENCODED_BYTES + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidInput(f"file object returned {type(data).__name__} from read(); open it in binary "
                               "mode ('rb')")
        data = bytes(data)
    else:
        return None
    if len(data) > MAX_ENCODED_BYTES:
        raise InvalidInput(f"encoded image is over the limit of {MAX_ENCODED_BYTES} bytes "
                           "(inferd.shm.limits.MAX_ENCODED_BYTES)")
    if not data:
        raise InvalidInput("encoded image is empty (0 bytes)")
    return data


def probe(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header of encoded ``data`` (inferd.shm.uploads.probe).
    Raises InvalidInput."""
    try:
        return uploads.probe(data)
    except uploads.UndecodableImage as exc:
        raise InvalidInput(str(exc)) from None


def decode(data: bytes, height: int, width: int) -> np.ndarray:
    """The frame (uint8, C-contiguous, height x width x 3) of JPEG/PNG/WebP ``data``
    (inferd.shm.uploads.decode). Raises InvalidInput for bad bytes."""
    try:
        return uploads.decode(data, height, width)
    except uploads.UndecodableImage as exc:
        raise InvalidInput(str(exc)) from None
