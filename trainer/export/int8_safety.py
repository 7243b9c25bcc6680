"""Prove from an INT8 ONNX file alone that no integer kernel can overflow, on any CPU.

Why: onnxruntime's x86 kernels for uint8 activations x int8 weights (u8s8) use
``vpmaddubsw`` on AVX2 and AVX-512 CPUs without VNNI. It multiplies pairs of neighbouring
uint8 x int8 values and adds each pair into a *signed 16-bit* lane, saturating at 32767.
CPUs with VNNI (``vpdpbusd``) and ARM's dot-product kernels accumulate in 32 bits and never
saturate. So one artifact can verify on the build machine and be silently wrong on the
deployment machine (measured: mean Dice 0.69 on a VNNI CPU, 0.09 on an AVX2 one). int8
activations do not help: on x86 onnxruntime shifts them to uint8 (+128) and runs the same
kernel (measured: an S8S8 graph saturates exactly like U8S8 under AVX2).

The bound checked here holds whatever the CPU and whichever neighbours a kernel pairs: an
8-bit activation takes at most 256 levels (0..255 after the shift), so a pair of products is
at most ``255 * (|w_a| + |w_b|)``, and that is at most ``255 * (top1 + top2)`` of the
``|w|`` feeding one output channel. The layer is safe when that is <= 32767, i.e. when the
two largest ``|w|`` of every output channel sum to at most 128 (7-bit weights, ``[-64, 64]``,
always do). uint8 weights (U8U8) are safe by construction: a uint8 x uint8 product does not
fit a signed 16-bit lane, so every kernel widens both operands first.

Layers looked at: QLinearConv, ConvInteger, MatMulInteger, QLinearMatMul (QOperator format)
and Conv, ConvTranspose, MatMul, Gemm whose input and weight both come from
DequantizeLinear (QDQ format; onnxruntime fuses these into the integer kernels above).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

INT16_MAX = 32767
ACTIVATION_SPAN = 255  # an 8-bit activation as the u8 operand of a u8s8 kernel: 0..255

# op -> (activation input, weight input, weight zero-point input or None)
_QOPERATOR = {
    "QLinearConv": (0, 3, 5),
    "QLinearConvTranspose": (0, 3, 5),
    "ConvInteger": (0, 1, 3),
    "MatMulInteger": (0, 1, 3),
    "QLinearMatMul": (0, 3, 5),
}
_QDQ_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass
class LayerBound:
    """The worst pair of products of one integer layer."""

    node: str
    op: str
    weight: str
    weight_type: str  # "int8" or "uint8"
    channel: int
    pair: tuple[int, int]
    bound: int

    @property
    def safe(self) -> bool:
        return self.weight_type == "uint8" or self.bound <= INT16_MAX

    def describe(self) -> str:
        a, b = self.pair
        return (f"layer {self.node!r} ({self.op}, weight {self.weight!r}, output channel {self.channel}): "
                f"{ACTIVATION_SPAN} x (|{a}| + |{b}|) = {self.bound} > {INT16_MAX}")


@dataclass
class AccumulationReport:
    """Outcome of :func:`check_int8_accumulation` for one file."""

    path: str
    layers: list[LayerBound] = field(default_factory=list)
    not_analysed: list[str] = field(default_factory=list)

    @property
    def at_risk(self) -> list[LayerBound]:
        return sorted((b for b in self.layers if not b.safe), key=lambda b: -b.bound)

    @property
    def ok(self) -> bool:
        return not self.at_risk

    def message(self) -> str:
        """One line naming the worst layer (for errors)."""
        risk = self.at_risk
        if not risk:
            return f"{self.path}: no integer layer can overflow a 16-bit pair sum"
        return (
            f"{self.path}: {len(risk)} of {len(self.layers)} integer layers can overflow the 16-bit pair sums of "
            f"onnxruntime's u8s8 kernels on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI); worst: "
            f"{risk[0].describe()}; quantize the weights to 7 bits (reduce_range) or as uint8"
        )

    def to_card(self) -> dict[str, Any]:
        worst = max(self.layers, key=lambda b: b.bound, default=None)
        return {
            "rule": f"{ACTIVATION_SPAN} x (two largest |int8 weight| of an output channel) <= {INT16_MAX} "
                    "for every integer layer (uint8 weights always pass)",
            "safe_on_every_cpu": self.ok,
            "integer_layers": len(self.layers),
            "layers_at_risk": [b.describe() for b in self.at_risk[:10]],
            "worst_pair_bound": worst.bound if worst else None,
            "not_analysed": self.not_analysed,
        }


def check_int8_accumulation(model: onnx.ModelProto | str | Path) -> AccumulationReport:
    """Bound every integer layer's 16-bit pair sums from the weights stored in ``model``."""
    path = "<model>" if isinstance(model, onnx.ModelProto) else str(model)
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = _Graph(model)
    report = AccumulationReport(path=path)
    for node in model.graph.node:
        found = graph.integer_operands(node)
        if found is None:
            continue
        weight_name, weight, zero_point = found
        if weight is None:
            report.not_analysed.append(f"{node.name or node.op_type}: weight {weight_name!r} is not a constant")
            continue
        report.layers.append(_layer_bound(node, weight_name, weight, zero_point))
    return report


class _Graph:
    """Constants and producers of a graph, for following DequantizeLinear inputs."""

    def __init__(self, model: onnx.ModelProto):
        self.consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producer = {out: node for node in model.graph.node for out in node.output}

    def integer_operands(self, node: onnx.NodeProto):
        """``(weight name, int weight array or None, weight zero point)`` of an integer layer, else None."""
        if node.op_type in _QOPERATOR:
            _, w_idx, zp_idx = _QOPERATOR[node.op_type]
            name = node.input[w_idx]
            zp = self._const(node.input[zp_idx]) if zp_idx < len(node.input) and node.input[zp_idx] else None
            return name, self._const(name), zp
        if node.op_type not in _QDQ_OPS or len(node.input) < 2:
            return None
        x_dq, w_dq = self.producer.get(node.input[0]), self.producer.get(node.input[1])
        if not (_is_dq(x_dq) and _is_dq(w_dq)) or not _eight_bit(self, x_dq):
            return None
        zp = self._const(w_dq.input[2]) if len(w_dq.input) > 2 and w_dq.input[2] else None
        weight = self._const(w_dq.input[0])
        if weight is not None and weight.dtype not in (np.int8, np.uint8):
            return None  # 16-bit or 4-bit weights: other kernels, not the u8s8 pair sums
        if node.op_type == "Gemm" and weight is not None and _attr(node, "transB", 0):
            weight = weight.T
        return w_dq.input[0], weight, zp

    def _const(self, name: str) -> np.ndarray | None:
        """A constant, or the integers a QuantizeLinear makes of constants (TensorRT-layout files
        keep float weights behind a Q node; runtimes fold it when they load the file)."""
        if name in self.consts:
            return self.consts[name]
        node = self.producer.get(name)
        if node is None or node.op_type != "QuantizeLinear":
            return None
        x, scale = self.consts.get(node.input[0]), self.consts.get(node.input[1])
        zero = self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(0, np.uint8)
        if x is None or scale is None or zero is None:
            return None
        axis = _attr(node, "axis", 1) % x.ndim if scale.ndim else 0
        shape = [-1 if d == axis else 1 for d in range(x.ndim)] if scale.ndim else []
        info = np.iinfo(zero.dtype)
        q = np.rint(x / scale.reshape(shape)) + zero.astype(np.int64).reshape(shape)
        return np.clip(q, info.min, info.max).astype(zero.dtype)


def _is_dq(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "DequantizeLinear"


def _eight_bit(graph: _Graph, dq: onnx.NodeProto) -> bool:
    """True when the DequantizeLinear reads an 8-bit tensor (its zero point's type, uint8 by default)."""
    zp = graph.consts.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    return zp is None or zp.dtype in (np.int8, np.uint8)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _per_output_channel(op: str, weight: np.ndarray) -> np.ndarray:
    """Signed weights as ``[output channels, reduction]``: what one output value sums over."""
    w = weight.astype(np.int64)
    if op in ("ConvTranspose", "QLinearConvTranspose"):  # [C_in, C_out/groups, *k]
        return np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"):  # [K, N]: column n sums over K
        return w.reshape(-1, w.shape[-1]).T if w.ndim >= 2 else w.reshape(1, -1)
    return w.reshape(w.shape[0], -1)  # Conv: [C_out, C_in/groups, *k]


def _layer_bound(node: onnx.NodeProto, weight_name: str, weight: np.ndarray, zero_point) -> LayerBound:
    """Bound of the worst channel. Kernels multiply the stored (raw) weights and correct for
    the zero point afterwards, so the raw values are what the pair sums see."""
    name = node.name or f"{node.op_type}->{node.output[0]}"
    if weight.dtype == np.uint8:
        return LayerBound(name, node.op_type, weight_name, "uint8", 0, (0, 0), 0)
    rows = _per_output_channel(node.op_type, weight)
    order = np.argsort(-np.abs(rows), axis=1, kind="stable")[:, :2]
    top = np.take_along_axis(rows, order, axis=1)
    if top.shape[1] == 1:  # one product per output value: nothing to pair
        top = np.concatenate([top, np.zeros_like(top)], axis=1)
    sums = np.abs(top).sum(axis=1)
    channel = int(sums.argmax())
    pair = (int(top[channel, 0]), int(top[channel, 1]))
    return LayerBound(name, node.op_type, weight_name, "int8", channel, pair, int(ACTIVATION_SPAN * sums[channel]))
