"""How one result-cache entry is sealed under its lookup key, so that only whoever can compute the
key (holds the frame) can find and read it. The table around the entries, the seqlock and the file
are inferd.shm.cache's; this module is the bytes of one entry after its seq.

From a 32-byte lookup key, one BLAKE3 derive-key call (context :data:`SECRETS_CONTEXT`) gives an
XOF read at three places::

    XOF bytes                               what
    0 .. 16                                 tag: stored, finds the entry (set = tag[:8] % sets)
    16 .. 48                                MAC key
    w * STREAM_WINDOW .., w = 1 + check[:6] keystream of a body whose check is ``check``

and an entry's sealed bytes (offset 8 of the entry on) are::

    tag (16) | check (16) | body XOR keystream(check) (len(body))
    check = BLAKE3-keyed(MAC key, generation u64 LE || body)[:16]

Integrity, a check over the plaintext under the key (SIV-style): the check is also the IV that picks
the keystream window (BLAKE3's XOF is a PRF of its output position, so seeking to a window is
counter mode). :meth:`EntrySecrets.open` unmasks the stored bytes with the stored check's keystream
and recomputes the check: a torn copy, a flipped bit, an entry of an older generation or of another
key (a tag collision), or one forged by anyone who cannot compute the key, is refused (2**-128 a
try), never opened to a wrong body. Why this and not encrypt-then-MAC with a random nonce: the check
doubles as the nonce, so opening costs two BLAKE3 instances (the derive call, the check) where
encrypt-then-MAC needs three, sealing needs no random source, and a keystream can never serve two
different bodies whatever a nonce source would do. The price: sealing is deterministic, so the same
body in the same generation gives the same bytes (a watcher of one entry can tell "the same answer
again" from "another answer", not what either is). A check keyed by a key-derived MAC key says
nothing of the body to whoever lacks the key (an unkeyed one would let a reader test guesses).
"""
from __future__ import annotations

import struct

import blake3

SECRETS_CONTEXT = "inferd 2026-12 result cache entry secrets v2"
TAG_SIZE = 16
CHECK_SIZE = 16
SEALED_OVERHEAD = TAG_SIZE + CHECK_SIZE                  # sealed bytes = this + len(body)
STREAM_WINDOW = 1 << 14                                  # > the largest body, 8 + 8 * 1024 bytes

_U64 = struct.Struct("<Q")


class EntrySecrets:
    """The tag, MAC key and keystreams of one lookup key; :meth:`seal` and :meth:`open` an entry."""

    __slots__ = ("tag", "mac_key", "_xof")

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError(f"a cache key is 32 bytes (from cache_key()), got {len(key)}")
        self._xof = blake3.blake3(bytes(key), derive_key_context=SECRETS_CONTEXT)
        head = self._xof.digest(TAG_SIZE + 32)
        self.tag, self.mac_key = head[:TAG_SIZE], head[TAG_SIZE:]

    def seal(self, generation: int, body: bytes) -> bytes:
        """tag | check | masked body: what the writer stores after the entry's seq."""
        check = self._check(generation, body)
        return self.tag + check + self._mask(body, check)

    def open(self, generation: int, sealed: bytes) -> bytes | None:
        """The body of ``sealed`` (bytes from an entry's tag on), or None unless it is whole, this
        key's and of ``generation``."""
        if sealed[:TAG_SIZE] != self.tag:
            return None
        check = sealed[TAG_SIZE:SEALED_OVERHEAD]
        body = self._mask(sealed[SEALED_OVERHEAD:], check)
        return body if self._check(generation, body) == check else None

    def _check(self, generation: int, body: bytes) -> bytes:
        return blake3.blake3(_U64.pack(generation) + body, key=self.mac_key).digest(CHECK_SIZE)

    def _mask(self, data: bytes, check: bytes) -> bytes:
        """``data`` XOR the keystream of ``check``: masks a body, and unmasks one."""
        window = 1 + int.from_bytes(check[:6], "little")
        stream = self._xof.digest(len(data), seek=window * STREAM_WINDOW)
        return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(len(data), "little")
