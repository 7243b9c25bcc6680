"""The on-disk data contract shared by every reader, writer and tool in ``datamodules``.

A dataset is a list of cases. A case is an ``image`` (float32 ``[C, D, H, W]``), a ``label``
(uint8 ``[D, H, W]``, values in ``[0, num_classes)``) and a ``spacing`` (three floats, z y x,
in mm). 2D data is stored the same way and sliced along D. A case may be *unlabelled* (an image
nobody segmented, for distillation: the teacher labels it): its label is stored as zeros, a
placeholder that keeps every reader's layout the same, and the case is flagged ``labelled =
false``; the tuples that readers and writers pass around carry ``label=None`` for it. Dataset-level metadata is
``num_classes`` (background included), ``class_names`` and ``in_channels``.

HDF5 layout (``format="compressseg-h5"``, ``version=1``)::

    /                 attrs: format, version, num_classes, class_names (JSON), in_channels
    /cases/<case_id>/ attrs: spacing, labelled (optional, default true)
        image         float32 [C, D, H, W]
        label         uint8   [D, H, W]

TFRecord layout (``format="compressseg-tfrecord"``): one ``tf.train.Example`` per case, see
:mod:`datamodules.tfrecord`.

Validation lives here so that ``convert``, ``generate`` and both datamodules reject the same
inputs with the same one-line :class:`~trainer.errors.UserError`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from trainer.errors import UserError

H5_FORMAT = "compressseg-h5"
TFRECORD_FORMAT = "compressseg-tfrecord"
VERSION = 1
IMAGE_DTYPE = np.dtype("<f4")
LABEL_DTYPE = np.dtype("u1")
MAX_CLASSES = 256  # labels are uint8


@dataclass(frozen=True)
class CaseInfo:
    """What the header says about one case (no array data)."""

    case_id: str
    image_shape: tuple[int, int, int, int]  # C, D, H, W
    spacing: tuple[float, float, float]  # z, y, x in mm
    labelled: bool = True  # False: the stored label is a placeholder of zeros

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return self.image_shape[1:]


@dataclass
class DatasetHeader:
    """Dataset-level metadata plus the per-case header, readable without touching arrays."""

    num_classes: int
    class_names: list[str]
    in_channels: int
    cases: list[CaseInfo] = field(default_factory=list)
    source: str = ""

    def describe(self, spatial_dims: int | None = None) -> dict:
        out = {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "in_channels": self.in_channels,
            "num_cases": len(self.cases),
        }
        unlabelled = sum(not c.labelled for c in self.cases)
        if unlabelled:
            out["unlabelled_cases"] = unlabelled
        if spatial_dims is not None:
            out["spatial_dims"] = spatial_dims
        return out


def check_class_metadata(num_classes, class_names, where: str) -> tuple[int, list[str]]:
    """Validate ``num_classes``/``class_names``; returns them normalised (int, list[str])."""
    try:
        n = int(num_classes)
    except (TypeError, ValueError):
        raise UserError(f"{where}: num_classes={num_classes!r} is not an integer") from None
    if not 2 <= n <= MAX_CLASSES:
        raise UserError(f"{where}: num_classes={n} must be in [2, {MAX_CLASSES}] (background included)")
    if isinstance(class_names, (bytes, str)):
        try:
            class_names = json.loads(class_names)
        except json.JSONDecodeError:
            raise UserError(f"{where}: class_names={class_names!r} is not a JSON list of strings") from None
    names = [str(c) for c in class_names] if class_names is not None else []
    if len(names) != n:
        raise UserError(
            f"{where}: class_names has {len(names)} entries {names} but num_classes={n}; "
            "give one name per class, background first"
        )
    return n, names


def check_spacing(spacing, where: str) -> tuple[float, float, float]:
    arr = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise UserError(f"{where}: spacing={np.asarray(spacing).reshape(-1).tolist()} must be 3 positive floats (z y x, mm)")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


def check_case_shapes(image_shape, image_dtype, label_shape, label_dtype, where: str) -> None:
    """Shape/dtype contract between an image and its label (metadata only, no data read)."""
    image_shape, label_shape = tuple(image_shape), tuple(label_shape)
    if np.dtype(image_dtype) != IMAGE_DTYPE:
        raise UserError(f"{where}: image dtype is {np.dtype(image_dtype)}, expected float32; convert it with `launch.py data convert`")
    if np.dtype(label_dtype) != LABEL_DTYPE:
        raise UserError(f"{where}: label dtype is {np.dtype(label_dtype)}, expected uint8; convert it with `launch.py data convert`")
    if len(image_shape) != 4 or min(image_shape, default=0) < 1:
        raise UserError(f"{where}: image shape {list(image_shape)} must be [C, D, H, W] with every size >= 1")
    if label_shape != image_shape[1:]:
        raise UserError(
            f"{where}: label shape {list(label_shape)} does not match image shape {list(image_shape)} "
            f"(expected label [D, H, W] = {list(image_shape[1:])})"
        )


def check_label_range(label: np.ndarray, num_classes: int, where: str) -> None:
    top = int(label.max()) if label.size else 0
    if top >= num_classes:
        raise UserError(
            f"{where}: label value {top} is out of range [0, {num_classes}); "
            f"fix the labels or raise num_classes (currently {num_classes})"
        )


def placeholder_label(image: np.ndarray) -> np.ndarray:
    """What an unlabelled case stores as its label: zeros of the image's spatial shape."""
    return np.zeros(np.shape(image)[1:], LABEL_DTYPE)


def validate_case(image: np.ndarray, label: np.ndarray | None, num_classes: int, where: str) -> np.ndarray:
    """Full check of one case held in memory: shapes, dtypes, label range, finite image.
    Returns the label to store (the placeholder when ``label`` is None: an unlabelled case)."""
    if label is None:
        label = placeholder_label(image)
    check_case_shapes(image.shape, image.dtype, label.shape, label.dtype, where)
    check_label_range(label, num_classes, where)
    if not np.isfinite(image).all():
        raise UserError(f"{where}: image contains NaN or Inf values; clean the source data")
    return label


# -- what a file is ---------------------------------------------------------------------------
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_OTHER_MAGIC = ((b"\x93NUMPY", "a NumPy .npy array"), (b"PK\x03\x04", "a zip archive (.npz, or a torch checkpoint)"),
                (b"\x80\x02", "a Python pickle"), (b"{", "JSON text"), (b"%YAML", "YAML text"),
                (b"\x28\xb5\x2f\xfd", "zstd-compressed data"), (b"BZh", "bzip2-compressed data"))


def sniff_data_file(path: str) -> tuple[str | None, str]:
    """``("h5" | "tfrecord" | None, description)`` from a file's first bytes only.

    HDF5: the signature at offset 0, 512, 1024 or 2048 (after a user block). TFRecord: the
    first record's length field passes its masked CRC32C (for gzip, in the decompressed
    stream). Anything else is named by what it looks like, for the error message."""
    import gzip
    import struct

    with open(path, "rb") as f:
        head = f.read(2056)
    if any(head[o : o + 8] == _HDF5_MAGIC for o in (0, 512, 1024, 2048)):
        return "h5", "an HDF5 file"
    stream = head
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                stream = g.read(12)
        except (OSError, EOFError):
            return None, "a damaged gzip file"
    if len(stream) >= 12:
        from datamodules.tfrecord import masked_crc

        if struct.unpack("<I", stream[8:12])[0] == masked_crc(stream[:8]):
            return "tfrecord", "a TFRecord file"
    if head[:2] == b"\x1f\x8b":
        return None, "a gzip file that does not hold TFRecords"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return None, "a NIfTI image (convert it with `launch.py data convert`)"
    for magic, what in _OTHER_MAGIC:
        if head.startswith(magic):
            return None, what
    return None, "an empty file" if not head else "a file of unknown format"
