"""Models loaded and unloaded while clients use the daemon, through the real admin socket: a load
under load fails no request and the new model answers; an unload answers the requests queued for
it and refuses the later ones with unknown_model naming the models there are, the other model's
client failing none; reload and promote under load fail none."""
import json
import os
import signal
import threading

import numpy as np
import pytest

from helpers import RawClient, admin_path, short_dir, spawn_daemon, wait_until
from inferd.client import AdminClient, Client, UnknownModel
from inferd.client.errors import InvalidInput, ReloadFailed

pytestmark = pytest.mark.timeout(180)


def models_file(work: str, *entries: str) -> str:
    path = os.path.join(work, "models.toml")
    with open(path, "w") as fh:
        fh.write("\n".join(entries))
    return path


def entry(name: str, version: int = 1, **keys) -> str:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    return f'[[models]]\nbuiltin = "synthetic"\nname = "{name}"\nversion = {version}\nwarmup_batches = 1\n{extra}'


def labels_file(work: str, prefix: str) -> str:
    path = os.path.join(work, f"{prefix}.labels")
    with open(path, "w") as fh:
        fh.write("".join(f"{prefix}_{k}\n" for k in range(10)))
    return path


def start(work: str, *entries: str, control: dict | None = None):
    """A daemon of ``entries`` (synthetic models; ``control``: their cost, INFERD_SYNTHETIC)."""
    if control is not None:
        path = os.path.join(work, "synthetic.json")
        with open(path, "w") as fh:
            json.dump(control, fh)
        os.environ["INFERD_SYNTHETIC"] = path      # read by the forked daemon's synthetic models
    try:
        return spawn_daemon("--config", models_file(work, *entries), "--set", "cache.enabled=false", model="")
    finally:
        os.environ.pop("INFERD_SYNTHETIC", None)


class Steady:
    """Well-behaved clients of ``model`` classifying until stopped; every failure is kept."""

    def __init__(self, d, model: str, clients: int = 2, **fields):
        self.stop, self.errors, self.answered = threading.Event(), [], 0
        self.labels: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(d, model, i, fields)) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, d, model: str, seed: int, fields: dict) -> None:
        frames = [np.full((16, 16, 3), (seed * 40 + 28 * i) % 256, np.uint8) for i in range(4)]
        try:
            with Client(d.socket_path, ring_slots=8, model=model, cache=False, timeout=30.0) as c:
                while not self.stop.is_set():
                    tops = c.classify_many(frames, top_k=1, **fields)
                    self.labels.extend(t[0].label for t in tops)
                    self.answered += len(tops)
        except Exception as exc:  # noqa: BLE001  the test names it
            self.errors.append(repr(exc))

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def stop(d) -> None:
    rc = d.stop()
    d.cleanup()
    assert rc == 0, f"daemon exited with {rc}:\n{d.log()}"


def test_load_a_second_model_under_load_then_classify_with_it():
    work = short_dir()
    d = start(work, entry("a"))
    steady = Steady(d, "a")
    try:
        wait_until(lambda: steady.answered >= 50, 60, "the first model answering")
        with AdminClient(admin_path(d)) as admin:
            reply = admin.call("load", name="b", model="synthetic", set={"labels": labels_file(work, "bee"),
                                                                          "warmup_batches": 1})
            assert reply["loaded"]["name"] == "b" and reply["loaded"]["version"] == 1
            before = steady.answered
            with Client(d.socket_path, model="b") as c:
                assert c.classify(np.full((16, 16, 3), 255, np.uint8), top_k=1)[0].label == "bee_9"
            listed = {(m["name"], m["version"]): m for m in admin.call("models")["models"]}
            assert set(listed) == {("a", 1), ("b", 1)} and listed["b", 1]["state"] == "serving"
            wait_until(lambda: steady.answered >= before + 50, 60, "the first model still answering")
    finally:
        steady.finish()
        stop(d)
    assert not steady.errors, steady.errors


@pytest.mark.slow
def test_unload_answers_its_queued_requests_and_refuses_later_ones():
    """40 requests for b queued on a slow device when the unload comes: each is answered; the
    next request for b gets unknown_model naming a; a's clients fail none."""
    work = short_dir()
    d = start(work, entry("a"), entry("b"), control={"base_ms": 20.0, "per_frame_ms": 25.0})
    steady = Steady(d, "a")
    raw = RawClient(d.socket_path, ring_slots=64)
    try:
        wait_until(lambda: steady.answered >= 20, 60, "the first model answering")
        frame = np.full((16, 16, 3), 255, np.uint8)
        for rid in range(1, 41):
            raw.classify(rid, rid - 1, frame, top_k=1, model="b", timeout_ms=60_000)
        with AdminClient(admin_path(d)) as admin:      # all 40 admitted (the device holds them ~1 s)
            wait_until(lambda: admin.call("models")["models"][1]["inflight"] == 40, 10, "b's requests admitted")
        unloaded = {}
        t = threading.Thread(target=lambda: unloaded.update(AdminClient(admin_path(d)).call("unload", name="b")))
        t.start()
        replies = [raw.recv() for _ in range(40)]
        t.join(60)
        assert all(r["ok"] and r["served"] == ["b", 1] for r in replies), replies
        assert unloaded["unloaded"][0]["name"] == "b" and unloaded["answered"] > 0, unloaded
        raw.classify(41, 0, frame, top_k=1, model="b")
        refused = raw.recv()
        assert refused["code"] == "unknown_model" and "'b'" in refused["message"] and "a (versions 1)" in \
            refused["message"], refused
        with Client(d.socket_path) as c:
            with pytest.raises(UnknownModel, match="serves a"):      # told at hello
                c.classify(frame, model="b")
        with AdminClient(admin_path(d)) as admin:
            assert [(m["name"], m["state"]) for m in admin.call("models")["models"]] == [("a", "serving")]
            with pytest.raises(UnknownModel):
                admin.call("unload", name="b")
            with pytest.raises(InvalidInput, match="first model"):
                admin.call("unload", name="a")
            before = steady.answered
            wait_until(lambda: steady.answered >= before + 20, 60, "a still answering")
    finally:
        raw.close()
        steady.finish()
        stop(d)
    assert not steady.errors, steady.errors


def test_a_model_unloaded_and_loaded_again_reuses_its_place():
    work = short_dir()
    d = start(work, entry("a"), entry("b"))
    try:
        with AdminClient(admin_path(d)) as admin:
            for round_ in range(3):
                admin.call("unload", name="b")
                reply = admin.call("load", name="b", model="synthetic", version=round_ + 2)
                assert reply["loaded"]["version"] == round_ + 2
            with Client(d.socket_path, model="b") as c:
                assert c.classify(np.full((16, 16, 3), 0, np.uint8), top_k=1)[0].index == 0
            info = admin.call("stats")
        assert len(info["devices"][0].get("models_batch_ms", [])) <= 2      # ids reused, not grown
    finally:
        stop(d)


def test_reload_and_promote_under_load_fail_no_request():
    work = short_dir()
    d = start(work, entry("a"), entry("m"))
    steady_a, steady_m = Steady(d, "a"), Steady(d, "m")
    try:
        wait_until(lambda: steady_a.answered >= 20 and steady_m.answered >= 20, 60, "both answering")
        with AdminClient(admin_path(d)) as admin:
            reply = admin.call("reload", name="m", set={"labels": labels_file(work, "new")})
            assert reply["changed"]
            mark = len(steady_m.labels)
            wait_until(lambda: len(steady_m.labels) >= mark + 40, 60, "m after the reload")
            assert all(label.startswith("new_") for label in steady_m.labels[mark + 8:])    # named by the new
            admin.call("load", name="m", version=2, model="synthetic", canary_percent=50.0,
                       set={"labels": labels_file(work, "two")})
            assert admin.call("models")["routes"][1]["canary"] == 2
            promoted = admin.call("promote", model="m")
            assert promoted["promoted"] == {"name": "m", "version": 2}
            mark = len(steady_m.labels)
            wait_until(lambda: len(steady_m.labels) >= mark + 100, 60, "m after the promotion")
            admin.call("unload", name="m", version=1)
            more = len(steady_m.labels)
            wait_until(lambda: len(steady_m.labels) >= more + 40, 60, "m after v1 left")
            with Client(d.socket_path, model="m") as c:      # (a client learns the models at hello)
                assert c.classify(np.full((16, 16, 3), 255, np.uint8), top_k=1)[0].label == "two_9"
    finally:
        steady_a.finish()
        steady_m.finish()
        stop(d)
    assert not steady_a.errors and not steady_m.errors, (steady_a.errors, steady_m.errors)
    # clients connected before version 2 was loaded name its answers by its own labels
    assert all(label.startswith("two_") for label in steady_m.labels[more + 8:]), set(steady_m.labels[more + 8:])


def test_a_load_that_fails_changes_nothing():
    work = short_dir()
    d = start(work, entry("a"))
    try:
        with AdminClient(admin_path(d)) as admin:
            with pytest.raises(InvalidInput, match="does not exist"):
                admin.call("load", name="x", model=os.path.join(work, "missing.pt"))
            junk = os.path.join(work, "junk.pt")
            with open(junk, "wb") as fh:
                fh.write(b"not a model")
            with pytest.raises(ReloadFailed, match="does not load"):
                admin.call("load", name="x", model=junk, set={"input_height": 16, "input_width": 16, "input": "uint8_nhwc"})
            with pytest.raises(InvalidInput, match="served already"):
                admin.call("load", name="a", model="synthetic")
            with pytest.raises(InvalidInput, match="share"):
                admin.call("load", name="y", model="synthetic", share=-1.0)
            with pytest.raises(InvalidInput, match="devices"):
                admin.call("load", name="y", model="synthetic", devices=[3])
            assert [m["name"] for m in admin.call("models")["models"]] == ["a"]
        with Client(d.socket_path) as c:
            assert c.classify(np.full((16, 16, 3), 0, np.uint8), top_k=1)[0].index == 0
    finally:
        stop(d)


def test_sighup_applies_an_added_a_removed_and_a_changed_entry():
    """a untouched (its client fails none), b removed, c changed (new labels: swapped), d added; then
    a list that does not load (a file that is not a model) changes nothing and the log says why."""
    work = short_dir()
    d = start(work, entry("a"), entry("b"), entry("c"))
    steady = Steady(d, "a")
    try:
        wait_until(lambda: steady.answered >= 20, 60, "a answering")
        with AdminClient(admin_path(d)) as admin:
            digests = {m["name"]: m["digest"] for m in admin.call("models")["models"]}
            models_file(work, entry("a"), entry("c", labels=labels_file(work, "sea")), entry("d"))
            os.kill(d.pid, signal.SIGHUP)
            wait_until(lambda: "SIGHUP: serving" in d.log(), 60, "the list applied, b freed")
            listed = {m["name"]: m for m in admin.call("models")["models"]}
            assert sorted(listed) == ["a", "c", "d"], listed
            assert listed["a"]["digest"] == digests["a"] and listed["a"]["gen"] == 1      # untouched
            assert listed["c"]["gen"] == 2                                               # swapped
        with Client(d.socket_path, model="c") as c:
            assert c.classify(np.full((16, 16, 3), 255, np.uint8), top_k=1)[0].label == "sea_9"
            assert c.classify(np.full((16, 16, 3), 0, np.uint8), top_k=1, model="d")[0].index == 0
            with pytest.raises(UnknownModel):
                c.classify(np.full((16, 16, 3), 0, np.uint8), model="b")
        junk = os.path.join(work, "junk.pt")
        with open(junk, "wb") as fh:
            fh.write(b"not a model")
        models_file(work, entry("a"), entry("c"),
                    '[[models]]\nname = "e"\npath = "%s"\ninput = "uint8_nhwc"\ninput_height = 16\n'
                    'input_width = 16\n' % junk)
        os.kill(d.pid, signal.SIGHUP)
        wait_until(lambda: "the [[models]] list is not applied" in d.log(), 60, "the bad list refused")
        assert "model e version 1 does not load" in d.log()
        with AdminClient(admin_path(d)) as admin:
            assert sorted(m["name"] for m in admin.call("models")["models"]) == ["a", "c", "d"]   # as it was
        before = steady.answered
        wait_until(lambda: steady.answered >= before + 20, 60, "a still answering")
    finally:
        steady.finish()
        stop(d)
    assert not steady.errors, steady.errors


def test_a_one_model_daemon_of_model_alone_takes_a_second_and_lets_it_go():
    """A daemon started with [model] (no [[models]] list): a client of it, connected before, goes on
    unchanged while a second model comes and goes; a client connected meanwhile uses both."""
    d = spawn_daemon("--model", "synthetic", "--set", "cache.enabled=false", model="")
    steady = Steady(d, None)
    try:
        wait_until(lambda: steady.answered >= 20, 60, "the model answering")
        with AdminClient(admin_path(d)) as admin:
            admin.call("load", name="b", model="synthetic", set={"labels": labels_file(short_dir(), "bee")})
            with Client(d.socket_path) as c:
                white = np.full((16, 16, 3), 255, np.uint8)
                assert c.classify(white, top_k=1)[0].label == "level_9"
                assert c.classify(white, top_k=1, model="b")[0].label == "bee_9"
                admin.call("unload", name="b")
                with pytest.raises(UnknownModel, match="synthetic"):
                    c.classify(white, model="b")
                assert c.classify(white, top_k=1)[0].label == "level_9"
        before = steady.answered
        wait_until(lambda: steady.answered >= before + 20, 60, "the model still answering")
    finally:
        steady.finish()
        stop(d)
    assert not steady.errors, steady.errors
    assert set(steady.labels) <= {f"level_{k}" for k in range(10)}


def test_a_model_loaded_on_one_device_of_two_runs_there_alone():
    """Loaded with devices [1]: every device gets its lane, only device 1 its replica and its
    frames (a peer never steals them), while the first model keeps both devices; unloaded, both go on."""
    work = short_dir()
    path = models_file(work, entry("a"))
    d = spawn_daemon("--config", path, "--device", "cpu:1", "--device", "cpu:1", "--set", "cache.enabled=false",
                     model="")
    steady = Steady(d, "a", clients=3)
    try:
        wait_until(lambda: steady.answered >= 20, 60, "a answering")
        with AdminClient(admin_path(d)) as admin:
            admin.call("load", name="b", model="synthetic", devices=[1])
            with Client(d.socket_path, model="b", ring_slots=16) as c:
                frames = [np.full((16, 16, 3), 17 * i, np.uint8) for i in range(16)]
                for _ in range(10):
                    assert [t[0].index for t in c.classify_many(frames, top_k=1)] == \
                        [round(9 * 17 * i / 255) for i in range(16)]
                devices = c.info()["devices"]
            assert devices[0]["model_seconds"][1] == 0 and devices[1]["model_seconds"][1] > 0, devices
            admin.call("unload", name="b")
        before = steady.answered
        wait_until(lambda: steady.answered >= before + 40, 60, "a after b left")
    finally:
        steady.finish()
        stop(d)
    assert not steady.errors, steady.errors


def test_load_and_unload_cycles_under_load_fail_only_the_requests_for_the_absent_model():
    """b unloaded and loaded again 6 times while clients of a and of b classify: a's clients fail
    none; b's get answers or UnknownModel (while it is away), never another error, and each
    unload answers what was admitted for b before it."""
    work = short_dir()
    d = start(work, entry("a"), entry("b"), control={"base_ms": 1.0, "per_frame_ms": 0.3})
    steady = Steady(d, "a")
    counts = {"ok": 0, "unknown": 0}
    other, stop_b = [], threading.Event()

    def use_b(seed: int) -> None:
        frames = [np.full((16, 16, 3), (seed * 50 + 17 * i) % 256, np.uint8) for i in range(4)]
        try:
            with Client(d.socket_path, ring_slots=8, model="b", cache=False, timeout=30.0) as c:
                while not stop_b.is_set():
                    try:
                        c.classify_many(frames, top_k=1)
                        counts["ok"] += 1
                    except UnknownModel:
                        counts["unknown"] += 1
        except Exception as exc:  # noqa: BLE001  the test names it
            other.append(repr(exc))

    users = [threading.Thread(target=use_b, args=(i,)) for i in range(2)]
    try:
        wait_until(lambda: steady.answered >= 20, 60, "a answering")
        for t in users:
            t.start()
        with AdminClient(admin_path(d)) as admin:
            for cycle in range(6):
                mark = counts["ok"]
                wait_until(lambda: counts["ok"] >= mark + 5, 60, "b answering")
                admin.call("unload", name="b")
                mark = counts["unknown"]
                wait_until(lambda: counts["unknown"] >= mark + 2, 60, "b refused while away")
                admin.call("load", name="b", model="synthetic", set={"warmup_batches": 1})
        before = steady.answered
        wait_until(lambda: steady.answered >= before + 20, 60, "a after the cycles")
    finally:
        stop_b.set()
        for t in users:
            t.join(60)
        steady.finish()
        stop(d)
    assert not steady.errors, steady.errors
    assert not other, other
    print(f"b: {counts['ok']} answered, {counts['unknown']} refused unknown_model over 6 cycles")


def test_a_model_loaded_live_keeps_its_embeddings_in_a_store_of_its_own():
    """shapes loaded beside the synthetic model: embed for it is answered from its own store; unloaded
    and loaded again, its store (the same file, its lock let go at the unload) opens again."""
    work = short_dir()
    d = spawn_daemon("--config", models_file(work, entry("a")), model="")
    try:
        frame = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        with AdminClient(admin_path(d)) as admin:
            for round_ in range(2):
                admin.call("load", name="s", model="shapes")
                with Client(d.socket_path, model="s") as c:
                    vector = c.embed(frame, model="s")
                    assert vector.ndim == 1 and vector.size > 0
                    assert c.near_duplicates(frame, k=1, model="s")[0].similarity > 0.99
                admin.call("unload", name="s")
        assert "ERROR" not in d.log()
    finally:
        stop(d)


def test_a_session_opened_before_a_load_names_the_new_model():
    """Clients connected before a load name the new model without connecting again: they ask the
    daemon's info for the models once (Client and AsyncClient alike); a model loaded since whose
    frames outgrow the session's ring slots is refused naming why, and a new session takes it."""
    import asyncio

    from inferd.client import AsyncClient

    work = short_dir()
    d = start(work, entry("a"))
    white = np.full((16, 16, 3), 255, np.uint8)

    def load():
        with AdminClient(admin_path(d)) as admin:
            admin.call("load", name="b", model="synthetic", set={"labels": labels_file(work, "bee"), "warmup_batches": 1})
            admin.call("load", name="big", model="synthetic", set={"input_height": 48, "input_width": 48, "warmup_batches": 1})

    async def async_session_across_the_load():
        async with AsyncClient(d.socket_path, cache=False) as ac:
            await asyncio.to_thread(load)
            return (await ac.classify(white, top_k=1, model="b"))[0].label

    try:
        with Client(d.socket_path, cache=False) as c:
            assert asyncio.run(async_session_across_the_load()) == "bee_9"
            assert c.classify(white, top_k=1, model="b")[0].label == "bee_9"
            with pytest.raises(UnknownModel, match="ring slots"):
                c.classify(white, model="big")
            with pytest.raises(UnknownModel, match="b v1"):
                c.classify(white, model="nowhere")
        with Client(d.socket_path, cache=False) as fresh:
            assert fresh.classify(np.full((48, 48, 3), 255, np.uint8), top_k=1, model="big")[0].label == "level_9"
    finally:
        stop(d)
