"""bench.load.policy's arithmetic and its ceiling worker: a daemon's ratio is against the ceiling of
its own round, a figure is the median over rounds with its spread, the daemon's thread groups
split as their names say, and a ceiling worker measures on demand in a child of its own."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:              # bench/ is a package at the repository root, not installed
    sys.path.insert(0, str(ROOT))

from bench.lib.measure import thread_groups  # noqa: E402
from bench.load import ceiling, policy  # noqa: E402


def _daemon(img_s, p50=10.0, p99=12.0, batch=4.0, other=0.5):
    return {"clients": 4, "img_s": img_s, "p50_ms": p50, "p99_ms": p99, "mean_batch": batch,
            "model_ms": 20.0, "daemon_cores": 1.0, "other_cores": other, "loop_cpu": 0.1,
            "loop_wait": 0.01, "model_cpu": 0.8, "model_wait": 0.2, "gc_full": 0, "gc_ms": 0.0}


def test_each_ratio_is_against_its_own_rounds_ceiling_and_the_summary_is_the_median_with_its_spread():
    rounds = []
    for i, (ceil, got) in enumerate([(100.0, 90.0), (50.0, 50.0), (200.0, 120.0)]):
        row = _daemon(got, p99=10.0 + 2 * i)
        row["ratio"] = got / ceil                                   # as measure() sets it
        rounds.append({"round": i + 1, "clients": 4, "depth": 1, "daemons": {"auto": row},
                       "ceiling": {"img_s": ceil, "setting": "passive", "other_cores": [0.2, 0.4]}})
    results = {"policies": {"auto": []}, "cases": [[4, 1]], "rounds": rounds, "rounds_n": 3}
    (s,) = policy.summary(results)
    assert s["ratio"] == {"median": 0.9, "min": 0.6, "max": 1.0}
    # a ratio of medians would say 90 / 100 = 0.9 too here, but not in general: the rounds pair up
    assert s["img_s"]["median"] == 90.0 and s["ceiling_img_s"]["median"] == 100.0
    assert s["tail"]["max"] == pytest.approx(1.4)
    assert s["other_ceiling"]["median"] == 0.4                     # the busier of a round's settings
    assert "0.90 [0.60-1.00]" in policy.render(results)


def test_the_daemons_threads_split_into_loop_model_and_the_rest_by_name():
    pid = 100
    before = {100: ("python", 1.0, 0.5), 101: ("inferd-dev0", 2.0, 1.0), 102: ("inferd-dev0", 2.0, 1.0),
              103: ("python", 0.0, 0.0)}
    after = {100: ("python", 1.2, 0.6), 101: ("inferd-dev0", 3.0, 1.5), 102: ("inferd-dev0", 2.5, 1.1),
             103: ("python", 0.1, 0.2), 104: ("inferd-dev0", 0.4, 0.0)}     # 104: started meanwhile
    got = thread_groups(pid, before, after, 2.0, "inferd-dev")
    assert got["loop"] == pytest.approx({"cpu": 0.1, "wait": 0.05})
    assert got["model"] == pytest.approx({"cpu": 0.95, "wait": 0.3})
    assert got["other"] == pytest.approx({"cpu": 0.05, "wait": 0.1})


def test_a_policy_may_carry_an_environment_and_names_are_unique():
    names = [p[0] for p in policy.POLICIES]
    assert len(names) == len(set(names)) and "auto" in names
    assert all(isinstance(p[1], list) and (len(p) == 2 or isinstance(p[2], dict)) for p in policy.POLICIES)


@pytest.mark.timeout(180)
def test_a_ceiling_worker_measures_on_demand_and_closes_twice():
    with ceiling.Worker("1 thread", {}, 1) as worker:
        assert worker.threads == 1
        row = worker.measure(2, 0.05, 0.2)
        again = worker.measure(2, 0.0, 0.1)                        # the same child, the model kept
    assert row["batch"] == 2 and row["img_s"] > 0 and row["setting"] == "1 thread"
    assert 0.0 < row["own_cores"] <= 1.5 and row["busy_cores"] >= row["own_cores"] - 0.2
    assert again["batches"] >= 1
    assert worker.proc.exitcode is not None                        # reaped on the way out
    worker.close()                                                 # safe twice
