"""A model trained on converted real-layout data: its card carries the data's preprocessing,
export verification uses the recipe's sliding-window overlap, and ``launch.py verify --data``
uses a file prepared the same way, normalises a raw one the model's way, refuses the rest."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from datamodules.tools import main as data_main
from trainer.export.card import CARD_NAME
from trainer.export.verify_cli import main as verify_main

ROOT = Path(__file__).resolve().parents[2]


def _toy_ct_folder(root: Path, cases: int, seed: int) -> None:
    """An nnU-Net v2 raw folder: CT volumes in HU with an organ, 3D NIfTI."""
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
                                                   "numTraining": cases, "file_ending": ".nii.gz"}))
    x, y, z = np.meshgrid(np.arange(24), np.arange(24), np.arange(20), indexing="ij")
    for i in range(cases):
        c = rng.uniform(8, 16, 3)
        organ = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) < rng.uniform(16, 30)
        hu = np.where(organ, 80.0, 0.0) - 100 + rng.normal(0, 20, organ.shape)
        affine = np.diag([1.2, 1.2, 1.5, 1.0])
        nib.save(nib.Nifti1Image(hu.astype(np.float32), affine), str(root / "imagesTr" / f"t_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(organ.astype(np.uint8), affine), str(root / "labelsTr" / f"t_{i:03d}.nii.gz"))


def test_card_records_preprocessing_and_verify_data_follows_it(tmp_path, subprocess_env, capsys):
    src = tmp_path / "Dataset002_Toy"
    _toy_ct_folder(src, 4, seed=0)
    data, raw = tmp_path / "toy.h5", tmp_path / "toy_raw.h5"
    assert data_main(["convert", str(src), "--out", str(data)]) == 0
    assert data_main(["convert", str(src), "--out", str(raw), "--normalize", "noNorm"]) == 0
    # the shipped 3D recipe (sliding window, overlap 0.25), shrunk to a smoke run on this data
    recipe = yaml.safe_load((ROOT / "recipes" / "unet3d_phantom.yaml").read_text())
    recipe["trainer"].update(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                             default_root_dir=str(tmp_path / "run"),
                             callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                         "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "last"}}])
    recipe["model"].update(num_classes=2, roi_size=[16, 16, 16])
    recipe["model"]["net"]["init_args"].update(depth=2, base_channels=4)
    recipe["data"]["init_args"].update(path=str(data), patch_size=[16, 16, 16], num_workers=0, samples_per_epoch=4,
                                       val_fraction=0.5, generate=None)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "launch.py"), *a], env=subprocess_env, cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    proc = run("fit", "--config", str(tmp_path / "r.yaml"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt, out = tmp_path / "ckpt" / "last.ckpt", tmp_path / "onnx"
    proc = run("export", "--ckpt", str(ckpt), "--format", "onnx", "--out", str(out), "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((out / CARD_NAME).read_text())
    pre = card["preprocessing"]
    assert pre["recorded"] and pre["orientation"] == "RAS" and pre["channels"][0]["scheme"] == "CT"
    assert any(step.startswith("channel 0 (CT): CT: clip to") for step in pre["steps"])
    assert card["input"]["sliding_window_overlap"] == 0.25  # the recipe's, as validation used it
    hd = card["metrics"]["hd95_mm"]
    assert hd["pytorch"]["mean_foreground"] is not None and "Metrics Reloaded" in hd["definition"]
    assert card["metrics"]["evaluated"]["cases"] == 2 and card["metrics"]["evaluated"]["scope"] == "case volumes"

    capsys.readouterr()
    argv = [str(out), "--ckpt", str(ckpt), "--threads", "1", "--data"]
    assert verify_main(argv + [str(data)]) == 0  # the file it was trained on: used as it is
    same = capsys.readouterr()
    assert "note:" not in same.err and "verified" in same.out
    assert verify_main(argv + [str(raw)]) == 0  # raw intensities: normalised with the card's CT constants
    normalised = capsys.readouterr()
    assert "holds raw intensities; normalised the model's way" in normalised.err
    dice = lambda text: text.split("mean Dice ")[1].split(" ")[0]  # noqa: E731
    assert dice(normalised.out) == dice(same.out)  # the same numbers as on the converted file
    other = tmp_path / "Dataset003_Site"  # a site's data converted on its own: other CT constants
    _toy_ct_folder(other, 2, seed=5)
    site = tmp_path / "site.h5"
    assert data_main(["convert", str(other), "--out", str(site)]) == 0
    capsys.readouterr()
    assert verify_main(argv + [str(site)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "channel 0 was normalised as CT: clip to" in err[0] and "--normalize noNorm" in err[0]
