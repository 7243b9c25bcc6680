"""Post-training quantization of a checkpoint: the command, the new checkpoint, export from it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from trainer.quant import ptq
from trainer.quant.modules import QuantLayer


def _fp32_checkpoint(tmp: Path) -> Path:
    from trainer.recipe_cli import run_lightning_cli

    recipe = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "default_root_dir": str(tmp),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp), "filename": "fp32"}}]},
        "model": {"net": {"class_path": "trainer.models.UNet",
                          "init_args": {"spatial_dims": 2, "num_classes": 3, "depth": 2, "base_channels": 4,
                                        "deep_supervision": True, "ds_levels": 1}},
                  "num_classes": 3,
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}},
        "data": {"class_path": "tinydata.TinySegDataModule", "init_args": {"n_train": 8, "n_val": 2}},
    }
    (tmp / "fp32.yaml").write_text(yaml.safe_dump(recipe))
    run_lightning_cli(["fit", "--config", str(tmp / "fp32.yaml")])
    return tmp / "fp32.ckpt"


def test_quantize_command_writes_a_checkpoint_that_restores_and_exports(tmp_path, capsys):
    from trainer.export.cli import main as export_main
    from trainer.restore import restore_run

    ckpt = _fp32_checkpoint(tmp_path)
    out = tmp_path / "ptq.ckpt"
    from trainer.cli import main as launch  # `python launch.py quantize ...`

    assert launch(["quantize", "--ckpt", str(ckpt), "--calibration", "mse", "--batches", "2", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out

    saved = torch.load(out, weights_only=True)
    assert not {"optimizer_states", "loops", "callbacks"} & set(saved)
    assert [e["converter"] for e in saved["compressseg"]["structure"]] == ["trainer.quant.convert.FakeQuantConversion"]
    assert saved["compressseg"]["ptq"]["calibration"] == "mse"
    assert saved["compressseg"]["ptq"]["unobserved"] == ["ds_heads.0"]  # eval mode: no deep supervision
    assert saved["state_dict"]["net.encoders.0.0.input_quant.scale"] > 0

    run = restore_run(out)
    assert isinstance(run.net.encoders[0][0], QuantLayer) and run.net.encoders[0][0].input_quant.enabled
    assert export_main(["--ckpt", str(out), "--format", "onnx-qdq", "--out", str(tmp_path / "qdq")]) == 0
    assert (tmp_path / "qdq" / "model.onnx").is_file()

    assert ptq.main(["--ckpt", str(out), "--out", str(tmp_path / "again.ckpt")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert ptq.main(["--ckpt", str(ckpt), "--out", str(out)]) == 2  # exists, no --overwrite
    assert ptq.main(["--ckpt", str(ckpt), "--batches", "0", "--out", str(tmp_path / "x.ckpt")]) == 2
    with pytest.raises(SystemExit):
        ptq.main(["--ckpt", str(ckpt), "--calibration", "entropy", "--out", str(tmp_path / "y.ckpt")])
