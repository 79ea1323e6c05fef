"""benchmarks/bench_decode_attention.py's sweep: every configuration timed in each of several passes, in order."""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    pytest.importorskip("triton")  # the script imports the decode kernel's module, which needs it
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_decode_attention

    return bench_decode_attention


def test_each_round_sets_every_configuration_before_timing_it(bench):
    knobs = {"BLOCK": None}
    timed_with = []

    def time_us() -> float:
        timed_with.append(knobs["BLOCK"])
        return {1: [9.0, 3.0], 2: [5.0, 6.0]}[knobs["BLOCK"]][len(timed_with) > 2]

    times = bench.timed_rounds([(1,), (2,)], lambda config: knobs.update(BLOCK=config[0]), time_us, rounds=2)
    assert timed_with == [1, 2, 1, 2]
    assert times == [[9.0, 3.0], [5.0, 6.0]]
    # The sweep's least per configuration: a slow first timing of the first configuration no longer decides.
    assert [min(t) for t in times] == [3.0, 5.0]


def test_one_round_times_each_configuration_once(bench):
    calls = []
    times = bench.timed_rounds([(1,), (2,), (3,)], calls.append, lambda: float(len(calls)), rounds=1)
    assert calls == [(1,), (2,), (3,)] and times == [[1.0], [2.0], [3.0]]
