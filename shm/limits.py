"""The protocol's limits: the bounds a client and the daemon must agree on, in one place.

The daemon refuses a request outside them (``invalid_input``, naming the field and its range); the
client checks the same bounds before it sends, so a bad argument gets the same answer whether the
client answers it from its read-only cache or the daemon does. Configuration may narrow a default
(``batching.default_timeout_ms``) but never widen a bound here: the daemon's configuration checks
its own values against these constants.

    field                  bound                                   who checks
    timeout_ms             more than 0, at most MAX_TIMEOUT_MS     daemon (admission), client (seconds)
    tag                    a str of at most MAX_TAG_BYTES (UTF-8)  daemon (admission)
    k (near)               1 to MAX_NEAR_K, DEFAULT_NEAR_K if none daemon (admission); client default
    min_similarity (near)  -1 to 1, DEFAULT_MIN_SIMILARITY if none daemon (admission); client default
    upload_nbytes          1 to MAX_ENCODED_BYTES                  daemon (admission), client (reading
                                                                   a file: inferd.shm.uploads)
    hits n                 1 to MAX_HITS_REPORT                    daemon (session), client sums below it
    logits (classify)      a bool; a model of at most              daemon (admission)
                           MAX_LOGITS_CLASSES classes

No I/O, no imports: both sides and the configuration module read these names.
"""
from __future__ import annotations

#: The longest deadline a request may ask for: one hour, in milliseconds as on the wire.
MAX_TIMEOUT_MS = 3_600_000.0
#: The same bound in seconds, as the client's ``timeout`` arguments take it.
MAX_TIMEOUT_S = MAX_TIMEOUT_MS / 1000.0

#: The longest tag stored with an embedding, in bytes of its UTF-8 encoding.
MAX_TAG_BYTES = 64

#: The most near-duplicates one ``near`` request may ask for, and how many when it names none.
MAX_NEAR_K = 1000
DEFAULT_NEAR_K = 5
#: The ``min_similarity`` of a ``near`` request that names none: chosen from the similarities of
#: changed copies against different images with the built-in model (docs/operations.md,
#: Near-duplicates; bench/near.py).
DEFAULT_MIN_SIMILARITY = 0.95

#: The largest encoded file (JPEG, PNG, WebP) a client reads or uploads, in bytes; a larger file is
#: refused before it is read whole (inferd.shm.uploads).
MAX_ENCODED_BYTES = 32 * 2**20

#: The most classes of a model whose logits a classify may ask for: a reply carrying them
#: (4 bytes a class) then stays at 4 MiB, well under the frame a client reads (wire.MAX_REPLY_FRAME).
MAX_LOGITS_CLASSES = 1 << 20

#: Local cache hits one ``hits`` notification or request field may report (below 2**30, so a
#: client cannot overflow the daemon's counters in a few messages).
MAX_HITS_REPORT = (1 << 30) - 1


def timeout_ms_ok(value) -> bool:
    """Whether ``value`` is a request deadline in milliseconds the daemon accepts: a number (not a
    bool) more than 0 and at most MAX_TIMEOUT_MS."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= MAX_TIMEOUT_MS


def timeout_s_ok(value) -> bool:
    """Whether ``value`` is a client ``timeout`` in seconds the daemon would accept (timeout_ms_ok)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= MAX_TIMEOUT_S


def tag_ok(value) -> bool:
    """Whether ``value`` is a tag the daemon stores: None, or a str of at most MAX_TAG_BYTES."""
    return value is None or (isinstance(value, str) and len(value.encode()) <= MAX_TAG_BYTES)


def near_k_ok(value) -> bool:
    """Whether ``value`` is a ``k`` of a near request: an int 1 to MAX_NEAR_K."""
    return type(value) is int and 1 <= value <= MAX_NEAR_K


def similarity_ok(value) -> bool:
    """Whether ``value`` is a ``min_similarity``: a number (not a bool) from -1 to 1."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and -1.0 <= value <= 1.0


def hits_ok(value) -> bool:
    """Whether ``value`` is a count of local cache hits the daemon takes: an int 1 to MAX_HITS_REPORT."""
    return type(value) is int and 0 < value <= MAX_HITS_REPORT
