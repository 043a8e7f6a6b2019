"""``ssl-lightning``: LightningCLI over the package's models, data and callbacks.

    ssl-lightning fit --config lenet_mnist5k_shapes [--trainer.max_epochs 5 ...]   (a shipped recipe's name or a path)
    ssl-lightning run recipes/lenet_mnist5k_shapes.yaml [--baseline] [--out DIR] [--key value ...]
    ssl-lightning sweep recipes/lenet_mnist5k_shapes.yaml --lambda 0.01 0.05 0.2 [--ratio shape=6 ...] [--baseline]
        [--out DIR] [--key value ...]
    ssl-lightning compare recipes/compare/lenet_mnist5k.yaml [--seeds 0 1 2] [--out DIR] [--key value ...]
    ssl-lightning granularity recipes/lenet_mnist5k_filters.yaml [--granularities element vector kernel filter]
        [--levels 0.5 0.7 0.8 0.9 0.95] [--finetune-epochs 3] [--out DIR] [--key value ...]

The model is an ``ImageClassifier`` around a network (``--model.model my_pkg.Net``) or any LightningModule by
class path (``--model my_pkg.MyModule``). Every Trainer / model / data / callback argument is available from YAML
and the command line; unknown keys are errors. ``run`` is the whole pipeline (see :mod:`ssl_lightning.pipeline`):
optional dense baseline, SSL, prune, fine-tune, compact, verify, benchmark and a Markdown / JSON / PNG report.
``sweep`` runs a recipe for several λ and plots accuracy against remaining FLOPs. ``compare`` trains several
sparsity methods on one recipe's model, data and budget and tabulates accuracy, FLOPs, storage and measured
speedup.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from ssl_lightning.models import ImageClassifier

# Parse errors raise (argparse.ArgumentError) instead of printing the whole usage; main() prints one line.
# No abbreviations: a misspelt option (--trainer.max_epoch) must be an error, not a silent prefix match.
STRICT_PARSER: dict[str, Any] = {"exit_on_error": False, "allow_abbrev": False}
PARSER_KWARGS: dict[str, Any] = {
    **STRICT_PARSER,
    **{cmd: dict(STRICT_PARSER) for cmd in ("fit", "validate", "test", "predict")},
}


def own_model(argv: list[str]) -> bool:
    """Whether the arguments (or a ``--config`` file among them) give the model as a class path — the user's own
    LightningModule (``--model my_pkg.MyModule``, or ``model: {class_path: ...}`` in YAML) — instead of the
    arguments of :class:`~ssl_lightning.models.ImageClassifier` that the shipped recipes use."""
    import yaml

    for i, arg in enumerate(argv):
        name, eq, inline = arg.partition("=")
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        if name == "--model" and "." in value and not value.lstrip().startswith(("{", "[")):
            return True
        if name in ("--config", "-c") and value and Path(value).is_file():
            try:
                model = (yaml.safe_load(Path(value).read_text()) or {}).get("model")
            except (yaml.YAMLError, AttributeError):
                continue  # LightningCLI reports a malformed config
            if isinstance(model, dict) and "class_path" in model:
                return True
    return False


def model_mode(argv: list[str]) -> dict[str, Any]:
    """LightningCLI's model arguments for ``argv``: any LightningModule by class path (subclass mode) when
    :func:`own_model`, else :class:`~ssl_lightning.models.ImageClassifier` with its own arguments."""
    own = own_model(argv)
    return {"model_class": None if own else ImageClassifier, "subclass_mode_model": own}


def cli(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` (tests). The model is an ``ImageClassifier`` around a
    network (``--model.model my_pkg.Net``), or any LightningModule given by class path (``--model my_pkg.Lit``)."""
    return LightningCLI(
        **model_mode(list(sys.argv[1:] if args is None else args)),
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=PARSER_KWARGS,
        args=args,
    )


# Errors a user fixes in the recipe or on the command line: one line, exit code 2, no stack trace.
_USER_ERRORS = (FileNotFoundError, ValueError, KeyError, TypeError, argparse.ArgumentError)


#: the recipes installed with the package (``recipes/`` in a source checkout links here)
SHIPPED_RECIPES = Path(__file__).resolve().parent / "recipes"


def shipped_recipes() -> list[str]:
    """Names of the shipped recipes and compare specs, as ``resolve_recipe`` accepts them."""
    return sorted(str(p.relative_to(SHIPPED_RECIPES).with_suffix("")) for p in SHIPPED_RECIPES.rglob("*.yaml"))


def resolve_recipe(value: str) -> str:
    """A recipe given as a path, or by the name of a shipped one (``lenet_mnist5k_shapes``,
    ``compare/lenet_mnist5k``; ``.yaml`` optional): the path to read."""
    if Path(value).is_file():
        return value
    name = value.removeprefix("recipes/")
    shipped = SHIPPED_RECIPES / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return str(shipped)
    raise FileNotFoundError(
        f"recipe {value!r} does not exist (expected a YAML file, e.g. recipes/*.yaml, or the name of a shipped "
        f"recipe: {', '.join(shipped_recipes())})"
    )


def check_recipe(path: str) -> None:
    """A recipe / ``--config`` must be an existing YAML file holding a mapping (model, data, trainer, ...)."""
    import yaml

    file = Path(resolve_recipe(path))  # raises, listing the shipped recipes, when there is no such file
    try:
        content = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ValueError(f"recipe {path!r} is not valid YAML{at}: {getattr(err, 'problem', err)}") from None
    if not isinstance(content, dict) or not content:
        raise ValueError(
            f"recipe {path!r} is {'empty' if content is None else f'a YAML {type(content).__name__}'}; a recipe is a "
            "YAML mapping with model / data / trainer keys (see recipes/README.md)"
        )


def check_checkpoint(path: str) -> None:
    """``--ckpt_path`` must name a ``torch.save`` file (a zip archive); 'last' / 'best' / 'hpc' are Lightning's."""
    if path in ("last", "best", "hpc", "registry"):
        return
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--ckpt_path {path!r} does not exist (expected a Lightning .ckpt file)")
    if not zipfile.is_zipfile(file):
        raise ValueError(
            f"--ckpt_path {path!r} is not a PyTorch checkpoint (torch.save writes a zip archive; this file is not "
            "one): give a .ckpt written by Trainer / ModelCheckpoint"
        )


def _check_arguments(argv: list[str]) -> None:
    """Checks LightningCLI would report without the reason (a recipe that is empty, a checkpoint that is not);
    a ``--config`` naming a shipped recipe is replaced by its path."""
    for i, arg in enumerate(argv):
        name, _, inline = arg.partition("=")
        value = inline or (argv[i + 1] if i + 1 < len(argv) else "")
        if name in ("--config", "-c") and value:
            path = resolve_recipe(value)
            check_recipe(path)
            _replace_value(argv, i, path)
        elif name == "--ckpt_path" and value:
            check_checkpoint(value)
        elif name == "--trainer.logger" and value:
            _replace_value(argv, i, _logger_path(value))


def _replace_value(argv: list[str], i: int, new: str) -> None:
    """Put ``new`` where option ``argv[i]`` has its value: inline (``--name=value``) or in the next argument."""
    name, _, inline = argv[i].partition("=")
    if inline:
        argv[i] = f"{name}={new}"
    else:
        argv[i + 1] = new


def _logger_path(value: str) -> str:
    """``--trainer.logger``: true / false, a dotted class path, or the name of one of Lightning's loggers
    (``WandbLogger`` -> ``lightning.pytorch.loggers.WandbLogger``); anything else is a one-line error."""
    from lightning.pytorch import loggers

    names = sorted(n for n in loggers.__all__ if n.endswith("Logger") and n != "Logger")
    if value.lower() in ("true", "false", "null", "none") or "." in value or value.startswith(("{", "[")):
        return value
    if value in names:
        return f"lightning.pytorch.loggers.{value}"
    raise ValueError(
        f"--trainer.logger {value!r} is not a logger; use one of {', '.join(names)}, a dotted class path "
        "(my_package.MyLogger), or false"
    )


def _user_message(err: BaseException) -> str:
    """One line for the user. jsonargparse wraps a callback's or data module's own error (which names the
    argument, the value and what is allowed) in 'Does not validate against any of the Union subtypes': there
    the innermost user error of the chain is the reason. A parser error spans lines (key, then the problem):
    they are joined; any other error gives its first line."""
    best = err
    if "Union subtypes" in str(err):
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, _USER_ERRORS) and "Union subtypes" not in str(cause):
                best = cause
            cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    text = str(best.args[0]) if isinstance(best, KeyError) and best.args else str(best).strip()
    if isinstance(best, argparse.ArgumentError):
        return " ".join(text.split())
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(best).__name__


def _pop_option(argv: list[str], name: str, nargs: str = "1") -> list[str] | None:
    """Remove ``name`` and its values from ``argv``; None when absent. nargs "0", "1" or "+"."""
    if name not in argv:
        return None
    i = argv.index(name)
    if nargs == "0":
        del argv[i]
        return []
    j = i + 1
    while j < len(argv) and (nargs == "+" or j == i + 1) and not argv[j].startswith("--"):
        j += 1
    values = argv[i + 1 : j]
    if not values:
        raise ValueError(f"{name} needs a value")
    del argv[i:j]
    return values


def _pipeline(argv: list[str]) -> None:
    from ssl_lightning import pipeline

    command = argv[0]
    if len(argv) < 2 or argv[1].startswith("--"):
        raise ValueError(f"usage: ssl-lightning {command} RECIPE [options] [--key value ...]")
    recipe, rest = resolve_recipe(argv[1]), argv[2:]
    _check_arguments(rest)  # the recipe itself: pipeline.run / sweep check it
    out = _pop_option(rest, "--out")
    if command == "run":
        baseline = _pop_option(rest, "--baseline", "0") is not None
        pipeline.run(recipe, rest, baseline=baseline, out_dir=out[0] if out else None)
        return
    if command == "granularity":
        grans = _pop_option(rest, "--granularities", "+")
        levels = _pop_option(rest, "--levels", "+")
        epochs = _pop_option(rest, "--finetune-epochs")
        try:
            parsed_levels = [float(v) for v in levels] if levels else None
            parsed_epochs = int(epochs[0]) if epochs else 3
        except ValueError:
            raise ValueError(f"--levels must be numbers and --finetune-epochs an int, got {levels}, {epochs}") from None
        pipeline.granularity_study(
            recipe, rest, granularities=grans, levels=parsed_levels, finetune_epochs=parsed_epochs,
            out_dir=out[0] if out else None,
        )  # fmt: skip
        return
    if command == "compare":
        given = _pop_option(rest, "--seeds", "+")
        try:
            seeds = [int(v) for v in given] if given else None
        except ValueError:
            raise ValueError(f"--seeds values must be integers, got {given}") from None
        pipeline.compare(recipe, rest, seeds=seeds, out_dir=out[0] if out else None)
        return
    values = _pop_option(rest, "--lambda", "+")
    if values is None:
        raise ValueError("sweep needs --lambda with one or more values, e.g. --lambda 0.01 0.05 0.2")
    try:
        lambdas = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--lambda values must be numbers, got {values}") from None
    given = _pop_option(rest, "--ratio", "+")
    ratios: dict[str, float] = {}
    for item in given or []:
        kind, sep, value = item.partition("=")
        try:
            ratios[kind] = float(value) if sep and kind else float("nan")
        except ValueError:
            ratios[kind] = float("nan")
        if ratios[kind] != ratios[kind]:
            raise ValueError(f"--ratio takes TYPE=NUMBER items, e.g. --ratio shape=6 channel=1; got {item!r}")
    baseline = _pop_option(rest, "--baseline", "0") is not None
    pipeline.sweep(recipe, lambdas, rest, out_dir=out[0] if out else None, ratios=ratios or None, baseline=baseline)


_PIPELINE_HELP = {
    "run": (
        "the whole job on a recipe: train, prune, fine-tune, compact, time, report",
        "ssl-lightning run RECIPE [--baseline] [--out DIR] [--key value ...]",
        "The whole job: [dense baseline,] training with the recipe's sparsity callback, prune, fine-tune, compact\n"
        "(equivalence-checked), time dense vs compacted, and write report.md / report.json / PNG charts.\n\n"
        "  RECIPE          a recipe file or a shipped recipe's name (e.g. lenet_mnist5k_shapes)\n"
        "  --baseline      also train the recipe without its sparsity callback, for the dense accuracy\n"
        "  --out DIR       where the report goes (default: under the trainer's log dir)\n"
        "  --key value     any LightningCLI override, e.g. --trainer.max_epochs 5 (see: fit --help)",
    ),
    "sweep": (
        "a recipe at several strengths: accuracy against remaining FLOPs",
        "ssl-lightning sweep RECIPE --lambda L1 [L2 ...] [--ratio TYPE=R ...] [--baseline] [--out DIR] [--key v ...]",
        "The recipe once per strength λ (each group type of its sparsity callback set to λ × its --ratio, 1 by\n"
        "default, e.g. --ratio shape=6 channel=1 as in the paper's LeNet); --baseline also trains it dense for the\n"
        "reference line; sweep.csv and sweep.png: validation accuracy against remaining FLOPs.",
    ),
    "compare": (
        "sparsity methods side by side: accuracy, FLOPs, storage, measured speedup",
        "ssl-lightning compare SPEC [--seeds S1 [S2 ...]] [--out DIR] [--key value ...]",
        "Several sparsity methods on one recipe's model, data and budget (SPEC: recipe, seeds, methods; e.g. the\n"
        "shipped compare/lenet_mnist5k): accuracy, FLOPs, parameters, storage with indices and measured speedup;\n"
        "compare.md / compare.csv / accuracy_vs_speedup.png.",
    ),
    "granularity": (
        "the pruning-granularity study: accuracy, compression and bytes read per granularity",
        "ssl-lightning granularity RECIPE [--granularities G ...] [--levels S ...] [--finetune-epochs N] [--out DIR]",
        "Mao et al.'s study: the recipe's model trained dense, pruned one-shot by magnitude at each granularity\n"
        "(element vector kernel filter channel shape) and level, fine-tuned; granularity.md / .csv / .png.",
    ),
}


def _top_help() -> str:
    lines = [
        "usage: ssl-lightning {fit,validate,test,predict,run,sweep,compare,granularity} ...",
        "",
        "Structured sparsity for PyTorch Lightning. Commands (each has its own --help):",
        "  fit, validate, test, predict   LightningCLI: train / evaluate a recipe (--config RECIPE)",
    ]
    lines += [f"  {name:<31}{summary}" for name, (summary, _, _) in _PIPELINE_HELP.items()]
    lines += ["", f"Shipped recipes (by name or path): {', '.join(shipped_recipes())}", "--verbose shows stack traces."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ssl-lightning`` console script. ``--verbose`` shows full stack traces."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    if not argv or argv in (["-h"], ["--help"]):
        print(_top_help())
        return
    if argv[0] in _PIPELINE_HELP and ("-h" in argv or "--help" in argv):
        _, usage, text = _PIPELINE_HELP[argv[0]]
        print(f"usage: {usage}\n\n{text}")
        return
    try:
        if argv and argv[0] in ("run", "sweep", "compare", "granularity"):
            _pipeline(argv)
        else:
            _check_arguments(argv)
            cli(None if argv == sys.argv[1:] else argv)  # None: LightningCLI reads sys.argv itself (no warning)
    except _USER_ERRORS as err:
        if verbose:
            raise
        msg = _user_message(err)
        print(f"ssl-lightning: error: {msg} (run with --verbose for the stack trace)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
