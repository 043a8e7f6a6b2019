"""Side-by-side wall-clock timing: the one helper behind every dense-vs-compacted figure (module choice,
reports, demo, benchmarks), so they all measure the same way."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from typing import Literal, TypeVar

import torch
from torch.utils.benchmark import Timer

K = TypeVar("K")


def interleaved_times(
    fns: Mapping[K, Callable[[], object]],
    rounds: int = 5,
    *,
    block_seconds: float = 0.05,
    stat: Literal["median", "min"] = "median",
) -> dict[K, float]:
    """Seconds per call of each function, measured side by side on the current thread count.

    Each function is called once to warm up (oneDNN primitive caches, the allocator) and once to size its
    timing block to about ``block_seconds``; then ``rounds`` rounds each time one block of every function
    in turn, so all of them see the same machine state. Per function: the median block (``stat="median"``)
    or the best one (``"min"``: least disturbed by other load; a block can only be slowed by interference).
    """
    if not fns:
        raise ValueError("interleaved_times needs at least one function to time")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not block_seconds > 0:
        raise ValueError(f"block_seconds must be > 0, got {block_seconds}")
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
    # Timer defaults to one thread; time with the threads the caller runs with
    timers = {k: Timer("f()", globals={"f": f}, num_threads=torch.get_num_threads()) for k, f in fns.items()}
    for f in fns.values():
        f()
    number = {k: max(1, int(block_seconds / max(t.timeit(1).median, 1e-7))) for k, t in timers.items()}
    samples: dict[K, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, t in timers.items():
            samples[k].append(t.timeit(number[k]).median)
    reduce = min if stat == "min" else statistics.median
    return {k: reduce(v) for k, v in samples.items()}
