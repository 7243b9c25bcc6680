"""``launch.py export``: argument handling, one-line errors, a real checkpoint end to end."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from trainer.export.card import CARD_NAME
from trainer.export import known_formats
from trainer.export.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_format(tmp_path, capsys):
    assert main(["--ckpt", "x.ckpt", "--format", "onnx-int4", "--out", str(tmp_path / "o")]) == 2
    known = ", ".join(known_formats())  # other files in formats/ may add more
    assert {"onnx", "onnx-fp16", "onnx-int8-cpu", "tensorrt"} <= set(known_formats())
    assert _error_line(capsys) == f"error: unknown export format 'onnx-int4'; known formats: {known}"


def test_non_empty_out_dir(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    assert main(["--ckpt", "x.ckpt", "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "is not empty (1 entries); pass --overwrite" in _error_line(capsys)


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "nope.ckpt"), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "nope.ckpt does not exist" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_bad_format_option(tmp_path, capsys):
    argv = ["--ckpt", "x.ckpt", "--format", "onnx-int8-cpu", "--out", str(tmp_path / "o"), "--calibration-batches", "0"]
    assert main(argv) == 2
    assert "onnx-int8-cpu: calibration_batches=0 must be >= 1" in _error_line(capsys)


def test_tensorrt_absent_is_a_one_line_error(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("tensorrt and CUDA are present: nothing is missing")
    except Exception:
        pass
    assert main(["--ckpt", "x.ckpt", "--format", "tensorrt", "--out", str(tmp_path / "o"), "--precision", "int8"]) == 2
    line = _error_line(capsys)
    assert "format 'tensorrt' needs" in line and ("`tensorrt` Python package" in line or "CUDA device" in line)
    assert list(tmp_path.iterdir()) == []


def test_format_options_appear_in_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--format", "onnx-int8-cpu", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "onnx-int8-cpu options" in out and "--calibration-method" in out and "--max-dice-drop" in out
    assert "onnx-fp16" in out  # the epilog lists every format


def _fit_tiny_run(tmp: Path, env: dict) -> Path:
    """One epoch of a 2D depth-2 U-Net (with deep supervision) on the tiny test datamodule."""
    recipe = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1, "accelerator": "cpu", "devices": 1, "default_root_dir": str(tmp / "run"),
            "enable_progress_bar": False, "logger": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp / "ckpt"), "filename": "last"}}],
        },
        "model": {
            "net": {"class_path": "trainer.models.UNet",
                    "init_args": {"spatial_dims": 2, "num_classes": 3, "depth": 2, "base_channels": 4,
                                  "deep_supervision": True, "ds_levels": 1}},
            "num_classes": 3,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
        },
        "data": {"class_path": "tinydata.TinySegDataModule",
                 "init_args": {"spatial_dims": 2, "size": 32, "n_train": 4, "n_val": 4}},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "fit", "--config", str(path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "ckpt" / "last.ckpt"


def test_export_from_a_real_checkpoint(tmp_path, subprocess_env, capsys):
    ckpt = _fit_tiny_run(tmp_path, subprocess_env)
    out = tmp_path / "onnx"
    assert main(["--ckpt", str(ckpt), "--format", "onnx", "--out", str(out), "--threads", "1"]) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out / 'model.onnx'}" in stdout and "verified: Dice pytorch" in stdout
    card = json.loads((out / CARD_NAME).read_text())
    assert card["source"]["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert card["class_names"] == ["background", "organ1", "organ2"]
    assert card["verification"]["passed"] and card["verification"]["batches"] == 2
    # a second export into the same folder needs --overwrite
    assert main(["--ckpt", str(ckpt), "--format", "onnx-fp16", "--out", str(out)]) == 2
    assert "--overwrite" in _error_line(capsys)
    assert main(["--ckpt", str(ckpt), "--format", "onnx-fp16", "--out", str(out), "--overwrite", "--threads", "1"]) == 0
    assert json.loads((out / CARD_NAME).read_text())["format"] == "onnx-fp16"


def test_verify_on_a_new_data_file_against_pytorch(tmp_path, subprocess_env):
    """The deployment-site path: an artifact exported from an HDF5 run, verified with
    `launch.py verify --data` on another file (other phantom seed) against the checkpoint."""
    recipe = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "use_distributed_sampler": False, "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "last"}}]},
        "model": {"net": {"class_path": "trainer.models.UNet",
                          "init_args": {"spatial_dims": 2, "num_classes": 3, "depth": 2, "base_channels": 4}},
                  "num_classes": 3, "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}},
        "data": {"class_path": "datamodules.hdf5.HDF5SegDataModule",
                 "init_args": {"path": str(tmp_path / "phantom_train.h5"), "spatial_dims": 2, "patch_size": [32, 32],
                               "batch_size": 4, "num_workers": 0, "samples_per_epoch": 8, "val_fraction": 0.34,
                               "generate": {"cases": 3, "shape": [3, 32, 32], "seed": 0, "num_classes": 3}}},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "launch.py"), *a], env=subprocess_env, cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    assert run("fit", "--config", str(tmp_path / "r.yaml")).returncode == 0
    ckpt, out = tmp_path / "ckpt" / "last.ckpt", tmp_path / "onnx"
    proc = run("export", "--ckpt", str(ckpt), "--format", "onnx", "--out", str(out), "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    other = tmp_path / "site.h5"
    assert run("data", "generate", "--out", str(other), "--cases", "2", "--shape", "2", "32", "32", "--seed", "7",
               "--num-classes", "3").returncode == 0
    proc = run("verify", str(out), "--data", str(other), "--ckpt", str(ckpt), "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"of {other}" in proc.stdout and "verified" in proc.stdout
    # the card's checkpoint is found by itself; a file with other classes is refused in one line
    wrong = tmp_path / "five.h5"
    assert run("data", "generate", "--out", str(wrong), "--cases", "1", "--shape", "1", "32", "32").returncode == 0
    proc = run("verify", str(out), "--data", str(wrong))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "has 5 classes but the artifact outputs 3" in proc.stderr
