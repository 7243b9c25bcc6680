"""Distillation under 2-rank DDP on CPU (gloo), launched with torchrun as a subprocess."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from distill_testing import framework_checkpoint, unet_kwargs

WORKER = Path(__file__).resolve().parent / "ddp_distill_worker.py"


@pytest.mark.slow
def test_two_rank_ddp_distillation(tmp_path, subprocess_env):
    teacher = framework_checkpoint(tmp_path / "teacher.ckpt", **unet_kwargs(base=8))
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(teacher), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert result["adapters_equal"] and result["adapter_in_ddp"]
    assert not result["teacher_in_ddp"] and not result["teacher_grads"]
    names = {"train/loss_kd", "train/loss_kd_ds", "train/loss_feat_decoders_1", "train/loss_aff_encoders_2"}
    assert names <= set(result["losses"]) and all(math.isfinite(v) for v in result["losses"].values())
