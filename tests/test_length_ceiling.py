"""bench/length_ceiling.py: the slot model's FCFS and SRPT schedules, worked by hand."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from length_ceiling import arrival_times, ceiling, latencies  # noqa: E402


def test_one_slot_all_at_once():
    # FCFS runs the 3-token answer first (done at 3), then the 1-token one (done at 4);
    # SRPT the other way round: 1 and 4
    assert latencies([3, 1], [0, 0], 1, "fcfs") == [3, 4]
    assert latencies([3, 1], [0, 0], 1, "srpt") == [4, 1]


def test_srpt_parks_a_long_answer_for_a_short_arrival():
    # one slot; a 5-token answer at 0, a 1-token one arriving at step 2: FCFS makes it wait for
    # the long one (done at step 6, latency 4), SRPT runs it at once (latency 1), the long one ends at 6
    assert latencies([5, 1], [0, 2], 1, "fcfs") == [5, 4]
    assert latencies([5, 1], [0, 2], 1, "srpt") == [6, 1]


def test_slots_run_side_by_side_and_idle_gaps_are_skipped():
    assert latencies([2, 2, 2], [0, 0, 0], 2, "fcfs") == [2, 2, 4]
    assert latencies([1, 1], [0, 10], 1, "srpt") == [1, 1]  # nothing runs between 1 and 10


def test_ceiling_ratio_and_arrivals():
    result = ceiling([100, 1, 1, 1], [0, 0, 0, 0], 1, 0.5)
    # FCFS: 100, 101, 102, 103 (mean 101.5); SRPT: 1, 2, 3, 103 (mean 27.25)
    assert result["fcfs_mean_steps"] == 101.5 and result["srpt_mean_steps"] == 27.25
    assert result["mean_speedup"] == pytest.approx(101.5 / 27.25)
    assert arrival_times(3, math.inf, 0) == [0.0, 0.0, 0.0]
    times = arrival_times(1000, 4.0, 0)
    assert times == sorted(times) and times == arrival_times(1000, 4.0, 0)
    assert times[-1] / 999 == pytest.approx(0.25, rel=0.1)  # mean gap 1/rate


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError):
        latencies([1], [0], 1, "lifo")
