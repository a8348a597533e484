"""Every check of a request's fields, in one place: what a client sent, against the ring and the model.

A client's numbers are checked here before anything reads memory or does work for them
(docs/architecture.md, Trust model); each check raises :class:`Rejected` naming the field and its
allowed range, and the request gets that error for its id. The bounds both sides share come from
inferd.shm.limits; the ones that depend on this session's ring or this daemon's model come from
them. Pure functions: no I/O, no state, O(1) each but for an upload's run of slots (O(slots of the
run), at most half the ring).

    check_classify   slot, nbytes, dtype, shape, top_k, timeout_ms; the slot not in flight
    check_frame      the fields a classify_many's requests share: nbytes, dtype, shape, top_k, timeout_ms
    check_slot       one slot of a classify_many: in range, not in flight
    check_upload     upload_slot / upload_nbytes of a classify that carries its encoded bytes
    check_tag        the tag stored with embeddings
    check_near       k and min_similarity of a near request
    check_logits     logits of a classify: a bool, for a model of bounded size
    check_hits       n of a hits notification

The scheduler (daemon/dispatch/scheduler.py) calls them in the order of its admission (its module
docstring); the session (daemon/front/session.py) checks ``hits``.
"""
from __future__ import annotations

from ...shm import limits, wire


class Rejected(Exception):
    """A request that fails a check: answered with ``code`` and ``message`` for its id."""

    def __init__(self, code: str, message: str, **extra):
        super().__init__(message)
        self.code = code
        self.extra = extra


def _int_field(msg: dict, key: str, code: str = wire.E_BAD_REQUEST) -> int:
    value = msg.get(key)
    if type(value) is not int:
        raise Rejected(code, f"{key} must be an integer, got {value!r}")
    return value


def check_classify(msg: dict, ring, spec, inflight: dict, default_timeout_ms: float) -> tuple:
    """Check the frame fields of a classify, embed or near request against ``ring`` (its
    geometry), ``spec`` (the model's input) and ``inflight`` (slot -> request id of this session);
    returns (slot, top_k, timeout seconds) or raises Rejected.

    The order matters only for which message a request with several faults gets: ring bounds
    first (they guard memory), then the model's spec.
    """
    slot = _slot_in_range(msg.get("slot"), ring)
    top_k, timeout = check_frame(msg, ring, spec, default_timeout_ms)
    if slot in inflight:
        raise Rejected(wire.E_SLOT_BUSY, f"slot {slot} already carries request {inflight[slot]}; "
                       "a slot may be reused only after its reply")
    return slot, top_k, timeout


def _slot_in_range(slot, ring) -> int:
    if type(slot) is not int:
        raise Rejected(wire.E_BAD_REQUEST, f"slot must be an integer, got {slot!r}")
    if not 0 <= slot < ring.geometry.slots:
        raise Rejected(wire.E_INVALID_INPUT, f"slot {slot} is out of range: this session's ring has "
                       f"{ring.geometry.slots} slots (0 to {ring.geometry.slots - 1})")
    return slot


def check_slot(slot, ring, inflight: dict) -> int:
    """One slot of a classify_many: an int within ``ring``, not carrying a request. Raises Rejected."""
    slot = _slot_in_range(slot, ring)
    if slot in inflight:
        raise Rejected(wire.E_SLOT_BUSY, f"slot {slot} already carries request {inflight[slot]}; "
                       "a slot may be reused only after its reply")
    return slot


def check_frame(msg: dict, ring, spec, default_timeout_ms: float) -> tuple[int, float]:
    """The frame fields of a classify (or those a classify_many's requests share) against the
    ring's slot size and the model's spec: (top_k, timeout seconds), or raises Rejected."""
    geometry = ring.geometry
    nbytes = _int_field(msg, "nbytes")
    if not 0 < nbytes <= geometry.slot_bytes:
        raise Rejected(wire.E_INVALID_INPUT, f"nbytes {nbytes} does not fit a slot: this ring's "
                       f"slots hold 1 to {geometry.slot_bytes} bytes")
    if msg.get("dtype") != "uint8":
        raise Rejected(wire.E_INVALID_INPUT, f"dtype {msg.get('dtype')!r} is not supported: frames are "
                       "uint8 RGB (Client.classify converts)")
    shape = msg.get("shape")
    if not isinstance(shape, list) or tuple(shape) != spec.frame_shape:
        raise Rejected(wire.E_INVALID_INPUT, f"shape {shape!r} does not match the model input "
                       f"{list(spec.frame_shape)} (HxWx3); resize on the client (Client.classify does)")
    if nbytes != spec.frame_bytes:
        raise Rejected(wire.E_INVALID_INPUT, f"nbytes {nbytes} does not match shape {shape} of uint8 "
                       f"({spec.frame_bytes} bytes)")
    top_k = msg.get("top_k", spec.top_k)
    if type(top_k) is not int or not 1 <= top_k <= len(spec.labels):
        raise Rejected(wire.E_INVALID_INPUT, f"top_k {top_k!r} is out of range: 1 to {len(spec.labels)}")
    timeout_ms = msg.get("timeout_ms", default_timeout_ms)
    if not limits.timeout_ms_ok(timeout_ms):
        raise Rejected(wire.E_INVALID_INPUT, f"timeout_ms {timeout_ms!r} is out of range: "
                       f"more than 0, at most {limits.MAX_TIMEOUT_MS:.0f}")
    return top_k, timeout_ms / 1000.0


def check_tag(value):
    """A client's tag for its embeddings: None or a short string. Raises Rejected."""
    if not limits.tag_ok(value):
        raise Rejected(wire.E_INVALID_INPUT, f"tag must be a string of at most {limits.MAX_TAG_BYTES} bytes")
    return value


def check_upload(msg: dict, ring, slot: int, inflight: dict, op: str) -> tuple[range, int] | None:
    """(run of slots, upload_nbytes) of a classify that carries its encoded bytes, None when it
    carries none. The bytes span ``[upload_slot, upload_slot + m)``, ``m = ceil(nbytes / slot
    capacity)`` (Runs in inferd.shm.ring). Every field checked against the ring before anything is
    read: O(m), m at most half the ring (NOTE [ encoded uploads ] in daemon/caching/results.py). Raises
    Rejected."""
    if wire.UPLOAD_SLOT not in msg and wire.UPLOAD_NBYTES not in msg:
        return None
    first, nbytes = msg.get(wire.UPLOAD_SLOT), msg.get(wire.UPLOAD_NBYTES)
    if type(first) is not int or type(nbytes) is not int:
        raise Rejected(wire.E_INVALID_INPUT, f"{wire.UPLOAD_SLOT} and {wire.UPLOAD_NBYTES} must both be "
                       f"integers, got {first!r} and {nbytes!r}")
    if op != "classify":
        raise Rejected(wire.E_INVALID_INPUT, f"{wire.UPLOAD_SLOT} is for classify only, not {op}")
    g = ring.geometry
    if not 0 < nbytes <= limits.MAX_ENCODED_BYTES:
        raise Rejected(wire.E_INVALID_INPUT, f"{wire.UPLOAD_NBYTES} {nbytes} is out of range: 1 to "
                       f"{limits.MAX_ENCODED_BYTES} (inferd.shm.limits.MAX_ENCODED_BYTES)")
    m = g.run_slots(nbytes)
    if m > g.max_run:
        raise Rejected(wire.E_INVALID_INPUT, f"{wire.UPLOAD_NBYTES} {nbytes} spans {m} slots of "
                       f"{g.slot_bytes} bytes; an upload may span at most {g.max_run}, half this "
                       f"ring's {g.slots}, so one request never holds the whole ring: send no upload, "
                       "or ask hello for more ring_slots")
    if not 0 <= first <= g.slots - m:
        raise Rejected(wire.E_INVALID_INPUT, f"{wire.UPLOAD_SLOT} {first} is out of range: its {m} "
                       f"slots must lie within slots 0 to {g.slots - 1}, without wrapping")
    run = range(first, first + m)
    if slot in run:
        raise Rejected(wire.E_INVALID_INPUT, f"{wire.UPLOAD_SLOT} {first} and its {m} slots include "
                       f"the frame's slot {slot}; the bytes need slots of their own")
    for s in run:
        if s in inflight:
            raise Rejected(wire.E_SLOT_BUSY, f"{wire.UPLOAD_SLOT} {first} and its {m} slots include "
                           f"slot {s}, which already carries request {inflight[s]}; a slot may be "
                           "reused only after its reply")
    return run, nbytes


def check_near(msg: dict) -> tuple[int, float]:
    """(k, min_similarity) of a near request, the shared defaults where it names none. Raises
    Rejected."""
    k = msg.get("k", limits.DEFAULT_NEAR_K)
    sim = msg.get("min_similarity", limits.DEFAULT_MIN_SIMILARITY)
    if not limits.near_k_ok(k):
        raise Rejected(wire.E_INVALID_INPUT, f"k {k!r} is out of range: 1 to {limits.MAX_NEAR_K}")
    if not limits.similarity_ok(sim):
        raise Rejected(wire.E_INVALID_INPUT, f"min_similarity {sim!r} is out of range: -1 to 1")
    return k, float(sim)


def check_logits(msg: dict, spec, op: str) -> bool:
    """Whether a classify (or a classify_many's requests) asked for the model's raw output rows
    (``logits``: a bool, false if absent). Raises Rejected for another op or a model too wide for
    a reply (limits.MAX_LOGITS_CLASSES)."""
    value = msg.get("logits", False)
    if type(value) is not bool:
        raise Rejected(wire.E_BAD_REQUEST, f"logits must be true or false, got {value!r}")
    if value and op != "classify":
        raise Rejected(wire.E_INVALID_INPUT, f"logits is for classify only, not {op}")
    if value and len(spec.labels) > limits.MAX_LOGITS_CLASSES:
        raise Rejected(wire.E_INVALID_INPUT, f"logits: this model has {len(spec.labels)} classes; a reply "
                       f"carries at most {limits.MAX_LOGITS_CLASSES} (inferd.shm.limits.MAX_LOGITS_CLASSES)")
    return value


def check_hits(n) -> int:
    """``n`` of a ``hits`` notification: local cache hits a client reports. Raises Rejected."""
    if not limits.hits_ok(n):
        raise Rejected(wire.E_INVALID_INPUT, f"hits n {n!r} is out of range: an integer, 1 to "
                       f"{limits.MAX_HITS_REPORT}")
    return n
