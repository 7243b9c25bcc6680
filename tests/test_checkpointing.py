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
