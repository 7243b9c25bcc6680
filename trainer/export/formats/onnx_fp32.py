"""``onnx``: FP32 ONNX with dynamic batch and spatial axes, simplified with onnxslim."""
from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass

from trainer.export.registry import BuildContext, BuildResult, ExportFormat, register_format
from trainer.export.verify import Tolerance


@register_format
@dataclass
class OnnxFp32(ExportFormat):
    """Portable FP32 ONNX: the reference artifact every other format derives from.

    Tolerance: 1e-3 of the logit scale. ORT and PyTorch differ only in summation order, kernel
    choice and the BatchNorm folding done at export (each ~1e-7 relative per op, growing with
    depth to ~1e-5 in deep 3D nets); a real defect (a wrong weight, padding, axis or
    shape baked in at trace time) moves logits by a sizeable fraction of their scale. 1e-3
    sits two orders of magnitude from both.

    Args:
        exporter: ``torchscript`` (default) or ``dynamo`` (opset >= 18; see ``onnx_tools``).
    """

    exporter: str = "torchscript"

    name = "onnx"
    summary = "FP32 ONNX (opset >= 17), dynamic batch/spatial axes, simplified with onnxslim"
    filename = "model.onnx"
    tolerance = Tolerance(atol=1e-3, unit="logit_scale", min_argmax_agreement=0.9999)

    def __post_init__(self) -> None:
        from trainer.export.onnx_tools import EXPORTERS
        from trainer.errors import UserError

        if self.exporter not in EXPORTERS:
            raise UserError(f"{self.name}: exporter={self.exporter!r} must be one of {', '.join(EXPORTERS)}")

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        cls.add_exporter_argument(group)

    def build(self, ctx: BuildContext) -> BuildResult:
        src, before, after = ctx.simplified_onnx()
        artifact = ctx.out_dir / self.filename
        shutil.copyfile(src, artifact)
        return BuildResult(artifact=artifact, nodes_before=before, nodes_after=after)
