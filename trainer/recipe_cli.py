"""LightningCLI wiring: recipes are YAML whose keys are constructor arguments.

The resolved recipe is stored inside every checkpoint (key ``compressseg``), next to the
class paths Lightning already saves, so ``restore_run`` and ``--ckpt_path`` can rebuild the
network, the data and every technique without the original YAML file.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
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

    # Issue 4 (scale): exact resume, atomic checkpoints and SLURM requeue are always on, not
    # recipe options: RNGState + RequeueOnSignal callbacks, AtomicCheckpointIO, and
    # SLURMEnvironment(auto_requeue=False) inside SLURM jobs (trainer/checkpointing.py).
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        from trainer.checkpointing import always_on_trainer_kwargs

        trainer_cfg = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return super().instantiate_trainer(**{**kwargs, **always_on_trainer_kwargs(trainer_cfg)})

    # Issue 4: ``--ckpt_path last`` / ``last-or-fresh`` -> newest checkpoint that passes the
    # integrity check (a corrupt one is reported and skipped); explicit paths are checked.
    def _resolve_ckpt_path(self) -> None:
        from trainer.checkpointing import resolve_resume_path

        cfg = self.config_init[self.subcommand]
        if "ckpt_path" in cfg:
            cfg["ckpt_path"] = resolve_resume_path(self.trainer, cfg["ckpt_path"])

    def before_fit(self) -> None:
        # a SLURM job given GPUs must not quietly train on the CPU (trainer/accelerator_guard.py)
        from trainer.accelerator_guard import check_trainer

        check_trainer(self.trainer)
        self._resolve_ckpt_path()

    before_validate = before_test = _resolve_ckpt_path

    def after_fit(self) -> None:
        # Pipelines need to know whether fit ran to its end or stopped early (requeue, kill):
        # a run that stopped early leaves "completed": false and is resumed, not skipped.
        write_fit_status(self.trainer)


FIT_STATUS = "fit_status.json"


def write_fit_status(trainer: pl.Trainer) -> None:
    """Write ``<default_root_dir>/fit_status.json`` on rank 0 (atomically)."""
    if trainer.global_rank != 0:
        return
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    completed = (max_steps > 0 and trainer.global_step >= max_steps) or (
        max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs
    )
    status = {"completed": bool(completed and not trainer.interrupted), "epoch": trainer.current_epoch,
              "global_step": trainer.global_step}
    path = Path(trainer.default_root_dir) / FIT_STATUS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


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
        # A UserError raised by a constructor (e.g. a callback's argument check) reaches us
        # wrapped by jsonargparse in a ValueError ("Does not validate against any of the Union
        # subtypes"); report the user's error itself, in one line, with exit status 2.
        cause = exc
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def _one_line(exc: Exception, argv: list[str]) -> str:
    config = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")), "command line")
    text = " ".join(str(exc).split())
    return f"{config}: {text}"
