"""Binary segmentation (one foreground class, ``num_classes: 2``) through the whole chain.

The most common task in the field: a tumour against background. Real-looking data made as a
user would (NumPy cases of very different sizes, some smaller than the training patch in one
axis, converted with ``launch.py data convert``), then the shipped recipes, overridden only
where sizes must shrink for the test: teacher -> distillation -> pruning -> QAT, every stage
exported (ONNX; Q/DQ ONNX for QAT) and verified, and the report, each with one class.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from test_fit_cli import ROOT, launch  # noqa: E402

#: (slices, height, width): 45 to 512 pixels wide, several smaller than the 96x96 patch in one axis
SHAPES = [(3, 120, 45), (2, 45, 512), (2, 300, 200), (3, 33, 77), (3, 96, 96), (2, 100, 45)]


def binary_cases(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i, (d, h, w) in enumerate(SHAPES):
        label = np.zeros((d, h, w), np.uint8)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        label[:, y : y + max(h // 3, 4), x : x + max(w // 3, 4)] = 1  # the "tumour"
        image = label * 1.5 + rng.normal(0, 0.4, (d, h, w))
        np.save(folder / f"case{i}_image.npy", image.astype(np.float32))
        np.save(folder / f"case{i}_label.npy", label)


def _net(base: int) -> dict:
    return {"spatial_dims": 2, "in_channels": 1, "depth": 2, "base_channels": base, "norm": "batch",
            "deep_supervision": True, "ds_levels": 1}


def pipeline_file(tmp: Path, data: Path) -> Path:
    common = {
        "model.num_classes": 2, "model.init_from": None,
        "data.init_args": {"path": str(data), "spatial_dims": 2, "patch_size": [96, 96], "batch_size": 4,
                           "num_workers": 0, "val_fraction": 0.34, "samples_per_epoch": 8, "generate": None},
        "trainer.log_every_n_steps": 1, "trainer.enable_progress_bar": False, "trainer.accelerator": "cpu",
    }
    stages = [
        {"name": "teacher", "recipe": str(ROOT / "recipes/unet2d_phantom.yaml"), "export": ["onnx"],
         "set": {**common, "model.net.init_args": _net(8), "trainer.max_epochs": 3}},
        {"name": "distill", "recipe": str(ROOT / "recipes/distill_unet2d.yaml"), "export": ["onnx"],
         "inputs": {"trainer.callbacks.Distillation.teacher": "teacher"},
         "set": {**common, "model.net.init_args": _net(4), "trainer.max_epochs": 2,
                 "trainer.callbacks.Distillation.features": [{"student": "decoders.0", "teacher": "decoders.0",
                                                              "weight": 0.5}],
                 "trainer.callbacks.Distillation.affinity": [{"student": "decoders.1", "teacher": "decoders.1",
                                                              "weight": 1.0, "grid": 8}]}},
        {"name": "prune", "recipe": str(ROOT / "recipes/prune_unet2d.yaml"), "checkpoint": "last", "export": ["onnx"],
         "inputs": {"model.init_from": "distill", "trainer.callbacks.Distillation.teacher": "teacher"},
         "set": {**common, "model.net.init_args": _net(4), "trainer.max_epochs": 2,
                 "trainer.callbacks.PruneRetrain.rounds": 1, "trainer.callbacks.PruneRetrain.epochs_per_round": 1,
                 "trainer.callbacks.PruneRetrain.round_to": 2, "trainer.callbacks.PruneRetrain.taylor_batches": 1}},
        {"name": "qat", "recipe": str(ROOT / "recipes/qat_unet2d.yaml"),
         "export": ["onnx-qdq --max-exceed-fraction 0.005"], "inputs": {"model.init_from": "prune"},
         "set": {**common, "model.net.init_args": _net(4), "trainer.max_epochs": 2,
                 "trainer.callbacks.QuantizationAwareTraining.calib_batches": 2,
                 "trainer.callbacks.QuantizationAwareTraining.freeze_bn_epoch": 1,
                 "trainer.callbacks.QuantizationAwareTraining.freeze_ranges_epoch": 1}},
    ]
    for stage in stages[1:3]:  # model.init_from is an input there, not a setting
        if "model.init_from" in stage.get("inputs", {}):
            stage["set"].pop("model.init_from")
    stages[3]["set"].pop("model.init_from")
    path = tmp / "pipeline_binary.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp / "run"), "final": "qat/onnx-qdq", "stages": stages}))
    return path


@pytest.mark.slow
def test_binary_segmentation_trains_distils_prunes_quantizes_exports_and_reports(tmp_path, subprocess_env):
    binary_cases(tmp_path / "cases")
    data = tmp_path / "scans.h5"
    launch(["data", "convert", str(tmp_path / "cases"), "--out", str(data), "--class-names", "background,tumour"],
           subprocess_env)
    out = launch(["pipeline", str(pipeline_file(tmp_path, data))], subprocess_env).stdout
    run = tmp_path / "run"
    for stage, fmt in (("teacher", "onnx"), ("distill", "onnx"), ("prune", "onnx"), ("qat", "onnx-qdq")):
        status = json.loads((run / stage / "stage.json").read_text())
        assert status["complete"], (stage, out[-2000:])
        card = json.loads((run / stage / "export" / fmt / "model_card.json").read_text())
        dice = card["metrics"]["dice"]
        for side in ("pytorch", "artifact"):  # verification scored the one foreground class
            assert list(dice[side]["per_class"]) == ["background", "tumour"], (stage, dice)
            assert dice[side]["mean_foreground"] == dice[side]["per_class"]["tumour"]
    report = json.loads((run / "report.json").read_text())
    assert {(r["stage"], r["kind"]) for r in report["rows"]} >= {("teacher", "pytorch"), ("qat", "onnx-qdq")}
    for row in report["rows"]:
        assert list(row["per_class_dice"]) == ["tumour"] and 0.0 <= row["dice"] <= 1.0, row
    teacher = next(r for r in report["rows"] if (r["stage"], r["kind"]) == ("teacher", "pytorch"))
    assert teacher["dice"] > 0.0  # it learned the tumour at all, on cases smaller than its patch
