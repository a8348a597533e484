"""The inverted-file kind of the near-duplicate index (``embeddings.index_kind = "ivf"``:
daemon/caching/ann_ivf.py behind daemon/caching/ann_index.py): answers as the exact scan, training
once enough rows are stored (exact scan before), per-uid scoping, recycled rows (deferred removals),
saving and reopening without a rebuild or a new training, and damaged files rebuilt from the
store with one log line, never a wrong answer. The HNSW kind's own tests: test_ann_index.py."""
import dataclasses
import os

import numpy as np
import pytest

from inferd.daemon.caching import ann_ivf
from inferd.daemon.caching.ann_index import IndexOptions
from inferd.daemon.caching.embedding_store import EmbeddingStore
from test_ann_index import DIM, OPTS, each_uid_sees_only_its_own, exact, fill, garbage, h, settled, truncate, vectors

pytestmark = pytest.mark.timeout(120)

IVF = dataclasses.replace(OPTS, kind="ivf", lists=16, probe=4)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "e.store")


def files(path: str, prefix: str) -> list[str]:
    d = path + ".index"
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.startswith(prefix))


def test_answers_as_the_exact_scan_from_int8_lists(path):
    store, v = fill(path, n=1500, opts=IVF)
    try:
        ann = store._ann
        assert ann.centroids is not None and ann.centroids.nlist == 16
        assert isinstance(ann.graphs[0].index, ann_ivf.IvfScope) and len(ann.graphs[0].index) == 1500
        rng = np.random.default_rng(1)
        hits = same = 0
        for i in rng.choice(len(v), 200, replace=False).tolist():
            q = v[i] + 0.05 * rng.standard_normal(DIM).astype(np.float32)
            got, want = store.search(q, 5, -1.0, uid=0), exact(store, q, 5, 0)
            hits += got[0][1] == str(i)
            same += [t for _, t, _ in got] == [t for _, t, _ in want]
        assert hits >= 198 and same >= 180, (hits, same)
        assert store.index_stats()["searches"] >= 200 and store.index_stats()["exact_searches"] == 0
    finally:
        store.close()


def test_the_exact_scan_answers_until_the_centroids_are_trained(path):
    """NOTE [ IVF training ]: below ``train_rows`` nothing is trained and every row is pending;
    the store answers by its exact scan (small enough); past it, the index is trained and answers."""
    opts = dataclasses.replace(IVF, train_rows=800)
    store = EmbeddingStore.open(path, 2000, DIM, index=opts)
    v = vectors(1200)
    try:
        ann = store._ann
        assert ann.train_rows() == 800
        for i in range(700):
            store.add(h(i), v[i], str(i), uid=0)
        for _ in range(3):                               # the inserter looked and waits
            assert ann.centroids is None and not ann.answers()
            assert store.search(v[5], 1, -1.0, uid=0)[0][1] == "5"
        assert ann.counters["exact_searches"] >= 3 and ann.counters["searches"] == 0
        for i in range(700, 1200):
            store.add(h(i), v[i], str(i), uid=0)
        stats = settled(store)
        assert ann.centroids is not None and stats["rows"] == 1200 and stats["inserted"] == 1200
        assert all(store.search(v[i], 1, -1.0, uid=0)[0][1] == str(i) for i in range(0, 1200, 11))
        assert ann.counters["searches"] > 0
    finally:
        store.close()


def test_default_training_threshold_and_lists():
    assert ann_ivf.auto_lists(1_000_000) == 4096 and ann_ivf.auto_lists(100_000) == 1024
    assert ann_ivf.auto_lists(10) == 64
    assert ann_ivf.padded(305) == 320 and ann_ivf.padded(32) == 32


def test_a_uid_sees_only_its_own_lists(path):
    store, v = fill(path, n=1200, uids=(1000, 2000, 3000), opts=IVF)
    try:
        assert store.index_stats()["graphs"] == 3       # one scope per uid, one set of centroids
        cent = store._ann.centroids
        assert all(g.index.centroids is cent for g in store._ann.graphs.values())
        each_uid_sees_only_its_own(store, v)
    finally:
        store.close()
    store, v = fill(path + "2", n=900, uids=(1000, 2000), opts=IVF, shared=True)
    try:
        assert store.index_stats()["graphs"] == 1
        assert all(store.search(v[i], 1, -1.0, uid=1000)[0][1] == str(i) for i in range(0, 900, 7))
    finally:
        store.close()


def test_recycled_rows_never_answer_for_their_old_image_and_stale_keys_are_flushed(path):
    """A full store recycles rows: a recycled row's old key stays in its lists, stale, until the
    stale keys are 1/STALE_SHARE of them (one pass over the lists) or a save; a search drops them."""
    store = EmbeddingStore.open(path, 1600, DIM, index=IVF)
    v = vectors(4800)
    try:
        for i in range(4800):                           # three times round the store
            store.add(h(i), v[i], str(i), uid=i % 2)
        settled(store)
        for g in store._ann.graphs.values():            # flushed on the way: never far past the share
            assert len(g.index) <= 800 + len(g.stale) and len(g.stale) * 64 < len(g.index) + 64
        first = []
        for i in range(0, 4800, 7):
            got = store.search(v[i], 5, -1.0, uid=i % 2)
            assert all(int(t) >= 3200 and int(t) % 2 == i % 2 for _, t, _ in got)
            if i >= 3200:
                first.append(got[0][1] == str(i))
        assert np.mean(first) >= 0.97, np.mean(first)
    finally:
        store.close()                                   # saves: stale keys removed first
    store = EmbeddingStore.open(path, 1600, DIM, index=IVF)
    try:
        stats = settled(store)
        assert stats["reopened"] == 1 and stats["inserted"] == 0
        assert sum(len(g.index) for g in store._ann.graphs.values()) == 1600
        assert all(not g.stale for g in store._ann.graphs.values())
    finally:
        store.close()


def test_reopened_without_training_or_inserting_again(path, caplog):
    store, v = fill(path, n=1500, uids=(0, 1), opts=IVF)
    before = {i: store.search(v[i], 3, -1.0, uid=i % 2) for i in range(0, 1500, 17)}
    store.close()
    assert len(files(path, "centroids-")) == 1 and len(files(path, "scope-")) == 2
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in files(path, ""))
    caplog.set_level("INFO", logger="inferd.embeddings")
    store = EmbeddingStore.open(path, 1500, DIM, index=IVF)
    try:
        stats = settled(store)
        assert stats["reopened"] == 1 and stats["rebuilt"] == 0 and stats["inserted"] == 0
        assert not any("trained" in r.getMessage() for r in caplog.records)
        assert {i: store.search(v[i], 3, -1.0, uid=i % 2) for i in before} == before
        w = vectors(10, seed=5)                          # and it takes new rows into the same lists
        for i in range(10):
            store.add(h(90_000 + i), w[i], f"w{i}", uid=0)
        settled(store)
        assert all(store.search(w[i], 1, -1.0, uid=0)[0][1] == f"w{i}" for i in range(10))
    finally:
        store.close()


@pytest.mark.parametrize("damage", [
    lambda path: garbage(files(path, "scope-")[0]),
    lambda path: truncate(files(path, "scope-")[0]),
    lambda path: garbage(files(path, "centroids-")[0]),
    lambda path: os.unlink(files(path, "centroids-")[0]),
], ids=["lists-garbage", "lists-truncated", "centroids-garbage", "centroids-missing"])
def test_damaged_files_are_rebuilt_with_one_line(path, damage, caplog):
    store, v = fill(path, n=1000, uids=(0, 1), opts=IVF)
    store.close()
    damage(path)
    caplog.set_level("INFO", logger="inferd.embeddings")
    store = EmbeddingStore.open(path, 1000, DIM, index=IVF)
    try:
        stats = settled(store)
        assert stats["rebuilt"] == 1 and stats["reopened"] == 0 and stats["inserted"] == 1000
        lines = [r.getMessage() for r in caplog.records if "rebuilt from the store" in r.getMessage()]
        assert len(lines) == 1 and "(1000 rows)" in lines[0], lines
        for i in range(0, 1000, 7):
            assert store.search(v[i], 1, -1.0, uid=i % 2)[0][1] == str(i)
    finally:
        store.close()


def test_switching_the_kind_or_the_lists_rebuilds(path, caplog):
    store, v = fill(path, n=800)                        # an HNSW index first
    store.close()
    caplog.set_level("INFO", logger="inferd.embeddings")
    for opts, what in ((IVF, "scalar 'i8' (now 'ivf-i8')"), (dataclasses.replace(IVF, lists=32), "expansion_add 16 (now 32)"),
                       (OPTS, "scalar 'ivf-i8' (now 'i8')")):
        caplog.clear()
        store = EmbeddingStore.open(path, 800, DIM, index=opts)
        try:
            assert store.index_stats()["rebuilt"] == 1
            assert any(what in r.getMessage() for r in caplog.records), (what, [r.getMessage() for r in caplog.records])
            settled(store)
            assert store.search(v[4], 1, -1.0, uid=0)[0][1] == "4"
        finally:
            store.close()


def test_options_from_the_config():
    from inferd.daemon.caching.embedding_store import index_options
    from inferd.daemon.config_sections import EmbeddingsConfig

    o = index_options(EmbeddingsConfig(index_kind="ivf", index_lists=256, index_probe=8))
    assert (o.kind, o.lists, o.probe) == ("ivf", 256, 8)
    assert IndexOptions().kind == "hnsw"


def test_the_default_kind_follows_the_capacity():
    """``auto`` (the default): IVF lists above 100,000 rows of capacity, HNSW graphs up to it; a
    kind named is kept whatever the capacity."""
    from inferd.daemon.caching.embedding_store import index_options
    from inferd.daemon.config_sections import EmbeddingsConfig

    assert EmbeddingsConfig().index_kind == "auto"
    assert [index_options(EmbeddingsConfig(capacity=c)).kind for c in (1_000, 100_000, 100_001, 10_000_000)] \
        == ["hnsw", "hnsw", "ivf", "ivf"]
    assert index_options(EmbeddingsConfig(capacity=1_000_000, index_kind="hnsw")).kind == "hnsw"
    assert index_options(EmbeddingsConfig(capacity=1_000, index_kind="ivf")).kind == "ivf"


def test_restored_lists_take_new_rows_as_lists_never_saved_do(tmp_path):
    """A scope restored from its file (each list read back with room to grow: NOTE [ room to
    grow ]) holds exactly the saved rows, and rows added after it go where they would have gone
    in the scope that was never saved: the same lists, keys and codes, the same search."""
    rng = np.random.default_rng(11)
    rows = rng.normal(size=(900, DIM)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    centroids = ann_ivf.Centroids.train(rows[:400], 16)
    kept = centroids.new_scope()
    kept.add(np.arange(600, dtype=np.uint64), rows[:600])
    kept.save(str(tmp_path / "scope.ivf"))
    restored = ann_ivf.IvfScope.restore(str(tmp_path / "scope.ivf"), centroids)

    def lists(scope):
        return [(l, n, ids.copy(), codes.copy()) for l, n, ids, codes in scope._lists()]

    def same(a, b):
        return len(a) == len(b) and all(x[:2] == y[:2] and np.array_equal(x[2], y[2]) and np.array_equal(x[3], y[3])
                                        for x, y in zip(a, b))

    assert len(restored) == 600 and same(lists(restored), lists(kept))
    for scope in (kept, restored):                  # 300 more: every list grows past its room
        for at in range(600, 900, 50):
            scope.add(np.arange(at, at + 50, dtype=np.uint64), rows[at:at + 50])
    assert len(restored) == 900 and same(lists(restored), lists(kept))
    for q in rows[::37]:
        assert np.array_equal(restored.search(q, 5).keys, kept.search(q, 5).keys)
