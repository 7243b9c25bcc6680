"""``launch.py data convert | generate`` with hostile or careless inputs and outputs.

Never unpickle, never hang on a FIFO, never write misregistered labels, never leave a
half-written file or the folders a failed run made.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import nibabel as nib
import numpy as np
import pytest

from datamodules.h5io import iter_h5_cases
from hostile import make_fifo, one_line_error, run_cli, tree, written


class Payload:
    """Unpickling this writes a marker file: the proof that something was unpickled."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def convert(*args) -> tuple[int, str]:
    code, _, err = run_cli(["data", "convert", *map(str, args)])
    return code, err


def _pair(src, name="a", shape=(3, 8, 8)):
    np.save(src / f"{name}_image.npy", np.ones(shape, np.float32))
    np.save(src / f"{name}_label.npy", np.zeros(shape, np.uint8))


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    _pair(folder)
    return folder


# ------------------------------------------------------------------ pickles and broken archives
@pytest.mark.parametrize("kind", ["npz", "npy"])
def test_object_arrays_are_refused_and_never_unpickled(src, tmp_path, kind):
    Payload.marker = str(tmp_path / "unpickled.txt")
    hostile = np.array([Payload()], dtype=object)
    if kind == "npz":
        np.savez(src / "b.npz", image=hostile, label=np.zeros((3, 8, 8), np.uint8))
    else:
        np.save(src / "b_image.npy", hostile, allow_pickle=True)
        np.save(src / "b_label.npy", np.zeros((3, 8, 8), np.uint8))
    out = tmp_path / "o.h5"
    one_line_error(*convert(src, "--out", out, "--num-classes", "2"), "object array", "never unpickled")
    assert not os.path.exists(Payload.marker) and not out.exists()


def test_truncated_npz_and_npy_are_one_line(src, tmp_path):
    np.savez(src / "b.npz", image=np.ones((3, 8, 8), np.float32), label=np.zeros((3, 8, 8), np.uint8))
    data = (src / "b.npz").read_bytes()
    (src / "b.npz").write_bytes(data[: len(data) // 2])
    one_line_error(*convert(src, "--out", tmp_path / "o.h5", "--num-classes", "2"), "b.npz", "not a readable .npz")
    os.remove(src / "b.npz")
    written(src / "c_image.npy", (src / "a_image.npy").read_bytes()[:90])
    np.save(src / "c_label.npy", np.zeros((3, 8, 8), np.uint8))
    one_line_error(*convert(src, "--out", tmp_path / "o.h5", "--num-classes", "2"), "c_image.npy", "not a readable .npy")


def test_pickle_renamed_npz_is_one_line(src, tmp_path):
    Payload.marker = str(tmp_path / "unpickled.txt")
    (src / "b.npz").write_bytes(pickle.dumps(Payload()))
    one_line_error(*convert(src, "--out", tmp_path / "o.h5", "--num-classes", "2"), "b.npz")
    assert not os.path.exists(Payload.marker)


@pytest.mark.timeout(120)
def test_fifo_named_like_a_case_does_not_hang(src, tmp_path):
    make_fifo(src / "b_image.npy")
    np.save(src / "b_label.npy", np.zeros((3, 8, 8), np.uint8))
    one_line_error(*convert(src, "--out", tmp_path / "o.h5", "--num-classes", "2"), "b_image.npy", "FIFO")


def test_spacing_json_that_is_a_fifo_or_holds_nan(src, tmp_path):
    (src / "spacing.json").write_text('{"a": [NaN, 1, 1]}')  # Python's json accepts NaN
    one_line_error(*convert(src, "--out", tmp_path / "o.h5"), "spacing=[nan, 1.0, 1.0]", "3 positive floats")
    os.remove(src / "spacing.json")
    make_fifo(src / "spacing.json")
    one_line_error(*convert(src, "--out", tmp_path / "o.h5"), "spacing.json", "FIFO")


# ------------------------------------------------------------------ outputs
def test_force_onto_a_directory_is_refused_and_the_directory_kept(src, tmp_path):
    out = tmp_path / "out.h5"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for command in (["convert", src], ["generate", "--cases", "2", "--shape", "2", "16", "16"]):
        code, _, err = run_cli(["data", *map(str, command), "--out", str(out), "--force"])
        one_line_error(code, err, str(out), "is a directory")
    assert tree(out) == ["precious.txt"]


def test_read_only_output_folder_is_one_line_and_writes_nothing(src, readonly_dir):
    one_line_error(*convert(src, "--out", readonly_dir / "o.h5"), "not writable")
    one_line_error(*convert(src, "--out", readonly_dir / "new" / "o.h5"), "not writable")
    assert tree(readonly_dir) == []


def test_failed_convert_leaves_no_folders_it_made(src, tmp_path):
    np.save(src / "b_image.npy", np.ones((3, 8, 8), np.float32))
    np.save(src / "b_label.npy", np.full((3, 8, 8), 9, np.uint8))  # out of range, found while writing
    out = tmp_path / "made" / "by" / "convert" / "o.h5"
    one_line_error(*convert(src, "--out", out, "--num-classes", "2"), "label value 9")
    assert not (tmp_path / "made").exists()


def test_output_under_a_file_is_one_line(src, tmp_path):
    (tmp_path / "afile").write_text("x")
    one_line_error(*convert(src, "--out", tmp_path / "afile" / "o.h5"), "afile is a file, not a folder")


# ------------------------------------------------------------------ NIfTI image and label on different grids
def _nifti_case(src, image, label, image_affine, label_affine):
    nib.save(nib.Nifti1Image(image, image_affine), src / "n_image.nii.gz")
    nib.save(nib.Nifti1Image(label, label_affine), src / "n_label.nii.gz")


@pytest.fixture
def nifti(tmp_path):
    """A (x, y, z) = (6, 5, 4) image with spacing (0.8, 0.9, 3.0) and an origin, and its label."""
    folder = tmp_path / "nii"
    folder.mkdir()
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 5, 4)).astype(np.float32)
    label = rng.integers(0, 3, size=(6, 5, 4)).astype(np.uint8)
    affine = np.diag([0.8, 0.9, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    return folder, image, label, affine


def test_label_stored_flipped_and_permuted_on_the_same_grid_is_reoriented(nifti, tmp_path):
    folder, image, label, affine = nifti
    # the same voxels stored with x flipped and (x, y) swapped: a pure axis permutation/flip
    stored = np.flip(label, 0).transpose(1, 0, 2)
    flip_x = np.eye(4)
    flip_x[0, 0], flip_x[0, 3] = -1, label.shape[0] - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    _nifti_case(folder, image, stored, affine, affine @ flip_x @ swap)
    out = tmp_path / "o.h5"
    code, err = convert(folder, "--out", out, "--num-classes", "3")
    assert code == 0, err
    assert "label reoriented onto the image's axes" in err
    (_, _, got, _), = list(iter_h5_cases(str(out)))
    assert np.array_equal(got, label.transpose(2, 1, 0))  # voxel for voxel on the image's grid


def _moved_5mm(affine):
    out = affine.copy()
    out[0, 3] += 5.0
    return out


@pytest.mark.parametrize("change, words", [
    (_moved_5mm, "origin"),
    (lambda a: a @ np.diag([1.0, 1.0, 2.0, 1.0]), "spacing"),
    (lambda a: a @ np.array([[0.96, -0.28, 0, 0], [0.28, 0.96, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "spacing"),
])
def test_label_on_another_grid_is_refused(nifti, tmp_path, change, words):
    folder, image, label, affine = nifti
    _nifti_case(folder, image, label, affine, change(affine))  # moved, rescaled or rotated 16 degrees
    out = tmp_path / "o.h5"
    one_line_error(*convert(folder, "--out", out, "--num-classes", "3"), "n_label.nii.gz", "not on the same grid",
                   words, "resample the label")
    assert not out.exists()


def test_nifti_renamed_zip_is_one_line(tmp_path):
    folder = tmp_path / "nii"
    folder.mkdir()
    with zipfile.ZipFile(folder / "n_image.nii.gz", "w") as zf:
        zf.writestr("x", "not a nifti")
    written(folder / "n_label.nii.gz", b"")
    one_line_error(*convert(folder, "--out", tmp_path / "o.h5", "--num-classes", "2"), "cannot read NIfTI")
