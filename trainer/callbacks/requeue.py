"""Checkpoint-and-requeue on the cluster's USR1/TERM, at a safe point, once.

The signal path (every process of the job step is signalled):

1. ``launch.py fit`` installs a flag-only handler for USR1 and TERM within milliseconds of its
   start (``trainer/requeue_signals.py``); DataLoader workers leave both signals to their main
   process (the framework's datamodules shield them); Lightning's own SIGTERM handler, which
   broadcasts from inside the handler and ends the run before anything is saved, is kept out.
2. :class:`RequeueOnSignal` (added to every run by ``RecipeCLI``) looks at the flag at safe
   points, all ranks deciding together (one all-reduce): after an optimizer step (never
   mid-accumulation: the partial gradient sum is not in a checkpoint) and at the end of a
   validation that follows one. There it writes ``<checkpoint dir>/requeue.ckpt`` (atomic),
   rank 0 asks Slurm to requeue the job (below), and every rank raises :class:`RequeueStop`:
   nothing else runs (no extra validation, no epoch-end hooks, no further checkpoint that
   would hold a cut-short epoch), and ``launch.py fit`` exits 0.
3. The restarted job runs with ``--ckpt_path last-or-fresh``, which resumes from the checkpoint
   holding the latest training state (``trainer/checkpointing.py``): ``requeue.ckpt``.

Edge cases:

* a signal before training (during start-up or the sanity check): requeue without a checkpoint;
* a signal after the last training step: the run finishes (its final checkpoints are written)
  instead of requeueing;
* whether to requeue is read from Slurm (``scontrol show job``): a job that Slurm is already
  requeueing (outside ``scontrol requeue``, preemption in REQUEUE mode) is not requeued again,
  and a job being cancelled (plain ``scancel``) is not brought back; a running job (the
  ``--signal`` timer, ``scancel -s``) and one at its time limit are requeued;
* no progress: an allocation that ends without a single new optimizer step counts as idle
  (``requeue_history.json`` next to the checkpoints); after ``max_idle_allocations`` idle ones
  in a row the job stops requeueing and exits 2 with the reason.

Timing: from the signal to the checkpoint on disk takes at most the rest of the current
optimizer step (``accumulate_grad_batches`` batches), or the rest of a running validation, plus
the checkpoint write. It must fit in the ``--signal-lead`` for USR1, and in Slurm's ``KillWait``
(30 s by default) for TERM; past it SIGKILL ends the job, the atomic writer leaves the previous
checkpoint intact, and the next start resumes from that one.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from trainer import atomic
from trainer.errors import UserError
from trainer.requeue_signals import (
    install_signal_handlers, installed, loader_is_shielded, received, signal_name, slurm_job_id,
)

HISTORY = "requeue_history.json"


class RequeueStop(Exception):
    """Raised on every rank once the requeue checkpoint is written: the run stops right there."""


class RequeueOnSignal(pl.Callback):
    """Saves a checkpoint and requeues the SLURM job at the first safe point after a signal.

    Inert unless :func:`~trainer.requeue_signals.install_signal_handlers` ran in this process
    (``launch.py fit`` does so inside a SLURM job).

    Args:
        filename: checkpoint name, written next to the run's ModelCheckpoint files (or in
            ``<default_root_dir>/checkpoints`` without one). Default ``requeue.ckpt``.
        requeue: ask Slurm to requeue after saving. Default True; False only saves and stops.
        max_idle_allocations: stop requeueing after this many consecutive allocations of the
            job that made no optimizer step (0: never stop). Default 3.
    """

    def __init__(self, filename: str = "requeue.ckpt", requeue: bool = True, max_idle_allocations: int = 3):
        if not filename.endswith(".ckpt") or "/" in filename:
            raise ValueError(f"RequeueOnSignal: filename={filename!r} must be a plain name ending in .ckpt")
        if max_idle_allocations < 0:
            raise ValueError(f"RequeueOnSignal: max_idle_allocations={max_idle_allocations} must be >= 0")
        self.filename = filename
        self.requeue = requeue
        self.max_idle_allocations = max_idle_allocations
        # identifies the process that wrote a checkpoint: resume selection compares training
        # states among the checkpoints of the most recent writer (trainer/checkpointing.py)
        self.writer = uuid.uuid4().hex[:12]
        self._start_step = 0
        self._last_step = -1
        self._at_step_boundary = True  # the last training batch completed an optimizer step
        self._done = False
        self._warned_loaders = False
        self._vote = _SignalVote()

    @property
    def active(self) -> bool:
        return bool(installed())

    def state_dict(self) -> dict:
        return {"writer": self.writer}

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # the writer id is this process's own; a resumed run is a new writer

    # ---------------------------------------------------------------- safe points
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.active and stage == "fit":
            _keep_lightning_off_signals(trainer)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_signals_back()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_signals_back()
        self._start_step = self._last_step = trainer.global_step
        self._warn_unshielded(trainer)
        if self.active:
            self._vote.open(trainer.world_size)
        if self._signalled(trainer):
            self._stop(trainer, save=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the same on every rank, so the vote below runs on all of them or none
        self._at_step_boundary = trainer.global_step != self._last_step
        self._last_step = trainer.global_step
        if self._at_step_boundary and self.active and not self._done and self._vote.poll(received() is not None):
            self._stop(trainer, save=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._vote.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._vote.close()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a validation may fall mid-accumulation (val_check_interval in batches): then wait for
        # the step to complete, at the next on_train_batch_end
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self._at_step_boundary:
            return
        if self._signalled(trainer):
            self._stop(trainer, save=True)

    # ---------------------------------------------------------------- decisions
    def _take_signals_back(self) -> None:
        # a fallback should Lightning have installed its SIGTERM handler after all
        if self.active and not self._done:
            install_signal_handlers(installed())

    def _signalled(self, trainer: pl.Trainer) -> bool:
        if not self.active or self._done:
            return False
        # one rank may have been signalled a moment before the others: decide together
        return bool(trainer.strategy.reduce_boolean_decision(received() is not None, all=False))

    def _stop(self, trainer: pl.Trainer, save: bool) -> None:
        self._done = True
        self._vote.close()
        sig = signal_name(received()) if received() is not None else "a requeue signal (on another rank)"
        if _training_finished(trainer):
            rank_zero_info(f"RequeueOnSignal: {sig} after the last training step (step {trainer.global_step}); "
                           "finishing the run instead of requeueing")
            return
        if save:
            path = self.checkpoint_path(trainer)
            rank_zero_info(f"RequeueOnSignal: {sig} received; saving {path} at step {trainer.global_step}")
            trainer.save_checkpoint(path)  # collective; atomic through AtomicCheckpointIO
        else:
            rank_zero_info(f"RequeueOnSignal: {sig} arrived before training (step {trainer.global_step}); "
                           "stopping without a new checkpoint")
        why_not = trainer.strategy.broadcast(self._idle_check(trainer) if trainer.is_global_zero else None, src=0)
        if why_not:
            raise UserError(why_not)
        if trainer.is_global_zero:
            from trainer.recipe_cli import write_fit_status

            write_fit_status(trainer)  # before the requeue: from then on Slurm kills the job after KillWait
            if self.requeue:
                requeue_job()
        trainer.strategy.barrier("compressseg_requeue")
        raise RequeueStop(f"stopped at step {trainer.global_step} on {sig}")

    def _idle_check(self, trainer: pl.Trainer) -> str | None:
        """Rank 0: count consecutive allocations without an optimizer step; why not to requeue, if so."""
        path = self.checkpoint_path(trainer).parent / HISTORY
        job = slurm_job_id() or "-"
        try:
            history = json.loads(path.read_text())
        except (OSError, ValueError):
            history = {}
        idle = int(history.get("idle_allocations", 0)) if history.get("job") == job else 0
        idle = 0 if trainer.global_step > self._start_step else idle + 1
        atomic.write_text(path, json.dumps({"job": job, "idle_allocations": idle, "global_step": trainer.global_step,
                                            "restart": os.environ.get("SLURM_RESTART_COUNT", "0")}))
        if not self.max_idle_allocations or idle < self.max_idle_allocations:
            return None
        return (f"RequeueOnSignal: job {job} made no optimizer step in {idle} consecutive allocations (still at step "
                f"{trainer.global_step}; each was signalled before it could train); not requeueing it again. "
                "Start-up takes longer than the time between the job's start and its warning signal: lengthen --time "
                f"or shorten --signal-lead (see launch.py submit --startup-time); history in {path}")

    def _warn_unshielded(self, trainer: pl.Trainer) -> None:
        if not self.active or self._warned_loaders:
            return
        self._warned_loaders = True
        if not all(loader_is_shielded(loader) for loader in _leaves(trainer.train_dataloader)):
            rank_zero_warn("RequeueOnSignal: the train loader's workers are not shielded from the cluster's signals: "
                           "a TERM (preemption, time limit, scancel -s TERM) kills them and the run fails before its "
                           "checkpoint. Build loaders with trainer.requeue_signals.shield_loader_kwargs(num_workers).")

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        dirpath = next((cb.dirpath for cb in trainer.checkpoint_callbacks
                        if isinstance(cb, ModelCheckpoint) and cb.dirpath), None)
        return Path(dirpath or Path(trainer.default_root_dir) / "checkpoints") / self.filename


class _SignalVote:
    """Whether any rank was signalled, agreed without a collective on the training device.

    Asked at every optimizer step, a ``reduce_boolean_decision`` would be an all-reduce on the
    GPU stream plus a host sync per step under NCCL. Instead each step starts an asynchronous
    all-reduce (MAX) of a CPU flag on a gloo group and reads the *previous* step's result: every
    rank decides from the same numbers at the same safe point, one step after the signal (the
    warning comes minutes before the limit). One rank alone needs no vote.
    """

    def __init__(self) -> None:
        self.group = None
        self.pending: tuple | None = None
        self.alone = True

    def open(self, world_size: int) -> None:
        self.alone = world_size <= 1 or not (dist.is_available() and dist.is_initialized())
        if not self.alone and self.group is None:
            self.group = dist.new_group(backend="gloo")  # every rank calls on_train_start: collective

    def poll(self, flag: bool) -> bool:
        if self.alone:
            return flag
        decided = self._collect()
        ballot = torch.tensor([int(flag)], dtype=torch.int32)
        self.pending = (dist.all_reduce(ballot, op=dist.ReduceOp.MAX, group=self.group, async_op=True), ballot)
        return decided

    def close(self) -> None:
        self._collect()

    def _collect(self) -> bool:
        if self.pending is None:
            return False
        work, ballot = self.pending
        self.pending = None
        work.wait()
        return bool(ballot.item())


def _keep_lightning_off_signals(trainer: pl.Trainer) -> None:
    # Trainer._run calls _SignalConnector.register_signal_handlers after restoring a checkpoint;
    # its SIGTERM handler broadcasts from inside the handler (a hang when one rank is signalled
    # first) and ends the run at the next batch without a checkpoint. Ours stays in place
    # instead. Pinned by tests/distributed/test_dist_canary.py.
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and hasattr(connector, "register_signal_handlers"):
        connector.register_signal_handlers = lambda: None


def _leaves(loaders) -> list:
    if isinstance(loaders, dict):
        return [leaf for value in loaders.values() for leaf in _leaves(value)]
    if isinstance(loaders, (list, tuple)):
        return [leaf for value in loaders for leaf in _leaves(value)]
    return [] if loaders is None else [loaders]


def _training_finished(trainer: pl.Trainer) -> bool:
    """True at or after the last optimizer step of the run (max_steps or the last epoch's last batch)."""
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0:
        return False
    last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    return trainer.current_epoch >= max_epochs or (trainer.current_epoch == max_epochs - 1 and last_batch)


# ============================================================================ asking Slurm
def slurm_job_state(job: str) -> dict[str, str]:
    """``JobState``, ``Reason``, ``Restarts``... of ``job`` from ``scontrol show job -o`` ({} if unknown)."""
    try:
        done = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(re.findall(r"(?:^|\s)(\w+)=(\S*)", done.stdout)) if done.returncode == 0 else {}


def requeue_verdict(state: dict[str, str], restart_count: int) -> tuple[bool, str]:
    """Whether to run ``scontrol requeue`` for a job in ``state``, and why (from the experiments
    on Slurm 22.05: a signal-only job stays RUNNING; at its TERM a timed-out job is COMPLETING
    with Reason=TimeLimit, a requeued one COMPLETING with Restarts already counted up, a
    cancelled one COMPLETING with neither)."""
    job_state = state.get("JobState", "")
    if not job_state or job_state == "RUNNING":
        return True, "running" if job_state else "state unknown"
    if state.get("Reason") == "TimeLimit":
        return True, "at its time limit"
    if int(state.get("Restarts", "0") or 0) > restart_count or job_state in ("PENDING", "REQUEUED", "REQUEUE_HOLD"):
        return False, "already being requeued by Slurm (outside scontrol requeue or preemption)"
    if job_state == "PREEMPTED":
        return True, "preempted"
    return False, f"ending ({job_state}, e.g. scancel); a cancelled job is not brought back"


def requeue_job() -> bool:
    """``scontrol requeue <this job>`` unless Slurm is already requeueing or cancelling it; True if requested."""
    job = slurm_job_id()
    if not job:
        rank_zero_warn("RequeueOnSignal: no SLURM_JOB_ID; checkpoint saved, not requeued")
        return False
    go, why = requeue_verdict(slurm_job_state(job), int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))
    if not go:
        rank_zero_info(f"RequeueOnSignal: not requeueing SLURM job {job}: {why}; the checkpoint is saved")
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        rank_zero_warn(f"RequeueOnSignal: scontrol requeue {job} failed: {exc}")
        return False
    if done.returncode != 0:
        rank_zero_warn(f"RequeueOnSignal: scontrol requeue {job} exited {done.returncode}: {done.stderr.strip()[:200]}")
        return False
    rank_zero_info(f"RequeueOnSignal: requeued SLURM job {job} ({why})")
    return True
