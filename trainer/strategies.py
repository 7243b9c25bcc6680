"""DeepSpeed ZeRO for recipes: Lightning's stock strategy, plus an opt-in CPU path.

``recipes/strategy/deepspeed_zero{1,2,3}.yaml`` name :class:`DeepSpeedZeroStrategy`. On CUDA
it *is* Lightning's ``DeepSpeedStrategy`` (every override below hands over to the stock
method), with one addition: a completion marker written after each checkpoint directory, so
that a directory cut short by a kill is never mistaken for a good one (see
``trainer.checkpointing.verify_checkpoint``).

On CPU the stock strategy refuses to run ("only supported on CUDA GPUs"). With
``cpu_fallback=True`` (set by the fragments) the strategy instead runs DeepSpeed's CPU
accelerator over gloo, which is how the test-suite exercises ZeRO-1/2/3 for real. That path
departs from the stock strategy in exactly three places, each a private Lightning method that
``tests/distributed/test_dist_strategy_canary.py`` pins by source hash:

1. ``setup_environment``: skip the CUDA-only check (``DDPStrategy.setup_environment`` is
   what the stock method calls after the check).
2. ``setup_distributed``: skip ``_validate_device_index_selection`` (CPU devices have no
   index).
3. ``deepspeed.initialize(args=Namespace(device_rank=...))`` gets the local rank instead of
   ``root_device.index`` (``None`` on CPU), in ``_setup_model_and_optimizer`` and
   ``_initialize_deepspeed_inference``.

It also sets ``DS_ACCELERATOR=cpu`` and turns off DeepSpeed's shared-memory comm op, whose
JIT build takes ~100 s on every CPU start and is only used for inference all-reduce.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as _StockDeepSpeedStrategy
from lightning.pytorch.strategies.deepspeed import remove_module_hooks

from trainer import atomic
from trainer.accelerator_guard import check_cpu_training
from trainer.checkpointing import ZERO_COMPLETE, ZERO_WRITING
from trainer.errors import UserError

#: the stock methods the CPU path replaces or relies on; the canary test pins their source
RELIES_ON = (
    "setup_environment",
    "setup_distributed",
    "_setup_model_and_optimizer",
    "_initialize_deepspeed_inference",
    "_init_deepspeed_distributed",
    "save_checkpoint",
)


class DeepSpeedZeroStrategy(_StockDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with atomic-completion markers and an opt-in CPU path.

    Args:
        cpu_fallback: run on CPU (DeepSpeed's CPU accelerator, gloo) when the trainer's
            accelerator is CPU, instead of failing. Default False; the recipe fragments set it.
            Relies on private Lightning methods (see module docstring); meant for tests and
            CPU-only machines, not for speed. Inside a SLURM job given GPUs it refuses (CUDA is
            broken there, see ``trainer.accelerator_guard``) unless ``COMPRESSSEG_ALLOW_CPU=1``;
            on a machine with NVIDIA GPUs it warns.
        force_ds_cpu_optimizer: DeepSpeed's ``zero_force_ds_cpu_optimizer``. With
            ``offload_optimizer`` DeepSpeed insists on ``DeepSpeedCPUAdam`` unless this is
            False; False lets a recipe's torch optimizer run offloaded (slower step, same
            maths). Default True (DeepSpeed's default).
        **kwargs: every argument of Lightning's ``DeepSpeedStrategy`` (``stage``,
            ``offload_optimizer``, ``offload_parameters``, ``config``...).
    """

    def __init__(self, *args: Any, cpu_fallback: bool = False, force_ds_cpu_optimizer: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cpu_fallback = cpu_fallback
        self.force_ds_cpu_optimizer = force_ds_cpu_optimizer
        if not force_ds_cpu_optimizer and isinstance(self.config, dict):
            self.config["zero_force_ds_cpu_optimizer"] = False

    # ------------------------------------------------------------------ CPU path
    @property
    def on_cpu(self) -> bool:
        """True when the CPU path is active (CPU accelerator and ``cpu_fallback``)."""
        return self.cpu_fallback and self.accelerator is not None and self.root_device.type == "cpu"

    def setup_environment(self) -> None:
        if not self.on_cpu:
            return super().setup_environment()
        # cpu_fallback is for machines without GPUs; where GPUs were meant to be used (a SLURM
        # GPU job) a broken CUDA install must fail, not train on the CPU
        check_cpu_training("DeepSpeedZeroStrategy(cpu_fallback=True)")
        _prepare_deepspeed_for_cpu()
        # (1) what the stock method runs after its CUDA check
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            return super().setup_distributed()
        # (2) the stock method minus _validate_device_index_selection
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _device_rank(self) -> int | None:
        return self.local_rank if self.on_cpu else self.root_device.index

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not self.on_cpu:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        # (3) the stock method with device_rank=local_rank
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model) -> None:
        if not self.on_cpu:
            return super()._initialize_deepspeed_inference(model)
        import deepspeed

        # (3) the stock method with device_rank=local_rank
        config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                config[key] = self.config[key]
        if self.zero_stage_3:
            config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        self.model, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()),
            config=config, model=model, optimizer=None, lr_scheduler=None,
            model_parameters=[], dist_init_required=False,
        )

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        # DeepSpeed overwrites a directory file by file; a kill in between leaves a mix of two
        # steps under a good-looking name. So rank 0 drops the completion marker and leaves a
        # "writing" marker before anyone writes, and swaps them back once every rank is done
        # (trainer.checkpointing.zero_checkpoint_problem reads both). Assumes a filesystem
        # shared by all ranks, as DeepSpeed's own 'latest' file does.
        filepath = Path(self.broadcast(str(filepath)))
        if self.is_global_zero:
            filepath.mkdir(parents=True, exist_ok=True)
            (filepath / ZERO_COMPLETE).unlink(missing_ok=True)
            (filepath / ZERO_WRITING).touch()
        self.barrier("compressseg_ckpt_begin")
        super().save_checkpoint(checkpoint, filepath, storage_options)
        self.barrier("compressseg_ckpt_end")
        if self.is_global_zero:
            _write_marker(filepath, self.world_size, (self.config.get("zero_optimization") or {}).get("stage", 0))
            (filepath / ZERO_WRITING).unlink(missing_ok=True)
        self.barrier("compressseg_ckpt_marked")


def _write_marker(directory: Path, world_size: int, stage: int) -> None:
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in (ZERO_COMPLETE, ZERO_WRITING) and not p.name.startswith(".")
    }
    text = json.dumps({"world_size": world_size, "zero_stage": stage, "files": files}, indent=1)
    atomic.write_text(directory / ZERO_COMPLETE, text)


def _prepare_deepspeed_for_cpu() -> None:
    """Select DeepSpeed's CPU accelerator and skip the slow shared-memory comm op build."""
    if "deepspeed" not in sys.modules:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        raise UserError(
            f"DeepSpeedZeroStrategy(cpu_fallback=True) on a CPU accelerator, but DeepSpeed was already "
            f"set up for {get_accelerator().device_name()!r}; set DS_ACCELERATOR=cpu before starting"
        )
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    del deepspeed
