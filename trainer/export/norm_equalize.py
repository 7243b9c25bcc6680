"""Equalize the output channels of convolutions that feed Instance/Group normalization.

Why: onnxruntime quantizes an activation with one scale per tensor. A convolution followed by
InstanceNorm (or GroupNorm) has output channels of very different ranges (no BatchNorm folded
into its weights evens them out), and the norm then divides each channel by its own standard
deviation: a channel whose range is a few percent of the tensor's comes out of the norm with
its quantization noise amplified tens of times. Seen while this was developed on the five
MONAI networks of ``tests/networks`` and this framework's InstanceNorm U-Net (exploratory runs;
no benchmark script was kept): the per-tensor step of those conv outputs was 0.07-0.36 of the smallest channel's standard deviation, 1-8% of the
logits of the INT8 artifact ended more than 2 output steps from PyTorch's, and excluding
exactly those convolutions from quantization brought it to ~0 -- at the price of running them
in float.

What this does instead: an InstanceNorm is blind to a positive per-channel scale of its input,
``IN(k x) = IN(x)`` (for ``var >> eps``; exactly, ``IN(k x)`` uses ``eps / k**2``), so each
output channel ``c`` of such a convolution is multiplied by ``k_c = max_c' a_c' / a_c`` (``a``:
the channel's largest magnitude on the calibration inputs) by scaling its weights and bias in
the float graph before calibration. Every channel then spans the tensor's range, the quantized
convolution stays quantized, and the network computes the same function. A GroupNorm (exported
as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add at opset 17) gets one factor per
group. A channel is left alone (``k = 1``) where ``eps`` would matter: when its smallest
per-input variance is below ``1000 * eps`` the changed ``eps / k**2`` would move the norm's
output by more than 0.05%.

Only convolutions whose output is read by nothing but the norm (or by the Reshape in front of
it) are touched, with weights that no other node shares. Verification against PyTorch checks
the result like every other artifact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

_CONVS = ("Conv", "ConvTranspose")
_NORM = "InstanceNormalization"
EPS_MARGIN = 1000.0  # channels with var < EPS_MARGIN * eps keep k = 1 (eps would matter)


@dataclass
class _Site:
    conv: onnx.NodeProto
    norm: onnx.NodeProto
    groups: int  # channels per factor: 1 for InstanceNorm, C / G for GroupNorm
    absmax: np.ndarray | None = None  # per channel, over the calibration inputs
    minvar: np.ndarray | None = None  # per channel, smallest per-input variance


@dataclass
class EqualizeReport:
    """What was changed, for the model card."""

    convolutions: int = 0
    sites: list[str] = field(default_factory=list)
    max_gain: float = 1.0
    channels_kept_for_eps: int = 0

    def to_card(self) -> dict:
        return {"convolutions_equalized": self.convolutions, "max_channel_gain": round(self.max_gain, 3),
                "channels_left_for_eps": self.channels_kept_for_eps,
                "rule": "conv output channels feeding Instance/GroupNorm scaled to the tensor's range (norm-invariant)"}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _find_sites(model: onnx.ModelProto) -> list[_Site]:
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = _consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    sites = []
    for node in graph.node:
        if node.op_type not in _CONVS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if len(readers.get(node.input[1], [])) != 1 or (len(node.input) > 2 and node.input[2] and
                                                         (node.input[2] not in inits or len(readers[node.input[2]]) != 1)):
            continue  # shared or computed weights: scaling them would change another node
        if node.op_type == "ConvTranspose" and _attr(node, "group", 1) != 1:
            continue
        out = node.output[0]
        # a Shape node reads only the shape (GroupNorm exported with dynamic axes takes the
        # shape to reshape back to from the conv's output): scaling the values cannot change it
        nxt = [n for n in readers.get(out, []) if n.op_type != "Shape"]
        if out in graph_outputs or len(nxt) != 1:
            continue
        channels = _out_channels(node, inits[node.input[1]])
        if nxt[0].op_type == _NORM:
            sites.append(_Site(node, nxt[0], 1))
        elif nxt[0].op_type == "Reshape" and nxt[0].output[0] not in graph_outputs:
            after = [n for n in readers.get(nxt[0].output[0], []) if n.op_type != "Shape"]
            if len(after) == 1 and after[0].op_type == _NORM and after[0].input[1] in inits:
                groups = int(np.prod(numpy_helper.to_array(inits[after[0].input[1]]).shape))
                if groups > 0 and channels % groups == 0:
                    sites.append(_Site(node, after[0], channels // groups))
    return sites


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _out_channels(conv: onnx.NodeProto, weight: onnx.TensorProto) -> int:
    dims = list(weight.dims)
    return dims[0] if conv.op_type == "Conv" else dims[1] * _attr(conv, "group", 1)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _stats_model(model: onnx.ModelProto, sites: Sequence[_Site]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that also outputs, per site, ``max|y|`` and ``var(y)`` per (input, channel)."""
    stats = onnx.ModelProto()
    stats.CopyFrom(model)
    opset = _opset(model)
    names = []
    for i, site in enumerate(sites):
        y = site.conv.output[0]
        rank = _rank(model, y)
        axes = list(range(2, rank))
        pre = f"_eqstat{i}"
        nodes = [helper.make_node("Abs", [y], [f"{pre}_abs"]),
                 helper.make_node("Mul", [y, y], [f"{pre}_sq"])]
        nodes += _reduce("ReduceMax", f"{pre}_abs", f"{pre}_max", axes, opset, pre + "a")
        nodes += _reduce("ReduceMean", y, f"{pre}_mean", axes, opset, pre + "b")
        nodes += _reduce("ReduceMean", f"{pre}_sq", f"{pre}_meansq", axes, opset, pre + "c")
        stats.graph.node.extend(nodes)
        stats.graph.initializer.extend(i for i in _axes_inits(axes, opset, pre))
        for name in (f"{pre}_max", f"{pre}_mean", f"{pre}_meansq"):
            stats.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            names.append(name)
    return stats, names


def _rank(model: onnx.ModelProto, tensor: str) -> int:
    # every tensor between the input and the logits has the input's rank in these networks
    return len(model.graph.input[0].type.tensor_type.shape.dim)


def _reduce(op: str, x: str, y: str, axes: list[int], opset: int, tag: str) -> list[onnx.NodeProto]:
    # ReduceMax takes axes as an input from opset 18 on, ReduceMean too
    if opset >= 18:
        return [helper.make_node(op, [x, f"_eqaxes_{tag[:-1]}"], [y], keepdims=0)]
    return [helper.make_node(op, [x], [y], axes=axes, keepdims=0)]


def _axes_inits(axes: list[int], opset: int, pre: str) -> list[onnx.TensorProto]:
    if opset < 18:
        return []
    return [numpy_helper.from_array(np.array(axes, dtype=np.int64), f"_eqaxes_{pre}")]


def _measure(model: onnx.ModelProto, sites: list[_Site], arrays: Sequence[np.ndarray], input_name: str) -> None:
    import onnxruntime as ort

    stats, names = _stats_model(model, sites)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the conv outputs as they are
    sess = ort.InferenceSession(stats.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for array in arrays:
        values = sess.run(names, {input_name: array})
        for i, site in enumerate(sites):
            amax, mean, meansq = values[3 * i: 3 * i + 3]
            var = np.maximum(meansq - mean * mean, 0.0).min(axis=0)
            amax = amax.max(axis=0)
            site.absmax = amax if site.absmax is None else np.maximum(site.absmax, amax)
            site.minvar = var if site.minvar is None else np.minimum(site.minvar, var)


def _factors(site: _Site, eps: float) -> tuple[np.ndarray, int]:
    """Per-channel factors ``k >= 1`` (equal within a GroupNorm group) and how many stayed 1 for eps."""
    size = site.groups
    amax = site.absmax.reshape(-1, size).max(axis=1)
    minvar = site.minvar.reshape(-1, size).min(axis=1)
    target = float(amax.max())
    k = np.where(amax > 0, target / np.maximum(amax, 1e-30), 1.0)
    unsafe = minvar < EPS_MARGIN * eps
    k[unsafe] = 1.0
    return np.repeat(np.maximum(k, 1.0), size).astype(np.float32), int(unsafe.sum()) * size


def equalize_for_norms(src: str | Path, dst: str | Path, arrays: Sequence[np.ndarray], input_name: str) -> EqualizeReport:
    """Write ``src`` to ``dst`` with the conv outputs feeding norms equalized (see module doc)."""
    model = onnx.load(str(src))
    report = EqualizeReport()
    sites = _find_sites(model)
    if sites:
        _measure(model, sites, arrays, input_name)
        inits = {i.name: i for i in model.graph.initializer}
        for site in sites:
            eps = float(_attr(site.norm, "epsilon", 1e-5))
            k, kept = _factors(site, eps)
            report.channels_kept_for_eps += kept
            if np.all(k == 1.0):
                continue
            _scale(inits, site.conv, k)
            report.convolutions += 1
            report.sites.append(site.conv.name)
            report.max_gain = max(report.max_gain, float(k.max()))
    onnx.save(model, str(dst))
    return report


def _scale(inits: dict[str, onnx.TensorProto], conv: onnx.NodeProto, k: np.ndarray) -> None:
    weight = numpy_helper.to_array(inits[conv.input[1]])
    axis = 0 if conv.op_type == "Conv" else 1
    shape = [1] * weight.ndim
    shape[axis] = -1
    inits[conv.input[1]].CopyFrom(numpy_helper.from_array((weight * k.reshape(shape)).astype(weight.dtype), conv.input[1]))
    if len(conv.input) > 2 and conv.input[2]:
        bias = numpy_helper.to_array(inits[conv.input[2]])
        inits[conv.input[2]].CopyFrom(numpy_helper.from_array((bias * k).astype(bias.dtype), conv.input[2]))
