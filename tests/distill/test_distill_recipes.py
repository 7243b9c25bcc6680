"""Smoke runs of the distillation recipes through ``launch.py fit`` (tiny variants: the same
files with smaller nets, data and budget set by a few keys), then ``restore_run`` of the
distilled student: its checkpoint must load like any other."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from distill_testing import ROOT, framework_checkpoint


def _tiny_variant(tmp_path, dims: int, teacher) -> dict:
    recipe = yaml.safe_load((ROOT / f"recipes/distill_unet{dims}d.yaml").read_text())
    t = recipe["trainer"]
    t.update(max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
             default_root_dir=str(tmp_path / "run"), enable_progress_bar=False, accelerator="cpu")
    distill = t["callbacks"][-1]
    assert distill["class_path"] == "trainer.callbacks.distill.Distillation"  # must stay last
    distill["init_args"]["teacher"] = str(teacher)
    recipe["model"]["net"]["init_args"]["base_channels"] = 2
    data = recipe["data"]["init_args"]
    data.update(path=str(tmp_path / "phantom.h5"), batch_size=2, num_workers=0, samples_per_epoch=4)
    if dims == 2:
        data.update(patch_size=[32, 32], generate={"cases": 5, "shape": [4, 32, 32], "seed": 0})
    else:
        data.update(patch_size=[16, 16, 16], generate={"cases": 5, "shape": [16, 32, 32], "seed": 0})
        recipe["model"]["roi_size"] = [16, 16, 16]
    return recipe


@pytest.mark.parametrize("dims", [2, 3])
def test_distillation_recipe_runs_and_its_student_restores(tmp_path, one_thread_env, dims):
    recipe = yaml.safe_load((ROOT / f"recipes/distill_unet{dims}d.yaml").read_text())
    net = yaml.safe_load((ROOT / f"recipes/unet{dims}d_phantom.yaml").read_text())["model"]["net"]["init_args"]
    teacher_net = {**net, "base_channels": 4}  # the recipe's teacher (its layers and depth), tiny
    teacher = framework_checkpoint(tmp_path / "teacher.ckpt", **teacher_net)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(_tiny_variant(tmp_path, dims, teacher)))
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "fit", "--config", str(config)], cwd=tmp_path,
                          env=one_thread_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"  # default_root_dir moved every output
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["callbacks"]["Distillation"]["teachers"][0]["path"] == str(teacher)
    features = recipe["trainer"]["callbacks"][-1]["init_args"]["features"]
    assert set(ckpt["callbacks"]["Distillation"]["adapters"]) == {f"feat_{f['student'].replace('.', '_')}" for f in features}
    from trainer.restore import restore_run

    run = restore_run(ckpt_path, with_data=False)
    assert run.net.spatial_dims == dims and not hasattr(run.module, "distill_adapters")
