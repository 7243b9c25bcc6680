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

Dice and HD95 of both sides come from ``trainer.metrics.SegmentationMetrics`` (the
implementation validation and the report use): pooled Dice, per-case Dice, HD95 in mm per case
volume with missed and spurious classes at the worst value. HD95 needs the batches' case
metadata (``case``, ``spacing``, ``slice``, ``depth``, ``size``, as the datamodules yield it);
the verification set stored with an artifact holds images and labels only, so replaying it
gives Dice alone.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import torch

from trainer.errors import UserError
from trainer.inference import InferenceSettings, predict_logits
from trainer.metrics import SegmentationMetrics, SegmentationScores

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
    reference_scores: SegmentationMetrics | None = None
    artifact_scores: SegmentationMetrics | None = None
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

    def scores(self) -> tuple[SegmentationScores | None, SegmentationScores | None]:
        """``(pytorch, artifact)`` scores over the whole verification set."""
        if self.reference_scores is None or not self.voxels:
            return None, None
        return self.reference_scores.compute(), self.artifact_scores.compute()

    def mean_dice(self) -> tuple[float | None, float | None]:
        ref, art = self.scores()
        return (ref.mean_dice if ref else None), (art.mean_dice if art else None)

    def message(self, what: str) -> str:
        dice = ""
        if self.reference_scores is not None and self.voxels:
            ref, art = self.mean_dice()
            dice = f"; mean Dice pytorch {_fmt(ref)} vs artifact {_fmt(art)}"
        return f"verification of {what} failed: {'; '.join(self.failures)}; worst mismatch: {self.worst}{dice}"

    def _side(self, metric: SegmentationMetrics | None, scores: SegmentationScores | None) -> tuple[dict, dict]:
        if metric is None or scores is None:
            return {}, {}
        dice = {
            "per_class": {name: _round(d) for name, d in zip(self.class_names, metric.pooled_dice())},
            "mean_foreground": _round(scores.mean_dice),
            "per_case_mean": {name: _round(d) for name, d in scores.case_dice.items()},
            "per_case_mean_foreground": _round(scores.mean_case_dice),
        }
        hd = {
            "per_class": {name: _round(d, 3) for name, d in scores.hd95.items()},
            "mean_foreground": _round(scores.mean_hd95, 3),
            "missed": scores.missed, "spurious": scores.spurious,
        }
        return dice, hd

    def to_card(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(metrics, verification)`` sections of the model card."""
        ref, art = self.scores()
        ref_dice, ref_hd = self._side(self.reference_scores, ref)
        art_dice, art_hd = self._side(self.artifact_scores, art)
        definitions = (ref or art).to_dict()["definitions"] if (ref or art) else {}
        metrics = {
            "dice": {
                "definition": definitions.get("dice", "") + "; per_case_mean: " + definitions.get("case_dice", ""),
                "pytorch": ref_dice,
                "artifact": art_dice,
            },
            "hd95_mm": {"definition": definitions.get("hd95", ""), "pytorch": ref_hd, "artifact": art_hd},
            "evaluated": {"cases": ref.cases, "partial_cases": ref.partial_cases, "scope": ref.scope} if ref else None,
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
        roi_size, divisor, overlap: whole-image inference settings (``InferenceSettings``):
            the model's own, as validation used them (``model.sw_overlap`` included).
        output_step: the artifact's output quantization step, if known.
        probe: an extra input (another batch size and spatial size than the data) run
            directly through both, to catch shapes baked in at trace time.
        probe_reference: the reference output for ``probe`` when ``reference`` is stored logits.
        keep_references: if given, each batch's reference logits are appended to it.
    """
    stored = not callable(reference)
    settings = InferenceSettings(roi_size, overlap, divisor)
    report = VerificationReport(tolerance=tolerance, class_names=list(class_names))
    report.reference_scores = SegmentationMetrics(num_classes, class_names)
    report.artifact_scores = SegmentationMetrics(num_classes, class_names)
    comparer = _Comparer(report, output_step)
    for i, batch in enumerate(batches):
        image = batch["image"].float()
        ref = reference[i].float() if stored else predict_logits(reference, image, settings=settings)
        if keep_references is not None:
            keep_references.append(ref)
        out = predict_logits(candidate, image, settings=settings).float()
        report.batches += 1
        if not comparer.compare(f"batch {i}", ref, out):
            return report
        ref_pred, out_pred = ref.argmax(1), out.argmax(1)
        report.agree += int((ref_pred == out_pred).sum())
        report.voxels += ref_pred.numel()
        label = batch["label"]
        report.reference_scores.update(ref_pred, label, batch)
        report.artifact_scores.update(out_pred, label, batch)
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
        ref, art = report.mean_dice()
        if ref is not None and art is not None and ref - art > tol.max_dice_drop:
            report.failures.append(f"mean Dice dropped {ref - art:.4f} ({ref:.4f} -> {art:.4f}) > {tol.max_dice_drop:g}")
