"""Static checker of a QDQ ONNX graph against TensorRT's explicit-quantization rules.

For every Conv, ConvTranspose, Gemm and MatMul-with-constant-weight node:

* *float*: neither input comes from a DequantizeLinear -> reported in ``float_layers``;
* *quantized*: both must be right, otherwise each defect is a ``problem``:
  - activation (input 0): ``QuantizeLinear -> DequantizeLinear``, int8 zero-point equal to 0,
    a constant scalar scale > 0, the Q and DQ using the same scale;
  - weight (input 1): ``DequantizeLinear`` of an int8 initializer, or of a
    ``QuantizeLinear`` of a float initializer; int8 zero-point(s) 0; one scale > 0 per output
    channel along the right axis (Conv/Gemm(transB=1): 0, ConvTranspose: 1, MatMul and
    Gemm(transB=0): 1); the quantized weights within [-127, 127].

ONNX's ``axis`` attribute defaults to 1 when absent (opset >= 13), which the checker honours:
a Conv weight DQ without ``axis`` is a problem. Constant inputs are resolved through
initializers, ``Constant`` and ``Identity`` nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class QDQReport:
    """Result of :func:`check_qdq`. ``ok``: at least one quantized layer and no problem."""

    path: str
    quantized: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.quantized) and not self.problems

    def summary(self) -> str:
        head = f"{self.path}: {len(self.quantized)} quantized layers, {len(self.float_layers)} float"
        if self.float_layers:
            head += f" ({', '.join(self.float_layers[:6])}{'...' if len(self.float_layers) > 6 else ''})"
        if not self.quantized:
            head += "; no quantized layer"
        if self.problems:
            head += f"; {len(self.problems)} problems: " + "; ".join(self.problems[:5])
        return head


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {out: n for n in g.node for out in n.output}

    def const(self, name: str) -> np.ndarray | None:
        """Value of a constant tensor (initializer, Constant, Identity of either), else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
            return None
        if node.op_type == "Identity":
            return self.const(node.input[0])
        return None

    def op(self, name: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        while node is not None and node.op_type == "Identity":
            node = self.producer.get(node.input[0])
        return node


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _zero_point_problem(g: _Graph, node: onnx.NodeProto, what: str) -> str | None:
    if len(node.input) < 3 or not node.input[2]:
        return f"{what}: {node.op_type} has no zero-point (defaults to uint8, TensorRT needs int8 0)"
    zp = g.const(node.input[2])
    if zp is None:
        return f"{what}: {node.op_type} zero-point is not a constant"
    if zp.dtype != np.int8:
        return f"{what}: {node.op_type} zero-point is {zp.dtype}, not int8"
    if np.any(zp != 0):
        return f"{what}: {node.op_type} zero-point is {zp.flatten()[:4].tolist()}, not 0"
    return None


def _activation_problems(g: _Graph, name: str, what: str) -> list[str]:
    dq = g.op(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return [f"{what}: activation is not fed by a DequantizeLinear"]
    problems = [p for p in (_zero_point_problem(g, dq, what),) if p]
    scale = g.const(dq.input[1])
    if scale is None or scale.ndim != 0 or not float(scale) > 0:
        problems.append(f"{what}: activation scale must be a constant scalar > 0 (got "
                        f"{'non-constant' if scale is None else f'shape {list(scale.shape)}'})")
    q = g.op(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        problems.append(f"{what}: activation DequantizeLinear is not fed by a QuantizeLinear")
    elif scale is not None and not np.array_equal(g.const(q.input[1]), scale):
        problems.append(f"{what}: activation QuantizeLinear and DequantizeLinear scales differ")
    return problems


def _expected_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return 1  # ConvTranspose [in, out/groups, ...]; MatMul [in, out]


def _weight_problems(g: _Graph, node: onnx.NodeProto, what: str) -> list[str]:
    dq = g.op(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear":
        return [f"{what}: weight is not fed by a DequantizeLinear"]
    problems = [p for p in (_zero_point_problem(g, dq, what),) if p]
    scale = g.const(dq.input[1])
    q = g.op(dq.input[0])
    if q is not None and q.op_type == "QuantizeLinear":
        weight = g.const(q.input[0])
        ints = None if weight is None or scale is None else _quantize(weight, scale, _attr(q, "axis", 1))
        if weight is None:
            problems.append(f"{what}: weight QuantizeLinear input is not a constant initializer")
        if _attr(q, "axis", 1) != _attr(dq, "axis", 1):
            problems.append(f"{what}: weight QuantizeLinear axis differs from its DequantizeLinear")
    else:
        ints = g.const(dq.input[0])
        weight = ints
        if ints is None or ints.dtype != np.int8:
            return problems + [f"{what}: weight DequantizeLinear input is neither an int8 initializer nor a QuantizeLinear"]
    axis, want = _attr(dq, "axis", 1), _expected_axis(node)
    if axis != want:
        problems.append(f"{what}: weight quantization axis is {axis}, expected {want} (output channels)")
    if scale is None or scale.ndim != 1 or not np.all(scale > 0):
        problems.append(f"{what}: weight scale must be a constant 1-D tensor > 0 (per output channel)")
    elif weight is not None and weight.ndim > axis and scale.shape[0] != weight.shape[axis]:
        problems.append(f"{what}: {scale.shape[0]} weight scales for {weight.shape[axis]} channels on axis {axis}")
    if ints is not None and ints.size and (ints.min() < -127 or ints.max() > 127):
        problems.append(f"{what}: quantized weights reach {int(ints.min())}..{int(ints.max())}, TensorRT needs [-127, 127]")
    return problems


def _quantize(weight: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray | None:
    if scale.ndim != 1 or weight.ndim <= axis or scale.shape[0] != weight.shape[axis]:
        return None
    shape = [1] * weight.ndim
    shape[axis] = -1
    return np.clip(np.rint(weight / scale.reshape(shape)), -128, 127)


def check_qdq(model_path: str | Path | onnx.ModelProto) -> QDQReport:
    """Check every Conv/ConvTranspose/Gemm/MatMul of the graph; see the module docstring."""
    model = model_path if isinstance(model_path, onnx.ModelProto) else onnx.load(str(model_path))
    g = _Graph(model)
    report = QDQReport(path=str(model_path) if not isinstance(model_path, onnx.ModelProto) else model.graph.name)
    for i, node in enumerate(model.graph.node):
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        what = f"{node.op_type} {node.name or f'#{i}'}"
        if node.op_type == "MatMul" and not _is_constant_weight(g, node.input[1]):
            continue  # activation x activation (attention): no weight to quantize
        fed = [g.op(x) is not None and g.op(x).op_type == "DequantizeLinear" for x in node.input[:2]]
        if not any(fed):
            report.float_layers.append(what)
            continue
        problems = _activation_problems(g, node.input[0], what) + _weight_problems(g, node, what)
        report.problems += problems
        if not problems:
            report.quantized.append(what)
    return report


def _is_constant_weight(g: _Graph, name: str) -> bool:
    """True when ``name`` is a constant, possibly behind DQ or Q -> DQ (a weight, not an activation)."""
    if g.const(name) is not None:
        return True
    dq = g.op(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return False
    if g.const(dq.input[0]) is not None:
        return True
    q = g.op(dq.input[0])
    return q is not None and q.op_type == "QuantizeLinear" and g.const(q.input[0]) is not None
