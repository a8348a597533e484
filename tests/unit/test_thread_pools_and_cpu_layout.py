"""Thread pools and the CPU layout (daemon/pipeline/thread_pools.py, daemon/pipeline/cpu_layout.py): the plan shares the cores
without oversubscribing them, cpu:auto picks by its documented rule, and a real daemon keeps its
limits in force and uses no CPU while idle with a populated embedding store."""
import logging
import os
import struct
import time

import numpy as np
import psutil
import pytest

from helpers import admin_path, sample_images, wait_until
from inferd.client import Client
from inferd.client.admin import AdminClient
from inferd.daemon.pipeline import cpu_layout as layout, thread_pools as threads
from inferd.daemon.config import DeviceConfig
from inferd.daemon.caching.embedding_store import EmbeddingStore


@pytest.fixture(autouse=True)
def _fresh_registry():
    threads.reset_for_tests()
    yield
    threads.reset_for_tests()


def devs(*specs):
    return [DeviceConfig(name, n) for name, n in specs]


# the plan ------------------------------------------------------------------------------------------
def test_unset_threads_share_the_cores_evenly_and_cuda_keeps_its_own():
    out = threads.plan(devs(("cpu", 0), ("cuda:0", 0), ("cpu", 0)), (0, 1, 2, 3, 4, 5))
    assert [a.threads for a in out] == [3, 0, 3]
    assert all(a.cores == () for a in out)                       # not pinned unless asked
    out = threads.plan(devs(("cpu", 2), ("cpu", 0)), (0, 1, 2, 3, 4, 5))
    assert [a.threads for a in out] == [2, 4]                    # the rest goes to the unset one


def test_pinning_gives_each_cpu_device_cores_of_its_own():
    out = threads.plan(devs(("cpu", 1), ("cpu", 2), ("cuda:0", 0)), (4, 5, 6, 7), pin=True)
    assert [a.cores for a in out] == [(4,), (5, 6), ()]


def test_an_oversubscribed_explicit_config_warns_or_is_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="inferd.threads"):
        out = threads.plan(devs(("cpu", 2), ("cpu", 2)), (0, 1), pin=True)
    assert "ask for 4 threads in all" in caplog.text and "2 cores" in caplog.text
    assert [a.cores for a in out] == [(), ()]                    # no pinning onto shared cores
    assert threads.snapshot()["oversubscribed"] is True
    with pytest.raises(threads.ThreadPlanError, match="refuse"):
        threads.plan(devs(("cpu", 2), ("cpu", 1)), (0, 1), oversubscribe="refuse")
    assert threads.plan(devs(("cpu", 1), ("cpu", 1)), (0, 1), oversubscribe="refuse")[1].threads == 1


def test_a_wait_policy_already_in_the_environment_wins():
    env = {}
    assert threads.prepare_environment("passive", env) == "PASSIVE" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.prepare_environment("passive", env) == "ACTIVE"
    assert threads.prepare_environment("default", {}) == ""
    with pytest.raises(ValueError, match="spin"):
        threads.prepare_environment("spin", {})


# the layout rule -------------------------------------------------------------------------------------
def test_candidates_never_use_more_than_the_cores():
    assert layout.candidates(1) == [(1, 1)]
    assert layout.candidates(2) == [(1, 2), (2, 1)]
    assert layout.candidates(6) == [(1, 6), (2, 3), (4, 1), (6, 1)]
    assert all(k * t <= c for c in range(1, 33) for k, t in layout.candidates(c))
    with pytest.raises(ValueError):
        layout.candidates(0)


def row(k, t, b1_ms, full):
    return {"devices": k, "threads": t, "batch1_ms": b1_ms, "full_img_s": full}


def test_capacity_decides_and_batch1_latency_breaks_near_ties():
    assert layout.choose([row(1, 2, 10.0, 500.0), row(2, 1, 20.0, 700.0)])["devices"] == 2
    # within 5% of the best capacity: the faster lone request wins
    assert layout.choose([row(1, 2, 10.0, 690.0), row(2, 1, 20.0, 700.0)])["devices"] == 1
    # a full tie: fewer devices
    assert layout.choose([row(2, 1, 10.0, 700.0), row(1, 2, 10.0, 700.0)])["devices"] == 1
    with pytest.raises(ValueError):
        layout.choose([])


# a real daemon -----------------------------------------------------------------------------------------
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


@pytest.mark.timeout(240)
@pytest.mark.parametrize("blas", [1, 2])
def test_an_idle_daemon_with_thousands_of_embeddings_uses_no_cpu_and_keeps_its_limits(fresh_daemon, blas):
    rows, capacity = 3000, 4000
    common = ("--set", f"embeddings.capacity={capacity}", "--set", f"threads.blas={blas}")
    d = fresh_daemon(*common)
    store = next(os.path.join(d.workdir, n) for n in os.listdir(d.workdir) if n.endswith(".store"))
    assert d.stop() == 0
    _fill_store(store, rows, capacity)
    d = fresh_daemon(*common, workdir=d.workdir)
    assert f"{rows} of {capacity} rows" in d.log()
    _, image = sample_images()[0]
    with Client(d.socket_path) as c:
        for _ in range(20):                 # searches over every row: the BLAS product
            c.near_duplicates(image, k=3, min_similarity=0.0)
        info = _threads_info(d)
        assert info["blas_limit"] == blas and info["blas_threads"] == blas
        assert info["interop"] == 1 and info["omp_wait_policy"] == "PASSIVE"
        # the batching thread applied its device's share (spawn_daemon: --device cpu:1)
        assert [(d["device"], d["intra_op"], d["planned"]) for d in info["devices"]] == [("cpu#0", 1, 1)]
        proc = psutil.Process(d.pid)
        # idle: a window of near zero CPU must come soon (a spinning pool keeps ~1 core busy)
        wait_until(lambda: _cores_used(proc, 1.0) < 0.1, timeout=30, what="an idle daemon near 0 CPU")


def test_enter_device_thread_sets_this_threads_team_and_pins_it():
    import threading as th
    from types import SimpleNamespace

    import torch

    cores = tuple(sorted(os.sched_getaffinity(0)))
    dev = SimpleNamespace(index=0, label="cpu#0", threads=0, torch_device=torch.device("cpu"))
    threads.plan(devs(("cpu", 1)), cores, pin=True)
    seen = {}

    def body():
        seen["applied"] = threads.enter_device_thread(dev)
        seen["threads"] = torch.get_num_threads()
        seen["affinity"] = os.sched_getaffinity(0)

    worker = th.Thread(target=body)
    worker.start()
    worker.join(timeout=30)
    assert seen["threads"] == 1 and seen["applied"]["intra_op"] == 1
    assert seen["affinity"] == {cores[0]} and seen["applied"]["cores"] == [cores[0]]
    assert os.sched_getaffinity(0) == set(cores)            # the caller's thread is not pinned
    snap = threads.snapshot()["devices"]
    assert snap == [dict(seen["applied"], planned=1)]
