"""Regression tests for the defects an outside probe found (issue 12); each names the defect it pins down.

Every test here failed on commit 97eb41e, except the two that pin a boundary the fix must keep (the
fake kernel's shape at the edge, and the SSL phase's NaN check, which existed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ssl_lightning import CompactConv2d, ops
from ssl_lightning._ext import has_compiled_ops

from .test_compact_conv import _bad, _env, case

compiled = pytest.mark.skipif(not has_compiled_ops(), reason="ssl_lightning._C not built")


def _pruned_conv(bias: bool = True, dtype: torch.dtype = torch.float32, cols: bool = False) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 16, 3, bias=bias).to(dtype)
    with torch.no_grad():
        conv.weight[8:] = 0
        if cols:
            conv.weight[:, 1, 0] = 0
    return conv


# ---------------------------------------------------------------------------------------------- defect 1
@pytest.mark.parametrize("grad", [False, True])
def test_rows_impl_never_writes_into_its_bias(grad: bool) -> None:
    """Batch 1 with a 1x1 output: the bias-filled output must be a new tensor, not the bias parameter."""
    conv = _pruned_conv()
    m = CompactConv2d.from_conv(conv, impl="rows").eval()
    before = m.bias.detach().clone()
    x = torch.randn(1, 4, 3, 3)
    with torch.set_grad_enabled(grad):
        for _ in range(2):
            torch.testing.assert_close(m(x), conv(x))
    assert torch.equal(m.bias.detach(), before)


# ---------------------------------------------------------------------------------------------- defect 2
@compiled
@pytest.mark.parametrize("gemm", ["blas", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lowered_tile_path_without_bias_runs_under_autograd_on_several_threads(gemm: str, dtype: torch.dtype) -> None:
    """batch * groups >= threads > 1 puts ATen GEMMs on pool threads: they must see the caller's dispatch state."""
    conv = _pruned_conv(bias=False, dtype=dtype, cols=True)
    m = CompactConv2d.from_conv(conv, impl="fused")
    x = torch.randn(4, 4, 8, 8, dtype=dtype, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _env("SSL_LIGHTNING_GEMM", gemm):
            y = m(x)
            y.sum().backward()
    finally:
        torch.set_num_threads(threads)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(y, conv(x), **tol)
    assert x.grad is not None and m.weight.grad is not None


# ---------------------------------------------------------------------------------------------- defect 4
@compiled
def test_strided_and_expanded_index_lists_give_the_right_answer() -> None:
    x, wc, ri, rp, ci, cp, b, *rest = case(8)
    want = ops.compact_conv2d_reference(x, wc, ri, rp, ci, cp, b, *rest, False)
    strided_ci = torch.stack([ci, torch.full_like(ci, -7)], 1).flatten()[::2]  # a view with stride 2
    assert strided_ci.stride() == (2,)
    got = torch.ops.ssl_lightning.compact_conv2d(x, wc, ri, rp, strided_ci, cp, b, *rest, False)
    torch.testing.assert_close(got, want)
    strided_ri = torch.stack([ri, ri], 1).flatten()[::2]
    got = torch.ops.ssl_lightning.compact_conv2d(x, wc, strided_ri, rp, ci, cp, b, *rest, False)
    torch.testing.assert_close(got, want)


@compiled
@pytest.mark.parametrize(
    ("change", "match"),
    [
        # stride 0 (expanded): read as if contiguous, the kernel ran past the one stored element
        ({"col_idx": torch.tensor([5]).expand(36)}, r"column index 5 appears twice in group 0"),
        ({"col_idx": None}, r"column index \d+ appears twice in group 0"),
        ({"row_idx": None}, r"row index \d+ appears twice"),
        ({"row_idx": "meta"}, r"row_idx is on meta; index lists must be on the CPU or on the input's device"),
        ({"col_ptr": "meta"}, r"col_ptr is on meta"),
    ],
)
def test_invalid_index_lists_are_refused(change: dict, match: str) -> None:
    _x, _wc, ri, _rp, ci, cp, *_ = case(8)
    ((key, value),) = change.items()
    if isinstance(value, torch.Tensor):
        pass
    elif isinstance(value, str):
        value = {"row_idx": ri, "col_ptr": cp}[key].to("meta")
    elif value is None:  # the group's first entry repeated in place of its second
        value = (ci if key == "col_idx" else ri).clone()
        value[1] = value[0]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.ssl_lightning.compact_conv2d(*_bad(**{key: value}))


# ---------------------------------------------------------------------------------------------- defect 5
@compiled
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_input_smaller_than_kernel_is_refused_by_real_and_fake_kernel(stride: int) -> None:
    x = torch.ones(2, 8, 2, 2)
    args = _bad(input=x, padding=[0, 0], stride=[stride, stride])
    with pytest.raises(RuntimeError):  # as F.conv2d does
        F.conv2d(x, torch.ones(12, 4, 3, 3), groups=2, stride=stride)
    with pytest.raises(RuntimeError, match="is smaller than the dilated kernel"):
        torch.ops.ssl_lightning.compact_conv2d(*args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError, match="is smaller than the dilated kernel"):
            torch.ops.ssl_lightning.compact_conv2d(*fake)


@compiled
def test_fake_kernel_shape_matches_the_real_one_at_the_edge() -> None:
    """Input exactly the dilated kernel's size with stride 2: one output position, in both kernels."""
    args = _bad(input=torch.randn(2, 8, 3, 3), padding=[0, 0], stride=[2, 2])
    real = torch.ops.ssl_lightning.compact_conv2d(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.ssl_lightning.compact_conv2d(
            *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        )
    assert tuple(fake.shape) == tuple(real.shape) == (2, 12, 1, 1)


@compiled
@pytest.mark.parametrize("key", ["stride", "dilation", "padding", "kernel_size"])
def test_huge_geometry_values_are_refused_before_any_arithmetic(key: str) -> None:
    with pytest.raises(RuntimeError, match=r"must be at most 2\^31"):
        torch.ops.ssl_lightning.compact_conv2d(*_bad(**{key: [2**62, 1]}))


# ---------------------------------------------------------------------------------------------- defect 9
@compiled
@pytest.mark.parametrize("compact_output", [False, True])
def test_double_backward_through_the_fused_op(compact_output: bool) -> None:
    x, wc, ri, rp, ci, cp, b, *rest = case(5, n=2, groups=2, dtype=torch.float64)
    x.requires_grad_(), wc.requires_grad_(), b.requires_grad_()

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.ops.ssl_lightning.compact_conv2d(x, w, ri, rp, ci, cp, b, *rest, compact_output)

    assert torch.autograd.gradgradcheck(f, (x, wc, b))
    # a gradient penalty (the common second-order use) reaches the weight
    (gx,) = torch.autograd.grad(f(x, wc, b).square().sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.square().sum(), wc)
    assert gw.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- defect 6
class _TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_compact_refuses_to_verify_non_finite_outputs_and_keeps_train_mode(bad: float) -> None:
    from ssl_lightning import CompactionError, compact

    model = _TwoConvs().train()
    with torch.no_grad():
        model.conv1.weight[4:] = 0
        model.conv2.bias[0] = bad
    with pytest.raises(CompactionError, match="non-finite values"):
        compact(model, torch.randn(2, 3, 8, 8), measure=False)
    assert model.training and all(m.training for m in model.modules())


def test_compact_failure_leaves_the_model_in_the_mode_it_was_given() -> None:
    from ssl_lightning import compact

    model = _TwoConvs().train()
    with pytest.raises(RuntimeError):  # wrong input channels: the model itself fails on the example
        compact(model, torch.randn(2, 5, 8, 8), measure=False)
    assert model.training


def test_verify_sees_a_compacted_output_that_turns_nan() -> None:
    from ssl_lightning.compaction.stages import _max_error

    want = torch.tensor([1.0, float("inf"), float("nan")])
    assert _max_error(want, want.clone()) == 0.0
    assert _max_error(want, torch.tensor([1.0, float("inf"), 0.0])) == float("inf")
    assert _max_error(torch.ones(3), torch.tensor([1.0, float("nan"), 1.0])) == float("inf")


# ---------------------------------------------------------------------------------------------- defect 7
def _nan_module(loss_step: int | None = None, weight_step: int | None = None):  # type: ignore[no-untyped-def]
    from .conftest import Module

    class NanModule(Module):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.Parameter(torch.zeros(2))  # outside the loss: only a weight check can see it

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            loss = super().training_step(batch, batch_idx)
            if loss_step is not None and self.global_step >= loss_step:
                loss = loss * float("nan")
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            if weight_step is not None and self.global_step >= weight_step:
                with torch.no_grad():
                    self.spare[0] = float("inf")

    return NanModule()  # the loss becomes NaN (or a weight inf) from the given step on


@pytest.mark.parametrize(
    ("loss_step", "weight_step", "phase"),
    [
        (3, None, r"dense phase\); training stopped before any checkpoint"),
        (7, None, r"group norm\(s\) of net\.\w+:filter are NaN/inf"),  # the SSL step's own check comes first
        (13, None, r"finetune phase\); training stopped before any checkpoint"),
        (None, 13, r"NaN/inf in parameter\(s\) spare at step \d+ .* finetune phase"),
        (None, 3, r"NaN/inf in parameter\(s\) spare at step \d+ .* dense phase"),
    ],
)
def test_non_finite_values_stop_training_in_every_phase_and_keep_the_last_good_checkpoint(
    tmp_path, loss_step: int | None, weight_step: int | None, phase: str
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ssl_lightning import StructuredSparsity

    from .conftest import loader, trainer

    # 4 steps per epoch: dense epoch 0-1 (steps 0-7), ssl epoch 2 (8-11)... with ssl at [1, 3)
    cb = StructuredSparsity({"filter": 0.01}, phases={"dense": [0, 1], "ssl": [1, 3], "finetune": [3, None]})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=-1)
    t = trainer(tmp_path, max_epochs=5, callbacks=[cb, ckpt], enable_checkpointing=True)
    with pytest.raises(FloatingPointError, match=phase):
        t.fit(_nan_module(loss_step, weight_step), loader(n=64, batch=16))
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert saved, "checkpoints before the NaN were written"
    for path in saved:
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path.name


# --------------------------------------------------------------------------------------------- defect 10
RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "lenet_mnist5k_shapes.yaml")
QUICK = ["--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false"]


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from ssl_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("ssl-lightning: error:")]
    assert len(err) == 1, err
    return err[0]


def _recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("command", ["fit", "run"])
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("shape: 0.07", "bogus: 0.07"), "lambdas: unknown group type 'bogus'; allowed: filter, channel, shape"),
        (("shape: 0.07", "shape: -0.07"), "lambdas['shape'] must be a finite number >= 0, got -0.07"),
        (("ssl: [2, 10]", "ssl: [1, 10]"), "phases: dense and ssl overlap (dense ends at 2, ssl starts at 1)"),
    ],
)
def test_recipe_validation_errors_keep_their_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, edit: tuple[str, str], message: str
) -> None:
    text = Path(RECIPE).read_text()
    assert edit[0] in text
    recipe = _recipe(tmp_path, text.replace(*edit))
    argv = ["fit", "--config", recipe, *QUICK] if command == "fit" else ["run", recipe, *QUICK]
    err = _one_line_error(argv, capsys)
    assert message in err and "Union subtypes" not in err, err


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "is empty; a recipe is a YAML mapping"), ("- 1\n", "is a YAML list"), ("model: [1\n", "is not valid YAML")],
)
@pytest.mark.parametrize("command", ["fit", "run"])
def test_empty_or_malformed_recipes_say_what_a_recipe_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str, command: str
) -> None:
    recipe = _recipe(tmp_path, text)
    argv = ["fit", "--config", recipe] if command == "fit" else ["run", recipe]
    assert message in _one_line_error(argv, capsys)


def test_ckpt_path_that_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.ckpt").write_text("hello")
    err = _one_line_error(["fit", "--config", RECIPE, "--ckpt_path", str(tmp_path / "notes.ckpt")], capsys)
    assert "is not a PyTorch checkpoint" in err


def test_option_abbreviations_are_errors(capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(["fit", "--config", RECIPE, "--trainer.max_epoch", "1", *QUICK], capsys)
    assert "unrecognized arguments: --trainer.max_epoch" in err


def test_out_pointing_at_a_file_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("")
    err = _one_line_error(["run", RECIPE, "--out", str(tmp_path / "afile"), *QUICK], capsys)
    assert "is a file; give a directory" in err


def _idx(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"train-images-idx3-ubyte": b"\0\0\x08\x03\0\0"}, "IDX header truncated"),
        ({"train-images-idx3-ubyte.gz": b"plain bytes"}, "not a complete gzip file"),
    ],
)
def test_malformed_idx_files_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, bytes], message: str
) -> None:
    for name, data in files.items():
        _idx(tmp_path / "mnist" / name, data)
    argv = ["fit", "--config", RECIPE, "--data", "ssl_lightning.data.MNISTDataModule",
            "--data.root", str(tmp_path / "mnist"), *QUICK]  # fmt: skip
    err = _one_line_error(argv, capsys)
    assert message in err and "mnist" in err


@pytest.mark.parametrize(
    ("size", "label", "message"),
    [(32, 3, "LeNet cannot take the data's images of shape (1, 32, 32)"), (28, 12, "labels range over 0..12")],
)
def test_data_that_does_not_fit_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], size: int, label: int, message: str
) -> None:
    import numpy as np

    from .test_data_formats import write_idx

    (tmp_path / "mnist").mkdir()
    for split in ("train", "t10k"):
        labels = np.arange(8, dtype=np.uint8) % 10
        labels[1] = label
        write_idx(tmp_path / "mnist" / f"{split}-images-idx3-ubyte", np.zeros((8, size, size), np.uint8), gz=False)
        write_idx(tmp_path / "mnist" / f"{split}-labels-idx1-ubyte", labels, gz=False)
    argv = ["fit", "--config", RECIPE, "--data", "ssl_lightning.data.MNISTDataModule",
            "--data.root", str(tmp_path / "mnist"), "--trainer.default_root_dir", str(tmp_path), *QUICK]  # fmt: skip
    assert message in _one_line_error(argv, capsys)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_a_bad_label_after_the_first_batch_is_a_clear_error() -> None:
    from ssl_lightning.models import ImageClassifier, LeNet

    clf = ImageClassifier(LeNet(), num_classes=10)
    x, y = torch.zeros(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    clf.training_step((x, y), 0)
    with pytest.raises(ValueError, match=r"a label is outside 0\.\.9"):
        clf.training_step((x, torch.tensor([1, 2, 3, 11])), 1)


# ---------------------------------------------------------------------------------------------- defect 3
def test_a_compacted_state_dict_loads_into_a_fresh_dense_module() -> None:
    """What ddp_spawn's main process does with the workers' result (see test_ddp.py for the real run)."""
    import lightning.pytorch as pl

    from ssl_lightning import CompactionCheckpointing, compact
    from ssl_lightning.compaction import STATE_DICT_KEY

    class Lit(CompactionCheckpointing, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _TwoConvs()

    trained = Lit()
    assert STATE_DICT_KEY not in trained.state_dict()  # nothing compacted: the state_dict is the usual one
    with torch.no_grad():
        trained.net.conv1.weight[3:] = 0
        trained.net.conv2.weight[:, :, 0] = 0
    x = torch.randn(2, 3, 8, 8)
    trained.net = compact(trained.net, x, measure=False, align=8)  # 8 channels kept: conv2 stays a CompactConv2d
    state = trained.state_dict()
    assert STATE_DICT_KEY in state
    fresh = Lit()
    fresh.load_state_dict(state)  # strict: the structure is rebuilt first
    with torch.no_grad():
        torch.testing.assert_close(fresh.net(x), trained.net(x), rtol=0, atol=0)
    assert type(fresh.net.conv2).__name__ == "CompactConv2d"


def test_missing_checkpoint_and_an_out_dir_that_cannot_be_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _one_line_error(["fit", "--config", RECIPE, "--ckpt_path", str(tmp_path / "gone.ckpt")], capsys)
    assert "--ckpt_path" in err and "does not exist (expected a Lightning .ckpt file)" in err
    (tmp_path / "afile").write_text("")
    err = _one_line_error(["run", RECIPE, "--out", str(tmp_path / "afile" / "sub"), *QUICK], capsys)
    assert "cannot be created" in err


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_a_network_whose_outputs_are_not_the_classes_is_a_clear_error() -> None:
    from ssl_lightning.models import ImageClassifier, LeNet

    clf = ImageClassifier(LeNet(num_classes=7), num_classes=10)
    with pytest.raises(ValueError, match=r"LeNet outputs \(7,\) per image but num_classes is 10"):
        clf.training_step((torch.zeros(2, 1, 28, 28), torch.tensor([1, 2])), 0)


def test_sampler_size_must_be_a_count() -> None:
    from ssl_lightning.data.sampling import EpochShuffleSampler

    with pytest.raises(ValueError, match=r"n must be an int >= 0, got -1"):
        EpochShuffleSampler(-1)
