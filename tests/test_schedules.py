"""Schedules are pure functions of the clock; bad phase specs are rejected with clear messages."""

from __future__ import annotations

import pytest

from ssl_lightning.schedules import PhaseSchedule, lambda_factor


def test_phases_and_lambda_factors() -> None:
    s = PhaseSchedule.from_intervals({"dense": [0, 2], "ssl": [2, 6], "finetune": [6, None]})
    assert [s.phase_at(t) for t in range(8)] == ["dense"] * 2 + ["ssl"] * 4 + ["finetune"] * 2
    assert [lambda_factor(s, t) for t in range(8)] == [0, 0, 1, 1, 1, 1, 0, 0]
    assert [lambda_factor(s, t, "warmup", 2) for t in range(2, 6)] == [0.5, 1, 1, 1]
    assert [lambda_factor(s, t, "ramp") for t in range(2, 7)] == [0.25, 0.5, 0.75, 1.0, 0.0]
    open_ended = PhaseSchedule.from_intervals({"ssl": [0, None]}, unit="step")
    assert open_ended.phase_at(10**9) == "ssl" and open_ended.unit == "step"


@pytest.mark.parametrize(
    ("phases", "match"),
    [
        ({"dense": [0, 3], "ssl": [2, 6]}, r"dense and ssl overlap \(dense ends at 3, ssl starts at 2\)"),
        ({"ssl": [0, 4], "finetune": [3, None]}, r"ssl and finetune overlap"),
        ({"ssl": [0, None], "finetune": [5, None]}, r"ssl and finetune overlap \(ssl ends at None"),
        ({"dense": [0, 2], "ssl": [3, 6]}, r"gap between dense \(ends 2\) and ssl \(starts 3\)"),
        ({"ssl": [1, 4]}, r"the first phase \(ssl\) must start at 0, got 1"),
        ({"ssl": [4, 4]}, r"phases\['ssl'\]: end must be None or an int > start, got \[4, 4\]"),
        ({"dense": [0, 2]}, r"an 'ssl' interval is required"),
        ({"ssl": [0, 2], "prune": [2, 3]}, r"unknown phase 'prune'; allowed: dense, ssl, finetune"),
        ({"ssl": [0, 2], "finetune": [2, 5]}, r"finetune runs until training stops"),
        ({"ssl": (0,)}, r"phases\['ssl'\] must be \[start, end\]"),
    ],
)
def test_bad_phases(phases, match) -> None:
    with pytest.raises(ValueError, match=match):
        PhaseSchedule.from_intervals(phases)


def test_bad_lambda_schedule() -> None:
    s = PhaseSchedule.from_intervals({"ssl": [0, None]})
    with pytest.raises(ValueError, match="'ramp' needs an SSL phase with an end"):
        lambda_factor(s, 0, "ramp")
    with pytest.raises(ValueError, match="lambda schedule must be one of"):
        lambda_factor(s, 0, "cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unit must be 'step' or 'epoch', got 'batch'"):
        PhaseSchedule(unit="batch")  # type: ignore[arg-type]
