"""Thread pools and the CPU layout in a real daemon: cpu:auto picks a layout within the cores and
serves, bad device and thread settings stop start-up with exit 78, and an idle daemon with a
populated embedding store keeps its limits and uses no CPU (the plan and the rule themselves:
tests/unit/test_thread_pools_and_cpu_layout.py)."""
import os
import struct
import time

import numpy as np
import psutil
import pytest

from helpers import admin_path, sample_images, wait_until
from inferd.client import Client
from inferd.client.admin import AdminClient
from inferd.daemon.pipeline import cpu_layout as layout
from inferd.daemon.caching.embedding_store import EmbeddingStore


def _threads_info(d) -> dict:
    with AdminClient(admin_path(d)) as admin:
        return admin.call("stats")["threads"]


@pytest.mark.timeout(180)
def test_cpu_auto_picks_a_layout_within_the_cores_and_serves(fresh_daemon):
    d = fresh_daemon("--device", "cpu:auto", "--set", "threads.auto_measure_s=0.05", "--set", "threads.pin=true",
                     "--set", "batching.max_batch=4", "--set", "cache.enabled=false")
    info = _threads_info(d)
    chosen, table = info["layout"]["chosen"], info["layout"]["table"]
    cores = len(os.sched_getaffinity(d.pid))
    assert chosen["devices"] * chosen["threads"] <= cores and info["usable_cores"] == cores
    assert {(r["devices"], r["threads"]) for r in table} == set(layout.candidates(cores))
    assert layout.choose(table)["devices"] == chosen["devices"]
    assert [x["intra_op"] for x in info["devices"]] == [chosen["threads"]] * chosen["devices"]
    pinned = [set(x["cores"]) for x in info["devices"]]            # threads.pin: cores of their own
    assert all(len(c) == chosen["threads"] for c in pinned)
    assert len(set().union(*pinned)) == chosen["threads"] * chosen["devices"]
    with Client(d.socket_path) as c:
        assert len(c.info()["devices"]) == chosen["devices"]
        label, image = sample_images()[0]
        assert c.classify(image)[0].label == label
    assert "cpu:auto:" in d.log() and "<- chosen" in d.log()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, message", [
    (("--device", "cpu:fast"), "expected cpu, cpu:THREADS, cpu:auto or cuda:N"),
    (("--device", "cpu:auto", "--device", "cpu:1"), "list it once, with no other cpu device"),
    (("--device", "cpu:2", "--device", "cpu:2", "--set", 'threads.oversubscribe="refuse"'),
     "ask for 4 threads in all"),
    (("--set", 'threads.omp_wait_policy="spin"'), "threads.omp_wait_policy"),
])
def test_bad_device_and_thread_settings_stop_start_up_with_exit_78(fresh_daemon, args, message):
    if "ask for 4" in message and len(os.sched_getaffinity(0)) >= 4:
        pytest.skip("4 threads fit this machine's cores")
    d = fresh_daemon(*args, wait=False)
    assert d.proc.wait(timeout=100) == 78
    assert message in d.log()


def _fill_store(path: str, rows: int, capacity: int) -> None:
    """Add ``rows`` random unit embeddings (uid of this test) to the stopped daemon's store file."""
    with open(path, "rb") as fh:
        dim = struct.unpack_from("<I", fh.read(16), 12)[0]
    store = EmbeddingStore.open(path, capacity, dim)
    vectors = np.random.default_rng(7).standard_normal((rows, dim)).astype(np.float32)
    for n, v in enumerate(vectors):
        store.add((n + 1).to_bytes(32, "little"), v, uid=os.getuid())
    store.close()


def _cores_used(proc: psutil.Process, seconds: float) -> float:
    t0, c0 = time.monotonic(), sum(proc.cpu_times()[:2])
    time.sleep(seconds)  # noqa: sleep-ok: the measuring window itself, not a wait for a state
    return (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - t0)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("blas", [1, 2])
def test_an_idle_daemon_with_thousands_of_embeddings_uses_no_cpu_and_keeps_its_limits(fresh_daemon, blas):
    rows, capacity = 3000, 4000
    common = ("--set", f"embeddings.capacity={capacity}", "--set", f"threads.blas={blas}")
    d = fresh_daemon(*common, fork=False)          # the thread environment of a fresh interpreter
    store = next(os.path.join(d.workdir, n) for n in os.listdir(d.workdir) if n.endswith(".store"))
    assert d.stop() == 0
    _fill_store(store, rows, capacity)
    d = fresh_daemon(*common, workdir=d.workdir, fork=False)
    assert f"{rows} of {capacity} rows" in d.log()
    _, image = sample_images()[0]
    with Client(d.socket_path) as c:
        for _ in range(20):                 # searches over every row: the BLAS product
            c.near_duplicates(image, k=3, min_similarity=0.0)
        info = _threads_info(d)
        assert info["blas_limit"] == blas and info["blas_threads"] == blas
        assert info["interop"] == 1 and info["omp_wait_policy"] == "PASSIVE"
        # the device thread applied its device's share (spawn_daemon: --device cpu:1)
        assert [(d["device"], d["intra_op"], d["planned"]) for d in info["devices"]] == [("cpu#0", 1, 1)]
        proc = psutil.Process(d.pid)
        # idle: a window of near zero CPU must come soon (a spinning pool keeps ~1 core busy)
        wait_until(lambda: _cores_used(proc, 1.0) < 0.1, timeout=30, what="an idle daemon near 0 CPU")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_fresh_daemon_spins_briefly_where_its_team_fits_and_sleeps_where_teams_do_not(fresh_daemon):
    """threads.omp_wait_policy = auto (NOTE [ thread pools ], "Waiting") in a fresh interpreter, with
    nothing in its environment: one 2-thread team on 2 cores spins GOMP_SPINCOUNT times and runs
    each batch size on the team it measured (threads.per_batch = auto); two 1-thread devices have no
    worker to spin and wait passively. Either way an idle daemon soon uses no CPU."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 usable cores")
    saved = {k: os.environ.pop(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    try:
        d = fresh_daemon("--device", "cpu:2", "--set", "cache.enabled=false", fork=False)
        with Client(d.socket_path) as c:
            label, image = sample_images()[0]
            for _ in range(10):                          # batches of one: the team sizes are tried
                assert c.classify(image)[0].label == label
        info = _threads_info(d)
        assert info["omp_wait_policy"] == "GOMP_SPINCOUNT=10000" and info["per_batch"] == "auto"
        assert [x["intra_op"] for x in info["devices"]] == [2]
        chosen = info["devices"][0]["team_by_batch"]["1"]        # batches of one frame: measured
        assert chosen["chosen"] in (1, 2) and set(chosen["us_per_frame"]) == {"1", "2"}
        proc = psutil.Process(d.pid)
        wait_until(lambda: _cores_used(proc, 1.0) < 0.1, timeout=30, what="an idle daemon near 0 CPU")
        d = fresh_daemon("--device", "cpu:1", "--device", "cpu:1", fork=False)
        assert _threads_info(d)["omp_wait_policy"] == "PASSIVE"
    finally:
        os.environ.update(saved)


@pytest.mark.timeout(180)
def test_a_daemon_counts_its_collections_and_names_its_model_threads(fresh_daemon):
    """The admin stats count the garbage collector's runs by generation (NOTE [ thread pools ], "The
    garbage collector": a full one holds the GIL for tens of milliseconds), and the device's
    executor thread carries the name inferd-dev0 (THREAD_NAME), the event loop the process's own."""
    d = fresh_daemon("--device", "cpu:1", "--set", "cache.enabled=false")
    with Client(d.socket_path) as c:
        label, image = sample_images()[0]
        for _ in range(5):
            assert c.classify(image)[0].label == label
    info = _threads_info(d)
    assert len(info["gc"]["collections"]) == 3 and sum(info["gc"]["collections"]) > 0
    assert info["gc"]["frozen"] == 0
    tid = info["devices"][0]["tid"]
    with open(f"/proc/{d.pid}/task/{tid}/comm") as fh:
        assert fh.read().strip() == "inferd-dev0"
    with open(f"/proc/{d.pid}/task/{d.pid}/comm") as fh:
        assert fh.read().strip() != "inferd-dev0"
