"""Unlabelled cases (images for distillation): stored in both formats, kept out of evaluation,
flagged in every batch, and not allowed to move the split of the labelled cases."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from datamodules import phantom
from datamodules.h5io import iter_h5_cases
from datamodules.tfrecord import iter_tfrecord_cases
from datamodules.tools import main
from dmhelpers import FORMATS, SHAPES, make_dm, write_format
from trainer.errors import UserError

LABELLED, UNLABELLED = 6, 4


def _cases(unlabelled: int, dims: int = 2):
    return phantom.iter_phantom_cases(cases=LABELLED + unlabelled, shape=SHAPES[dims], seed=0, unlabelled=unlabelled)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabelled")
    ext = {"h5": ".h5", "h5-lzf": ".lzf.h5", "tfrecord": ".tfrecord", "tfrecord.gz": ".tfrecord.gz"}
    out = {fmt: write_format(str(root / f"mixed{ext[fmt]}"), fmt, _cases(UNLABELLED)) for fmt in FORMATS}
    out["labelled only"] = write_format(str(root / "labelled.h5"), "h5", _cases(0))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_unlabelled_cases_round_trip_and_stay_out_of_evaluation(files, fmt):
    path = files[fmt]
    read = iter_h5_cases(path) if fmt.startswith("h5") else iter_tfrecord_cases([path])
    cases = list(read)
    originals = list(_cases(UNLABELLED))
    assert [c[0] for c in cases] == [c[0] for c in originals]
    for (_, image, label, _), (_, image0, label0, _) in zip(cases, originals):
        np.testing.assert_array_equal(image, image0)
        assert (label is None) == (label0 is None)
        if label is not None:
            np.testing.assert_array_equal(label, label0)
    dm = make_dm(path, 2, val_fraction=0.34, test_fraction=0.17)
    flags = [c.labelled for c in dm.store.header.cases]
    assert flags == [True] * LABELLED + [False] * UNLABELLED
    unlabelled = {i for i, flag in enumerate(flags) if not flag}
    assert unlabelled <= set(dm.splits["train"])
    assert not unlabelled & (set(dm.splits["val"]) | set(dm.splits["test"]))
    # the fractions count labelled cases: 2 val and 1 test of 6, as without the unlabelled ones
    reference = make_dm(files["labelled only"], 2, val_fraction=0.34, test_fraction=0.17)
    assert (dm.splits["val"], dm.splits["test"]) == (reference.splits["val"], reference.splits["test"])
    assert dm.describe()["num_classes"] == 5 and dm.store.header.describe()["unlabelled_cases"] == UNLABELLED


def test_batches_flag_unlabelled_samples_and_hold_placeholder_labels(files):
    dm = make_dm(files["h5"], 2, batch_size=5, samples_per_epoch=40)
    names = {c.case_id: c.labelled for c in dm.store.header.cases}
    seen = set()
    for batch in dm.train_dataloader():
        assert batch["labelled"].dtype == torch.bool and batch["labelled"].shape == (5,)
        assert batch["labelled"].tolist() == [names[c] for c in batch["case"]]
        assert int(batch["label"][~batch["labelled"]].abs().sum()) == 0
        seen.update(batch["labelled"].tolist())
    assert seen == {True, False}
    assert all(bool(b["labelled"].all()) for b in dm.val_dataloader())


def test_unlabelled_cases_cannot_be_evaluated_or_fill_a_file(files, tmp_path):
    with pytest.raises(UserError, match=r"val_cases \['case_0007'\] are unlabelled"):
        make_dm(files["h5"], 2, val_cases=["case_0001", "case_0007"])
    from datamodules.hdf5 import HDF5SegDataModule

    for bad in (10, -1, "3"):
        with pytest.raises(UserError, match=rf"generate.unlabelled={bad} must be in \[0, cases=10\)"):
            HDF5SegDataModule(str(tmp_path / "x.h5"), 2, [16, 16], generate={"cases": 10, "unlabelled": bad})
    assert not (tmp_path / "x.h5").exists()


def test_generate_and_inspect_report_unlabelled_cases(tmp_path, capsys):
    for ext in (".h5", ".tfrecord"):
        out = str(tmp_path / f"g{ext}")
        assert main(["generate", "--out", out, "--shape", "4", "32", "32", "--cases", "5", "--unlabelled", "2"]) == 0
        capsys.readouterr()
        assert main(["inspect", out, "--json", "--cases"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["num_cases"], info["unlabelled_cases"]) == (5, 2)
        assert [c.get("labelled", True) for c in info["cases"]] == [True, True, True, False, False]
        # class statistics come from the labelled cases only
        labels = [lab for _, _, lab, _ in iter_h5_cases(out)] if ext == ".h5" else [lab for _, _, lab, _ in iter_tfrecord_cases([out])]
        counts = np.bincount(np.concatenate([lab.ravel() for lab in labels if lab is not None]), minlength=5)
        assert info["class_voxels"] == counts.tolist()
        assert main(["inspect", out]) == 0
        assert "5 (2 unlabelled)" in capsys.readouterr().out
    assert main(["generate", "--out", str(tmp_path / "bad.h5"), "--cases", "3", "--unlabelled", "3"]) == 2
    assert not (tmp_path / "bad.h5").exists()


def test_convert_stores_images_without_labels_only_when_asked(tmp_path, capsys):
    import nibabel as nib

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    labelled = rng.normal(size=(3, 8, 10)).astype(np.float32)
    np.save(src / "a_image.npy", labelled)
    np.save(src / "a_label.npy", rng.integers(0, 3, size=(3, 8, 10)))
    lone = rng.normal(size=(3, 8, 10)).astype(np.float32)  # [D, H, W]
    np.save(src / "b_image.npy", lone)
    np.savez(src / "c.npz", image=rng.normal(size=(8, 10)).astype(np.float32))
    nib.save(nib.Nifti1Image(rng.normal(size=(10, 8, 3)).astype(np.float32), np.diag([0.7, 0.7, 2.5, 1])),
             str(src / "d_image.nii.gz"))
    out = str(tmp_path / "out.h5")
    assert main(["convert", str(src), "--out", out]) == 2
    assert "b_image.npy has no matching b_label file" in capsys.readouterr().err
    assert not (tmp_path / "out.h5").exists()
    assert main(["convert", str(src), "--out", out, "--unlabelled", "--normalize", "noNorm"]) == 0
    got = {cid: (img, lab, sp) for cid, img, lab, sp in iter_h5_cases(out)}
    assert got["a"][1] is not None and [got[c][1] for c in "bcd"] == [None, None, None]
    np.testing.assert_array_equal(got["b"][0], lone[None])
    assert got["c"][0].shape == (1, 1, 8, 10) and got["d"][0].shape == (1, 3, 8, 10)
    assert got["d"][2] == pytest.approx((2.5, 0.7, 0.7))
    assert "3 classes" in capsys.readouterr().out  # inferred from the labelled case
