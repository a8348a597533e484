"""A full embedding store is shared by uid (NOTE [ a full store is shared by uid ] in
daemon/caching/embedding_store.py): a uid past its share replaces its own oldest rows, one below it
takes the largest holder's oldest. So another uid's flood of unique frames leaves every one of a
victim's rows findable: in the store itself, and through a real daemon with the flood sent by
another uid (root runs these tests and drops the flooding client to uid 65534)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import sample_images, short_dir
from inferd.client import Client
from inferd.daemon.caching.embedding_store import EmbeddingStore
from inferd.shm.cache import content_hash

VICTIM, ATTACKER, THIRD = 0, 65534, 4242
SEED = 18005


def h(uid: int, n: int) -> bytes:
    return uid.to_bytes(4, "little") + n.to_bytes(28, "little")


def held(store: EmbeddingStore, uid: int, hashes) -> list[bool]:
    return [store.get(x, uid=uid) is not None for x in hashes]


@pytest.fixture
def vectors():
    rng = np.random.default_rng(SEED)
    return lambda n: rng.standard_normal((n, 16)).astype(np.float32)


def test_a_flood_of_another_uid_replaces_only_its_own_rows(tmp_path, vectors):
    store = EmbeddingStore.open(str(tmp_path / "e.store"), capacity=64, dim=16)
    mine = [h(VICTIM, n) for n in range(8)]
    for x, v in zip(mine, vectors(8)):
        store.add(x, v, tag="victim", uid=VICTIM)
    flood = [h(ATTACKER, n) for n in range(640)]         # ten times the capacity
    for x, v in zip(flood, vectors(640)):
        store.add(x, v, uid=ATTACKER)
    assert len(store) == 64 and all(held(store, VICTIM, mine))
    for x in mine:                                       # findable by search too
        assert x in [m[0] for m in store.search(store.get(x, uid=VICTIM), k=1, uid=VICTIM)]
    # the attacker keeps its newest 56 rows: each of its adds took its own oldest
    assert held(store, ATTACKER, flood) == [False] * 584 + [True] * 56
    store.close()


def test_a_uid_below_its_share_grows_at_the_largest_holders_expense(tmp_path, vectors):
    store = EmbeddingStore.open(str(tmp_path / "e.store"), capacity=64, dim=16)
    flood = [h(ATTACKER, n) for n in range(64)]
    for x, v in zip(flood, vectors(64)):                 # one uid filled the whole store first
        store.add(x, v, uid=ATTACKER)
    mine = [h(VICTIM, n) for n in range(40)]
    for x, v in zip(mine, vectors(40)):
        store.add(x, v, uid=VICTIM)
    # the victim grew to its share (64 // 2) from the attacker's oldest rows, then recycled its own
    assert held(store, VICTIM, mine) == [False] * 8 + [True] * 32
    assert held(store, ATTACKER, flood) == [False] * 32 + [True] * 32
    for x, v in zip([h(ATTACKER, n) for n in range(64, 200)], vectors(136)):
        store.add(x, v, uid=ATTACKER)                    # at its share: its own oldest only
    assert held(store, VICTIM, mine) == [False] * 8 + [True] * 32
    # a third uid takes its share (64 // 3) from the largest holder each time, from the one whose
    # oldest row is oldest on a tie: the victim's (its rows predate the attacker's recycled ones),
    # then the attacker's, and so on: 11 of the victim's and 10 of the attacker's
    third = [h(THIRD, n) for n in range(30)]
    for x, v in zip(third, vectors(30)):
        store.add(x, v, uid=THIRD)
    counts = {u: sum(held(store, u, xs)) for u, xs in
              ((VICTIM, mine), (ATTACKER, [h(ATTACKER, n) for n in range(200)]), (THIRD, third))}
    assert counts == {VICTIM: 21, ATTACKER: 22, THIRD: 21}, counts
    store.close()


def test_ages_survive_a_reopen(tmp_path, vectors):
    """After evictions a uid's rows sit anywhere in the file; its oldest is found by the stamps."""
    path = str(tmp_path / "e.store")
    store = EmbeddingStore.open(path, capacity=8, dim=16)
    attacker = [h(ATTACKER, n) for n in range(12)]
    for x, v in zip(attacker[:8], vectors(8)):
        store.add(x, v, uid=ATTACKER)
    mine = [h(VICTIM, n) for n in range(4)]
    for x, v in zip(mine, vectors(4)):                   # takes rows 0..3 from the attacker
        store.add(x, v, uid=VICTIM)
    for x, v in zip(attacker[8:10], vectors(2)):         # at its share: rows 4 and 5, its own oldest
        store.add(x, v, uid=ATTACKER)
    store.close()
    store = EmbeddingStore.open(path, capacity=8, dim=16)
    assert len(store) == 8
    for x, v in zip(attacker[10:12], vectors(2)):        # its oldest now: the rows 6 and 7 hold
        store.add(x, v, uid=ATTACKER)
    assert held(store, ATTACKER, attacker) == [False] * 8 + [True] * 4
    assert all(held(store, VICTIM, mine))
    store.close()


# through a real daemon, the flood from another uid --------------------------------------------
FLOOD = """
import json, os, sys
import numpy as np
from inferd.client import Client
rng = np.random.default_rng(int(sys.argv[2]))       # numpy.random loads lazily: before the drop
os.setgroups([]); os.setgid(65534); os.setuid(65534)
answered = 0
with Client(sys.argv[1], reconnect=False) as c:
    h, w, ch = c.model.input_shape
    for _ in range(int(sys.argv[3])):
        frames = list(rng.integers(0, 256, (64, h, w, ch), dtype=np.uint8))   # all unique
        answered += sum(1 for top in c.classify_many(frames, top_k=1) if top)
    stored = c.info()["cache"]["embeddings"]
print(json.dumps({"answered": answered, "stored": stored}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
@pytest.mark.timeout(300)
def test_another_uids_flood_leaves_every_victim_row_findable(fresh_daemon):
    workdir = short_dir()
    os.chmod(workdir, 0o755)                             # the socket must be reachable; the files are 0600
    d = fresh_daemon("--set", "server.socket_mode=0o666", "--set", f"server.allow_uids=[{ATTACKER}]",
                     "--set", "embeddings.capacity=64", workdir=workdir)
    samples = sample_images()
    with Client(d.socket_path) as victim:
        for i, (label, image) in enumerate(samples):
            assert victim.classify(image, tag=f"victim-{i}")[0].label == label
        print(f"seed {SEED}")
        out = subprocess.run([sys.executable, "-c", FLOOD, d.socket_path, str(SEED), "5"],
                             capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr
        flood = json.loads(out.stdout.strip().splitlines()[-1])
        assert flood["answered"] == 320 and flood["stored"] == 64, flood   # the store was full
        assert d.proc.poll() is None
        for i, (_, image) in enumerate(samples):
            found = {(m.content_hash, m.tag) for m in
                     victim.near_duplicates(image, k=len(samples), min_similarity=0.999)}
            assert (content_hash(image), f"victim-{i}") in found, (i, found)
    assert d.stop() == 0
