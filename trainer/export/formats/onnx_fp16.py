"""``onnx-fp16``: half-precision ONNX for GPU runtimes, numerically sensitive ops kept FP32."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import onnx

from trainer.errors import UserError
from trainer.export.registry import BuildContext, BuildResult, ExportFormat, register_format
from trainer.export.verify import Tolerance

# Ops whose FP16 versions lose too much: normalisations (variance of fp16 activations under- or
# overflows), softmax/exp/log (range), resizing (coordinate precision), reductions (long sums).
KEEP_FP32_OPS = (
    "InstanceNormalization",
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "Softmax",
    "LogSoftmax",
    "Exp",
    "Log",
    "Pow",
    "Sqrt",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "Resize",
    "Upsample",
)


def convert_to_fp16(model: onnx.ModelProto, keep_fp32_ops=KEEP_FP32_OPS) -> onnx.ModelProto:
    """FP16 copy of ``model`` with float32 inputs/outputs and ``keep_fp32_ops`` left in FP32.

    Uses ``onnxruntime.transformers.float16`` (shipped with onnxruntime; the same code as
    onnxconverter-common's ``float16`` module), which inserts the Casts at block boundaries.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    return convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops)),
    )


@register_format
@dataclass
class OnnxFp16(ExportFormat):
    """FP16 weights and activations; graph inputs and outputs stay float32.

    Tolerance: 1e-2 of the logit scale. FP16 rounds each op's result to 11 significant bits
    (relative error up to 4.9e-4); through a U-Net's ~20 layers the logits drift by ~1e-3 of
    their scale (measured 1.1e-3 on a small 2D U-Net), so 1e-2 leaves room for deeper nets
    while a wrong graph still fails by orders of magnitude. Argmax must agree on 99.9%: voxels
    whose top-2 logits are within FP16 noise may flip. Verified with onnxruntime on CPU, whose
    FP16 kernels round like (not identically to) GPU ones.

    Args:
        keep_fp32_ops: op types kept in float32 (default ``KEEP_FP32_OPS``).
        exporter: ``torchscript`` (default) or ``dynamo`` (opset >= 18; see ``onnx_tools``).
    """

    keep_fp32_ops: tuple[str, ...] = KEEP_FP32_OPS
    exporter: str = "torchscript"

    name = "onnx-fp16"
    summary = "FP16 ONNX for GPU runtimes (float32 I/O; norms/softmax/resize kept FP32)"
    filename = "model.onnx"
    tolerance = Tolerance(atol=1e-2, unit="logit_scale", min_argmax_agreement=0.999)

    def __post_init__(self) -> None:
        self.keep_fp32_ops = tuple(self.keep_fp32_ops)
        bad = [op for op in self.keep_fp32_ops if not op.isidentifier()]
        if bad:
            raise UserError(f"onnx-fp16: keep_fp32_ops has entries that are not ONNX op types: {bad}")
        from trainer.export.onnx_tools import EXPORTERS

        if self.exporter not in EXPORTERS:
            raise UserError(f"onnx-fp16: exporter={self.exporter!r} must be one of {', '.join(EXPORTERS)}")

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--keep-fp32-ops", dest="keep_fp32_ops", nargs="+", default=KEEP_FP32_OPS, metavar="OP",
            help="ONNX op types left in float32 (default: %(default)s)",
        )
        cls.add_exporter_argument(group)

    def build(self, ctx: BuildContext) -> BuildResult:
        from trainer.export.onnx_tools import has_quantize_nodes, simplify_onnx

        src, before, _ = ctx.simplified_onnx()
        if has_quantize_nodes(src):  # FP16 conversion of Q/DQ nodes gives a graph onnxruntime refuses to load
            raise UserError(f"onnx-fp16: {type(ctx.net).__name__} is quantized (a QAT/PTQ checkpoint: Q/DQ nodes); "
                            "FP16 conversion is for float networks: export it as onnx-qdq, onnx-int8-cpu or "
                            "tensorrt --precision int8")
        half = convert_to_fp16(onnx.load(str(src)), self.keep_fp32_ops)
        converted = ctx.work_dir / "fp16.onnx"
        onnx.save(half, str(converted))
        artifact = ctx.out_dir / self.filename
        _, after = simplify_onnx(converted, artifact)  # folds Cast pairs the conversion left
        kept = sorted({n.op_type for n in half.graph.node} & set(self.keep_fp32_ops))
        return BuildResult(
            artifact=artifact, nodes_before=before, nodes_after=after,
            details={"fp32_ops_present": kept, "casts": after["by_op"].get("Cast", 0)},
        )
