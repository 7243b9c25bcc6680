"""Symmetric int8 fake quantization with zero-point 0, on torch's fake-quantize primitives.

The numbers (TensorRT's explicit-quantization convention, which ONNX QDQ carries)::

    q  = clamp(round_half_to_even(x / s), qmin, 127)      x_hat = q * s      s = amax / 127

* activations: ``qmin = -128`` (ONNX ``QuantizeLinear`` saturates int8 to [-128, 127];
  TensorRT quantizes activations to the same range), one scale per tensor;
* weights: ``qmin = -127`` (TensorRT takes INT8 weights in [-127, 127]), one scale per
  output channel. -128 is never produced, so the grid is exactly symmetric. With 7-bit
  weights (``weight_bits=7``) the grid is [-63, 63] and ``s = amax / 63``: what onnxruntime's
  x86 CPUs without VNNI can multiply without overflowing (``trainer/export/int8_safety.py``),
  so a CPU artifact keeps the trained weights exactly.

Gradients:

* straight-through estimator: ``d x_hat / d x = 1`` where ``qmin <= round(x / s) <= 127``
  and 0 outside the clip range (torch's fake-quantize backward);
* learnable scales (LSQ, Esser et al., "Learned Step Size Quantization", ICLR 2020):
  ``d x_hat / d s = round(x / s) - x / s`` inside the range, ``qmin`` or ``127`` outside,
  multiplied by the gradient scale ``g = 1 / sqrt(N * 127)`` where ``N`` is the number of
  elements sharing the scale (weights: the elements of one output channel; activations: the
  elements of the batch tensor). Torch's ``_fake_quantize_learnable_*`` ops implement both.

A :class:`TensorQuantizer` holds one tensor's scale (a buffer, or a parameter when learnable)
and switches between three behaviours: pass-through until calibrated, observing during
calibration, fake-quantizing afterwards.

Which op computes it: torch's ``fake_quantize_per_{tensor,channel}_affine`` on CUDA and during
ONNX export (the exporter writes them as QuantizeLinear/DequantizeLinear pairs), torch's
``_fake_quantize_learnable_*`` for learnable scales, and on CPU with fixed scales the same
formula as a few vectorised tensor ops (bitwise equal to torch's op, see
``_FixedScaleFakeQuant``), because torch's CPU kernel is scalar and slow.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from trainer.errors import UserError

QMAX = 127
ACT_QMIN = -128
WEIGHT_QMIN = -127
# ONNX requires scales > 0; a channel whose weights are all zero gets this tiny scale (its
# values quantize to 0 either way).
MIN_SCALE = 1e-12

Kind = Literal["weight", "input"]


WEIGHT_BITS = (8, 7)


def weight_qmax(bits: int) -> int:
    """Largest weight integer of a symmetric ``bits``-bit grid: 127 for 8, 63 for 7."""
    if bits not in WEIGHT_BITS:
        raise UserError(f"weight_bits={bits!r} must be one of {', '.join(map(str, WEIGHT_BITS))}")
    return 2 ** (bits - 1) - 1


def scale_from_amax(amax: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """``amax / qmax`` with a floor so no scale is zero."""
    return (amax.float() / qmax).clamp_min(MIN_SCALE)


def lsq_grad_factor(elements_per_scale: int, qmax: int = QMAX) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * Qp)``."""
    return 1.0 / math.sqrt(max(1, elements_per_scale) * qmax)


class _FixedScaleFakeQuant(torch.autograd.Function):
    """``clamp(round(x / s), qmin, qmax) * s`` with the straight-through gradient, as tensor ops.

    The same numbers as torch's fake-quantize ops with zero-point 0 (it multiplies by the
    float32 reciprocal ``1 / s`` and rounds half to even exactly like them; checked bitwise in
    ``tests/quant/test_fake_quant.py``). Used for fixed scales on CPU only: torch's CPU kernel
    of these ops is scalar, measured ~5x slower than this on a [8, 16, 96, 96] activation,
    which by itself made a QAT step ~1.4x an FP32 step. CUDA and ONNX export use torch's op.

    Cost (these ops are memory-bound, and comparisons writing bool tensors are the slowest of
    them): one ``aminmax`` pass tells whether anything lies outside the range. Usually nothing
    does (weights whose scale was just set from their max; activations below the calibrated
    range): then there is no clamp, no mask and the backward passes the gradient through
    untouched. Otherwise the clipped values get zero gradient through ``torch.where``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        q = torch.mul(x, torch.reciprocal(scale)).round_()
        low, high = torch.aminmax(q)
        if low >= qmin and high <= qmax:  # nothing clipped: the gradient passes everywhere
            ctx.clipped = False
            return q.mul_(scale)
        clamped = q.clamp(qmin, qmax)
        ctx.clipped = True
        ctx.save_for_backward(clamped.ne(q))
        return clamped.mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.clipped:
            return grad, None, None, None
        (outside,) = ctx.saved_tensors
        return torch.where(outside, 0.0, grad), None, None, None


def _use_tensor_ops(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing()


def fake_quant_per_tensor(
    x: torch.Tensor, scale: torch.Tensor, qmin: int = ACT_QMIN, grad_factor: float | None = None
) -> torch.Tensor:
    """Fake-quantize ``x`` with one scale (a 0-d tensor).

    With ``grad_factor`` (LSQ) the scale receives a gradient; otherwise it is treated as a
    constant and only ``x`` gets the straight-through gradient.
    """
    dtype = x.dtype
    # The kernels take float32 values and scales. Half/bf16 reach here under bf16-mixed
    # autocast, and scales too once a DeepSpeed or `*-true` precision has cast the module
    # (torch's CUDA kernels reject a half scale); results go back to the input's dtype.
    if dtype != torch.float32:
        x = x.float()
    if grad_factor is not None:
        zero = torch.zeros(1, device=x.device, dtype=torch.float32)  # `*-true` precisions change the default dtype
        out = torch._fake_quantize_learnable_per_tensor_affine(x, scale.float().reshape(1), zero, qmin, QMAX, grad_factor)
    elif _use_tensor_ops(x):
        out = _FixedScaleFakeQuant.apply(x, scale.detach().float(), qmin, QMAX)
    else:
        zero = torch.zeros((), dtype=torch.int32, device=x.device)
        out = torch.fake_quantize_per_tensor_affine(x, scale.detach().float(), zero, qmin, QMAX)
    return out if dtype == torch.float32 else out.to(dtype)


def fake_quant_per_channel(
    w: torch.Tensor, scale: torch.Tensor, axis: int, qmin: int = WEIGHT_QMIN, grad_factor: float | None = None,
    qmax: int = QMAX,
) -> torch.Tensor:
    """Fake-quantize ``w`` with one scale per slice along ``axis`` (``scale``: ``[w.shape[axis]]``)."""
    dtype = w.dtype
    if dtype != torch.float32:
        w = w.float()
    if grad_factor is not None:
        zero = torch.zeros_like(scale, dtype=torch.float32)
        out = torch._fake_quantize_learnable_per_channel_affine(w, scale.float(), zero, axis, qmin, qmax, grad_factor)
    elif _use_tensor_ops(w):
        shape = [1] * w.dim()
        shape[axis] = -1
        out = _FixedScaleFakeQuant.apply(w, scale.detach().float().reshape(shape), qmin, qmax)
    else:
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
        out = torch.fake_quantize_per_channel_affine(w, scale.detach().float(), zero, axis, qmin, qmax)
    return out if dtype == torch.float32 else out.to(dtype)


def channel_amax(w: torch.Tensor, axis: int) -> torch.Tensor:
    """``max |w|`` of every slice along ``axis``: the per-channel weight range."""
    dims = [d for d in range(w.dim()) if d != axis]
    return w.detach().abs().amax(dim=dims) if dims else w.detach().abs()


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor: a layer's weight (per channel) or its input (per tensor).

    The scale is the only state in the ``state_dict`` (key ``<layer>.<weight|input>_quant.scale``;
    shape ``[channels]`` for weights, ``[]`` for inputs). A scale of 0 means "not calibrated":
    the quantizer then passes values through unchanged, and loading a state dict with
    positive scales enables it.

    Args:
        kind: ``"weight"`` (per channel along ``axis``, range [-127, 127], or [-63, 63] with
            ``weight_bits=7``) or ``"input"`` (per tensor, range [-128, 127]).
        channels: number of weight channels (``weight.shape[axis]``); ignored for inputs.
        axis: the weight's output-channel axis (0 for Conv/Linear, 1 for ConvTranspose).
        learnable: LSQ scale (an ``nn.Parameter``) instead of a buffer.
        weight_bits: 8 or 7, weights only.
    """

    def __init__(self, kind: Kind, channels: int | None = None, axis: int | None = None, learnable: bool = False,
                 weight_bits: int = 8):
        super().__init__()
        if kind not in ("weight", "input"):
            raise ValueError(f"TensorQuantizer: kind={kind!r} must be 'weight' or 'input'")
        if kind == "weight" and (channels is None or axis is None):
            raise ValueError("TensorQuantizer: a weight quantizer needs channels and axis")
        self.kind = kind
        self.axis = axis if kind == "weight" else None
        self.qmax = weight_qmax(weight_bits) if kind == "weight" else QMAX
        self.qmin = -self.qmax if kind == "weight" else ACT_QMIN
        self.learnable = learnable
        scale = torch.zeros((channels,) if kind == "weight" else ())
        if learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.enabled = False  # becomes True once calibrated or loaded with positive scales
        self.frozen = False  # ranges frozen: no scale gradient, no weight-range refresh
        self.observer: Any = None  # set by calibration; while set, values are observed, not quantized
        self.label = kind  # filled in with the layer's path by the converter, for messages

    def extra_repr(self) -> str:
        per = f"per-channel axis={self.axis}" if self.kind == "weight" else "per-tensor"
        return f"{self.kind}, {per}, range=[{self.qmin}, {self.qmax}], learnable={self.learnable}, enabled={self.enabled}"

    def set_amax(self, amax: torch.Tensor) -> None:
        """Set the scale from a range (``amax / qmax``) and enable quantization."""
        with torch.no_grad():
            self.scale.copy_(scale_from_amax(amax, self.qmax).to(self.scale.device).reshape(self.scale.shape))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x.detach())
            return x
        if not self.enabled:
            if torch.onnx.is_in_onnx_export():
                raise UserError(f"{self.label}: quantizer is not calibrated; run calibration (QAT or "
                                "`launch.py quantize`) before exporting onnx-qdq")
            return x
        return self._quantize(x)

    def effective_scale(self) -> torch.Tensor:
        """The scale used: learnable scales are kept positive (``|s|`` floored at MIN_SCALE),
        as torch's own learnable fake-quantize does; an optimizer step may overshoot zero."""
        if self.learnable and not torch.onnx.is_in_onnx_export():
            return self.scale.abs().clamp_min(MIN_SCALE)
        return self.scale  # export: positive by construction (see export_qdq.bake_for_export)

    def project_scale(self) -> None:
        """Store the effective scale (after an optimizer step), so checkpoints hold it."""
        with torch.no_grad():
            self.scale.abs_().clamp_(min=MIN_SCALE)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        exporting = torch.onnx.is_in_onnx_export()
        learn = self.learnable and not self.frozen and not exporting and torch.is_grad_enabled()
        scale = self.effective_scale()
        if self.kind == "input":
            factor = lsq_grad_factor(x.numel()) if learn else None
            return fake_quant_per_tensor(x, scale, self.qmin, factor)
        factor = lsq_grad_factor(x.numel() // max(1, x.shape[self.axis]), self.qmax) if learn else None
        # The legacy ONNX exporter only accepts the range [-128, 127]; export_qdq clamps the
        # weights to +-qmax steps first, so the exported Q yields exactly the trained integers.
        qmin, qmax = (ACT_QMIN, QMAX) if exporting else (self.qmin, self.qmax)
        return fake_quant_per_channel(x, scale, self.axis, qmin, factor, qmax)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        loaded = state_dict.get(prefix + "scale")
        if isinstance(loaded, torch.Tensor) and loaded.shape == self.scale.shape:
            self.enabled = bool((loaded > 0).all())
