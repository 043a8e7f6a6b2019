"""Which implementation a CompactConv2d runs is decided where it runs: measured once per kind of input on the
first inference call (or by the cost model), never stored in plans or checkpoints; pins travel. Decisions are
asserted on deterministic stand-in timings, never on the wall-clock of real kernels."""

from __future__ import annotations

import copy
import io
import json
import pickle
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch
from torch import nn

import ssl_lightning.compaction.layers as layers
from ssl_lightning import CompactConv2d, apply_compaction_plan, compact, compaction_plan, ops
from ssl_lightning.compaction import kernel_choices, modeled_choice, pin_kernels, set_autotune
from ssl_lightning.timing import FASTEST_MARGIN, choose

from .test_compact_conv import _env, _runs_here, compiled

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def autotune() -> Iterator[None]:
    """The first-inference-call autotune, on (conftest turns it off for the rest of the suite)."""
    set_autotune(True)
    try:
        yield
    finally:
        set_autotune(False)


def machine(isa: str) -> AbstractContextManager[None]:
    """This process behaves as a CPU whose best kernel is ``isa`` (SSL_LIGHTNING_MAX_ISA)."""
    return _env("SSL_LIGHTNING_MAX_ISA", isa)


class StandInTimer:
    """Replaces ``fastest``: seconds per implementation from a table per kernel set (what ops.cpu_kernel()
    says the fused op runs), decided by the real ``choose``; records every call."""

    def __init__(self, table: dict[str, dict[str, float]], spread: float = 0.0) -> None:
        self.table, self.spread, self.calls = table, spread, []  # type: ignore[var-annotated]

    def __call__(self, fns, x, margin=FASTEST_MARGIN, *, spreads=None, block_seconds=0.02):  # type: ignore[no-untyped-def]
        kernel = ops.cpu_kernel(x.dtype)
        self.calls.append((kernel, tuple(x.shape), list(fns)))
        for fn in fns.values():  # every candidate still runs (and must work) on this machine
            fn(x)
        if spreads is not None:
            spreads.update({k: self.spread for k in fns})
        return choose({k: self.table[kernel][k] for k in fns}, margin)


# fused wins on the AVX-512 machine; on one without panel kernels the lowered fused op loses to the row-only conv
TABLE = {
    "avx512": {"dense": 1.0, "rows": 0.7, "fused": 0.3},
    "avx2": {"dense": 1.0, "rows": 0.7, "fused": 0.4},
    "onednn": {"dense": 1.0, "rows": 0.6, "fused": 0.99},
}


def sparse_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        net[2].weight[::2] = 0  # half the filters
        net[2].weight[:, :, 0] = 0  # a third of the taps
    return net.eval()


@compiled
@pytest.mark.skipif(not _runs_here("gather"), reason="needs a CPU with AVX-512F (the first machine of the test)")
def test_a_plan_made_on_one_machine_runs_on_another_and_is_re_decided(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    timer = StandInTimer(TABLE)
    monkeypatch.setattr(layers, "fastest", timer)
    x = torch.randn(2, 3, 10, 10)
    net = sparse_net()
    want = net(x)
    with machine("avx512"):
        fast = compact(net, x, channels=False)
        # measured here: the AVX-512 kernel wins, also on conv 0, which lost nothing (a weak dense kernel)
        assert kernel_choices(fast) == {"0": "fused", "2": "fused"}
    plan = json.loads(json.dumps(compaction_plan(fast)))
    assert plan["convs"]["2"]["impl"] == "auto"  # the structure travels, the choice does not
    torch.save(fast.state_dict(), tmp_path / "compact.pt")

    with machine("none"), torch.no_grad():  # another machine: no panel kernel, oneDNN lowered tiles
        fresh = apply_compaction_plan(sparse_net(), plan)
        fresh.load_state_dict(torch.load(tmp_path / "compact.pt", weights_only=True), strict=True)
        got = fresh(x)
        assert kernel_choices(fresh) == {"0": "dense", "2": "rows"}  # re-decided on this machine's timings
        assert timer.calls[-1] == ("onednn", (2, 16, 10, 10), ["dense", "rows", "fused"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with machine("avx2"), torch.no_grad():  # a third kernel set, in the same process: decided again
        torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)
        assert kernel_choices(fresh) == {"0": "fused", "2": "fused"} and timer.calls[-1][0] == "avx2"


def test_measured_once_per_kind_of_input_and_only_on_inference_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    timer = StandInTimer(dict.fromkeys(("avx512", "avx2", "onednn", "blas", "reference"), TABLE["avx512"]))
    monkeypatch.setattr(layers, "fastest", timer)
    conv = sparse_net()[2]
    mod = CompactConv2d.from_conv(conv)
    assert mod.impl == modeled_choice(0.5, mod.kept_work, True, ops.cpu_kernel()) and not timer.calls
    x = torch.randn(1, 16, 6, 6)
    mod(x)  # a training call (grad enabled): the cost model, no timing
    assert not timer.calls
    with torch.no_grad():
        mod(x), mod(x)
        assert len(timer.calls) == 1 and mod.impl == "fused"
        mod(torch.randn(3, 16, 6, 6))  # another batch size: measured again
        assert len(timer.calls) == 2
        set_autotune(False)
        mod(torch.randn(4, 16, 6, 6))  # autotune off: the cost model, no timing
        set_autotune(True)
        assert len(timer.calls) == 2
    for other in (copy.deepcopy(mod), pickle.loads(pickle.dumps(mod))):  # copies decide afresh
        with torch.no_grad():
            other(x)
    assert len(timer.calls) == 4


def test_disturbed_timing_falls_back_to_the_cost_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # a busy machine: the stand-in says rows wins, but the dense control's blocks spread 60 %
    timer = StandInTimer(dict.fromkeys(("avx512", "avx2", "onednn", "blas", "reference"), TABLE["onednn"]), 0.6)
    monkeypatch.setattr(layers, "fastest", timer)
    monkeypatch.setattr(layers, "_noisy_warned", False)
    mod = CompactConv2d.from_conv(sparse_net()[2])
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"other load disturbed the timing .* spread 60 %"):
        mod(torch.randn(1, 16, 6, 6))
    assert len(timer.calls) == 1
    assert mod.impl == modeled_choice(mod.kept_filters, mod.kept_work, True, ops.cpu_kernel())


def test_cost_model() -> None:
    for kernel in ("avx512", "avx2"):
        assert modeled_choice(1.0, 0.9, True, kernel) == "dense"  # 90 % of the MACs left
        assert modeled_choice(0.5, 0.5, False, kernel) == "rows"  # filters only
        assert modeled_choice(0.9, 0.7, True, kernel) == "fused"
    assert modeled_choice(0.9, 0.7, True, "onednn") == "dense"  # lowered tiles need a larger saving
    assert modeled_choice(0.6, 0.3, True, "cuda") == "fused"
    assert modeled_choice(1.0, 1.0, False, "avx512") == "dense"


def test_pins_travel_in_plans_and_choices_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layers, "fastest", StandInTimer(dict.fromkeys(("avx512", "avx2", "onednn"), TABLE["onednn"])))
    x = torch.randn(2, 3, 10, 10)
    net = sparse_net()
    fast = compact(net, x, channels=False)
    assert kernel_choices(fast) == {"2": "rows"}
    assert pin_kernels(fast) == {"2": "rows"}  # pinned to what it runs now
    plan = compaction_plan(fast)
    assert plan["convs"]["2"]["impl"] == "rows"
    fresh = apply_compaction_plan(sparse_net(), plan)
    fresh.load_state_dict(fast.state_dict())
    layer = fresh.get_submodule("2")
    assert isinstance(layer, CompactConv2d) and layer.pinned == "rows" and "impl=rows (pinned)" in repr(layer)
    assert pin_kernels(fresh, {"2": "fused"}) == {"2": "fused"}
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), net(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"choices must name every CompactConv2d of the model; not compacted layers "
                       r"of this model: \['0'\]; missing: \['2'\]"):  # fmt: skip
        pin_kernels(fresh, {"0": "fused"})
    with pytest.raises(ValueError, match="impl must be one of 'auto', 'fused', 'rows', 'dense', got 'fast'"):
        layer.pin("fast")  # type: ignore[arg-type]
    layer.pin("auto")
    assert layer.pinned is None


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_cache_of_the_dense_weight_follows_the_packed_weight(mode: str) -> None:
    conv = sparse_net()[2]
    mod = CompactConv2d.from_conv(conv, impl="dense")
    x = torch.randn(1, 16, 6, 6)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        torch.testing.assert_close(mod(x), conv(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an in-place update (an optimizer step) must reach the next inference call
        mod.weight.mul_(2)
        conv.weight.mul_(2)
        conv.bias.sub_(conv.bias)
        mod.bias.zero_()
    with ctx():
        torch.testing.assert_close(mod(x), conv(x), rtol=1e-5, atol=1e-5)
    mod.pin("rows")
    with ctx():
        torch.testing.assert_close(mod(x), conv(x), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # a layer built under inference mode holds inference tensors
        built = CompactConv2d.from_conv(conv, impl="dense")
        torch.testing.assert_close(built(x), conv(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(built.pin("rows")(x), conv(x), rtol=1e-5, atol=1e-5)


def test_checkpoints_of_the_per_choice_layouts_still_load() -> None:
    """tests/data/compact_v2.pt: a plan (version 2) and state dict written by the previous release, whose
    layers stored their weights in the layout of the implementation chosen then (rows, fused, dense)."""
    saved = torch.load(DATA / "compact_v2.pt", weights_only=True)
    assert saved["plan"]["version"] == 2
    assert {k: v["impl"] for k, v in saved["plan"]["convs"].items()} == {"0": "rows", "2": "fused", "4": "dense"}
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1, bias=False))  # fmt: skip
    apply_compaction_plan(fresh, saved["plan"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the saved weights are zero outside the structure: nothing is dropped
        fresh.load_state_dict(saved["state_dict"], strict=True)
    assert all(isinstance(fresh[i], CompactConv2d) and fresh[i].pinned is None for i in (0, 2, 4))
    for impl in ("fused", "rows", "dense"):  # every layout became the packed one: each implementation agrees
        pin_kernels(fresh, dict.fromkeys(("0", "2", "4"), impl))
        with torch.no_grad():
            torch.testing.assert_close(fresh(saved["input"]), saved["output"], rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    torch.save(fresh.state_dict(), buf)  # and saves in today's layout
    assert "4.conv.weight" not in fresh.state_dict() and fresh.state_dict()["0.weight"].dim() == 1


def test_weights_trained_outside_the_structure_are_dropped_with_a_warning() -> None:
    saved = torch.load(DATA / "compact_v2.pt", weights_only=True)
    sd = dict(saved["state_dict"])
    sd["4.conv.weight"] = sd["4.conv.weight"].clone()
    sd["4.conv.weight"][:, 0] = 1.0  # a removed column that trained after compaction (dense layout)
    fresh = apply_compaction_plan(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 8, 3, padding=1, bias=False)),
        saved["plan"],
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"CompactConv2d 4: the state dict has nonzero weights outside the kept"):
        fresh.load_state_dict(sd, strict=True)


def test_no_timing_under_a_flop_counter_or_a_recorder(monkeypatch: pytest.MonkeyPatch) -> None:
    """A FLOP counter (a dispatch mode) or a graph recorder (a function mode) watching the first call would
    count or record the timing runs as the model's own work: the cost model decides there, untimed."""
    from torch.utils.flop_counter import FlopCounterMode

    timer = StandInTimer(dict.fromkeys(("avx512", "avx2", "onednn", "blas", "reference"), TABLE["avx512"]))
    monkeypatch.setattr(layers, "fastest", timer)
    mod = CompactConv2d.from_conv(sparse_net()[2])
    x = torch.randn(1, 16, 6, 6)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        mod(x)
    assert not timer.calls
    assert counter.get_total_flops() <= 2 * 32 * 16 * 9 * 36  # at most one dense run, not the timing rounds
    with torch.no_grad():
        mod(x)  # unwatched: measured now
    assert len(timer.calls) == 1


@pytest.mark.parametrize(
    ("faster", "noisy", "kept"), [("exact", False, 3), ("rounded", False, 8), ("rounded", True, 3)]
)
def test_align_auto_keeps_the_channel_count_its_layers_run_faster(
    monkeypatch: pytest.MonkeyPatch, faster: str, noisy: bool, kept: int
) -> None:
    """align="auto": per channel space, the exact count or the one rounded up to 8, by timing the space's
    producer and consumer at both widths (stand-in timings here); without measurement, or when other load
    disturbed the exact count's timing blocks (spread > NOISE_LIMIT), the cost model."""
    import ssl_lightning.compaction.channels as channels
    from ssl_lightning.compaction import compact_with_info
    from ssl_lightning.timing import NOISE_LIMIT

    def stand_in(fns, rounds=5, spreads=None, **kw):  # type: ignore[no-untyped-def]
        for f in fns.values():
            f()  # the stand-in layers of both widths run
        exact, rounded = sorted(fns)
        if spreads is not None:
            spreads.update({exact: 2 * NOISE_LIMIT if noisy else 0.01, rounded: 0.01})
        return {exact: 1.0 if faster == "rounded" else 0.5, rounded: 0.5 if faster == "rounded" else 1.0}

    monkeypatch.setattr(channels, "interleaved_times", stand_in)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.Conv2d(20, 16, 5)).eval()
    with torch.no_grad():
        net[0].weight[3:] = 0  # 3 of 20 filters learned
        net[0].bias[3:] = 0
    x = torch.randn(2, 1, 16, 16)
    info = compact_with_info(net, x, channels=True, shapes=False)
    assert info.model[0].out_channels == kept and info.model[2].in_channels == kept
    torch.testing.assert_close(info.model(x), net(x), rtol=1e-4, atol=1e-5)
    unmeasured = compact_with_info(net, x, measure=False, shapes=False)
    assert unmeasured.model[0].out_channels == 3  # the cost model: 5 extra channels are more than 25 % of 3
    assert channels.modeled_count(30, 32) == 32 and channels.modeled_count(3, 8) == 3
    with pytest.raises(ValueError, match="align must be 'auto' or an integer >= 1, got 0"):
        compact_with_info(net, x, align=0)


def test_bad_choice_arguments_are_clear_errors() -> None:
    import ssl_lightning.compaction.channels as channels
    from ssl_lightning import StructuredSparsity

    conv = sparse_net()[2]
    with pytest.raises(ValueError, match=r"align must be a positive int \(filters per group of the row-only conv\), "
                       r"got 0"):  # fmt: skip
        CompactConv2d.from_conv(conv, align=0)
    with pytest.raises(TypeError, match=r"set_autotune\(enabled\) takes a bool, got 'yes'"):
        set_autotune("yes")  # type: ignore[arg-type]
    plan = compaction_plan(nn.Sequential(CompactConv2d.from_conv(conv)))
    plan["convs"]["0"]["impl"] = "fastest"
    with pytest.raises(ValueError, match="compaction plan for '0': impl must be auto, fused, rows or dense, got "
                       "'fastest'"):  # fmt: skip
        apply_compaction_plan(nn.Sequential(sparse_net()[2]), plan)
    with pytest.raises(ValueError, match="compact_align must be 'auto' or an int >= 1, got 0"):
        StructuredSparsity({"filter": 0.1}, compact_align=0)
    with pytest.raises(ValueError, match="counts must be 'fixed', 'modeled' or 'measured', got 'exact'"):
        channels.plan_channel_removal(sparse_net(), [(torch.randn(1, 3, 6, 6),)], lambda m, t: m(*t),
                                      counts="exact")  # type: ignore[arg-type]  # fmt: skip
