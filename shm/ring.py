"""A client's shared-memory ring: fixed-size slots that carry frames from one client to the daemon.

One ring per client session. The daemon creates it, writes the header once, and hands the client a
file descriptor over the session socket (SCM_RIGHTS). Only the descriptor crosses processes; each
side maps it. The name is gone before the client even connects to it, so a SIGKILL of either side
leaves nothing behind: the kernel frees the memory when the last mapping and descriptor close.

Layout (all integers little-endian; the daemon writes the header at creation, nobody writes it after)::

    offset  size  field
    0       8     magic            b"INFDRING"
    8       4     format version   u32, currently 1
    12      4     slot count       u32
    16      8     slot capacity    u64, payload bytes a slot can hold
    24      8     slot stride      u64, bytes from one slot to the next (capacity rounded up to 64)
    32      8     data offset      u64, byte offset of slot 0 (4096: slots start page-aligned)
    40      8     total size       u64, = data offset + slot count * stride = size of the mapping
    48      16    reserved         zero
    ...           (zero up to data offset)
    data offset + i * stride:      slot i payload, ``capacity`` bytes; written by the client only

Slot states. Ownership moves with socket messages, which also give the ordering: the client writes
the payload *then* sends ``classify`` (the send publishes the slot); the daemon copies the payload
into private memory *then* sends the reply (the reply hands the slot back)::

    FREE (client) --client writes payload--> WRITTEN (client)
    WRITTEN --client sends classify{slot}--> SUBMITTED (daemon reads it; client must not write)
    SUBMITTED --daemon sends the reply for that request--> FREE

The daemon never writes a slot and never trusts the header read back from memory: it keeps the
geometry it created and checks every slot, byte count and shape a client names against it. A client
that writes a SUBMITTED slot can only spoil its own answer.

Runs. A payload larger than one slot (the encoded bytes of an upload, docs/protocol.md) spans a run
of consecutive slots ``[first, first + m)``, ``m = ceil(nbytes / capacity)``, never wrapping past
the last slot: slot ``first + i`` holds bytes ``[i * capacity, (i + 1) * capacity)`` of it (the last
one partly), so the padding between slots is never part of a payload. Every slot of a run moves
between the states above together, with the one request that names it.

Backends, and why no client can crash the daemon through its ring. A read through a mapping of
memory that its file no longer covers is a SIGBUS, and a client holds the ring's descriptor, so it
could ftruncate it; the daemon therefore only ever reads rings that cannot shrink through a mapping:

- ``memfd`` (default, Linux): an anonymous memfd sealed against shrinking and growing (and against
  new seals), so ftruncate fails with EPERM and the daemon's mapping stays whole. It never has a
  name in /dev/shm at all.
- ``posix``: a posix-ipc shared memory object, unlinked right after creation (the client gets the
  descriptor, never the name); for hosts without memfd. It cannot be sealed, so the daemon never
  maps it: it keeps a descriptor and reads slots with ``pread`` (:meth:`Ring.read_slot`). A client
  that shrank its ring gets a short read there, a ``RingError`` for its own request, never a
  signal. (A size check before a mapped read would race with ftruncate: not safe.) A name left by
  a daemon killed between create and unlink is removed by :func:`sweep_stale` at the next start.

The daemon reads slots only with :meth:`Ring.read_slot` and :meth:`Ring.read_run` (private copies,
either backend); ``slot`` views and ``write_run`` are for the client, which writes through its own
mapping.
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import mmap
import os
import secrets
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"INFDRING"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQQQQ16x")
DATA_OFFSET = 4096
SLOT_ALIGN = 64
BACKENDS = ("memfd", "posix")

_counter = itertools.count()


class RingError(Exception):
    """A ring that cannot be created or attached: the message says which check failed."""


@dataclass(frozen=True)
class RingGeometry:
    """Slot count and capacity; everything else follows. A frozen value both sides can carry."""

    slots: int
    slot_bytes: int

    @property
    def stride(self) -> int:
        return -(-self.slot_bytes // SLOT_ALIGN) * SLOT_ALIGN

    @property
    def total_size(self) -> int:
        return DATA_OFFSET + self.slots * self.stride

    def offset(self, slot: int) -> int:
        return DATA_OFFSET + slot * self.stride

    def run_slots(self, nbytes: int) -> int:
        """Slots a run of ``nbytes`` payload bytes spans (see Runs in the module docstring)."""
        return -(-nbytes // self.slot_bytes)

    @property
    def max_run(self) -> int:
        """The most slots one run may span: half the ring (at least one), so that one request
        never holds a client's whole ring and its frames always find slots beside it."""
        return max(1, self.slots // 2)


def _make_memfd(size: int, prefix: str) -> int:
    fd = os.memfd_create(f"{prefix}-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_posix(size: int, prefix: str) -> int:
    import posix_ipc   # here: only the posix backend needs it; memfd rings never load it

    name = f"/{prefix}.{os.getpid()}.{next(_counter)}.{secrets.token_hex(4)}"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        fd = os.dup(shm.fd)
    finally:
        # Unlink at once: from here on only descriptors keep the memory alive.
        shm.close_fd()
        shm.unlink()
    return fd


class Ring:
    """One side of a ring. ``create`` on the daemon side, ``attach`` on the client side.

    ``array`` is a flat uint8 view of the whole mapping (None for the daemon's unmapped posix ring);
    slices of it must not outlive ``close()``. ``close()`` is idempotent and safe on a half-built
    ring.
    """

    def __init__(self, mm: mmap.mmap | None, geometry: RingGeometry, fd: int | None = None):
        self.geometry = geometry
        self._mm = mm
        self._fd = fd                                    # the daemon's posix ring: read with pread
        self.array = np.frombuffer(mm, dtype=np.uint8) if mm is not None else None

    @property
    def mapped(self) -> bool:
        """True when this side reads and writes through a mapping (memfd, or the client's side)."""
        return self._mm is not None

    @classmethod
    def create(cls, geometry: RingGeometry, *, backend: str = "memfd",
               prefix: str = "inferd") -> tuple["Ring", int]:
        """Create and write the header. Returns the ring and a descriptor to hand over (the caller
        closes it once sent). A memfd ring is sealed and mapped; a posix ring is not mapped here:
        this side keeps a descriptor of its own and reads it with ``pread`` (see the module)."""
        if backend not in BACKENDS:
            raise RingError(f"ring backend {backend!r} is not one of {BACKENDS}")
        size = geometry.total_size
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, geometry.slots, geometry.slot_bytes,
                              geometry.stride, DATA_OFFSET, size)
        fd = (_make_memfd if backend == "memfd" else _make_posix)(size, prefix)
        own = None
        try:
            if backend == "memfd":
                mm = mmap.mmap(fd, size)
                mm[:len(header)] = header
                return cls(mm, geometry), fd
            os.pwrite(fd, header, 0)
            own = os.dup(fd)
            os.set_inheritable(own, False)
            return cls(None, geometry, own), fd
        except BaseException:
            os.close(fd)
            if own is not None:
                os.close(own)
            raise

    @classmethod
    def attach(cls, fd: int) -> "Ring":
        """Map a descriptor received from the daemon and check its header against its real size.
        The descriptor stays open; the caller closes it."""
        size = os.fstat(fd).st_size
        if size < DATA_OFFSET:
            raise RingError(f"ring of {size} bytes is smaller than its {DATA_OFFSET}-byte header")
        mm = mmap.mmap(fd, size)
        try:
            magic, version, slots, slot_bytes, stride, data_offset, total = _HEADER.unpack_from(mm, 0)
            if magic != MAGIC:
                raise RingError(f"ring magic is {magic!r}, expected {MAGIC!r}")
            if version != FORMAT_VERSION:
                raise RingError(f"ring format version {version}; this library reads {FORMAT_VERSION}")
            geometry = RingGeometry(slots, slot_bytes)
            if (stride, data_offset, total) != (geometry.stride, DATA_OFFSET, geometry.total_size) \
                    or total != size:
                raise RingError(f"ring header geometry {(slots, slot_bytes, stride, data_offset, total)} "
                                f"does not match a mapping of {size} bytes")
        except BaseException:
            mm.close()
            raise
        return cls(mm, geometry)

    def slot(self, index: int, nbytes: int) -> np.ndarray:
        """A view of the first ``nbytes`` of slot ``index`` in this side's mapping (the client
        writes frames through it). Callers have checked both bounds."""
        if self.array is None:
            raise RingError("this ring is not mapped (the daemon's posix ring): read it with read_slot")
        start = self.geometry.offset(index)
        return self.array[start:start + nbytes]

    def read_slot(self, index: int, nbytes: int, out: np.ndarray | None = None) -> np.ndarray:
        """A private copy of the first ``nbytes`` of slot ``index``: into ``out`` (a C-contiguous
        array of exactly ``nbytes`` bytes, any shape; returned) or a new uint8 array. Never a
        signal, whatever the client did to its ring: RingError when the slot cannot be read whole
        (a posix ring its client shrank), or when ``index`` / ``nbytes`` are outside the geometry."""
        g = self.geometry
        if not (0 <= index < g.slots and 0 <= nbytes <= g.slot_bytes):
            raise RingError(f"slot {index}, {nbytes} bytes is outside this ring's {g.slots} slots of "
                            f"{g.slot_bytes} bytes")
        if out is None:
            out = np.empty(nbytes, dtype=np.uint8)
        elif out.nbytes != nbytes or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"out must be a writable C-contiguous array of {nbytes} bytes")
        self._read(g.offset(index), out.reshape(-1).view(np.uint8), f"slot {index}")
        return out

    def read_run(self, first: int, nbytes: int, out: np.ndarray | None = None) -> np.ndarray:
        """A private copy of a run's ``nbytes`` payload bytes starting at slot ``first`` (Runs in
        the module docstring): into ``out`` (a writable C-contiguous uint8 array of exactly
        ``nbytes``; returned) or a new one. RingError, never a signal, when the run is outside the
        geometry or cannot be read whole (a posix ring its client shrank), as read_slot."""
        g = self.geometry
        if not (0 <= first < g.slots and nbytes > 0 and first + g.run_slots(nbytes) <= g.slots):
            raise RingError(f"a run of {nbytes} bytes from slot {first} is outside this ring's "
                            f"{g.slots} slots of {g.slot_bytes} bytes")
        if out is None:
            out = np.empty(nbytes, dtype=np.uint8)
        elif out.nbytes != nbytes or out.dtype != np.uint8 or not out.flags.c_contiguous \
                or not out.flags.writeable:
            raise ValueError(f"out must be a writable C-contiguous uint8 array of {nbytes} bytes")
        flat = out.reshape(-1)
        if g.stride == g.slot_bytes:                     # no padding between slots: one copy
            self._read(g.offset(first), flat, f"the run from slot {first}")
            return out
        for i, at in enumerate(range(0, nbytes, g.slot_bytes)):
            self._read(g.offset(first + i), flat[at:at + g.slot_bytes], f"slot {first + i} of a run")
        return out

    def write_run(self, first: int, data) -> None:
        """Write ``data`` (bytes-like) as a run from slot ``first`` through this side's mapping
        (the client's side). Callers have checked that the run fits the ring."""
        g, src = self.geometry, np.frombuffer(data, dtype=np.uint8)
        for i, at in enumerate(range(0, len(src), g.slot_bytes)):
            piece = src[at:at + g.slot_bytes]
            self.slot(first + i, len(piece))[:] = piece

    def _read(self, start: int, into: np.ndarray, what: str) -> None:
        """Copy ``into.nbytes`` bytes from ring offset ``start`` (checked by the caller) into the
        flat uint8 array ``into``."""
        nbytes = into.nbytes
        if self._mm is not None:                         # sealed (memfd): the mapping cannot shrink
            into[:] = self.array[start:start + nbytes]
            return
        if self._fd is None:
            raise RingError("the ring is closed")
        view, done = memoryview(into), 0
        while done < nbytes:
            n = os.preadv(self._fd, [view[done:]], start + done)
            if n == 0:
                raise RingError(f"{what} holds only {done} of {nbytes} bytes: the ring was "
                                "shrunk under the request (ftruncate); only the client that owns "
                                "it can do that")
            done += n

    def close(self) -> None:
        mm, self._mm = self._mm, None
        fd, self._fd = self._fd, None
        self.array = None
        if mm is not None:
            mm.close()
        if fd is not None:
            os.close(fd)


def sweep_stale(prefix: str, shm_dir: str = "/dev/shm") -> list[str]:
    """Remove posix-backend ring names left by a daemon that died between create and unlink.

    A name is ``{prefix}.{pid}.{n}.{random}``; it is removed only when that pid is not alive.
    Returns the names removed.
    """
    import psutil   # here: a daemon-only dependency; the client library (which imports this module) has none

    removed = []
    try:
        entries = os.listdir(shm_dir)
    except FileNotFoundError:
        return removed
    for entry in entries:
        parts = entry.split(".")
        if len(parts) != 4 or parts[0] != prefix or not parts[1].isdigit():
            continue
        if psutil.pid_exists(int(parts[1])):
            continue
        try:
            os.unlink(os.path.join(shm_dir, entry))
            removed.append(entry)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
    return removed
