"""``ssl_lightning.timing.interleaved_times``: the timing behind module choice, reports and benchmarks."""

from __future__ import annotations

import itertools
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from ssl_lightning.timing import interleaved_times

from .conftest import VirtualClock


def test_times_are_per_call_seconds_and_keep_the_order(virtual_clock: VirtualClock) -> None:
    calls = {"slow": 0, "fast": 0}

    def timed(key: str, seconds: float) -> Callable[[], None]:
        advance = virtual_clock.work(seconds)

        def f() -> None:
            calls[key] += 1
            advance()

        return f

    # powers of two: the clock's sums and the block sizes are exact
    slow, fast, block = 2.0**-9, 2.0**-11, 2.0**-7
    t = interleaved_times({"slow": timed("slow", slow), "fast": timed("fast", fast)}, 3, block_seconds=block)
    assert list(t) == ["slow", "fast"]
    assert t == {"slow": slow, "fast": fast}  # per call, not per block
    # blocks sized to block_seconds: 4 calls of the slow function, 16 of the fast one, in each of the 3 rounds
    assert calls["fast"] - calls["slow"] == 3 * (16 - 4)


class _ScriptedTimer:
    """torch's Timer as interleaved_times uses it, but each measurement is the next per-call time of a script:
    the first one sizes the blocks, then one per round (how load would disturb some blocks, made exact)."""

    scripts: ClassVar[dict[object, Iterator[float]]] = {}

    def __init__(self, stmt: str, globals: dict[str, Callable[[], object]], num_threads: int) -> None:
        self.f = globals["f"]

    def timeit(self, number: int) -> SimpleNamespace:
        for _ in range(number):
            self.f()
        return SimpleNamespace(median=next(self.scripts[self.f]))


def test_min_is_the_best_block_and_median_the_middle_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl_lightning.timing

    monkeypatch.setattr(ssl_lightning.timing, "Timer", _ScriptedTimer)
    blocks = [1e-3, 3e-3, 1.2e-3, 5e-3, 1.1e-3]  # rounds 2 and 4 disturbed by other load
    got: dict[str, float] = {}
    spreads: dict[str, float] = {}
    for stat in ("min", "median"):
        f = lambda: None  # noqa: E731
        _ScriptedTimer.scripts = {f: iter([1e-3, *blocks])}
        got[stat] = interleaved_times({"f": f}, 5, block_seconds=0.005, stat=stat, spreads=spreads)["f"]
        assert spreads["f"] == pytest.approx(0.2)  # median block 1.2 ms over the best 1 ms
    assert got == {"min": 1e-3, "median": 1.2e-3}


def test_calls_run_on_the_callers_thread_count() -> None:
    # torch.utils.benchmark.Timer runs on one thread unless told otherwise: every figure would be single-thread
    seen: list[int] = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        interleaved_times({"f": lambda: seen.append(torch.get_num_threads())}, 2, block_seconds=0.001)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {2}


def test_each_round_starts_one_function_later() -> None:
    # a function timed always right after the same other one would inherit its cache state every round
    order: list[str] = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    interleaved_times(fns, 3, block_seconds=1e-4)
    blocks = [k for k, _ in itertools.groupby(order)]  # consecutive calls of one function: one block
    # warm-up calls and sizing blocks in the given order, then the three rounds
    assert "".join(blocks) == "abc" + "abc" + "abc" + "bca" + "cab"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fns": {}}, "at least one function"),
        ({"rounds": 0}, "rounds must be >= 1, got 0"),
        ({"block_seconds": 0.0}, "block_seconds must be > 0, got 0.0"),
        ({"stat": "mean"}, "stat must be 'median' or 'min', got 'mean'"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"fns": {"f": lambda: None}, **kwargs}
    with pytest.raises(ValueError, match=message):
        interleaved_times(**args)  # type: ignore[arg-type]


SETTLE_PROBE = """
import resource, sys, torch
from ssl_lightning.timing import settle_allocator

def faults_per_call():  # four 12 MiB buffers live at once per call, freed together (a layer's outputs)
    out = []
    for _ in range(6):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        bufs = [torch.empty(12 * 2**18).fill_(1.0) for _ in range(4)]
        del bufs
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    return max(out[1:])  # the first call may grow the heap; the worst later call

before = faults_per_call()
settle_allocator()
print(before, faults_per_call())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the page-fault behaviour settled is glibc malloc's")
def test_settle_allocator_stops_page_faults_on_repeated_large_outputs() -> None:
    # a fresh process: the test process's allocator may already be settled by earlier tests
    res = subprocess.run([sys.executable, "-c", SETTLE_PROBE], capture_output=True, text=True, check=True)
    before, after = map(int, res.stdout.split())
    # unsettled, glibc's trim threshold is twice the largest block freed so far (24 MiB): the 48 MiB freed
    # together go back to the OS and are faulted in again on the next call (12,288 pages)
    assert before > 6000
    assert after < 100


def test_spread_measures_how_much_load_disturbed_the_blocks() -> None:
    from ssl_lightning.timing import spread

    assert spread([1.0, 1.0, 1.0]) == 0.0
    assert spread([1.0, 1.1, 2.0, 3.0, 1.05]) == pytest.approx(0.1)  # median 1.1 over best 1.0
    with pytest.raises(ValueError, match="at least one timing block"):
        spread([])
    got: dict[str, float] = {}
    interleaved_times({"a": lambda: None, "b": lambda: None}, 3, block_seconds=0.001, spreads=got)
    assert set(got) == {"a", "b"} and all(v >= 0 for v in got.values())  # every function's spread comes back


def test_a_disturbed_timing_is_reported_as_noisy_not_as_a_ratio() -> None:
    from ssl_lightning.report import CompactionReport, LayerComparison

    quiet = LayerComparison("conv1", "CompactConv2d", 10, 5, 100, 50, 2.0, 1.0, noise=0.05)
    loaded = LayerComparison("fc", "Linear", 10, 5, 100, 50, 7.8, 0.0093, noise=3.2)
    report = CompactionReport([quiet, loaded], 20, 10, 200, 100, 9.8, 1.0, "cpu", noise=0.4)
    md = report.to_markdown()
    assert "| 2.00x |" in md  # a trustworthy figure stays a plain ratio
    assert "838.71x (noisy: ±320 %, rerun on a quiet machine)" in md
    assert "9.80x (noisy: ±40 %" in md and report.metrics()["compaction/timing_noise"] == 0.4
