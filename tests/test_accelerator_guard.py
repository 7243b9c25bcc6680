"""No quiet CPU training where GPUs were meant to be used (trainer/accelerator_guard.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from trainer import accelerator_guard as guard
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GPU_JOB = {"SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_GPUS": "0,1,2,3"}


@pytest.mark.parametrize("env, job", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "8"}, None),  # a CPU job
    ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "0"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_GPUS_PER_NODE": "a100:2"}, "SLURM job 7 (SLURM_GPUS_PER_NODE=a100:2)"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_GPUS": "1"}, "SLURM job 7 (SLURM_STEP_GPUS=1)"),
    ({"SLURM_GPUS_ON_NODE": "2"}, None),  # not inside a job
])
def test_slurm_gpu_jobs_are_recognised(env, job):
    assert guard.slurm_gpu_job(env) == job


def test_cpu_training_in_a_slurm_gpu_job_is_refused_unless_asked():
    with pytest.raises(UserError, match=r"would train on the CPU inside SLURM job 4242 \(SLURM_GPUS_ON_NODE=4\).*"
                                        r"torch .*is_available\(\)=.*COMPRESSSEG_ALLOW_CPU=1"):
        guard.check_cpu_training("launch.py fit", GPU_JOB)
    guard.check_cpu_training("launch.py fit", {**GPU_JOB, "COMPRESSSEG_ALLOW_CPU": "1"})
    cpu_trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.raises(UserError):
        guard.check_trainer(cpu_trainer, GPU_JOB)
    gpu_trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    guard.check_trainer(gpu_trainer, GPU_JOB)  # the device was picked: nothing to say


def test_fit_in_a_slurm_gpu_job_on_a_cpu_torch_exits_2_in_one_line(tmp_path, subprocess_env):
    """The user's path: ``accelerator: auto`` (the default) on a node whose torch cannot use
    the GPUs; before, Lightning picked the CPU and trained without a word."""
    recipe = {
        "trainer": {"max_epochs": 1, "logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "model": {"net": {"class_path": "trainer.models.UNet",
                          "init_args": {"spatial_dims": 2, "num_classes": 3, "depth": 2, "base_channels": 4}},
                  "num_classes": 3},
        "data": {"class_path": "tinydata.TinySegDataModule", "init_args": {"n_train": 4, "n_val": 2, "size": 16}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**subprocess_env, **GPU_JOB}
    env.pop("COMPRESSSEG_ALLOW_CPU", None)
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "fit", "--config", str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "inside SLURM job 4242" in errors[0]
    assert not (tmp_path / "checkpoints").exists() and not list(tmp_path.rglob("*.ckpt"))
