"""A QAT/PTQ network's own scales, as overrides for onnxruntime's static quantizer.

The TensorRT layout (``export_qdq``) puts Q/DQ on each layer's *inputs*; onnxruntime's CPU
kernels fuse ``DQ -> Conv -> Q`` only, so that graph runs in float there (measured 1.2x eager
FP32). onnxruntime's own ``quantize_static`` places Q/DQ the way its kernels fuse them, but
computes its scales from calibration data. This module keeps the scales QAT trained:

1. :func:`float_equivalent`: a float copy of the network whose weights *are* the trained
   int8 grid (``w_int * s``), quantizers removed, BatchNorm left for the exporter to fold;
2. :func:`trained_overrides`: which ONNX convolution computes which quantized layer, found by
   running both on one input and matching each layer's input tensor by value (module names do
   not survive export; values do), then ``TensorQuantOverrides`` that give
   - each quantized layer's input tensor its trained scale: uint8 with zero point 128 where
     the tensor can be negative (exactly QAT's int8 grid), zero point 0 after a ReLU (so
     onnxruntime drops the ReLU into the convolution; the grid is QAT's, the upper clip 255
     steps instead of 127);
   - each weight its trained per-channel grid, times the per-channel factor BatchNorm folding
     multiplied in (read off the exported weights), on 7-bit integers unless the weights are
     stored as uint8: full-range int8 weights overflow the 16-bit pair sums of x86 CPUs without
     VNNI (``trainer.export.int8_safety``). 8-bit trained weights are re-rounded to 7 bits
     (the scale doubles); a net trained with 7-bit weights keeps them exactly.
Tensors QAT never quantized (ConvTranspose outputs, logits) get onnxruntime's calibrated scales.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import torch
from torch import nn

from trainer.errors import UserError
from trainer.quant.calibrate import quant_layers
from trainer.quant.export_qdq import bake_for_export
from trainer.quant.modules import dequantize_layer

SEVEN_BIT_MAX = 63  # symmetric 7-bit grid [-63, 63]: 255 * (63 + 63) < 32767
CONV_OPS = ("Conv", "ConvTranspose")
# ops through which a tensor stays >= 0 when every data input is >= 0
_SIGN_PRESERVING = {"MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Upsample", "Concat", "Identity",
                    "Reshape", "Transpose", "Slice", "Flatten", "Squeeze", "Unsqueeze"}


@dataclass
class LayerGrid:
    """One quantized layer's trained numbers."""

    input_scale: float
    weight_scale: np.ndarray  # [out channels]
    weight_int: np.ndarray  # the trained integers, float array
    axis: int  # output-channel axis of the weight
    qmax: int  # largest trained |integer| allowed (127 for 8-bit)


@dataclass
class TrainedScales:
    """``quantize_static`` overrides and what was kept or changed."""

    overrides: dict[str, list[dict[str, Any]]]
    layers: int
    weight_bits: str  # "int8 as trained", "int7 (re-rounded from int8)" ...
    shared_inputs: list[str] = field(default_factory=list)

    def card(self) -> dict[str, Any]:
        return {
            "source": "trained scales (QAT/PTQ checkpoint)",
            "layers_with_trained_scales": self.layers,
            "weights": self.weight_bits,
            "inputs_shared_by_layers_with_different_scales": self.shared_inputs,
        }


def float_equivalent(net: nn.Module, example: torch.Tensor | None = None) -> tuple[nn.Module, dict[str, LayerGrid]]:
    """A CPU eval copy of ``net`` with each quantized layer's weight replaced by its fake-quantized
    value and the quantizers removed, plus each layer's trained grid.

    A layer whose quantizers were never calibrated is refused, unless ``example`` shows that the
    inference forward never runs it (deep-supervision heads of a net PTQ calibrated in eval
    mode): it is not in the exported graph and keeps its float weights."""
    model = copy.deepcopy(net).cpu().float().eval()
    bake_for_export(model)
    layers = quant_layers(model)
    uncalibrated = [name for name, layer in layers.items()
                    if not (layer.weight_quant.enabled and layer.input_quant.enabled)]
    used = uncalibrated if example is None else list(_layer_inputs(model, uncalibrated, example))
    if used:
        raise UserError(f"{used[0]}: quantizer is not calibrated; a QAT or PTQ checkpoint must be calibrated before export")
    grids: dict[str, LayerGrid] = {}
    for name, layer in layers.items():
        wq, iq = layer.weight_quant, layer.input_quant
        if name in uncalibrated:
            dequantize_layer(layer)
            continue
        with torch.no_grad():
            fake = wq(layer.weight).detach().clone()
        scale = wq.scale.detach().float().cpu()
        shape = [-1 if d == wq.axis else 1 for d in range(fake.dim())]
        grids[name] = LayerGrid(
            input_scale=float(iq.scale), weight_scale=scale.numpy().astype(np.float64),
            weight_int=torch.round(fake / scale.reshape(shape)).numpy(), axis=int(wq.axis),
            qmax=int(wq.qmax),
        )
        with torch.no_grad():
            layer.weight.copy_(fake)
        dequantize_layer(layer)
    return model, grids


def trained_overrides(
    model: nn.Module, grids: dict[str, LayerGrid], onnx_path: str | Path, example: torch.Tensor, weight_type: str = "int8",
    seven_bit: bool = True,
) -> TrainedScales:
    """Overrides for ``quantize_static(..., extra_options={"TensorQuantOverrides": ...})``.

    Args:
        model, grids: from :func:`float_equivalent`.
        onnx_path: the float graph of ``model`` that will be quantized.
        example: one input ``[1, C, *S]``; used to match layers to ONNX nodes by value.
        weight_type: ``"int8"`` (7-bit integers stored as int8) or ``"uint8"`` (8-bit, zero point 128).
        seven_bit: with int8, re-round 8-bit trained weights to 7 bits (default). False keeps
            them 8-bit: such a file fails ``int8_safety`` (benchmarks compare it).
    """
    proto = onnx.load(str(onnx_path))
    matches = _match_layers(model, grids, proto, example)
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {out: n for n in proto.graph.node for out in n.output}
    overrides: dict[str, list[dict[str, Any]]] = {}
    input_scales: dict[str, set[float]] = {}
    for node, name in matches:
        grid = grids[name]
        tensor = node.input[0]
        input_scales.setdefault(tensor, set()).add(grid.input_scale)
        scale = max(input_scales[tensor])  # several readers: the widest grid covers them all
        zero = 0 if _non_negative(tensor, producer, consts) else 128
        overrides[tensor] = [{"scale": np.array(scale, np.float32), "zero_point": np.array(zero, np.uint8),
                              "quant_type": _quant_type("uint8")}]
        overrides[node.input[1]] = _weight_overrides(name, grid, consts[node.input[1]], weight_type, seven_bit)
    shared = sorted(t for t, s in input_scales.items() if len(s) > 1)
    trained_7bit = all(g.qmax <= SEVEN_BIT_MAX for g in grids.values())
    bits = ("uint8, zero point 128 (8-bit as trained)" if weight_type == "uint8"
            else "int8 holding 7-bit integers (as trained)" if trained_7bit
            else "int8 holding 7-bit integers, re-rounded from the trained 8-bit grid (scale x 127/63)" if seven_bit
            else "int8 (8-bit as trained; can overflow on x86 CPUs without VNNI)")
    return TrainedScales(overrides=overrides, layers=len(matches), weight_bits=bits, shared_inputs=shared)


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def _weight_overrides(name: str, grid: LayerGrid, exported: np.ndarray, weight_type: str,
                      seven_bit: bool) -> list[dict[str, Any]]:
    """Per-channel scales: trained scale x the factor BatchNorm folding multiplied in."""
    factor, err = _grid_fit(grid, exported)
    scale = np.abs(grid.weight_scale * factor)
    if err > 1e-3:  # the exported weight is not the trained grid times a per-channel factor
        raise UserError(f"{name}: exported weights differ from the trained int8 grid (relative error {err:.2g}); "
                        "cannot keep its trained scales")
    scale = np.where(scale > 0, scale, grid.weight_scale)  # all-zero channel: any positive scale
    if weight_type == "uint8":
        zero, qtype = np.array(128, np.uint8), _quant_type("uint8")
    else:
        scale = scale * max(1.0, grid.qmax / SEVEN_BIT_MAX) if seven_bit else scale
        zero, qtype = np.array(0, np.int8), _quant_type("int8")
    return [{"scale": np.array(s, np.float32), "zero_point": zero, "quant_type": qtype, "axis": grid.axis}
            for s in scale]


def _grid_fit(grid: LayerGrid, exported: np.ndarray) -> tuple[np.ndarray, float]:
    """``(per-channel factor, relative error)`` of ``exported ~ trained grid x factor``."""
    wq = np.moveaxis(grid.weight_int * _expand(grid.weight_scale, grid.axis, grid.weight_int.ndim), grid.axis, 0)
    w = np.moveaxis(exported.astype(np.float64), grid.axis, 0).reshape(wq.shape[0], -1)
    wq = wq.reshape(w.shape)
    norms = (wq * wq).sum(1)
    factor = np.where(norms > 0, (w * wq).sum(1) / np.maximum(norms, 1e-300), 1.0)
    return factor, float(np.abs(w - wq * factor[:, None]).max(initial=0.0) / max(np.abs(w).max(initial=0.0), 1e-12))


def _expand(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _non_negative(tensor: str, producer: dict[str, onnx.NodeProto], consts: dict[str, np.ndarray], depth: int = 0) -> bool:
    """True when the graph guarantees ``tensor >= 0`` (after ReLU, through pooling/concat...)."""
    node = producer.get(tensor)
    if node is None or depth > 32:
        return False
    if node.op_type in ("Relu", "Sigmoid", "Softmax"):
        return True
    if node.op_type == "Clip":
        low = consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        return low is not None and float(np.min(low)) >= 0
    if node.op_type in _SIGN_PRESERVING:
        data = [i for i in node.input if i and i not in consts]
        return bool(data) and all(_non_negative(i, producer, consts, depth + 1) for i in data)
    return False


def _match_layers(model: nn.Module, grids: dict[str, LayerGrid], proto: onnx.ModelProto, example: torch.Tensor):
    """``[(onnx node, layer name)]``: each quantized layer's convolution in the graph, matched by
    its input values on ``example`` and its weight shape."""
    seen = _layer_inputs(model, grids, example)
    convs = [n for n in proto.graph.node if n.op_type in CONV_OPS]
    values = _onnx_values(proto, [n.input[0] for n in convs], example)
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    consts = {n.input[1]: onnx.numpy_helper.to_array(t) for n in convs for t in proto.graph.initializer if t.name == n.input[1]}
    matches, used = [], set()
    for node in convs:
        value = values[node.input[0]]
        found = [name for name, x in seen.items()
                 if name not in used and x.shape == value.shape and shapes.get(node.input[1]) == grids[name].weight_int.shape
                 and np.allclose(x, value, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(x).max())))]
        if len(found) > 1:  # e.g. a residual unit's main and shortcut convolutions: tell them by weights
            weight = consts.get(node.input[1])
            found = [name for name in found if weight is not None and _grid_fit(grids[name], weight)[1] <= 1e-3]
        if len(found) > 1:
            raise UserError(f"layers {found} read the same input with the same weight shape; cannot tell which is "
                            f"ONNX node {node.name!r}")
        if found:
            matches.append((node, found[0]))
            used.add(found[0])
    # layers the inference forward never runs (deep-supervision heads: training only) are not in
    # the exported graph and need no match; every layer it does run must be found
    missing = sorted(set(seen) - used)
    if missing:
        raise UserError(f"quantized layers {missing[:5]} were not found among the exported graph's convolutions; "
                        "cannot keep their trained scales")
    return matches


def _layer_inputs(model: nn.Module, names: Iterable[str], example: torch.Tensor) -> dict[str, np.ndarray]:
    """The input of each layer in ``names`` that the eval forward runs on ``example``."""
    seen: dict[str, np.ndarray] = {}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_pre_hook(_recorder(seen, name)) for name in names]
    try:
        with torch.no_grad():
            model(example.float().cpu())
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _recorder(seen: dict[str, np.ndarray], name: str):
    def hook(module, args):
        seen.setdefault(name, args[0].detach().float().numpy().copy())
    return hook


def _onnx_values(proto: onnx.ModelProto, tensors: list[str], example: torch.Tensor) -> dict[str, np.ndarray]:
    """Values of intermediate ``tensors`` for ``example``: exposed as graph outputs, run once."""
    from trainer.export.onnx_tools import INPUT_NAME, ort_session

    probe = copy.deepcopy(proto)
    del probe.graph.output[:]
    names = list(dict.fromkeys(tensors))
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(probe, str(path))
        outputs = ort_session(path, threads=1).run(None, {INPUT_NAME: example.float().cpu().numpy()})
    return dict(zip(names, outputs))
