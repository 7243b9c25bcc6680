"""Checkpoint integrity: atomic writes, corruption detection, ``last`` resolution, RNG state.

Fast, single-process. ZeRO directories written by real DeepSpeed runs are covered in
tests/distributed/test_dist_strategies.py; kill-and-resume in tests/distributed/test_dist_resume.py.
"""
from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint

from trainer.callbacks import rng
from trainer.callbacks.requeue import RequeueOnSignal
from trainer.checkpointing import (
    LAST_OR_FRESH, AtomicCheckpointIO, LastBatchResumeFix, always_on_trainer_kwargs, atomic_save,
    load_checkpoint, resolve_resume_path, verify_checkpoint, zero_checkpoint_problem,
)
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def _ckpt(step: int = 1) -> dict:
    return {"state_dict": {"net.w": torch.full((64,), float(step))}, "global_step": step, "epoch": 0}


def _write(path: Path, step: int, mtime: float | None = None) -> Path:
    atomic_save(_ckpt(step), path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


# ============================================================================ atomic writes
def test_atomic_save_leaves_old_file_intact_when_the_write_dies(tmp_path, monkeypatch):
    target = _write(tmp_path / "last.ckpt", 1)

    def dying_save(obj, fh, *a, **k):
        fh.write(b"partial garbage")
        raise KeyboardInterrupt  # a kill in the middle of torch.save

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(_ckpt(2), target)
    monkeypatch.undo()
    assert load_checkpoint(target)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "temporary file left behind"


def test_atomic_save_cleans_stale_temporaries_and_keeps_usual_permissions(tmp_path):
    stale = tmp_path / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"left by a SIGKILL")
    io = AtomicCheckpointIO()
    io.save_checkpoint(_ckpt(3), tmp_path / "last.ckpt")
    assert not stale.exists()
    mode = stat.S_IMODE((tmp_path / "last.ckpt").stat().st_mode)
    assert mode == 0o666 & ~_umask()
    assert io.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 3


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_checkpoint_io_loads_weights_only(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": subprocess.Popen}, path)  # a global a pickle would import
    with pytest.raises(UserError, match="Unsupported global"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(UserError, match="evil.ckpt"):
        load_checkpoint(path)


# ============================================================================ integrity
def test_verify_detects_truncation_bit_flips_and_empty_files(tmp_path):
    good = _write(tmp_path / "good.ckpt", 1)
    assert verify_checkpoint(good) is None
    data = good.read_bytes()

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated" in verify_checkpoint(truncated)

    flipped = tmp_path / "flipped.ckpt"
    raw = bytearray(data)
    raw[raw.find(b"\x00\x00\x80\x3f") + 1] ^= 0xFF  # a byte inside the tensor data (1.0f)
    flipped.write_bytes(bytes(raw))
    assert torch.load(flipped, weights_only=True)  # torch.load does not notice...
    assert "CRC" in verify_checkpoint(flipped)  # ...the CRC check does

    empty = tmp_path / "empty.ckpt"
    empty.touch()
    assert verify_checkpoint(empty) == "empty file"
    with pytest.raises(UserError, match="truncated"):
        load_checkpoint(truncated)


def test_zero_dir_problems_name_the_missing_piece(tmp_path):
    d = tmp_path / "epoch=0-step=3.ckpt"
    d.mkdir()
    assert "latest" in zero_checkpoint_problem(d)
    (d / "latest").write_text("checkpoint")
    assert "checkpoint/" in zero_checkpoint_problem(d)
    (d / "checkpoint").mkdir()
    assert "mp_rank_00_model_states.pt" in zero_checkpoint_problem(d)
    (d / "compressseg_writing").touch()
    assert "being written" in zero_checkpoint_problem(d)
    with pytest.raises(UserError, match=r"incomplete: was being written"):
        load_checkpoint(d)


# ============================================================================ --ckpt_path last
def _trainer(tmp_path: Path, with_dirpath: bool = True) -> pl.Trainer:
    callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpts")] if with_dirpath else []
    return pl.Trainer(default_root_dir=tmp_path, callbacks=callbacks, logger=False, enable_progress_bar=False)


def test_last_picks_newest_good_checkpoint_and_reports_corrupt_ones(tmp_path):
    trainer = _trainer(tmp_path)
    ckpts = tmp_path / "ckpts"
    old = _write(ckpts / "step=0001.ckpt", 1, mtime=1_000)
    good = _write(ckpts / "step=0002.ckpt", 2, mtime=2_000)
    last = _write(ckpts / "last.ckpt", 3, mtime=3_000)
    assert resolve_resume_path(trainer, "last", log=lambda m: None) == str(last.resolve())

    last.write_bytes(last.read_bytes()[:100])  # a kill during a non-atomic copy, a full disk...
    os.utime(last, (3_000, 3_000))
    messages: list[str] = []
    assert resolve_resume_path(trainer, "last", log=messages.append) == str(good.resolve())
    skipped = [m for m in messages if "skipping" in m]
    assert len(skipped) == 1 and "last.ckpt" in skipped[0] and "\n" not in skipped[0]
    assert old.exists()


def _state_ckpt(step: int, *, writer: str | None = "run-a", batches: int | None = None, epochs: int = 0,
                val: int = 0, epoch: int = 0) -> dict:
    """A checkpoint dict with the training-loop progress Lightning 2.6 stores (only what resume reads)."""
    def total(n: int) -> dict:
        return {"total": {"ready": n, "started": n, "processed": n, "completed": n}}

    ckpt = {"state_dict": {"net.w": torch.full((4,), float(step))}, "global_step": step, "epoch": epoch,
            "loops": {"fit_loop": {"epoch_loop.batch_progress": total(step if batches is None else batches),
                                   "epoch_progress": total(epochs), "epoch_loop.val_loop.batch_progress": total(val)}}}
    if writer is not None:
        ckpt["callbacks"] = {"RequeueOnSignal": {"writer": writer}}
    return ckpt


def _save(path: Path, ckpt: dict, mtime: float) -> Path:
    atomic_save(ckpt, path)
    os.utime(path, (mtime, mtime))
    return path


def test_last_picks_the_latest_training_state_not_the_newest_file(tmp_path):
    """Issue 16: after a signal a monitor checkpoint could be written after requeue.ckpt; the
    newest file is then not the latest training state."""
    trainer = _trainer(tmp_path)
    d = tmp_path / "ckpts"
    _save(d / "step=0004.ckpt", _state_ckpt(4), 1_000)
    requeue = _save(d / "requeue.ckpt", _state_ckpt(5), 2_000)
    _save(d / "last.ckpt", _state_ckpt(4, epochs=1, val=8), 3_000)  # epoch end, after a validation
    _save(d / "best.ckpt", _state_ckpt(3, val=4), 4_000)  # copied/renamed late: newest on disk
    messages: list[str] = []
    assert resolve_resume_path(trainer, "last", log=messages.append) == str(requeue.resolve())
    [line] = messages
    assert "requeue.ckpt: global step 5" in line and "latest training state" in line and "best.ckpt step 3" in line


def test_same_step_is_ordered_by_batches_then_epoch_end_then_validation(tmp_path):
    trainer = _trainer(tmp_path)
    d = tmp_path / "ckpts"
    _save(d / "mid_accumulation.ckpt", _state_ckpt(6, batches=13), 4_000)  # a 2nd micro-batch after step 6
    _save(d / "batch_end.ckpt", _state_ckpt(6, batches=12), 5_000)
    assert resolve_resume_path(trainer, "last", log=lambda m: None).endswith("mid_accumulation.ckpt")
    _save(d / "epoch_end.ckpt", _state_ckpt(6, batches=13, epochs=1), 1_000)
    assert resolve_resume_path(trainer, "last", log=lambda m: None).endswith("epoch_end.ckpt")
    _save(d / "after_val.ckpt", _state_ckpt(6, batches=13, epochs=1, val=3), 500)
    assert resolve_resume_path(trainer, "last", log=lambda m: None).endswith("after_val.ckpt")


def test_checkpoints_of_an_earlier_run_do_not_win_by_step(tmp_path):
    """A stale, longer run in the same folder (or the abandoned branch of a run resumed from an
    older checkpoint) is not resumed: candidates are the checkpoints of the newest file's writer."""
    trainer = _trainer(tmp_path)
    d = tmp_path / "ckpts"
    _save(d / "step=0050.ckpt", _state_ckpt(50, writer="old-run"), 1_000)
    _save(d / "step=0008.ckpt", _state_ckpt(8, writer="new-run"), 2_000)
    mine = _save(d / "step=0010.ckpt", _state_ckpt(10, writer="new-run"), 3_000)
    messages: list[str] = []
    assert resolve_resume_path(trainer, "last", log=messages.append) == str(mine.resolve())
    assert "1 from earlier runs not considered" in messages[-1]
    mine.write_bytes(mine.read_bytes()[:200])  # the new run's files all unusable: fall back, in order
    (d / "step=0008.ckpt").write_bytes(b"PK garbage")
    messages.clear()
    assert resolve_resume_path(trainer, "last", log=messages.append).endswith("step=0050.ckpt")
    assert sum("skipping" in m for m in messages) == 2


def test_training_state_is_read_from_real_lightning_checkpoints(tmp_path):
    """The loop-progress keys resume reads exist in Lightning's own checkpoints: a run with a
    monitor checkpoint, save_last, every-N-steps checkpoints and RequeueOnSignal's writer id;
    whichever file is touched last, resume picks the final training state."""
    from tinydata import TinySegDataModule

    from trainer.checkpointing import read_training_state
    from trainer.models import UNet
    from trainer.module import SegmentationModule

    d = tmp_path / "ckpts"
    callbacks = [ModelCheckpoint(dirpath=d, filename="best", monitor="val/dice", mode="max", enable_version_counter=False),
                 ModelCheckpoint(dirpath=d, filename="{step:03d}", every_n_train_steps=2, save_top_k=2, monitor="step",
                                 mode="max", save_last=True, save_on_train_epoch_end=True),
                 RequeueOnSignal()]
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=callbacks, logger=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    net = UNet(spatial_dims=2, num_classes=3, depth=1, base_channels=2)
    trainer.fit(SegmentationModule(net, num_classes=3), TinySegDataModule(size=8, n_train=8, n_val=2, batch_size=2))
    states = {p.name: read_training_state(p) for p in d.glob("*.ckpt")}
    assert {"best.ckpt", "last.ckpt", "step=008.ckpt"} <= set(states), sorted(states)
    assert len({s.writer for s in states.values()}) == 1 and states["last.ckpt"].writer
    # saved after the 8th batch, in the 2nd epoch (its end not yet counted)
    assert (states["last.ckpt"].global_step, states["last.ckpt"].train_batches, states["last.ckpt"].epochs_ended) == (8, 8, 1)
    assert states["step=006.ckpt"].order < states["step=008.ckpt"].order <= states["last.ckpt"].order
    latest = max(s.order for s in states.values())
    for name in states:  # modification times say nothing
        os.utime(d / name, (9e9, 9e9))
        picked = read_training_state(Path(resolve_resume_path(trainer, "last", log=lambda m: None)))
        assert picked.global_step == 8 and picked.order == latest, name
        os.utime(d / name, (1e9, 1e9))


def test_last_finds_checkpoints_in_lightning_versioned_log_dirs(tmp_path):
    trainer = _trainer(tmp_path, with_dirpath=False)
    ckpt = _write(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=4.ckpt", 4)
    assert resolve_resume_path(trainer, "last", log=lambda m: None) == str(ckpt.resolve())


def test_last_without_checkpoint_is_an_error_unless_fresh_is_asked_for(tmp_path):
    trainer = _trainer(tmp_path)
    with pytest.raises(UserError, match="last-or-fresh") as err:
        resolve_resume_path(trainer, "last", log=lambda m: None)
    assert "\n" not in str(err.value)
    assert resolve_resume_path(trainer, LAST_OR_FRESH, log=lambda m: None) is None


def test_all_checkpoints_corrupt_is_an_error_even_with_fresh(tmp_path):
    trainer = _trainer(tmp_path)
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "last.ckpt").write_bytes(b"not a zip")
    for value in ("last", LAST_OR_FRESH):
        with pytest.raises(UserError, match="none of the 1 checkpoints"):
            resolve_resume_path(trainer, value, log=lambda m: None)


def test_explicit_corrupt_path_is_refused_and_other_values_pass_through(tmp_path):
    trainer = _trainer(tmp_path)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="bad.ckpt"):
        resolve_resume_path(trainer, str(bad))
    assert resolve_resume_path(trainer, None) is None
    assert resolve_resume_path(trainer, "best") == "best"


def test_cli_last_with_no_checkpoint_exits_2_with_one_line(tmp_path, subprocess_env):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
trainer: {{accelerator: cpu, devices: 1, max_steps: 1, logger: false, default_root_dir: {tmp_path / 'run'},
           enable_progress_bar: false}}
model:
  net: {{class_path: trainer.models.UNet, init_args: {{spatial_dims: 2, num_classes: 3, depth: 1, base_channels: 2}}}}
  num_classes: 3
data: {{class_path: tinydata.TinySegDataModule, init_args: {{size: 8, n_train: 2, n_val: 1, batch_size: 2}}}}
""")
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "fit", "--config", str(recipe), "--ckpt_path", "last"],
                          cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(errors) == 1 and "no checkpoint under" in errors[0] and "last-or-fresh" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


# ============================================================================ RNG state
def test_rng_snapshot_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    snap = rng.capture()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    atomic_save({"rng": snap}, tmp_path / "rng.ckpt")
    rng.restore(torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_rng_callback_pins_the_state_each_batch_starts_from():
    class _Trainer:
        global_rank, world_size = 0, 1

    torch.manual_seed(0)
    cb = rng.RNGState()
    cb.on_train_batch_end(None, None, None, None, 0)  # state captured after batch 0
    saved = cb.state_dict()
    torch.rand(5)  # data loading / validation draw in between
    cb.on_train_batch_start(None, None, None, 1)
    uninterrupted = torch.rand(3)  # what batch 1 draws (dropout...)

    torch.manual_seed(123)  # a resumed process: other state, another number of draws before batch 1
    resumed = rng.RNGState()
    resumed.load_state_dict(saved)
    resumed.on_train_start(_Trainer(), None)
    torch.rand(17)
    resumed.on_train_batch_start(None, None, None, 1)
    assert torch.equal(uninterrupted, torch.rand(3))


# ============================================================================ always-on pieces
def test_always_on_pieces_are_added_once_and_slurm_requeue_is_ours(monkeypatch):
    kwargs = always_on_trainer_kwargs({})
    kinds = [type(cb) for cb in kwargs["callbacks"]]
    assert kinds[0] is rng.RNGState and RequeueOnSignal in kinds and LastBatchResumeFix in kinds
    assert any(isinstance(p, AtomicCheckpointIO) for p in kwargs["plugins"])
    again = always_on_trainer_kwargs(kwargs)
    assert len(again["callbacks"]) == len(kwargs["callbacks"]) and len(again["plugins"]) == len(kwargs["plugins"])

    env = SLURMEnvironment(auto_requeue=True)
    assert always_on_trainer_kwargs({"plugins": [env]})["plugins"][0] is env and env.auto_requeue is False
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    plugins = always_on_trainer_kwargs({})["plugins"]
    slurm = [p for p in plugins if isinstance(p, SLURMEnvironment)]
    assert len(slurm) == 1 and slurm[0].auto_requeue is False


# ============================================================================ every checkpoint kind resumes exactly
def _fit_hdf5(tmp_path: Path, run: str, data: Path, ckpt_path: str | None = None, workers: int = 0) -> tuple[pl.Trainer, dict]:
    from functools import partial

    from datamodules.hdf5 import HDF5SegDataModule
    from trainer.models import UNet
    from trainer.module import SegmentationModule

    pl.seed_everything(0)
    model = SegmentationModule(UNet(spatial_dims=2, num_classes=5, depth=1, base_channels=2), num_classes=5,
                               optimizer=partial(torch.optim.AdamW, lr=0.01),
                               lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=3))
    data = HDF5SegDataModule(path=str(data), spatial_dims=2, patch_size=[32, 32], batch_size=2, num_workers=workers,
                             samples_per_epoch=8, generate={"cases": 5, "shape": [2, 32, 32], "seed": 0})
    d = tmp_path / run
    callbacks = [ModelCheckpoint(dirpath=d, filename="epoch{epoch}", save_top_k=-1, every_n_epochs=1),  # epoch end
                 ModelCheckpoint(dirpath=d, filename="best{epoch}", monitor="val/dice", mode="max", save_top_k=-1),
                 ModelCheckpoint(dirpath=d, filename="b{step}", every_n_train_steps=1, save_top_k=-1)]
    trainer = pl.Trainer(default_root_dir=d, max_epochs=3, logger=False, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                         **always_on_trainer_kwargs({"callbacks": callbacks}))
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_every_kind_of_epoch_boundary_checkpoint_resumes_exactly(tmp_path):
    """The shipped recipes' checkpoints at an epoch boundary: written at the epoch's end (a
    ModelCheckpoint without every_n_train_steps, like the shipped ``last.ckpt``), after the
    validation (the monitor's ``best.ckpt``) and after the last batch (every-N-steps). Resumed
    with the HDF5 datamodule (two loader workers, augmentation) and an epoch-wise LR schedule,
    each ends bitwise equal to the uninterrupted run. (Issue 16's fault campaign found the
    epoch-end case inexact: the resumed loader served the previous epoch's samples; the
    datamodule now starts it at the epoch that follows.)"""
    data = tmp_path / "phantom.h5"
    _, reference = _fit_hdf5(tmp_path, "ref", data, workers=2)
    saved = tmp_path / "ref"
    boundary = {"epoch-end": saved / "epochepoch=0.ckpt", "monitor": saved / "bestepoch=0.ckpt",
                "last batch": saved / "bstep=4.ckpt"}
    for kind, ckpt in boundary.items():
        assert ckpt.exists(), sorted(p.name for p in saved.iterdir())
        _, resumed = _fit_hdf5(tmp_path, kind.replace(" ", "_"), data, ckpt_path=str(ckpt), workers=2)
        differing = [k for k in reference if not torch.equal(reference[k], resumed[k])]
        assert not differing, f"resumed from the {kind} checkpoint: {len(differing)} tensors differ"
