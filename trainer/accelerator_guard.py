"""Refuse to train on the CPU where GPUs were meant to be used.

Lightning's ``accelerator: auto`` quietly picks the CPU when ``torch.cuda.is_available()`` is
False: a CPU build of torch in the node's environment, a driver too old for the CUDA build,
``CUDA_VISIBLE_DEVICES`` emptied by a wrapper. In a SLURM job that was given GPUs, that is a
multi-hour job running ~100x slower on hardware someone pays for, without a word. So
``launch.py fit`` (and DeepSpeed's CPU path) checks the device before training:

* inside a SLURM job with GPUs allocated, training on the CPU is refused (exit 2, one line
  naming the job, the allocation and what torch reports) unless ``COMPRESSSEG_ALLOW_CPU=1``;
* outside SLURM, on a machine whose NVIDIA GPUs torch cannot use, a warning says so.

Standard library only at import (used before torch is loaded for the message).
"""
from __future__ import annotations

import glob
import os
import shutil
import warnings
from typing import Any, Mapping

from trainer.errors import UserError

ALLOW_ENV = "COMPRESSSEG_ALLOW_CPU"
# Set by SLURM when GPUs are allocated: --gpus-per-node (SLURM_GPUS_PER_NODE), --gpus,
# --gpus-per-task, --gres=gpu:N (SLURM_JOB_GPUS in the batch step, SLURM_STEP_GPUS in srun
# steps) and, for every form, SLURM_GPUS_ON_NODE.
SLURM_GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_PER_NODE",
                       "SLURM_GPUS", "SLURM_GPUS_PER_TASK")


def allowed(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def slurm_gpu_job(env: Mapping[str, str] | None = None) -> str | None:
    """``"SLURM job N (SLURM_X=...)"`` when this process runs in a SLURM job given GPUs, else None."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    for name in SLURM_GPU_VARIABLES:
        value = env.get(name, "").strip()
        if value and value not in ("0", "(null)", "N/A"):
            return f"SLURM job {job} ({name}={value})"
    return None


def nvidia_gpus_present() -> bool:
    """An NVIDIA driver and device on this machine, whatever torch thinks."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None


def torch_cuda_report() -> str:
    """What torch says about CUDA, for messages."""
    import torch

    build = torch.version.cuda or "none (a CPU build)"
    return (f"torch {torch.__version__}, CUDA build {build}, torch.cuda.is_available()={torch.cuda.is_available()}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}")


def check_cpu_training(what: str, env: Mapping[str, str] | None = None) -> None:
    """Call when a run is about to train on the CPU (``what`` names the run or strategy)."""
    env = os.environ if env is None else env
    if allowed(env):
        return
    job = slurm_gpu_job(env)
    if job is not None:
        raise UserError(
            f"{what} would train on the CPU inside {job}, which was given GPUs; {torch_cuda_report()}. "
            f"Install a CUDA build of torch in this environment (python3 launch.py setup on a GPU node), or set "
            f"{ALLOW_ENV}=1 to train on the CPU anyway"
        )
    if nvidia_gpus_present():
        warnings.warn(f"{what} trains on the CPU although this machine has NVIDIA GPUs; {torch_cuda_report()}",
                      UserWarning, stacklevel=2)


def check_trainer(trainer: Any, env: Mapping[str, str] | None = None) -> None:
    """:func:`check_cpu_training` for a Lightning trainer whose root device is the CPU."""
    device = getattr(getattr(trainer, "strategy", None), "root_device", None)
    if device is not None and getattr(device, "type", None) == "cpu":
        check_cpu_training("launch.py fit", env)
