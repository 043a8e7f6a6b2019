"""Per-layer structured-sparsity report (the paper's Tables 1–4 layout), usable without the callback."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ssl_lightning.graph import capture_inputs
from ssl_lightning.groups import GRANULARITIES, conv_member, linear_member, weight_of
from ssl_lightning.ops import lowered_nonzero
from ssl_lightning.timing import interleaved_times

__all__ = [
    "CompactionReport",
    "LayerComparison",
    "LayerStats",
    "SparsityReport",
    "StorageStats",
    "compaction_report",
    "index_storage",
    "record_spatial",
    "sparsity_report",
    "storage_report",
]


@dataclass
class LayerStats:
    name: str
    kind: str  # "conv" | "linear"
    filters: int  # GEMM rows (conv filters / linear output neurons)
    filters_kept: int
    channels: int  # input channels / input features
    channels_kept: int
    filter_size: int  # GEMM columns per conv-group bank (C/g·KH·KW; in_features for linear)
    filter_size_kept: float  # mean kept columns per bank
    row_sparsity: float  # fraction of all-zero GEMM rows
    col_sparsity: float  # fraction of all-zero GEMM columns (over all banks)
    kernel2d_sparsity: float  # fraction of all-zero 2-D kernels (conv only; 0 for linear)
    params: int  # weight + bias elements
    params_nonzero: int
    macs: int  # dense multiply-accumulates per sample (0 when the spatial size is unknown)
    macs_kept: int  # MACs of the structured (row x column) compacted GEMM
    weight_bits: int = 0  # the weight stored dense (32-bit values)
    stored_bits: int = 0  # the weight in its cheapest encoding: dense, or non-zeros at a granularity + 4-bit indices
    encoding: str = "dense"  # that encoding ("dense" or a granularity, see storage_report)

    @property
    def compression(self) -> float:
        return self.weight_bits / self.stored_bits if self.stored_bits else float("nan")

    @property
    def flop_fraction(self) -> float:
        return self.macs_kept / self.macs if self.macs else float("nan")


def record_spatial(model: nn.Module, *example_inputs: Tensor) -> dict[str, int]:
    """Output positions (Ho·Wo) of every Conv2d for one forward of ``example_inputs`` (eval, no grad)."""
    out: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, y, n=n: out.__setitem__(n, int(y.shape[-1] * y.shape[-2])))
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return out


def _zero_fraction(keep: Tensor) -> float:
    return (keep.numel() - int(keep.sum())) / keep.numel()


def _cheapest_encoding(name: str, module: nn.Module) -> tuple[int, int, str]:
    """(dense bits, stored bits, encoding) of the weight with 32-bit values and 4-bit indices: dense, or its kept
    groups at the granularity that stores them in the fewest bits (:func:`storage_report`)."""
    candidates = [st for g in GRANULARITIES if (st := _layer_storage(name, module, g, 32, 4)) is not None]
    dense = weight_of(module).numel() * 32
    best = min(candidates, key=lambda st: st.stored_bits, default=None)
    if best is None or best.stored_bits >= dense:
        return dense, dense, "dense"
    return dense, best.stored_bits, best.granularity


def layer_stats(name: str, module: nn.Module, positions: int | None = None) -> LayerStats:
    """Structure of one Conv2d / Linear from its exact zeros. ``positions``: conv output Ho·Wo."""
    storage = dict(zip(("weight_bits", "stored_bits", "encoding"), _cheapest_encoding(name, module), strict=True))
    w = weight_of(module).detach()
    bias = getattr(module, "bias", None)
    params = w.numel() + (bias.numel() if isinstance(bias, Tensor) else 0)
    nonzero = int((w != 0).sum()) + (int((bias != 0).sum()) if isinstance(bias, Tensor) else 0)
    if isinstance(module, nn.Conv2d):
        g = module.groups
        rows, cols = lowered_nonzero(w, g)  # [N], [g, Cg*KH*KW]
        n, cg, kh, kw = w.shape
        chan = cols.view(g, cg, kh * kw).any(dim=2).reshape(-1)
        rows_per_bank = rows.view(g, n // g).sum(dim=1)
        cols_per_bank = cols.sum(dim=1)
        pos = positions or 0
        kernels = (w.reshape(n * cg, kh * kw) != 0).any(dim=1)
        return LayerStats(
            name, "conv", n, int(rows.sum()), cg * g, int(chan.sum()), cg * kh * kw,
            int(cols.sum()) / g, _zero_fraction(rows), _zero_fraction(cols), _zero_fraction(kernels), params, nonzero,
            n * cg * kh * kw * pos, int((rows_per_bank * cols_per_bank).sum()) * pos, **storage,  # type: ignore[arg-type]
        )  # fmt: skip
    rows, cols = lowered_nonzero(w, 1)
    out_f, in_f = w.shape
    kept_cols = int(cols.sum())
    return LayerStats(
        name, "linear", out_f, int(rows.sum()), in_f, kept_cols, in_f, float(kept_cols),
        _zero_fraction(rows), _zero_fraction(cols), 0.0, params, nonzero,
        out_f * in_f, int(rows.sum()) * kept_cols, **storage,  # type: ignore[arg-type]
    )  # fmt: skip


@dataclass
class SparsityReport:
    layers: list[LayerStats]

    def totals(self) -> dict[str, float]:
        macs = sum(s.macs for s in self.layers)
        params = sum(s.params for s in self.layers)
        return {
            "macs": macs,
            "macs_kept": sum(s.macs_kept for s in self.layers),
            "flop_fraction": sum(s.macs_kept for s in self.layers) / macs if macs else float("nan"),
            "params": params,
            "params_nonzero": sum(s.params_nonzero for s in self.layers),
            "param_fraction": sum(s.params_nonzero for s in self.layers) / params if params else float("nan"),
            "weight_bytes": sum(s.weight_bits for s in self.layers) / 8,
            "stored_bytes": sum(s.stored_bits for s in self.layers) / 8,
        }

    def to_dict(self) -> dict[str, object]:
        layers = [asdict(s) | {"flop_fraction": s.flop_fraction, "compression": s.compression} for s in self.layers]
        return {"layers": layers, **self.totals()}

    def metrics(self, prefix: str = "ssl") -> dict[str, float]:
        """Flat scalar metrics for loggers: ``{prefix}/{layer}/{stat}`` and ``{prefix}/total/{stat}``."""
        out: dict[str, float] = {}
        for s in self.layers:
            p = f"{prefix}/{s.name}"
            if s.kind == "conv":
                out[f"{p}/filter_sparsity"] = (s.filters - s.filters_kept) / s.filters
                out[f"{p}/channel_sparsity"] = (s.channels - s.channels_kept) / s.channels
                out[f"{p}/shape_sparsity"] = s.col_sparsity
                out[f"{p}/kernel2d_sparsity"] = s.kernel2d_sparsity
            else:
                out[f"{p}/neuron_out_sparsity"] = s.row_sparsity
                out[f"{p}/neuron_in_sparsity"] = s.col_sparsity
            out[f"{p}/params_remaining"] = s.params_nonzero / s.params
            if s.macs:
                out[f"{p}/flops_remaining"] = s.flop_fraction
            out[f"{p}/compression"] = s.compression
        t = self.totals()
        out[f"{prefix}/total/params_remaining"] = t["param_fraction"]
        if t["stored_bytes"]:
            out[f"{prefix}/total/compression"] = t["weight_bytes"] / t["stored_bytes"]
            out[f"{prefix}/total/stored_bytes"] = t["stored_bytes"]
        if t["macs"]:
            out[f"{prefix}/total/flops_remaining"] = t["flop_fraction"]
        return out

    def to_text(self) -> str:
        head = (
            f"{'layer':<18}{'filters':>10}{'channels':>10}{'filter size':>14}{'row sp.':>9}{'col sp.':>9}"
            f"{'2D sp.':>8}{'FLOP':>8}{'params':>16}"
        )
        lines = [head, "-" * len(head)]
        for s in self.layers:
            flop = f"{100 * s.flop_fraction:.1f}%" if s.macs else "n/a"
            lines.append(
                f"{s.name:<18}{f'{s.filters_kept}/{s.filters}':>10}{f'{s.channels_kept}/{s.channels}':>10}"
                f"{f'{s.filter_size_kept:.0f}/{s.filter_size}':>14}{100 * s.row_sparsity:>8.1f}%"
                f"{100 * s.col_sparsity:>8.1f}%{100 * s.kernel2d_sparsity:>7.1f}%{flop:>8}"
                f"{f'{s.params_nonzero}/{s.params}':>16}"
            )
        t = self.totals()
        flop = f"{100 * t['flop_fraction']:.1f}%" if t["macs"] else "n/a"
        lines.append("-" * len(head))
        params = f"{t['params_nonzero']}/{t['params']}"
        lines.append(f"{'total':<18}{'':>60}{flop:>8}{params:>16}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def sparsity_report(
    model: nn.Module,
    *example_inputs: Tensor,
    spatial: Mapping[str, int] | None = None,
    layers: Iterable[str] | None = None,
) -> SparsityReport:
    """Report every Conv2d / Linear of ``model`` (or only ``layers``). FLOPs need the conv output sizes:
    pass ``example_inputs`` (one forward is run) or a precomputed ``spatial`` map from :func:`record_spatial`."""
    if spatial is None:
        spatial = record_spatial(model, *example_inputs) if example_inputs else {}
    wanted = set(layers) if layers is not None else None
    stats = [
        layer_stats(n, m, spatial.get(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and (wanted is None or n in wanted)
    ]
    return SparsityReport(stats)


def plot_layer_sparsity(report: SparsityReport, title: str | None = None) -> Any:
    """Per-layer chart of filter, channel and shape sparsity and the FLOPs left, as an RGB uint8 array (H x W x 3).

    Each layer's bars carry its kept counts ("kept 2/20 ch"), the legend sits outside the axes, and the title
    gives the model totals."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    layers = report.layers
    names = [s.name for s in layers]
    x = np.arange(len(names))
    w = 0.2
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 3.2), 3.6), dpi=100)
    series = [
        ("filters (rows) removed", [100 * s.row_sparsity for s in layers], "#4c72b0"),
        ("channels removed", [100 * (1 - s.channels_kept / s.channels) if s.channels else 0.0 for s in layers],
         "#dd8452"),
        ("shape columns removed", [100 * s.col_sparsity for s in layers], "#55a868"),
        ("FLOPs remaining", [100 * s.flop_fraction if s.macs else 0.0 for s in layers], "#c44e52"),
    ]  # fmt: skip
    for i, (label, values, color) in enumerate(series):
        ax.bar(x + (i - 1.5) * w, values, w, label=label, color=color)
    for xi, s in zip(x, layers, strict=True):  # the kept counts, the figures a reader looks for
        ax.text(float(xi), 102, f"{s.filters_kept}/{s.filters} out\n{s.channels_kept}/{s.channels} in", ha="center",
                va="bottom", fontsize=6)  # fmt: skip
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% of the layer")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    totals = report.totals()
    head = title or "Per-layer structured sparsity"
    ax.set_title(f"{head}: {100 * totals['flop_fraction']:.1f} % of the FLOPs remain", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]
    plt.close(fig)
    return image


@dataclass
class StorageStats:
    """Bits to store one pruned weight at a granularity (kept values + relative indices, with fillers) against
    dense storage; ``bytes_read`` is the weight + index bytes one inference reads (the memory-reference proxy
    of Mao et al.)."""

    name: str
    granularity: str
    groups: int
    groups_kept: int
    group_size: int
    fillers: int
    value_bits: int
    index_bits: int
    dense_bits: int
    value_bits_total: int
    index_bits_total: int

    @property
    def stored_bits(self) -> int:
        return self.value_bits_total + self.index_bits_total

    @property
    def compression(self) -> float:
        """Dense bits / stored bits (values and indices)."""
        return self.dense_bits / self.stored_bits if self.stored_bits else float("inf")

    @property
    def bytes_read(self) -> float:
        return self.stored_bits / 8


def check_bits(arg: str, value: object) -> None:
    """A storage width (``value_bits``, ``index_bits``) must be an int >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{arg} must be an int >= 1, got {value!r}")


def index_storage(keep: Tensor, index_bits: int = 4) -> tuple[int, int]:
    """(entries, fillers) to store the kept groups of a flat bool ``keep`` (groups in storage order) with
    relative indices (deep compression's convention, Han et al. 2016): each entry stores the distance to the
    previous entry in ``index_bits`` bits (1 .. 2^index_bits); a larger distance takes filler entries (a stored
    all-zero group) every 2^index_bits positions. Entries include the fillers."""
    check_bits("index_bits", index_bits)
    span = 2**index_bits
    positions = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    if positions.numel() == 0:
        return 0, 0
    previous = torch.cat([positions.new_tensor([-1]), positions[:-1]])
    distance = positions - previous  # >= 1
    fillers = int(((distance - 1) // span).sum())
    return int(positions.numel()) + fillers, fillers


def encoded_bits(keep: Tensor, group_size: int, value_bits: int, index_bits: int) -> tuple[int, int, int]:
    """(value bits, index bits, fillers) of the kept groups (``keep``, in storage order) of ``group_size``
    weights each: every entry, fillers included, stores a whole group and one relative index."""
    entries, fillers = index_storage(keep, index_bits)
    return entries * group_size * value_bits, entries * index_bits, fillers


def _layer_storage(
    name: str, module: nn.Module, granularity: str, value_bits: int, index_bits: int
) -> StorageStats | None:
    """The weight of a Conv2d (any granularity) or Linear (``element`` only) stored at ``granularity``; a group is
    kept when any of its weights is non-zero. None for a layer the granularity does not apply to."""
    kind = GRANULARITIES[granularity]
    if isinstance(module, nn.Conv2d):
        member = conv_member(name, weight_of(module), kind, module.groups)
    elif isinstance(module, nn.Linear) and kind == "element":
        member = linear_member(name, weight_of(module), kind)
    else:
        return None
    w = weight_of(module).detach()
    keep = member.reduce_sq((w != 0).float()) > 0
    values, indices, fillers = encoded_bits(keep, member.group_size, value_bits, index_bits)
    return StorageStats(
        name, granularity, member.num_groups, int(keep.sum()), member.group_size, fillers, value_bits, index_bits,
        w.numel() * value_bits, values, indices,
    )  # fmt: skip


def storage_report(
    model: nn.Module,
    granularity: str,
    *,
    value_bits: int = 32,
    index_bits: int = 4,
    layers: Iterable[str] | None = None,
) -> list[StorageStats]:
    """:class:`StorageStats` of every Conv2d (and, for ``element``, Linear) weight of ``model`` stored at
    ``granularity`` (``element``, ``vector``, ``kernel``, ``filter``, ``channel``, ``shape``): a group is kept
    when any of its weights is non-zero. ``layers`` restricts the report to those module names."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(map(repr, GRANULARITIES))}, got {granularity!r}")
    check_bits("value_bits", value_bits)
    check_bits("index_bits", index_bits)
    wanted = set(layers) if layers is not None else None
    out = []
    for name, mod in model.named_modules():
        if wanted is None or name in wanted:
            stats = _layer_storage(name, mod, granularity, value_bits, index_bits)
            if stats is not None:
                out.append(stats)
    return out


@dataclass
class LayerComparison:
    name: str
    kind: str  # class of the compacted layer ("removed" when a depth removal cut it out)
    params: int
    params_compact: int
    macs: int  # per batch of the example inputs
    macs_compact: int
    ms: float  # median latency of the layer alone on the input it sees (nan without timing)
    ms_compact: float
    noise: float = 0.0  # the larger timing spread of the two (timing.spread); above NOISE_LIMIT: not trustworthy

    @property
    def speedup(self) -> float:
        return self.ms / self.ms_compact if self.ms_compact > 0 else float("inf")


def _speed_text(speedup: float, noise: float) -> str:
    """A ratio, or the ratio marked noisy (with its spread) when load disturbed the timing."""
    from ssl_lightning.timing import NOISE_LIMIT

    text = f"{speedup:.2f}x"
    return f"{text} (noisy: ±{100 * noise:.0f} %, rerun on a quiet machine)" if noise > NOISE_LIMIT else text


@dataclass
class CompactionReport:
    """Dense vs compacted: parameters, MACs (``torch.utils.flop_counter``) and measured latency, per Conv2d /
    Linear layer and end to end, for one batch of example inputs on their device."""

    layers: list[LayerComparison]
    params: int
    params_compact: int
    macs: int
    macs_compact: int
    ms: float
    ms_compact: float
    device: str
    # every saved tensor (parameters + buffers: BN statistics, folded constants, index maps), in elements
    stored: int = 0
    stored_compact: int = 0
    noise: float = 0.0  # timing spread of the end-to-end figures (see LayerComparison.noise)

    @property
    def speedup(self) -> float:
        return self.ms / self.ms_compact if self.ms_compact > 0 else float("nan")

    def metrics(self, prefix: str = "compaction") -> dict[str, float]:
        """Scalars for loggers: totals and each layer's speedup and MAC fraction."""
        out = {
            f"{prefix}/params": float(self.params_compact),
            f"{prefix}/params_fraction": self.params_compact / self.params,
            f"{prefix}/macs_fraction": self.macs_compact / self.macs if self.macs else float("nan"),
            f"{prefix}/latency_ms": self.ms_compact,
            f"{prefix}/latency_ms_dense": self.ms,
            f"{prefix}/speedup": self.speedup,
            f"{prefix}/stored_fraction": self.stored_compact / self.stored if self.stored else float("nan"),
            f"{prefix}/timing_noise": self.noise,
        }
        for s in self.layers:
            out[f"{prefix}/{s.name}/macs_fraction"] = s.macs_compact / s.macs if s.macs else float("nan")
            if s.ms == s.ms and s.kind != "removed":  # timed, and still there
                out[f"{prefix}/{s.name}/speedup"] = s.speedup
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "layers": [asdict(s) | {"speedup": s.speedup} for s in self.layers],
            "params": self.params, "params_compact": self.params_compact, "macs": self.macs,
            "macs_compact": self.macs_compact, "ms": self.ms, "ms_compact": self.ms_compact,
            "speedup": self.speedup, "device": self.device, "stored": self.stored,
            "stored_compact": self.stored_compact, "noise": self.noise,
        }  # fmt: skip

    def to_markdown(self) -> str:
        lines = [
            f"Device: {self.device}. Latency: median, each layer alone on the input it sees.",
            "",
            "| layer | compacted as | params (compact / dense) | MACs kept | latency ms (compact / dense) | speedup |",
            "|---|---|---|---|---|---|",
        ]
        for s in self.layers:
            speed = "cut out" if s.kind == "removed" else _speed_text(s.speedup, s.noise)
            lines.append(
                f"| {s.name} | {s.kind} | {s.params_compact:,} / {s.params:,} | "
                f"{_ratio(s.macs_compact, s.macs)} | {s.ms_compact:.3f} / {s.ms:.3f} | {speed} |"
            )
        lines.append(
            f"| **model** | | {self.params_compact:,} / {self.params:,} | {_ratio(self.macs_compact, self.macs)} | "
            f"{self.ms_compact:.3f} / {self.ms:.3f} | {_speed_text(self.speedup, self.noise)} |"
        )
        if self.stored:
            lines += ["", f"Stored (parameters + buffers, what a checkpoint holds): {self.stored_compact:,} / "
                          f"{self.stored:,} elements ({_ratio(self.stored_compact, self.stored)})."]  # fmt: skip
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _ratio(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "n/a"


def _count_macs(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops()) // 2


def _inputs_of(model: nn.Module, names: set[str], inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
    def run(m: nn.Module, trial: tuple[Tensor, ...]) -> object:
        with torch.no_grad():
            return m(*trial)

    return {n: xs[0] for n, xs in capture_inputs(model, sorted(names), [inputs], run).items() if xs}


def compaction_report(
    original: nn.Module, compacted: nn.Module, *example_inputs: Tensor, timing: bool = True, rounds: int = 5
) -> CompactionReport:
    """Compare ``original`` and its ``compact``-ed copy on ``example_inputs`` (both run in eval mode, no grad).

    Layers are the original's Conv2d / Linear modules, matched by name; a layer cut out by depth removal
    counts as 0 in the compacted model. ``timing=False`` skips the latency measurements (nan).
    """
    modes = (original.training, compacted.training)
    original.eval()
    compacted.eval()
    try:
        names = [n for n, m in original.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        new_mods = dict(compacted.named_modules())
        seen_a = _inputs_of(original, set(names), example_inputs)
        seen_b = _inputs_of(compacted, {n for n in names if n in new_mods}, example_inputs)
        old_mods = dict(original.named_modules())
        rows: list[LayerComparison] = []
        with torch.no_grad():
            for n in names:
                a, b = old_mods[n], new_mods.get(n)
                xa, xb = seen_a.get(n), seen_b.get(n)
                macs = _count_macs(lambda a=a, xa=xa: a(xa)) if xa is not None else 0
                macs_b = _count_macs(lambda b=b, xb=xb: b(xb)) if b is not None and xb is not None else 0
                ms = ms_b = float("nan")
                spreads: dict[str, float] = {}
                if timing and xa is not None:
                    fns = {"a": lambda a=a, xa=xa: a(xa)}
                    if b is not None and xb is not None:
                        fns["b"] = lambda b=b, xb=xb: b(xb)
                    times = interleaved_times(fns, rounds, block_seconds=0.02, spreads=spreads)
                    t = {k: 1e3 * v for k, v in times.items()}
                    ms, ms_b = t["a"], t.get("b", 0.0)
                rows.append(LayerComparison(
                    n, type(b).__name__ if b is not None else "removed",
                    sum(p.numel() for p in a.parameters()), sum(p.numel() for p in b.parameters()) if b else 0,
                    macs, macs_b, ms, ms_b, max(spreads.values(), default=0.0),
                ))  # fmt: skip
            macs = _count_macs(lambda: original(*example_inputs))
            macs_b = _count_macs(lambda: compacted(*example_inputs))
            ms = ms_b = float("nan")
            whole_spreads: dict[str, float] = {}
            if timing:
                whole = {"a": lambda: original(*example_inputs), "b": lambda: compacted(*example_inputs)}
                times = interleaved_times(whole, rounds, block_seconds=0.02, spreads=whole_spreads)
                t = {k: 1e3 * v for k, v in times.items()}
                ms, ms_b = t["a"], t["b"]
    finally:
        original.train(modes[0])
        compacted.train(modes[1])
    device = example_inputs[0].device if example_inputs else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return CompactionReport(
        rows, sum(p.numel() for p in original.parameters()), sum(p.numel() for p in compacted.parameters()),
        macs, macs_b, ms, ms_b, name, _stored(original), _stored(compacted), max(whole_spreads.values(), default=0.0),
    )  # fmt: skip


def _stored(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values() if isinstance(t, Tensor))
