"""Read one image or label file of a case into a :class:`Volume`: voxels plus where they lie.

* NIfTI (``.nii``, ``.nii.gz``): nibabel; the header's affine (qform/sform) is the geometry.
* NRRD, MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) and any other single file
  SimpleITK reads, and a DICOM series (a folder of one series' slices): SimpleITK. Its
  geometry (origin, spacing, direction cosines in LPS) becomes a RAS affine like nibabel's.
* NumPy (``.npy``, ``.npz``): arrays in the stored layout ``[C,] D, H, W`` (z, y, x), no affine
  (spacing from the ``.npz``, ``spacing.json`` or 1 mm); never unpickled.

A ``Volume``'s array is indexed ``(x, y, z[, c])`` when it has an affine (as NIfTI stores
it), ``affine`` maps those indices to RAS+ millimetres. Every failure is a one-line
``UserError`` naming the file.
"""
from __future__ import annotations

import locale
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from trainer.errors import UserError

NIFTI_EXTENSIONS = (".nii", ".nii.gz")
SITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
NUMPY_EXTENSIONS = (".npy",)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """Voxels and geometry of one file.

    ``array``: ``(x, y, z[, c])`` with an affine, the stored ``[C,] D, H, W`` layout without.
    ``affine``: 4x4 voxel (x, y, z) -> RAS+ mm, or None (NumPy).
    ``spacing``: z y x mm when there is no affine (NumPy), else derived from the affine.
    """

    array: np.ndarray
    affine: np.ndarray | None = None
    spacing: tuple[float, float, float] | None = None
    source: str = ""

    def zooms_xyz(self) -> np.ndarray:
        return np.sqrt((np.asarray(self.affine, float)[:3, :3] ** 2).sum(0))


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:200]


def file_kind(name: str) -> str | None:
    """``"nifti"``, ``"sitk"``, ``"npy"`` from a file name (a folder: ``"dicom"``), else None."""
    low = name.lower()
    if low.endswith(NIFTI_EXTENSIONS):
        return "nifti"
    if low.endswith(SITK_EXTENSIONS):
        return "sitk"
    if low.endswith(NUMPY_EXTENSIONS):
        return "npy"
    return None


def read_volume(path: str, what: str) -> Volume:
    """The volume in ``path`` (file or DICOM series folder); ``what`` names it in errors."""
    if os.path.isdir(path):
        return _read_dicom_series(path, what)
    kind = file_kind(path)
    if kind == "nifti":
        return _read_nifti(path, what)
    if kind == "npy":
        return Volume(read_npy(path, what), source=path)
    return _read_sitk_file(path, what)


# -- NIfTI ------------------------------------------------------------------------------------
def _read_nifti(path: str, what: str) -> Volume:
    import nibabel as nib

    try:
        nii = nib.load(path)
        array = np.asanyarray(nii.dataobj)
        affine = np.asarray(nii.affine, float)
    except Exception as e:  # nibabel raises many types for damaged files
        raise UserError(f"{what} {path}: cannot read NIfTI ({_short(e)})") from None
    if array.ndim == 5 and array.shape[3] == 1:  # (x, y, z, t=1, c): NIfTI's vector layout
        array = array[:, :, :, 0]
    return Volume(array, affine, source=path)


# -- SimpleITK: NRRD, MetaImage, DICOM ---------------------------------------------------------------
@contextmanager
def kept_locale() -> Iterator[None]:
    """Undo a C locale that GDCM (SimpleITK's DICOM I/O) sets for the whole process (its writer
    was seen to; reading is guarded alike): with it, Python decodes every later subprocess's
    output as ASCII, and a child that prints one non-ASCII character (Lightning's tips do)
    fails with UnicodeDecodeError."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:  # a dependency; only a broken environment lacks it
        raise UserError("reading NRRD/MHA/DICOM needs SimpleITK: pip install SimpleITK") from None
    return sitk


def _from_sitk(image, path: str, what: str) -> Volume:
    """SimpleITK image -> array (x, y, z[, c]) + RAS affine."""
    sitk = _sitk()
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise UserError(f"{what} {path}: a {dim}D image; expected 2D or 3D (channels as vector components)")
    array = sitk.GetArrayFromImage(image)  # (z, y, x[, c]) or (y, x[, c])
    vector = image.GetNumberOfComponentsPerPixel() > 1
    spatial = array.ndim - int(vector)
    array = np.moveaxis(array, list(range(spatial)), list(range(spatial))[::-1])  # (x, y[, z][, c])
    direction = np.asarray(image.GetDirection(), float).reshape(dim, dim)
    spacing, origin = np.asarray(image.GetSpacing(), float), np.asarray(image.GetOrigin(), float)
    if dim == 2:  # one slice: a 3D grid of depth 1, 1 mm thick
        array = array[:, :, None] if not vector else array[:, :, None, :]
        direction = np.pad(direction, (0, 1))
        direction[2, 2] = 1.0
        spacing, origin = np.append(spacing, 1.0), np.append(origin, 0.0)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(spacing)
    lps[:3, 3] = origin
    return Volume(np.ascontiguousarray(array), _LPS_TO_RAS @ lps, source=path)


def _read_sitk_file(path: str, what: str) -> Volume:
    sitk = _sitk()
    try:
        with kept_locale():
            image = sitk.ReadImage(path)
    except RuntimeError as e:
        raise UserError(f"{what} {path}: SimpleITK cannot read it ({_short(e).split('Description:')[-1].strip()})") from None
    return _from_sitk(image, path, what)


def _read_dicom_series(folder: str, what: str) -> Volume:
    sitk = _sitk()
    with kept_locale():
        return _from_sitk(_dicom_image(sitk, folder, what), folder, what)


def _dicom_image(sitk, folder: str, what: str):
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(folder)
    except RuntimeError as e:
        raise UserError(f"{what} {folder}: cannot list DICOM series ({_short(e)})") from None
    if not series:
        raise UserError(f"{what} {folder}: a folder, but it holds no DICOM series (a DICOM series folder, or a file, is expected)")
    if len(series) > 1:
        raise UserError(f"{what} {folder}: holds {len(series)} DICOM series ({', '.join(series[:3])}...); "
                        "put each series in its own folder")
    files = reader.GetGDCMSeriesFileNames(folder, series[0])
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise UserError(f"{what} {folder}: cannot read the DICOM series ({_short(e)})") from None


# -- NumPy (never unpickled) ----------------------------------------------------------------------
def read_npy(path: str, where: str) -> np.ndarray:
    """One ``.npy`` array; never unpickles (object arrays are refused)."""
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise UserError(f"{where}: holds a Python object array; only numeric arrays are read (never unpickled)") from None
        raise UserError(f"{where}: not a readable .npy array ({_short(e)[:150]})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{where}: not a readable .npy array ({type(e).__name__}: {_short(e)[:150]})") from None


def read_npz(path: str, unlabelled: bool, where: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``image``, ``label`` (None if absent), ``spacing`` (None if absent) of a ``.npz``; never unpickles."""
    try:
        with np.load(path, allow_pickle=False) as z:
            for key in ("image",) if unlabelled else ("image", "label"):
                if key not in z.files:
                    raise UserError(f"{where}: array {key!r} is missing (has {sorted(z.files)})")
            return tuple(z[key] if key in z.files else None for key in ("image", "label", "spacing"))
    except UserError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise UserError(f"{where}: holds a Python object array; only numeric arrays are read (never unpickled)") from None
        raise UserError(f"{where}: not a readable .npz archive ({_short(e)[:150]})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{where}: not a readable .npz archive ({type(e).__name__}: {_short(e)[:150]})") from None
