"""The team size of each CPU batch (daemon/pipeline/team_size.py, NOTE [ team size per batch ]):
given measured batch times, which team size a batch runs with. Times are handed in, no batch runs
(the engine's use of it: tests/unit/test_engine.py)."""
import pytest

from inferd.daemon.pipeline.team_size import TeamSize, candidates

pytestmark = pytest.mark.timeout(60)


def run(team: TeamSize, n: int, seconds_per_frame: dict, batches: int) -> list[int]:
    """``batches`` batches of ``n`` frames, each team size taking ``seconds_per_frame[t]`` a frame;
    the team sizes picked, in order."""
    picked = []
    for _ in range(batches):
        t = team.pick(n)
        team.observe(n, t, seconds_per_frame[t] * n)
        picked.append(t)
    return picked


def test_candidates_are_powers_of_two_up_to_the_share():
    assert candidates(1) == (1,)
    assert candidates(2) == (1, 2)
    assert candidates(6) == (1, 2, 4, 6)
    assert candidates(8) == (1, 2, 4, 8)


def test_a_device_of_one_thread_always_runs_one():
    team = TeamSize(1)
    assert run(team, 4, {1: 0.01}, 10) == [1] * 10 and team.snapshot() == {}


def test_each_candidate_is_tried_then_the_fastest_runs():
    team = TeamSize(2, trials=3, explore_every=1000)
    picked = run(team, 1, {1: 0.010, 2: 0.014}, 50)      # one frame: one thread is faster
    assert sorted(picked[:6]) == [1, 1, 1, 2, 2, 2] and picked[:2] == [1, 2]   # interleaved trials
    assert picked[6:].count(2) <= 3                      # the early exploring batches (8, 16, 32 on)
    picked = run(team, 16, {1: 0.010, 2: 0.006}, 50)     # sixteen frames: two threads are faster
    assert picked[6:].count(1) <= 3
    assert team.best(1) == 1 and team.best(12) == 2 and team.best(16) == 2
    snap = team.snapshot()
    assert snap["1"]["chosen"] == 1 and snap["16"]["chosen"] == 2
    assert snap["16"]["us_per_frame"]["2"] == pytest.approx(6000.0)


def test_batch_sizes_share_a_bucket_by_their_power_of_two():
    team = TeamSize(2, trials=1, explore_every=1000)
    run(team, 5, {1: 0.010, 2: 0.005}, 5)
    assert team.best(4) == team.best(7) == 2       # 4..7: the same bucket
    assert team.best(8) == 2                       # never measured: the whole share


def test_the_whole_share_wins_unless_a_smaller_team_is_clearly_faster():
    team = TeamSize(2, trials=2, explore_every=1000)
    assert set(run(team, 4, {1: 0.0096, 2: 0.010}, 30)[4:]) <= {2, 1}
    assert team.best(4) == 2                            # 4% faster: within the noise, keep two
    team = TeamSize(2, trials=2, explore_every=1000)
    run(team, 4, {1: 0.0080, 2: 0.010}, 30)
    assert team.best(4) == 1                            # 20% faster: one thread


def test_a_choice_made_on_noisy_trials_is_checked_again_soon():
    """The trials of two threads ran while another process took a core (3x slower); 8 batches
    later an exploring batch measures two threads again, and the choice moves back."""
    team = TeamSize(2, trials=2, explore_every=200)
    noisy, quiet = {1: 0.010, 2: 0.018}, {1: 0.010, 2: 0.006}
    picked = run(team, 16, noisy, 4) + run(team, 16, quiet, 30)
    assert picked[4:8] == [1, 1, 1, 1]
    assert picked.index(2, 4) <= 4 + 8 + 1 and picked[-10:].count(2) >= 9


def test_a_change_of_load_is_followed_through_the_exploring_batches():
    """Two threads win on a quiet machine; then other processes take a core and one thread wins:
    the rare exploring batch finds it, and the choice moves."""
    team = TeamSize(2, trials=2, explore_every=20)
    quiet, busy = {1: 0.010, 2: 0.006}, {1: 0.010, 2: 0.030}
    picked = run(team, 8, quiet, 100)
    assert picked[4:].count(1) <= 100 // 20 + 1         # only the exploring batches ran one thread
    picked = run(team, 8, busy, 100)
    assert picked[-50:].count(1) >= 45                  # one thread now, bar the explorations
    picked = run(team, 8, quiet, 100)
    assert picked[-50:].count(2) >= 45                  # and back


def test_an_exploring_batch_is_rare():
    team = TeamSize(2, trials=3, explore_every=200)
    picked = run(team, 1, {1: 0.010, 2: 0.020}, 2000)
    early = len([g for g in (8, 16, 32, 64, 128) if 6 + sum((8, 16, 32, 64, 128)[:(8, 16, 32, 64, 128).index(g) + 1]) < 2000])
    assert picked[6:].count(2) <= early + 2000 // 200   # the first few, then one in 200
    assert picked[1000:].count(2) <= 1000 // 200 + 1    # under 1%: out of the 99th percentile


def test_an_estimate_taken_under_another_load_is_measured_again_at_once():
    """Batches of one ran under heavy load (one thread 30 ms a frame, two 36: one chosen), then a
    lone client on a quiet machine: the chosen team's own times fall to 10 ms within a few batches,
    and the other team, measured under the old load, is measured again then, not an exploring
    interval (here 150 batches) later."""
    team = TeamSize(2, trials=2, explore_every=200)
    run(team, 1, {1: 0.030, 2: 0.036}, 300)             # past the trials and the early explorations
    assert team.best(1) == 1
    picked = run(team, 1, {1: 0.010, 2: 0.008}, 30)     # quiet: two threads are faster
    assert picked.index(2) <= 10 and picked[-10:] == [2] * 10
    # ... and a load that stays the same does not trigger it: one in 200 explores, as before
    steady = run(team, 1, {1: 0.010, 2: 0.008}, 400)
    assert steady.count(1) <= 400 // 200 + 1


def test_a_much_slower_smaller_team_skips_the_early_explorations():
    """Sixteen frames on one thread take twice as long as on two: one such batch is the p99 of
    sixteen clients, so it is explored only one batch in explore_every, not after 8, 16, 32, ...;
    a smaller team close to the share (within COSTLY) keeps the early schedule."""
    team = TeamSize(2, trials=2, explore_every=200)
    picked = run(team, 16, {1: 0.010, 2: 0.005}, 200)
    assert picked[4:].count(1) == 0                     # 8, 16, 32, 64, 128 skipped
    picked = run(team, 16, {1: 0.010, 2: 0.005}, 200)
    assert 1 <= picked.count(1) <= 2                    # one in 200
    close = TeamSize(2, trials=2, explore_every=200)
    picked = run(close, 16, {1: 0.0065, 2: 0.005}, 200)
    assert picked[4:].count(1) >= 4                     # the early schedule
    # and when the load changes, the chosen team's own times send it to measure one thread at once
    picked = run(team, 16, {1: 0.010, 2: 0.030}, 30)
    assert picked[-10:] == [1] * 10
