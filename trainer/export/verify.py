"""Score an artifact against PyTorch on validation data, before it is kept.

Both sides go through ``trainer.inference.predict_logits`` (divisor padding for whole images,
Gaussian sliding windows for 3D), so the comparison sees exactly what a user of the artifact
would get. Everything is accumulated batch by batch: a 3D validation set never has to fit in
memory twice.

Tolerances are expressed in a *unit* so one number means the same thing for every model:

- ``logit_scale``: ``max(1, max |PyTorch logit|)`` of the batch; for float artifacts.
- ``quant_step``: the output's quantization step (scale of the DequantizeLinear producing the
  logits) when the artifact has one, else ``(max - min) / 255`` of the batch's PyTorch logits;
  for INT8 artifacts.
- ``absolute``: plain logits.

A batch passes when at most ``max_exceed_fraction`` of its logits differ by more than
``atol`` units (0 means: the max abs diff must be within ``atol``), and the whole set passes
when, in addition, the argmax agrees on at least ``min_argmax_agreement`` of the voxels and
(if set) the mean foreground Dice drops by at most ``max_dice_drop``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import torch

from trainer.errors import UserError
from trainer.inference import predict_logits

Predictor = Callable[[torch.Tensor], torch.Tensor]
UNITS = ("logit_scale", "quant_step", "absolute")


class VerificationError(UserError):
    """The artifact does not match PyTorch within tolerance; it has been deleted."""


@dataclass(frozen=True)
class Tolerance:
    """How close an artifact must be to PyTorch.

    Args:
        atol: allowed ``|artifact - pytorch|`` per logit, in ``unit``s. Default 1e-3.
        unit: ``"logit_scale"``, ``"quant_step"`` or ``"absolute"`` (see module doc).
        max_exceed_fraction: fraction of logits allowed beyond ``atol``. Default 0 (max abs).
        min_argmax_agreement: fraction of voxels whose argmax must agree. Default 0.9999.
        max_dice_drop: allowed drop of mean foreground Dice (absolute); ``None`` = report only.
    """

    atol: float = 1e-3
    unit: Literal["logit_scale", "quant_step", "absolute"] = "logit_scale"
    max_exceed_fraction: float = 0.0
    min_argmax_agreement: float = 0.9999
    max_dice_drop: float | None = None

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise UserError(f"tolerance unit={self.unit!r} must be one of {', '.join(UNITS)}")
        if not self.atol > 0:
            raise UserError(f"tolerance atol={self.atol} must be > 0")
        for key in ("max_exceed_fraction", "min_argmax_agreement"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"tolerance {key}={getattr(self, key)} must be in [0, 1]")
        if self.max_dice_drop is not None and self.max_dice_drop < 0:
            raise UserError(f"tolerance max_dice_drop={self.max_dice_drop} must be >= 0")


@dataclass
class DiceCounts:
    """Per-class true-positive, false-positive and false-negative voxel counts."""

    num_classes: int
    tp: list[int] = field(default_factory=list)
    fp: list[int] = field(default_factory=list)
    fn: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tp = self.tp or [0] * self.num_classes
        self.fp = self.fp or [0] * self.num_classes
        self.fn = self.fn or [0] * self.num_classes

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        valid = (label >= 0) & (label < self.num_classes)  # ignore-index voxels do not count
        pred, label = pred[valid], label[valid]
        for c in range(self.num_classes):
            p, t = pred == c, label == c
            self.tp[c] += int((p & t).sum())
            self.fp[c] += int((p & ~t).sum())
            self.fn[c] += int((~p & t).sum())

    def per_class(self) -> list[float | None]:
        """Dice per class over the whole set; ``None`` where a class is absent in both."""
        out: list[float | None] = []
        for tp, fp, fn in zip(self.tp, self.fp, self.fn):
            denom = 2 * tp + fp + fn
            out.append(2 * tp / denom if denom else None)
        return out

    def mean_foreground(self) -> float | None:
        vals = [d for d in self.per_class()[1:] if d is not None]
        return sum(vals) / len(vals) if vals else None


@dataclass
class VerificationReport:
    """Outcome of ``verify_artifact``; ``to_card`` gives the model-card sections."""

    tolerance: Tolerance
    class_names: Sequence[str]
    batches: int = 0
    voxels: int = 0
    logits: int = 0
    agree: int = 0
    exceed: int = 0
    max_abs_diff: float = 0.0
    max_error_units: float = 0.0
    unit_values: list[float] = field(default_factory=list)
    worst: str = "none"
    reference_dice: DiceCounts | None = None
    artifact_dice: DiceCounts | None = None
    probe: dict[str, Any] | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def argmax_agreement(self) -> float:
        return self.agree / self.voxels if self.voxels else 1.0

    @property
    def exceed_fraction(self) -> float:
        return self.exceed / self.logits if self.logits else 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def message(self, what: str) -> str:
        dice = ""
        if self.reference_dice is not None and self.voxels:
            ref, art = self.reference_dice.mean_foreground(), self.artifact_dice.mean_foreground()
            dice = f"; mean Dice pytorch {_fmt(ref)} vs artifact {_fmt(art)}"
        return f"verification of {what} failed: {'; '.join(self.failures)}; worst mismatch: {self.worst}{dice}"

    def _dice(self, counts: DiceCounts | None) -> dict[str, Any]:
        if counts is None:
            return {}
        per = counts.per_class()
        return {
            "per_class": {name: _round(d) for name, d in zip(self.class_names, per)},
            "mean_foreground": _round(counts.mean_foreground()),
        }

    def to_card(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(metrics, verification)`` sections of the model card."""
        metrics = {
            "dice": {
                "definition": "per class 2TP/(2TP+FP+FN) over all voxels of the verification set; "
                "mean over foreground classes (index >= 1) present in prediction or label",
                "pytorch": self._dice(self.reference_dice),
                "artifact": self._dice(self.artifact_dice),
            },
            "max_abs_diff": self.max_abs_diff,
            "argmax_agreement": self.argmax_agreement,
        }
        units = self.unit_values
        verification = {
            "passed": self.passed,
            "failures": self.failures,
            "tolerance": asdict(self.tolerance),
            "batches": self.batches,
            "voxels": self.voxels,
            "logits": self.logits,
            "max_error_in_units": self.max_error_units,
            "exceed_fraction": self.exceed_fraction,
            "unit_value_range": [min(units), max(units)] if units else None,
            "worst_mismatch": self.worst,
            "shape_probe": self.probe,
        }
        return metrics, verification


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None or math.isnan(x) else round(x, digits)


def _unit_value(tol: Tolerance, ref: torch.Tensor, output_step: float | None) -> float:
    if tol.unit == "logit_scale":
        return max(1.0, float(ref.abs().max()))
    if tol.unit == "quant_step":
        if output_step:
            return float(output_step)
        return max(float(ref.max() - ref.min()) / 255.0, 1e-12)
    return 1.0


class _Comparer:
    """Accumulates the logit comparison of reference vs candidate, batch by batch."""

    def __init__(self, report: VerificationReport, output_step: float | None):
        self.report = report
        self.tol = report.tolerance
        self.output_step = output_step

    def compare(self, where: str, ref: torch.Tensor, out: torch.Tensor) -> bool:
        """Update diff statistics; False (with a failure recorded) if shapes/values are unusable."""
        rep = self.report
        if out.shape != ref.shape:
            rep.failures.append(f"{where}: artifact output shape {tuple(out.shape)} != PyTorch {tuple(ref.shape)}")
            return False
        if not torch.isfinite(out).all():
            rep.failures.append(f"{where}: artifact output has {int((~torch.isfinite(out)).sum())} non-finite values")
            return False
        unit = _unit_value(self.tol, ref, self.output_step)
        rep.unit_values.append(unit)
        diff = (out - ref).abs()
        rep.logits += diff.numel()
        rep.exceed += int((diff > self.tol.atol * unit).sum())
        flat = int(diff.argmax())
        worst = float(diff.reshape(-1)[flat])
        rep.max_abs_diff = max(rep.max_abs_diff, worst)
        if worst / unit > rep.max_error_units or rep.worst == "none":
            rep.max_error_units = worst / unit
            idx = list(torch.unravel_index(torch.tensor(flat), diff.shape))
            rep.worst = (
                f"{where} at [{', '.join(str(int(i)) for i in idx)}] (image, class, *voxel): "
                f"pytorch {float(ref.reshape(-1)[flat]):.5g} vs artifact {float(out.reshape(-1)[flat]):.5g}, "
                f"|diff| {worst:.3g} = {worst / unit:.3g} {self.tol.unit} (atol {self.tol.atol:g})"
            )
        return True


@torch.no_grad()
def verify_artifact(
    reference: Predictor | Sequence[torch.Tensor],
    candidate: Predictor,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    num_classes: int,
    class_names: Sequence[str],
    tolerance: Tolerance,
    roi_size: Sequence[int] | None = None,
    divisor: int = 16,
    overlap: float = 0.5,
    output_step: float | None = None,
    probe: torch.Tensor | None = None,
    probe_reference: torch.Tensor | None = None,
    keep_references: list[torch.Tensor] | None = None,
) -> VerificationReport:
    """Compare ``candidate`` (the artifact) with ``reference`` (PyTorch) on ``batches``.

    Args:
        reference: a ``[b, C, *S] -> [b, K, *S]`` callable, or the reference logits of each
            batch computed earlier (``launch.py verify`` replays a stored verification set).
        candidate: the artifact as such a callable.
        batches: dicts with ``"image"`` ``[B, C, *S]`` float and ``"label"`` ``[B, *S]`` int.
        num_classes, class_names: for Dice.
        tolerance: pass/fail thresholds.
        roi_size, divisor, overlap: whole-image inference settings (``predict_logits``).
        output_step: the artifact's output quantization step, if known.
        probe: an extra input (another batch size and spatial size than the data) run
            directly through both, to catch shapes baked in at trace time.
        probe_reference: the reference output for ``probe`` when ``reference`` is stored logits.
        keep_references: if given, each batch's reference logits are appended to it.
    """
    stored = not callable(reference)
    report = VerificationReport(tolerance=tolerance, class_names=list(class_names))
    report.reference_dice = DiceCounts(num_classes)
    report.artifact_dice = DiceCounts(num_classes)
    comparer = _Comparer(report, output_step)
    for i, batch in enumerate(batches):
        image = batch["image"].float()
        ref = reference[i].float() if stored else predict_logits(reference, image, roi_size=roi_size, overlap=overlap,
                                                                  divisor=divisor)
        if keep_references is not None:
            keep_references.append(ref)
        out = predict_logits(candidate, image, roi_size=roi_size, overlap=overlap, divisor=divisor).float()
        report.batches += 1
        if not comparer.compare(f"batch {i}", ref, out):
            return report
        ref_pred, out_pred = ref.argmax(1), out.argmax(1)
        report.agree += int((ref_pred == out_pred).sum())
        report.voxels += ref_pred.numel()
        label = batch["label"]
        report.reference_dice.update(ref_pred, label)
        report.artifact_dice.update(out_pred, label)
    if report.batches == 0:
        report.failures.append("no validation batches to verify on")
        return report
    if probe is not None and (not stored or probe_reference is not None):
        exceed_before, logits_before = report.exceed, report.logits
        ref = probe_reference.float() if stored else reference(probe)
        ok = comparer.compare(f"shape probe {tuple(probe.shape)}", ref, candidate(probe).float())
        report.probe = {
            "shape": list(probe.shape),
            "exceed_fraction": (report.exceed - exceed_before) / max(1, report.logits - logits_before),
            "ok": ok,
        }
        if not ok:
            return report
    _judge(report)
    return report


def _judge(report: VerificationReport) -> None:
    tol = report.tolerance
    if report.exceed_fraction > tol.max_exceed_fraction:
        allowed = "none" if tol.max_exceed_fraction == 0 else f"{tol.max_exceed_fraction:.4%}"
        report.failures.append(
            f"{report.exceed_fraction:.4%} of logits differ by more than {tol.atol:g} {tol.unit} "
            f"(allowed: {allowed}; max abs diff {report.max_abs_diff:.3g})"
        )
    if report.argmax_agreement < tol.min_argmax_agreement:
        report.failures.append(
            f"argmax agreement {report.argmax_agreement:.4%} < {tol.min_argmax_agreement:.4%}"
        )
    if tol.max_dice_drop is not None:
        ref = report.reference_dice.mean_foreground() if report.reference_dice else None
        art = report.artifact_dice.mean_foreground() if report.artifact_dice else None
        if ref is not None and art is not None and ref - art > tol.max_dice_drop:
            report.failures.append(f"mean Dice dropped {ref - art:.4f} ({ref:.4f} -> {art:.4f}) > {tol.max_dice_drop:g}")
