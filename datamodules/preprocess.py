"""Preprocessing of real scans, nnU-Net's way, and the record a data file keeps of it.

Steps ``data convert`` applies to every case, in this order:

1. **Orientation**: a volume with an affine (NIfTI, NRRD, MHA, DICOM) is turned onto the
   closest canonical orientation (default RAS: axis permutations and flips only, never an
   interpolation), then stored as ``[C, z, y, x]``. NumPy cases have no affine and stay as stored.
2. **Spacing**: with a target spacing, image channels are resampled by linear or cubic
   B-spline interpolation and labels by nearest neighbour (``scipy.ndimage.zoom`` in grid mode:
   the volume's extent is kept, so the stored spacing is ``extent / new size``, within half a
   voxel of the target). ``median`` takes the median spacing of the dataset (nnU-Net's default).
3. **Intensity**, chosen per channel from its modality as nnU-Net v2 does:
   ``CT``: clip to the 0.5 and 99.5 percentiles of the foreground (label > 0) voxels of the
   whole dataset, then subtract their mean and divide by their standard deviation (dataset
   constants, recorded); ``zscore`` (MRI and anything else): per case, subtract the image's
   mean and divide by its standard deviation; ``zscore_nonzero``: the same over non-zero
   voxels, zero outside; ``noNorm``: as stored; ``rescale_to_0_1``: per case min-max;
   ``rgb_to_0_1``: divide by 255.

The **record** (a JSON dict) goes into the data file (HDF5 root attribute ``preprocessing``,
TFRecord feature ``preprocessing`` on every record); the datamodule exposes it, an exported
artifact's model card copies it, and ``launch.py verify --data`` checks a file against it
(:func:`match_record`). Each case also records where it came from (``case_record``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from trainer.errors import UserError

RECORD_VERSION = 1
SCHEMES = ("CT", "zscore", "zscore_nonzero", "noNorm", "rescale_to_0_1", "rgb_to_0_1")
INTERPOLATION = {"linear": 1, "bspline": 3}
CT_PERCENTILES = (0.5, 99.5)
FOREGROUND_SAMPLES_PER_CASE = 200_000  # voxels kept per case and channel for the CT statistics
_EPS = 1e-8


def scheme_for_modality(name: str) -> str:
    """nnU-Net v2's mapping of a channel name to its normalisation: ``CT`` (any case) is CT,
    a scheme's own name is that scheme, anything else (MRI, T1, FLAIR, ...) is ``zscore``."""
    if name.strip().upper() == "CT":
        return "CT"
    for scheme in SCHEMES:
        if name.strip().lower() == scheme.lower():
            return scheme
    return "zscore"


def parse_schemes(text: str | None, modalities: Sequence[str], where: str) -> list[str]:
    """``--normalize``: ``auto`` (or nothing) follows ``modalities``; else one scheme, or one per channel."""
    if not text or text == "auto":
        return [scheme_for_modality(m) for m in modalities]
    given = [t.strip() for t in text.split(",")]
    lookup = {s.lower(): s for s in SCHEMES}
    bad = [g for g in given if g.lower() not in lookup]
    if bad:
        raise UserError(f"{where}: --normalize {bad[0]!r} is not one of auto, {', '.join(SCHEMES)}")
    schemes = [lookup[g.lower()] for g in given]
    if len(schemes) == 1:
        return schemes * len(modalities)
    if len(schemes) != len(modalities):
        raise UserError(f"{where}: --normalize names {len(schemes)} schemes but the images have {len(modalities)} channels")
    return schemes


# -- orientation -------------------------------------------------------------------------------
def check_axcodes(code: str | None, where: str) -> str | None:
    """``RAS``, ``LPS``, ... (three letters, one of each axis) or None for ``none``."""
    if code is None or code.lower() in ("none", "keep"):
        return None
    code = code.upper()
    axis_of = {ch: i for i, pair in enumerate(("LR", "PA", "IS")) for ch in pair}
    if len(code) != 3 or sorted(axis_of.get(ch, -1) for ch in code) != [0, 1, 2]:
        raise UserError(f"{where}: --orientation {code!r} must name each axis once, e.g. RAS, LPS, LAS (or none)")
    return code


def orientation_of(affine: np.ndarray) -> str:
    from nibabel.orientations import aff2axcodes

    return "".join(aff2axcodes(affine))


def reorient(array: np.ndarray, affine: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (x, y, z[, c]) turned onto the axes ``code`` names: permutations and flips
    only, exact; the returned affine describes the same voxels."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(code)))
    moved = apply_orientation(array, transform)  # the trailing channel axis is carried along
    return np.ascontiguousarray(moved), affine @ inv_ornt_aff(transform, array.shape[:3])


# -- spacing ------------------------------------------------------------------------------------
def parse_target_spacing(values: Sequence[str] | None, where: str) -> list[float] | str | None:
    """``--target-spacing``: None, ``median``, or z y x in mm (0 keeps that axis)."""
    if not values:
        return None
    if len(values) == 1 and str(values[0]).lower() == "median":
        return "median"
    try:
        out = [float(v) for v in values]
    except ValueError:
        out = []
    if len(out) != 3 or not all(math.isfinite(v) and v >= 0 for v in out) or not any(out):
        raise UserError(f"{where}: --target-spacing {' '.join(map(str, values))} must be 'median' or three numbers z y x "
                        "in mm (>= 0; 0 keeps that axis)")
    return out


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    return tuple(n if t == 0 else max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample_case(image: np.ndarray, label: np.ndarray | None, spacing: Sequence[float], target: Sequence[float],
                  interpolation: str) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """``image [C, D, H, W]`` and ``label [D, H, W]`` resampled to ``target`` (z y x, 0 keeps an
    axis); returns them and the spacing they now have (extent / new size)."""
    from scipy import ndimage

    old = image.shape[1:]
    new = resampled_shape(old, spacing, target)
    if new == tuple(old):
        return image, label, tuple(float(s) for s in spacing)
    zoom = [n / o for n, o in zip(new, old)]
    order = INTERPOLATION[interpolation]
    channels = [ndimage.zoom(ch.astype(np.float32), zoom, order=order, mode="nearest", grid_mode=True) for ch in image]
    image = np.stack(channels).astype(np.float32)
    if label is not None:
        label = ndimage.zoom(label, zoom, order=0, mode="nearest", grid_mode=True)
    done = tuple(float(o * s / n) for o, s, n in zip(old, spacing, new))
    return image, label, done


def rescaled_affine(affine: np.ndarray, old_xyz: Sequence[int], new_xyz: Sequence[int]) -> np.ndarray:
    """The affine of a grid resampled from ``old_xyz`` to ``new_xyz`` voxels over the same extent."""
    scale = np.array([o / n for o, n in zip(old_xyz, new_xyz)])
    index = np.eye(4)
    index[:3, :3] = np.diag(scale)
    index[:3, 3] = 0.5 * scale - 0.5  # new voxel centres inside the kept extent (grid mode)
    return np.asarray(affine, float) @ index


# -- intensity ---------------------------------------------------------------------------------
@dataclass
class ChannelNorm:
    """How one channel is normalised; CT carries the dataset constants."""

    name: str
    scheme: str
    clip: list[float] | None = None
    mean: float | None = None
    std: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "scheme": self.scheme}
        if self.scheme == "CT":
            out.update(clip=self.clip, mean=self.mean, std=self.std, statistics=self.stats)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChannelNorm":
        return cls(d.get("name", ""), d["scheme"], d.get("clip"), d.get("mean"), d.get("std"), d.get("statistics", {}))


def normalize_channel(x: np.ndarray, norm: ChannelNorm, nonzero: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """One channel normalised by ``norm``; returns it (float32) and the per-case values used."""
    x = x.astype(np.float64)
    if norm.scheme == "CT":
        if norm.clip is None or norm.mean is None or norm.std is None:
            raise UserError(f"channel {norm.name!r}: CT normalisation needs the dataset's clip, mean and std")
        out = (np.clip(x, *norm.clip) - norm.mean) / max(norm.std, _EPS)
        return out.astype(np.float32), {}
    if norm.scheme == "zscore":
        mean, std = float(x.mean()), float(x.std())
        return ((x - mean) / max(std, _EPS)).astype(np.float32), {"mean": mean, "std": std}
    if norm.scheme == "zscore_nonzero":
        mask = x != 0 if nonzero is None else nonzero
        if not mask.any():
            return np.zeros_like(x, np.float32), {"mean": 0.0, "std": 0.0}
        mean, std = float(x[mask].mean()), float(x[mask].std())
        out = np.where(mask, (x - mean) / max(std, _EPS), 0.0)
        return out.astype(np.float32), {"mean": mean, "std": std}
    if norm.scheme == "rescale_to_0_1":
        lo, hi = float(x.min()), float(x.max())
        return ((x - lo) / max(hi - lo, _EPS)).astype(np.float32), {"min": lo, "max": hi}
    if norm.scheme == "rgb_to_0_1":
        if x.size and (x.min() < 0 or x.max() > 255):
            raise UserError(f"channel {norm.name!r}: rgb_to_0_1 needs values in [0, 255], got [{x.min():g}, {x.max():g}]")
        return (x / 255.0).astype(np.float32), {}
    return x.astype(np.float32), {}  # noNorm


def normalize_image(image: np.ndarray, norms: Sequence[ChannelNorm]) -> tuple[np.ndarray, list[dict]]:
    """``image [C, ...]`` normalised channel by channel (``zscore_nonzero`` uses the voxels
    non-zero in any channel, nnU-Net's non-zero mask)."""
    if len(norms) != image.shape[0]:
        raise UserError(f"the preprocessing names {len(norms)} channels but the image has {image.shape[0]}")
    nonzero = (image != 0).any(0) if any(n.scheme == "zscore_nonzero" for n in norms) else None
    outs, used = [], []
    for ch, norm in zip(image, norms):
        out, stats = normalize_channel(ch, norm, nonzero)
        outs.append(out)
        used.append(stats)
    return np.stack(outs), used


class ForegroundSampler:
    """Collects foreground intensities per channel over the dataset (CT statistics): every
    labelled case gives up to ``FOREGROUND_SAMPLES_PER_CASE`` of its label > 0 voxels, drawn
    with a seeded generator, so the statistics do not depend on the order of cases."""

    def __init__(self, channels: int):
        self.samples: list[list[np.ndarray]] = [[] for _ in range(channels)]
        self.voxels = 0
        self.cases = 0

    def add(self, case_id: str, image: np.ndarray, label: np.ndarray | None) -> None:
        if label is None:
            return
        fg = np.flatnonzero(label.reshape(-1) > 0)
        self.cases += 1
        self.voxels += fg.size
        if fg.size > FOREGROUND_SAMPLES_PER_CASE:
            seed = int.from_bytes(case_id.encode()[:8].ljust(8, b"\0"), "little")
            fg = np.sort(np.random.default_rng(seed).choice(fg, FOREGROUND_SAMPLES_PER_CASE, replace=False))
        for c, ch in enumerate(image):
            self.samples[c].append(ch.reshape(-1)[fg].astype(np.float64))

    def ct_norm(self, channel: int, name: str, where: str) -> ChannelNorm:
        values = np.concatenate(self.samples[channel]) if self.samples[channel] else np.zeros(0)
        if values.size == 0:
            raise UserError(f"{where}: CT normalisation of channel {channel} ({name}) needs foreground voxels "
                            "(label > 0) in labelled cases; none found")
        lo, hi = (float(v) for v in np.percentile(values, CT_PERCENTILES))
        stats = {"from": f"foreground (label > 0) voxels of {self.cases} labelled cases",
                 "foreground_voxels": int(self.voxels), "sampled_voxels": int(values.size),
                 "percentiles": list(CT_PERCENTILES)}
        return ChannelNorm(name, "CT", [lo, hi], float(values.mean()), float(values.std()), stats)


# -- the record -----------------------------------------------------------------------------
def make_record(*, norms: Sequence[ChannelNorm], orientation: str | None, target_spacing: Sequence[float] | None,
                interpolation: str, source: dict[str, Any]) -> dict[str, Any]:
    """The dataset-level record ``data convert`` writes (JSON-ready)."""
    return {
        "version": RECORD_VERSION,
        "layout": "image [C, z, y, x], label [z, y, x]; spacing z y x mm",
        "orientation": orientation,
        "resampling": None if target_spacing is None else {
            "target_spacing_zyx_mm": [float(t) for t in target_spacing],
            "image": f"{interpolation} ({'scipy.ndimage.zoom order ' + str(INTERPOLATION[interpolation])})",
            "label": "nearest",
        },
        "channels": [n.as_dict() for n in norms],
        "source": source,
    }


def dumps(record: dict[str, Any] | None) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=False)


def loads(text: str | bytes | None, where: str, dataset: bool = True) -> dict[str, Any] | None:
    """A stored record (None if absent); a damaged one is a one-line error. ``dataset``: the
    dataset-level record (it must list ``channels``), else a case's own."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{where}: the preprocessing record is not valid JSON ({' '.join(str(e).split())[:120]})") from None
    if record is not None and (not isinstance(record, dict) or dataset and not isinstance(record.get("channels"), list)):
        raise UserError(f"{where}: the preprocessing record is not a mapping with 'channels'; rewrite the file")
    return record


def channel_norms(record: dict[str, Any]) -> list[ChannelNorm]:
    return [ChannelNorm.from_dict(c) for c in record["channels"]]


def describe_record(record: dict[str, Any]) -> list[str]:
    """The record in words, step by step (the model card's ``preprocessing.steps``)."""
    steps = []
    if record.get("orientation"):
        steps.append(f"reorient to {record['orientation']} (closest canonical: axis permutations and flips, no "
                     "interpolation), then store as [C, z, y, x]")
    else:
        steps.append("axes as stored in the source files ([C, z, y, x])")
    res = record.get("resampling")
    if res:
        target = " x ".join("keep" if t == 0 else f"{t:g}" for t in res["target_spacing_zyx_mm"])
        steps.append(f"resample to z y x spacing {target} mm: image {res['image']}, label {res['label']}")
    else:
        steps.append("no resampling (each case keeps its own spacing)")
    for i, c in enumerate(record.get("channels", [])):
        steps.append(f"channel {i} ({c.get('name') or 'unnamed'}): {_scheme_words(c)}")
    return steps


def _scheme_words(c: dict[str, Any]) -> str:
    scheme = c.get("scheme")
    if scheme == "CT":
        lo, hi = c["clip"]
        return (f"CT: clip to [{lo:.6g}, {hi:.6g}] (dataset foreground 0.5/99.5 percentiles), subtract {c['mean']:.6g}, "
                f"divide by {c['std']:.6g} (dataset foreground mean and std)")
    return {"zscore": "z-score per case (subtract the image's mean, divide by its standard deviation)",
            "zscore_nonzero": "z-score per case over non-zero voxels, zero elsewhere",
            "noNorm": "none (intensities as stored)",
            "rescale_to_0_1": "min-max to [0, 1] per case",
            "rgb_to_0_1": "divide by 255"}.get(scheme, f"{scheme}")


def case_record(*, files: Sequence[str], source_shape: Sequence[int], source_spacing: Sequence[float],
                source_orientation: str | None, affine: np.ndarray | None, channel_stats: Sequence[dict]) -> dict:
    """Where one case came from and the per-case values its normalisation used."""
    return {
        "files": [str(f) for f in files],
        "source_shape_zyx": [int(s) for s in source_shape],
        "source_spacing_zyx_mm": [float(s) for s in source_spacing],
        "source_orientation": source_orientation,
        "affine_xyz_to_ras_mm": None if affine is None else np.round(np.asarray(affine, float), 6).tolist(),
        "channel_stats": list(channel_stats),
    }


# -- does a data file fit a model? -----------------------------------------------------------------
def _contract(record: dict[str, Any]) -> dict[str, Any]:
    """What a model's input depends on: orientation, target spacing, each channel's scheme
    and (CT) its dataset constants."""
    res = record.get("resampling") or {}
    return {"orientation": record.get("orientation"), "target_spacing": res.get("target_spacing_zyx_mm"),
            "channels": [{k: c.get(k) for k in ("scheme", "clip", "mean", "std")} for c in record.get("channels", [])]}


def match_record(expected: dict[str, Any] | None, found: dict[str, Any] | None, data: str) -> str:
    """How a data file's record relates to the record a model was trained with:
    ``"same"`` (use as is), ``"raw"`` (same geometry, intensities stored unnormalised: normalise
    them the model's way), or a one-line ``UserError`` naming the difference."""
    if expected is None:
        return "same"  # the model records nothing to check against (an older export)
    want = _contract(expected)
    if found is None:
        raise UserError(f"{data} records no preprocessing, but the model expects: {'; '.join(describe_record(expected))}. "
                        "Convert the raw scans with `launch.py data convert` (the same --orientation, --target-spacing; "
                        "--normalize noNorm is accepted and normalised the model's way)")
    have = _contract(found)
    for key, words in (("orientation", "orientation"), ("target_spacing", "target spacing (z y x mm)")):
        if have[key] != want[key]:
            raise UserError(f"{data}: {words} {have[key]} differs from the model's {want[key]}; "
                            f"reconvert it with the model's preprocessing: {'; '.join(describe_record(expected))}")
    if len(have["channels"]) != len(want["channels"]):
        raise UserError(f"{data} has {len(have['channels'])} channels, the model expects {len(want['channels'])}")
    if have["channels"] == want["channels"]:
        return "same"
    if all(c["scheme"] == "noNorm" for c in have["channels"]):
        return "raw"
    diff = next(i for i, (h, w) in enumerate(zip(have["channels"], want["channels"])) if h != w)
    raise UserError(f"{data}: channel {diff} was normalised as {_scheme_words(found['channels'][diff])}, the model "
                    f"expects {_scheme_words(expected['channels'][diff])}; reconvert it (or convert with --normalize noNorm "
                    "to have it normalised the model's way)")
