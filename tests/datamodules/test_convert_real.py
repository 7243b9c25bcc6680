"""``data convert`` on real-data layouts: MSD / nnU-Net raw folders, NRRD, MHA and DICOM
series written by SimpleITK, canonical orientation, resampling, nnU-Net's per-modality
normalisation and the record the data file keeps of it; ``data inspect``'s statistics."""
from __future__ import annotations

import json
import locale

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from datamodules.h5io import iter_h5_cases, read_h5_case_records, read_h5_description
from datamodules.readers import kept_locale
from datamodules.tools import main

RAS = np.diag([0.8, 0.9, 2.5, 1.0])
RAS[:3, 3] = [10.0, 20.0, 30.0]


def _ct_case(rng, shape=(20, 18, 6)):
    """An (x, y, z) CT in HU (air, body, an organ with a tumour) and its label."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    body = (x - shape[0] / 2) ** 2 / 64 + (y - shape[1] / 2) ** 2 / 49 < 1
    organ = (x - shape[0] / 2 - 1) ** 2 / 12 + (y - shape[1] / 2) ** 2 / 9 < 1
    tumour = organ & ((x - shape[0] / 2 - 1) ** 2 + (y - shape[1] / 2) ** 2 < 2)
    hu = np.where(body, 40.0, -1000.0) + np.where(organ, 30.0, 0.0) + np.where(tumour, -25.0, 0.0)
    hu = hu + rng.normal(0, 15, shape)
    label = organ.astype(np.uint8) + tumour.astype(np.uint8)
    return hu.astype(np.float32), label, (1.5 * hu + 300 + rng.normal(0, 5, shape)).astype(np.float32)


def _nii(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _flip_xy(affine, shape):
    """The same grid stored with x and y reversed (LPS-like storage of a RAS grid)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = shape[0] - 1, shape[1] - 1
    return affine @ flip


@pytest.fixture
def nnunet_v2(tmp_path):
    """Three CT+T2 cases, one stored LPS, one at another spacing."""
    rng = np.random.default_rng(0)
    root = tmp_path / "Dataset001_Toy"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "T2"}, "labels": {"background": 0, "organ": 1, "tumour": 2},
        "numTraining": 3, "file_ending": ".nii.gz"}))
    raw = {}
    for i in range(3):
        hu, label, t2 = _ct_case(rng)
        affine = RAS.copy()
        if i == 1:
            affine = _flip_xy(RAS, hu.shape)
            hu, label, t2 = hu[::-1, ::-1].copy(), label[::-1, ::-1].copy(), t2[::-1, ::-1].copy()
        if i == 2:
            affine = np.diag([0.8, 0.9, 5.0, 1.0])
        _nii(root / "imagesTr" / f"toy_{i:03d}_0000.nii.gz", hu, affine)
        _nii(root / "imagesTr" / f"toy_{i:03d}_0001.nii.gz", t2, affine)
        _nii(root / "labelsTr" / f"toy_{i:03d}.nii.gz", label, affine)
        raw[f"toy_{i:03d}"] = (hu, label, t2)
    (root / "imagesTr" / "._toy_000_0000.nii.gz").write_bytes(b"macOS metadata")  # skipped
    return root, raw


def test_nnunet_v2_folder_is_normalised_per_modality_and_recorded(nnunet_v2, tmp_path, capsys):
    root, raw = nnunet_v2
    out = str(tmp_path / "toy.h5")
    assert main(["convert", str(root), "--out", out]) == 0
    assert "3 classes: background, organ, tumour" in capsys.readouterr().out
    desc = read_h5_description(out)
    record = desc["preprocessing"]
    assert desc["in_channels"] == 2 and record["orientation"] == "RAS" and record["resampling"] is None
    ct, t2 = record["channels"]
    assert (ct["name"], ct["scheme"], t2["name"], t2["scheme"]) == ("CT", "CT", "T2", "zscore")
    # nnU-Net's CT constants: percentiles, mean and std of every foreground voxel of the dataset
    fg = np.concatenate([hu[label > 0] for hu, label, _ in raw.values()]).astype(np.float64)
    assert ct["clip"] == pytest.approx(np.percentile(fg, [0.5, 99.5]).tolist())
    assert (ct["mean"], ct["std"]) == pytest.approx((fg.mean(), fg.std()))
    got = {cid: (img, lab, sp) for cid, img, lab, sp in iter_h5_cases(out)}
    for cid, (hu, label, t2) in raw.items():
        if cid == "toy_001":  # stored flipped: turned back onto RAS axes
            hu, label, t2 = hu[::-1, ::-1], label[::-1, ::-1], t2[::-1, ::-1]
        image, lab, spacing = got[cid]
        expected_ct = (np.clip(hu, *ct["clip"]) - ct["mean"]) / ct["std"]
        np.testing.assert_allclose(image[0], expected_ct.transpose(2, 1, 0), rtol=0, atol=1e-4)
        np.testing.assert_allclose(image[1], ((t2 - t2.mean()) / t2.std()).transpose(2, 1, 0), rtol=0, atol=1e-4)
        np.testing.assert_array_equal(lab, label.transpose(2, 1, 0))
        assert spacing == pytest.approx((5.0 if cid == "toy_002" else 2.5, 0.9, 0.8))
    cases = read_h5_case_records(out)
    assert cases["toy_001"]["source_orientation"] == "LPS" and cases["toy_000"]["source_orientation"] == "RAS"
    assert cases["toy_000"]["channel_stats"][1]["mean"] == pytest.approx(float(raw["toy_000"][2].mean()), rel=1e-5)


def test_resampling_to_a_target_spacing(nnunet_v2, tmp_path, capsys):
    root, raw = nnunet_v2
    out = str(tmp_path / "r.h5")
    assert main(["convert", str(root), "--out", out, "--target-spacing", "median", "--interpolation", "bspline"]) == 0
    record = read_h5_description(out)["preprocessing"]
    assert record["resampling"]["target_spacing_zyx_mm"] == pytest.approx([2.5, 0.9, 0.8])  # the median
    got = {cid: (img, lab, sp) for cid, img, lab, sp in iter_h5_cases(out)}
    image, label, spacing = got["toy_002"]  # 6 slices of 5 mm -> 12 of 2.5 mm, in-plane unchanged
    assert image.shape == (2, 12, 18, 20) and label.shape == (12, 18, 20) and spacing == pytest.approx((2.5, 0.9, 0.8))
    assert set(np.unique(label)) <= {0, 1, 2}  # nearest neighbour: no new label values
    np.testing.assert_array_equal(label[::2], raw["toy_002"][1].transpose(2, 1, 0))
    assert got["toy_000"][0].shape == (2, 6, 18, 20)  # already at the target: untouched
    # explicit spacing, 0 keeps an axis; the stored spacing is the extent over the new size
    out2 = str(tmp_path / "r2.h5")
    assert main(["convert", str(root), "--out", out2, "--target-spacing", "0", "1.8", "1.6"]) == 0
    image, label, spacing = next(iter_h5_cases(out2))[1:]
    assert image.shape == (2, 6, 9, 10) and spacing == pytest.approx((2.5, 1.8, 1.6))


def test_msd_v1_folder_with_4d_images_and_test_cases(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "Task05_Toy"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    training = []
    for i in range(2):
        hu, label, t2 = _ct_case(rng)
        _nii(root / "imagesTr" / f"toy_{i}.nii.gz", np.stack([t2, hu * 0.01], -1), RAS)  # (x, y, z, 2)
        _nii(root / "labelsTr" / f"toy_{i}.nii.gz", label, RAS)
        training.append({"image": f"./imagesTr/toy_{i}.nii.gz", "label": f"./labelsTr/toy_{i}.nii.gz"})
    _nii(root / "imagesTs" / "toy_9.nii.gz", np.stack([t2, hu * 0.01], -1), RAS)
    (root / "dataset.json").write_text(json.dumps({
        "name": "Toy", "modality": {"0": "FLAIR", "1": "T1w"}, "labels": {"0": "background", "1": "edema", "2": "core"},
        "training": training, "test": ["./imagesTs/toy_9.nii.gz"]}))
    out = str(tmp_path / "msd.h5")
    assert main(["convert", str(root), "--out", out, "--unlabelled"]) == 0
    desc = read_h5_description(out)
    assert desc["class_names"] == ["background", "edema", "core"] and desc["in_channels"] == 2
    assert [c["scheme"] for c in desc["preprocessing"]["channels"]] == ["zscore", "zscore"]
    assert desc["preprocessing"]["source"]["name"] == "Toy"
    got = {cid: lab for cid, _, lab, _ in iter_h5_cases(out)}
    assert sorted(got) == ["toy_0", "toy_1", "toy_9_test"] and got["toy_9_test"] is None


def _itk(array_xyz, ras_affine):
    """The SimpleITK image of the grid nibabel describes with ``ras_affine`` (LPS world)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras_affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(0))
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).reshape(-1).tolist())
    return image


def _dicom_series(folder, image):
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    for i in range(image.GetDepth()):
        s = image[:, :, i]
        tags = {"0008|0060": "CT", "0020|000d": "1.2.3", "0020|000e": "1.2.3.4", "0020|0013": str(i + 1),
                "0020|0037": "\\".join(map(str, d[0:3] + d[3:6])),
                "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, i)))),
                "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}", "0018|0050": str(image.GetSpacing()[2]),
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"1.2.3.4.{i}"}
        for key, value in tags.items():
            s.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{i:03d}.dcm"))
        with kept_locale():  # GDCM's writer sets the C locale for the whole process
            writer.Execute(s)


def test_nrrd_mha_and_dicom_series_read_like_nifti(tmp_path):
    """The same CT stored by SimpleITK as NRRD, MHA (LPS storage) and a DICOM series reads
    voxel for voxel and mm for mm like its NIfTI twin."""
    rng = np.random.default_rng(2)
    hu, label, _ = _ct_case(rng)
    hu = np.round(hu).astype(np.int16)  # DICOM stores integers
    src = tmp_path / "src"
    src.mkdir()
    _nii(src / "nii_image.nii.gz", hu, RAS)
    _nii(src / "nii_label.nii.gz", label, RAS)
    lps = _flip_xy(RAS, hu.shape)  # stored the other way round, as DICOM usually is
    flipped_hu, flipped_label = hu[::-1, ::-1].copy(), label[::-1, ::-1].copy()
    sitk.WriteImage(_itk(flipped_hu, lps), str(src / "nrrd_image.nrrd"))
    sitk.WriteImage(_itk(flipped_label, lps), str(src / "nrrd_label.nrrd"))
    sitk.WriteImage(_itk(hu, RAS), str(src / "mha_image.mha"))
    sitk.WriteImage(_itk(label, RAS), str(src / "mha_label.mha"))
    _dicom_series(src / "dcm_image", _itk(flipped_hu, lps))
    _nii(src / "dcm_label.nii.gz", label, RAS)  # a NIfTI label on the DICOM's grid (stored RAS)
    out = str(tmp_path / "all.h5")
    before = locale.setlocale(locale.LC_ALL)
    assert main(["convert", str(src), "--out", out, "--normalize", "noNorm", "--num-classes", "3"]) == 0
    assert locale.setlocale(locale.LC_ALL) == before  # reading DICOM leaves the process's locale alone
    got = {cid: (img, lab, sp) for cid, img, lab, sp in iter_h5_cases(out)}
    ref_img, ref_lab, ref_sp = got["nii"]
    np.testing.assert_array_equal(ref_img[0], hu.transpose(2, 1, 0).astype(np.float32))
    for cid in ("nrrd", "mha", "dcm"):
        img, lab, sp = got[cid]
        np.testing.assert_array_equal(img, ref_img)
        np.testing.assert_array_equal(lab, ref_lab)
        assert sp == pytest.approx(ref_sp, abs=1e-5)
    records = read_h5_case_records(out)
    assert records["nrrd"]["source_orientation"] == "LPS" and records["mha"]["source_orientation"] == "RAS"
    np.testing.assert_allclose(records["dcm"]["affine_xyz_to_ras_mm"], RAS, atol=1e-4)


def test_orientation_none_keeps_the_stored_axes(nnunet_v2, tmp_path):
    root, raw = nnunet_v2
    out = str(tmp_path / "keep.h5")
    assert main(["convert", str(root), "--out", out, "--orientation", "none", "--normalize", "noNorm"]) == 0
    got = {cid: lab for cid, _, lab, _ in iter_h5_cases(out)}
    np.testing.assert_array_equal(got["toy_001"], raw["toy_001"][1].transpose(2, 1, 0))  # still flipped
    assert read_h5_description(out)["preprocessing"]["orientation"] is None


def test_inspect_shows_intensity_statistics_spacing_and_the_record(nnunet_v2, tmp_path, capsys):
    root, raw = nnunet_v2
    out = str(tmp_path / "raw.h5")
    assert main(["convert", str(root), "--out", out, "--normalize", "noNorm"]) == 0
    capsys.readouterr()
    assert main(["inspect", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    hu = np.concatenate([c[0].reshape(-1) for c in raw.values()]).astype(np.float64)
    fg = np.concatenate([c[0][c[1] > 0] for c in raw.values()]).astype(np.float64)
    ct = info["intensity"][0]
    assert ct["all"]["voxels"] == hu.size and ct["all"]["mean"] == pytest.approx(hu.mean(), rel=1e-6)
    assert ct["all"]["std"] == pytest.approx(hu.std(), rel=1e-6)
    assert ct["foreground"]["p0.5"] == pytest.approx(np.percentile(fg, 0.5))  # small: every voxel in the sample
    assert ct["foreground"]["p99.5"] == pytest.approx(np.percentile(fg, 99.5))
    assert info["preprocessing"]["channels"][0]["scheme"] == "noNorm"
    assert info["spacing_zyx_mm"]["max"] == pytest.approx([5.0, 0.9, 0.8])
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "intensity" in text and "foreground" in text and "channel 0 (CT): none" in text


@pytest.mark.parametrize("change, words", [
    ("escape", "points outside the dataset folder"),
    ("regions", "region-based labels"),
    ("channel", "has channel files [0]"),
    ("grid", "is not on the grid of"),
    ("values", "must be 0..K-1"),
])
def test_bad_dataset_folders_are_one_line_errors(nnunet_v2, tmp_path, capsys, change, words):
    root, _ = nnunet_v2
    meta = json.loads((root / "dataset.json").read_text())
    if change == "escape":
        meta = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "x"},
                "training": [{"image": "../../etc/passwd", "label": "./labelsTr/toy_000.nii.gz"}]}
    elif change == "regions":
        meta["labels"]["whole"] = [1, 2]
    elif change == "channel":
        (root / "imagesTr" / "toy_001_0001.nii.gz").unlink()
    elif change == "grid":
        _nii(root / "imagesTr" / "toy_000_0001.nii.gz", np.zeros((20, 18, 6), np.float32), np.diag([1.0, 1, 1, 1]))
    elif change == "values":
        meta["labels"] = {"background": 0, "organ": 2}
    (root / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "bad.h5"
    assert main(["convert", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not out.exists()


def test_bad_preprocessing_options_are_refused_before_any_work(nnunet_v2, tmp_path, capsys):
    root, _ = nnunet_v2
    for args, words in ((["--target-spacing", "1", "x", "1"], "--target-spacing 1 x 1"),
                        (["--normalize", "hu"], "--normalize 'hu' is not one of"),
                        (["--orientation", "RAR"], "--orientation 'RAR'"),
                        (["--normalize", "CT,zscore,zscore"], "names 3 schemes but the images have 2 channels")):
        assert main(["convert", str(root), "--out", str(tmp_path / "o.h5"), *args]) == 2
        err = capsys.readouterr().err
        assert words in err, (args, err)
    assert not (tmp_path / "o.h5").exists()


def test_data_for_model_uses_same_files_normalises_raw_ones_and_refuses_others(nnunet_v2, tmp_path):
    """What `launch.py verify --data` does with a file, given the model card's preprocessing."""
    from datamodules.h5io import write_h5
    from datamodules.preprocess import describe_record
    from datamodules.tools import data_for_model
    from trainer.errors import UserError

    root, _ = nnunet_v2
    trained, raw, coarse = (str(tmp_path / n) for n in ("trained.h5", "raw.h5", "coarse.h5"))
    assert main(["convert", str(root), "--out", trained]) == 0
    assert main(["convert", str(root), "--out", raw, "--normalize", "noNorm"]) == 0
    assert main(["convert", str(root), "--out", coarse, "--normalize", "noNorm", "--target-spacing", "5", "0", "0"]) == 0
    record = read_h5_description(trained)["preprocessing"]
    card = {"recorded": True, **record, "steps": describe_record(record)}
    work = tmp_path / "work"
    work.mkdir()
    assert data_for_model(trained, card, str(work)) == (trained, None)
    copy, note = data_for_model(raw, card, str(work))
    assert "raw intensities" in note and "CT, zscore" in note
    expected = {cid: img for cid, img, _, _ in iter_h5_cases(trained)}
    for cid, img, _, _ in iter_h5_cases(copy):  # exactly what convert would have written
        np.testing.assert_allclose(img, expected[cid], rtol=0, atol=1e-5)
    assert read_h5_description(copy)["preprocessing"] == record
    # a site's data converted on its own has its own CT constants: refused, naming the channel
    site = tmp_path / "site"
    site.mkdir()
    for sub in ("imagesTr", "labelsTr", "dataset.json"):
        src = root / sub
        (site / sub).mkdir() if src.is_dir() else (site / sub).write_text(src.read_text())
        for f in sorted(src.glob("toy_00[01]*")) if src.is_dir() else []:
            (site / sub / f.name).write_bytes(f.read_bytes())
    site_h5 = str(tmp_path / "site.h5")
    assert main(["convert", str(site), "--out", site_h5]) == 0
    for path, words in ((site_h5, "channel 0 was normalised as CT: clip to"), (coarse, "target spacing (z y x mm)")):
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
            data_for_model(path, card, str(work))
    bare = str(tmp_path / "bare.h5")
    write_h5(bare, iter_h5_cases(raw), num_classes=3, class_names=["background", "organ", "tumour"])
    with pytest.raises(UserError, match="records no preprocessing, but the model expects: reorient to RAS"):
        data_for_model(bare, card, str(work))
    assert data_for_model(bare, {"recorded": False}, str(work))[0] == bare  # an older card: nothing to check
