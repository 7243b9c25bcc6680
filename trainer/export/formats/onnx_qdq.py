"""``onnx-qdq``: QuantizeLinear/DequantizeLinear ONNX of a QAT or PTQ checkpoint, for TensorRT.

The scales are the ones learned or calibrated in PyTorch (``trainer.quant``), written in
TensorRT's explicit-quantization layout: int8, zero-point 0, Q/DQ on each quantized layer's
input (per tensor) and weight (per output channel; axis 0 for Conv, 1 for ConvTranspose).
The graph is checked by ``trainer.quant.qdq_check.check_qdq`` before verification; layers
left in float (``skip_modules``, unsupported) are listed in the model card.

onnxruntime runs it on CPU (that is how it is verified) but does not fuse this placement into
integer kernels, so it is not faster than FP32 there; build a TensorRT engine from it
(``tensorrt`` format's ``--onnx`` input, or ``trtexec --onnx=model.onnx --int8``) on a GPU.
For a fast CPU artifact use ``onnx-int8-cpu``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.export.int8_safety import check_int8_accumulation
from trainer.export.onnx_tools import simplify_onnx
from trainer.export.registry import BuildContext, BuildResult, ExportFormat, register_format
from trainer.export.verify import Tolerance


@register_format
@dataclass
class OnnxQdq(ExportFormat):
    """Explicitly quantized (QDQ) ONNX carrying the checkpoint's own int8 scales.

    Tolerance: 99.9% of logits within 2 units of ``(max - min) / 255`` of the batch's
    PyTorch logits, argmax agreement >= 99.5%. The artifact computes the same fake-quantized
    network, but any float difference between the runtimes (onnxruntime divides by the scale
    where torch multiplies by its reciprocal; convolutions sum in another order) moves a value
    lying within an ulp of a rounding boundary to the neighbouring int8 step, and that step
    travels through the remaining layers. Voxels whose top two logits nearly tie then flip:
    measured 99.82% argmax agreement (2.4 steps worst logit) for a PTQ phantom U-Net trained
    only 25 steps (Dice 0.28), >= 99.9% for the better-trained test nets. A real defect (wrong
    axis, scale or zero-point) moves most logits by many steps and fails the 99.9% criterion.
    """

    name = "onnx-qdq"
    summary = "QDQ ONNX (int8, zero-point 0) of a QAT/PTQ checkpoint, TensorRT explicit quantization"
    filename = "model.onnx"
    tolerance = Tolerance(atol=2.0, unit="quant_step", max_exceed_fraction=1e-3, min_argmax_agreement=0.995)

    def build(self, ctx: BuildContext) -> BuildResult:
        from trainer.quant.calibrate import quant_layers
        from trainer.quant.convert import quantization_entry
        from trainer.quant.export_qdq import export_qdq
        from trainer.quant.qdq_check import check_qdq

        if not quant_layers(ctx.net):
            raise UserError(
                f"onnx-qdq needs a quantized network (a QAT checkpoint, or one written by `launch.py quantize`); "
                f"{type(ctx.net).__qualname__} from {ctx.meta.checkpoint or 'this run'} has no quantized layer"
            )
        raw = ctx.work_dir / "qdq.onnx"
        ctx.export_warnings = export_qdq(ctx.net, raw, ctx.example, opset=ctx.opset)
        artifact = ctx.out_dir / self.filename
        before, after = simplify_onnx(raw, artifact)
        report = check_qdq(artifact)
        if not report.ok:
            raise UserError(f"onnx-qdq: the exported graph breaks TensorRT's QDQ rules: {report.summary()}")
        entry = quantization_entry(ctx.net) or {}
        details = {
            "quantizer": "trainer.quant (fake quantization from QAT or PTQ)",
            "weights": "int8 symmetric per output channel, range [-127, 127], zero-point 0",
            "activations": "int8 symmetric per tensor (inputs of quantized layers), range [-128, 127], zero-point 0",
            "placement": "TensorRT explicit quantization: Q/DQ on each quantized layer's input and weight",
            "learnable_scales": entry.get("learnable_scales"),
            "quantized_layers": len(report.quantized),
            "float_layers": report.float_layers,
            "cpu_note": "onnxruntime CPU does not fuse this placement; for CPU use onnx-int8-cpu on the same "
                        "checkpoint (it keeps these trained scales)",
        }
        return BuildResult(artifact=artifact, nodes_before=before, nodes_after=after, details=details)

    def static_checks(self, artifact: Path) -> dict[str, Any]:
        """Informational: TensorRT accumulates in 32 bits, so full-range int8 weights are right
        there; the card says whether onnxruntime on an x86 CPU without VNNI could overflow."""
        report = check_int8_accumulation(artifact)
        note = ("TensorRT accumulates int8 products in 32 bits: not a defect for this format's target; "
                "matters only if this file is run by onnxruntime on an x86 CPU without VNNI (use onnx-int8-cpu there)")
        return {"int8_accumulation_on_onnxruntime_cpu": {**report.to_card(), "note": note}}
