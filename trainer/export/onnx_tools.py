"""ONNX plumbing shared by the formats: export, simplification, node counts, onnxruntime.

Two exporters. The TorchScript one (``dynamo=False``, the default) is deprecated in torch 2.13
but it (a) exports fake-quant models as QuantizeLinear/DequantizeLinear with dynamic batch and
spatial axes (field notes; the dynamo exporter fails on the fake-quantize ops), and (b) folds
BatchNorm into the preceding Conv in eval mode. The dynamo exporter (``torch.export`` +
onnxscript, ``exporter="dynamo"``) is the one torch keeps: FP32 and FP16 formats can use it
today (``--exporter dynamo``); the Q/DQ path's move is planned in ``README_export.md``.
Simplification uses onnxslim (constant folding, dead-node and Identity removal, Conv+BN
fusion where weights are constant floats); it keeps QDQ pairs intact and emits only standard
ONNX ops, unlike onnxruntime's offline optimizer, whose saved graphs may contain ORT-only ops.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch

from trainer.errors import UserError

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
SPATIAL_AXIS_NAMES = {1: ["width"], 2: ["height", "width"], 3: ["depth", "height", "width"]}


def axis_names(spatial_dims: int) -> list[str]:
    """Names of the dynamic axes: ``batch`` then the spatial ones."""
    return ["batch", *SPATIAL_AXIS_NAMES[spatial_dims]]


EXPORTERS = ("torchscript", "dynamo")
DYNAMO_MIN_OPSET = 18  # what torch 2.13's dynamo exporter writes natively


def export_onnx(
    net: torch.nn.Module,
    example: torch.Tensor,
    path: str | Path,
    opset: int = 17,
    exporter: str = "torchscript",
) -> list[str]:
    """Trace ``net`` on ``example`` and write an FP32 ONNX with dynamic batch/spatial axes.

    Returns the tracer warnings (Python control flow on tensor values or shapes that the
    trace froze); verification at other shapes tells whether they mattered.

    Raises:
        UserError: naming the model class and the operator the exporter could not convert.
    """
    cls = type(net).__name__
    if exporter not in EXPORTERS:
        raise UserError(f"exporter={exporter!r} must be one of {', '.join(EXPORTERS)}")
    if opset < 17:
        raise UserError(f"opset={opset} is too old; use 17 or newer")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise UserError(f"the dynamo exporter writes opset >= {DYNAMO_MIN_OPSET}; got --opset {opset}")
    names = axis_names(example.dim() - 2)
    axes = {0: names[0], **{i + 2: n for i, n in enumerate(names[1:])}}
    with torch.no_grad():
        out = net(example)
    if not isinstance(out, torch.Tensor):
        raise UserError(
            f"cannot export {cls}: forward returned {type(out).__name__}, export needs one logits "
            "tensor (is deep supervision active outside eval mode?)"
        )
    if exporter == "dynamo":
        return _export_dynamo(net, example, path, opset, names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                net,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as err:  # the exporter raises many types; all mean "cannot export"
            text = str(err)
            op = re.search(r"(aten|prim|onnx)::\w+", text)
            if op:
                raise UserError(
                    f"cannot export {cls} to ONNX opset {opset}: operator {op.group(0)} is not "
                    f"supported by the exporter ({text.splitlines()[0][:200]})"
                ) from None
            raise UserError(f"cannot trace {cls} for ONNX export: {type(err).__name__}: {text.splitlines()[0][:300] if text else ''}") from None
    return [
        str(w.message).splitlines()[0]
        for w in caught
        if issubclass(w.category, torch.jit.TracerWarning)
    ]


def _export_dynamo(net: torch.nn.Module, example: torch.Tensor, path: str | Path, opset: int, names: list[str]) -> list[str]:
    """``torch.export`` + onnxscript, every axis but the channels dynamic, renamed like the
    TorchScript export's (``batch``, ``height``...), so cards and runtimes see the same I/O."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency; named if missing)
    except ImportError:
        raise UserError("the dynamo exporter needs onnxscript (pip install onnxscript)") from None
    dynamic = ({axis: torch.export.Dim.DYNAMIC for axis in (0, *range(2, example.dim()))},)  # per forward argument
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(net, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=dynamic,
                              opset_version=opset, dynamo=True, verbose=False)
        except Exception as err:  # torch.export and onnxscript raise many types
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            raise UserError(f"the dynamo exporter cannot export {type(net).__name__}: {type(err).__name__}: {first}") from None
    model = onnx.load(str(path))
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        for axis, name in zip((0, *range(2, len(dims))), names):
            dims[axis].dim_param = name
    onnx.save(model, str(path))
    return [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


def node_counts(model: onnx.ModelProto | str | Path) -> dict[str, Any]:
    """``{"total": n, "by_op": {op_type: n}}`` of the main graph."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    by_op = Counter(node.op_type for node in model.graph.node)
    return {"total": sum(by_op.values()), "by_op": dict(sorted(by_op.items()))}


def simplify_onnx(src: str | Path, dst: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Simplify ``src`` with onnxslim into ``dst``; returns node counts before and after."""
    import onnxslim

    model = onnx.load(str(src))
    before = node_counts(model)
    slim = onnxslim.slim(model)
    if slim is None:  # onnxslim returns None when its own output check fails
        raise UserError(f"onnxslim could not simplify {src}; the graph changed its outputs")
    onnx.checker.check_model(slim)
    onnx.save(slim, str(dst))
    return before, node_counts(slim)


def output_quant_step(model: onnx.ModelProto | str | Path) -> float | None:
    """Scale of the DequantizeLinear that produces the first graph output, if any.

    Per-channel scales give their maximum (the coarsest step). ``None`` when the output is not
    produced by a DequantizeLinear with a constant scale.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    out = model.graph.output[0].name
    producer = next((n for n in model.graph.node if out in n.output), None)
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    inits = {t.name: t for t in model.graph.initializer}
    scale = inits.get(producer.input[1])
    if scale is None:
        return None
    return float(np.max(onnx.numpy_helper.to_array(scale)))


def has_quantize_nodes(model: onnx.ModelProto | str | Path) -> bool:
    """True when the graph carries explicit quantization (QuantizeLinear nodes)."""
    return node_counts(model)["by_op"].get("QuantizeLinear", 0) > 0


def ort_session(path: str | Path, threads: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """An onnxruntime ``InferenceSession`` for ``path``.

    Args:
        path: the ONNX file.
        threads: intra-op threads; 1 gives stable single-stream timings, 0 lets onnxruntime
            use every core. Default 1.
        providers: execution providers in priority order. Default CPU only.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise UserError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0][:300]}") from None


class OrtPredictor:
    """Wraps an onnxruntime session as a ``torch.Tensor -> torch.Tensor`` callable.

    Inputs are cast to the session's input dtype (float16 models keep float32 I/O by default,
    but one converted without ``keep_io_types`` works too); outputs come back as float32.
    """

    _DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

    def __init__(self, session):
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = self._DTYPES.get(inp.type, np.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy().astype(self.input_dtype, copy=False)
        out = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))
