"""The benchmarks' own arithmetic, on fake measurements: the in-process ceiling is the faster OpenMP
setting at each batch size (never the daemon's own by default), and the feed-rate rows split the
daemon's CPU between its event loop thread and the rest as the thread times say; the hashing bench
times one thread, two threads and two processes; the prepared forms of the model compute what eager
does."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:              # bench/ is a package at the repository root, not installed
    sys.path.insert(0, str(ROOT))

from bench.feed import report as feed_report, run as feed_run  # noqa: E402
from bench.load import ceiling  # noqa: E402


def _measured(omp_env: dict, img_s: dict) -> dict:
    """What one ceiling child reports: a row per batch size (ms per batch follows img/s)."""
    return {"omp_env": omp_env, "torch": "2.x", "threads": 2,
            "rows": [{"batch": b, "img_s": v, "batch_ms_p50": 1000.0 * b / v, "batches": 10}
                     for b, v in img_s.items()]}


def test_the_ceiling_takes_the_faster_setting_at_each_batch_size():
    got = ceiling.fastest({"default": _measured({}, {1: 220.0, 16: 250.0}),
                           "passive": _measured({"OMP_WAIT_POLICY": "PASSIVE"}, {1: 120.0, 16: 260.0})})
    assert [(r["batch"], r["setting"], r["img_s"]) for r in got["rows"]] == [
        (1, "default", 220.0), (16, "passive", 260.0)]
    assert got["rows"][0]["img_s_by_setting"] == {"default": 220.0, "passive": 120.0}
    assert (got["ceiling_img_s"], got["ceiling_batch"], got["ceiling_setting"]) == (260.0, 16, "passive")
    assert got["model_ms_b1"] == pytest.approx(1000.0 / 220.0)       # the faster setting's batch 1
    assert set(got["settings"]) == {"default", "passive"}
    # the fair ceiling of a daemon row comes from these rows: batch 1 at the default's speed
    assert ceiling.fair(got, 16)(1) == (1, 220.0)


def test_the_ceiling_leaves_out_a_batch_size_not_measured_by_every_setting():
    got = ceiling.fastest({"default": _measured({}, {1: 50.0, 4: 90.0}),
                           "passive": _measured({"OMP_WAIT_POLICY": "PASSIVE"}, {1: 60.0})})
    assert [r["batch"] for r in got["rows"]] == [1]
    assert got["ceiling_setting"] == "passive"


def test_the_ceiling_candidates_are_torch_defaults_passive_one_thread_plus_a_different_daemon_setting():
    names = lambda settings: [name for name, *_ in settings]
    base = ["default", "passive", "1 thread", "traced", "fx fused"]
    assert names(ceiling.candidates()) == base
    assert ceiling.candidates()[0][1] == {}                                # nothing set: torch's defaults
    assert ceiling.candidates()[2][1:] == ({}, 1)                          # torch's defaults, one thread
    assert [c[1:] for c in ceiling.candidates()[3:]] == [({}, 2, "traced"), ({}, 2, "fx fused")]
    assert names(ceiling.candidates({"OMP_WAIT_POLICY": "PASSIVE"})) == base
    assert names(ceiling.candidates({})) == base
    active = ceiling.candidates({"OMP_WAIT_POLICY": "ACTIVE"})
    assert names(active) == base + ["daemon"] and active[-1][1] == {"OMP_WAIT_POLICY": "ACTIVE"}
    spin = ceiling.candidates({"GOMP_SPINCOUNT": "10000"})                 # threads.omp_wait_policy = auto
    assert names(spin) == base + ["daemon"] and spin[-1][1] == {"GOMP_SPINCOUNT": "10000"}


def test_the_daemon_openmp_setting_follows_its_wait_policy_and_devices():
    """bench.load's daemon OpenMP environment (a ceiling candidate) is what the daemon sets:
    auto on cpu:2 spins a little where 2 cores are usable, two 1-thread devices wait passively."""
    from bench.load import run
    from inferd.daemon.pipeline import thread_pools

    cores = len(thread_pools.usable_cores())
    want = {"GOMP_SPINCOUNT": "10000"} if cores >= 2 else {"OMP_WAIT_POLICY": "PASSIVE"}
    assert run.omp_env({}, []) == want
    assert run.omp_env({}, ["threads.omp_spin_count=500"]) == ({"GOMP_SPINCOUNT": "500"} if cores >= 2 else want)
    assert run.omp_env({}, [], ["cpu:1", "cpu:1"]) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert run.omp_env({}, ['threads.omp_wait_policy="passive"']) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert run.omp_env({}, ['threads.omp_wait_policy="default"']) == {}
    assert run.omp_env({"GOMP_SPINCOUNT": "7"}, []) == {"GOMP_SPINCOUNT": "7"}


def _edge(t: float, cpu: float, threads: dict, frames: int, hits: int) -> dict:
    return {"t": t, "cpu_s": cpu, "threads": threads, "c_frames": frames, "c_batches": frames // 8,
            "daemon_hits": hits, "coalesced": 0, "busy_s": 2 * t, "steal_s": 0.0}


def test_a_feed_row_splits_the_daemon_cpu_between_its_loop_thread_and_the_others():
    pid = 4000
    a = _edge(10.0, 5.0, {pid: 2.0, 4001: 1.0, 4002: 0.5}, 1000, 0)
    b = _edge(12.0, 6.0, {pid: 2.8, 4001: 1.1, 4002: 0.6, 4003: 0.1}, 9000, 2000)   # 4003: new, left out
    # four clients: 2500 frames each in a 2 s window, latencies of 16-frame calls, 0.1 core each
    done = [(2500, 0, [0.004, 0.005], 0.1)] * 4
    row = feed_run.summarise(a, b, pid, done, 2.0)
    assert row["frames_s"] == 5000.0
    assert row["daemon_cores"] == pytest.approx(0.5)
    assert row["cpu_us_per_frame"] == pytest.approx(100.0)              # 0.5 cores / 5000 frames/s
    assert row["loop_cores"] == pytest.approx(0.4)                      # 0.8 s of the main thread in 2 s
    assert row["loop_us_per_frame"] == pytest.approx(80.0)
    assert row["loop_share"] == pytest.approx(0.8)
    assert row["busiest_other_thread_cores"] == pytest.approx(0.05)
    assert row["computed_s"] == 4000.0 and row["daemon_hits_s"] == 1000.0 and row["mean_batch"] == 8.0
    assert row["clients_cores"] == pytest.approx(0.4)


def test_the_feed_targets_read_the_one_device_unique_rows():
    def row(size, cache, devices, fps, cpu, loop, frames="unique"):
        return {"size": size, "cache": cache, "devices": devices, "frames": frames, "frames_s": fps,
                "cpu_us_per_frame": cpu, "loop_us_per_frame": loop}

    rows = [row(224, False, 1, 10_000, 40.0, 20.0), row(224, True, 1, 9_500, 90.0, 20.0),
            row(224, True, 2, 1.0, 1.0, 1.0), row(224, True, 1, 1.0, 1.0, 1.0, frames="30% rep"),
            row(64, True, 1, 30_000, 30.0, 10.0)]
    got = {t["name"]: (t["value"], t["met"]) for t in feed_report.targets(rows)}
    assert got["224x224 unique frames: cache on >= 0.90 of cache off (frames/s)"] == (0.95, True)
    assert got["224x224 unique, cache on: daemon CPU per frame <= 80 us"] == (90.0, False)
    assert got["224x224 unique, cache on: event loop CPU per frame <= 25 us"] == (20.0, True)
    assert got["224x224 unique, cache off: daemon CPU per frame <= 50 us"] == (40.0, True)
    assert got["64x64 unique, cache on, 4 client processes: >= 25,000 frames/s"] == (30_000, True)
    assert feed_report.targets([row(64, False, 1, 1.0, 1.0, 1.0)]) == []   # nothing it can answer


@pytest.mark.timeout(120)
def test_the_hashing_bench_times_one_thread_two_threads_and_two_processes(capsys):
    from bench.feed import hashing
    assert hashing.main(["--size", "32", "--count", "200"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("BLAKE3 of a 32x32x3 frame (3,072 bytes), 200 hashes each")
    rows = {line.split("  ")[1].strip(): line for line in lines[1:]}
    assert set(rows) == {"one thread", "two threads, one process", "two processes"}
    for name, line in rows.items():    # one time a hash per thread or process, then the sum's rate
        times = line.split("us a hash")[0].split(name)[1].split("/")
        assert len(times) == (1 if name == "one thread" else 2) and all(float(t) > 0 for t in times)
    assert rows["one thread"].rstrip().endswith("1.00x one thread")


@pytest.mark.timeout(120)
def test_the_prepared_forms_of_the_model_compute_what_eager_computes():
    """bench.load.prepared's forms, and the ceiling's, prepared at one batch size: the same outputs
    as eager within float rounding at every batch size, from an NCHW input as the daemon's."""
    import torch
    from bench.load import prepared
    from inferd.daemon.models import zoo
    model = zoo.build("resnet18")[0].eval()
    x = torch.randn(2, 3, 64, 64)
    forms = prepared.forms(model, x)
    assert [name for name, *_ in forms] == ["eager", "fx fused, channels_last", "traced, frozen",
                                          "+ optimize_for_inference"]
    with torch.inference_mode():
        ref = model(x)
        for name, module, xx in forms:
            assert torch.allclose(module(xx), ref, atol=1e-4), name
        for form in ceiling.FORMS:
            module = ceiling.in_form(model, form, (1, 3, 64, 64))
            for batch in (1, 5):
                y = torch.randn(batch, 3, 64, 64)
                assert torch.allclose(module(y), model(y), atol=1e-4), (form, batch)
    with pytest.raises(ValueError, match="unknown form"):
        ceiling.in_form(model, "onnx", (1, 3, 64, 64))
    assert prepared.ms_a_batch(model, x, 0.05) > 0.0
