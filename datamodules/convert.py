"""Find the cases of a source folder and load each one, preprocessed, for ``data convert``.

Two kinds of source folder:

* **Medical Segmentation Decathlon / nnU-Net raw** (a ``dataset.json`` next to ``imagesTr/``):
  nnU-Net v2 (``channel_names``, ``labels`` as ``{name: value}``, ``file_ending``, images
  ``imagesTr/<case>_0000<ending>``, ``_0001``... one file per channel, labels
  ``labelsTr/<case><ending>``) or MSD / nnU-Net v1 (``modality``, ``labels`` as ``{value:
  name}``, ``training: [{"image", "label"}]``, several channels as a 4D NIfTI). Channel names
  pick each channel's normalisation (CT, MRI...), label names become the class names. With
  ``--unlabelled`` the test images (``imagesTs`` / ``test``) join as unlabelled cases.
* **A folder of cases** (one case = one pair, case id = the common prefix)::

    <case>_image.<ext> + <case>_label.<ext>   ext: npy, nii, nii.gz, nrrd, nhdr, mha, mhd
    <case>_image/      (+ <case>_label.<ext>)  a DICOM series folder as the image
    <case>.npz         arrays image, label (and optional spacing)
    spacing.json       optional {"<case>": [z, y, x], ...} for NumPy cases (mm; default 1 1 1)

Volumes with geometry (NIfTI, SimpleITK formats, DICOM) are read with their affine: the label
must lie on the image's grid (the same grid stored with permuted/flipped axes is reoriented
onto it; anything else is refused), then both are turned to the canonical ``orientation``
(:mod:`datamodules.preprocess`) and stored ``[C, z, y, x]``. NumPy images are ``[D, H, W]``,
``[C, D, H, W]``, ``[H, W]`` or ``[C, H, W]`` (the label's axes decide; an unlabelled 3-axis
image is ``[D, H, W]``). Labels must be whole numbers in ``[0, num_classes)``.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datamodules import preprocess
from datamodules.readers import Volume, read_npy, read_npz, read_volume
from datamodules.schema import check_spacing
from trainer.errors import UserError
from trainer.inputs import read_text_file, require_file

_EXT = r"npy|nii|nii\.gz|nrrd|nhdr|mha|mhd"
_PAIR = re.compile(rf"^(?P<case>.+)_(?P<kind>image|label)(?:\.(?P<ext>{_EXT}))?$", re.IGNORECASE)


@dataclass
class SourceCase:
    case_id: str
    kind: str  # "npy", "npz" or "volume" (NIfTI, SimpleITK formats, DICOM series)
    images: list[str]  # one file, or one per channel (nnU-Net's _0000, _0001...)
    label: str | None = None


@dataclass
class SourceSet:
    """What a source folder holds: its cases and what its ``dataset.json`` says, if any."""

    folder: str
    cases: list[SourceCase]
    channel_names: list[str] | None = None
    class_names: list[str] | None = None
    description: dict[str, Any] = field(default_factory=dict)


# -- discovery: a folder of cases ----------------------------------------------------------------
def find_cases(folder: str, unlabelled: bool = False) -> SourceSet:
    """The source folder's cases (a ``dataset.json`` + ``imagesTr/`` folder is read as MSD /
    nnU-Net raw data); unmatched halves are errors (an image alone is an unlabelled case when
    ``unlabelled``)."""
    if not os.path.isdir(folder):
        raise UserError(f"convert: source {folder} is not a directory of cases")
    if os.path.isfile(os.path.join(folder, "dataset.json")) and os.path.isdir(os.path.join(folder, "imagesTr")):
        from datamodules.msd import read_dataset_folder

        return read_dataset_folder(folder, unlabelled)
    pairs: dict[tuple[str, str], dict[str, str]] = {}
    cases: list[SourceCase] = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".npz"):
            cases.append(SourceCase(name[: -len(".npz")], "npz", [path]))
            continue
        m = _PAIR.match(name)
        if m and (m["ext"] or os.path.isdir(path)):
            kind = "npy" if (m["ext"] or "").lower() == "npy" else "volume"
            pairs.setdefault((m["case"], kind), {})[m["kind"].lower()] = path
    for (case_id, kind), files in sorted(pairs.items()):
        if "image" not in files or "label" not in files and not unlabelled:
            have = next(iter(files.values()))
            missing = "label" if "image" in files else "image"
            hint = " (pass --unlabelled to store images without labels)" if missing == "label" else ""
            raise UserError(f"convert: {have} has no matching {case_id}_{missing} file in {folder}{hint}")
        cases.append(SourceCase(case_id, kind, [files["image"]], files.get("label")))
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UserError(f"convert: cases {dupes} exist in more than one form (npz/npy/volume) in {folder}")
    if not cases:
        raise UserError(
            f"convert: no cases in {folder}; expected <case>_image.<ext> + <case>_label.<ext> (npy, nii.gz, nrrd, mha...), "
            "<case>.npz, <case>_image/ (a DICOM series), or an MSD / nnU-Net raw folder (dataset.json + imagesTr/)"
        )
    return SourceSet(folder, sorted(cases, key=lambda c: c.case_id), description={"kind": "folder of cases"})


# -- loading one case --------------------------------------------------------------------------
@dataclass
class RawCase:
    """One case read and oriented, before resampling and normalisation."""

    case_id: str
    image: np.ndarray  # float32 [C, z, y, x]
    label: np.ndarray | None  # uint8 [z, y, x]
    spacing: tuple[float, float, float]  # z y x mm
    affine: np.ndarray | None  # (x, y, z) -> RAS mm of the stored grid
    source_orientation: str | None
    files: list[str]

    def record(self, channel_stats: list[dict], spacing_after: tuple[float, ...], shape_after) -> dict:
        affine = self.affine
        if affine is not None and tuple(shape_after) != tuple(self.image.shape[1:]):
            affine = preprocess.rescaled_affine(affine, self.image.shape[1:][::-1], tuple(shape_after)[::-1])
        return preprocess.case_record(files=self.files, source_shape=self.image.shape[1:], source_spacing=self.spacing,
                                      source_orientation=self.source_orientation, affine=affine,
                                      channel_stats=channel_stats)


def load_case(case: SourceCase, spacing_table: dict, unlabelled: bool = False, orientation: str | None = "RAS") -> RawCase:
    where = f"convert {case.images[0]}"
    for source in (*case.images, case.label):
        if source is not None and not os.path.isdir(source):
            require_file(source, "convert: source")
    if case.kind in ("npz", "npy"):
        return _load_numpy(case, spacing_table, unlabelled, where)
    return _load_volume(case, orientation, where)


def _load_numpy(case: SourceCase, spacing_table: dict, unlabelled: bool, where: str) -> RawCase:
    spacing = spacing_table.get(case.case_id, (1.0, 1.0, 1.0))
    if case.kind == "npz":
        image, label, stored_spacing = read_npz(case.images[0], unlabelled, where)
        spacing = spacing if stored_spacing is None else stored_spacing
    else:
        image = read_npy(case.images[0], where)
        label = None if case.label is None else read_npy(case.label, f"convert {case.label}")
    label = None if label is None else label_to_uint8(np.asarray(label), where)
    image, label = _to_layout(image_to_float32(image, where), label, where)
    files = [*case.images, *([case.label] if case.label else [])]
    return RawCase(case.case_id, image, None if label is None else np.ascontiguousarray(label),
                   check_spacing(spacing, where), None, None, files)


def _load_volume(case: SourceCase, orientation: str | None, where: str) -> RawCase:
    channels = [read_volume(path, "convert: image") for path in case.images]
    image, affine = _stack_channels(channels, where)
    label = None
    if case.label is not None:
        lab = read_volume(case.label, "convert: label")
        if lab.affine is None or lab.array.ndim != 3:
            raise UserError(f"convert {case.label}: the label must be one 3D volume with geometry (not NumPy, one channel)")
        label = label_on_image_grid(affine, image.shape[:3], lab.affine, np.asarray(lab.array), f"convert {case.label}")
        label = label_to_uint8(label, f"convert {case.label}")
    source_orientation = preprocess.orientation_of(affine)
    if orientation is not None and source_orientation != orientation:
        image, moved_affine = preprocess.reorient(image, affine, orientation)
        if label is not None:
            label, _ = preprocess.reorient(label, affine, orientation)
        affine = moved_affine
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    image = image_to_float32(image, where)
    stored = np.ascontiguousarray(image.transpose(2, 1, 0)[None] if image.ndim == 3 else image.transpose(3, 2, 1, 0))
    label = None if label is None else np.ascontiguousarray(label.transpose(2, 1, 0))
    files = [*case.images, *([case.label] if case.label else [])]
    return RawCase(case.case_id, stored, label, check_spacing(zooms[::-1], where), affine, source_orientation, files)


def _stack_channels(channels: list[Volume], where: str) -> tuple[np.ndarray, np.ndarray]:
    """One array (x, y, z[, c]) from one file or one file per channel (all on one grid)."""
    first = channels[0]
    if first.affine is None:
        raise UserError(f"{where}: a NumPy array cannot be mixed with volume files in one case")
    for vol in channels:
        if vol.array.ndim not in (3, 4):
            raise UserError(f"{where}: {vol.source} has shape {list(vol.array.shape)}; expected (x, y, z[, c])")
    if len(channels) == 1:
        return np.asarray(first.array), first.affine
    for vol in channels[1:]:
        if vol.array.ndim != 3 or vol.array.shape != first.array.shape[:3] or not np.allclose(
                vol.affine, first.affine, rtol=0, atol=1e-3 * float(first.zooms_xyz().min())):
            raise UserError(f"{where}: channel file {vol.source} is not on the grid of {first.source} "
                            f"(shape {list(vol.array.shape)} vs {list(first.array.shape)}); every channel must share one grid")
    return np.stack([np.asarray(v.array) for v in channels], axis=-1), first.affine


def _to_layout(image: np.ndarray, label: np.ndarray | None, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    if label is None:  # unlabelled: [H,W] -> [1,1,H,W], [D,H,W] -> [1,D,H,W]
        image = image[None, None] if image.ndim == 2 else image[None] if image.ndim == 3 else image
        if image.ndim != 4:
            raise UserError(f"{where}: image shape {list(image.shape)} does not fit [C,]D,H,W (or H,W)")
        return image, None
    if label.ndim == 2:
        label = label[None]
        if image.ndim == 2:
            image = image[None, None]
        elif image.ndim == 3:
            image = image[:, None]
    elif label.ndim == 3 and image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or label.ndim != 3:
        raise UserError(f"{where}: image shape {list(image.shape)} / label shape {list(label.shape)} do not fit "
                        "[C,]D,H,W / D,H,W (or [C,]H,W / H,W)")
    return image, label


def label_to_uint8(label: np.ndarray, where: str) -> np.ndarray:
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
            raise UserError(f"{where}: label has non-integer values; labels must be class indices")
    elif label.dtype.kind not in "biu":
        raise UserError(f"{where}: label dtype {label.dtype} is not numeric")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise UserError(f"{where}: label values span [{label.min()}, {label.max()}], outside [0, 255]")
    return label.astype(np.uint8)


def image_to_float32(image: np.ndarray, where: str) -> np.ndarray:
    if image.dtype.kind not in "biuf":
        raise UserError(f"{where}: image dtype {image.dtype} is not numeric")
    return np.ascontiguousarray(image, dtype=np.float32)


def label_on_image_grid(image_affine: np.ndarray, image_shape, label_affine: np.ndarray, label: np.ndarray,
                        where: str) -> np.ndarray:
    """The label voxel-aligned with the image, or a one-line refusal.

    Same grid (affines equal within 1/1000 of the smallest voxel): unchanged. The same grid
    stored with axes permuted or flipped (the label's affine is the image's after a pure axis
    permutation/flip, origin included): reoriented onto the image's axes, with a note. Any
    other difference (spacing, origin, rotation) would need resampling: refused, naming both
    orientations, spacings and origins."""
    from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    a, b = np.asarray(image_affine, float), np.asarray(label_affine, float)
    zooms = np.sqrt((a[:3, :3] ** 2).sum(0))
    tol = max(1e-3 * float(zooms.min()), 1e-6)
    if tuple(label.shape) == tuple(image_shape) and np.allclose(a, b, rtol=0, atol=tol):
        return label
    transform = ornt_transform(io_orientation(b), io_orientation(a))
    moved = apply_orientation(label, transform)
    moved_affine = b @ inv_ornt_aff(transform, label.shape)
    if tuple(moved.shape) == tuple(image_shape) and np.allclose(a, moved_affine, rtol=0, atol=tol):
        print(f"note: {where}: label stored as {''.join(aff2axcodes(b))}, image as {''.join(aff2axcodes(a))} on the "
              "same grid; label reoriented onto the image's axes", file=sys.stderr)
        return np.ascontiguousarray(moved)

    def grid(aff: np.ndarray, shape) -> str:
        sp = np.sqrt((aff[:3, :3] ** 2).sum(0))
        return (f"{''.join(aff2axcodes(aff))} shape {list(shape)} spacing {[round(float(v), 4) for v in sp]} "
                f"origin {[round(float(v), 3) for v in aff[:3, 3]]}")

    raise UserError(f"{where}: label and image are not on the same grid (label {grid(b, label.shape)}, image "
                    f"{grid(a, image_shape)}); resample the label onto the image first")


def read_spacing_table(folder: str, spacing_json: str | None) -> dict:
    path = spacing_json or os.path.join(folder, "spacing.json")
    if not os.path.lexists(path) and not spacing_json:
        return {}
    try:
        table = json.loads(read_text_file(path, "convert: spacing file", limit=64 * 2**20))
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"convert: {path} is not valid JSON ({' '.join(str(e).split())[:150]})") from None
    if not isinstance(table, dict):
        raise UserError(f'convert: {path} must map case ids to [z, y, x], e.g. {{"case_0": [3.0, 0.8, 0.8]}}')
    return {k: check_spacing(v, f"{path} case {k!r}") for k, v in table.items()}


def iter_raw_cases(sources: SourceSet, spacing_json: str | None = None, unlabelled: bool = False,
                   orientation: str | None = "RAS") -> Iterator[RawCase]:
    table = read_spacing_table(sources.folder, spacing_json)
    for case in sources.cases:
        yield load_case(case, table, unlabelled, orientation)



# -- the whole conversion: plan (dataset statistics), then preprocessed cases ----------------------
@dataclass
class ConvertOptions:
    """``data convert``'s choices (see ``launch.py data convert --help``)."""

    num_classes: int | None = None
    class_names: list[str] | None = None
    unlabelled: bool = False
    spacing_json: str | None = None
    orientation: str | None = "RAS"
    target_spacing: list[float] | str | None = None  # z y x mm (0 keeps an axis), "median" or None
    interpolation: str = "linear"
    normalize: str | None = "auto"
    modality: str | None = None  # comma-separated channel names when there is no dataset.json


class Conversion:
    """Plans a conversion (classes, channel normalisation, target spacing; one scan over the
    cases when dataset statistics are needed) and then yields every case preprocessed, with
    its record, for the writers."""

    def __init__(self, src: str, options: ConvertOptions):
        self.options = options
        self.sources = find_cases(src, options.unlabelled)
        self.orientation = preprocess.check_axcodes(options.orientation, "convert")
        self.target = preprocess.parse_target_spacing(options.target_spacing, "convert") \
            if isinstance(options.target_spacing, (list, tuple)) else options.target_spacing
        if options.interpolation not in preprocess.INTERPOLATION:
            raise UserError(f"convert: --interpolation {options.interpolation!r} must be one of {list(preprocess.INTERPOLATION)}")
        if options.normalize and options.normalize != "auto":  # scheme names now; the channel count at plan()
            preprocess.parse_schemes(options.normalize, ["?"] * len(options.normalize.split(",")), "convert")
        self.table = read_spacing_table(self.sources.folder, options.spacing_json)
        self.num_classes: int | None = None
        self.class_names: list[str] = []
        self.norms: list[preprocess.ChannelNorm] = []
        self.record: dict[str, Any] = {}

    def _raw(self) -> Iterator[RawCase]:
        for case in self.sources.cases:
            yield load_case(case, self.table, self.options.unlabelled, self.orientation)

    def _modalities(self, channels: int) -> list[str]:
        names = self.sources.channel_names
        if names is None and self.options.modality:
            names = [m.strip() for m in self.options.modality.split(",")]
            names = names * channels if len(names) == 1 else names
        if names is None:
            return ["unknown"] * channels
        if len(names) != channels:
            raise UserError(f"convert: {len(names)} channel names ({', '.join(names)}) but the images have {channels} channels")
        return names

    def plan(self) -> "Conversion":
        first = load_case(self.sources.cases[0], self.table, self.options.unlabelled, self.orientation)
        modalities = self._modalities(first.image.shape[0])
        schemes = preprocess.parse_schemes(self.options.normalize, modalities, "convert")
        need_scan = self._classes_unknown() or "CT" in schemes or self.target == "median"
        sampler, top, spacings = preprocess.ForegroundSampler(len(schemes)), None, []
        if need_scan:
            for raw in self._raw():
                if raw.label is not None:
                    top = max(top or 0, int(raw.label.max()) if raw.label.size else 0)
                spacings.append(raw.spacing)
                if "CT" in schemes:
                    sampler.add(raw.case_id, raw.image, raw.label)
        self._set_classes(top)
        self.norms = [sampler.ct_norm(i, m, self.sources.folder) if s == "CT" else preprocess.ChannelNorm(m, s)
                      for i, (m, s) in enumerate(zip(modalities, schemes))]
        if self.target == "median":
            self.target = [float(v) for v in np.median(np.asarray(spacings), 0)]
        source = {k: v for k, v in self.sources.description.items() if v}
        source["folder"] = os.path.abspath(self.sources.folder)
        # NumPy cases carry no geometry: an orientation is only recorded when volumes were turned to it
        volumes = any(c.kind == "volume" for c in self.sources.cases)
        self.record = preprocess.make_record(norms=self.norms, orientation=self.orientation if volumes else None,
                                             target_spacing=self.target,
                                             interpolation=self.options.interpolation, source=source)
        return self

    def _classes_unknown(self) -> bool:
        return self.options.num_classes is None and self.sources.class_names is None

    def _set_classes(self, top: int | None) -> None:
        given, names = self.options.num_classes, self.options.class_names
        from_json = self.sources.class_names
        if from_json is not None and given is not None and given != len(from_json):
            raise UserError(f"convert: --num-classes {given} but dataset.json names {len(from_json)} labels")
        if given is None and from_json is not None:
            given = len(from_json)
        if given is None:
            if top is None:
                raise UserError(f"convert: {self.sources.folder} has no labelled case to infer the classes from; pass --num-classes")
            given = max(top + 1, 2)
        self.num_classes = given
        self.class_names = names or from_json or ["background"] + [f"class_{i}" for i in range(1, given)]

    def cases(self) -> Iterator[tuple[str, np.ndarray, np.ndarray | None, tuple[float, float, float], dict]]:
        """``(case_id, image, label, spacing, case record)`` per case, preprocessed."""
        for raw in self._raw():
            image, label, spacing = raw.image, raw.label, raw.spacing
            if self.target is not None:
                image, label, spacing = preprocess.resample_case(image, label, spacing, self.target,
                                                                 self.options.interpolation)
            image, stats = preprocess.normalize_image(image, self.norms)
            yield raw.case_id, image, label, spacing, raw.record(stats, spacing, image.shape[1:])
