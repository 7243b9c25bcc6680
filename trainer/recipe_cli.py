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

from lightning.fabric.utilities.exceptions import MisconfigurationException

from trainer import atomic
from trainer.errors import UserError
from trainer.module import SegmentationModule
from trainer.recipe_rules import apply_recipe_rules, check_recipe_arguments
from trainer.run_outputs import FRESH_OUTPUTS

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
        check_recipe_arguments(args)  # regular files, bounded YAML without alias bombs
        self._where = _config_name(args)
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

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would load ``--ckpt_path``'s hyperparameters into the config here,
        # before any integrity check, letting the checkpoint choose (and import) the network
        # class and silently replace the recipe's. The recipe builds the model; the checkpoint
        # is checked (``before_fit``) and must fit it (``SegmentationModule.on_load_checkpoint``).
        pass

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        apply_recipe_rules(self.config[sub] if sub else self.config, self._where)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as exc:  # a constructor refused a recipe value
            raise _constructor_error(exc, self._where) from None
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
        if trainer_cfg.get("logger") in (None, True):  # the run directory's CSV log (trainer/recipe_rules.py)
            from lightning.pytorch.loggers import CSVLogger

            kwargs["logger"] = CSVLogger(trainer_cfg.get("default_root_dir") or os.getcwd(), name="logs")
        trainer = super().instantiate_trainer(**{**kwargs, **always_on_trainer_kwargs(trainer_cfg)})
        FRESH_OUTPUTS.note_trainer(trainer)  # removed again if this run fails before writing anything
        return trainer

    # Issue 4: ``--ckpt_path last`` / ``last-or-fresh`` -> newest checkpoint that passes the
    # integrity check (a corrupt one is reported and skipped); explicit paths are checked.
    def _resolve_ckpt_path(self) -> None:
        from trainer.checkpointing import resolve_resume_path

        cfg = self.config_init[self.subcommand]
        if "ckpt_path" in cfg:
            value = cfg["ckpt_path"]
            if value and value not in _LIGHTNING_CKPT_WORDS and "://" not in str(value) and not os.path.lexists(value):
                raise UserError(f"--ckpt_path {value} does not exist")
            cfg["ckpt_path"] = resolve_resume_path(self.trainer, value)

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
    atomic.write_text(Path(trainer.default_root_dir) / FIT_STATUS, json.dumps(status))


def run_lightning_cli(argv: list[str]) -> RecipeCLI:
    # LightningCLI warns when args= and sys.argv both hold words; launch.py passes argv on
    # purpose (and Lightning's DDP launcher re-executes sys.argv), so the warning is noise.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        return _run(argv)
    except BaseException:
        FRESH_OUTPUTS.remove_empty()  # a failed run leaves no empty logs/version_N behind
        raise


def _run(argv: list[str]) -> RecipeCLI:
    try:
        return RecipeCLI(argv)
    except (SystemExit,) as exc:
        if exc.code in (0, None):
            raise
        raise UserError(f"recipe could not be parsed (see message above); args: {' '.join(argv)}") from None
    except Exception as exc:  # jsonargparse's ArgumentError and friends
        if type(exc).__name__ in ("ArgumentError", "NSKeyError"):
            raise UserError(_one_line(exc, argv)) from None
        if isinstance(exc, MisconfigurationException):  # Lightning refusing a setting, at any point
            raise UserError(f"{_config_name(argv)}: {_first_line(exc)}") from None
        cause = _user_error_in(exc)
        if cause is not None:
            raise cause from None
        raise


def _user_error_in(exc: BaseException) -> UserError | None:
    # A UserError raised by a constructor (e.g. a callback's argument check) reaches us
    # wrapped by jsonargparse in a ValueError ("Does not validate against any of the Union
    # subtypes"); the user's error itself is reported, in one line, with exit status 2.
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__ or cause.__context__
    return cause


#: constructor failures that mean "this recipe value is refused" (not a bug of ours)
_REFUSALS = (ValueError, TypeError, AssertionError, ZeroDivisionError, MisconfigurationException)
#: ``--ckpt_path`` words Lightning resolves itself
_LIGHTNING_CKPT_WORDS = ("best", "last", "hpc", "registry", "last-or-fresh")


def _constructor_error(exc: BaseException, where: str) -> BaseException:
    """The one-line error for a constructor that refused a recipe value, naming its class."""
    cause = _user_error_in(exc)
    if cause is not None:
        return cause
    if not isinstance(exc, _REFUSALS):
        return exc
    # jsonargparse wraps a constructor's own error ("Does not validate against any of the
    # Union subtypes"); the innermost one in the chain is the constructor's words
    inner, cause = exc, exc.__cause__ or exc.__context__
    while cause is not None:
        inner = cause if isinstance(cause, _REFUSALS) else inner
        cause = cause.__cause__ or cause.__context__
    owner = _refusing_class(inner)
    return UserError(f"{where}: {owner + ' ' if owner else ''}refused its arguments: {type(inner).__name__}: {_first_line(inner)}")


def _refusing_class(exc: BaseException) -> str:
    """``Class.__init__`` of the innermost constructor frame in the traceback, if any."""
    owner, tb = "", exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            owner = f"{type(frame.f_locals['self']).__name__}.__init__"
        tb = tb.tb_next
    return owner


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _config_name(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.partition("=")[2]
    return "command line"


def _one_line(exc: Exception, argv: list[str]) -> str:
    return f"{_config_name(argv)}: {' '.join(str(exc).split())}"
