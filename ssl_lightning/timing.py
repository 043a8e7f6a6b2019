"""Side-by-side wall-clock timing: the one helper behind every dense-vs-compacted figure (module choice,
reports, demo, benchmarks), so they all measure the same way, in the allocator's steady state; and
:func:`fastest`, the timed choice between implementations of one layer."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from functools import partial
from typing import Literal, TypeVar

import torch
from torch import Tensor
from torch.utils.benchmark import Timer

K = TypeVar("K")

# glibc malloc maps blocks at or above its mmap threshold afresh and unmaps them on free, and returns the
# top of its heap to the OS whenever more than its trim threshold is free there. Both thresholds start at
# 128 KiB and rise (trim: to twice the mmap one) only with the largest mmapped block freed so far (at most
# 32 MiB), so a call that allocates and frees a few large buffers can have them faulted in again on every
# call. Measured: AlexNet conv1 at batch 16 (18 MiB output) runs F.conv2d in 30-33 ms with 9,077 page
# faults per call in a fresh process, 18-19 ms with none once one 31 MiB block has been freed.
_SETTLE_BYTES = 31 * 2**20


def settle_allocator() -> None:
    """Put glibc's malloc in the steady state a long-running process reaches: free one untouched 31 MiB
    block (no page is written), which raises the mmap threshold to 31 MiB and the trim threshold to 62 MiB,
    so tensors up to that size are reused from the heap instead of being mapped and faulted in on every
    call. The thresholds only ever rise, so this is what any program that once frees such a block gets;
    with other allocators it is a harmless allocate-and-free.
    Call it once in an inference process (or use jemalloc / tcmalloc); ``interleaved_times`` calls it.
    """
    torch.empty(_SETTLE_BYTES, dtype=torch.uint8)  # allocated and freed at once


def interleaved_times(
    fns: Mapping[K, Callable[[], object]],
    rounds: int = 5,
    *,
    block_seconds: float = 0.05,
    stat: Literal["median", "min"] = "median",
    spreads: dict[K, float] | None = None,
) -> dict[K, float]:
    """Seconds per call of each function, measured side by side on the current thread count.

    The allocator is settled first (:func:`settle_allocator`), so no function is charged for page faults
    that a long-running process would not see. Each function is called once to warm up (oneDNN primitive
    caches) and once to size its timing block to about ``block_seconds``; then ``rounds`` rounds each time
    one block of every function in turn, so all of them see the same machine state. The order turns by one
    function each round, so no function always follows the same other one (whose cache footprint, freed
    memory or heat it would inherit). Per function: the median block (``stat="median"``) or the best one
    (``"min"``: least disturbed by other load; a block can only be slowed by interference). ``spreads``, when
    given, receives each function's :func:`spread` (how much load disturbed its blocks).
    """
    if not fns:
        raise ValueError("interleaved_times needs at least one function to time")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not block_seconds > 0:
        raise ValueError(f"block_seconds must be > 0, got {block_seconds}")
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
    settle_allocator()
    # Timer defaults to one thread; time with the threads the caller runs with
    timers = {k: Timer("f()", globals={"f": f}, num_threads=torch.get_num_threads()) for k, f in fns.items()}
    for f in fns.values():
        f()
    number = {k: max(1, int(block_seconds / max(t.timeit(1).median, 1e-7))) for k, t in timers.items()}
    samples: dict[K, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            samples[k].append(timers[k].timeit(number[k]).median)
    reduce = min if stat == "min" else statistics.median
    if spreads is not None:
        spreads.update({k: spread(v) for k, v in samples.items()})
    return {k: reduce(v) for k, v in samples.items()}


# Above this spread (median block over best block − 1) a timing was disturbed by other load: a ratio from it
# is reported as noisy instead of as a figure.
NOISE_LIMIT = 0.25


def spread(blocks: list[float]) -> float:
    """How disturbed a series of timing blocks was: median / min − 1 (0 on a quiet machine; a block can only
    be slowed by interference, so the best block is the undisturbed time)."""
    if not blocks:
        raise ValueError("spread needs at least one timing block")
    best = min(blocks)
    return statistics.median(blocks) / best - 1.0 if best > 0 else float("inf")


# A candidate replaces the baseline (the first module given to `fastest`) only when it measures at least this
# much faster: best-of-5 timings of the same F.conv2d still differ by a few percent here, and a close call
# decided by noise could leave a layer slower than the dense conv it replaces.
FASTEST_MARGIN = 0.03


def fastest(
    mods: Mapping[K, Callable[[Tensor], object]],
    x: Tensor,
    margin: float = FASTEST_MARGIN,
    *,
    spreads: dict[K, float] | None = None,
    block_seconds: float = 0.02,
) -> K:
    """The key of the module (or function of ``x``) that runs ``x`` fastest: five interleaved rounds of
    ``block_seconds`` blocks (20 ms), each module's best block (robust to the machine's load changing meanwhile; see
    ``interleaved_times``). The first key is the baseline: another key wins only when it is at least ``margin``
    faster than it. ``spreads``, when given, receives each key's :func:`spread` (the caller's noise control)."""
    if not mods:
        raise ValueError("fastest needs at least one module to time")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    with torch.inference_mode():
        best = interleaved_times(
            {k: partial(m, x) for k, m in mods.items()}, 5, block_seconds=block_seconds, stat="min", spreads=spreads
        )
    return choose(best, margin)


def choose(times: Mapping[K, float], margin: float = FASTEST_MARGIN) -> K:
    """The decision of :func:`fastest` on measured ``times`` (seconds per call; the first key is the baseline):
    the fastest key if it beats the baseline by at least ``margin``, else the baseline."""
    if not times:
        raise ValueError("choose needs at least one timing")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    baseline = next(iter(times))
    winner = min(times, key=times.__getitem__)
    return winner if times[winner] <= (1.0 - margin) * times[baseline] else baseline
