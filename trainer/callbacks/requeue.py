"""Checkpoint-and-requeue on SLURM's warning signal (USR1) or a preemption SIGTERM.

The signal handler (``trainer/requeue_signals.py``) does nothing but note the signal: writing
a checkpoint from inside a handler can stall or corrupt it (Lightning#21406), and a handler
runs on one rank at an arbitrary instruction. ``launch.py fit`` installs it inside SLURM jobs
before anything heavy is imported, so a signal that arrives during start-up is not lost (the
default action of USR1 would kill the job without a checkpoint).

:class:`RequeueOnSignal` (added to every run by ``RecipeCLI``) acts at safe points, where all
ranks agree (one all-reduce of the flag):

* ``on_train_start``: a signal that came before training -> requeue at once (nothing new to save);
* ``on_train_batch_end`` after an optimizer step, and ``on_validation_end`` during fit ->
  ``trainer.save_checkpoint(<checkpoint dir>/requeue.ckpt)`` (atomic), then rank 0 runs
  ``scontrol requeue $SLURM_JOB_ID`` and training stops.

Never mid-accumulation: the partial gradient sum is not part of a checkpoint.

The restarted job resumes because the sbatch script passes ``--ckpt_path last-or-fresh`` when
``SLURM_RESTART_COUNT > 0``; ``requeue.ckpt`` is then the newest checkpoint. Lightning's own
SLURM auto-requeue is switched off (``SLURMEnvironment(auto_requeue=False)``), and its SIGTERM
handler, which would end the run at the next batch before anything is saved, is replaced by
ours while training.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from trainer.requeue_signals import install_signal_handlers, installed, received, slurm_job_id


class RequeueOnSignal(pl.Callback):
    """Saves a checkpoint and requeues the SLURM job at the first safe point after a signal.

    Inert unless :func:`install_signal_handlers` ran in this process (``launch.py fit`` does
    so inside a SLURM job).

    Args:
        filename: checkpoint name, written next to the run's ModelCheckpoint files (or in
            ``<default_root_dir>/checkpoints`` without one). Default ``requeue.ckpt``.
        requeue: run ``scontrol requeue`` after saving. Default True; False only saves and stops.
    """

    def __init__(self, filename: str = "requeue.ckpt", requeue: bool = True):
        if not filename.endswith(".ckpt") or "/" in filename:
            raise ValueError(f"RequeueOnSignal: filename={filename!r} must be a plain name ending in .ckpt")
        self.filename = filename
        self.requeue = requeue
        self._last_step = -1
        self._at_step_boundary = True  # the last training batch completed an optimizer step
        self._done = False

    @property
    def active(self) -> bool:
        return bool(installed())

    # ---------------------------------------------------------------- safe points
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_signals_back()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_signals_back()
        self._last_step = trainer.global_step
        if self._signalled(trainer):
            rank_zero_info(f"RequeueOnSignal: signal {received()} arrived before training; requeueing without a new checkpoint")
            self._requeue_and_stop(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the same on every rank, so the collective in _signalled runs on all of them or none
        self._at_step_boundary = trainer.global_step != self._last_step
        self._last_step = trainer.global_step
        if self._at_step_boundary and self._signalled(trainer):
            self._save_requeue_and_stop(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a validation may fall mid-accumulation (val_check_interval in batches): then wait for
        # the step to complete, at the next on_train_batch_end
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self._at_step_boundary:
            return
        if self._signalled(trainer):
            self._save_requeue_and_stop(trainer)

    # ---------------------------------------------------------------- actions
    def _take_signals_back(self) -> None:
        # Trainer.fit wraps SIGTERM in Lightning's handler, which ends the run at the next batch
        # (SIGTERMException) before any checkpoint; while training, ours alone handles it.
        if self.active and not self._done:
            install_signal_handlers(installed())

    def _signalled(self, trainer: pl.Trainer) -> bool:
        if not self.active or self._done:
            return False
        # one rank may have been signalled a moment before the others: decide together
        return bool(trainer.strategy.reduce_boolean_decision(received() is not None, all=False))

    def _save_requeue_and_stop(self, trainer: pl.Trainer) -> None:
        path = self.checkpoint_path(trainer)
        rank_zero_info(f"RequeueOnSignal: signal {received()} received; saving {path} at step {trainer.global_step}")
        trainer.save_checkpoint(path)  # collective; atomic through AtomicCheckpointIO
        self._requeue_and_stop(trainer)

    def _requeue_and_stop(self, trainer: pl.Trainer) -> None:
        self._done = True
        trainer.should_stop = True
        if self.requeue and trainer.is_global_zero:
            requeue_job()
        trainer.strategy.barrier("compressseg_requeue")

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        dirpath = next((cb.dirpath for cb in trainer.checkpoint_callbacks
                        if isinstance(cb, ModelCheckpoint) and cb.dirpath), None)
        return Path(dirpath or Path(trainer.default_root_dir) / "checkpoints") / self.filename


def requeue_job() -> bool:
    """``scontrol requeue <this job>``; False (with a warning) when that fails or there is no job."""
    job = slurm_job_id()
    if not job:
        rank_zero_warn("RequeueOnSignal: no SLURM_JOB_ID; checkpoint saved, not requeued")
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        rank_zero_warn(f"RequeueOnSignal: scontrol requeue {job} failed: {exc}")
        return False
    if done.returncode != 0:
        rank_zero_warn(f"RequeueOnSignal: scontrol requeue {job} exited {done.returncode}: {done.stderr.strip()[:200]}")
        return False
    rank_zero_info(f"RequeueOnSignal: requeued SLURM job {job}")
    return True
