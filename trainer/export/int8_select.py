"""Which layers of a float network ``onnx-int8-cpu`` quantizes, chosen by measurement.

A first artifact quantizes every layer onnxruntime can; it is scored against the PyTorch model
on the calibration inputs and verification's shape probe with the tolerance verification will apply (logits within ``atol`` output steps,
argmax agreement), tightened by ``MARGIN`` because verification later scores the artifact on
whole images, shape probes and sliding windows. Most BatchNorm networks pass at once and
nothing changes. Otherwise each weighted layer (Conv, ConvTranspose, MatMul, Gemm) is measured
*left in float alone* -- how much of the failure it removes -- and the shortest run of layers in
that order whose float precision makes the artifact pass is found by bisection; the rest stays
INT8. On
Instance/GroupNorm networks the layers chosen are those at full resolution next to the input
and the output (seen on the five MONAI networks of ``tests/networks`` while this was
developed; no benchmark script was kept): noise added there reaches the logits without being averaged by later layers.

Cost, only when the first artifact fails: one quantization per weighted layer plus about
log2(layers) for the bisection (seconds for small 2D networks, minutes for large 3D ones;
``--no-select-layers`` skips it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from trainer.export.onnx_tools import INPUT_NAME, ort_session, output_quant_step
from trainer.export.verify import Tolerance

WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
MARGIN = 0.5  # the allowed fractions (logits beyond atol, argmax disagreement) times this

Quantize = Callable[[Path, Sequence[str]], None]  # (destination, node names left in float)


@dataclass
class Score:
    """How an INT8 graph compares with the PyTorch model on the calibration inputs."""

    exceed_fraction: float  # logits more than atol output steps away
    argmax_agreement: float

    def passes(self, tol: Tolerance) -> bool:
        return (self.exceed_fraction <= tol.max_exceed_fraction * MARGIN and
                1.0 - self.argmax_agreement <= (1.0 - tol.min_argmax_agreement) * MARGIN)

    def badness(self, tol: Tolerance) -> float:
        """Failure in units of what is allowed (<= 1 passes); what measurement ranks by."""
        allowed_exceed = max(tol.max_exceed_fraction * MARGIN, 1e-9)
        allowed_flip = max((1.0 - tol.min_argmax_agreement) * MARGIN, 1e-9)
        return max(self.exceed_fraction / allowed_exceed, (1.0 - self.argmax_agreement) / allowed_flip)

    def to_card(self) -> dict:
        return {"exceed_fraction": round(self.exceed_fraction, 6), "argmax_agreement": round(self.argmax_agreement, 6)}


@dataclass
class Selection:
    """The outcome, for the model card."""

    left_float: list[str] = field(default_factory=list)
    weighted_layers: int = 0
    first: Score | None = None
    final: Score | None = None
    measured: dict[str, float] = field(default_factory=dict)  # layer -> badness with it alone in float
    quantizations: int = 0

    def to_card(self) -> dict:
        card = {"rule": f"every layer quantized unless leaving it in float was measured necessary; scored against the "
                        f"PyTorch model on the calibration inputs with the verification tolerance x{MARGIN}",
                "weighted_layers": self.weighted_layers, "left_float": list(self.left_float),
                "quantization_runs": self.quantizations,
                "first_attempt": self.first.to_card() if self.first else None,
                "chosen": self.final.to_card() if self.final else None}
        if self.measured:
            top = sorted(self.measured.items(), key=lambda kv: kv[1])[:8]
            card["most_sensitive"] = {name: round(b, 3) for name, b in top}
        return card


class _Scorer:
    """The score of an INT8 graph against reference outputs of the calibration inputs."""

    def __init__(self, reference: Sequence[np.ndarray], arrays: Sequence[np.ndarray], tol: Tolerance):
        self.arrays, self.reference, self.tol = list(arrays), list(reference), tol

    def __call__(self, int8_model: Path) -> Score:
        sess = ort_session(int8_model, threads=0)
        step = output_quant_step(int8_model)
        exceed = agree = total = voxels = 0
        for array, ref in zip(self.arrays, self.reference):
            out = sess.run(None, {INPUT_NAME: array})[0]
            unit = step if step is not None else max(float(ref.max() - ref.min()) / 255.0, 1e-12)
            exceed += int((np.abs(out - ref) > self.tol.atol * unit).sum())
            total += ref.size
            agree += int((out.argmax(1) == ref.argmax(1)).sum())
            voxels += ref.size // ref.shape[1]
        return Score(exceed / max(total, 1), agree / max(voxels, 1))


def weighted_layers(model_path: Path) -> list[str]:
    model = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in WEIGHTED and n.name]


def select_layers(float_model: Path, arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray], tol: Tolerance,
                  quantize: Quantize, work_dir: Path) -> tuple[Path, Selection]:
    """Quantize ``float_model`` (through ``quantize``), leaving in float the layers measurement
    says must be; returns the chosen INT8 file and what was done.

    Args:
        float_model: the graph to quantize (its weighted layers are the candidates).
        arrays: the inputs to score on (the calibration inputs and verification's shape probe).
        reference: what verification compares with, for each array: the PyTorch model's
            logits (the fake-quantized model's, for trained scales).
        tol: the tolerance verification will apply.
        quantize: ``(destination, layers left in float) -> None``.
        work_dir: scratch folder.
    """
    score = _Scorer(reference, arrays, tol)
    layers = weighted_layers(float_model)
    sel = Selection(weighted_layers=len(layers))

    def attempt(left_float: Sequence[str], tag: str) -> tuple[Path, Score]:
        path = work_dir / f"select_{tag}.onnx"
        quantize(path, list(left_float))
        sel.quantizations += 1
        return path, score(path)

    best, sel.first = attempt([], "all")
    sel.final = sel.first
    if sel.first.passes(tol):
        return best, sel
    for i, name in enumerate(layers):
        path, s = attempt([name], f"probe{i}")
        sel.measured[name] = s.badness(tol)
        path.unlink()
    order = sorted(layers, key=lambda n: sel.measured[n])
    # the shortest prefix of ``order`` to leave in float, by bisection: leaving more layers in
    # float never made an artifact worse in our measurements. Prefix ``lo`` fails, ``hi`` passes
    # (or is every layer: then the caller decides).
    lo, hi, passing = 0, len(order), {}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        path, s = attempt(order[:mid], f"float{mid}")
        if s.passes(tol):
            passing[mid], hi = (path, s), mid
        else:
            path.unlink()
            lo = mid
    if hi not in passing:
        passing[hi] = attempt(order[:hi], f"float{hi}")
    for count, (path, _) in passing.items():
        if count != hi:
            path.unlink()
    best.unlink()
    best, sel.final = passing[hi]
    sel.left_float = order[:hi]
    return best, sel
