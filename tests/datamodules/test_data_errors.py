"""Every bad input is a one-line UserError that names the culprit (HDF5 and general)."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from datamodules.h5io import write_h5
from datamodules.hdf5 import HDF5SegDataModule
from dmhelpers import make_dm, phantom_cases
from trainer.errors import UserError

NAMES = ["background", "liver", "kidney", "spleen", "lesion"]


def _raw_h5(path, cases, num_classes=5, attrs=True, in_channels=1):
    """Write the layout by hand with h5py, bypassing write_h5's validation."""
    with h5py.File(path, "w") as f:
        if attrs:
            f.attrs.update({"format": "compressseg-h5", "version": 1, "num_classes": num_classes,
                            "class_names": json.dumps(NAMES[:num_classes]), "in_channels": in_channels})
        g = f.create_group("cases")
        for cid, image, label in cases:
            c = g.create_group(cid)
            c.attrs["spacing"] = [1.0, 1.0, 1.0]
            if image is not None:
                c.create_dataset("image", data=image)
            if label is not None:
                c.create_dataset("label", data=label)
    return str(path)


def _case(shape=(4, 32, 32), top=4):
    label = (np.arange(np.prod(shape)) % (top + 1)).astype(np.uint8).reshape(shape)
    return np.zeros((1, *shape), np.float32), label


def _dm(path, **kw):
    return make_dm(path, 2, val_fraction=0.0, **kw)


def test_missing_file_names_the_path_and_generate_creates_it_atomically(tmp_path):
    missing = str(tmp_path / "phantom_nope.h5")
    with pytest.raises(UserError, match=rf"data file {missing} does not exist.*generate"):
        HDF5SegDataModule(missing, 2, [16, 16])
    dm = HDF5SegDataModule(missing, 2, [16, 16], generate={"cases": 3, "shape": [4, 32, 32], "num_classes": 4})
    assert not os.path.exists(missing) and dm.num_classes == 4  # described from the generate args
    assert dm.class_names == NAMES[:4] and dm.describe()["in_channels"] == 1
    dm.prepare_data()
    dm.setup()
    assert os.listdir(tmp_path) == ["phantom_nope.h5"]  # no temporary left behind
    assert len(dm.store.cases) == 3 and dm.describe()["num_classes"] == 4


def test_unknown_generate_key(tmp_path):
    with pytest.raises(UserError, match=r"generate has unknown keys \['size'\]"):
        HDF5SegDataModule(str(tmp_path / "x.h5"), 2, [16, 16], generate={"size": 3})


def test_missing_dataset(tmp_path):
    image, label = _case()
    path = _raw_h5(tmp_path / "a.h5", [("c0", image, label), ("c1", image, None)])
    with pytest.raises(UserError, match=r"/cases/c1: dataset 'label' is missing"):
        _dm(path)


def test_file_without_the_expected_layout(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_dataset("volume", data=np.zeros(3))
    with pytest.raises(UserError, match=r"root attribute 'format' is missing"):
        HDF5SegDataModule(str(plain), 2, [16, 16])
    no_cases = tmp_path / "nocases.h5"
    with h5py.File(no_cases, "w") as f:
        f.attrs.update({"format": "compressseg-h5", "version": 1, "num_classes": 2,
                        "class_names": '["a", "b"]', "in_channels": 1})
    with pytest.raises(UserError, match=r"group '/cases' is missing"):
        _dm(str(no_cases))


def test_empty_dataset(tmp_path):
    path = _raw_h5(tmp_path / "empty.h5", [])
    with pytest.raises(UserError, match="contains no cases"):
        _dm(path)
    with pytest.raises(UserError, match="no cases to write"):
        write_h5(str(tmp_path / "e2.h5"), [], num_classes=2, class_names=["a", "b"])
    assert not os.path.exists(tmp_path / "e2.h5")


def test_shape_and_dtype_mismatch(tmp_path):
    image, label = _case()
    path = _raw_h5(tmp_path / "shape.h5", [("c0", image, label[:, :31])])
    with pytest.raises(UserError, match=r"label shape \[4, 31, 32\] does not match image shape \[1, 4, 32, 32\]"):
        _dm(path)
    path = _raw_h5(tmp_path / "dtype.h5", [("c0", image.astype(np.float64), label)])
    with pytest.raises(UserError, match="image dtype is float64, expected float32"):
        _dm(path)
    path = _raw_h5(tmp_path / "ldtype.h5", [("c0", image, label.astype(np.int32))])
    with pytest.raises(UserError, match="label dtype is int32, expected uint8"):
        _dm(path)
    path = _raw_h5(tmp_path / "chan.h5", [("c0", image, label)], in_channels=2)
    with pytest.raises(UserError, match="image has 1 channels but the file says in_channels=2"):
        _dm(path)


@pytest.mark.parametrize("kw", [{}, {"memmap": False}, {"cache": "always"}])
def test_labels_out_of_range(tmp_path, kw):
    image, label = _case(top=6)
    path = _raw_h5(tmp_path / "range.h5", [("c0", image, label)], num_classes=5)
    with pytest.raises(UserError, match=r"case 'c0'.*label value 6 is out of range \[0, 5\)"):
        _dm(path, **kw)


def test_truncated_hdf5(tmp_path, data_files):
    path = str(tmp_path / "cut.h5")
    data = open(data_files["h5", 2], "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match=rf"{path}: the file is truncated"):
        HDF5SegDataModule(path, 2, [16, 16])
    open(path, "wb").write(b"not an hdf5 file at all")
    with pytest.raises(UserError, match=rf"{path}: cannot be read as HDF5"):
        HDF5SegDataModule(path, 2, [16, 16])


def test_writer_rejects_bad_cases_and_leaves_nothing(tmp_path):
    image, label = _case()
    bad = image.copy()
    bad[0, 0, 0, 0] = np.nan
    out = str(tmp_path / "w.h5")
    for cases, message in [([("c0", bad, label)], "NaN"),
                           ([("c0", image, label), ("c0", image, label)], "duplicate case id"),
                           ([("c0", image, label)], r"spacing=\[0.0, 1.0, 1.0\]")]:
        spacing = (0.0, 1.0, 1.0) if "spacing" in message else (1.0, 1.0, 1.0)
        with pytest.raises(UserError, match=message):
            write_h5(out, [(c, i, lab, spacing) for c, i, lab in cases], num_classes=5, class_names=NAMES)
        assert os.listdir(tmp_path) == []


def test_split_that_leaves_a_rank_without_data(data_files):
    dm = make_dm(data_files["h5", 3], 3, val_fraction=0.2)  # 1 validation volume
    assert len(dm.make_dataloader("val", rank=0, world_size=1)) == 1
    with pytest.raises(UserError, match="cannot be split over 2 ranks, rank 1 would get no data"):
        dm.make_dataloader("val", rank=1, world_size=2)
    with pytest.raises(UserError, match="no training cases left"):
        make_dm(data_files["h5", 3], 3, val_cases=["case_0000", "case_0001"],
                test_cases=["case_0002", "case_0003", "case_0004"])
    with pytest.raises(UserError, match=r"val_cases \['case_9999'\] are not in the file"):
        make_dm(data_files["h5", 3], 3, val_cases=["case_9999"])


@pytest.mark.parametrize("kwargs,message", [
    ({"patch_size": [20, 20]}, r"patch_size=\[20, 20\] must be a multiple of pad_multiple=16"),
    ({"patch_size": [16, 16, 16]}, r"needs 2 positive sizes"),
    ({"spatial_dims": 4}, "spatial_dims=4 must be 2 or 3"),
    ({"fg_oversample": 1.5}, r"fg_oversample=1.5 must be in \[0, 1\]"),
    ({"fg_class_weights": {"tumour": 2}}, r"fg_class_weights names \['tumour'\], not foreground classes"),
    ({"fg_class_weights": [1, 2]}, r"fg_class_weights=\[1, 2\] needs 4 weights, one per foreground class"),
    ({"fg_class_weights": {"lesion": -1}}, r"must be finite, >= 0 and not all 0"),
    ({"fg_class_weights": [0, 0, 0, 0]}, r"must be finite, >= 0 and not all 0"),
    ({"fg_class_weights": {"lesion": "many"}}, r"must be numbers"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "sum below 1"),
    ({"cache": "sometimes"}, "cache='sometimes' must be one of"),
    ({"aug_flip_prob": 2.0}, r"aug_flip_prob=2.0 must be a probability"),
    ({"batch_size": 0}, "batch_size=0 must be >= 1"),
    ({"samples_per_epoch": 0}, "samples_per_epoch=0 must be >= 1"),
])
def test_constructor_arguments_are_validated(data_files, kwargs, message):
    args = {"spatial_dims": 2, "patch_size": [16, 16], **kwargs}
    with pytest.raises(UserError, match=message):
        HDF5SegDataModule(data_files["h5", 2], **args)


def test_user_errors_are_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        HDF5SegDataModule(str(tmp_path / "x.h5"), 2, [16, 16])
    assert "\n" not in str(err.value)


def test_checkpoint_hyperparameters_rebuild_the_datamodule(data_files):
    dm = make_dm(data_files["h5", 2], 2, aug_rotate_deg=7.0, generate={"cases": 6, "shape": [4, 32, 32]})
    hp = dict(dm.hparams)
    assert hp["aug_rotate_deg"] == 7.0 and hp["patch_size"] == [16, 16] and hp["path"] == data_files["h5", 2]
    again = HDF5SegDataModule(**hp)
    again.prepare_data()
    again.setup()
    assert again.splits == dm.splits and again.augment_config == dm.augment_config
    assert list(phantom_cases(2))  # the helper stays importable
