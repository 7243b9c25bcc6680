"""Dice and HD95 with the field's definitions: the one implementation behind validation
(``SegmentationModule``), export verification (``trainer.export.verify``) and the report.

Definitions (Metrics Reloaded, Maier-Hein et al., Nat. Methods 2024; HD95 as in MONAI's
``compute_hausdorff_distance(percentile=95)``):

- **Dice, pooled** (the headline ``val/dice``): per class ``2TP / (2TP + FP + FN)`` with the
  counts summed over every voxel of the set; the mean is over foreground classes present in
  the prediction or the label somewhere in the set. Equals MONAI's ``DiceMetric`` on the set
  concatenated into one image.
- **Dice, per case**: the same per case, then the mean over cases. A class absent from both
  the label and the prediction of a case is left out of that case (undefined); absent from
  the label but predicted (spurious) scores 0, present but not predicted (missed) scores 0.
  MONAI's ``DiceMetric`` agrees where the label has the class and, with
  ``ignore_empty=False``, on spurious classes (it scores an empty-empty pair 1, we leave it out).
- **HD95** per case and class: surfaces are the mask voxels that binary erosion (face
  connectivity, outside the volume counts as background) removes; distances are Euclidean in
  millimetres using the case's voxel spacing; HD95 is the larger of the two directed 95th
  percentiles (linear interpolation), as MONAI computes it. A whole case is one volume: 2D
  data (slices of a case) is scored on the case's stacked slices, never per slice.
  **Missed and spurious classes** (present in exactly one of label and prediction) get the
  worst possible value, the diagonal of the case's volume in mm (Metrics Reloaded's
  worst-case convention for distance metrics; BraTS uses its volume diagonal, 373.13 mm, the
  same way). MONAI returns ``inf`` for them, and an average that drops non-finite values
  silently forgives a missed organ. A class absent from both is left out (undefined). The mean
  HD95 of a class is over its scored cases; the headline is the mean over foreground classes.

Cases are assembled from batches: 3D batches hold whole volumes; 2D batches hold slices that
carry ``case``, ``slice``, ``depth`` and ``size`` (the unpadded ``[H, W]``), so padding is cut
off and a case is scored once its last slice arrived. Batches without that metadata (a
datamodule of your own) are scored one image per case, which the result says (``scope``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from torchmetrics import Metric

HD_PERCENTILE = 95.0
CONVENTION = ("Metrics Reloaded: HD95 of a class present in exactly one of label and prediction (missed or spurious) "
              "is the case's volume diagonal in mm (worst case); a class absent from both is left out")


# ------------------------------------------------------------------ one case
def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` that one binary erosion removes (outside the array is background)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _crop_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``a | b`` grown by one voxel (clipped): erosion and distances inside it
    equal those of the whole volume, at a fraction of the cost."""
    where = np.nonzero(a | b)
    return tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in where)


def directed_distances(src: np.ndarray, dst: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) from every surface voxel of ``src`` to the nearest surface voxel of ``dst``;
    both masks must be non-empty."""
    box = _crop_box(src, dst)
    src_s, dst_s = surface(src[box]), surface(dst[box])
    to_dst = ndimage.distance_transform_edt(~dst_s, sampling=list(spacing))
    return to_dst[src_s]


def hd95(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float], worst: float,
         percentile: float = HD_PERCENTILE) -> float | None:
    """HD95 of two boolean masks in mm: ``None`` if both are empty, ``worst`` if one is."""
    has_p, has_l = bool(pred.any()), bool(label.any())
    if not (has_p or has_l):
        return None
    if has_p != has_l:
        return float(worst)
    forward = np.percentile(directed_distances(pred, label, spacing), percentile)
    backward = np.percentile(directed_distances(label, pred, spacing), percentile)
    return float(max(forward, backward))


@dataclass
class CaseScore:
    """One case: confusion counts and HD95 per class (index 0 = background, not scored)."""

    case: str
    spacing: list[float]
    shape: list[int]
    tp: list[int]
    fp: list[int]
    fn: list[int]
    hd95: list[float | None]  # None: class absent from label and prediction
    partial: bool = False  # some slices never arrived (a truncated evaluation)

    def dice(self) -> list[float | None]:
        return [_dice(t, p, n) for t, p, n in zip(self.tp, self.fp, self.fn)]


def _dice(tp: float, fp: float, fn: float) -> float | None:
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else None


def score_case(case: str, pred: np.ndarray, label: np.ndarray, spacing: Sequence[float], num_classes: int,
               with_hd: bool = True, partial: bool = False) -> CaseScore:
    """Scores of one whole case: ``pred``/``label`` integer arrays ``[D, H, W]`` (or ``[H, W]``),
    ``spacing`` z y x mm (y x for 2D arrays; a ``[1, H, W]`` volume is scored as 2D)."""
    spacing = [float(s) for s in spacing][-pred.ndim:]
    if pred.ndim == 3 and pred.shape[0] == 1:  # one slice: a 2D surface, not a slab with caps
        pred, label, spacing = pred[0], label[0], spacing[1:]
    k = num_classes
    confusion = np.bincount(label.astype(np.int64).reshape(-1) * k + pred.astype(np.int64).reshape(-1),
                            minlength=k * k)[: k * k].reshape(k, k)  # [label, pred]
    tp = np.diag(confusion)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    worst = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing)))
    distances: list[float | None] = [None]
    for c in range(1, k):
        distances.append(hd95(pred == c, label == c, spacing, worst) if with_hd else None)
    return CaseScore(case, spacing, list(pred.shape), tp.tolist(), fp.tolist(), fn.tolist(), distances, partial)


# ------------------------------------------------------------------ assembling cases from batches
class _CaseBuffer:
    """Slices of one 2D case until all ``depth`` of them arrived."""

    def __init__(self, depth: int, spacing: list[float]):
        self.depth, self.spacing = depth, spacing
        self.slices: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def volume(self) -> tuple[np.ndarray, np.ndarray]:
        order = sorted(self.slices)
        h = max(self.slices[z][0].shape[0] for z in order)
        w = max(self.slices[z][0].shape[1] for z in order)
        pred = np.zeros((len(order), h, w), np.int64)
        label = np.zeros_like(pred)
        for i, z in enumerate(order):
            p, lab = self.slices[z]
            pred[i, : p.shape[0], : p.shape[1]], label[i, : p.shape[0], : p.shape[1]] = p, lab
        return pred, label


def _meta_list(batch: Mapping[str, Any], key: str, n: int) -> list | None:
    value = batch.get(key)
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    value = list(value)
    return value if len(value) == n else None


# ------------------------------------------------------------------ the metric
@dataclass
class SegmentationScores:
    """What ``SegmentationMetrics.compute()`` returns (plain numbers: JSON- and card-ready)."""

    class_names: list[str]
    dice: dict[str, float | None]  # pooled, per foreground class
    mean_dice: float | None
    case_dice: dict[str, float | None]  # mean over cases, per foreground class
    mean_case_dice: float | None
    hd95: dict[str, float | None]  # mm, mean over scored cases, per foreground class
    mean_hd95: float | None
    cases: int
    partial_cases: int
    missed: dict[str, int]  # (case, class) pairs: in the label, not predicted
    spurious: dict[str, int]  # predicted, not in the label
    scope: str  # "case volumes" or "images (no case metadata in the batches)"
    per_case: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, per_case: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not per_case:
            out.pop("per_case")
        out["definitions"] = {
            "dice": "pooled: 2TP/(2TP+FP+FN) per class over all voxels of the set; mean over foreground classes present",
            "case_dice": "per case and class, then the mean over cases; a class absent from label and prediction is left out",
            "hd95": f"mm, per case volume and class, larger directed 95th percentile of surface distances; {CONVENTION}",
        }
        return out


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


class SegmentationMetrics(Metric):
    """Pooled Dice, per-case Dice and HD95 (mm) over a whole evaluation set.

    Args:
        num_classes: classes including background (index 0, never scored).
        class_names: one per class; default ``class0..``.
        hd95: compute HD95 (surface distances per case and class); off leaves it ``None``.
        keep_cases: keep every case's scores for ``SegmentationScores.per_case`` (the report).

    ``update(pred, label, batch)`` takes class indices ``[B, *S]`` and the batch dict (its
    ``case``, ``spacing``, ``slice``, ``depth``, ``size``). The summed states synchronise
    across DDP ranks (each rank must hold whole cases: the datamodules shard evaluation by
    case). Example::

        m = SegmentationMetrics(3, ["bg", "liver", "kidney"])
        m.update(logits.argmax(1), batch["label"], batch)
        m.compute().mean_dice
    """

    full_state_update = False

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, hd95: bool = True,
                 keep_cases: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else [f"class{i}" for i in range(self.num_classes)]
        self.with_hd, self.keep_cases = bool(hd95), bool(keep_cases)
        k = self.num_classes
        for name in ("tp", "fp", "fn", "hd_count", "missed", "spurious", "case_dice_count"):
            self.add_state(name, torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("hd_sum", "case_dice_sum"):
            self.add_state(name, torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cases", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("partial", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self._buffers: dict[str, _CaseBuffer] = {}
        self._case_rows: list[CaseScore] = []
        self._scope_images = self._no_spacing = False

    # -- feeding
    def update(self, pred: torch.Tensor, label: torch.Tensor, batch: Mapping[str, Any] | None = None) -> None:
        batch = batch or {}
        pred_np = pred.detach().to("cpu", torch.int64).numpy()
        label_np = label.detach().to("cpu", torch.int64).numpy()
        n = pred_np.shape[0]
        cases = _meta_list(batch, "case", n)
        spacings = _meta_list(batch, "spacing", n)
        with_hd = self.with_hd and spacings is not None  # never distances in voxels labelled mm
        if spacings is None:
            self._no_spacing, spacings = True, [[1.0, 1.0, 1.0]] * n
        slices, depths, sizes = (_meta_list(batch, k, n) for k in ("slice", "depth", "size"))
        for i in range(n):
            p, lab = pred_np[i], label_np[i]
            if sizes is not None:  # cut the evaluation padding off
                crop = tuple(slice(0, int(s)) for s in sizes[i])
                p, lab = p[crop], lab[crop]
            if cases is None or (p.ndim == 2 and (slices is None or depths is None)):
                self._scope_images = True
                name = f"image{int(self.cases.item()) + len(self._case_rows)}"
                self._score(score_case(name, p, lab, spacings[i], self.num_classes, with_hd))
            elif p.ndim == 2:
                self._add_slice(str(cases[i]), int(slices[i]), int(depths[i]), [float(s) for s in spacings[i]], p, lab,
                                with_hd)
            else:
                self._score(score_case(str(cases[i]), p, lab, spacings[i], self.num_classes, with_hd))

    def _add_slice(self, case: str, z: int, depth: int, spacing: list[float], p: np.ndarray, lab: np.ndarray,
                   with_hd: bool) -> None:
        buf = self._buffers.setdefault(case, _CaseBuffer(depth, spacing))
        buf.slices[z] = (p.copy(), lab.copy())
        if len(buf.slices) == buf.depth:
            del self._buffers[case]
            self._score(score_case(case, *buf.volume(), buf.spacing, self.num_classes, with_hd))

    def _flush(self) -> None:
        """Score cases whose slices did not all arrive (evaluation cut short), flagged partial."""
        for case, buf in list(self._buffers.items()):
            self._score(score_case(case, *buf.volume(), buf.spacing, self.num_classes, self.with_hd, partial=True))
        self._buffers.clear()

    def _score(self, s: CaseScore) -> None:
        dev = self.tp.device
        as_t = lambda v: torch.tensor(v, dtype=torch.float64, device=dev)  # noqa: E731
        self.tp += as_t(s.tp)
        self.fp += as_t(s.fp)
        self.fn += as_t(s.fn)
        self.cases += 1
        self.partial += float(s.partial)
        for c, (d, h) in enumerate(zip(s.dice(), s.hd95)):
            if c == 0:
                continue
            if d is not None:
                self.case_dice_sum[c] += d
                self.case_dice_count[c] += 1
            if h is not None:
                self.hd_sum[c] += h
                self.hd_count[c] += 1
            present, predicted = s.tp[c] + s.fn[c] > 0, s.tp[c] + s.fp[c] > 0
            self.missed[c] += float(present and not predicted)
            self.spurious[c] += float(predicted and not present)
        if self.keep_cases:
            self._case_rows.append(s)

    # -- results
    def compute(self) -> SegmentationScores:
        names = self.class_names[1:]
        fg = range(1, self.num_classes)
        dice = [_dice(float(self.tp[c]), float(self.fp[c]), float(self.fn[c])) for c in fg]
        case_dice = [float(self.case_dice_sum[c] / self.case_dice_count[c]) if self.case_dice_count[c] else None for c in fg]
        hd = [float(self.hd_sum[c] / self.hd_count[c]) if self.hd_count[c] else None for c in fg]
        per_case = [{"case": s.case, "spacing": s.spacing, "shape": s.shape, "partial": s.partial,
                     "dice": dict(zip(names, s.dice()[1:])), "hd95": dict(zip(names, s.hd95[1:]))}
                    for s in self._case_rows]
        return SegmentationScores(
            class_names=list(self.class_names),
            dice=dict(zip(names, dice)), mean_dice=_mean(dice),
            case_dice=dict(zip(names, case_dice)), mean_case_dice=_mean(case_dice),
            hd95=dict(zip(names, hd)), mean_hd95=_mean(hd),
            cases=int(self.cases), partial_cases=int(self.partial),
            missed={n: int(self.missed[c]) for n, c in zip(names, fg)},
            spurious={n: int(self.spurious[c]) for n, c in zip(names, fg)},
            scope=self._scope(),
            per_case=per_case,
        )

    def _scope(self) -> str:
        scope = "images (no case metadata in the batches)" if self._scope_images else "case volumes"
        if self._no_spacing:
            scope += "; no voxel spacing in the batches, so no HD95"
        elif not self.with_hd:
            scope += "; HD95 not asked for"
        return scope

    def pooled_dice(self) -> list[float | None]:
        """Pooled Dice of every class, background included (the model card lists all)."""
        return [_dice(float(t), float(p), float(n)) for t, p, n in zip(self.tp, self.fp, self.fn)]

    def _wrap_compute(self, compute):
        inner = super()._wrap_compute(compute)

        def wrapped(*args, **kwargs):
            self._flush()  # before the states are synchronised
            return inner(*args, **kwargs)

        return wrapped

    def reset(self) -> None:
        super().reset()
        self._buffers.clear()
        self._case_rows = []
        self._scope_images = self._no_spacing = False
