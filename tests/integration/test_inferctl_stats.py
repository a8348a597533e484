"""`inferctl stats` read as an operator reads it: the cache line counts the entries in the cache
file, and the count follows classifications and a flush."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers import sample_images, shm_leftovers, spawn_daemon
from inferd.client import Client

pytestmark = pytest.mark.timeout(180)


def inferctl(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferd.client.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def _entries(env) -> tuple[int, int]:
    out = inferctl("stats", env=env)
    assert out.returncode == 0, out.stderr
    line, = [ln for ln in out.stdout.splitlines() if ln.startswith("cache:")]
    found = re.search(r"entries (\d+) of (\d+)", line)
    assert found, line
    return int(found[1]), int(found[2])


def test_stats_table_counts_the_cache_entries():
    d = spawn_daemon()
    try:
        env = {"INFERD_SOCKET": d.socket_path}
        used, total = _entries(env)
        assert used == 0 and total > 0
        images = [img for _, img in sample_images()]
        with Client(d.socket_path, cache=False) as c:
            c.classify_many(images)
        assert _entries(env) == (len(images), total)
        assert inferctl("flush-cache", env=env).returncode == 0
        assert _entries(env) == (0, total)
        assert d.stop() == 0, d.log()
    finally:
        d.cleanup()
    assert not shm_leftovers(d.prefix)
