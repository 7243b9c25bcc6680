"""Data files made outside the framework, damaged or hostile, and files that are not data at all.

Each case must end in one ``UserError`` line naming the file (and case or record), never a
traceback, a hang, a 1 TiB allocation or a run that trains on NaN.
"""
from __future__ import annotations

import gzip
import json
import os
import struct

import h5py
import numpy as np
import pytest

import datamodules.filecheck as filecheck
from datamodules.hdf5 import HDF5SegDataModule
from datamodules.tfrecord import TFRecordSegDataModule, masked_crc, write_tfrecord
from dmhelpers import make_dm, phantom_cases, write_format
from hostile import make_fifo, one_line_error, run_cli, written
from trainer.errors import UserError


def h5_by_hand(path, cases, num_classes: int = 2) -> str:
    """An HDF5 file in the compressseg-h5 layout written with h5py directly, as a user would,
    without `data convert` (so nothing validated it)."""
    with h5py.File(path, "w") as f:
        f.attrs.update(format="compressseg-h5", version=1, num_classes=num_classes, in_channels=1,
                       class_names=json.dumps(["background"] + [f"c{i}" for i in range(1, num_classes)]))
        for case_id, image, label in cases:
            g = f.create_group(f"cases/{case_id}")
            g.attrs["spacing"] = np.ones(3)
            g.create_dataset("image", data=image.astype(np.float32))
            g.create_dataset("label", data=label.astype(np.uint8))
    return str(path)


def blob(d: int, h: int, w: int, value: float | None = None, where=(0, 0, 0)):
    label = np.zeros((d, h, w), np.uint8)
    label[:, h // 4 : h // 2, w // 4 : w // 2] = 1
    image = label[None].astype(np.float32) + 0.1
    if value is not None:
        image[(0, *where)] = value
    return image, label


def inspect(path) -> tuple[int, str]:
    code, _, err = run_cli(["data", "inspect", str(path)])
    return code, err


# ------------------------------------------------------------------ NaN / Inf in files nobody validated
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_in_a_hand_written_file_stop_before_training(tmp_path, bad):
    path = h5_by_hand(tmp_path / "scans.h5", [("ok", *blob(2, 16, 16)), ("bad", *blob(3, 16, 16, bad, (2, 5, 7)))])
    with pytest.raises(UserError, match=r"case 'bad': image has NaN/Inf voxels \(1 in channel 0 from slice 2\)"):
        HDF5SegDataModule(path, 2, [16, 16], num_workers=0)
    one_line_error(*inspect(path), "case 'bad'", "NaN/Inf")


def test_content_check_runs_once_per_file_version(tmp_path, monkeypatch):
    path = h5_by_hand(tmp_path / "scans.h5", [(f"c{i}", *blob(2, 16, 16)) for i in range(3)])
    make_dm(path, 2, val_fraction=0.34)  # first use: checked in a child process, remembered
    calls = []
    monkeypatch.setattr(filecheck.subprocess, "run", lambda *a, **k: calls.append(a) or pytest.fail("checked twice"))
    monkeypatch.setattr(filecheck, "_CHECKED", set())  # a new process would only have the marker
    make_dm(path, 2, val_fraction=0.34)
    assert not calls
    with h5py.File(path, "r+") as f:  # the same file edited by hand afterwards: a new version
        f["cases/c1/image"][0, 1, 2, 3] = np.nan
    monkeypatch.undo()
    with pytest.raises(UserError, match="case 'c1': image has NaN/Inf"):
        HDF5SegDataModule(path, 2, [16, 16], num_workers=0)


def test_labels_out_of_range_in_a_hand_written_file_are_named(tmp_path):
    image, label = blob(2, 16, 16)
    label[1, 3, 3] = 7
    path = h5_by_hand(tmp_path / "scans.h5", [("c0", image, label)], num_classes=2)
    with pytest.raises(UserError, match=r"case 'c0': label value 7 is out of range \[0, 2\)"):
        HDF5SegDataModule(path, 2, [16, 16], num_workers=0)


def test_nan_in_a_tfrecord_read_in_place_is_caught(tmp_path):
    path = str(tmp_path / "scans.tfrecord")
    image, label = blob(2, 16, 16)
    write_tfrecord(path, [("c0", image, label, (1, 1, 1)), ("c1", image, label, (1, 1, 1))], num_classes=2,
                   class_names=["bg", "x"])
    raw = bytearray(open(path, "rb").read())  # put a NaN into c1's image bytes and re-frame the record
    records, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack("<Q", raw[pos : pos + 8])
        records.append(bytes(raw[pos + 12 : pos + 12 + n]))
        pos += n + 16
    payload = records[1].replace(np.float32(1.1).tobytes(), np.float32(np.nan).tobytes(), 1)
    with open(path, "wb") as f:
        for p in (records[0], payload):
            f.write(struct.pack("<Q", len(p)) + struct.pack("<I", masked_crc(struct.pack("<Q", len(p)))) + p
                    + struct.pack("<I", masked_crc(p)))
    os.remove(path.replace(".tfrecord", ".tfindex"))
    with pytest.raises(UserError, match="case 'c1': image has NaN/Inf"):
        TFRecordSegDataModule(path, 2, [16, 16], num_workers=0, cache="never").setup()


# ------------------------------------------------------------------ damaged HDF5 metadata
def _flip(path: str, offset: int) -> None:
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0xFF
    open(path, "wb").write(data)


def _phantom_h5(tmp_path) -> str:
    return write_format(str(tmp_path / "phantom.h5"), "h5", phantom_cases(2))


def test_corrupt_object_header_is_one_line(tmp_path):
    path = _phantom_h5(tmp_path)
    _flip(path, open(path, "rb").read().index(b"label") + 1)  # inside a checksummed object header
    with pytest.raises(UserError, match=r"(metadata is damaged|cannot be read as HDF5)"):
        make_dm(path, 2)
    one_line_error(*inspect(path), path)


@pytest.mark.timeout(300)
def test_corrupt_global_heap_that_hangs_hdf5_is_stopped(tmp_path, monkeypatch):
    """A flipped size field in the global heap of the file's string attributes makes HDF5 loop
    forever inside one call; the one-time check runs in a child process with a time limit."""
    path = _phantom_h5(tmp_path)
    _flip(path, open(path, "rb").read().index(b"GCOL") + 24)  # the first heap object's size field
    monkeypatch.setenv(filecheck.TIMEOUT_ENV, "5")
    with pytest.raises(UserError, match="did not finish reading the file within"):
        HDF5SegDataModule(path, 2, [16, 16], num_workers=0)


# ------------------------------------------------------------------ TFRecord framing
def _record(length: int) -> bytes:
    head = struct.pack("<Q", length)
    return head + struct.pack("<I", masked_crc(head))  # a length field with a valid CRC


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.timeout(120)
def test_tfrecord_length_of_a_terabyte_with_a_valid_crc_is_truncation_not_allocation(tmp_path, gz):
    path = str(tmp_path / ("big.tfrecord.gz" if gz else "big.tfrecord"))
    write_format(path, "tfrecord.gz" if gz else "tfrecord", phantom_cases(2))
    data = (gzip.decompress(open(path, "rb").read()) if gz else open(path, "rb").read()) + _record(2**40) + b"x" * 64
    open(path, "wb").write(gzip.compress(data) if gz else data)
    os.remove(path.replace(".tfrecord.gz", ".tfrecord.tfindex") if gz else path.replace(".tfrecord", ".tfindex"))
    one_line_error(*inspect(path), "record 6 is truncated")


def test_tfrecord_shape_that_overflows_int64_is_one_line(tmp_path):
    from tfrecord import TFRecordWriter

    from datamodules.tfrecord import encode_case

    image, label = blob(1, 4, 4)
    feats = encode_case("c0", image, label, (1, 1, 1), 2, ["bg", "x"])
    huge = [2**31, 2**31, 2**31]
    feats.update(image_shape=([1, *huge], "int"), label_shape=(huge, "int"))
    path = str(tmp_path / "hostile.tfrecord")
    writer = TFRecordWriter(path)
    writer.write(feats)
    writer.close()
    one_line_error(*inspect(path), "record 0", "image has 64 bytes but shape")


# ------------------------------------------------------------------ files that are not what they are called
@pytest.mark.parametrize("make, words", [
    (lambda d: np.save(d / "arr.npy", np.zeros(3)) or d / "arr.npy", "NumPy .npy array"),
    (lambda d: written(d / "t.h5", "hello"), "unknown format"),
    (lambda d: written(d / "e.h5", b""), "empty file"),
    (lambda d: written(d / "z.tfrecord.gz", gzip.compress(b"plain text, no records")), "gzip file that does not hold"),
    (lambda d: d, "no TFRecord files found"),
    (lambda d: make_fifo(d / "pipe.h5"), "FIFO"),
    (lambda d: os.symlink(d / "gone.h5", d / "link.h5") or d / "link.h5", "broken symbolic link"),
    (lambda d: "/dev/null", "device file"),
])
@pytest.mark.timeout(120)
def test_inspect_says_what_a_file_is(tmp_path, make, words):
    one_line_error(*inspect(make(tmp_path)), words)


def test_nifti_given_to_inspect_points_to_convert(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "scan.nii")
    one_line_error(*inspect(tmp_path / "scan.nii"), "NIfTI image", "data convert")


def test_formats_crossed_between_datamodules(tmp_path):
    h5 = _phantom_h5(tmp_path)
    tfr = write_format(str(tmp_path / "phantom.tfrecord"), "tfrecord", phantom_cases(2))
    with pytest.raises(UserError, match="is an HDF5 file, not TFRecord; read it with datamodules.hdf5"):
        TFRecordSegDataModule(h5, 2, [16, 16])
    with pytest.raises(UserError, match="is a TFRecord file, not HDF5; read it with datamodules.tfrecord"):
        HDF5SegDataModule(tfr, 2, [16, 16])
    with pytest.raises(UserError, match="is a directory, not a file"):
        HDF5SegDataModule(str(tmp_path), 2, [16, 16])
    with pytest.raises(UserError, match="is a FIFO"):
        TFRecordSegDataModule(str(make_fifo(tmp_path / "p.tfrecord")), 2, [16, 16])


# ------------------------------------------------------------------ careless data settings
def test_patch_larger_than_memory_is_refused_up_front(tmp_path):
    with pytest.raises(UserError, match=r"patch_size=\[1048576, 1048576\] .* GiB per batch"):
        HDF5SegDataModule(_phantom_h5(tmp_path), 2, [2**20, 2**20])


def test_typo_in_path_does_not_generate_a_phantom(tmp_path):
    typo = tmp_path / "my_scnas.h5"
    with pytest.raises(UserError, match="only creates phantom data under a name containing 'phantom'"):
        HDF5SegDataModule(str(typo), 2, [16, 16], generate={"cases": 3, "shape": [2, 32, 32]})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dims", [2, 3])
def test_binary_cases_smaller_than_the_patch_train_and_validate(tmp_path, dims):
    import lightning.pytorch as pl

    from trainer.models.unet import UNet
    from trainer.module import SegmentationModule

    # 45 to 512 pixels wide in one file, most cases smaller than the patch in some axis
    shapes = [(3, 120, 45), (2, 45, 512), (2, 33, 77), (3, 64, 64)] if dims == 2 else \
        [(5, 40, 12), (20, 9, 33), (3, 64, 64), (16, 16, 16)]
    path = h5_by_hand(tmp_path / "sizes.h5", [(f"c{i}", *blob(*s)) for i, s in enumerate(shapes)])
    patch = [96, 96] if dims == 2 else [16, 32, 32]
    dm = make_dm(path, dims, patch_size=patch, batch_size=2, val_fraction=0.5, samples_per_epoch=4)
    for batch in dm.train_dataloader():
        assert list(batch["image"].shape[2:]) == patch and bool(batch["label"].max() <= 1)
    for batch in dm.val_dataloader():
        assert batch["image"].shape[2:] == batch["label"].shape[1:]
    net = UNet(spatial_dims=dims, num_classes=2, depth=2, base_channels=2)
    module = SegmentationModule(net, num_classes=2, roi_size=patch if dims == 3 else None)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, use_distributed_sampler=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    dice = trainer.callback_metrics["val/dice"]  # the binary (one foreground class) metric at epoch end
    assert dice.dim() == 0 and 0.0 <= float(dice) <= 1.0
    assert "val/dice_c1" in trainer.callback_metrics
