"""The interleaved timer every benchmark uses: medians per candidate, and the cap on a slow candidate's time."""

import pytest

from dynconv.bench import timing


class FakeClock:
    """``time.perf_counter`` that only moves when a candidate says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _candidates(clock, calls, costs):
    def make(name):
        def fn():
            calls[name] += 1
            clock.now += costs[name][min(calls[name], len(costs[name])) - 1]

        return fn

    return {name: make(name) for name in costs}


def test_median_over_rounds_and_slow_candidate_capped(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    calls = {"fast": 0, "slow": 0}
    # per call: warm-up first, then the timed runs (the fast one has an outlier), then peak_memory's call
    costs = {"fast": [9.0, 1.0, 3.0, 2.0, 15.0, 2.0, 2.0], "slow": [99.0, 10.0, 12.0, 11.0, 10.0, 10.0, 10.0]}
    result = timing.measure_interleaved(_candidates(clock, calls, costs), "cpu", repeats=5, time_cap_s=25.0)
    # the fast one: median of 1, 3, 2, 15, 2 (they add up to 23, under the cap); the warm-up is not timed
    assert result["fast"].runs == 5 and result["fast"].median_s == 2.0
    # 10 + 12 = 22 <= 25, so a third run (11) happens; 33 > 25, so the slow one sits out rounds 4 and 5
    assert result["slow"].runs == 3 and result["slow"].median_s == 11.0
    assert calls == {"fast": 1 + 5 + 1, "slow": 1 + 3 + 1}  # + the untimed peak-memory call each


def test_no_cap_runs_every_round(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    calls = {"slow": 0}
    result = timing.measure_interleaved(_candidates(clock, calls, {"slow": [100.0]}), "cpu", 4, time_cap_s=None)
    assert result["slow"].runs == 4 and result["slow"].median_s == 100.0


def test_a_candidate_over_the_cap_still_gets_one_timed_run(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    calls = {"slow": 0}
    result = timing.measure_interleaved(_candidates(clock, calls, {"slow": [500.0]}), "cpu", 5, time_cap_s=1.0)
    assert result["slow"].runs == 1 and result["slow"].median_s == 500.0


def test_repeats_must_be_positive():
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        timing.measure_interleaved({"f": lambda: None}, "cpu", 0)
