"""Multi-rank paths a first multi-GPU run would have broken, for real on 2 CPU ranks over gloo.

One ``torchrun --nproc_per_node=2`` job (dist_driver.py, ``gpu_path_scenarios``) runs:

* distillation (online, with a FitNets adapter) + QAT under DeepSpeed ZeRO-2 and ZeRO-3 with
  ``bf16-mixed``: DeepSpeed casts the student and its batches to bf16 without autocast, so the
  fp32 teacher got bf16 images, the calibration fp32 images for a bf16 net, and ZeRO-3's
  partitioned weights were calibrated and saved empty;
* the ZeRO-3 run resumed from a step-3 directory (adapters restored into partitioned
  parameters) and its directory restored for export (the adapters' keys are not the model's);
* unstructured pruning rounds under ZeRO-2 bf16 (the mid-run rebuild left no optimizer; fp32
  masks met bf16 weights);
* a Taylor pruning round in ``setup`` under DDP, and learnable QAT scales frozen mid-run
  under DDP (unused parameters: "Expected to have finished reduction");
* ZeRO-3 validation with shards of 2 and 1 images of different sizes through a sliding
  window (ranks ran different numbers of forward passes, each an all-gather: a hang).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import scale_kit as kit
import torch

from trainer.checkpointing import load_checkpoint

SCENARIOS = ["zero2_bf16_distill_qat", "zero3_bf16_distill_qat", "zero3_bf16_distill_qat_resumed",
             "zero2_bf16_unstructured", "ddp_taylor_setup_round", "ddp_lsq_frozen", "zero3_uneven_eval"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def driver_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_paths")
    sys.path.insert(0, str(kit.TESTS / "distill"))
    from distill_testing import framework_checkpoint

    framework_checkpoint(out / "teacher.ckpt", seed=1, spatial_dims=2, num_classes=3, depth=2, base_channels=8)
    kit.run_driver(out, SCENARIOS, timeout=900)  # each scenario is checked by the tests below
    return out


def _ok(out: Path, name: str) -> Path:
    run = out / name
    errors = sorted(run.glob("error.rank*.txt"))
    assert not errors, f"{name} failed:\n{errors[0].read_text()[-3000:]}"
    log = (out / "driver.log").read_text()
    assert (run / "done.rank0").exists() and (run / "done.rank1").exists(), f"{name} did not finish:\n{log[-3000:]}"
    return run


def _losses(run: Path) -> list[list[float]]:
    return [[float.fromhex(v) for v in json.loads(line)] for line in (run / "losses.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["zero2_bf16_distill_qat", "zero3_bf16_distill_qat"])
def test_distillation_with_adapters_and_qat_train_under_zero_bf16(driver_out, name):
    run = _ok(driver_out, name)
    losses = _losses(run)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(row)).all() for row in losses)
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    scales = {k: v for k, v in state["state_dict"].items() if k.endswith("input_quant.scale")}
    assert scales and all(float(v) > 0 for v in scales.values())  # calibrated (ZeRO-3: not empty)


def test_zero3_saves_gathered_adapters_resumes_and_exports(driver_out):
    run = _ok(driver_out, "zero3_bf16_distill_qat")
    ckpt = load_checkpoint(run / "checkpoints" / "step=0003.ckpt")
    adapters = ckpt["callbacks"]["Distillation"]["adapters"]
    (weights,) = [state["weight"] for state in adapters.values()]
    assert tuple(weights.shape) == (16, 8, 1, 1) and weights.abs().sum() > 0  # gathered, not ZeRO-3's empty partition
    assert any(k.startswith("distill_adapters.") for k in ckpt["state_dict"])  # the optimizer held them
    resumed = _ok(driver_out, "zero3_bf16_distill_qat_resumed")
    assert len(_losses(resumed)) == 3  # steps 4-6
    from trainer.restore import restore_run

    restored = restore_run(run / "checkpoints" / "last.ckpt", with_data=False)
    assert not hasattr(restored.module, "distill_adapters")


def test_unstructured_rounds_under_zero2_bf16(driver_out):
    run = _ok(driver_out, "zero2_bf16_unstructured")
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["callbacks"]["PruneRetrain"]["rounds_done"] == 2  # the second round came mid-run
    masks = [v for k, v in ckpt["state_dict"].items() if k.endswith("weight_mask")]
    zeros = sum(int((m == 0).sum()) for m in masks) / sum(m.numel() for m in masks)
    assert 0.4 < zeros < 0.6


def test_taylor_round_in_setup_and_frozen_learnable_scales_under_ddp(driver_out):
    run = _ok(driver_out, "ddp_taylor_setup_round")
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert state["callbacks"]["PruneRetrain"]["rounds_done"] == 1
    assert state["state_dict"]["net.encoders.0.0.weight"].shape[0] == 2  # 4 channels, half removed
    frozen = _ok(driver_out, "ddp_lsq_frozen")
    assert len(_losses(frozen)) == 6
    assert load_checkpoint(frozen / "checkpoints" / "last.ckpt")["callbacks"]["QuantizationAwareTraining"]["ranges_frozen"]


def test_zero3_validation_with_uneven_shards_and_window_counts(driver_out):
    run = _ok(driver_out, "zero3_uneven_eval")
    assert len(_losses(run)) == 4
