"""Ring layout, hand-over checks, sealing, and cleanup of both backends."""
import errno
import mmap
import os

import numpy as np
import pytest

from inferd.shm import ring as ringmod
from inferd.shm.ring import DATA_OFFSET, Ring, RingError, RingGeometry


@pytest.fixture(params=ringmod.BACKENDS)
def backend(request):
    return request.param


def test_geometry_rounds_slots_to_64_bytes_and_starts_them_page_aligned():
    g = RingGeometry(slots=3, slot_bytes=100)
    assert (g.stride, g.offset(0), g.offset(2), g.total_size) == (128, 4096, 4096 + 256, 4096 + 384)


def test_create_attach_round_trip_shares_memory(backend):
    owner, fd = Ring.create(RingGeometry(4, 12288), backend=backend, prefix="inferdtestring")
    try:
        other = Ring.attach(fd)
        assert other.geometry == owner.geometry
        payload = np.arange(12288, dtype=np.uint8)
        other.slot(3, 12288)[:] = payload
        assert np.array_equal(owner.read_slot(3, 12288), payload)
        assert not owner.read_slot(2, 12288).any()
        out = np.empty((64, 64, 3), np.uint8)
        assert owner.read_slot(3, 12288, out=out) is out and np.array_equal(out.reshape(-1), payload)
        other.close()
    finally:
        os.close(fd)
        owner.close()
        owner.close()                                    # idempotent


def test_posix_backend_leaves_no_name_behind():
    before = set(os.listdir("/dev/shm"))
    owner, fd = Ring.create(RingGeometry(2, 64), backend="posix", prefix="inferdtestposix")
    try:
        assert not [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("inferdtestposix")]
    finally:
        os.close(fd)
        owner.close()


def test_the_daemon_reads_a_shrunk_posix_ring_as_an_error_not_a_signal():
    """A posix ring cannot be sealed: its client may ftruncate it. The daemon's side is not mapped
    (a mapped read past the new end would be a SIGBUS); read_slot's pread comes up short instead."""
    owner, fd = Ring.create(RingGeometry(4, 4096), backend="posix", prefix="inferdtestshrink")
    client = Ring.attach(fd)
    try:
        assert not owner.mapped and client.mapped
        client.slot(1, 4096)[:] = 7
        assert (owner.read_slot(1, 4096) == 7).all()
        client.close()                                   # the client unmaps, then shrinks it
        os.ftruncate(fd, DATA_OFFSET + 4096 + 100)       # slot 0 whole, slot 1 cut at 100 bytes
        assert owner.read_slot(0, 4096).shape == (4096,)
        with pytest.raises(RingError, match="holds only 100 of 4096 bytes"):
            owner.read_slot(1, 4096)
        os.ftruncate(fd, 0)
        with pytest.raises(RingError, match="holds only 0 of"):
            owner.read_slot(0, 10)
        with pytest.raises(RingError, match="not mapped"):
            owner.slot(0, 10)
    finally:
        client.close()
        os.close(fd)
        owner.close()
        owner.close()


@pytest.mark.parametrize("index, nbytes", [(-1, 1), (4, 1), (0, 4097), (0, -1)])
def test_read_slot_refuses_what_is_outside_the_geometry(backend, index, nbytes):
    owner, fd = Ring.create(RingGeometry(4, 4096), backend=backend, prefix="inferdtestbounds")
    try:
        with pytest.raises(RingError, match="outside this ring"):
            owner.read_slot(index, nbytes)
    finally:
        os.close(fd)
        owner.close()


def test_memfd_ring_cannot_be_shrunk_by_a_client():
    owner, fd = Ring.create(RingGeometry(2, 64), backend="memfd")
    try:
        with pytest.raises(OSError) as err:
            os.ftruncate(fd, 4096)                     # what a hostile client would try
        assert err.value.errno == errno.EPERM
        assert os.fstat(fd).st_size == owner.geometry.total_size
    finally:
        os.close(fd)
        owner.close()


def _raw_fd(size: int, header: bytes) -> int:
    fd = os.memfd_create("inferdtestbad")
    os.ftruncate(fd, size)
    os.pwrite(fd, header, 0)
    return fd


@pytest.mark.parametrize("size, mutate, fragment", [
    (100, None, "smaller than"),
    (DATA_OFFSET + 64, lambda h: b"NOTARING" + h[8:], "magic"),
    (DATA_OFFSET + 64, lambda h: h[:8] + (99).to_bytes(4, "little") + h[12:], "format version 99"),
    (DATA_OFFSET + 4096, lambda h: h, "does not match"),               # header says smaller mapping
])
def test_attach_refuses_a_bad_header(size, mutate, fragment):
    owner, good_fd = Ring.create(RingGeometry(1, 64))
    header = bytes(owner.array[:64])
    owner.close()
    os.close(good_fd)
    fd = _raw_fd(size, mutate(header) if mutate else b"")
    try:
        with pytest.raises(RingError, match=fragment):
            Ring.attach(fd)
    finally:
        os.close(fd)


def test_sweep_removes_names_of_dead_daemons_only(tmp_path):
    dead_pid = 2**22 + 12345                              # above pid_max's default: never alive
    for name in (f"inferdsw.{dead_pid}.0.ab", f"inferdsw.{os.getpid()}.0.cd", "other.1.0.ef"):
        (tmp_path / name).write_bytes(b"")
    removed = ringmod.sweep_stale("inferdsw", str(tmp_path))
    assert removed == [f"inferdsw.{dead_pid}.0.ab"]
    assert sorted(os.listdir(tmp_path)) == sorted([f"inferdsw.{os.getpid()}.0.cd", "other.1.0.ef"])
