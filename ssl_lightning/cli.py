"""``ssl-lightning``: LightningCLI over the package's models, data and callbacks.

    ssl-lightning fit --config recipes/lenet_mnist5k_shapes.yaml [--trainer.max_epochs 5 ...]

Every Trainer / model / data / callback argument is available from YAML and the command line; unknown keys
are errors. (The whole-pipeline ``run RECIPE`` command — prune, compact, benchmark, report — is next.)
"""

from __future__ import annotations

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


def main() -> None:
    """Entry point of the ``ssl-lightning`` console script."""
    cli()


if __name__ == "__main__":
    main()
