"""Encoded images (JPEG, PNG, WebP) into the uint8 HxWx3 frame the model takes: the one decode.

The client decodes what an application passes (inferd.client.decode), and the daemon decodes a
client's upload again to verify it before it keys an answer by the upload's hash (NOTE [ encoded
uploads ] in daemon/caching/results.py). Both must make the same frame from the same bytes, so the
decode lives here, owned by neither side; :func:`decoder_id` names it, and is part of every
encoded-bytes cache key, so a client and a daemon with different decoders never share an entry.

The steps of :func:`decode`:

1. Only JPEG, PNG and WebP are opened (Pillow's ``formats=``); anything else, truncated or garbage
   bytes raise UndecodableImage.
2. Bombs are refused before any pixel is decoded: more than ``MAX_ENCODED_BYTES`` of input
   (inferd.shm.limits), or a header announcing more than ``MAX_PIXELS`` pixels (width x height),
   raises UndecodableImage naming the limit. Pillow's own ``Image.MAX_IMAGE_PIXELS`` check stays
   on behind ours.
3. JPEG only: ``Image.draft`` lets libjpeg-turbo decode at 1/2, 1/4 or 1/8 scale (DCT scaling) as
   long as the result stays at least the model's input size on both sides: a 12-megapixel photo
   for a 224x224 model decodes at 1/8 cost, and the bilinear resize below does the rest.
4. EXIF orientation is applied (``ImageOps.exif_transpose``), so a phone photo stands upright.
5. Modes to RGB: 16-bit greyscale (``I;16*``, ``I``) keeps its top 8 bits (Pillow's own convert
   would clip it to white); RGBA, LA and palette images with transparency lose the alpha channel
   (the colour under it is kept, as for an HxWx4 array); CMYK, greyscale, palette, YCbCr and
   bilevel go through Pillow's ``convert("RGB")``.
6. Fitted to the model's input by :func:`resize`: stretched to exactly height x width (no crop, no
   padding; aspect ratio follows the model's), Pillow's bilinear filter (which widens its support
   by the scale factor on downscaling, so it antialiases rather than skipping pixels). Arrays of
   another size take the same resize (inferd.client.images).

Pillow is imported inside the functions that use it: a client that only sends arrays, and the
daemon until its first upload, do not pay its import (tens of milliseconds) at start-up.
"""
from __future__ import annotations

import functools
import io
import struct
import warnings

import blake3
import numpy as np

from .limits import MAX_ENCODED_BYTES

__all__ = ["UndecodableImage", "decode", "probe", "resize", "decoder_id", "encoded_hash",
           "MAX_ENCODED_BYTES", "MAX_PIXELS", "FORMATS"]

#: The most pixels (width x height) an encoded image may announce: 64 megapixels, about 192 MiB as
#: RGB. Pillow's own bomb limit (``Image.MAX_IMAGE_PIXELS``, 89 M by default) stays on behind it.
MAX_PIXELS = 64_000_000
#: The formats opened; Pillow's names.
FORMATS = ("JPEG", "PNG", "WEBP")
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class UndecodableImage(ValueError):
    """Encoded bytes that are refused: not JPEG/PNG/WebP, damaged, or over a limit; the message
    says which. The client raises it to applications as InvalidInput; the daemon makes no entry."""


@functools.lru_cache(maxsize=None)
def _library_versions() -> str:
    import PIL          # at first use: see the module docstring
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


def _over_size(data) -> UndecodableImage:
    return UndecodableImage(f"encoded image is over the limit of {MAX_ENCODED_BYTES} bytes "
                            "(inferd.shm.limits.MAX_ENCODED_BYTES)")


def _over_pixels(w: int, h: int) -> UndecodableImage:
    return UndecodableImage(f"image of {w}x{h} pixels is over the limit of {MAX_PIXELS} pixels "
                            "(inferd.shm.uploads.MAX_PIXELS): refused as a decompression bomb")


def _not_an_image(data) -> UndecodableImage:
    return UndecodableImage(f"not a JPEG, PNG or WebP image ({len(data)} bytes starting {bytes(data[:8])!r})")


def probe(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header of encoded ``data``, decoding no pixel. Raises
    UndecodableImage for a format other than JPEG/PNG/WebP, garbage, or over the limits."""
    from PIL import Image   # at first use: see the module docstring

    if len(data) > MAX_ENCODED_BYTES:
        raise _over_size(data)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            fmt, (w, h) = im.format, im.size
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error):
        raise _not_an_image(data) from None
    if w * h > MAX_PIXELS:
        raise _over_pixels(w, h)
    return fmt, w, h


def decode(data: bytes, height: int, width: int) -> np.ndarray:
    """The frame (uint8, C-contiguous, height x width x 3) of JPEG/PNG/WebP ``data``, by the steps
    in the module docstring. Raises UndecodableImage (never another exception) for bad bytes."""
    from PIL import Image, ImageOps     # at first use: see the module docstring

    if len(data) > MAX_ENCODED_BYTES:
        raise _over_size(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
            w0, h0 = im.size
            if w0 * h0 > MAX_PIXELS:
                raise _over_pixels(w0, h0)
            if im.format == "JPEG":
                side = max(height, width)        # EXIF may swap the axes: fit either way round
                im.draft("RGB", (side, side))
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            frame = resize(im, height, width)
    except UndecodableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UndecodableImage(f"refused as a decompression bomb: {exc} (PIL.Image.MAX_IMAGE_PIXELS "
                               f"{Image.MAX_IMAGE_PIXELS})") from None
    except Image.UnidentifiedImageError:
        raise _not_an_image(data) from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, MemoryError) as exc:
        raise UndecodableImage(f"cannot decode image ({len(data)} bytes): {type(exc).__name__}: {exc}") from None
    return frame


def resize(image, height: int, width: int) -> np.ndarray:
    """``image`` (an RGB PIL image or uint8 HxWx3 array) stretched to (height, width, 3) with
    Pillow's bilinear filter (step 6 of the module docstring); a C-contiguous uint8 array. Already
    that size: returned as it is."""
    from PIL import Image   # at first use: see the module docstring

    if isinstance(image, np.ndarray):
        if image.shape[:2] == (height, width):
            return np.ascontiguousarray(image)
        image = Image.fromarray(np.ascontiguousarray(image))
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image))


def _to_rgb(im):
    """An RGB image of ``im`` (step 5 of the module docstring)."""
    from PIL import Image   # at first use: see the module docstring

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
