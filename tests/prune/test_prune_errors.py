"""Bad input: one-line UserErrors that name the culprit (and exit 2 from the command line)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from prune_helpers import CrashingNet, UntraceableNet, make_module, tiny_unet
from trainer.callbacks.prune import PruneRetrain
from trainer.errors import UserError
from trainer.prune.structured import StructuredPrune, apply_plan, prune_channels
from trainer.structure import CHECKPOINT_KEY, history, record

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kwargs", [
    {"target_ratio": 0.0}, {"target_ratio": 1.0}, {"target_ratio": 1.2}, {"target_ratio": -0.5},
    {"layer_ratios": {"encoders.0": 1.0}},
])
def test_ratio_outside_open_interval(kwargs):
    with pytest.raises(UserError, match=r"must be (a number )?in \(0, 1\)") as err:
        PruneRetrain(**kwargs)
    assert "\n" not in str(err.value)


def test_prune_channels_checks_its_ratio():
    with pytest.raises(UserError, match="pruning ratio=1.5"):
        prune_channels(tiny_unet(), 1.5)


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "magic"}, "method='magic'"), ({"importance": "vibes"}, "importance='vibes'"),
    ({"rounds": 0}, "rounds=0"), ({"schedule": "exp"}, "schedule='exp'"), ({"protected": "head"}, "list of layer names"),
    ({"taylor_accumulate": "max"}, "taylor_accumulate='max'"),
])
def test_other_bad_arguments(kwargs, match):
    with pytest.raises(UserError, match=match):
        PruneRetrain(**kwargs)


def test_unknown_protected_layer_lists_available_names():
    with pytest.raises(UserError, match=r"has no layer 'decoder\.9'; available: encoders, decoders, head"):
        prune_channels(tiny_unet(), 0.5, protected=["decoder.9"])


def test_untraceable_layer_is_named():
    with pytest.raises(UserError, match=r"cannot trace UntraceableNet: layer 'mix' \(FunctionalMix\)"):
        prune_channels(UntraceableNet(), 0.5)
    with pytest.raises(UserError, match=r"layer 'mix.1' \(Exploding\) failed: RuntimeError: this layer only runs on Tuesdays"):
        prune_channels(CrashingNet(), 0.5)


def test_history_from_another_network_is_refused_untouched():
    plan = prune_channels(tiny_unet(base=8), 0.5)
    other = tiny_unet(base=16)
    before = {k: v.shape for k, v in other.state_dict().items()}
    with pytest.raises(UserError, match=r"does not match the model: layer '.*' has 16 output channels, the history expects 8"):
        apply_plan(other, plan)
    assert {k: v.shape for k, v in other.state_dict().items()} == before  # nothing cut


def test_checkpoint_history_mismatch_on_load():
    net = tiny_unet(base=8)
    record(net, StructuredPrune, prune_channels(net, 0.5))
    ckpt = {"state_dict": make_module(net).state_dict(), CHECKPOINT_KEY: {"structure": history(net)}}
    with pytest.raises(UserError, match="checkpoint pruning history does not match the model"):
        make_module(tiny_unet(base=16)).on_load_checkpoint(ckpt)


def test_command_line_exits_2_with_one_line(tmp_path, subprocess_env):
    recipe = {
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "trainer.callbacks.prune.PruneRetrain", "init_args": {"target_ratio": 1.5}}]},
        "model": {"net": {"class_path": "trainer.models.UNet", "init_args": {"num_classes": 3, "depth": 2, "base_channels": 4}},
                  "num_classes": 3},
        "data": {"class_path": "tinydata.TinySegDataModule"},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "fit", "--config", str(path)], cwd=ROOT,
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "target_ratio=1.5" in last and "(0, 1)" in last, proc.stderr[-2000:]
