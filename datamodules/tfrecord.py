"""TFRecord reading/writing (``compressseg-tfrecord``) and ``TFRecordSegDataModule``.

One ``tf.train.Example`` per case, all features self-describing so every record stands
alone (and TensorFlow can read the files with ``tf.io.parse_single_example``)::

    format       bytes  b"compressseg-tfrecord"      version      int64 [1]
    case_id      bytes                               spacing      bytes float64 little-endian [3] (z y x mm)
    image        bytes  float32 little-endian, C order
    image_shape  int64  [C, D, H, W]
    label        bytes  uint8
    label_shape  int64  [D, H, W]
    num_classes  int64  [1]                          class_names  bytes, JSON list
    preprocessing       bytes, JSON (optional): the dataset's preprocessing record, the same on every record
    case_preprocessing  bytes, JSON (optional): this case's own record (source files, per-case values)

Built on the ``tfrecord`` package for what it does well (``TFRecordWriter`` framing and
serialisation, ``example_pb2`` parsing, ``create_index`` for plain files). Records are *read*
by the small reader below instead of ``tfrecord``'s iterator, which never checks CRCs, knows
nothing of DDP ranks, starts at a random record with an index and 0 workers, and gets an empty
index for gzip files. Here:

* every record's length CRC and payload CRC (masked CRC32C) are verified; a mismatch, a short
  read or an undecodable payload is a ``UserError`` naming the file and record number;
* index files (``tfrecord``'s text format ``offset length`` per record, named like
  ``tfrecord2idx`` does: ``data.tfrecord`` -> ``data.tfindex``) are created when missing and
  checked against their file (a stale or foreign index is an error, never silently used);
  for gzip files the offsets are positions in the decompressed stream;
* sharding is per sample, by the datamodule's sampler (disjoint and complete across
  ranks x workers, independent of how records are laid out in files).

Reading for training (``cache``): ``"auto"``/``"always"`` decode every record once per node into
the memory-mapped cache of :mod:`datamodules.cache` (the only option for gzip, which cannot be
read at random); ``"never"`` reads plain files at random through the index, verifying the CRC
of each record it reads, with a small per-process LRU of decoded cases.
"""
from __future__ import annotations

import glob
import gzip
import json
import math
import os
import struct
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Literal

import crc32c
import numpy as np
from google.protobuf.message import DecodeError
from tfrecord import TFRecordWriter, example_pb2
from tfrecord.tools.tfrecord2idx import create_index

from datamodules.base import SegDataModule
from datamodules.cache import CacheStore, build_cache, cache_location, cache_ready
from datamodules.h5io import atomic_path
from datamodules.schema import (
    IMAGE_DTYPE,
    LABEL_DTYPE,
    TFRECORD_FORMAT,
    VERSION,
    CaseInfo,
    DatasetHeader,
    check_case_shapes,
    check_class_metadata,
    check_spacing,
    sniff_data_file,
    validate_case,
)
from datamodules.preprocess import dumps, loads
from datamodules.store import CaseStore
from trainer.errors import UserError
from trainer.inputs import file_problem

_EXTENSIONS = (".tfrecord", ".tfrecords", ".tfrec", ".tfrecord.gz", ".tfrecords.gz", ".tfrec.gz")
_FEATURES = ("format", "version", "case_id", "image", "image_shape", "label", "label_shape", "spacing",
             "num_classes", "class_names")


# -- framing -------------------------------------------------------------------------------
def masked_crc(data) -> int:
    """TFRecord's masked CRC32C."""
    crc = crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _read_exact(f, n: int, path: str, number: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise UserError(f"{path}: record {number} is truncated ({what}: got {len(data)} of {n} bytes); the file is incomplete, rewrite it")
    return data


_CHUNK = 64 * 2**20


def _read_payload(f, length: int, path: str, number: int) -> bytes:
    """``length`` bytes, never allocated ahead of the data: a length field of 2**40 with a
    valid CRC must end as "truncated", not as an attempt to allocate 1 TiB. A plain file's
    remaining size bounds it at once; a gzip stream is read in chunks until it ends."""
    remaining = _remaining_bytes(f)
    if remaining is not None and length > remaining:
        raise UserError(f"{path}: record {number} is truncated (its length field says {length} bytes of payload, "
                        f"{remaining} remain in the file); the file is incomplete or damaged, rewrite it")
    if length <= _CHUNK:
        return _read_exact(f, length, path, number, "payload")
    parts, got = [], 0
    while got < length:
        part = f.read(min(_CHUNK, length - got))
        if not part:
            raise UserError(f"{path}: record {number} is truncated (payload: got {got} of {length} bytes); "
                            "the file is incomplete, rewrite it")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _remaining_bytes(f) -> int | None:
    """Bytes left after the current position of a plain file; None for a (gzip) stream."""
    if isinstance(f, gzip.GzipFile):
        return None
    try:
        return os.fstat(f.fileno()).st_size - f.tell()
    except (OSError, AttributeError, ValueError):
        return None


def _read_framed(f, path: str, number: int) -> bytes:
    """Read one record at the current position, verifying both CRCs."""
    head = _read_exact(f, 12, path, number, "header")
    (length,) = struct.unpack("<Q", head[:8])
    if struct.unpack("<I", head[8:])[0] != masked_crc(head[:8]):
        raise UserError(f"{path}: record {number} has a corrupted length field (CRC mismatch); the file is damaged, rewrite it")
    payload = _read_payload(f, length, path, number)
    (stored,) = struct.unpack("<I", _read_exact(f, 4, path, number, "payload CRC"))
    if stored != masked_crc(payload):
        raise UserError(f"{path}: record {number} failed its CRC32C check (payload corrupted); the file is damaged, rewrite it")
    return payload


def _open_stream(path: str):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def iter_records(path: str) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(record number, offset, payload)`` sequentially (plain or gzip), CRCs verified."""
    number = 0
    try:
        with _open_stream(path) as f:
            while f.peek(1):  # peek, not read+seek: seeking back in gzip rewinds the stream
                offset = f.tell()
                yield number, offset, _read_framed(f, path, number)
                number += 1
    except (EOFError, OSError) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: record {number}: the gzip stream is damaged or truncated ({e}); rewrite the file") from None


# -- index -----------------------------------------------------------------------------------
def index_path_for(path: str) -> str:
    """``data.tfrecord`` -> ``data.tfindex``, ``data.tfrecord.gz`` -> ``data.tfrecord.tfindex``."""
    return os.path.splitext(path)[0] + ".tfindex"


def load_index(index_path: str, path: str) -> np.ndarray:
    try:
        with open(index_path) as f:
            rows = [line.split() for line in f if line.strip()]
        index = np.array(rows, dtype=np.int64).reshape(-1, 2)
    except (ValueError, OSError) as e:
        raise UserError(f"{index_path}: not a valid index for {path} ({e}); delete it, it is rebuilt automatically") from None
    return index


def _index_mismatch(index_path: str, path: str, why: str) -> UserError:
    return UserError(f"index {index_path} does not match {path}: {why}; delete the index, it is rebuilt automatically")


def check_index(index: np.ndarray, index_path: str, path: str) -> None:
    """The index must tile the (decompressed) stream record by record from offset 0; for a
    plain file each record's length header must agree and the end must be the file's end."""
    if len(index) == 0:
        raise _index_mismatch(index_path, path, "the index is empty")
    offsets, lengths = index[:, 0], index[:, 1]
    if offsets[0] != 0 or np.any(lengths < 16) or np.any(offsets[1:] != offsets[:-1] + lengths[:-1]):
        raise _index_mismatch(index_path, path, "offsets are not contiguous records")
    if is_gzip(path):
        return  # checked record by record while decoding (positions in the decompressed stream)
    size = os.path.getsize(path)
    end = int(offsets[-1] + lengths[-1])
    with open(path, "rb") as f:
        for number, (offset, length) in enumerate(index.tolist()):
            f.seek(offset)
            head = f.read(8)
            declared = struct.unpack("<Q", head)[0] + 16 if len(head) == 8 else None
            if declared is None or offset + declared > size:
                raise UserError(f"{path}: record {number} is truncated (it needs bytes up to "
                                f"{offset + (declared or 8)}, the file has {size}); the file is incomplete, rewrite it")
            if declared != length:
                raise _index_mismatch(index_path, path, f"record {number} length differs")
    if end != size:
        raise _index_mismatch(index_path, path, f"the index covers {end} bytes, the file has {size}")


def _write_index(path: str, index_path: str) -> None:
    with atomic_path(index_path) as tmp:
        if is_gzip(path):  # tfrecord's create_index reads gzip as plain bytes: index it decompressed
            with open(tmp, "w") as out:
                for _, offset, payload in iter_records(path):
                    out.write(f"{offset} {len(payload) + 16}\n")
        else:
            create_index(path, tmp)


def ensure_index(path: str) -> np.ndarray:
    """Load ``path``'s index, creating it first if missing; check it against the file."""
    index_path = index_path_for(path)
    if not os.path.exists(index_path):
        _write_index(path, index_path)
    index = load_index(index_path, path)
    check_index(index, index_path, path)
    return index


# -- examples ----------------------------------------------------------------------------------
def encode_case(case_id: str, image: np.ndarray, label: np.ndarray, spacing, num_classes: int,
                class_names: list[str], labelled: bool = True, preprocessing: dict | None = None,
                case_preprocessing: dict | None = None) -> dict:
    """Feature dict for ``TFRecordWriter.write`` (an unlabelled case also gets ``labelled=0``;
    records without that feature are labelled; the preprocessing records are optional)."""
    extra = {} if labelled else {"labelled": (0, "int")}
    if preprocessing is not None:
        extra["preprocessing"] = (dumps(preprocessing).encode(), "byte")
    if case_preprocessing is not None:
        extra["case_preprocessing"] = (dumps(case_preprocessing).encode(), "byte")
    return {
        **extra,
        "format": (TFRECORD_FORMAT.encode(), "byte"),
        "version": (VERSION, "int"),
        "case_id": (case_id.encode(), "byte"),
        "image": (np.ascontiguousarray(image, IMAGE_DTYPE).tobytes(), "byte"),
        "image_shape": (list(image.shape), "int"),
        "label": (np.ascontiguousarray(label, LABEL_DTYPE).tobytes(), "byte"),
        "label_shape": (list(label.shape), "int"),
        "spacing": (np.asarray(spacing, "<f8").tobytes(), "byte"),
        "num_classes": (int(num_classes), "int"),
        "class_names": (json.dumps(list(class_names)).encode(), "byte"),
    }


def decode_case(payload: bytes, path: str, number: int, arrays: bool = True) -> dict:
    """Parse and check one record; returns case_id, image, label, spacing, num_classes,
    class_names (``image``/``label`` omitted when ``arrays=False``)."""
    where = f"{path}: record {number}"
    try:
        feats = example_pb2.Example.FromString(bytes(payload)).features.feature
    except DecodeError as e:
        raise UserError(f"{where} is not a tf.train.Example ({e}); the file was not written by compressseg") from None
    missing = [k for k in _FEATURES if k not in feats]
    if missing:
        raise UserError(f"{where} lacks features {missing}; rewrite it with `launch.py data convert`")

    def one(key, kind):
        values = getattr(feats[key], kind).value
        return values[0] if len(values) == 1 else list(values)

    fmt = one("format", "bytes_list")
    if fmt != TFRECORD_FORMAT.encode():
        raise UserError(f"{where}: format is {fmt!r}, expected {TFRECORD_FORMAT!r}")
    num_classes, class_names = check_class_metadata(one("num_classes", "int64_list"), one("class_names", "bytes_list"), where)
    image_shape = tuple(int(v) for v in feats["image_shape"].int64_list.value)
    label_shape = tuple(int(v) for v in feats["label_shape"].int64_list.value)
    check_case_shapes(image_shape, IMAGE_DTYPE, label_shape, LABEL_DTYPE, where)
    case_id = one("case_id", "bytes_list").decode()
    spacing_bytes = one("spacing", "bytes_list")
    if len(spacing_bytes) != 24:
        raise UserError(f"{where}: spacing must be 3 float64 (24 bytes), got {len(spacing_bytes)} bytes")
    labelled = one("labelled", "int64_list") if "labelled" in feats else 1
    if labelled not in (0, 1):
        raise UserError(f"{where}: feature 'labelled' is {labelled!r}, expected 0 or 1")
    out = {"case_id": case_id, "image_shape": image_shape, "num_classes": num_classes, "class_names": class_names,
           "spacing": check_spacing(np.frombuffer(spacing_bytes, "<f8"), where), "labelled": bool(labelled),
           "preprocessing": one("preprocessing", "bytes_list") if "preprocessing" in feats else None}
    for key, shape, dtype in (("image", image_shape, IMAGE_DTYPE), ("label", label_shape, LABEL_DTYPE)):
        raw = one(key, "bytes_list")
        need = math.prod(shape) * dtype.itemsize  # Python ints: a hostile shape cannot overflow
        if not isinstance(raw, bytes) or len(raw) != need:
            got = len(raw) if isinstance(raw, bytes) else "no"
            raise UserError(f"{where}: {key} has {got} bytes but shape {list(shape)} needs {need}")
        if arrays:
            out[key] = np.frombuffer(raw, dtype).reshape(shape).copy()
    return out


class _GzipTFRecordWriter(TFRecordWriter):
    """``TFRecordWriter`` framing into a gzip stream (the package writes plain files only)."""

    def __init__(self, data_path: str) -> None:
        self.file = gzip.open(data_path, "wb", compresslevel=6)


def write_tfrecord(path: str, cases: Iterable[tuple[str, np.ndarray, np.ndarray, tuple]], *, num_classes: int,
                   class_names: list[str], compression: Literal["gzip"] | None = None,
                   preprocessing: dict | None = None) -> int:
    """Write ``(case_id, image, label, spacing[, case record])`` cases atomically (validated),
    then the index; returns the case count. ``preprocessing`` (the dataset's record) goes on
    every record."""
    num_classes, class_names = check_class_metadata(num_classes, class_names, path)
    if compression not in (None, "gzip"):
        raise UserError(f"{path}: TFRecord compression={compression!r} must be None or 'gzip'")
    count, in_channels, seen = 0, None, set()
    with atomic_path(path) as tmp:
        writer = _GzipTFRecordWriter(tmp) if compression == "gzip" else TFRecordWriter(tmp)
        try:
            for case_id, image, label, spacing, *extra in cases:
                where = f"{path} case {case_id!r}"
                if case_id in seen:
                    raise UserError(f"{where}: duplicate case id")
                labelled = label is not None
                label = validate_case(image, label, num_classes, where)
                if in_channels is None:
                    in_channels = image.shape[0]
                elif image.shape[0] != in_channels:
                    raise UserError(f"{where}: image has {image.shape[0]} channels, earlier cases have {in_channels}")
                writer.write(encode_case(case_id, image, label, check_spacing(spacing, where), num_classes, class_names,
                                         labelled, preprocessing, extra[0] if extra else None))
                seen.add(case_id)
                count += 1
        finally:
            writer.close()
        if count == 0:
            raise UserError(f"{path}: no cases to write (empty dataset)")
    index_path = index_path_for(path)
    if os.path.exists(index_path):
        os.remove(index_path)
    ensure_index(path)
    from datamodules.filecheck import mark_checked

    mark_checked(path)  # every case was validated above
    return count


# -- reading ---------------------------------------------------------------------------------
def list_tfrecord_files(path: str) -> list[str]:
    """A file, a directory (its TFRecord files) or a glob pattern, sorted; [] if none."""
    if os.path.isdir(path):
        return sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(_EXTENSIONS))
    if any(ch in path for ch in "*?["):
        return sorted(p for p in glob.glob(path) if not p.endswith(".tfindex"))
    return [path] if os.path.isfile(path) else []


def iter_tfrecord_cases(files: list[str], indexes: list[np.ndarray] | None = None):
    """Yield ``(case_id, image, label, spacing)`` of every record (``label`` None for an
    unlabelled case), checking CRCs, schema,
    dataset-level consistency and (if given) that each record sits where its index says."""
    first = None
    for k, path in enumerate(files):
        count = 0
        for number, offset, payload in iter_records(path):
            if indexes is not None:
                index = indexes[k]
                if number >= len(index):
                    raise _index_mismatch(index_path_for(path), path, f"the file has more records than the {len(index)} the index lists")
                if index[number, 0] != offset or index[number, 1] != len(payload) + 16:
                    raise _index_mismatch(index_path_for(path), path, f"record {number} is not where the index says")
            case = decode_case(payload, path, number)
            meta = (case["num_classes"], case["class_names"], case["image_shape"][0], case["preprocessing"])
            if first is None:
                first = meta
            elif meta[:3] != first[:3]:
                raise UserError(f"{path}: record {number} has num_classes/class_names/channels {meta[:3]}, earlier records {first[:3]}")
            elif meta[3] != first[3]:
                raise UserError(f"{path}: record {number} has another preprocessing record than earlier records "
                                f"({'none' if meta[3] is None else 'a different one'}); files made with different "
                                "preprocessing cannot be read as one dataset")
            count += 1
            yield case["case_id"], case["image"], case["label"] if case["labelled"] else None, case["spacing"]
        if indexes is not None and count != len(indexes[k]):
            raise _index_mismatch(index_path_for(path), path, f"the index lists {len(indexes[k])} records, the file has {count}")


def check_tfrecord_content(path: str, index: np.ndarray | None = None) -> None:
    """Finite images and in-range labels in every record of ``path``, once per file version
    (see :mod:`datamodules.filecheck`); CRCs and the schema are checked while decoding."""
    from datamodules.filecheck import check_finite, is_checked, mark_checked
    from datamodules.schema import check_label_range

    if is_checked(path):
        return
    num_classes = read_tfrecord_description([path])["num_classes"]
    for case_id, image, label, _ in iter_tfrecord_cases([path], None if index is None else [index]):
        where = f"{path} case {case_id!r}"
        check_finite(image, where)
        if label is not None:
            check_label_range(label, num_classes, where)
    mark_checked(path)


def read_tfrecord_description(files: list[str]) -> dict:
    """Dataset metadata from the first record only."""
    for _, _, payload in iter_records(files[0]):
        case = decode_case(payload, files[0], 0, arrays=False)
        return {"num_classes": case["num_classes"], "class_names": case["class_names"],
                "in_channels": case["image_shape"][0],
                "preprocessing": loads(case["preprocessing"], f"{files[0]}: record 0")}
    raise UserError(f"{files[0]}: contains no records (empty dataset)")


class TFRecordStore(CaseStore):
    """Random access to plain TFRecord files through their index (``cache="never"``)."""

    def __init__(self, files: list[str], indexes: list[np.ndarray], lru_cases: int = 8):
        self.files, self.lru_cases = files, lru_cases
        self.locations = [(k, n, int(off), int(length)) for k, index in enumerate(indexes)
                          for n, (off, length) in enumerate(index.tolist())]
        cases, first = [], None
        handles = [open(p, "rb") for p in files]
        try:  # one pass over all records: case ids and shapes, every CRC checked
            for k, n, off, _ in self.locations:
                case = decode_case(self._read(handles, k, n, off), files[k], n, arrays=False)
                meta = (case["num_classes"], case["class_names"], case["image_shape"][0])
                first = first or meta
                if meta != first:
                    raise UserError(f"{files[k]}: record {n} has num_classes/class_names/channels {meta}, earlier records {first}")
                cases.append(CaseInfo(case["case_id"], case["image_shape"], case["spacing"], case["labelled"]))
        finally:
            for f in handles:
                f.close()
        if not cases:
            raise UserError(f"{files[0]}: contains no records (empty dataset)")
        super().__init__(DatasetHeader(first[0], first[1], first[2], cases, source=",".join(files)))

    def _read(self, handles, k: int, number: int, offset: int) -> bytes:
        f = handles[k]
        f.seek(offset)
        return _read_framed(f, self.files[k], number)

    def _open(self):
        return {"files": [open(p, "rb") for p in self.files], "lru": OrderedDict()}

    def _close(self, handles) -> None:
        for f in handles["files"]:
            f.close()

    def _case(self, i: int) -> dict:
        handles = self.handles()
        lru = handles["lru"]
        if i in lru:
            lru.move_to_end(i)
            return lru[i]
        k, n, off, _ = self.locations[i]
        case = decode_case(self._read(handles["files"], k, n, off), self.files[k], n)
        lru[i] = case
        if len(lru) > self.lru_cases:
            lru.popitem(last=False)
        return case

    def image(self, i: int) -> np.ndarray:
        return self._case(i)["image"]

    def label(self, i: int) -> np.ndarray:
        return self._case(i)["label"]


class TFRecordSegDataModule(SegDataModule):
    """Segmentation data from ``compressseg-tfrecord`` files (plain or gzip).

    Args:
        path: a ``.tfrecord`` / ``.tfrecord.gz`` file, a directory of them, or a glob
            pattern; the files' records are the cases, in sorted file order.
        spatial_dims: 2 or 3 (see :class:`~datamodules.base.SegDataModule`).
        patch_size: training crop, ``[H, W]`` or ``[D, H, W]``.
        lru_cases: decoded cases kept per process with ``cache="never"``. Default 8.
        **kwargs: every other argument of :class:`~datamodules.base.SegDataModule`.
            ``generate`` writes the phantom as TFRecord (gzip if ``path`` ends in ``.gz``).
    """

    def __init__(self, path: str, spatial_dims: Literal[2, 3], patch_size: list[int], lru_cases: int = 8, **kwargs):
        self.lru_cases = int(lru_cases)
        self._indexes: list[np.ndarray] | None = None
        super().__init__(path, spatial_dims, patch_size, **kwargs)

    @property
    def files(self) -> list[str]:
        files = list_tfrecord_files(self.path)
        if not files and os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"data file {self.path} {file_problem(self.path)}")
        for f in files[:1] if os.path.isfile(self.path) else []:
            kind, what = sniff_data_file(f)
            if kind == "h5":
                raise UserError(f"{f} is an HDF5 file, not TFRecord; read it with datamodules.hdf5.HDF5SegDataModule")
            if kind is None and os.path.getsize(f) > 0:  # an empty file: "contains no records" below
                raise UserError(f"{f} is not a TFRecord file (it looks like {what})")
        return files

    def _source_exists(self) -> bool:
        return bool(self.files)

    def _read_description(self) -> dict:
        return read_tfrecord_description(self.files)

    def _write_cases(self, cases, num_classes, class_names, compression, preprocessing=None) -> None:
        if any(ch in self.path for ch in "*?[") or os.path.isdir(self.path):
            raise UserError(f"generate needs a single output file, {self.path} is a directory or pattern")
        write_tfrecord(self.path, cases, num_classes=num_classes, class_names=class_names,
                       compression="gzip" if self.path.endswith(".gz") else None, preprocessing=preprocessing)

    def _location(self) -> str | None:
        return None if self.cache == "never" else cache_location(self.cache_dir, self.files)

    def _prepare_source(self) -> None:
        files = self.files
        self._indexes = [ensure_index(f) for f in files]
        location = self._location()
        if location is None:  # read in place: content-check each file version once (the cache build validates)
            for f, index in zip(files, self._indexes):
                check_tfrecord_content(f, index)
        if location is not None and not cache_ready(location):
            first = read_tfrecord_description(files)
            build_cache(location, iter_tfrecord_cases(files, self._indexes), num_classes=first["num_classes"],
                        class_names=first["class_names"], source=self.path)

    def _open_store(self) -> CaseStore:
        location = self._location()
        if location is not None:
            return CacheStore(location)
        gz = [f for f in self.files if is_gzip(f)]
        if gz:
            raise UserError(f"{gz[0]} is gzip-compressed and cannot be read at random; use cache='auto' for gzip TFRecords")
        return TFRecordStore(self.files, self._indexes or [ensure_index(f) for f in self.files], self.lru_cases)
