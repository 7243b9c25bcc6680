"""``launch.py data generate | convert | inspect`` through ``datamodules.tools.main``."""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from datamodules.h5io import iter_h5_cases
from datamodules.tfrecord import index_path_for, iter_tfrecord_cases
from datamodules.tools import main


def _read_back(path):
    if path.endswith(".h5"):
        return {cid: (img, lab, sp) for cid, img, lab, sp in iter_h5_cases(path)}
    return {cid: (img, lab, sp) for cid, img, lab, sp in iter_tfrecord_cases([path])}


@pytest.fixture
def numpy_folder(tmp_path):
    """Three single-channel NumPy cases in the accepted forms; spacing from json and npz."""
    rng = np.random.default_rng(0)
    src = tmp_path / "np"
    src.mkdir()
    expected = {}
    # a: 3D .npy pair, float64 image (stored as float32), int64 label, spacing from spacing.json
    img, lab = rng.normal(size=(3, 8, 10)), rng.integers(0, 3, size=(3, 8, 10))
    np.save(src / "a_image.npy", img)
    np.save(src / "a_label.npy", lab)
    expected["a"] = (img.astype(np.float32)[None], lab.astype(np.uint8), (2.5, 0.7, 0.7))
    # c: 2D .npz with its own spacing
    img, lab = rng.normal(size=(8, 10)).astype(np.float32), rng.integers(0, 3, size=(8, 10)).astype(np.uint8)
    np.savez(src / "c.npz", image=img, label=lab, spacing=np.array([4.0, 0.5, 0.6]))
    expected["c"] = (img[None, None], lab[None], (4.0, 0.5, 0.6))
    # d: 2D .npy pair, no spacing anywhere -> 1 1 1
    img, lab = rng.normal(size=(8, 10)).astype(np.float32), rng.integers(0, 3, size=(8, 10)).astype(np.uint8)
    np.save(src / "d_image.npy", img)
    np.save(src / "d_label.npy", lab)
    expected["d"] = (img[None, None], lab[None], (1.0, 1.0, 1.0))
    (src / "spacing.json").write_text(json.dumps({"a": [2.5, 0.7, 0.7]}))
    return src, expected


@pytest.mark.parametrize("out", ["out.h5", "out.tfrecord", "out.tfrecord.gz"])
def test_convert_numpy_round_trips_exactly(numpy_folder, tmp_path, out, capsys):
    src, expected = numpy_folder
    path = str(tmp_path / out)
    assert main(["convert", str(src), "--out", path, "--class-names", "bg,one,two", "--normalize", "noNorm"]) == 0
    got = _read_back(path)
    assert sorted(got) == sorted(expected)
    for cid, (img, lab, sp) in expected.items():
        assert got[cid][0].dtype == np.float32 and np.array_equal(got[cid][0], img)
        assert got[cid][1].dtype == np.uint8 and np.array_equal(got[cid][1], lab)
        assert got[cid][2] == sp
    assert "3 classes: bg, one, two" in capsys.readouterr().out  # num_classes inferred: max label + 1
    if "tfrecord" in out:
        assert os.path.exists(index_path_for(path))


def test_convert_multichannel(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "mc"
    src.mkdir()
    img3, lab3 = rng.normal(size=(2, 3, 8, 10)).astype(np.float32), rng.integers(0, 4, size=(3, 8, 10)).astype(np.uint8)
    np.save(src / "b_image.npy", img3)
    np.save(src / "b_label.npy", lab3)
    img2, lab2 = rng.normal(size=(2, 8, 10)).astype(np.float32), rng.integers(0, 4, size=(8, 10)).astype(np.uint8)
    np.savez(src / "e.npz", image=img2, label=lab2)  # [C, H, W] with a 2D label
    path = str(tmp_path / "mc.h5")
    assert main(["convert", str(src), "--out", path, "--num-classes", "4", "--normalize", "noNorm"]) == 0
    got = _read_back(path)
    assert np.array_equal(got["b"][0], img3) and np.array_equal(got["b"][1], lab3)
    assert np.array_equal(got["e"][0], img2[:, None]) and np.array_equal(got["e"][1], lab2[None])
    np.save(src / "f_image.npy", img3[:1])  # one channel among two-channel cases
    np.save(src / "f_label.npy", lab3)
    assert main(["convert", str(src), "--out", str(tmp_path / "mixed.h5")]) == 2


@pytest.mark.parametrize("out", ["nii.h5", "nii.tfrecord"])
def test_convert_nifti_round_trips_exactly(tmp_path, out):
    rng = np.random.default_rng(1)
    src = tmp_path / "nii"
    src.mkdir()
    expected = {}
    for i, ext in enumerate((".nii.gz", ".nii")):
        img = rng.normal(size=(10, 8, 5)).astype(np.float32)  # (x, y, z)
        lab = rng.integers(0, 4, size=(10, 8, 5)).astype(np.uint8)
        affine = np.diag([0.8, 0.9, 3.0 + i, 1.0])
        nib.save(nib.Nifti1Image(img, affine), src / f"case{i}_image{ext}")
        nib.save(nib.Nifti1Image(lab, affine), src / f"case{i}_label{ext}")
        expected[f"case{i}"] = (img.transpose(2, 1, 0)[None], lab.transpose(2, 1, 0), (3.0 + i, 0.9, 0.8))
    path = str(tmp_path / out)
    assert main(["convert", str(src), "--out", path, "--normalize", "noNorm"]) == 0
    got = _read_back(path)
    for cid, (img, lab, sp) in expected.items():
        assert np.array_equal(got[cid][0], img) and np.array_equal(got[cid][1], lab)
        assert np.allclose(got[cid][2], sp, rtol=0, atol=1e-6)  # NIfTI stores zooms as float32


def test_convert_bad_inputs_write_nothing(tmp_path, capsys):
    src = tmp_path / "bad"
    src.mkdir()
    np.save(src / "a_image.npy", np.zeros((3, 8, 8), np.float32))
    np.save(src / "a_label.npy", np.zeros((3, 8, 8), np.uint8))
    np.save(src / "b_image.npy", np.zeros((3, 8, 8), np.float32))
    np.save(src / "b_label.npy", np.zeros((3, 8, 9), np.uint8))  # shape mismatch in the 2nd case
    out = tmp_path / "o.h5"
    assert main(["convert", str(src), "--out", str(out), "--num-classes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'b'" in err and "[3, 8, 9]" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    np.save(src / "b_label.npy", np.full((3, 8, 8), 7, np.uint8))  # out of range for 2 classes
    assert main(["convert", str(src), "--out", str(out), "--num-classes", "2"]) == 2
    assert "label value 7 is out of range [0, 2)" in capsys.readouterr().err
    np.save(src / "b_label.npy", np.full((3, 8, 8), 0.5, np.float32))
    assert main(["convert", str(src), "--out", str(out)]) == 2
    assert "non-integer" in capsys.readouterr().err
    os.remove(src / "b_label.npy")
    assert main(["convert", str(src), "--out", str(out)]) == 2
    assert "has no matching b_label file" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert not out.exists()


def test_generate_and_inspect_both_formats(tmp_path, capsys):
    h5, tfr = str(tmp_path / "g.h5"), str(tmp_path / "g.tfrecord")
    assert main(["generate", "--out", h5, "--shape", "4", "32", "32", "--cases", "3", "--seed", "1"]) == 0
    assert main(["generate", "--out", tfr, "--shape", "4", "32", "32", "--cases", "3", "--seed", "1"]) == 0
    assert main(["generate", "--out", h5, "--cases", "3"]) == 2  # exists without --force
    capsys.readouterr()
    infos = []
    for path in (h5, tfr):
        assert main(["inspect", path, "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    a, b = infos
    labels = [lab for _, _, lab, _ in iter_h5_cases(h5)]
    counts = np.bincount(np.concatenate([lab.ravel() for lab in labels]), minlength=5)
    for info in infos:
        assert info["num_cases"] == 3 and info["num_classes"] == 5 and info["in_channels"] == 1
        assert info["class_voxels"] == counts.tolist() and info["shapes"] == {"[1, 4, 32, 32]": 3}
        assert info["dtypes"] == {"image": "float32", "label": "uint8"}
    assert a["spacing_zyx_mm"] == b["spacing_zyx_mm"] and a["class_names"][4] == "lesion"
    assert "memory-mapped" in a["storage"]
    assert main(["inspect", h5, "--cases"]) == 0
    text = capsys.readouterr().out
    assert "lesion" in text and "case_0002" in text and "spacing" in text


def test_generate_3d_defaults_and_compression(tmp_path, capsys):
    path = str(tmp_path / "g3.h5")
    assert main(["generate", "--out", path, "--dims", "3", "--cases", "2", "--compression", "lzf"]) == 0
    info_rc = main(["inspect", path, "--json"])
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info_rc == 0 and info["shapes"] == {"[1, 48, 64, 64]": 2} and "lzf" in info["storage"]
