"""HDF5 reading and writing for the ``compressseg-h5`` layout (see :mod:`datamodules.schema`).

Reads open the file with ``swmr=True`` while a SWMR writer keeps it open (so it can be read
safely), and without SWMR otherwise (corrupt metadata is then reported at once instead of
being retried for minutes); writes use ``libver="latest"`` (needed for SWMR) and go to a temporary name that
is renamed into place only when complete, so a crash never leaves a half-written file under
the real name.

Two ways to read arrays, chosen by :class:`H5Store`'s ``mode``:

* ``"memmap"``: a contiguous, uncompressed dataset is a plain byte range of the file; it is
  mapped with ``numpy.memmap`` at ``Dataset.id.get_offset()``. Pages live in the OS page
  cache, shared by every rank and worker on a node, and a patch read is a memory copy. This
  is the layout ``generate`` writes by default, and the fast path of the benchmark.
* ``"h5py"``: hyperslab reads through h5py (any layout, any filter), with a chunk cache large
  enough that neighbouring patches of one chunk do not decompress it twice.
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import h5py
import numpy as np

from datamodules.schema import (
    H5_FORMAT,
    IMAGE_DTYPE,
    LABEL_DTYPE,
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
from trainer.inputs import file_problem, make_dirs, remove_dirs

COMPRESSIONS = (None, "lzf", "gzip")
CHUNK_CACHE_BYTES = 64 * 2**20


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    On failure nothing is left: not the temporary file, not the folders made for ``path``.
    An output that is an existing directory, or a folder that cannot be written (read-only,
    full, not a folder), is a one-line ``UserError`` naming it."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise UserError(f"output {path} is a directory; give a file name (e.g. {os.path.join(path, 'data.h5')})")
    directory = os.path.dirname(target)
    created = make_dirs(directory, f"output {path}")
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    done = False
    try:
        try:
            yield tmp
            os.replace(tmp, path)
            done = True
        except OSError as e:
            raise UserError(f"cannot write output {path}: {e.strerror or e}") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
        if not done:
            remove_dirs(created)


def write_h5(
    path: str,
    cases: Iterable[tuple[str, np.ndarray, np.ndarray, tuple[float, float, float]]],
    *,
    num_classes: int,
    class_names: list[str],
    compression: str | None = None,
    preprocessing: dict | None = None,
) -> int:
    """Write ``(case_id, image, label, spacing[, case record])`` tuples atomically; returns the case count.

    Args:
        path: destination ``.h5`` file (replaced atomically when complete).
        cases: iterable of cases; each is validated (dtype, shapes, label range, finite).
            ``label=None`` writes an unlabelled case (zeros placeholder, ``labelled=False``).
        num_classes: classes including background.
        class_names: one name per class.
        compression: ``None`` (contiguous, memory-mappable: the fast read path), ``"lzf"`` or
            ``"gzip"`` (chunked one slice per chunk).
        preprocessing: the dataset's preprocessing record (:mod:`datamodules.preprocess`),
            stored as the root attribute ``preprocessing`` (JSON); a case's own record (the
            optional fifth tuple element) as the case attribute ``preprocessing``.
    """
    num_classes, class_names = check_class_metadata(num_classes, class_names, path)
    if compression not in COMPRESSIONS:
        raise UserError(f"{path}: compression={compression!r} must be one of {list(COMPRESSIONS)}")
    count, in_channels = 0, None
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", libver="latest") as f:
            f.attrs["format"] = H5_FORMAT
            f.attrs["version"] = VERSION
            f.attrs["num_classes"] = num_classes
            f.attrs["class_names"] = json.dumps(class_names)
            if preprocessing is not None:
                f.attrs["preprocessing"] = dumps(preprocessing)
            group = f.create_group("cases")
            for case_id, image, label, spacing, *extra in cases:
                where = f"{path} case {case_id!r}"
                if case_id in group:
                    raise UserError(f"{where}: duplicate case id")
                labelled = label is not None
                label = validate_case(image, label, num_classes, where)
                spacing = check_spacing(spacing, where)
                if in_channels is None:
                    in_channels = image.shape[0]
                elif image.shape[0] != in_channels:
                    raise UserError(f"{where}: image has {image.shape[0]} channels, earlier cases have {in_channels}")
                g = group.create_group(case_id)
                g.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)
                if not labelled:
                    g.attrs["labelled"] = False
                if extra and extra[0] is not None:
                    g.attrs["preprocessing"] = dumps(extra[0])
                opts = {}
                if compression is not None:
                    opts = {"compression": compression, "shuffle": True}
                    if compression == "gzip":
                        opts["compression_opts"] = 4
                    g.create_dataset("image", data=image, chunks=(image.shape[0], 1, *image.shape[2:]), **opts)
                    g.create_dataset("label", data=label, chunks=(1, *label.shape[1:]), **opts)
                else:
                    g.create_dataset("image", data=image)
                    g.create_dataset("label", data=label)
                count += 1
            if count == 0:
                raise UserError(f"{path}: no cases to write (empty dataset)")
            f.attrs["in_channels"] = int(in_channels)
    from datamodules.filecheck import mark_checked

    mark_checked(path)  # every case was validated above: no content check needed on first read
    return count


_MAGIC = b"\x89HDF\r\n\x1a\n"
_SWMR_WRITE_FLAG = 0x04  # superblock v3 consistency flag: a SWMR writer has the file open


def _superblock(path: str) -> tuple[int | None, bool]:
    """``(end, swmr_writer)``: the end-of-file address the superblock records (absolute; None
    if not understood or a SWMR writer is active) and whether a SWMR writer has the file open.
    Parsed by hand because a SWMR reader skips HDF5's own truncation check and retries
    unreadable or corrupt metadata for minutes (100 attempts with back-off)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        base = 0
        while base < size:
            f.seek(base)
            block = f.read(64)
            if block[:8] == _MAGIC:
                break
            base = 512 if base == 0 else base * 2
        else:
            return None, False
    version = block[8]
    if version in (0, 1):
        so, flags = block[13], int.from_bytes(block[20:24], "little")
        start = 24 if version == 0 else 28
    elif version in (2, 3):
        so, flags, start = block[9], block[11], 12
    else:
        return None, False
    if version == 3 and flags & _SWMR_WRITE_FLAG:
        return None, True
    if so not in (2, 4, 8):
        return None, False
    base_addr = int.from_bytes(block[start : start + so], "little")
    eof = int.from_bytes(block[start + 2 * so : start + 3 * so], "little")
    if eof == (1 << (8 * so)) - 1:  # undefined address
        return None, False
    return base_addr + eof, False


def open_h5(path: str, checked: bool = False, **kwargs) -> h5py.File:
    """Open read-only; a missing, truncated, corrupt or non-HDF5 file is a ``UserError``.

    The first open of each file version runs the one-time content check of
    :mod:`datamodules.filecheck` (metadata, finite images, label range) unless ``checked``.
    SWMR mode only while a SWMR writer has the file open: it is needed then, and otherwise
    HDF5 reports corrupt metadata at once instead of retrying it for minutes."""
    problem = file_problem(path)
    if problem:
        hint = "; create it with `launch.py data generate` or `data convert`" if problem == "does not exist" else ""
        raise UserError(f"data file {path} {problem}{hint}")
    kind, what = sniff_data_file(path)
    if kind == "tfrecord":
        raise UserError(f"{path} is a TFRecord file, not HDF5; read it with datamodules.tfrecord.TFRecordSegDataModule")
    if kind != "h5":
        raise UserError(f"{path}: cannot be read as HDF5, it is not an HDF5 file or is truncated (it looks like {what}); "
                        "regenerate or reconvert it")
    (end, swmr), size = _superblock(path), os.path.getsize(path)
    if end is not None and end > size:
        raise UserError(f"{path}: the file is truncated ({size} bytes, its header says {end}); regenerate or reconvert it")
    if not checked:
        from datamodules.filecheck import ensure_h5_checked

        ensure_h5_checked(path)
    try:
        return h5py.File(path, "r", swmr=swmr, **kwargs)
    except OSError as e:
        raise UserError(f"{path}: cannot be read as HDF5, the file is truncated, corrupt or not HDF5 "
                        f"({' '.join(str(e).split())[:200]}); regenerate or reconvert it") from None


@contextmanager
def _damaged(path: str) -> Iterator[None]:
    """h5py's errors on damaged metadata (OSError, KeyError, RuntimeError...) as one line."""
    try:
        yield
    except UserError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise UserError(f"{path}: the file's metadata is damaged ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}); regenerate or reconvert it") from None


def _attr(f: h5py.File, key: str, path: str):
    if key not in f.attrs:
        raise UserError(f"{path}: root attribute {key!r} is missing; this is not a {H5_FORMAT} file, convert it with `launch.py data convert`")
    value = f.attrs[key]
    return value.decode() if isinstance(value, bytes) else value


def _read_root(f: h5py.File, path: str) -> tuple[int, list[str], int]:
    fmt = _attr(f, "format", path)
    if fmt != H5_FORMAT:
        raise UserError(f"{path}: format attribute is {fmt!r}, expected {H5_FORMAT!r}")
    version = int(_attr(f, "version", path))
    if version > VERSION:
        raise UserError(f"{path}: layout version {version} is newer than this reader ({VERSION}); upgrade compressseg")
    num_classes, class_names = check_class_metadata(_attr(f, "num_classes", path), _attr(f, "class_names", path), path)
    return num_classes, class_names, int(_attr(f, "in_channels", path))


def read_h5_description(path: str) -> dict:
    """``num_classes``, ``class_names``, ``in_channels`` and ``preprocessing`` (the record, or
    None) from the root attributes only."""
    with open_h5(path) as f, _damaged(path):
        num_classes, class_names, in_channels = _read_root(f, path)
        text = f.attrs.get("preprocessing")
    return {"num_classes": num_classes, "class_names": class_names, "in_channels": in_channels,
            "preprocessing": loads(text, path)}


def read_h5_case_records(path: str) -> dict[str, dict | None]:
    """Each case's own preprocessing record (where it came from, per-case values), by case id."""
    with open_h5(path) as f, _damaged(path):
        return {cid: loads(g.attrs.get("preprocessing"), f"{path} /cases/{cid}", dataset=False) if "preprocessing" in g.attrs else None
                for cid, g in f["cases"].items()}


def read_h5_header(path: str, checked: bool = False) -> tuple[DatasetHeader, list[tuple[int | None, int | None]]]:
    """Read metadata only. Returns the header and, per case, the byte offsets of the image and
    label datasets (``None`` where a dataset is chunked or filtered, so it cannot be mapped)."""
    with open_h5(path, checked) as f, _damaged(path):
        num_classes, class_names, in_channels = _read_root(f, path)
        if "cases" not in f or not isinstance(f["cases"], h5py.Group):
            raise UserError(f"{path}: group '/cases' is missing; expected /cases/<case_id>/image and /label")
        cases, offsets = [], []
        for case_id, g in f["cases"].items():
            where = f"{path} /cases/{case_id}"
            for key in ("image", "label"):
                if key not in g or not isinstance(g[key], h5py.Dataset):
                    raise UserError(f"{where}: dataset {key!r} is missing; every case needs 'image' and 'label'")
            image, label = g["image"], g["label"]
            check_case_shapes(image.shape, image.dtype, label.shape, label.dtype, where)
            if image.shape[0] != in_channels:
                raise UserError(f"{where}: image has {image.shape[0]} channels but the file says in_channels={in_channels}")
            if "spacing" not in g.attrs:
                raise UserError(f"{where}: attribute 'spacing' is missing (3 floats, z y x, mm)")
            spacing = check_spacing(g.attrs["spacing"], where)
            cases.append(CaseInfo(case_id, tuple(int(s) for s in image.shape), spacing, _labelled(g, where)))
            offsets.append((_mappable_offset(image), _mappable_offset(label)))
    if not cases:
        raise UserError(f"{path}: contains no cases (empty dataset)")
    size = os.path.getsize(path)
    for info, (io, lo) in zip(cases, offsets):
        nbytes = int(np.prod(info.image_shape)) * IMAGE_DTYPE.itemsize
        if io is not None and io + nbytes > size or lo is not None and lo + int(np.prod(info.spatial_shape)) > size:
            raise UserError(f"{path}: case {info.case_id!r} lies beyond the end of the file (truncated file); regenerate or reconvert it")
    header = DatasetHeader(num_classes, class_names, in_channels, cases, source=path)
    return header, offsets


def _labelled(group: h5py.Group, where: str) -> bool:
    value = group.attrs.get("labelled", True)
    if not isinstance(value, (bool, np.bool_)):
        raise UserError(f"{where}: attribute 'labelled' is {value!r}, expected true or false")
    return bool(value)


def _mappable_offset(dset: h5py.Dataset) -> int | None:
    if dset.chunks is not None or dset.compression is not None or dset.external:
        return None
    if dset.dtype.byteorder == ">":
        return None
    return dset.id.get_offset()  # None when no storage is allocated


class H5Store(CaseStore):
    """Random access to the cases of one HDF5 file (see the module docstring for ``mode``)."""

    def __init__(self, path: str, header: DatasetHeader, offsets, mode: str = "memmap"):
        super().__init__(header)
        if mode == "memmap" and any(o is None for pair in offsets for o in pair):
            raise ValueError("H5Store: mode='memmap' needs contiguous uncompressed datasets")
        self.path, self.offsets, self.mode = path, offsets, mode

    def _open(self):
        if self.mode == "memmap":
            return np.memmap(self.path, dtype=np.uint8, mode="r")
        f = open_h5(self.path, rdcc_nbytes=CHUNK_CACHE_BYTES)
        group = f["cases"]
        return f, [(group[c.case_id]["image"], group[c.case_id]["label"]) for c in self.cases]

    def _close(self, handles) -> None:
        if self.mode == "h5py":
            handles[0].close()

    def image(self, i: int):
        handles = self.handles()
        if self.mode == "memmap":
            shape = self.cases[i].image_shape
            return np.ndarray(shape, dtype=IMAGE_DTYPE, buffer=handles, offset=self.offsets[i][0])
        return handles[1][i][0]

    def label(self, i: int):
        handles = self.handles()
        if self.mode == "memmap":
            shape = self.cases[i].spatial_shape
            return np.ndarray(shape, dtype=LABEL_DTYPE, buffer=handles, offset=self.offsets[i][1])
        return handles[1][i][1]


def iter_h5_cases(path: str) -> Iterator[tuple[str, np.ndarray, np.ndarray | None, tuple[float, float, float]]]:
    """Yield every case's arrays in file order (used to build caches and by ``inspect``);
    ``label`` is None for an unlabelled case."""
    with open_h5(path) as f:
        for case_id in _case_ids(f, path):
            with _damaged(f"{path} /cases/{case_id}"):
                g = f["cases"][case_id]
                image, label = g["image"][()], g["label"][()]
                where = f"{path} /cases/{case_id}"
                labelled, spacing = _labelled(g, where), check_spacing(g.attrs["spacing"], where)
            yield case_id, image, label if labelled else None, spacing


def _case_ids(f: h5py.File, path: str) -> list[str]:
    with _damaged(path):
        return list(f["cases"].keys())


def iter_case_arrays(path: str, header: DatasetHeader) -> Iterator[tuple[CaseInfo, h5py.Dataset, np.ndarray]]:
    """``(case, image dataset, label array)`` per case, for checks that read an image in blocks
    (the one-time content check; the file must already have passed it or be its subject)."""
    with open_h5(path, checked=True) as f, _damaged(path):
        for info in header.cases:
            g = f["cases"][info.case_id]
            yield info, g["image"], g["label"][()]
