"""LightningCLI wiring: recipes are YAML whose keys are constructor arguments.

The resolved recipe is stored inside every checkpoint (key ``compressseg``), next to the
class paths Lightning already saves, so ``restore_run`` and ``--ckpt_path`` can rebuild the
network, the data and every technique without the original YAML file.
"""
from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI

from trainer.errors import UserError
from trainer.module import SegmentationModule

from trainer.structure import CHECKPOINT_KEY

FORMAT_VERSION = 1


class RecipeInCheckpoint(pl.Callback):
    """Stores the resolved recipe (YAML text) and the command in each checkpoint."""

    def __init__(self, recipe_yaml: str, command: str):
        self.recipe_yaml = recipe_yaml
        self.command = command

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault(CHECKPOINT_KEY, {}).update(
            format_version=FORMAT_VERSION, recipe=self.recipe_yaml, command=self.command
        )


class RecipeCLI(LightningCLI):
    """LightningCLI whose parse errors are one line and whose checkpoints carry the recipe."""

    def __init__(self, args: list[str], run: bool = True):
        super().__init__(
            SegmentationModule,
            pl.LightningDataModule,
            subclass_mode_data=True,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            auto_configure_optimizers=False,
        )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        recipe = yaml.safe_dump(
            yaml.safe_load(self.parser.dump(cfg, skip_link_targets=False, skip_none=False)),
            sort_keys=False,
        ) if not sub else yaml.safe_dump(yaml.safe_load(self._subparser_dump(sub, cfg)), sort_keys=False)
        self.trainer.callbacks.append(RecipeInCheckpoint(recipe, sub or "run"))

    def _subparser_dump(self, sub: str, cfg) -> str:
        return self._subcommand_parsers[sub].dump(cfg, skip_link_targets=False, skip_none=False)


def run_lightning_cli(argv: list[str]) -> RecipeCLI:
    # LightningCLI warns when args= and sys.argv both hold words; launch.py passes argv on
    # purpose (and Lightning's DDP launcher re-executes sys.argv), so the warning is noise.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        return RecipeCLI(argv)
    except (SystemExit,) as exc:
        if exc.code in (0, None):
            raise
        raise UserError(f"recipe could not be parsed (see message above); args: {' '.join(argv)}") from None
    except Exception as exc:  # jsonargparse's ArgumentError and friends
        if type(exc).__name__ in ("ArgumentError", "NSKeyError"):
            raise UserError(_one_line(exc, argv)) from None
        raise


def _one_line(exc: Exception, argv: list[str]) -> str:
    config = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")), "command line")
    text = " ".join(str(exc).split())
    return f"{config}: {text}"
