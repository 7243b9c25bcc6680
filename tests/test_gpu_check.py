"""benchmarks/gpu_check.py where there is no GPU: it says so and exits 0, and its plan (the
recipes it would train) parses exactly as ``launch.py fit`` parses it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the script would run its checks")
def test_without_cuda_it_says_so_and_exits_0(tmp_path, subprocess_env):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], cwd=ROOT, env=subprocess_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gpu_check: no CUDA device on this machine" in done.stdout and "nothing to check" in done.stdout
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_dry_run_writes_a_plan_that_parses(tmp_path, subprocess_env):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--gpus", "4", "--out", str(tmp_path)],
                          cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    plan = [line for line in done.stdout.splitlines() if line.startswith("[gpu_check] plan:")]
    text = "\n".join(plan)
    for path in ("DDP prune", "ZeRO-2 bf16-mixed", "ZeRO-2 16-mixed", "ZeRO-3 bf16-mixed", "ZeRO-3 16-mixed",
                 "unlabelled distillation", "export onnx-fp16", "tensorrt FP16", "tensorrt INT8", "latency"):
        assert path in text, f"{path} missing from the plan:\n{text}"
    recipe = yaml.safe_load((tmp_path / "recipes" / "zero3_16.yaml").read_text())
    assert recipe["trainer"]["accelerator"] == "gpu" and recipe["trainer"]["devices"] == 4
    assert recipe["trainer"]["precision"] == "16-mixed"
    names = [cb["class_path"].rsplit(".", 1)[1] for cb in recipe["trainer"]["callbacks"]]
    assert names == ["ModelCheckpoint", "QuantizationAwareTraining", "Distillation"]
