"""OIP tensors <-> what the client library takes and gives: no I/O, shared by both doors.

The model as OIP clients see it (``model_metadata``)::

    input   IMAGE        UINT8  [-1, -1, -1, 3]   N frames of any height and width, RGB; resized to
                                                  the model's input as the client library does
                                                  (inferd.client.images.to_frame)
    input   IMAGE_BYTES  BYTES  [-1]              N encoded JPEG / PNG / WebP files, decoded by the
                                                  front; a repeat is answered by the hash of its
                                                  bytes from the result cache (inferd.client.decode)
    output  SCORES       FP32   [-1, C]           the model's class scores (softmax probabilities,
                                                  as the daemon and its cache keep them)
    output  LOGITS       FP32   [-1, C]           the model's raw output (its logits), computed for
                                                  each request that names it: never from a cache

A request carries exactly one of the two inputs; a request that names no output gets SCORES alone
(LOGITS costs the result cache: it is computed whenever asked for). The classification extension:
an output asked for with the parameter ``classification: k`` comes back as a BYTES tensor [N, k]
of ``"value:index:label"`` strings, best first, where the value is that output's own (a softmax
probability for SCORES, a logit for LOGITS: Triton reports the output tensor's value), printed as
C++'s std::to_string prints a float (six decimals), as Triton returns them.

Binary data (HTTP's binary tensor data extension, gRPC's raw_input_contents): a UINT8 tensor is its
N*H*W*3 bytes, row-major; a BYTES tensor is each element as a 4-byte little-endian length and its
bytes. In JSON, UINT8 data is a flat (or nested) list of integers and BYTES data a list of strings,
or of ``{"b64": "..."}`` objects for files that are not UTF-8 text.
"""
from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass, field

import numpy as np

from ...shm import limits
from .errors import OipError

IMAGE, IMAGE_BYTES, SCORES, LOGITS = "IMAGE", "IMAGE_BYTES", "SCORES", "LOGITS"
OUTPUTS = (SCORES, LOGITS)
#: the largest side of a frame a caller may send: a 16384 x 16384 frame is 768 MiB already
MAX_SIDE = 16384
_LEN = struct.Struct("<I")


@dataclass
class Wanted:
    """One requested output: its name, the classification extension's k (0: the tensor itself),
    and whether it goes back as binary data (HTTP)."""
    name: str = SCORES
    classes: int = 0
    binary: bool = False


@dataclass
class Inference:
    """One parsed inference request, whichever door it came through."""
    images: list                      # np.ndarray (H, W, 3) uint8 each, or bytes (an encoded file)
    outputs: list = field(default_factory=list)   # of Wanted; empty: SCORES
    timeout_s: float | None = None
    id: str = ""

    def top_k(self, classes: int) -> int:
        """How many classes to ask the daemon for: all of them when SCORES is wanted as a tensor,
        else the largest classification k of SCORES (1 when only LOGITS is wanted)."""
        scores = [w for w in self.outputs if w.name == SCORES] if self.outputs else [Wanted()]
        if any(w.classes == 0 for w in scores):
            return classes
        return min(classes, max((w.classes for w in scores), default=1))

    def logits(self) -> bool:
        """Whether the model's raw output rows are wanted (LOGITS, as a tensor or classified)."""
        return any(w.name == LOGITS for w in self.outputs)


def metadata(model_name: str, classes: int, versions=("1",)) -> dict:
    """Model metadata as OIP's model metadata response spells it (HTTP; gRPC builds the same)."""
    return {"name": model_name, "versions": list(versions), "platform": "inferd",
            "inputs": [{"name": IMAGE, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
                       {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, classes]} for name in OUTPUTS]}


# inputs ---------------------------------------------------------------------------------------
def check_input(name: str, datatype: str, shape, max_batch: int) -> int:
    """The batch size N of an input, after its name, datatype and shape are checked."""
    shape = list(shape)
    if not all(type(d) is int for d in shape):
        raise OipError("invalid", f"input {name!r}: shape {shape!r} must be a list of integers")
    if datatype == "UINT8":
        if len(shape) != 4 or shape[3] != 3 or not all(1 <= d <= MAX_SIDE for d in shape[1:3]):
            raise OipError("invalid", f"input {name!r}: a UINT8 image tensor has shape [N, H, W, 3] with "
                           f"H and W from 1 to {MAX_SIDE}; got {shape}")
    elif datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise OipError("invalid", f"input {name!r}: a BYTES tensor of encoded images has shape [N] "
                           f"or [N, 1]; got {shape}")
    else:
        raise OipError("invalid", f"input {name!r}: datatype {datatype!r}; this model takes UINT8 "
                       f"({IMAGE}: [N, H, W, 3]) or BYTES ({IMAGE_BYTES}: encoded JPEG/PNG/WebP files)")
    n = shape[0]
    if not 1 <= n <= max_batch:
        raise OipError("invalid", f"input {name!r}: {n} images; one request carries 1 to {max_batch} "
                       "(oip.max_batch)")
    return n


def uint8_images(name: str, shape, data) -> list:
    """N frames from a UINT8 tensor's bytes (binary) or its JSON list."""
    n, h, w, _ = shape
    want = n * h * w * 3
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) != want:
            raise OipError("invalid", f"input {name!r}: {len(data)} bytes of data for shape {list(shape)} "
                           f"(UINT8: {want} bytes)")
        array = np.frombuffer(data, np.uint8)
    else:
        try:
            array = np.asarray(data)
        except (ValueError, TypeError):
            raise OipError("invalid", f"input {name!r}: data is not a list of numbers") from None
        if array.size != want or array.dtype.kind not in "iu" or (
                array.size and (array.min() < 0 or array.max() > 255)):
            raise OipError("invalid", f"input {name!r}: data must be {want} integers from 0 to 255 for "
                           f"shape {list(shape)}; got {array.size} of type {array.dtype}")
        array = array.astype(np.uint8, copy=False)
    frames = array.reshape(n, h, w, 3)
    return [frames[i] for i in range(n)]


def bytes_elements(name: str, n: int, data) -> list[bytes]:
    """N encoded files from a BYTES tensor: binary (length-prefixed), a JSON list, or gRPC's
    bytes_contents (a list of bytes)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        out, view, at = [], memoryview(data), 0
        while at < len(view):
            if at + 4 > len(view):
                raise OipError("invalid", f"input {name!r}: binary BYTES data ends inside an element's "
                               "4-byte length")
            (size,) = _LEN.unpack_from(view, at)
            at += 4
            if at + size > len(view):
                raise OipError("invalid", f"input {name!r}: an element of {size} bytes runs past the "
                               f"end of the data")
            out.append(bytes(view[at:at + size]))
            at += size
    elif isinstance(data, list):
        out = [_element(name, e) for e in _flatten(data)]
    else:
        raise OipError("invalid", f"input {name!r}: BYTES data must be a list of strings or "
                       "{\"b64\": ...} objects")
    if len(out) != n:
        raise OipError("invalid", f"input {name!r}: {len(out)} elements for shape [{n}]")
    for i, e in enumerate(out):
        if not 0 < len(e) <= limits.MAX_ENCODED_BYTES:
            raise OipError("invalid", f"input {name!r}: element {i} holds {len(e)} bytes; an encoded image "
                           f"holds 1 to {limits.MAX_ENCODED_BYTES}")
    return out


def _flatten(data: list):
    for e in data:
        if isinstance(e, list):
            yield from _flatten(e)
        else:
            yield e


def _element(name: str, e) -> bytes:
    if isinstance(e, bytes):
        return e
    if isinstance(e, str):
        return e.encode("utf-8", "surrogateescape")
    if isinstance(e, dict) and isinstance(e.get("b64"), str):
        try:
            return base64.b64decode(e["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise OipError("invalid", f"input {name!r}: an element's b64 is not base64") from None
    raise OipError("invalid", f"input {name!r}: a BYTES element must be a string or {{\"b64\": ...}}")


def wanted(name, classification, binary) -> Wanted:
    """One requested output, checked."""
    if name not in OUTPUTS:
        raise OipError("invalid", f"output {name!r}: this model's outputs are {SCORES} (softmax "
                       f"probabilities) and {LOGITS} (its raw output)")
    k = 0 if classification is None else classification
    if type(k) is not int or k < 0:
        raise OipError("invalid", f"output {name!r}: classification {classification!r} must be a "
                       "count of classes (an integer, at least 1)")
    return Wanted(name, k, bool(binary))


def timeout_s(micros) -> float | None:
    """The ``timeout`` parameter (microseconds, as Triton takes it) in seconds."""
    if micros is None:
        return None
    if type(micros) is not int or not 0 < micros <= limits.MAX_TIMEOUT_MS * 1000:
        raise OipError("invalid", f"parameter timeout {micros!r}: microseconds, more than 0 and at most "
                       f"{int(limits.MAX_TIMEOUT_MS * 1000)}")
    return micros / 1e6


# outputs --------------------------------------------------------------------------------------
def scores(results: list, classes: int) -> np.ndarray:
    """[N, C] float32 from each image's (index, score) pairs (all C of them when SCORES is
    wanted; classes not named score 0)."""
    out = np.zeros((len(results), classes), np.float32)
    for row, pairs in zip(out, results):
        for p in pairs:
            row[p.index] = p.score
    return out


def classification(results: list, k: int, labels) -> np.ndarray:
    """[N, k] object array of ``"score:index:label"`` bytes, best first (Triton's format)."""
    out = np.empty((len(results), k), object)
    for i, pairs in enumerate(results):
        best = sorted(pairs, key=lambda p: -p.score)[:k]
        if len(best) < k:
            raise OipError("invalid", f"classification {k} is more than the model's {len(pairs)} classes")
        for j, p in enumerate(best):
            label = labels[p.index] if p.index < len(labels) else ""
            out[i, j] = (f"{p.score:f}:{p.index}:{label}" if label else f"{p.score:f}:{p.index}").encode()
    return out


def logits(results: list) -> np.ndarray:
    """[N, C] float32: each image's raw output row (inferd.client Predictions.logits)."""
    return np.stack([r.logits for r in results]).astype(np.float32, copy=False)


def classification_of(values: np.ndarray, k: int, labels) -> np.ndarray:
    """[N, k] object array of ``"value:index:label"`` bytes of the k highest of each row of
    ``values`` (a whole output tensor), best first; equal values by index, as a stable sort."""
    out = np.empty((len(values), k), object)
    for i, row in enumerate(values):
        for j, c in enumerate(np.argsort(-row, kind="stable")[:k]):
            c = int(c)
            label = labels[c] if c < len(labels) else ""
            out[i, j] = (f"{row[c]:f}:{c}:{label}" if label else f"{row[c]:f}:{c}").encode()
    return out


def bytes_binary(array: np.ndarray) -> bytes:
    """A BYTES tensor as binary data: each element's 4-byte length, then its bytes."""
    return b"".join(_LEN.pack(len(e)) + e for e in array.reshape(-1))


def outputs(request: Inference, results: list, classes: int, labels) -> list:
    """(Wanted, datatype, array) for each output the request asked for."""
    out = []
    raw = None
    for w in request.outputs or [Wanted()]:
        if w.classes > classes:
            raise OipError("invalid", f"output {w.name!r}: classification {w.classes} is more than "
                           f"the model's {classes} classes")
        if w.name == LOGITS:
            raw = logits(results) if raw is None else raw
            out.append((w, "BYTES", classification_of(raw, w.classes, labels)) if w.classes else (w, "FP32", raw))
        elif w.classes:
            out.append((w, "BYTES", classification(results, w.classes, labels)))
        else:
            out.append((w, "FP32", scores(results, classes)))
    return out
