"""Compacted layers: drop-ins for dense layers whose weights have all-zero structures.

``CompactLinear`` gathers the kept input features of an ``nn.Linear`` whose weight has all-zero input columns
that channel removal cannot take out upstream (e.g. input pixels an MLP learned to ignore).

``CompactConv2d``: a drop-in for a dense ``nn.Conv2d`` whose lowered weight has all-zero rows/columns. It stores
the structure (kept rows and columns per conv group) and the kept weights only, packed, and runs one of three
implementations:
    fused  ``ssl_lightning.ops.compact_conv2d``: only kept rows x kept columns, lowering inside the op
    rows   a smaller ``F.conv2d`` with the kept filters only (rounded up to ``align`` filters per group,
           since oneDNN is slower on odd channel counts)
    dense  the full convolution (nothing to gain on this machine)
Which one runs is decided on the machine that runs the layer, per input shape, dtype and device: measured on
the first inference call (like ``torch.backends.cudnn.benchmark``; :func:`set_autotune`), or by a cost model
(training calls, ``torch.compile``, autotune off). A choice is never saved: plans and checkpoints carry the
structure, so a model compacted on a busy training box or a GPU box decides afresh where it is deployed.
:meth:`CompactConv2d.pin` / :func:`pin_kernels` fix choices for reproducible deployment.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from functools import partial
from typing import Any, Literal, TypeAlias, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lightning._ext import has_compiled_ops, has_cuda_kernels
from ssl_lightning.ops import (
    _groups_blocks,
    compact_conv2d,
    cpu_kernel,
    expand_compact_weight,
    lowered_nonzero,
    pack_compact_weight,
)
from ssl_lightning.timing import NOISE_LIMIT, fastest

__all__ = ["CompactConv2d", "CompactLinear", "autotune_enabled", "kernel_choices", "modeled_choice", "pin_kernels",
           "set_autotune"]  # fmt: skip

Impl: TypeAlias = Literal["fused", "rows", "dense"]
Choice: TypeAlias = Literal["auto", "fused", "rows", "dense"]
IMPLS: tuple[Impl, ...] = ("fused", "rows", "dense")
# Cost model: with a gathered-panel CPU kernel (AVX-512 or AVX2) the fused op runs at 75-100 % of oneDNN's dense
# throughput on AlexNet / CIFAR / LeNet shapes (2 CPU threads, BENCHMARKS.md), so it needs a clear saving to win:
# a layer is compacted when at most this fraction of its MACs (kept rows x kept columns) remains.
COMPACT_MAX_KEPT_WORK = 0.8
# Without a panel kernel (lowered tiles into BLAS, another architecture, the CUDA gather + GEMM, or the
# reference twin) the fused op pays an explicit lowering pass: it needs a larger saving.
LOWERED_MAX_KEPT_WORK = 0.5

_autotune = os.environ.get("SSL_LIGHTNING_AUTOTUNE", "1") != "0"
_noisy_warned = False


def set_autotune(enabled: bool) -> None:
    """Whether a :class:`CompactConv2d` times its implementations on its first inference call per input shape
    (default on; ``SSL_LIGHTNING_AUTOTUNE=0`` in the environment turns it off at import). Off: the cost model
    (:func:`modeled_choice`) decides, deterministically and without timing."""
    global _autotune
    if not isinstance(enabled, bool):
        raise TypeError(f"set_autotune(enabled) takes a bool, got {enabled!r}")
    _autotune = enabled


def autotune_enabled() -> bool:
    """See :func:`set_autotune`."""
    return _autotune


def modeled_choice(kept_filters: float, kept_work: float, columns_removed: bool, kernel: str) -> Impl:
    """The cost model's implementation for a layer keeping ``kept_filters`` of its filters and ``kept_work`` of
    its MACs, on a machine whose fused op runs ``kernel`` (``ops.cpu_kernel()``: ``avx512`` / ``avx2`` are
    gathered-panel kernels; anything else, e.g. ``onednn``, ``blas``, ``cuda``, lowers explicitly).

    The dense conv while more than the kernel's limit of the MACs remains; else the row-only conv when no
    column is removed; else the fused op."""
    limit = COMPACT_MAX_KEPT_WORK if kernel in ("avx512", "avx2") else LOWERED_MAX_KEPT_WORK
    if kept_work > limit:
        return "dense"
    if not columns_removed:
        return "rows" if kept_filters < 1.0 else "dense"
    return "fused"


def _kept_work(rows: Tensor, cols: Tensor | None, groups: int) -> float:
    """Fraction of the conv's MACs left by the kept rows (G*OG bools) x kept columns (G x CKK bools; None: all)."""
    per_group = rows.view(groups, -1).float().mean(1)
    if cols is not None and cols.numel():
        per_group = per_group * cols.float().mean(1)
    return float(per_group.mean())


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _numeric_zero_padding(conv: nn.Conv2d) -> bool:
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


# POSIX keeps os.environ's bytes mapping in _data: reading it directly takes ~35 ns against ~700 ns for
# os.environ.get, which every call of a compacted layer would pay twice (~10 % of a small layer at batch 1)
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _kernel_switches() -> tuple[Any, Any]:
    """SSL_LIGHTNING_GEMM and SSL_LIGHTNING_MAX_ISA as set now (the fused op reads them at every call)."""
    if isinstance(_ENV_DATA, dict):
        return _ENV_DATA.get(b"SSL_LIGHTNING_GEMM"), _ENV_DATA.get(b"SSL_LIGHTNING_MAX_ISA")
    return os.environ.get("SSL_LIGHTNING_GEMM"), os.environ.get("SSL_LIGHTNING_MAX_ISA")


def _kernel_for(x: Tensor) -> str:
    """What the fused op runs for ``x`` here: ``ops.cpu_kernel`` on the CPU, ``cuda`` / ``reference`` elsewhere."""
    if x.device.type != "cpu":
        return "cuda" if x.is_cuda and has_cuda_kernels() else "reference"
    try:
        return cpu_kernel(x.dtype)
    except (RuntimeError, ValueError):  # a forced kernel this CPU lacks (the op itself says so), or no such dtype
        return "unavailable"


def _fresh_choices() -> dict[str, Any]:
    """A CompactConv2d's run-time choices and caches, empty: per (shape, dtype, device, threads, kernel switches)
    the measured and the modeled choice, the last one run, and the inference caches of derived weights. Never
    saved, copied or pickled."""
    return {"_choices": {}, "_modeled": {}, "_last": None, "_weights": {}}


def _mode_active() -> bool:
    """Whether a torch function / dispatch mode watches this call (a FLOP counter, a graph recorder, a fake
    tensor trace): timing candidates there would be counted or recorded as the model's own work."""
    return bool(torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack())


class CompactConv2d(nn.Module):
    """Build with :meth:`from_conv`. ``forward(x)`` equals the source conv's forward (full-width output:
    removed filters output their bias), or only the kept channels with ``compact_output=True``.

    Holds the structure and the kept weights only: ``weight`` packs each conv group's kept rows x kept columns
    (``ops.pack_compact_weight``), ``bias`` has every filter's entry (removed filters output theirs), the index
    lists are buffers. The implementation is chosen per input (see the module docstring); ``impl`` names the one
    it runs now. A conv whose padding the fused op does not implement (``padding_mode`` other than zeros, string
    padding) keeps the source conv (``conv``) and always runs it."""

    row_idx: Tensor
    row_ptr: Tensor
    col_idx: Tensor
    col_ptr: Tensor
    rows_sel: Tensor
    rows_real: Tensor
    _choices: dict[tuple[Any, ...], Impl]  # see _fresh_choices
    _modeled: dict[tuple[Any, ...], Impl]
    _last: Impl | None
    _weights: dict[str, tuple[tuple[Any, ...], Tensor]]

    def __init__(
        self,
        conv: nn.Conv2d,
        rows: Tensor,
        cols: Tensor,
        impl: Choice = "auto",
        compact_output: bool = False,
        align: int = 8,
    ) -> None:
        super().__init__()
        if impl not in ("auto", *IMPLS):
            raise ValueError(f"impl must be one of 'auto', 'fused', 'rows', 'dense', got {impl!r}")
        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise ValueError(f"align must be a positive int (filters per group of the row-only conv), got {align!r}")
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size = _pair(conv.kernel_size)
        self.stride, self.dilation = _pair(conv.stride), _pair(conv.dilation)
        self.padding = _pair(conv.padding) if not isinstance(conv.padding, str) else (0, 0)
        self.compact_output, self.align = compact_output, align
        g, og = conv.groups, conv.out_channels // conv.groups
        rows_g = rows.view(g, og)
        self.register_buffer("row_idx", rows.nonzero().flatten())
        self.register_buffer("row_ptr", torch.tensor([0, *rows_g.sum(1).cumsum(0).tolist()]))
        col_lists = [c.nonzero().flatten() for c in cols]
        self.register_buffer("col_idx", torch.cat(col_lists) if col_lists else torch.zeros(0, dtype=torch.long))
        self.register_buffer("col_ptr", torch.tensor([0, *cols.sum(1).cumsum(0).tolist()]))
        # per group (row start, rows, column start, columns, offset in the packed weight), as Python ints
        self._blocks = _groups_blocks(self.row_ptr, self.col_ptr)
        sel, real = self._row_selection(rows_g, align)
        self.register_buffer("rows_sel", sel, persistent=False)  # derived from the structure and align
        self.register_buffer("rows_real", real, persistent=False)
        self.kept_filters = float(rows.float().mean())
        self.kept_work = _kept_work(rows, cols, g)
        self.columns_removed = not bool(cols.all())
        w = conv.weight.detach()
        if _numeric_zero_padding(conv):
            packed = pack_compact_weight(w, self.row_idx, self.row_ptr, self.col_idx, self.col_ptr)
            self.weight: nn.Parameter | None = nn.Parameter(packed.clone(), requires_grad=conv.weight.requires_grad)
            bias = conv.bias
            self.bias = nn.Parameter(bias.detach().clone(), bias.requires_grad) if bias is not None else None
        else:
            if impl in ("fused", "rows"):
                raise ValueError(
                    f"impl={impl!r} supports zero padding given as numbers; this conv has padding={conv.padding!r}, "
                    f"padding_mode={conv.padding_mode!r}: use impl='auto' or 'dense' (the dense conv is kept)"
                )
            impl = "dense"
            self.conv = copy.deepcopy(conv)
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.pinned: Impl | None = None if impl == "auto" else cast(Impl, impl)
        self._default: Impl = modeled_choice(
            self.kept_filters, self.kept_work, self.columns_removed, _kernel_for(torch.empty(0))
        )
        self.__dict__.update(_fresh_choices())

    @staticmethod
    def _row_selection(rows_g: Tensor, align: int) -> tuple[Tensor, Tensor]:
        """The row-only conv's filters: the same count in every group (a grouped conv needs it), rounded up to
        ``align``; the extra ones are removed filters (zero weights) dropped from the output again."""
        g, og = rows_g.shape
        per_group = min(og, -(-max(int(rows_g.sum(1).max()), 1) // align) * align)
        sel, real = [], []
        for gi in range(g):
            kept = rows_g[gi].nonzero().flatten()
            extra = (~rows_g[gi]).nonzero().flatten()[: per_group - len(kept)]
            chosen = torch.cat([kept, extra]).sort().values
            sel.append(chosen + gi * og)
            real.append(rows_g[gi][chosen])
        return torch.cat(sel), torch.cat(real)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, **_fresh_choices()}  # a copy or pickle of the module decides afresh where it runs

    @property
    def impl(self) -> Impl:
        """The implementation this layer runs now: its pin, else the one its last call ran, else the cost
        model's (before any call)."""
        return self.pinned or self._last or self._default

    def pin(self, impl: Choice) -> CompactConv2d:
        """Run ``impl`` for every input from now on (``"auto"``: choose per input again). Pins travel in
        compaction plans; choices made by measurement or the cost model do not. Returns ``self``."""
        if impl not in ("auto", *IMPLS):
            raise ValueError(f"impl must be one of 'auto', 'fused', 'rows', 'dense', got {impl!r}")
        if self._modules.get("conv") is not None and impl in ("fused", "rows"):
            raise ValueError(f"impl={impl!r}: this layer's padding is not implemented by the fused op; it runs 'dense'")
        if self._modules.get("conv") is None:
            self.pinned = None if impl == "auto" else cast(Impl, impl)
        return self

    def _key(self, x: Tensor) -> tuple[Any, ...]:
        return (x.shape, x.dtype, x.device, torch.get_num_threads(), *_kernel_switches())

    def _choose(self, x: Tensor) -> Impl:
        if torch.compiler.is_compiling():  # no timing or environment reads while tracing
            return self._last or self._default
        key = self._key(x)
        impl = self._choices.get(key)
        if impl is None:
            if _autotune and not torch.is_grad_enabled() and not _mode_active():  # inference: measure once
                impl = self._choices[key] = self._measure(x)
            else:
                impl = self._modeled.get(key)
                if impl is None:
                    impl = self._modeled[key] = self._model(x)
        if impl != self._last:  # nn.Module.__setattr__ costs ~1 us: only on a change
            self._last = impl
        return impl

    def _model(self, x: Tensor) -> Impl:
        return modeled_choice(self.kept_filters, self.kept_work, self.columns_removed, _kernel_for(x))

    def _candidates(self) -> list[Impl]:
        # The row-only conv with full-width output runs the same oneDNN/cuDNN conv on fewer filters and then
        # copies its channels into the full output, so it cannot gain much more than the removed fraction:
        # it is timed only when at most COMPACT_MAX_KEPT_WORK of the filters remain (above that its best case
        # is inside timing noise; AlexNet conv1 at batch 16, 90.6 % kept, once chose it and ran at 0.84x).
        # The fused op is always timed: it can beat the dense conv by more than the removed work where
        # oneDNN is weak (LeNet conv1, one input channel, even with every filter kept). With compact output the
        # dense conv pays a gather of the kept channels as well, so both are timed.
        candidates: list[Impl] = ["dense"]
        limit = 1.0 if self.compact_output else COMPACT_MAX_KEPT_WORK
        if self.kept_filters < 1.0 and self.kept_filters <= limit:
            candidates.append("rows")
        candidates.append("fused")  # also with nothing removed: it beats oneDNN where that is weak (few channels)
        return candidates

    def _measure(self, x: Tensor, block_seconds: float = 0.01) -> Impl:
        """Time the candidates on ``x``: blocks of 10 ms on a first inference call (a model's first call pays
        this once per layer and input shape), 20 ms when asked to (:meth:`tune`, compaction)."""
        candidates = self._candidates()
        if len(candidates) == 1:
            return candidates[0]
        spreads: dict[Impl, float] = {}
        impl = fastest({c: partial(self._run, c) for c in candidates}, x, spreads=spreads, block_seconds=block_seconds)
        if spreads.get("dense", 0.0) > NOISE_LIMIT:  # other load disturbed the dense control: not a measurement
            global _noisy_warned
            if not _noisy_warned:
                _noisy_warned = True
                warnings.warn(
                    f"CompactConv2d: other load disturbed the timing of the implementations (the dense conv's "
                    f"blocks spread {100 * spreads['dense']:.0f} % > {100 * NOISE_LIMIT:.0f} %); using the cost "
                    "model's choice instead (call tune() on a quiet machine, or pin_kernels())",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return self._model(x)
        return impl

    def tune(self, x: Tensor) -> Impl:
        """Time the implementations on ``x`` now, on this machine, and run the fastest for inputs like ``x``
        (shape, dtype, device, threads) from now on in this process; returns it (a pinned layer: its pin)."""
        if self.pinned is not None:
            return self.pinned
        key = self._key(x)
        with torch.no_grad():
            impl = self._choices[key] = self._measure(x, block_seconds=0.02)
        self._last = impl
        return impl

    def forward(self, x: Tensor) -> Tensor:
        return self._run(self.pinned or self._choose(x), x)

    def _run(self, impl: Impl, x: Tensor) -> Tensor:
        if impl == "fused":
            if has_compiled_ops() and (x.device.type == "cpu" or (x.is_cuda and has_cuda_kernels())):  # hot path
                # parameters and buffers straight from their dicts: nn.Module.__getattr__ on seven of them
                # costs as much as the dispatcher on a small layer
                p, b = self._parameters, self._buffers
                args = (
                    x, p["weight"], b["row_idx"], b["row_ptr"], b["col_idx"], b["col_ptr"], p.get("bias"),
                    self.kernel_size, self.stride, self.padding, self.dilation, self.groups, self.out_channels,
                    self.compact_output,
                )  # fmt: skip
                op = torch.ops.ssl_lightning.compact_conv2d.default
                if torch.compiler.is_compiling() or torch.is_grad_enabled() or torch.is_inference_mode_enabled():
                    return op(*args)  # inference mode has no autograd keys; dynamo/export trace the plain op
                with torch._C._AutoDispatchBelowAutograd():  # no_grad: skip the Python autograd kernel
                    return op(*args)
            weight = cast(Tensor, self.weight)
            return compact_conv2d(
                x, weight, self.row_idx, self.row_ptr, self.col_idx, self.col_ptr, self.bias, self.kernel_size,
                self.stride, self.padding, self.dilation, self.groups, self.out_channels, self.compact_output,
            )  # fmt: skip
        conv = self._modules.get("conv")
        if conv is not None:  # the source conv (a padding the fused op does not implement)
            y = conv(x)
            return y[:, self.row_idx] if self.compact_output else y
        if impl == "rows":
            bias = self.bias[self.rows_sel] if self.bias is not None else None
            y = F.conv2d(x, self._derived("rows"), bias, self.stride, self.padding, self.dilation, self.groups)
            if self.compact_output:
                return y if bool(self.rows_real.all()) else y[:, self.rows_real]
            shape = (x.shape[0], self.out_channels, y.shape[2], y.shape[3])
            # A fresh bias-filled output, then the kept channels in place: no third full-size tensor (at batch 16
            # these are MBs, and each fresh one costs page faults). Never expand(...).contiguous(): with one
            # output position per channel that is the bias parameter itself, and index_copy_ would overwrite it.
            if self.bias is None:
                base = y.new_zeros(shape)
            else:
                base = y.new_empty(shape)
                base.copy_(self.bias.view(1, -1, 1, 1))
            return base.index_copy_(1, self.rows_sel, y)
        y = F.conv2d(x, self._derived("dense"), self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y[:, self.row_idx] if self.compact_output else y

    def _expand(self, w: Tensor) -> Tensor:
        """The dense weight (zeros where removed) from the packed one; differentiable, traceable."""
        return expand_compact_weight(
            w, self.row_idx, self.row_ptr, self.col_idx, self.col_ptr, self.out_channels,
            self.in_channels // self.groups, self.kernel_size, blocks=self._blocks,
        )  # fmt: skip

    def _derived(self, kind: Literal["rows", "dense"]) -> Tensor:
        """The dense (or row-only) weight for the dense (row-only) conv: rebuilt on every training call (the
        packed weight is what trains), cached for inference until the packed weight changes."""
        w = cast(Tensor, self._parameters["weight"])
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            dense = self._expand(w)
            return dense[self.rows_sel] if kind == "rows" else dense
        # an inference tensor (a layer built under inference_mode) has no version counter; it cannot be
        # changed in place outside inference mode
        version = -1 if w.is_inference() else w._version
        key = (version, w.data_ptr(), w.device, w.dtype, self.rows_sel.device)
        hit = self._weights.get(kind)
        if hit is None or hit[0] != key:
            dense = self._expand(w)
            hit = self._weights[kind] = (key, dense[self.rows_sel] if kind == "rows" else dense)
        return hit[1]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # State dicts saved before the implementation was chosen at run time hold the weight in the layout of
        # the implementation then chosen: the source conv ("dense") or the row-only conv's filters ("rows",
        # with the persistent rows_sel it used). Both are packed into today's layout.
        old_sel = state_dict.pop(prefix + "rows_sel", None)
        state_dict.pop(prefix + "rows_real", None)
        if self._modules.get("conv") is None:
            w = state_dict.get(prefix + "weight")
            dense = None
            if prefix + "conv.weight" in state_dict:
                dense = state_dict.pop(prefix + "conv.weight")
                b = state_dict.pop(prefix + "conv.bias", None)
                if b is not None:
                    state_dict[prefix + "bias"] = b
            elif isinstance(w, Tensor) and w.dim() == 4 and isinstance(old_sel, Tensor):
                dense = w.new_zeros(self.out_channels, *w.shape[1:])
                dense[old_sel] = w
            if dense is not None:
                packed = pack_compact_weight(dense, self.row_idx, self.row_ptr, self.col_idx, self.col_ptr)
                kept = self._expand(packed)
                if not torch.equal(kept.to(dense.dtype), dense.reshape(kept.shape)):
                    warnings.warn(
                        f"CompactConv2d {prefix.rstrip('.') or '(root)'}: the state dict has nonzero weights outside "
                        "the kept rows / columns (trained after compaction with the dense or row-only layout); "
                        "they are dropped, as the compacted structure says",
                        stacklevel=2,
                    )
                state_dict[prefix + "weight"] = packed
        super()._load_from_state_dict(state_dict, prefix, *args)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        impl: Choice = "auto",
        compact_output: bool = False,
        example_input: Tensor | None = None,
        align: int = 8,
    ) -> CompactConv2d:
        """Detect all-zero rows (filters) and columns (per conv group) of ``conv`` and wrap it.

        impl="auto": the implementation is chosen per input where the layer runs; with ``example_input`` it is
        measured on it now (:meth:`tune`). "fused" / "rows" / "dense" pin one (:meth:`pin`).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"CompactConv2d.from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        rows, cols = lowered_nonzero(conv.weight.detach(), conv.groups)
        mod = cls(conv, rows, cols, impl, compact_output, align)  # checks impl and align against the conv
        unsupported = not _numeric_zero_padding(conv)
        if compact_output and unsupported:
            raise ValueError("compact_output needs a conv with numeric zero padding")
        if impl == "auto" and unsupported:
            warnings.warn(
                f"CompactConv2d: padding={conv.padding!r}/padding_mode={conv.padding_mode!r} is not implemented by "
                "the fused op; keeping the dense convolution",
                stacklevel=2,
            )
        if example_input is not None and mod.pinned is None:
            mod.tune(example_input)
        return mod

    def extra_repr(self) -> str:
        kept_rows, kept_cols = self.row_idx.numel(), self.col_idx.numel()
        total_cols = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"impl={self.impl}{' (pinned)' if self.pinned else ''}, rows={kept_rows}/{self.out_channels}, "
            f"cols={kept_cols}/{total_cols}"
        )


def kernel_choices(model: nn.Module) -> dict[str, Impl]:
    """The implementation each :class:`CompactConv2d` of ``model`` runs now (see :attr:`CompactConv2d.impl`), by
    module name: record it on the machine that measured, then :func:`pin_kernels` it elsewhere."""
    return {n: m.impl for n, m in model.named_modules() if isinstance(m, CompactConv2d)}


def pin_kernels(model: nn.Module, choices: Mapping[str, Choice] | None = None) -> dict[str, Impl]:
    """Pin the implementation of every :class:`CompactConv2d` of ``model``: to ``choices[name]`` (``"auto"``
    unpins; every compacted layer must be named) or, with ``choices=None``, to the one it runs now. Pins are
    saved in compaction plans, so a deployment loads exactly these. Returns the pinned choices."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CompactConv2d)}
    if choices is not None:
        unknown = sorted(set(choices) - set(layers))
        missing = sorted(set(layers) - set(choices))
        if unknown or missing:
            raise ValueError(
                "pin_kernels: choices must name every CompactConv2d of the model"
                + (f"; not compacted layers of this model: {unknown}" if unknown else "")
                + (f"; missing: {missing}" if missing else "")
            )
    for name, layer in layers.items():
        layer.pin(choices[name] if choices is not None else layer.impl)
    return kernel_choices(model)


class CompactLinear(nn.Module):
    """``y = x[..., in_idx] @ weight.T + bias``: gathers the kept input features, then a smaller GEMM."""

    in_idx: Tensor

    def __init__(self, linear: nn.Linear, keep: Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("in_idx", keep.to(torch.long).clone())
        w = linear.weight.detach()
        self.weight = nn.Parameter(w[:, self.in_idx].clone(), requires_grad=linear.weight.requires_grad)
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, example_input: Tensor | None = None, max_kept: float = 0.7) -> nn.Module:
        """The compact form when it pays off, else ``linear`` itself: with ``example_input`` whichever measures
        faster, without it the compact form when at most ``max_kept`` of the input features are kept."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"CompactLinear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        keep = (linear.weight.detach() != 0).any(0).nonzero().flatten()
        if keep.numel() == linear.in_features:
            return linear
        compact = cls(linear, keep)
        if example_input is None:
            return compact if keep.numel() <= max_kept * linear.in_features else linear
        return compact if fastest({"dense": linear, "compact": compact}, example_input) == "compact" else linear

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.index_select(-1, self.in_idx), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kept={self.in_idx.numel()}"
