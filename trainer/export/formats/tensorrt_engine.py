"""``tensorrt``: a serialized TensorRT engine built from the exported ONNX, plus a per-layer
precision report from the engine inspector.

Written against the documented TensorRT 10 Python API (``Builder``, ``OnnxParser``,
``IBuilderConfig.set_flag``, optimization profiles, ``build_serialized_network``,
``IEngineInspector``, ``execute_async_v3``); TensorRT 11, which removed the FP16/INT8 builder
flags, is handled by building a strongly typed network from an FP16 (or QDQ) ONNX instead.

Precision:
- ``fp16``: TensorRT may pick FP16 kernels wherever it likes (weak typing, TRT 10) except in
  normalization, softmax and reduction layers, which are pinned to FP32
  (``OBEY_PRECISION_CONSTRAINTS``), as ``onnx-fp16`` keeps them; or it runs the graph converted
  to FP16 with norms/softmax kept FP32 (strong typing, TRT 11).
- ``int8``: explicit quantization only. The ONNX must carry QuantizeLinear/DequantizeLinear
  (export a QAT checkpoint). A model without Q/DQ nodes is built as FP16 instead, with a
  warning and ``precision_built: "fp16"`` in the card: implicit INT8 calibration is deprecated
  in TensorRT 10 and removed in 11, and ORT's CPU-placed QDQ (``onnx-int8-cpu``) is not laid
  out for TensorRT's fusions. Conversely a Q/DQ model is INT8 whatever ``--precision`` says:
  TensorRT 10 (weak typing) builds Q/DQ layers only with the INT8 flag, so it is always set for
  them, and the card says ``precision_built: "int8"`` with a note.

The per-layer report comes from the engine inspector attached to an execution context whose
input shape is set (the profile's opt shape): without one, TensorRT leaves the formats and
precisions of a dynamic-shape engine out of the report.

The engine is verified on the GPU against PyTorch (CPU, FP32) on the validation batches,
through CUDA tensors from torch. An engine only runs on the GPU model and TensorRT version
that built it; the card records both.
"""
from __future__ import annotations

import argparse
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch

from trainer.errors import UserError
from trainer.export.card import sha256_file
from trainer.export.onnx_tools import INPUT_NAME, has_quantize_nodes, output_quant_step, simplify_onnx
from trainer.export.registry import BuildContext, BuildResult, ExportFormat, register_format
from trainer.export.verify import Tolerance

PRECISIONS = ("fp16", "int8")
LAYER_REPORT = "engine_layers.json"
FP16_TOLERANCE = Tolerance(atol=1e-2, unit="logit_scale", min_argmax_agreement=0.999)
INT8_TOLERANCE = Tolerance(atol=2.0, unit="quant_step", max_exceed_fraction=1e-3, min_argmax_agreement=0.999)


def profile_shapes(
    shapes: Sequence[Sequence[int]], max_batch: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) input shapes for an optimization profile covering ``shapes``.

    min/max are elementwise over the shapes verification feeds the engine (min batch 1, max
    batch raised to ``max_batch``); opt is the most frequent shape.
    """
    if not shapes:
        raise UserError("tensorrt: no input shapes to build an optimization profile from")
    dims = list(zip(*shapes))
    low = (1, *[min(d) for d in dims[1:]])
    high = (max(max(dims[0]), max_batch or 0), *[max(d) for d in dims[1:]])
    opt = Counter(tuple(s) for s in shapes).most_common(1)[0][0]
    return low, tuple(opt), high


def summarize_layers(info: dict[str, Any]) -> dict[str, Any]:
    """Count engine layers by the precision of their first output (from inspector JSON)."""
    counts: Counter[str] = Counter()
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):  # strings when the engine was not built DETAILED
            counts["unknown"] += 1
            continue
        outputs = layer.get("Outputs") or [{}]
        text = str(outputs[0].get("Format/Datatype", "")).lower()
        kind = next((k for k, keys in _PRECISION_WORDS if any(w in text for w in keys)), "other")
        counts[kind] += 1
    return {"layers": sum(counts.values()), "by_output_precision": dict(sorted(counts.items()))}


_PRECISION_WORDS = (("int8", ("int8",)), ("fp16", ("fp16", "half")), ("fp32", ("fp32", "float")), ("int32", ("int32",)))
# layer types whose FP16 arithmetic costs accuracy (variance, exp-sums, long reductions)
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")


def keep_fp32(network: Any, trt: Any) -> list[str]:
    """Pin normalization, softmax and reduction layers of a weakly typed ``network`` to FP32
    (precision and output types); returns their names. Takes effect with the builder flag
    ``OBEY_PRECISION_CONSTRAINTS``; without it, TensorRT 10 with the FP16 flag may run an
    InstanceNorm's variance in FP16."""
    wanted = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES if hasattr(trt.LayerType, name)}
    names = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in wanted:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        names.append(layer.name)
    return names


def inspect_engine(engine: Any, trt: Any, shape: Sequence[int]) -> dict[str, Any]:
    """The inspector's JSON for ``engine``, seen through an execution context whose input has
    ``shape``: for a dynamic-shape engine the inspector reports formats and precisions only
    then (otherwise every layer's format is missing and the summary counts nothing)."""
    context = engine.create_execution_context()
    context.set_input_shape(INPUT_NAME, tuple(shape))
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


@register_format
@dataclass
class TensorRTEngine(ExportFormat):
    """TensorRT engine for the GPU it is built on.

    Tolerance: FP16 like ``onnx-fp16`` (1e-2 of the logit scale, argmax 99.9%); INT8 like
    ``onnx-int8-cpu`` (99.9% of logits within 2 output quantization steps, argmax 99.9%).

    Args:
        precision: ``fp16`` or ``int8`` (INT8 needs a QDQ ONNX; see module doc). Default fp16.
        workspace_gb: builder workspace memory limit in GiB. Default 4.
        max_batch: largest batch the optimization profile accepts (default: the largest
            batch verification uses; spatial min/max always come from the data).
        onnx: build from this ONNX file (e.g. an ``onnx-qdq`` artifact of the same checkpoint,
            whose Q/DQ placement suits TensorRT) instead of exporting the network. The engine
            is still verified against the checkpoint's PyTorch network.
    """

    precision: str = "fp16"
    workspace_gb: float = 4.0
    max_batch: int | None = None
    onnx: str | None = None

    name = "tensorrt"
    summary = "TensorRT engine (--precision fp16|int8; int8 needs a QDQ/QAT model), needs CUDA"
    filename = "model.engine"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"tensorrt: precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if not self.workspace_gb > 0:
            raise UserError(f"tensorrt: workspace_gb={self.workspace_gb} must be > 0")
        if self.max_batch is not None and self.max_batch < 1:
            raise UserError(f"tensorrt: max_batch={self.max_batch} must be >= 1")
        if self.onnx is not None and not Path(self.onnx).is_file():
            raise UserError(f"tensorrt: onnx={self.onnx} does not exist or is not a file")
        self._built_precision = self.precision

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--precision", choices=PRECISIONS, default="fp16",
                           help="int8 needs Q/DQ nodes in the model (QAT); otherwise fp16 with a warning")
        group.add_argument("--workspace-gb", dest="workspace_gb", type=float, default=4.0)
        group.add_argument("--max-batch", dest="max_batch", type=int, default=None,
                           help="largest batch of the optimization profile (default: from the data)")
        group.add_argument("--onnx", default=None, metavar="PATH",
                           help="build from this ONNX (e.g. an onnx-qdq artifact) instead of exporting the network")

    def check_available(self) -> None:
        try:
            import tensorrt  # noqa: F401
        except Exception as err:  # ImportError, or the PyPI placeholder failing to load its libs
            raise UserError(
                "format 'tensorrt' needs the `tensorrt` Python package (TensorRT >= 10) and a CUDA "
                f"device; `import tensorrt` failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from None
        if not torch.cuda.is_available():
            raise UserError(
                "format 'tensorrt' needs a CUDA device: torch.cuda.is_available() is False "
                "(engines are built for, and verified on, the GPU they will run on)"
            )

    def build(self, ctx: BuildContext) -> BuildResult:
        import tensorrt as trt

        if self.onnx is not None:
            src = ctx.work_dir / "given.onnx"
            before, after = simplify_onnx(self.onnx, src)
        else:
            src, before, after = ctx.simplified_onnx()
        explicit = has_quantize_nodes(src)
        notes = []
        self._built_precision = self.precision
        if self.precision == "fp16" and explicit:
            msg = ("tensorrt: the ONNX carries Q/DQ nodes (explicit quantization), which TensorRT always builds "
                   "in INT8: built INT8 with FP16 elsewhere; export the float checkpoint for an FP16 engine")
            warnings.warn(msg, UserWarning, stacklevel=2)
            notes.append(msg)
            self._built_precision = "int8"
        if self.precision == "int8" and not explicit:
            source = f"--onnx {self.onnx}" if self.onnx else f"the exported {type(ctx.net).__name__}"
            msg = (f"tensorrt: --precision int8 needs Q/DQ nodes (explicit quantization: a QAT checkpoint or "
                   f"an onnx-qdq artifact via --onnx); {source} has none, building FP16 instead")
            warnings.warn(msg, UserWarning, stacklevel=2)
            notes.append(msg)
            self._built_precision = "fp16"
        strongly_typed = not hasattr(trt.BuilderFlag, "FP16")  # TensorRT 11: strong typing only
        onnx_path = src
        if strongly_typed and self._built_precision == "fp16" and not explicit:
            from trainer.export.formats.onnx_fp16 import convert_to_fp16

            onnx_path = ctx.work_dir / "fp16_for_trt.onnx"
            onnx.save(convert_to_fp16(onnx.load(str(src))), str(onnx_path))

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise UserError(f"TensorRT cannot parse the ONNX of {type(ctx.net).__name__}: {errors[0] if errors else 'no error reported'}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gb * (1 << 30)))
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # full inspector report
        fp32_layers: list[str] = []
        if not strongly_typed:
            config.set_flag(trt.BuilderFlag.FP16)
            if explicit:  # Q/DQ layers build only with the INT8 flag (weak typing)
                config.set_flag(trt.BuilderFlag.INT8)
            fp32_layers = keep_fp32(network, trt)
            if fp32_layers:
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        low, opt, high = profile_shapes(ctx.input_shapes, self.max_batch)
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, low, opt, high)
        config.add_optimization_profile(profile)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise UserError(f"TensorRT could not build an engine for {type(ctx.net).__name__} (see the TensorRT log above)")
        artifact = ctx.out_dir / self.filename
        artifact.write_bytes(bytes(serialized))
        engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        info = inspect_engine(engine, trt, opt)
        (ctx.out_dir / LAYER_REPORT).write_text(json.dumps(info, indent=2) + "\n")
        details = {
            "tensorrt": trt.__version__,
            "gpu": torch.cuda.get_device_name(),
            "precision_requested": self.precision,
            "precision_built": self._built_precision,
            "strongly_typed": strongly_typed,
            "explicit_quantization": explicit,
            "source_onnx": {"path": self.onnx, "sha256": sha256_file(self.onnx)} if self.onnx else "exported from the network",
            "profile": {"min": list(low), "opt": list(opt), "max": list(high)},
            "layer_report": LAYER_REPORT,
            "layer_precisions": summarize_layers(info),
            "fp32_constrained_layers": fp32_layers,
            "notes": notes,
        }
        step = output_quant_step(src) if self._built_precision == "int8" else None
        return BuildResult(artifact=artifact, nodes_before=before, nodes_after=after, output_step=step, details=details)

    def tolerance_for(self, result: BuildResult) -> Tolerance:
        return INT8_TOLERANCE if self._built_precision == "int8" else FP16_TOLERANCE

    def predictor(self, artifact: Path, threads: int = 0):
        return TrtPredictor(artifact)


class TrtPredictor:
    """Runs a serialized engine on CUDA tensors: ``[b, C, *S]`` CPU float -> CPU float32."""

    def __init__(self, path: str | Path):
        import tensorrt as trt

        self._trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT cannot deserialize {path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.input = next(n for n in names if mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if mode(n) == trt.TensorIOMode.OUTPUT)
        self.device = torch.device("cuda")

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
        return table[self.engine.get_tensor_dtype(name)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self._torch_dtype(self.input)).contiguous()
        self.context.set_input_shape(self.input, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)),
                          dtype=self._torch_dtype(self.output), device=self.device)
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for input shape {tuple(x.shape)}")
        stream.synchronize()
        return out.float().cpu()
