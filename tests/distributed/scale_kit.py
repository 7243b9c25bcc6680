"""Helpers for the multi-process, resume and SLURM tests (imported by class path in recipes).

Everything here is tiny on purpose: a step takes milliseconds, so a subprocess run costs
mostly its start-up. Recipes name these classes as ``scale_kit.X`` with ``tests/distributed``
on ``PYTHONPATH`` (see :func:`env_with_kit`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from torch import nn
from torch.utils.data.distributed import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

KIT = Path(__file__).resolve().parent
TESTS = KIT.parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from tinydata import TinySegDataModule  # noqa: E402


# ============================================================================ data and nets
class ResumableTinySeg(TinySegDataModule):
    """TinySegDataModule with what exact resume needs (field notes): a StatefulDataLoader and
    a rank-aware, shuffling ``DistributedSampler`` whose epoch is set in ``train_dataloader``
    (recipes set ``trainer.use_distributed_sampler: false``)."""

    def __init__(self, *args: Any, shuffle: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.shuffle = shuffle

    def train_dataloader(self):
        trainer = self.trainer
        sampler = DistributedSampler(self.train_items, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                     shuffle=self.shuffle, seed=self.hparams.seed)
        sampler.set_epoch(trainer.current_epoch)
        return StatefulDataLoader(self.train_items, batch_size=self.hparams.batch_size, sampler=sampler)

    def val_dataloader(self):
        trainer = self.trainer
        if trainer is None:  # used outside a Trainer (export verification, restore_run)
            return super().val_dataloader()
        sampler = DistributedSampler(self.val_items, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                     shuffle=False)
        return StatefulDataLoader(self.val_items, batch_size=2, sampler=sampler)


class UnevenValTinySeg(ResumableTinySeg):
    """Validation as the real datamodules shard it (contiguous blocks, nothing duplicated), with
    images of different sizes: ranks get different numbers of batches, and a sliding window
    needs a different number of forward passes per image (``val_sizes``, batch 1)."""

    def __init__(self, *args: Any, val_sizes: tuple[int, ...] = (16, 24, 40), **kwargs: Any):
        super().__init__(*args, **kwargs)
        from tinydata import make_sample

        self.val_items = [make_sample(20_000 + i, 2, size, 3) for i, size in enumerate(val_sizes)]

    def val_dataloader(self):
        trainer = self.trainer
        if trainer is None:
            return super().val_dataloader()
        n, world, rank = len(self.val_items), trainer.world_size, trainer.global_rank
        items = self.val_items[rank * n // world:(rank + 1) * n // world]
        return StatefulDataLoader(items, batch_size=1)


class DropoutNet(nn.Module):
    """conv-instance norm-ReLU-dropout-conv: per-sample norm, and a training step that draws
    from the global RNG (so RNG state matters for exact resume)."""

    def __init__(self, num_classes: int = 3, channels: int = 8, dropout: float = 0.3):
        super().__init__()
        self.spatial_dims = 2
        self.in_channels = 1
        self.divisor = 1
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.InstanceNorm2d(channels, affine=True), nn.ReLU(),
            nn.Dropout2d(dropout), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Dropout(dropout), nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ============================================================================ test callbacks
def _is_first_attempt() -> bool:
    return os.environ.get("SCALE_KIT_ATTEMPT", "0") == "0" and os.environ.get("SLURM_RESTART_COUNT", "0") == "0"


class KillAt(pl.Callback):
    """SIGKILLs the whole process group (all ranks) at a chosen point, on rank 0.

    Args:
        phase: ``batch_end`` (after the training batch with global batch index ``batch``;
            mid-accumulation when that batch does not complete a step), ``before_step``
            (after backward, before the optimizer step of that batch), ``validation`` (after
            the first validation batch that follows it), ``epoch_end`` (in the
            ``on_train_epoch_end`` that follows it: after ModelCheckpoint's batch-end save,
            before its epoch-end save).
        batch: 0-based count of training batches seen by this process (across epochs).
        attempt: only kill when env SCALE_KIT_ATTEMPT equals this.
    """

    def __init__(self, phase: str = "batch_end", batch: int = 3, attempt: int = 0):
        if phase not in ("batch_end", "before_step", "validation", "epoch_end"):
            raise ValueError(f"KillAt: phase={phase!r}")
        self.phase, self.batch, self.attempt = phase, batch, attempt
        self._seen = 0
        self._armed = False

    def _active(self, trainer) -> bool:
        return trainer.is_global_zero and os.environ.get("SCALE_KIT_ATTEMPT", "0") == str(self.attempt)

    def _kill(self) -> None:
        sys.stdout.flush()
        os.killpg(os.getpgrp(), signal.SIGKILL)

    def on_train_start(self, trainer, pl_module) -> None:
        # batches already trained before a resume count too
        self._seen = trainer.global_step * trainer.accumulate_grad_batches

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.phase == "before_step" and self._active(trainer) and self._seen == self.batch:
            self._kill()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._active(trainer) and self._seen == self.batch:
            if self.phase == "batch_end":
                self._kill()
            self._armed = self.phase in ("validation", "epoch_end")
        self._seen += 1

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._armed and self.phase == "validation" and not trainer.sanity_checking:
            self._kill()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._armed and self.phase == "epoch_end":
            self._kill()


class PauseAt(pl.Callback):
    """On the first attempt, rank 0 writes ``marker`` after optimizer step ``step`` and waits
    (up to ``timeout`` s) for a requeue signal, so a test can signal at a known point."""

    def __init__(self, step: int, marker: str, timeout: float = 120.0):
        self.step, self.marker, self.timeout = step, marker, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not (_is_first_attempt() and trainer.is_global_zero and trainer.global_step == self.step):
            return
        from trainer.requeue_signals import received

        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while received() is None and time.monotonic() < deadline:
            time.sleep(0.05)


class SleepPerStep(pl.Callback):
    """Makes each training batch take at least ``seconds`` (to give signals time to arrive)."""

    def __init__(self, seconds: float = 0.2):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


# ============================================================================ recipes and runs
def recipe(run_dir: Path, *, devices: int = 1, precision: str = "32-true", max_steps: int = 12,
           accumulate: int = 1, net: str = "dropout", batch_size: int = 2, n_train: int = 8,
           val_every: int | None = 4, callbacks: list[dict] | None = None, strategy: Any = None,
           keep: int = 3, sync_batchnorm: bool = False, batch_dice: bool = True, ckpt_every: int = 1,
           shuffle: bool = True, data: str = "resumable") -> dict:
    """A tiny fit recipe whose checkpoints go to ``run_dir/checkpoints`` every ``ckpt_every``
    steps (the ``keep`` newest kept, plus ``last.ckpt``)."""
    nets = {
        "dropout": {"class_path": "scale_kit.DropoutNet", "init_args": {"num_classes": 3}},
        "unet_instance": {"class_path": "trainer.models.UNet",
                          "init_args": {"spatial_dims": 2, "num_classes": 3, "depth": 2, "base_channels": 4,
                                        "norm": "instance"}},
        "unet_batch": {"class_path": "trainer.models.UNet",
                       "init_args": {"spatial_dims": 2, "num_classes": 3, "depth": 2, "base_channels": 4,
                                     "norm": "batch"}},
    }
    trainer: dict[str, Any] = {
        "accelerator": "cpu", "devices": devices, "precision": precision, "max_steps": max_steps,
        "max_epochs": -1, "accumulate_grad_batches": accumulate, "use_distributed_sampler": False,
        "default_root_dir": str(run_dir), "logger": False, "enable_progress_bar": False,
        "enable_model_summary": False, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
        "sync_batchnorm": sync_batchnorm,
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(run_dir / "checkpoints"), "filename": "{step:04d}",
                           "every_n_train_steps": ckpt_every, "save_top_k": keep, "monitor": "step", "mode": "max",
                           "save_last": True,
                           # without it, Lightning 2.6 defers the epoch's last save to a validation
                           # that may not run, then saves mid-accumulation (inexact resume)
                           "save_on_train_epoch_end": True}},
            *(callbacks or []),
        ],
    }
    if val_every:
        trainer["val_check_interval"] = val_every * accumulate
        trainer["check_val_every_n_epoch"] = None
    else:
        trainer["limit_val_batches"] = 0
    if strategy is not None:
        trainer["strategy"] = strategy
    return {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {
            "net": nets[net], "num_classes": 3,
            "loss": {"class_path": "trainer.losses.DiceCE", "init_args": {"batch_dice": batch_dice}},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
        },
        "data": {"class_path": {"resumable": "scale_kit.ResumableTinySeg", "uneven_val": "scale_kit.UnevenValTinySeg"}[data],
                 "init_args": {"size": 16, "n_train": n_train, "n_val": 4, "batch_size": batch_size,
                               "shuffle": shuffle}},
    }


def write_recipe(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def env_with_kit(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    parts = [str(ROOT), str(TESTS), str(KIT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.update(WANDB_MODE="offline", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def launch(args: list[str], env: dict[str, str], timeout: float = 300, check: bool = True,
           log: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``launch.py ARGS`` in its own process group; kill the whole group on exit or timeout
    (a SIGKILLed rank 0 leaves the other ranks alive)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"launch.py {' '.join(args)} timed out after {timeout}s:\n{out[-4000:]}")
    finally:
        kill_group(proc.pid)
    if log is not None:
        with open(log, "a") as fh:
            fh.write(f"\n$ launch.py {' '.join(args)}  (rc={proc.returncode})\n{out}")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}")
    return done


def run_driver(out: Path, scenarios: list[str], timeout: float = 600) -> int:
    """Run ``dist_driver.py OUT SCENARIO...`` on 2 ranks (torchrun); its output goes to
    ``OUT/driver.log``. Returns the exit status (-9 after a timeout: a scenario hung)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(KIT / "dist_driver.py"), str(out), *scenarios]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env_with_kit(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        log, _ = proc.communicate()
        log, code = log + f"\n[timed out after {timeout}s: a scenario hung]", -9
    finally:
        kill_group(proc.pid)
    (out / "driver.log").write_text(log)
    return code


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The network weights in ``run_dir/checkpoints/last.ckpt``."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str = "") -> None:
    assert a.keys() == b.keys(), f"{what}: different keys"
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{what}: {len(differing)} tensors differ, e.g. {differing[0]}: max |diff| " \
                          f"{(a[differing[0]].float() - b[differing[0]].float()).abs().max().item():.3g}"


class RecordBatches(pl.Callback):
    """Appends ``epoch step batch_idx rank sample-indices torch-rng-hash`` per training batch to
    ``path`` (diagnostics: where a resumed run departs from the uninterrupted one)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import hashlib

        rng = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:8]
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as fh:
            fh.write(f"{trainer.current_epoch} {trainer.global_step} {batch_idx} {batch['index'].tolist()} {rng}\n")


class RecordLosses(pl.Callback):
    """Rank 0 appends every rank's training loss of each batch to ``path`` (one JSON list per line)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import json

        loss = outputs["loss"].detach().float().reshape(1)
        gathered = trainer.strategy.all_gather(loss).reshape(-1).tolist()
        if trainer.is_global_zero:
            with open(self.path, "a") as fh:
                fh.write(json.dumps([float.hex(v) for v in gathered]) + "\n")


class TeacherProbe(pl.Callback):
    """After the first training batch, rank 0 writes to ``path`` where the distillation teacher
    lives: its parameter count, whether DeepSpeed partitioned any of its parameters (``ds_id``),
    and whether any of them is among the LightningModule's (the engine's) parameters."""

    def __init__(self, path: str):
        self.path = path
        self._done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import json

        if self._done:
            return
        self._done = True
        teacher = next((cb.teacher for cb in trainer.callbacks if isinstance(getattr(cb, "teacher", None), nn.Module)), None)
        if teacher is None or not trainer.is_global_zero:
            return
        params = list(teacher.parameters())
        engine_ids = {id(p) for p in trainer.model.parameters()}
        Path(self.path).write_text(json.dumps({
            "params": len(params),
            "numel": sum(p.numel() for p in params),
            "partitioned": sum(hasattr(p, "ds_id") for p in params),
            "in_engine": sum(id(p) in engine_ids for p in params),
            "trainable": sum(p.requires_grad for p in params),
            "student_partitioned": sum(hasattr(p, "ds_id") for p in pl_module.parameters()),
        }))
