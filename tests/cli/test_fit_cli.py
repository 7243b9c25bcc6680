"""launch.py fit/validate/test from a recipe, resume from `last`, and one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


def tiny_recipe(tmp: Path, dims: int = 2, epochs: int = 1, **data) -> Path:
    size = 32 if dims == 2 else 16
    recipe = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": epochs, "accelerator": "cpu", "devices": 1, "default_root_dir": str(tmp / "run"),
            "enable_progress_bar": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp / "run")}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / "run" / "checkpoints"), "monitor": "val/dice", "mode": "max",
                               "filename": "best", "enable_version_counter": False}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / "run" / "checkpoints"), "filename": "last",
                               "enable_version_counter": False}},
            ],
        },
        "model": {
            "net": {"class_path": "trainer.models.UNet",
                    "init_args": {"spatial_dims": dims, "num_classes": 3, "depth": 2, "base_channels": 4,
                                  "deep_supervision": True, "ds_levels": 1}},
            "num_classes": 3,
            "roi_size": [8] * dims if dims == 3 else None,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
        },
        "data": {"class_path": "tinydata.TinySegDataModule",
                 "init_args": {"spatial_dims": dims, "size": size, "n_train": 4, "n_val": 2, **data}},
    }
    path = tmp / f"recipe{dims}d.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch(args, env, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.parametrize("dims", [2, 3])
def test_fit_from_recipe_writes_checkpoints_with_recipe(tmp_path, subprocess_env, dims):
    recipe = tiny_recipe(tmp_path, dims=dims, epochs=2)
    launch(["fit", "--config", str(recipe)], subprocess_env)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert {"last.ckpt", "best.ckpt"} <= {p.name for p in ckpt_dir.iterdir()}
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1
    stored = yaml.safe_load(ckpt["compressseg"]["recipe"])
    assert stored["model"]["net"]["init_args"]["spatial_dims"] == dims
    metrics = (next((tmp_path / "run").rglob("metrics.csv"))).read_text()
    assert "val/dice" in metrics and "train/loss_seg" in metrics


def test_resume_from_last_continues_epochs(tmp_path, subprocess_env):
    recipe = tiny_recipe(tmp_path, epochs=1)
    launch(["fit", "--config", str(recipe)], subprocess_env)
    first = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    launch(["fit", "--config", str(recipe), "--trainer.max_epochs", "2", "--ckpt_path", "last"], subprocess_env)
    second = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert (first["epoch"], second["epoch"]) == (0, 1)
    assert second["global_step"] == 2 * first["global_step"]


def test_validate_and_test_subcommands_report_dice(tmp_path, subprocess_env):
    recipe = tiny_recipe(tmp_path, epochs=1)
    launch(["fit", "--config", str(recipe)], subprocess_env)
    ckpt = str(tmp_path / "run/checkpoints/best.ckpt")
    assert "val/dice" in launch(["validate", "--config", str(recipe), "--ckpt_path", ckpt], subprocess_env).stdout
    assert "test/dice" in launch(["test", "--config", str(recipe), "--ckpt_path", ckpt], subprocess_env).stdout


def test_print_config_and_dotted_override(tmp_path, subprocess_env):
    recipe = tiny_recipe(tmp_path)
    out = launch(["fit", "--config", str(recipe), "--model.net.init_args.base_channels", "6", "--print_config"],
                 subprocess_env).stdout
    assert yaml.safe_load(out)["model"]["net"]["init_args"]["base_channels"] == 6


def _one_line_error(proc) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_wrong_recipe_key_is_named(tmp_path, subprocess_env):
    recipe = tiny_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["model"]["num_clases"] = 3
    recipe.write_text(yaml.safe_dump(data))
    line = _one_line_error(launch(["fit", "--config", str(recipe)], subprocess_env, check=False))
    assert "num_clases" in line and str(recipe) in line
    assert not (tmp_path / "run").exists()


def test_missing_recipe_file_is_named(tmp_path, subprocess_env):
    line = _one_line_error(launch(["fit", "--config", str(tmp_path / "nope.yaml")], subprocess_env, check=False))
    assert "nope.yaml" in line


def test_class_mismatch_between_model_and_data_is_named(tmp_path, subprocess_env):
    recipe = tiny_recipe(tmp_path, num_classes=4)
    line = _one_line_error(launch(["fit", "--config", str(recipe)], subprocess_env, check=False))
    assert "num_classes=3" in line and "4 classes" in line


def test_unknown_command(subprocess_env):
    line = _one_line_error(launch(["frobnicate"], subprocess_env, check=False))
    assert "frobnicate" in line


def test_recipe_without_optimizer_uses_the_default(tmp_path, subprocess_env):
    recipe = tiny_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    del data["model"]["optimizer"]
    recipe.write_text(yaml.safe_dump(data))
    launch(["fit", "--config", str(recipe)], subprocess_env)
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-3
