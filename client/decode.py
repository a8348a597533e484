"""Encoded images (JPEG, PNG, WebP) into the uint8 HxWx3 frame the model takes, in the caller's process.

One entry point, :func:`prepare`, takes whatever an application passes to ``classify`` / ``embed`` /
``near_duplicates`` and returns a :class:`Prepared`:

- a numpy array or torch tensor: converted by :func:`inferd.client.images.to_frame` (no encoded bytes);
- ``bytes`` / ``bytearray`` / ``memoryview``: the encoded file itself;
- a path (``str`` or ``os.PathLike``): the file is read (at most ``MAX_ENCODED_BYTES``);
- a binary file object (anything with ``read``): read to its end, same limit.

Encoded bytes are *read* by ``prepare`` but decoded only when ``Prepared.frame()`` is first called,
so a client can look a repeated upload up by the hash of its bytes (``encoded_hash``) and answer it
without decoding (NOTE [ encoded uploads ] in daemon/caching/results.py).

The decode, one definition used by the client and by the daemon's verification
(:func:`decode`; ``decoder_id`` names it, and is part of every encoded-bytes cache key):

1. Only JPEG, PNG and WebP are opened (Pillow's ``formats=``); anything else, truncated or garbage
   bytes raise InvalidInput.
2. Bombs are refused before any pixel is decoded: more than ``MAX_ENCODED_BYTES`` of input, or a
   header announcing more than ``MAX_PIXELS`` pixels (width x height), raises InvalidInput naming
   the limit. Pillow's own ``Image.MAX_IMAGE_PIXELS`` check stays on behind ours.
3. JPEG only: ``Image.draft`` lets libjpeg-turbo decode at 1/2, 1/4 or 1/8 scale (DCT scaling) as
   long as the result stays at least the model's input size on both sides: a 12-megapixel photo
   for a 224x224 model decodes at 1/8 cost, and the bilinear resize below does the rest.
4. EXIF orientation is applied (``ImageOps.exif_transpose``), so a phone photo stands upright.
5. Modes to RGB: 16-bit greyscale (``I;16*``, ``I``) keeps its top 8 bits (Pillow's own convert
   would clip it to white); RGBA, LA and palette images with transparency lose the alpha channel
   (the colour under it is kept, as for an HxWx4 array); CMYK, greyscale, palette, YCbCr and
   bilevel go through Pillow's ``convert("RGB")``.
6. Fitted to the model's input by :func:`inferd.client.images.resize`: stretched to exactly
   height x width (no crop, no padding; aspect ratio follows the model's), Pillow's bilinear filter,
   antialiased on downscaling. Arrays of another size take the same resize.
"""
from __future__ import annotations

import functools
import io
import os
import struct
import warnings

import blake3
import numpy as np

from .errors import InvalidInput
from .images import resize, to_frame

__all__ = ["Prepared", "prepare", "decode", "decoder_id", "encoded_hash",
           "MAX_ENCODED_BYTES", "MAX_PIXELS", "FORMATS"]

#: The largest encoded file accepted, in bytes (a larger file is refused before it is read whole).
MAX_ENCODED_BYTES = 32 * 2**20
#: The most pixels (width x height) an encoded image may announce: 64 megapixels, about 192 MiB as
#: RGB. Pillow's own bomb limit (``Image.MAX_IMAGE_PIXELS``, 89 M by default) stays on behind it.
MAX_PIXELS = 64_000_000
#: The formats opened; Pillow's names.
FORMATS = ("JPEG", "PNG", "WEBP")
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@functools.lru_cache(maxsize=None)
def _library_versions() -> str:
    import PIL
    from PIL import features

    codecs = [f"{name}={features.version_codec(name) or features.version_module(name)}"
              for name in ("jpg", "zlib")]
    return f"pillow={PIL.__version__} " + " ".join(codecs) + f" webp={features.version_module('webp')}"


@functools.lru_cache(maxsize=64)
def decoder_id(height: int, width: int) -> str:
    """Everything that decides the frame decoded from given bytes: library and codec versions, the
    steps above, and the target size. Part of every encoded-bytes cache key, so a client and a
    daemon with different decoders never share an entry."""
    return (f"inferd-decode-1 {_library_versions()} jpeg-draft exif-transpose rgb-drop-alpha i16-top8 "
            f"stretch-bilinear {height}x{width}")


def encoded_hash(data: bytes) -> bytes:
    """32-byte BLAKE3 of encoded bytes (derived key: no collision with a frame's content hash)."""
    return blake3.blake3(data, derive_key_context="inferd 2026-11 encoded upload hash v1").digest()


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
                           "(inferd.client.decode.MAX_ENCODED_BYTES)")
    if not data:
        raise InvalidInput("encoded image is empty (0 bytes)")
    return data


def probe(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header of encoded ``data``, decoding no pixel. Raises
    InvalidInput for a format other than JPEG/PNG/WebP, garbage, or over the limits."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            fmt, (w, h) = im.format, im.size
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error):
        raise InvalidInput(f"not a JPEG, PNG or WebP image ({len(data)} bytes starting "
                           f"{bytes(data[:8])!r})") from None
    if w * h > MAX_PIXELS:
        raise InvalidInput(f"image of {w}x{h} pixels is over the limit of {MAX_PIXELS} pixels "
                           "(inferd.client.decode.MAX_PIXELS): refused as a decompression bomb")
    return fmt, w, h


def decode(data: bytes, height: int, width: int) -> np.ndarray:
    """The frame (uint8, C-contiguous, height x width x 3) of JPEG/PNG/WebP ``data``, by the steps
    in the module docstring. Raises InvalidInput (never another exception) for bad bytes."""
    from PIL import Image, ImageOps

    if len(data) > MAX_ENCODED_BYTES:
        raise InvalidInput(f"encoded image is over the limit of {MAX_ENCODED_BYTES} bytes "
                           "(inferd.client.decode.MAX_ENCODED_BYTES)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
            w0, h0 = im.size
            if w0 * h0 > MAX_PIXELS:
                raise InvalidInput(f"image of {w0}x{h0} pixels is over the limit of {MAX_PIXELS} pixels "
                                   "(inferd.client.decode.MAX_PIXELS): refused as a decompression bomb")
            if im.format == "JPEG":
                side = max(height, width)        # EXIF may swap the axes: fit either way round
                im.draft("RGB", (side, side))
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            frame = resize(im, height, width)
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"refused as a decompression bomb: {exc} (PIL.Image.MAX_IMAGE_PIXELS "
                           f"{Image.MAX_IMAGE_PIXELS})") from None
    except Image.UnidentifiedImageError:
        raise InvalidInput(f"not a JPEG, PNG or WebP image ({len(data)} bytes starting "
                           f"{bytes(data[:8])!r})") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, MemoryError) as exc:
        raise InvalidInput(f"cannot decode image ({len(data)} bytes): {type(exc).__name__}: {exc}") from None
    return frame


def _to_rgb(im):
    """An RGB image of ``im`` (step 5 of the module docstring)."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT:
        grey = (np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        im = im.convert("RGBA")
        return Image.fromarray(np.ascontiguousarray(np.asarray(im)[:, :, :3]), "RGB")
    return im.convert("RGB")
