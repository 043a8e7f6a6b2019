"""``ssl-lightning``: LightningCLI over the package's models, data and callbacks.

    ssl-lightning fit --config recipes/lenet_mnist5k_shapes.yaml [--trainer.max_epochs 5 ...]

Every Trainer / model / data / callback argument is available from YAML and the command line; unknown keys
are errors. (The whole-pipeline ``run RECIPE`` command — prune, compact, benchmark, report — is next.)
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from ssl_lightning.models import ImageClassifier


def cli(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` (tests)."""
    return LightningCLI(
        ImageClassifier,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


# Errors a user fixes in the recipe or on the command line: one line, exit code 2, no stack trace.
_USER_ERRORS = (FileNotFoundError, ValueError, KeyError, TypeError)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ssl-lightning`` console script. ``--verbose`` shows full stack traces."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    try:
        cli(argv)
    except _USER_ERRORS as err:
        if verbose:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"ssl-lightning: error: {msg} (run with --verbose for the stack trace)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
