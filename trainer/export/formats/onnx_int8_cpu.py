"""``onnx-int8-cpu``: statically quantized INT8 ONNX that onnxruntime runs fast on every CPU.

onnxruntime's ``quantize_static`` places Q/DQ pairs where its CPU kernels fuse them into
integer convolutions (~3.4x faster than PyTorch eager FP32 here); a TensorRT-style QDQ graph
would run *slower* on CPU, so this artifact is for onnxruntime CPU only (use ``tensorrt`` for
GPUs). Activations are uint8 per tensor, weights int8 per output channel holding **7-bit**
integers by default: full-range int8 weights overflow the 16-bit pair sums of x86 CPUs without
VNNI (AVX2, AVX-512 without VNNI), so an 8-bit artifact verified on a VNNI machine can be
wrong on the machine it is deployed on (``trainer/export/int8_safety.py``). The choice was
measured, not guessed (``benchmarks/bench_int8_cpu.py``, RESULTS.md): 7-bit weights ran as
fast as 8-bit ones and moved Dice by hundredths of a point; S8S8 saturates like U8S8 on x86
and runs slower; U8U8 is exact and safe but ~2.5x slower. ``weight_type="uint8"`` selects it.

Two sources:
* a float network: scales calibrated by onnxruntime on validation inputs;
* a QAT/PTQ network: its **trained** scales (``trainer/quant/export_ort.py``) placed in
  onnxruntime's fusable layout, verified against the fake-quantized PyTorch model.

Every artifact passes the static overflow check before it is run, on any machine.

Float networks with Instance/GroupNorm (MONAI's, nnU-Net's, this framework's ``norm:
instance``) need two more steps (tested at the default tolerance in
``tests/networks/test_int8_norm_networks.py``): the normalization ops stay in float (quantizing their inputs, outputs and scales only added
error), the convolutions feeding them are equalized per channel first
(``trainer/export/norm_equalize.py``), and if the all-INT8 artifact still misses the tolerance
on the calibration inputs, the layers whose float precision measurably matters are left in
float one by one until it passes (``trainer/export/int8_select.py``; the card lists them).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from trainer.errors import UserError
from trainer.export.calibration import ArrayReader, calibration_arrays
from trainer.export.int8_safety import check_int8_accumulation
from trainer.export import int8_select
from trainer.export.norm_equalize import equalize_for_norms
from trainer.export.onnx_tools import (
    INPUT_NAME, export_onnx, has_quantize_nodes, node_counts, ort_session, output_quant_step, simplify_onnx,
)
from trainer.export.registry import BuildContext, BuildResult, ExportFormat, register_format
from trainer.export.verify import Tolerance, VerificationError

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
QUANT_FORMATS = ("qdq", "qoperator")
WEIGHT_TYPES = ("int8", "uint8")
QUANTIZED_OPS = ("QLinearConv", "QLinearConcat", "ConvInteger", "QuantizeLinear", "DequantizeLinear")
TRAINED = "trained scales (QAT/PTQ checkpoint)"
# norms onnxruntime would quantize; BatchNorm is folded into the convolutions at export
NORM_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")


@register_format
@dataclass
class OnnxInt8Cpu(ExportFormat):
    """Static INT8 for onnxruntime on CPU: calibrated (float nets) or with trained scales (QAT/PTQ nets).

    Tolerance for a float network (defaults, all overridable): 99.9% of logits within 2
    quantization steps of the output, argmax agreement >= 99.9%. The step is the output
    DequantizeLinear's scale. A *max* abs diff of 2 steps is not a sensible INT8 criterion:
    every quantized layer adds rounding noise, so over millions of voxels the worst logit lands
    several steps off even for a well calibrated model (measured on synthetic data: a 2D U-Net
    with 16 base channels had max 2.7 / 99.9th percentile 1.5 steps and 99.99% argmax
    agreement; a tiny one with 4 base channels had 5.0 / 3.3 steps and 99.83% agreement, so it
    fails the defaults; QAT or more channels, not looser thresholds, is the fix).

    With trained scales the reference is the fake-quantized PyTorch model, and the artifact
    differs from it by design where onnxruntime's layout quantizes tensors QAT left in float
    (ConvTranspose outputs, logits) and, for 8-bit trained weights, by re-rounding them to
    7 bits: 99% of logits within 2 steps, argmax >= 99.5%, mean Dice at most 0.3 points below
    the QAT model (measured on the QAT benchmark: 99.87% argmax, -0.15 points).

    Args:
        calibration_batches: validation batches to calibrate on. Default 8. They are also
            verified on (recorded in the card).
        calibration_method: ``minmax``, ``entropy`` or ``percentile``. Default ``minmax``.
        quant_format: ``qdq`` (QuantizeLinear/DequantizeLinear around float ops; onnxruntime
            fuses them) or ``qoperator`` (QLinearConv & co). Default ``qdq``.
        per_channel: per-output-channel weight scales. Default True.
        reduce_range: 7-bit weights (int8 storage). Default True. False gives full-range int8
            weights, which the overflow check refuses (they are wrong on x86 CPUs without VNNI)
            unless ``weight_type="uint8"``.
        weight_type: ``int8`` (u8s8 kernels, fast) or ``uint8`` (u8u8 kernels: 8-bit weights
            that cannot overflow, slower on x86). Default ``int8``.
        windows_per_volume: 3D only: roi-sized calibration windows per volume. Default 2.
        benchmark_runs: timed runs of FP32 and INT8 (1 thread) recorded in the card; 0 skips.
        select_layers: float networks with Instance/Group/LayerNorm: when the all-INT8 artifact
            misses the tolerance on the calibration inputs, leave in float the layers
            measurement says must be. Default True.
        equalize_norms: float networks with Instance/GroupNorm: equalize the channels of the
            convolutions feeding them before calibrating (exact; see ``norm_equalize``). Default True.
    """

    calibration_batches: int = 8
    calibration_method: str = "minmax"
    quant_format: str = "qdq"
    per_channel: bool = True
    reduce_range: bool = True
    weight_type: str = "int8"
    windows_per_volume: int = 2
    benchmark_runs: int = 5
    select_layers: bool = True
    equalize_norms: bool = True

    name = "onnx-int8-cpu"
    summary = "static INT8 ONNX for onnxruntime on CPU (7-bit weights: correct on every CPU), from float or QAT nets"
    filename = "model.onnx"
    tolerance = Tolerance(atol=2.0, unit="quant_step", max_exceed_fraction=1e-3, min_argmax_agreement=0.999)
    # uint8 activations: int8 ones run slower on x86 and saturate alike (onnxruntime shifts them
    # to uint8 for the same kernels; measured in bench_int8_cpu.py). A subclass may change it.
    activation_type: ClassVar[str] = "uint8"
    trained_tolerance = Tolerance(atol=2.0, unit="quant_step", max_exceed_fraction=1e-2, min_argmax_agreement=0.995,
                                  max_dice_drop=0.003)

    def __post_init__(self) -> None:
        if self.calibration_method not in METHODS:
            raise UserError(f"onnx-int8-cpu: calibration_method={self.calibration_method!r} must be one of {', '.join(METHODS)}")
        if self.quant_format not in QUANT_FORMATS:
            raise UserError(f"onnx-int8-cpu: quant_format={self.quant_format!r} must be one of {', '.join(QUANT_FORMATS)}")
        if self.weight_type not in WEIGHT_TYPES:
            raise UserError(f"onnx-int8-cpu: weight_type={self.weight_type!r} must be one of {', '.join(WEIGHT_TYPES)}")
        for key in ("calibration_batches", "windows_per_volume"):
            if getattr(self, key) < 1:
                raise UserError(f"onnx-int8-cpu: {key}={getattr(self, key)} must be >= 1")
        if self.benchmark_runs < 0:
            raise UserError(f"onnx-int8-cpu: benchmark_runs={self.benchmark_runs} must be >= 0")

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--calibration-batches", dest="calibration_batches", type=int, default=8,
                           help="validation batches to calibrate on (default: %(default)s)")
        group.add_argument("--calibration-method", dest="calibration_method", choices=METHODS, default="minmax")
        group.add_argument("--quant-format", dest="quant_format", choices=QUANT_FORMATS, default="qdq")
        group.add_argument("--no-per-channel", dest="per_channel", action="store_false",
                           help="one weight scale per tensor instead of per output channel")
        group.add_argument("--no-reduce-range", dest="reduce_range", action="store_false",
                           help="full-range 8-bit weights (refused with int8 weights: they overflow on x86 CPUs without VNNI)")
        group.add_argument("--weight-type", dest="weight_type", choices=WEIGHT_TYPES, default="int8",
                           help="int8: u8s8 kernels, 7-bit weights (default); uint8: u8u8 kernels, 8-bit weights, slower")
        group.add_argument("--windows-per-volume", dest="windows_per_volume", type=int, default=2,
                           help="3D: roi-sized calibration windows per volume (default: %(default)s)")
        group.add_argument("--benchmark-runs", dest="benchmark_runs", type=int, default=5,
                           help="timed FP32-vs-INT8 runs recorded in the card; 0 skips (default: %(default)s)")
        group.add_argument("--no-select-layers", dest="select_layers", action="store_false",
                           help="quantize every layer even where measurement says it breaks the tolerance")
        group.add_argument("--no-equalize-norms", dest="equalize_norms", action="store_false",
                           help="do not equalize the convolutions feeding Instance/GroupNorm")

    def build(self, ctx: BuildContext) -> BuildResult:
        from trainer.quant.export_ort import trained_overrides

        float_net, grids = self._float_source(ctx)
        if grids:
            src, before = self._export_float(float_net, ctx)
        else:
            src, before, _ = ctx.simplified_onnx()
            if has_quantize_nodes(src):
                raise UserError(
                    f"onnx-int8-cpu quantizes float networks and trainer.quant (QAT/PTQ) networks; {type(ctx.net).__name__} "
                    "exports Q/DQ nodes of its own: use --format onnx-qdq, or tensorrt"
                )
        prepared, preprocess = self._preprocess(src, ctx)
        arrays = calibration_arrays(
            ctx.batches, num_batches=self.calibration_batches, divisor=ctx.meta.divisor,
            roi_size=ctx.meta.roi_size, windows_per_volume=self.windows_per_volume,
        )
        norms = sorted({n for n in node_counts(prepared)["by_op"] if n in NORM_OPS})
        choice: dict[str, Any] = {"op_types": list(int8_select.WEIGHTED) if norms else "onnxruntime's defaults"}
        if norms:
            choice["float_ops"] = norms
        if norms and self.equalize_norms:  # before matching: trained weight scales follow the factors
            equalized = ctx.work_dir / "equalized.onnx"
            choice["norm_equalization"] = equalize_for_norms(prepared, equalized, arrays, INPUT_NAME).to_card()
            prepared = equalized
        # layers are matched on the graph that gets quantized (pre-processing renames tensors)
        trained = (trained_overrides(float_net, grids, prepared, ctx.example, self.weight_type, self.reduce_range)
                   if grids else None)
        quantized, selection = self._quantize_chosen(prepared, arrays, trained, bool(norms), ctx)
        choice.update(selection)
        artifact = ctx.out_dir / self.filename
        _, after = simplify_onnx(quantized, artifact)
        quantized_ops = {op: n for op, n in after["by_op"].items() if op in QUANTIZED_OPS}
        if not quantized_ops:
            raise UserError(f"onnx-int8-cpu: quantize_static left no quantized ops in the graph of {type(ctx.net).__name__}")
        step = output_quant_step(artifact)
        details = {
            "quantizer": "onnxruntime.quantization.quantize_static",
            "source": TRAINED if trained else "float network, scales calibrated on validation inputs",
            "weights": self._weights_text(trained),
            "activations": "uint8 per tensor" + (" (trained scales where QAT quantized)" if trained else ", asymmetric"),
            "quantized_ops": quantized_ops,
            "output_step": step,
            "preprocess": preprocess,
            **choice,
            "calibration": {
                "source": "validation batches (the same ones verification uses)",
                "batches": min(self.calibration_batches, len(ctx.batches)),
                "arrays": len(arrays),
                "shapes": sorted({tuple(a.shape) for a in arrays}),
            },
        }
        if trained:
            details["trained_scales"] = trained.card()
        if self.benchmark_runs:
            details["latency"] = self._benchmark(src, artifact, ctx)
        return BuildResult(artifact=artifact, nodes_before=before, nodes_after=after, output_step=step, details=details)

    def static_checks(self, artifact: Path) -> dict[str, Any]:
        """Refuse an artifact whose integer kernels could overflow on some CPU (any machine can tell)."""
        report = check_int8_accumulation(artifact)
        if not report.ok:
            raise VerificationError(f"onnx-int8-cpu: {report.message()}")
        return {"int8_accumulation": report.to_card()}

    def tolerance_for(self, result: BuildResult) -> Tolerance:
        return self.trained_tolerance if result.details.get("source") == TRAINED else self.tolerance

    def _weights_text(self, trained) -> str:
        if trained is not None:
            return trained.weight_bits + (" per channel" if self.per_channel else "")
        bits = "uint8 (8-bit, zero point 128)" if self.weight_type == "uint8" else (
            "int8 holding 7-bit integers" if self.reduce_range else "int8 (full 8-bit range)")
        return f"{bits}, symmetric, " + ("per channel" if self.per_channel else "per tensor")

    def _float_source(self, ctx: BuildContext):
        """``(net, grids)``: for a QAT/PTQ net its float equivalent and trained grids, else ``(net, {})``."""
        from trainer.quant.calibrate import quant_layers
        from trainer.quant.export_ort import float_equivalent

        if not quant_layers(ctx.net):
            return ctx.net, {}
        if not self.per_channel:
            raise UserError("onnx-int8-cpu: a QAT/PTQ network keeps its per-channel weight scales; drop --no-per-channel")
        return float_equivalent(ctx.net, ctx.example)

    def _export_float(self, net, ctx: BuildContext):
        raw, slim = ctx.work_dir / "trained_raw.onnx", ctx.work_dir / "trained_float.onnx"
        ctx.export_warnings = export_onnx(net, ctx.example, raw, opset=ctx.opset)
        before, _ = simplify_onnx(raw, slim)
        return slim, before

    def _quantize_chosen(self, src: Path, arrays, trained, norms: bool, ctx: BuildContext) -> tuple[Path, dict[str, Any]]:
        """Quantize ``src``. Without Instance/Group/LayerNorm: onnxruntime's default op types, as
        measured in ``bench_int8_cpu.py``. With them: only weighted layers, and those left in
        float chosen by measurement (``int8_select``). Returns the file and its card entries."""
        overrides = trained.overrides if trained else None
        quantized = ctx.work_dir / "int8.onnx"
        if not norms or not self.select_layers:
            self._quantize(src, quantized, arrays, overrides, int8_select.WEIGHTED if norms else None)
            return quantized, {}

        def quantize(dst: Path, left_float) -> None:
            self._quantize(src, dst, arrays, overrides, int8_select.WEIGHTED, left_float)

        tol = _aimed_tolerance(self.trained_tolerance if trained else self.tolerance, ctx.tolerance)
        # scored where verification looks: the calibration inputs and the shape probe
        scored = list(arrays) + ([ctx.probe.numpy()] if ctx.probe is not None else [])
        with torch.no_grad():
            reference = [ctx.net(torch.from_numpy(a)).numpy() for a in scored]
        path, selection = int8_select.select_layers(src, scored, reference, tol, quantize, ctx.work_dir)
        if not selection.final.passes(tol) or len(selection.left_float) == selection.weighted_layers:
            first, final = selection.first, selection.final
            advice = ("the QAT model's own activation quantization is part of the reference; the float-calibrated "
                      "artifact of its float checkpoint, or onnx-qdq, may fit" if trained else
                      "export onnx, or train with QAT and export its trained scales")
            raise UserError(f"onnx-int8-cpu: {type(ctx.net).__name__} misses the INT8 tolerance on the calibration inputs "
                            f"unless all its {selection.weighted_layers} weighted layers stay in float (all INT8: argmax "
                            f"agreement {first.argmax_agreement:.4%}, logits beyond {tol.atol:g} steps {first.exceed_fraction:.3%}; "
                            f"all float: {final.argmax_agreement:.4%}, {final.exceed_fraction:.3%}); {advice}")
        if len(selection.left_float) * 2 > selection.weighted_layers:
            log.warning("onnx-int8-cpu: %d of %d weighted layers stay in float to meet the tolerance; expect little speed-up",
                        len(selection.left_float), selection.weighted_layers)
        return path, {"layer_selection": selection.to_card()}

    def _quantize(self, src: Path, dst: Path, arrays, overrides, op_types=None, left_float=()) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        extra = {"TensorQuantOverrides": overrides} if overrides else None
        quantize_static(
            str(src), str(dst), ArrayReader(INPUT_NAME, arrays),
            op_types_to_quantize=list(op_types) if op_types else None,
            nodes_to_exclude=list(left_float) or None,
            quant_format=QuantFormat.QDQ if self.quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=self.per_channel,
            reduce_range=self.reduce_range and self.weight_type == "int8",
            activation_type=QuantType.QUInt8 if self.activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QUInt8 if self.weight_type == "uint8" else QuantType.QInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[self.calibration_method],
            extra_options=extra,
            # No CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMax calibrator *discards*
            # each full chunk without reducing it, and raises "No data is collected" when the
            # number of calibration arrays is a multiple of the chunk size.
        )

    def _preprocess(self, src, ctx: BuildContext):
        """onnxruntime's recommended pre-processing (ONNX shape inference + basic fusions).

        Symbolic shape inference is skipped: it cannot resolve ConvTranspose output sizes
        from symbolic spatial dims and aborts on these graphs.
        """
        from onnxruntime.quantization.shape_inference import quant_pre_process

        out = ctx.work_dir / "preprocessed.onnx"
        try:
            quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
        except Exception as err:  # pre-processing is an optimisation; quantize without it
            log.warning("onnx-int8-cpu: quant_pre_process failed (%s); quantizing the simplified graph", err)
            return src, f"skipped: {str(err).splitlines()[0][:200]}"
        return out, f"quant_pre_process (skip_symbolic_shape) -> {node_counts(out)['total']} nodes"

    def _benchmark(self, fp32_path, int8_path, ctx: BuildContext) -> dict:
        """Median single-thread latency of FP32 vs INT8 on the traced example input."""
        x = {INPUT_NAME: ctx.example.numpy()}
        times = {}
        for key, path in (("fp32_onnx_ms", fp32_path), ("int8_ms", int8_path)):
            sess = ort_session(path, threads=1)
            sess.run(None, x)  # warm-up: first run allocates and picks kernels
            runs = []
            for _ in range(self.benchmark_runs):
                t0 = time.perf_counter()
                sess.run(None, x)
                runs.append((time.perf_counter() - t0) * 1e3)
            times[key] = round(statistics.median(runs), 3)
        speedup = times["fp32_onnx_ms"] / max(times["int8_ms"], 1e-9)
        if speedup < 1.0:
            log.warning("onnx-int8-cpu: INT8 ran %.2fx the speed of FP32 on %s (tiny models are overhead-bound)",
                        speedup, list(ctx.example.shape))
        return {**times, "speedup": round(speedup, 3), "threads": 1, "input_shape": list(ctx.example.shape),
                "runs": self.benchmark_runs}



def _aimed_tolerance(default: Tolerance, given) -> Tolerance:
    """The tolerance verification will apply to a float network's artifact (user overrides in)."""
    if isinstance(given, Tolerance):
        return given
    return dataclasses.replace(default, **dict(given or {}))
