"""A damaged result cache or embedding store is set aside (``PATH.corrupt-<time>``) and rebuilt at
start-up, and only the latest set-aside copy of each is kept: copies are as large as the files
(64 MiB and more), so a file damaged at every restart must not fill the disk with them."""
from __future__ import annotations

import glob
import os

import pytest

from helpers import sample_images, short_dir
from inferd.client import Client


def _corrupt(path: str, marker: bytes) -> None:
    """Overwrite the header: the magic and the check no longer match, whatever the format."""
    with open(path, "r+b") as fh:
        fh.write(marker.ljust(64, b"!"))


def _aside(path: str) -> list[str]:
    return sorted(glob.glob(glob.escape(path) + ".corrupt-*"))


@pytest.mark.timeout(300)
def test_three_corruptions_and_restarts_leave_one_set_aside_copy_of_each(fresh_daemon):
    workdir = short_dir()
    label, image = sample_images()[0]
    d = fresh_daemon(workdir=workdir)
    with Client(d.socket_path) as c:                   # the store file is made with the first model
        assert c.classify(image, tag="kept?")[0].label == label
    assert d.stop() == 0
    cache = os.path.join(workdir, "results.cache")
    (store,) = glob.glob(os.path.join(workdir, "embeddings-*.store"))
    for round_ in range(1, 4):
        marker = f"damage of round {round_}".encode()
        _corrupt(cache, marker)
        _corrupt(store, marker)
        d = fresh_daemon(workdir=workdir)
        with Client(d.socket_path) as c:               # rebuilt, and serving
            assert c.classify(image)[0].label == label
        assert d.stop() == 0
        log = d.log()
        for path, what in ((cache, "result cache"), (store, "embedding store")):
            aside = _aside(path)
            assert len(aside) == 1, (round_, aside)
            with open(aside[0], "rb") as fh:           # the one kept is this round's
                assert fh.read(len(marker)) == marker
            line = next(x for x in log.splitlines() if f"{what} {path}:" in x and "set aside as" in x)
            assert f"set aside as {aside[0]}" in line and "only the latest set-aside copy is kept" in line
            if round_ > 1:                             # and it says which earlier copy went
                assert "removed" in line, line
    assert not [n for n in os.listdir(workdir) if ".tmp-" in n]


def test_a_temporary_file_a_killed_builder_left_is_removed_at_the_next_open(tmp_path):
    """A daemon killed while building a fresh file leaves ``PATH.tmp-<pid>-*`` with all its blocks
    reserved; the next open removes it once that pid is gone and nobody holds its lock, and leaves
    one that a live process holds."""
    import fcntl
    import subprocess
    import sys

    from inferd.shm.cache import ResultCache

    path = str(tmp_path / "results.cache")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = f"{path}.tmp-{int(gone.stdout)}-0a0b0c0d"             # its pid has exited
    with open(dead, "wb") as fh:
        fh.truncate(1 << 20)
    live = f"{path}.tmp-{os.getppid()}-01020304"                 # a live pid, its lock held
    holder = os.open(live, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        lines = []
        ResultCache.open_writer(path, 1 << 18, log=lines.append).close()
        assert not os.path.exists(dead) and os.path.exists(live)
        assert lines == [f"result cache {path}: removed {dead}, left half built by process "
                         f"{int(gone.stdout)}, which is gone"]
    finally:
        os.close(holder)
        os.unlink(live)
