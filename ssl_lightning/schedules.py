"""Schedules: pure functions of the training clock (optimizer step or epoch).

Phases (half-open intervals ``[start, end)`` of the clock):
    dense     train normally (optional, must start at 0)
    ssl       train with group-lasso regularization
    finetune  starts where ssl ends: groups are pruned once at its start, masks stay frozen, λ = 0
The prune event happens at the end of ``ssl``; an ``ssl`` phase with no end never prunes.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = ["LAMBDA_SCHEDULES", "Phase", "PhaseSchedule", "lambda_factor"]

Phase: TypeAlias = Literal["dense", "ssl", "finetune"]
Unit: TypeAlias = Literal["step", "epoch"]
LambdaKind: TypeAlias = Literal["constant", "warmup", "ramp"]
LAMBDA_SCHEDULES: tuple[str, ...] = ("constant", "warmup", "ramp")
_ORDER: tuple[Phase, ...] = ("dense", "ssl", "finetune")


@dataclass(frozen=True)
class PhaseSchedule:
    """Phase boundaries on the training clock. ``ssl_end`` None: SSL until training stops."""

    ssl_start: int = 0
    ssl_end: int | None = None
    unit: Unit = "epoch"

    def __post_init__(self) -> None:
        if self.unit not in ("step", "epoch"):
            raise ValueError(f"unit must be 'step' or 'epoch', got {self.unit!r}")
        if self.ssl_start < 0:
            raise ValueError(f"phases: ssl must start at or after 0, got {self.ssl_start}")
        if self.ssl_end is not None and self.ssl_end <= self.ssl_start:
            raise ValueError(
                f"phases: ssl must end after it starts, got [{self.ssl_start}, {self.ssl_end}); "
                "give ssl as [start, end) with end > start, or end None for no pruning"
            )

    @classmethod
    def from_intervals(cls, phases: Mapping[str, Sequence[int | None]], unit: Unit = "epoch") -> PhaseSchedule:
        """Build from ``{"dense": [0, 2], "ssl": [2, 10], "finetune": [10, None]}``; validates that
        names are known, intervals are well formed, in order, neither overlapping nor leaving gaps."""
        for name in phases:
            if name not in _ORDER:
                raise ValueError(f"phases: unknown phase {name!r}; allowed: {', '.join(_ORDER)}")
        if "ssl" not in phases:
            raise ValueError("phases: an 'ssl' interval is required, e.g. {'ssl': [0, None]}")
        spans: list[tuple[str, int, int | None]] = []
        for name in _ORDER:
            if name not in phases:
                continue
            iv = phases[name]
            if not isinstance(iv, Sequence) or len(iv) != 2 or not isinstance(iv[0], int):
                raise ValueError(f"phases[{name!r}] must be [start, end] with int start and int|None end, got {iv!r}")
            start, end = iv[0], iv[1]
            if end is not None and (not isinstance(end, int) or end <= start):
                raise ValueError(f"phases[{name!r}]: end must be None or an int > start, got [{start}, {end}]")
            spans.append((name, start, end))
        if spans[0][1] != 0:
            raise ValueError(f"phases: the first phase ({spans[0][0]}) must start at 0, got {spans[0][1]}")
        for (a, _, a_end), (b, b_start, _) in itertools.pairwise(spans):
            if a_end is None or a_end > b_start:
                raise ValueError(
                    f"phases: {a} and {b} overlap ({a} ends at {a_end}, {b} starts at {b_start}); "
                    f"end {a} where {b} starts"
                )
            if a_end < b_start:
                raise ValueError(f"phases: gap between {a} (ends {a_end}) and {b} (starts {b_start})")
        if "finetune" in phases and phases["finetune"][1] is not None:
            raise ValueError("phases: finetune runs until training stops; give its end as None")
        _, ssl_start, ssl_end = next(span for span in spans if span[0] == "ssl")
        return cls(ssl_start=ssl_start, ssl_end=ssl_end, unit=unit)

    def phase_at(self, t: int) -> Phase:
        if t < self.ssl_start:
            return "dense"
        if self.ssl_end is None or t < self.ssl_end:
            return "ssl"
        return "finetune"


def lambda_factor(schedule: PhaseSchedule, t: int, kind: LambdaKind = "constant", warmup: int = 0) -> float:
    """Multiplier of every λ at clock ``t``: 0 outside SSL; in SSL 1 (constant), a linear rise over
    ``warmup`` clock units (warmup), or a linear rise over the whole SSL phase (ramp)."""
    if schedule.phase_at(t) != "ssl":
        return 0.0
    k = t - schedule.ssl_start + 1  # 1-based position inside SSL, so the first SSL step already regularizes
    if kind == "constant":
        return 1.0
    if kind == "warmup":
        return 1.0 if warmup <= 0 else min(1.0, k / warmup)
    if kind == "ramp":
        if schedule.ssl_end is None:
            raise ValueError("lambda schedule 'ramp' needs an SSL phase with an end; use 'warmup' instead")
        return min(1.0, k / (schedule.ssl_end - schedule.ssl_start))
    raise ValueError(f"lambda schedule must be one of {LAMBDA_SCHEDULES}, got {kind!r}")


PRUNE_SCHEDULES: tuple[str, ...] = ("one_shot", "iterative", "gradual")


def sparsity_target(
    schedule: PhaseSchedule,
    t: int,
    final: float,
    kind: str = "one_shot",
    *,
    cycles: int = 3,
    frequency: int = 1,
    initial: float = 0.0,
) -> float:
    """Fraction of groups pruned at clock ``t`` (magnitude pruning, :mod:`ssl_lightning.methods.granularity`).

    The pruning window is the ``ssl`` phase [t0, t1); fine-tuning (from t1) holds ``final``.
        one_shot   0 before t1, ``final`` from t1 (prune once at the boundary).
        iterative  ``cycles`` prune → fine-tune cycles: at t0 + k·(t1 − t0)/cycles (k = 0..cycles−1) the target
                   becomes 1 − (1 − final)^((k+1)/cycles), the same fraction of what is left each time.
        gradual    Zhu & Gupta (2017): s(t) = final + (initial − final)·(1 − (t − t0)/(t1 − t0))³, updated every
                   ``frequency`` clock units from t0 and reaching ``final`` at t1.
    """
    if kind not in PRUNE_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, PRUNE_SCHEDULES))}, got {kind!r}")
    if schedule.ssl_end is None:
        raise ValueError("a pruning schedule needs an 'ssl' phase with an end, e.g. phases={'ssl': [0, 10]}")
    t0, t1 = schedule.ssl_start, schedule.ssl_end
    if t >= t1:
        return final
    if t < t0:
        return 0.0
    if kind == "one_shot":
        return 0.0
    if kind == "iterative":
        k = (t - t0) * cycles // (t1 - t0)  # the cycle t is in
        return 1.0 - (1.0 - final) ** ((k + 1) / cycles)
    step = (t - t0) // frequency * frequency  # the last update at or before t
    return final + (initial - final) * (1.0 - step / (t1 - t0)) ** 3
