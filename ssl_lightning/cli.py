"""``ssl-lightning``: LightningCLI over the package's models, data and callbacks.

    ssl-lightning fit --config recipes/lenet_mnist5k_shapes.yaml [--trainer.max_epochs 5 ...]
    ssl-lightning run recipes/lenet_mnist5k_shapes.yaml [--baseline] [--out DIR] [--key value ...]
    ssl-lightning sweep recipes/lenet_mnist5k_shapes.yaml --lambda 0.01 0.05 0.2 [--out DIR] [--key value ...]

Every Trainer / model / data / callback argument is available from YAML and the command line; unknown keys
are errors. ``run`` is the whole pipeline (see :mod:`ssl_lightning.pipeline`): optional dense baseline, SSL,
prune, fine-tune, compact, verify, benchmark and a Markdown / JSON / PNG report. ``sweep`` runs a recipe for
several λ and plots accuracy against remaining FLOPs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

from ssl_lightning.models import ImageClassifier

# Parse errors raise (argparse.ArgumentError) instead of printing the whole usage; main() prints one line.
PARSER_KWARGS: dict[str, Any] = {
    "exit_on_error": False,
    **{cmd: {"exit_on_error": False} for cmd in ("fit", "validate", "test", "predict")},
}


def cli(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` (tests)."""
    return LightningCLI(
        ImageClassifier,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=PARSER_KWARGS,
        args=args,
    )


# Errors a user fixes in the recipe or on the command line: one line, exit code 2, no stack trace.
_USER_ERRORS = (FileNotFoundError, ValueError, KeyError, TypeError, argparse.ArgumentError)


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
    recipe, rest = argv[1], argv[2:]
    out = _pop_option(rest, "--out")
    if command == "run":
        baseline = _pop_option(rest, "--baseline", "0") is not None
        pipeline.run(recipe, rest, baseline=baseline, out_dir=out[0] if out else None)
        return
    values = _pop_option(rest, "--lambda", "+")
    if values is None:
        raise ValueError("sweep needs --lambda with one or more values, e.g. --lambda 0.01 0.05 0.2")
    try:
        lambdas = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--lambda values must be numbers, got {values}") from None
    pipeline.sweep(recipe, lambdas, rest, out_dir=out[0] if out else None)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ssl-lightning`` console script. ``--verbose`` shows full stack traces."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    try:
        if argv and argv[0] in ("run", "sweep"):
            _pipeline(argv)
        else:
            cli(None if argv == sys.argv[1:] else argv)  # None: LightningCLI reads sys.argv itself (no warning)
    except _USER_ERRORS as err:
        if verbose:
            raise
        text = str(err).strip()
        # A parser error spans lines (key, then the problem): join them; other errors: the first line.
        msg = (
            " ".join(text.split()) if isinstance(err, argparse.ArgumentError) else text.splitlines()[0] if text else ""
        )
        msg = msg or type(err).__name__
        print(f"ssl-lightning: error: {msg} (run with --verbose for the stack trace)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
