"""Embedding store: add/get/replace, ring eviction, exact search against brute force, tags, reopen,
damaged files, interrupted adds, the writer lock, the embedding definition it was made for; the
pooling (near-duplicates through a real daemon: tests/integration/test_near_duplicates.py)."""
import logging
import os

import numpy as np
import pytest
import torch

from inferd.daemon.models import loading as model_mod
from inferd.daemon.config import ConfigError, ModelConfig
from inferd.daemon.pipeline.engine import Engine, Staging
from inferd.daemon.caching.embedding_store import (HEADER_SIZE, META_SIZE, EmbeddingStore,
                                                   EmbeddingStoreError, EmbeddingStoreLocked,
                                                   default_path)
from inferd.daemon.models.embedding_pooling import Pool
from inferd.daemon.models.zoo.shapes import make_dataset


def h(n: int) -> bytes:
    return n.to_bytes(32, "little")


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v.astype(np.float64))


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "embeddings.store")


def test_add_get_replace(path):
    store = EmbeddingStore.open(path, capacity=8, dim=4)
    assert len(store) == 0 and store.get(h(1), uid=0) is None
    row = store.add(h(1), np.array([3.0, 0, 4.0, 0]), tag="cat", uid=0)
    assert np.allclose(store.get(h(1), uid=0), [0.6, 0, 0.8, 0]) and store.get(h(1), uid=0).dtype == np.float32
    assert store.add(h(1), np.array([0, 1.0, 0, 0]), tag="dog", uid=0) == row   # same hash: same row
    assert len(store) == 1 and np.array_equal(store.get(h(1), uid=0), [0, 1, 0, 0])
    assert store.search(np.array([0, 1.0, 0, 0]), uid=0) == [(h(1), "dog", 1.0)]
    store.close()
    store.close()                                           # idempotent
    with pytest.raises(EmbeddingStoreError, match="closed"):
        store.get(h(1), uid=0)


def test_full_store_evicts_the_oldest_row(path):
    store = EmbeddingStore.open(path, capacity=3, dim=4)
    for n in range(3):
        store.add(h(n), np.eye(4)[n], uid=0)
    store.add(h(0), np.eye(4)[3], uid=0)                           # a replace does not make h(0) younger
    store.add(h(3), np.ones(4), uid=0)
    assert len(store) == 3 and store.get(h(0), uid=0) is None
    assert all(store.get(h(n), uid=0) is not None for n in (1, 2, 3))
    store.add(h(4), -np.ones(4), uid=0)
    assert store.get(h(1), uid=0) is None and len(store) == 3
    store.close()


def test_bad_input_is_refused(path):
    store = EmbeddingStore.open(path, capacity=3, dim=4)
    with pytest.raises(ValueError, match="shape"):
        store.add(h(1), np.ones(5), uid=0)
    with pytest.raises(ValueError, match="zero"):
        store.add(h(1), np.zeros(4), uid=0)
    with pytest.raises(ValueError, match="32 bytes"):
        store.add(b"short", np.ones(4), uid=0)
    with pytest.raises(ValueError, match="64 bytes"):
        store.add(h(1), np.ones(4), tag="x" * 65, uid=0)
    assert len(store) == 0
    store.close()


def test_a_batch_writes_what_its_adds_one_by_one_write(tmp_path):
    """add_many (the daemon's write of a batch's rows) against add, entry by entry: the same rows
    returned and the same file, byte for byte, through rewrites, a (uid, hash) twice in a batch,
    a store so small that a batch recycles its own row, tags, several uids, and a zero vector
    (refused by add, -1 and nothing written by add_many)."""
    rng = np.random.default_rng(5)
    one, many = (EmbeddingStore.open(str(tmp_path / f"{n}.store"), capacity=5, dim=6) for n in ("one", "many"))
    for batch in range(40):
        n = int(rng.integers(1, 9))
        keys = [h(int(k)) for k in rng.integers(0, 12, n)]
        uids = [int(u) for u in rng.integers(0, 3, n)]
        tags = [None if rng.random() < 0.5 else f"t{int(rng.integers(100))}" for _ in range(n)]
        vectors = rng.normal(size=(n, 6)).astype(np.float32)
        vectors[rng.random(n) < 0.5] /= np.linalg.norm(vectors, axis=1, keepdims=True)[0]
        if batch % 7 == 3:
            vectors[0] = 0.0
        expected = []
        for key, v, tag, uid in zip(keys, vectors, tags, uids):
            try:
                expected.append(one.add(key, v, tag, uid=uid))
            except ValueError:
                expected.append(-1)
        assert many.add_many(keys, vectors, tags, uids) == expected
        assert len(many) == len(one)
    with pytest.raises(ValueError, match="32 bytes"):
        many.add_many([h(1), b"short"], np.ones((2, 6)), [None, None], [0, 0])
    one.close(), many.close()
    with open(tmp_path / "one.store", "rb") as a, open(tmp_path / "many.store", "rb") as b:
        assert a.read() == b.read()


def test_search_matches_brute_force(path):
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((500, 32)).astype(np.float32)
    store = EmbeddingStore.open(path, capacity=600, dim=32)
    for n, v in enumerate(vectors):
        store.add(h(n), v, tag=f"img{n}", uid=0)
    normed = np.stack([unit(v) for v in vectors])
    for _ in range(5):
        query = vectors[rng.integers(500)] + 0.3 * rng.standard_normal(32)
        sims = normed @ unit(query)
        expected = np.argsort(-sims)[:5]
        got = store.search(query, k=5, min_similarity=-1.0, uid=0)
        assert [g[0] for g in got] == [h(int(i)) for i in expected]
        assert [g[1] for g in got] == [f"img{i}" for i in expected]
        assert np.allclose([g[2] for g in got], sims[expected], atol=1e-5)
    assert len(store.search(vectors[0], k=1000, min_similarity=-1.0, uid=0)) == 500
    store.close()


def test_min_similarity_filters(path):
    store = EmbeddingStore.open(path, capacity=8, dim=3)
    store.add(h(1), np.array([1.0, 0, 0]), uid=0)
    store.add(h(2), np.array([1.0, 0.1, 0]), uid=0)                # cosine 0.995 with h(1)
    store.add(h(3), np.array([0, 1.0, 0]), uid=0)
    got = store.search(np.array([1.0, 0, 0]), k=5, min_similarity=0.99, uid=0)
    assert [g[0] for g in got] == [h(1), h(2)] and got[0][2] == pytest.approx(1.0)
    assert got[1][2] == pytest.approx(1 / np.sqrt(1.01), abs=1e-6)
    assert store.search(np.array([0, 0, 1.0]), min_similarity=0.5, uid=0) == []
    store.close()


def test_tags_round_trip_and_survive_reopen(path):
    tags = [None, "", "plain", "ünïcødé 猫", "x" * 64, "é" * 32]
    store = EmbeddingStore.open(path, capacity=10, dim=6)
    for n, tag in enumerate(tags):
        store.add(h(n), np.eye(6)[n], tag=tag, uid=0)
    store.close()
    store = EmbeddingStore.open(path, capacity=10, dim=6)
    for n, tag in enumerate(tags):
        assert store.search(np.eye(6)[n], k=1, uid=0) == [(h(n), tag, pytest.approx(1.0))]
    store.close()


def test_reopen_keeps_rows_and_the_ring_position(path):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((5, 16)).astype(np.float32)
    store = EmbeddingStore.open(path, capacity=5, dim=16)
    for n in range(6):                                      # wraps once: h(0) gone, next row is 1
        store.add(h(n), vectors[n % 5] + n, uid=0)
    before = {n: store.get(h(n), uid=0) for n in range(1, 6)}
    store.close()
    lines = []
    store = EmbeddingStore.open(path, capacity=5, dim=16, log=lines.append)
    assert lines == [] and len(store) == 5 and store.get(h(0), uid=0) is None
    assert all(np.array_equal(store.get(h(n), uid=0), v) for n, v in before.items())
    store.add(h(6), vectors[0], uid=0)                             # takes the oldest: h(1)
    assert store.get(h(1), uid=0) is None and store.get(h(2), uid=0) is not None
    store.close()


def test_interrupted_add_loses_only_its_row(path):
    store = EmbeddingStore.open(path, capacity=4, dim=4)
    for n in range(3):
        store.add(h(n), np.eye(4)[n], uid=0)
    store.close()
    meta = HEADER_SIZE + 4 * 4 * 4
    with open(path, "r+b") as fh:
        fh.seek(meta + 1 * META_SIZE)                       # row 1: flag cleared, as mid-add
        fh.write(b"\0")
        fh.seek(HEADER_SIZE + 2 * 16)                       # row 2: a vector that is not unit
        fh.write(np.full(4, np.nan, np.float32).tobytes())
    store = EmbeddingStore.open(path, capacity=4, dim=4)
    assert len(store) == 1 and store.get(h(0), uid=0) is not None
    assert store.search(np.ones(4), k=5, min_similarity=-1.0, uid=0) == [(h(0), None, pytest.approx(0.5))]
    store.close()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other dim"])
def test_damaged_file_is_set_aside_and_rebuilt(path, caplog, damage):
    store = EmbeddingStore.open(path, capacity=4, dim=8)
    store.add(h(1), np.ones(8), uid=0)
    store.close()
    dim, size = 8, os.path.getsize(path)
    if damage == "truncated":
        os.truncate(path, 3000)
    elif damage == "garbage":
        with open(path, "wb") as fh:
            fh.write(os.urandom(size))
    else:
        dim = 16
    caplog.set_level(logging.WARNING, logger="test.embeddings")
    store = EmbeddingStore.open(path, capacity=4, dim=dim, log=logging.getLogger("test.embeddings"))
    assert len([r for r in caplog.records if r.name == "test.embeddings"]) == 1
    assert len([n for n in os.listdir(os.path.dirname(path)) if ".corrupt-" in n]) == 1
    assert [r.getMessage() for r in caplog.records][0].startswith(f"embedding store {path}: ")
    assert len(store) == 0 and store.get(h(1), uid=0) is None
    store.add(h(2), np.ones(dim), uid=0)
    store.close()
    store = EmbeddingStore.open(path, capacity=4, dim=dim)
    assert len(store) == 1
    store.close()


def test_second_open_gets_the_lock_error(path):
    store = EmbeddingStore.open(path, capacity=4, dim=4)
    with pytest.raises(EmbeddingStoreLocked, match="locked"):
        EmbeddingStore.open(path, capacity=4, dim=4)
    store.close()
    EmbeddingStore.open(path, capacity=4, dim=4).close()


def test_a_store_of_another_embedding_definition_is_rebuilt(path):
    store = EmbeddingStore.open(path, capacity=4, dim=8, embedding="layer=a pool=mean")
    store.add(h(1), np.ones(8), uid=0)
    store.close()
    lines = []
    store = EmbeddingStore.open(path, capacity=4, dim=8, embedding="layer=b pool=grid:4", log=lines.append)
    assert len(lines) == 1 and "model.embedding_layer or model.embedding_pool changed" in lines[0]
    assert len(store) == 0
    store.close()
    assert default_path("/d", "ab" * 16, "x") != default_path("/d", "ab" * 16, "y")
    assert default_path("/d", "ab" * 16, "x").startswith("/d/embeddings-abababababababab-")


# the pooling (daemon/models/embedding_pooling.py) ------------------------------------------------------------------
def test_pool_parses_and_refuses_with_the_key_named():
    assert Pool.parse("mean") == Pool() and str(Pool.parse(" grid:4 + thumbnail:2 ")) == "grid:4+thumbnail:2"
    assert Pool.parse("thumbnail:3") == Pool(0, 3) and str(Pool(0, 3)) == "mean+thumbnail:3"
    for bad in ("grid", "grid:0", "grid:17", "grid:2+grid:4", "thumbnail:1+thumbnail:2", "max", ""):
        with pytest.raises(ValueError, match="grid:G|side must be"):
            Pool.parse(bad)
    with pytest.raises(ConfigError, match="model.embedding_pool"):
        model_mod.load(ModelConfig(embedding_pool="grid:99"))
    spec = model_mod.load(ModelConfig()).spec
    assert (spec.embedding_layer, spec.embedding_pool) == ("features.0", "grid:4+thumbnail:4")


def test_pool_is_unit_length_indifferent_to_brightness_and_never_zero():
    gen = torch.Generator().manual_seed(5)
    features = torch.rand((3, 8, 16, 16), generator=gen)
    frames = (torch.rand((3, 16, 16, 3), generator=gen) * 200).to(torch.uint8)
    pool = Pool(4, 4)
    v = pool(features, frames)
    assert v.shape == (3, pool.width(8 * 16)) and torch.allclose(v.norm(dim=1), torch.ones(3))
    brighter = pool(features * 1.2 + 0.3, (frames.float() * 1.2).to(torch.uint8))
    assert (v * brighter).sum(dim=1).min() > 0.99
    flat = pool(torch.ones((2, 8, 16, 16)), torch.full((2, 16, 16, 3), 77, dtype=torch.uint8))
    assert torch.allclose(flat.norm(dim=1), torch.ones(2))      # a flat frame: the constant alone
    with pytest.raises(ValueError, match="4-D"):
        Pool(4, 0)(torch.ones((2, 8)), None)
    assert torch.equal(Pool()(features, None), torch.nn.functional.normalize(features.mean(dim=(2, 3)), dim=1))


# file models ------------------------------------------------------------------------------------
class _WithFeatures(torch.nn.Module):
    """The built-in's weights, returning (logits, first conv block's map): a file model that
    hands its embedding layer out itself (TorchScript takes no hooks)."""

    def __init__(self, net):
        super().__init__()
        self.first, self.rest, self.head = net.features[0], net.features[1:], net.head

    def forward(self, x):
        early = self.first(x)
        return self.head(self.rest(early).mean(dim=(2, 3))), early


def _file_engine(tmp_path, module, **keys):
    from inferd.daemon.models.zoo import shapes

    path = str(tmp_path / "model.pt")
    torch.jit.script(module).save(path)
    cfg = ModelConfig(path=path, input_height=64, input_width=64, mean=list(shapes.MEAN),
                      std=list(shapes.STD), **keys)
    engine = Engine(torch.device("cpu"), model_mod.load(cfg), keep_k=3)
    engine.load()
    return engine


def _vectors(engine, images):
    staging = Staging(torch.device("cpu"), len(images), (64, 64, 3))
    staging.arrays[0][:] = images
    return engine.launch(staging.tensors[0], len(images), 3, want_embedding=True).result()[2]


def test_a_file_model_gets_the_same_pooling_as_the_built_in(tmp_path):
    from inferd.daemon.models.zoo import shapes

    images, _ = make_dataset(6, 21)
    builtin = Engine(torch.device("cpu"), model_mod.load(ModelConfig()), keep_k=3)
    builtin.load()
    own = _file_engine(tmp_path, _WithFeatures(shapes.load_pretrained()), embedding_pool="grid:4+thumbnail:4")
    assert own.embedding_dim == builtin.embedding_dim == 305
    assert np.allclose(_vectors(own, images), _vectors(builtin, images), atol=1e-5)
    with pytest.raises(ConfigError, match="model.embedding_layer: 'features.0' is a TorchScript module"):
        _file_engine(tmp_path, shapes.load_pretrained(), embedding_layer="features.0")


def test_a_damaged_vector_is_never_answered_before_the_background_check(path, monkeypatch):
    """A large store's vectors are checked when first used or by the background sweep, not at
    open: a damaged one must still never be returned by get or search."""
    store = EmbeddingStore.open(path, capacity=8, dim=4)
    for n in range(4):
        store.add(h(n), np.eye(4)[n], uid=0)
    store.close()
    with open(path, "r+b") as fh:
        fh.seek(HEADER_SIZE + 2 * 16)                       # row 2: a vector that is not unit
        fh.write(np.full(4, 3.0, np.float32).tobytes())
    monkeypatch.setattr(EmbeddingStore, "CHECK_AT_OPEN", 0)
    monkeypatch.setattr(EmbeddingStore, "_start_sweep", lambda self: None)   # no background check
    store = EmbeddingStore.open(path, capacity=8, dim=4)
    try:
        assert len(store) == 4                              # not read yet
        found = store.search(np.array([0.1, 0.1, 1.0, 0.1]), k=2, min_similarity=-1.0, uid=0)
        assert [f[0] for f in found] == [h(0), h(1)] or h(2) not in [f[0] for f in found]
        assert len(found) == 2 and len(store) == 3          # found damaged, dropped, replaced
        assert store.get(h(2), uid=0) is None
        assert store.add(h(9), np.eye(4)[2], uid=0) == 2    # its row is free again
    finally:
        store.close()


def test_the_background_check_drops_damaged_rows(path, monkeypatch):
    store = EmbeddingStore.open(path, capacity=8, dim=4)
    for n in range(4):
        store.add(h(n), np.eye(4)[n], uid=0)
    store.close()
    with open(path, "r+b") as fh:
        fh.seek(HEADER_SIZE + 1 * 16)
        fh.write(np.full(4, np.nan, np.float32).tobytes())
    monkeypatch.setattr(EmbeddingStore, "CHECK_AT_OPEN", 0)
    monkeypatch.setattr(EmbeddingStore, "SWEEP_ROWS", 2)
    store = EmbeddingStore.open(path, capacity=8, dim=4)
    try:
        store._sweeper.join(30)
        assert len(store) == 3 and store.get(h(1), uid=0) is None and store.get(h(3), uid=0) is not None
    finally:
        store.close()
