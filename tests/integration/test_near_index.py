"""The near-duplicate index through a real daemon: a restart reopens it without re-inserting a row,
a damaged or missing one is rebuilt from the store with one log line and answers as before, and
another uid's rows never come back, and a near request over a large store whose index rebuilds is
answered overloaded (the index alone: tests/unit/test_ann_index.py)."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import short_dir, wait_until
from inferd.client import Client
from inferd.daemon.models.zoo.shapes import make_dataset

pytestmark = pytest.mark.timeout(300)

N = 48
INDEXED = ("--set", "embeddings.index_exact_below=0", "--set", "embeddings.capacity=4096")
# the inverted-file kind (daemon/caching/ann_ivf.py): 8 lists, trained once 32 rows are stored
KINDS = {"hnsw": INDEXED, "ivf": INDEXED + ("--set", 'embeddings.index_kind="ivf"', "--set", "embeddings.index_lists=8",
                                            "--set", "embeddings.index_train_rows=32")}


def _index_lines(log: str) -> list[str]:
    """The index's log lines, but an IVF index's training (NOTE [ IVF training ]): a rebuild or a
    reopen says itself in one line."""
    return [line for line in log.splitlines() if "near-duplicate index" in line and "centroids trained" not in line]


def _settled(c: Client) -> dict:
    """The daemon's index counters once nothing waits to be inserted and the saved files were
    checked (an IVF index reads its lists after faiss' import, which can outlast the start-up)."""
    return wait_until(lambda: (s := c.info()["cache"]["embedding_index"])["pending"] == 0 and s["verified"] and s,
                      timeout=60, what="the index to take every stored row")


def _store_and_check(d, images, tags) -> list:
    with Client(d.socket_path) as c:
        for img, tag in zip(images, tags):
            c.classify(img, tag=tag)
        assert _settled(c)["rows"] == len(images)
        return [c.near_duplicates(img, k=3, min_similarity=-1.0) for img in images]


def _index_dir(workdir: str) -> str:
    (store,) = glob.glob(os.path.join(workdir, "embeddings-*.store"))
    return store + ".index"


def _answers(d, images) -> list:
    with Client(d.socket_path) as c:
        _settled(c)
        return [c.near_duplicates(img, k=3, min_similarity=-1.0) for img in images]


@pytest.mark.parametrize("kind", KINDS)
def test_a_restart_reopens_the_index_without_inserting_again(fresh_daemon, kind):
    workdir = short_dir()
    INDEXED = KINDS[kind]
    images, _ = make_dataset(N, 31)
    tags = [f"img-{i}" for i in range(N)]
    d = fresh_daemon(*INDEXED, workdir=workdir)
    before = _store_and_check(d, images, tags)
    assert all(m[0].tag == t and m[0].similarity > 0.9999 for m, t in zip(before, tags))
    assert d.stop() == 0
    assert os.path.exists(os.path.join(_index_dir(workdir), "meta"))      # saved at shutdown
    d = fresh_daemon(*INDEXED, workdir=workdir)
    with Client(d.socket_path) as c:
        stats = _settled(c)
    assert stats["reopened"] == 1 and stats["rebuilt"] == 0 and stats["inserted"] == 0, stats
    after = _answers(d, images)
    assert [[(m.tag, round(m.similarity, 5)) for m in a] for a in after] == \
        [[(m.tag, round(m.similarity, 5)) for m in b] for b in before]
    assert d.stop() == 0
    (line,) = _index_lines(d.log())
    assert f"reopened: {N} rows, 0 to insert" in line, line


def _garbage(path):
    with open(path, "r+b") as fh:
        fh.seek(256)
        fh.write(os.urandom(4096))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damage", ["graph-garbage", "graph-truncated", "meta-deleted", "directory-deleted"])
def test_a_damaged_index_is_rebuilt_with_one_line_and_answers_as_before(fresh_daemon, damage, kind):
    workdir = short_dir()
    INDEXED = KINDS[kind]
    images, _ = make_dataset(N, 32)
    tags = [f"img-{i}" for i in range(N)]
    d = fresh_daemon(*INDEXED, workdir=workdir)
    before = _store_and_check(d, images, tags)
    assert d.stop() == 0
    index = _index_dir(workdir)
    (graph,) = glob.glob(os.path.join(index, "scope-*.usearch" if kind == "hnsw" else "scope-*.ivf"))
    if damage == "graph-garbage":
        _garbage(graph)
    elif damage == "graph-truncated":
        os.truncate(graph, os.path.getsize(graph) // 3)
    elif damage == "meta-deleted":
        os.unlink(os.path.join(index, "meta"))
    else:
        shutil.rmtree(index)
    d = fresh_daemon(*INDEXED, workdir=workdir)
    with Client(d.socket_path) as c:
        stats = _settled(c)
    assert stats["rebuilt"] == 1 and stats["reopened"] == 0 and stats["inserted"] == N, stats
    after = _answers(d, images)
    assert [[m.tag for m in a] for a in after] == [[m.tag for m in b] for b in before]
    assert d.stop() == 0
    (line,) = _index_lines(d.log())
    assert f"rebuilt from the store ({N} rows)" in line, line


AS_NOBODY = """
import json, os, sys
import numpy as np
from inferd.client import Client
images = np.load(sys.argv[2])
os.setgroups([]); os.setgid(65534); os.setuid(65534)
with Client(sys.argv[1], reconnect=False) as c:
    for i, img in enumerate(images[:8]):
        c.classify(img, tag=f"nobody-{i}")
    print(json.dumps([[m.tag for m in c.near_duplicates(img, k=50, min_similarity=-1.0)] for img in images]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_another_uids_rows_never_come_back(fresh_daemon):
    workdir = short_dir()
    os.chmod(workdir, 0o755)
    d = fresh_daemon(*INDEXED, "--set", "server.socket_mode=0o666", "--set", "server.allow_uids=[65534]",
                     workdir=workdir)
    images, _ = make_dataset(16, 33)
    with Client(d.socket_path) as root:
        for i, img in enumerate(images):                # the same images nobody will store, and more
            root.classify(img, tag=f"root-{i}")
        npy = os.path.join(workdir, "images.npy")
        np.save(npy, images)
        os.chmod(npy, 0o644)
        out = subprocess.run([sys.executable, "-c", AS_NOBODY, d.socket_path, npy],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        nobody = json.loads(out.stdout.strip().splitlines()[-1])
        stats = _settled(root)
        root_view = [[m.tag for m in root.near_duplicates(img, k=50, min_similarity=-1.0)] for img in images]
    assert stats["graphs"] == 2                         # a graph per uid
    assert all(tags and all(t.startswith("nobody-") for t in tags) for tags in nobody), nobody
    assert all(len(tags) == 8 for tags in nobody)
    assert [tags[0] for tags in nobody[:8]] == [f"nobody-{i}" for i in range(8)]
    assert all(len(tags) == 16 and all(t.startswith("root-") for t in tags) for tags in root_view), root_view
    assert d.stop() == 0


@pytest.mark.slow
def test_near_is_overloaded_while_a_large_stores_index_rebuilds(fresh_daemon):
    """A store too large to scan (over embeddings.index_exact_max rows) whose index is missing: near
    requests are answered overloaded (typed, with a retry hint) until the rebuild is done."""
    from inferd.client import Overloaded
    from inferd.daemon.caching.embedding_store import EmbeddingStore
    from inferd.daemon.config import ModelConfig
    from inferd.daemon.models import loading as model_mod
    from inferd.daemon.models.embedding_pooling import embedding_id

    workdir = short_dir()
    path = os.path.join(workdir, "near.store")
    rows = 20_000                                       # seconds of inserts: the rebuild outlasts start-up
    store = EmbeddingStore.open(path, rows, 305, embedding=embedding_id(model_mod.load(ModelConfig()).spec))
    rng = np.random.default_rng(5)
    for i in range(rows):
        store.add(i.to_bytes(32, "little"), rng.standard_normal(305), None, uid=os.geteuid())
    store.close()
    d = fresh_daemon("--set", f'embeddings.path="{path}"', "--set", f"embeddings.capacity={rows}",
                     "--set", "embeddings.index_exact_max=1000", "--set", "embeddings.index_max_pending=0",
                     workdir=workdir)
    image = make_dataset(1, 34)[0][0]
    with Client(d.socket_path) as c:
        with pytest.raises(Overloaded, match="embeddings.index_exact_max") as err:
            c.near_duplicates(image, k=1, min_similarity=-1.0)
        assert err.value.retry_after > 0
        stats = wait_until(lambda: (s := c.info()["cache"]["embedding_index"])["pending"] == 0 and s,
                           timeout=240, what="the rebuild")
        assert stats["rebuilt"] == 1 and stats["busy"] >= 1
        assert len(c.near_duplicates(image, k=3, min_similarity=-1.0)) == 3
    assert d.stop() == 0
