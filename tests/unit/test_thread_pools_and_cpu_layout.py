"""Thread pools and the CPU layout (daemon/pipeline/thread_pools.py, daemon/pipeline/cpu_layout.py): the plan shares the cores
without oversubscribing them, and cpu:auto picks by its documented rule (a real daemon's layout and
limits: tests/integration/test_cpu_layout_through_daemon.py)."""
import logging
import os
import sys

import pytest

from inferd.daemon.pipeline import cpu_layout as layout, thread_pools as threads
from inferd.daemon.config import DeviceConfig


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
    with caplog.at_level(logging.WARNING, logger="inferd.thread_pools"):
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
    env = {"GOMP_SPINCOUNT": "500"}
    assert threads.prepare_environment("auto", env, teams=[2], cores=2) == "GOMP_SPINCOUNT=500"
    assert env == {"GOMP_SPINCOUNT": "500"}
    with pytest.raises(ValueError, match="spin"):
        threads.prepare_environment("spin", {})


# the automatic wait policy (NOTE [ thread pools ], "Waiting") ------------------------------------------
@pytest.mark.parametrize("teams, cores, want", [
    ([2], 2, {"GOMP_SPINCOUNT": "10000"}),        # cpu:2 on 2 cores: the team fits, spin a little
    ([0], 8, {"GOMP_SPINCOUNT": "10000"}),        # one device sharing every core
    ([4, 4], 8, {"GOMP_SPINCOUNT": "10000"}),
    ([2, 0], 8, {"GOMP_SPINCOUNT": "10000"}),     # the unset one gets the other 6
    ([None], 2, {"GOMP_SPINCOUNT": "10000"}),     # cpu:auto: its layouts never oversubscribe
    ([2, 2], 2, {"OMP_WAIT_POLICY": "PASSIVE"}),  # oversubscribed: a spinning worker takes a core
    ([4], 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ([1, 1], 2, {"OMP_WAIT_POLICY": "PASSIVE"}),  # teams of one: nothing would spin
    ([0, 0], 2, {"OMP_WAIT_POLICY": "PASSIVE"}),  # two devices of one thread each
    ([], 2, {"OMP_WAIT_POLICY": "PASSIVE"}),      # only CUDA devices
])
def test_auto_spins_a_little_where_the_teams_fit_the_cores_and_sleeps_where_they_do_not(teams, cores, want):
    assert threads.auto_wait(teams, cores) == want
    env = {}
    shown = threads.prepare_environment("auto", env, teams=teams, cores=cores)
    assert env == want and shown == " ".join(v if k == "OMP_WAIT_POLICY" else f"{k}={v}" for k, v in want.items())
    assert threads.auto_wait([2], 2, spin_count=123) == {"GOMP_SPINCOUNT": "123"}


def test_the_teams_come_from_the_device_flags_else_the_configuration():
    assert threads.cpu_teams(["cpu:2"], devs(("cpu", 1))) == [2]
    assert threads.cpu_teams(["cpu", "cuda:0", "cpu:auto"], []) == [0, None]
    assert threads.cpu_teams(None, devs(("cpu", 3), ("cuda:0", 0), ("cpu:auto", 0))) == [3, None]
    assert threads.cpu_teams(None, []) == [0]      # none configured: one CPU device on every core


# the layout rule -------------------------------------------------------------------------------------
def test_the_gil_switch_interval_is_set_and_reported():
    """threads.switch_interval_ms reaches sys.setswitchinterval (a device thread waits at most that
    for the GIL after each torch op, NOTE [ thread pools ]); None leaves the interpreter's."""
    before = sys.getswitchinterval()
    try:
        threads.configure_process(1, 1, 0.25)
        assert sys.getswitchinterval() == pytest.approx(0.00025)
        assert threads.snapshot()["switch_interval_ms"] == pytest.approx(0.25)
        threads.configure_process(1, 1)
        assert sys.getswitchinterval() == pytest.approx(0.00025)
    finally:
        sys.setswitchinterval(before)


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


# the garbage collector and thread names --------------------------------------------------------------
def test_the_gc_watch_counts_each_collection_and_its_time_by_generation():
    """GcWatch (NOTE [ thread pools ], "The garbage collector") times every collection with the
    clock it is given, by generation: a forced full one is counted with its time and is the longest."""
    import gc

    ticks = iter([10.0, 10.25, 20.0, 20.001])
    watch = threads.GcWatch(clock=lambda: next(ticks))
    watch.install()
    try:
        gc.collect(2)
        gc.collect(0)
    finally:
        watch.uninstall()
    assert watch not in gc.callbacks
    snap = watch.snapshot()
    assert snap["collections"] == [1, 0, 1]
    assert snap["seconds"][2] == pytest.approx(0.25) and snap["longest_ms"][2] == pytest.approx(250.0)
    assert snap["longest_ms"][0] == pytest.approx(1.0, abs=1e-6)


def test_the_snapshot_counts_the_collections_from_configure_process_on():
    import gc

    threads.configure_process(1, 1)
    before = threads.snapshot()["gc"]
    gc.collect()
    after = threads.snapshot()["gc"]
    assert after["collections"][2] == before["collections"][2] + 1
    assert after["longest_ms"][2] >= 0.0 and after["frozen"] == gc.get_freeze_count()
    threads.reset_for_tests()
    assert sum(isinstance(cb, threads.GcWatch) for cb in gc.callbacks) == 0    # uninstalled


def test_a_device_thread_and_the_openmp_team_it_starts_carry_the_devices_name():
    """enter_device_thread names the executor thread inferd-dev<index> (THREAD_NAME); the OpenMP
    workers it then creates inherit the name, so tools and bench/load tell them from the loop."""
    import threading as th
    from types import SimpleNamespace

    import torch

    dev = SimpleNamespace(index=3, label="cpu#3", threads=2, torch_device=torch.device("cpu"))
    threads.plan(devs(("cpu", 2)), tuple(sorted(os.sched_getaffinity(0))))
    seen, named, release = {}, th.Event(), th.Event()

    def body():
        threads.enter_device_thread(dev)
        torch.ones(256, 256) @ torch.ones(256, 256)      # a parallel region: the team starts
        seen["tid"] = th.get_native_id()
        seen["names"] = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as fh:
                seen["names"][int(tid)] = fh.read().strip()
        named.set()
        release.wait(10)                     # alive while the caller reads the names

    worker = th.Thread(target=body)
    worker.start()
    try:
        assert named.wait(30), "the device thread never read its names"
    finally:
        release.set()
        worker.join(timeout=30)
    assert seen["names"][seen["tid"]] == "inferd-dev3"
    assert seen["names"][os.getpid()] != "inferd-dev3"             # the caller keeps its name
