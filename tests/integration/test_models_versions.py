"""Two versions of one model name side by side: a request naming a version gets it, the others go
by the route (a canary percent by request id, or canary uids), each version's answers are cached
under its own keys, and promotion moves every request to the new version with none failed."""
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import RawClient, admin_path, short_dir, spawn_daemon, wait_until
from inferd.client import AdminClient, Client, UnknownModel
from inferd.daemon.models.catalog import Route

pytestmark = pytest.mark.timeout(180)


def config(percent: float = 25.0) -> str:
    work = short_dir()
    labels = os.path.join(work, "v2.labels")
    with open(labels, "w") as fh:
        fh.write("".join(f"new_{k}\n" for k in range(10)))
    text = f"""
[[models]]
builtin = "synthetic"
name = "m"
warmup_batches = 1

[[models]]
builtin = "synthetic"
name = "m"
version = 2
labels = "{labels}"
canary_percent = {percent}
warmup_batches = 1

[[models]]
builtin = "synthetic"
name = "u"
warmup_batches = 1

[[models]]
builtin = "synthetic"
name = "u"
version = 2
canary_uids = [{os.getuid()}]
warmup_batches = 1
"""
    path = os.path.join(work, "models.toml")
    with open(path, "w") as fh:
        fh.write(text)
    return path


@pytest.fixture(scope="module")
def versions():
    d = spawn_daemon("--config", config(), model="")
    yield d
    rc = d.stop()
    d.cleanup()
    assert rc == 0, f"daemon exited with {rc}:\n{d.log()}"


def served(raw: RawClient, rid: int, frame, **fields) -> dict:
    raw.classify(rid, 0, frame, top_k=1, **fields)
    reply = raw.recv()
    assert reply["ok"], reply
    return reply


def test_a_named_version_gets_that_version_and_its_own_cache_keys(versions):
    raw = RawClient(versions.socket_path)
    try:
        digests = {(m["name"], m["version"]): m["digest"] for m in raw.hello_reply["models"]}
        assert digests["m", 1] != digests["m", 2]           # one file, two versions: two keys
        frame = np.full((16, 16, 3), 131, np.uint8)
        first = served(raw, 1, frame, model="m", version=1)
        assert first["served"] == ["m", 1] and not first.get("cached")
        again = served(raw, 2, frame, model="m", version=1)
        assert again["served"] == ["m", 1] and again.get("cached")     # v1's answer, from the cache
        other = served(raw, 3, frame, model="m", version=2)
        assert other["served"] == ["m", 2] and not other.get("cached")  # computed by v2, not v1's
        assert served(raw, 4, frame, model="m", version=2).get("cached")
    finally:
        raw.close()


def test_canary_percent_splits_requests_by_id(versions):
    """25 % of the ids go to v2, and which ones is the catalog's rule: the same ids, the same split."""
    raw = RawClient(versions.socket_path)
    try:
        frame = np.full((16, 16, 3), 7, np.uint8)
        got = {rid: served(raw, rid, frame, model="m")["served"][1] for rid in range(100, 500)}
    finally:
        raw.close()
    share = sum(v == 2 for v in got.values()) / len(got)
    assert 0.18 <= share <= 0.32, share
    rule = Route("m", stable=SimpleNamespace(version=1), canary=SimpleNamespace(version=2), canary_percent=25.0)
    assert got == {rid: rule.pick(12345, rid).version for rid in got}


def test_canary_uids_get_the_new_version(versions):
    with Client(versions.socket_path, model="u") as c:
        raw = RawClient(versions.socket_path)
        try:
            frame = np.full((16, 16, 3), 50, np.uint8)
            assert {served(raw, rid, frame, model="u")["served"][1] for rid in range(1, 40)} == {2}
        finally:
            raw.close()
        assert c.classify(np.full((16, 16, 3), 255, np.uint8), top_k=1)[0].index == 9


def test_the_client_names_classes_by_the_version_that_answered(versions):
    with Client(versions.socket_path, model="m") as c:
        v1 = c.classify(np.full((16, 16, 3), 255, np.uint8), top_k=1, version=1)[0]
        v2 = c.classify(np.full((16, 16, 3), 255, np.uint8), top_k=1, version=2)[0]
    assert (v1.index, v1.label) == (9, "level_9") and (v2.index, v2.label) == (9, "new_9")


@pytest.mark.slow
def test_promotion_under_load_fails_no_request():
    """Clients classify through the canary split while the admin socket promotes version 2: not
    one request fails, and every request sent after the promotion's reply is answered by v2."""
    d = spawn_daemon("--config", config(percent=50.0), "--set", "cache.enabled=false", model="")
    stop, promoted = threading.Event(), threading.Event()
    errors, after = [], []
    counts = {"before": 0}

    def load(seed: int) -> None:
        frames = [np.full((16, 16, 3), (seed * 31 + i * 17) % 256, np.uint8) for i in range(8)]
        try:
            with Client(d.socket_path, ring_slots=8, model="m", cache=False) as c:
                while not stop.is_set():
                    was_promoted = promoted.is_set()
                    tops = c.classify_many(frames, top_k=1)
                    counts["before"] += not was_promoted
                    if was_promoted:
                        after.extend(t[0].label for t in tops)
        except Exception as exc:  # noqa: BLE001  the assertion below names it
            errors.append(repr(exc))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: counts["before"] >= 20, 60, "load through the split")
        with AdminClient(admin_path(d)) as admin:
            reply = admin.call("promote", model="m")
            assert reply["promoted"] == {"name": "m", "version": 2} and reply["route"]["canary"] is None
            promoted.set()
            wait_until(lambda: len(after) >= 200, 60, "load after the promotion")
            with pytest.raises(UnknownModel, match="no canary"):
                admin.call("promote", model="m")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        rc = d.stop()
        d.cleanup()
    assert not errors, errors
    assert rc == 0
    assert after and all(label.startswith("new_") for label in after), set(after)


def test_each_version_keeps_its_embeddings_apart():
    """Two versions of one file with an embedding: each keeps its own store (a file per digest),
    so a near-duplicate query of one version finds only what that version embedded."""
    work = short_dir()
    path = os.path.join(work, "models.toml")
    with open(path, "w") as fh:
        fh.write('[[models]]\nbuiltin = "shapes"\nname = "s"\nwarmup_batches = 1\n\n'
                 '[[models]]\nbuiltin = "shapes"\nname = "s"\nversion = 2\nwarmup_batches = 1\n')
    d = spawn_daemon("--config", path, "--set", "embeddings.capacity=1000", model="")
    try:
        frame = np.zeros((64, 64, 3), np.uint8)
        frame[16:48, 16:48] = 200
        with Client(d.socket_path, model="s") as c:
            c.classify(frame, tag="v1-only", version=1)
            assert [m.tag for m in c.near_duplicates(frame, version=1)] == ["v1-only"]
            assert c.near_duplicates(frame, version=2) == []
            c.classify(frame, tag="v2-only", version=2)
            assert [m.tag for m in c.near_duplicates(frame, version=2)] == ["v2-only"]
            assert [m.tag for m in c.near_duplicates(frame, version=1)] == ["v1-only"]
        stores = sorted(n for n in os.listdir(d.workdir) if n.startswith("embeddings-") and n.endswith(".store"))
        assert len(stores) == 2, stores                     # a file per version
    finally:
        rc = d.stop()
        d.kill()
    assert rc == 0
    # served again with version 1 alone: version 2's store goes at start-up, version 1's stays
    with open(path, "w") as fh:
        fh.write('[[models]]\nbuiltin = "shapes"\nname = "s"\nwarmup_batches = 1\n')
    again = spawn_daemon("--config", path, "--set", "embeddings.capacity=1000", model="", workdir=d.workdir)
    try:
        left = sorted(n for n in os.listdir(d.workdir) if n.startswith("embeddings-") and n.endswith(".store"))
        assert len(left) == 1 and left[0] in stores, (left, stores)
        with Client(again.socket_path, model="s") as c:
            assert [m.tag for m in c.near_duplicates(frame)] == ["v1-only"]
    finally:
        rc = again.stop()
        again.cleanup()
    assert rc == 0
