"""DDP and DeepSpeed ZeRO on CPU, for real: 2 processes over gloo, through the recipe fragments.

One ``torchrun --nproc_per_node=2`` job (tests/distributed/dist_driver.py) runs every
scenario; the tests below compare what it wrote. Claims checked:

* DDP, 2 ranks x 2 samples == 1 rank x 4 samples (float tolerance), with instance norm (per
  sample statistics). Batch norm without sync is the control: it must differ (SyncBatchNorm,
  the other way to make BN rank-independent, is refused by torch's DDP on CPU).
* fp32 ZeRO-0/1/2/3 and ZeRO-3 with optimizer offload == DDP, bit for bit: every loss of every
  rank and the final weights (ZeRO directories consolidated by ``load_checkpoint``).
* ZeRO-0 with bf16 consolidates to the fp32 master weights (not the bf16 module upcast).
* bf16 + gradient accumulation under ZeRO-2 and -3 run; ZeRO-2 resumed from its step-3
  directory ends bitwise equal to the uninterrupted run; ZeRO-3 bf16 == ZeRO-2 bf16.
* Incomplete ZeRO directories are refused in one line naming what is missing.
* A distillation teacher (held by trainer.callbacks.distill) stays outside the ZeRO-3 engine.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import scale_kit as kit
import torch

from trainer.checkpointing import ZERO_COMPLETE, ZERO_WRITING, load_checkpoint, verify_checkpoint
from trainer.errors import UserError

ZERO_FP32 = ["zero0_fp32", "zero1_fp32", "zero2_fp32", "zero3_fp32", "zero3_offload_fp32"]
SCENARIOS = ["ddp_fp32", "ddp_bn_nosync", *ZERO_FP32, "zero0_bf16", "zero2_bf16_accum",
             "zero2_bf16_accum_resumed", "zero3_bf16_accum", "zero3_distill"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def driver_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist_driver")
    code = kit.run_driver(out, SCENARIOS, timeout=600)
    assert code == 0, (out / "driver.log").read_text()[-4000:]
    return out


def _ok(out: Path, name: str) -> Path:
    run = out / name
    errors = sorted(run.glob("error.rank*.txt"))
    assert not errors, f"{name} failed:\n{errors[0].read_text()[-3000:]}"
    assert (run / "done.rank0").exists() and (run / "done.rank1").exists(), f"{name} did not finish on both ranks"
    return run


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_checkpoint(path)["state_dict"].items() if k.startswith("net.")}


def _last(out: Path, name: str) -> Path:
    return _ok(out, name) / "checkpoints" / "last.ckpt"


def _one_rank_reference(tmp: Path, net: str) -> dict[str, torch.Tensor]:
    """The same training on one rank with the global batch (4), in this process (devices=1)."""
    from trainer.recipe_cli import run_lightning_cli

    run = tmp / f"one_rank_{net}"
    recipe = kit.recipe(run, devices=1, batch_size=4, net=net, batch_dice=False, max_steps=6, val_every=None,
                        ckpt_every=6, keep=1, shuffle=False)
    run_lightning_cli(["fit", "--config", str(kit.write_recipe(run / "recipe.yaml", recipe))])
    return _weights(run / "checkpoints" / "last.ckpt")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ============================================================================ DDP
def test_ddp_two_ranks_match_one_rank_at_same_global_batch(driver_out, tmp_path):
    two = _weights(_last(driver_out, "ddp_fp32"))  # UNet with instance norm, 2 ranks x 2 samples
    one = _one_rank_reference(tmp_path, "unet_instance")
    assert _max_diff(one, two) < 1e-5  # reduction order differs: float tolerance, not bits

    # control: with per-rank batch norm statistics the same comparison must fail
    bn_two = _weights(_last(driver_out, "ddp_bn_nosync"))
    bn_one = _one_rank_reference(tmp_path, "unet_batch")
    assert _max_diff(bn_one, bn_two) > 1e-3


# ============================================================================ ZeRO fp32 parity
@pytest.mark.parametrize("name", ZERO_FP32)
def test_zero_fp32_matches_ddp_bit_for_bit(driver_out, name):
    ddp_losses = (_ok(driver_out, "ddp_fp32") / "losses.jsonl").read_text()
    zero_losses = (_ok(driver_out, name) / "losses.jsonl").read_text()
    assert len(ddp_losses.splitlines()) == 6 and zero_losses == ddp_losses
    ckpt = _last(driver_out, name)
    assert ckpt.is_dir() and (ckpt / ZERO_COMPLETE).is_file() and not (ckpt / ZERO_WRITING).exists()
    kit.assert_bitwise_equal(_weights(_last(driver_out, "ddp_fp32")), _weights(ckpt), name)


def test_zero_checkpoint_dir_consolidates_like_a_file(driver_out):
    ckpt = load_checkpoint(_last(driver_out, "zero3_fp32"))
    assert ckpt["global_step"] == 6 and "hyper_parameters" in ckpt and "compressseg" in ckpt
    assert not any(k.startswith("_forward_module.") for k in ckpt["state_dict"])
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())

    from trainer.restore import restore_run

    run = restore_run(_last(driver_out, "zero3_fp32"))
    kit.assert_bitwise_equal({f"net.{k}": v for k, v in run.net.state_dict().items()},
                             _weights(_last(driver_out, "ddp_fp32")), "restore_run(ZeRO-3 dir)")


# ============================================================================ bf16, accumulation, round trip
def test_zero_bf16_accumulation_and_resume_round_trip(driver_out):
    full = _weights(_last(driver_out, "zero2_bf16_accum"))
    resumed = _weights(_last(driver_out, "zero2_bf16_accum_resumed"))
    kit.assert_bitwise_equal(full, resumed, "ZeRO-2 bf16 resumed from step 3")
    kit.assert_bitwise_equal(full, _weights(_last(driver_out, "zero3_bf16_accum")), "ZeRO-3 vs ZeRO-2 bf16")
    assert load_checkpoint(_last(driver_out, "zero2_bf16_accum"))["global_step"] == 6


def test_zero0_bf16_consolidates_to_the_fp32_master_weights(driver_out):
    ckpt = _last(driver_out, "zero0_bf16")
    master = _weights(ckpt)
    module = torch.load(ckpt / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert all(v.dtype == torch.float32 for v in master.values())
    params = [k for k in master if module[k].dtype == torch.bfloat16]
    assert params and all(torch.equal(master[k].bfloat16(), module[k]) for k in params)
    assert any(not torch.equal(master[k], module[k].float()) for k in params)  # not merely upcast


# ============================================================================ incomplete directories
def _copy(driver_out: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / f"{name}.ckpt"
    shutil.copytree(_last(driver_out, name), dst)
    return dst


def test_incomplete_zero_dirs_are_refused_naming_what_is_missing(driver_out, tmp_path):
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    cases = {}
    d = _copy(driver_out, "zero2_fp32", tmp_path / "a")
    (d / "checkpoint" / shard).unlink()
    cases[d] = shard  # the completion marker lists it
    d = _copy(driver_out, "zero3_fp32", tmp_path / "b")
    (d / ZERO_COMPLETE).unlink()
    (d / "checkpoint" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    cases[d] = "zero_pp_rank_1_mp_rank_00_model_states.pt"  # derived from the layout
    d = _copy(driver_out, "zero1_fp32", tmp_path / "c")
    (d / "latest").unlink()
    cases[d] = "latest"
    d = _copy(driver_out, "zero2_fp32", tmp_path / "d")
    (d / ZERO_WRITING).touch()
    cases[d] = "being written"
    d = _copy(driver_out, "zero0_fp32", tmp_path / "e")
    (d / ZERO_COMPLETE).unlink()
    (d / "checkpoint" / "mp_rank_00_model_states.pt").unlink()
    cases[d] = "mp_rank_00_model_states.pt"
    for path, needle in cases.items():
        with pytest.raises(UserError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert needle in message and "\n" not in message and str(path) in message, message
        assert verify_checkpoint(path) is not None

    # the same through the CLI: one line, exit 2, before any training
    bad = next(iter(cases))
    recipe = kit.write_recipe(tmp_path / "r.yaml", kit.recipe(tmp_path / "run", max_steps=1, val_every=None))
    done = kit.launch(["fit", "--config", str(recipe), "--ckpt_path", str(bad)], kit.env_with_kit(), check=False)
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and shard in errors[0], done.stdout[-2000:]


def test_export_accepts_a_zero_directory(driver_out, tmp_path):
    done = kit.launch(["export", "--ckpt", str(_last(driver_out, "zero2_fp32")), "--format", "onnx",
                       "--out", str(tmp_path / "onnx")], kit.env_with_kit(), check=False)
    assert done.returncode == 0, done.stdout[-3000:]


# ============================================================================ teacher outside the engine
def test_distillation_teacher_stays_outside_the_zero3_engine(driver_out):
    probe = json.loads((_ok(driver_out, "zero3_distill") / "teacher.json").read_text())
    assert probe["params"] > 0 and probe["partitioned"] == 0 and probe["in_engine"] == 0 and probe["trainable"] == 0
    assert probe["student_partitioned"] > 0  # the student really is under ZeRO-3
    losses = [json.loads(line) for line in (driver_out / "zero3_distill" / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(abs(float.fromhex(v)) < 1e3 for row in losses for v in row)
