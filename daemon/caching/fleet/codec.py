"""Bytes of the fleet cache (daemon/caching/fleet/cache.py): Redis keys, authenticated entries, the fleet key file.

An entry is one Redis string under ``l2.prefix + key``, where ``key`` is the local result cache's
32-byte key (BLAKE3 of model digest, preprocessing and content hash: inferd.shm.cache.cache_key),
so a model change changes every key and no old entry can match. The value (little-endian)::

    offset  size   field
    0       1      version   1
    1       1      k         pairs that follow, 1..255
    2       8*k    pairs     k times (class index u32, score f32), best first
    2+8k    16     mac       keyed BLAKE3(fleet key; b"inferd-l2\\x01" || key || bytes 0..2+8k)[:16]

written by any daemon of the fleet (it computed the answer from its own private copy of the frame),
read by every one. The MAC covers the key, so a valid entry copied under another key fails, and the
whole value, so a changed score or class fails; a writer without the fleet key (anyone else who can
reach Redis) cannot make a value that passes: a forged or corrupt entry is a miss, counted. 16 bytes
of MAC are 2**-128 per guess, far beyond what a Redis client can try.

The fleet key is derived (BLAKE3 derive_key) from the bytes of ``l2.key_file``: at least 32 bytes,
same on every host, a regular file the daemon's user alone may read. A key file that others may
read, a missing one, or a short one stops start-up with a ConfigError that names ``l2.key_file``.
"""
from __future__ import annotations

import hmac
import os
import stat
import struct

import blake3

from ...errors import ConfigError

VERSION = 1
MAC_BYTES = 16
MIN_KEY_FILE_BYTES = 32
MAX_SECRET_FILE_BYTES = 4096
_CONTEXT = "inferd 2026 fleet cache entry MAC v1"
_DOMAIN = b"inferd-l2\x01"
_PAIR = struct.Struct("<If")




def check_secret_file(key: str, path: str) -> None:
    """``path`` (named by config key ``key``) exists, is a regular file, and neither group nor
    others may read or write it. Raises ConfigError naming ``key`` and saying what to do."""
    if not path:
        raise ConfigError(f"{key}: required with l2.enabled; create one with `head -c 32 /dev/urandom "
                            f"> FILE; chmod 600 FILE` (the fleet key: the same file on every host)"
                            if key == "l2.key_file" else f"{key}: empty")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{key}: {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(f"{key}: {path} is mode {st.st_mode & 0o777:03o}: other users could read "
                            f"the secret; chmod 600 it (owned by the daemon's user)")


def read_secret(key: str, path: str) -> bytes:
    """The bytes of a checked secret file (check_secret_file), at most MAX_SECRET_FILE_BYTES."""
    check_secret_file(key, path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: {exc.strerror}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"{key}: {path} is over {MAX_SECRET_FILE_BYTES} bytes; is it the right file?")
    return data


def load_fleet_key(path: str) -> bytes:
    """The 32-byte MAC key derived from ``l2.key_file``. Raises ConfigError."""
    data = read_secret("l2.key_file", path)
    if len(data) < MIN_KEY_FILE_BYTES:
        raise ConfigError(f"l2.key_file: {path} holds {len(data)} bytes; the fleet key needs at least "
                            f"{MIN_KEY_FILE_BYTES} (head -c 32 /dev/urandom > {path})")
    return blake3.blake3(data, derive_key_context=_CONTEXT).digest()


def check_l2_config(l2, cache_enabled: bool = True) -> None:
    """Checks of an enabled ``[l2]`` section that involve more than one key or a file. Raises
    ConfigError."""
    if not cache_enabled:
        raise ConfigError("l2.enabled: needs cache.enabled (the fleet cache is the second level of "
                            "the local one, keyed by the same hash)")
    load_fleet_key(l2.key_file)             # present, private and long enough, before anything starts
    if l2.password_file:
        check_secret_file("l2.password_file", l2.password_file)
    sentinels = l2.sentinels or []
    named = [what for what, on in (("l2.url", bool(l2.url) and not l2.cluster), ("l2.sentinels", bool(sentinels)),
                                   ("l2.cluster", l2.cluster)) if on]
    if len(named) != 1:
        raise ConfigError("l2: name exactly one Redis topology: l2.url (standalone), l2.sentinels "
                            f"(Sentinel) or l2.cluster = true with l2.url (any node); got {named or 'none'}")
    if l2.cluster and not l2.url:
        raise ConfigError("l2.cluster: needs l2.url naming one node of the cluster (redis://HOST:PORT)")
    for i, addr in enumerate(sentinels):
        host, sep, port = str(addr).rpartition(":")
        if not isinstance(addr, str) or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"l2.sentinels[{i}]: {addr!r} is not \"HOST:PORT\"")
    if l2.url and not l2.url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"l2.url: {l2.url!r} is not redis://HOST:PORT/DB, rediss://... or unix:///PATH")
    if bool(l2.tls_cert_file) != bool(l2.tls_key_file):
        raise ConfigError("l2.tls_cert_file / l2.tls_key_file: give both or neither")
    if not l2.prefix or len(l2.prefix.encode()) > 64:
        raise ConfigError(f"l2.prefix: {l2.prefix!r} must be 1 to 64 bytes")


def redis_key(prefix: bytes, key: bytes) -> bytes:
    """The Redis key of an entry: ``l2.prefix`` (encoded) followed by the 32-byte cache key."""
    return prefix + key


def _mac(fleet_key: bytes, key: bytes, body: bytes) -> bytes:
    h = blake3.blake3(_DOMAIN, key=fleet_key)
    h.update(key)
    h.update(body)
    return h.digest(MAC_BYTES)


def encode(fleet_key: bytes, key: bytes, top) -> bytes:
    """The value of ``key``'s entry for ``top`` ([(class index, score), ...], best first; at most
    255 pairs are kept)."""
    pairs = top[:255]
    body = bytearray(2 + 8 * len(pairs))
    body[0], body[1] = VERSION, len(pairs)
    for i, (index, score) in enumerate(pairs):
        _PAIR.pack_into(body, 2 + 8 * i, int(index), float(score))
    return bytes(body) + _mac(fleet_key, key, bytes(body))


def decode(fleet_key: bytes, key: bytes, value: bytes, classes: int) -> list | None:
    """``[(class index, score), ...]`` of a value that passes the MAC, or None: wrong length,
    version, MAC, or a class index not below ``classes`` (a bug or a key shared with another
    fleet's labels, never served). The caller counts None as forged."""
    if not isinstance(value, bytes) or len(value) < 2 + 8 + MAC_BYTES:
        return None
    k = value[1]
    if value[0] != VERSION or k == 0 or len(value) != 2 + 8 * k + MAC_BYTES:
        return None
    body, mac = value[:-MAC_BYTES], value[-MAC_BYTES:]
    if not hmac.compare_digest(_mac(fleet_key, key, body), mac):
        return None
    top = [(index, score) for index, score in _PAIR.iter_unpack(body[2:])]
    if any(index >= classes for index, _ in top):
        return None
    return top
