"""The cache directory keeps the embedding store of the model configured now, not one per model
ever served: a daemon removes the others at start-up with a log line, but never a store another
live process holds."""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest

from helpers import shm_leftovers, short_dir, spawn_daemon

pytestmark = pytest.mark.timeout(180)


def _stores(work: str) -> set[str]:
    """The stores (each with its near-duplicate index directory, checked here)."""
    names = {n for n in os.listdir(work) if n.startswith("embeddings-")}
    stores = {n for n in names if not n.endswith(".index")}
    assert {n[:-len(".index")] for n in names - stores} <= stores, names   # no index outlives its store
    return stores


def _serve_once(work: str, *args: str):
    d = spawn_daemon(*args, workdir=work)
    try:
        assert d.stop() == 0, d.log()
        return d.log()
    finally:
        d.kill()
        assert not shm_leftovers(d.prefix)


def test_stores_of_models_no_longer_configured_are_removed_at_start_up():
    work = short_dir()
    try:
        _serve_once(work)
        first = _stores(work)
        assert len(first) == 1                              # shapes' store
        Path(work, f"{next(iter(first))}.corrupt-1700000000").write_bytes(b"set aside")
        held = Path(work, "embeddings-0123456789abcdef.store")  # another live daemon's store
        held.write_bytes(b"x")
        with open(held, "rb") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            # another embedding definition of the model: a store of its own
            log = _serve_once(work, "--set", 'model.embedding_pool="mean"')
            second = _stores(work) - {held.name}
            assert len(second) == 1 and not second & first, (first, second)
            assert held.exists()
            assert "removed 2 embedding stores of models no longer configured" in log, log
            assert next(iter(first)) in log
            log = _serve_once(work, "--set", 'model.embedding_pool="mean"')  # the same model: kept
            assert _stores(work) - {held.name} == second and held.exists()
            assert "embedding stores of models no longer configured" not in log
    finally:
        shutil.rmtree(work, ignore_errors=True)
