"""Export a quantized network as QuantizeLinear/DequantizeLinear ONNX (TensorRT explicit quantization).

The layout TensorRT expects (and ``qdq_check.check_qdq`` verifies): every quantized
Conv/ConvTranspose/Gemm reads its activation through ``Q -> DQ`` (int8, zero-point 0, one
scalar scale) and its weight through ``Q -> DQ`` on the float initializer (int8, zero-point 0,
one scale per output channel: ``axis=0`` for Conv/Gemm weights ``[out, in, ...]``, ``axis=1``
for ConvTranspose weights ``[in, out, ...]``). BatchNorm stays in the graph after a
quantized Conv (its input comes from a DQ, so the exporter cannot fold it); TensorRT fuses it
at engine build. Outputs (logits) stay float.

How: the legacy TorchScript exporter (``dynamo=False``) writes each
``torch.fake_quantize_per_*_affine`` as a Q/DQ pair, with dynamic batch and spatial axes
(field notes; the dynamo exporter fails on these ops). It only accepts the range
[-128, 127], so weights are first clamped to +-127 steps of their scale on a private copy of
the net: for such weights [-128, 127] and [-127, 127] quantize identically, so the graph is
numerically the trained model and no weight ever quantizes to -128.

On CPU, onnxruntime runs this graph correctly but does not fuse it into integer kernels
(it is a TensorRT artifact; ``onnx-int8-cpu`` is the fast CPU one).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer.errors import UserError
from trainer.quant.calibrate import quant_layers

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


def bake_for_export(net: nn.Module) -> None:
    """Make the stored scales the effective ones and clamp every quantized layer's weight to
    ``[-qmax s, qmax s]`` of its channel scale (qmax 127, or 63 for 7-bit), in place (on the export copy)."""
    with torch.no_grad():
        for layer in quant_layers(net).values():
            for quantizer in (layer.input_quant, layer.weight_quant):
                if quantizer.learnable:
                    quantizer.project_scale()
            q = layer.weight_quant
            shape = [1] * layer.weight.dim()
            shape[q.axis] = -1
            bound = (q.scale.detach() * q.qmax).reshape(shape)
            layer.weight.copy_(torch.maximum(torch.minimum(layer.weight, bound), -bound))


def export_qdq(net: nn.Module, path: str | Path, example: torch.Tensor, opset: int = 17) -> list[str]:
    """Write ``net`` (quantized by QAT or PTQ) as QDQ ONNX to ``path``.

    Args:
        net: a network with calibrated quantized layers; not modified (a CPU eval copy is
            exported).
        path: the ``.onnx`` file to write.
        example: one input ``[1, C, *S]`` for tracing; batch and spatial axes are dynamic.
        opset: ONNX opset (>= 17, the export package's floor; QDQ per-axis needs 13).

    Returns:
        The tracer warnings (see ``trainer.export.onnx_tools.export_onnx``).

    Raises:
        UserError: the net has no quantized layer, a used quantizer is not calibrated, or the
            exporter failed (naming the operator).
    """
    from trainer.export.onnx_tools import export_onnx

    if opset < MIN_OPSET:
        raise UserError(f"opset={opset}: per-channel QuantizeLinear needs opset >= {MIN_OPSET}")
    if not quant_layers(net):
        raise UserError(f"{type(net).__qualname__} has no quantized layers; export onnx-qdq from a QAT "
                        "checkpoint or one written by `launch.py quantize`")
    model = copy.deepcopy(net).cpu().float().eval()
    bake_for_export(model)
    return export_onnx(model, example.detach().float().cpu(), path, opset=opset)


def ort_parity(net: nn.Module, path: str | Path, images: torch.Tensor, threads: int = 1) -> dict[str, float]:
    """Run ``images`` through PyTorch (eval) and the ONNX file; max abs diff and argmax agreement."""
    from trainer.export.onnx_tools import OrtPredictor, ort_session

    run = OrtPredictor(ort_session(path, threads=threads))
    model = copy.deepcopy(net).cpu().eval()
    with torch.no_grad():
        ref = model(images)
    out = run(images)
    diff = (out - ref).abs()
    return {
        "max_abs_diff": float(diff.max()),
        "p999_abs_diff": float(np.quantile(diff.flatten().numpy(), 0.999)),
        "logit_range": float(ref.max() - ref.min()),
        "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
    }
