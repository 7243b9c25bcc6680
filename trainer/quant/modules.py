"""Quantized layers: subclasses of the torch layers that fake-quantize their input and weight.

How a layer becomes quantized: :func:`quantize_layer` changes the *class* of the existing
layer object in place (``layer.__class__ = QuantConv2d``, the mechanism
``torch.nn.utils.parametrize`` uses) and attaches two :class:`TensorQuantizer` submodules,
``input_quant`` and ``weight_quant``. Nothing else changes:

* the object is the same, so optimizers, forward hooks (distillation feature taps) and
  references held by other code stay valid;
* ``weight`` and ``bias`` keep their names, shapes and ``Parameter`` objects, so state dicts
  and Torch-Pruning see an ordinary ``nn.Conv2d`` (every class here subclasses its torch
  layer); the only new state-dict keys are ``<layer>.input_quant.scale`` and
  ``<layer>.weight_quant.scale``;
* the model's ``forward`` is untouched: each layer's own ``forward`` reads
  ``input_quant(x)`` and ``weight_quant(weight)``, which the ONNX exporter writes as
  QuantizeLinear/DequantizeLinear on the layer's two inputs (TensorRT's explicit-quantization
  placement).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.quant.fake_quant import TensorQuantizer, weight_qmax


class QuantLayer:
    """Mixin of the quantized layers. ``FLOAT`` is the torch class it replaces, ``WEIGHT_AXIS``
    the output-channel axis of its weight (ConvTranspose weights are ``[in, out/groups, ...]``)."""

    FLOAT: type[nn.Module]
    WEIGHT_AXIS: int = 0
    input_quant: TensorQuantizer
    weight_quant: TensorQuantizer

    def attach_quantizers(self, name: str, learnable: bool, weight_bits: int = 8) -> None:
        """(Re)create both quantizers with uncalibrated scales sized for the current weight."""
        weight = self.weight  # type: ignore[attr-defined]
        device = weight.device
        self.input_quant = TensorQuantizer("input", learnable=learnable).to(device)
        self.weight_quant = TensorQuantizer(
            "weight", channels=weight.shape[self.WEIGHT_AXIS], axis=self.WEIGHT_AXIS, learnable=learnable,
            weight_bits=weight_bits,
        ).to(device)
        self.input_quant.label = f"{name}.input_quant"
        self.weight_quant.label = f"{name}.weight_quant"

    def quantizers_match(self, learnable: bool, weight_bits: int = 8) -> bool:
        """True when the attached quantizers fit the current weight shape, ``learnable`` and bits."""
        wq = getattr(self, "weight_quant", None)
        iq = getattr(self, "input_quant", None)
        return (
            isinstance(wq, TensorQuantizer) and isinstance(iq, TensorQuantizer)
            and wq.learnable == learnable and iq.learnable == learnable and wq.qmax == weight_qmax(weight_bits)
            and wq.scale.shape[0] == self.weight.shape[self.WEIGHT_AXIS]  # type: ignore[attr-defined]
        )

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight)  # type: ignore[attr-defined]


class _QuantConv(QuantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quant(x), self.quantized_weight(), self.bias)  # type: ignore[attr-defined]


class QuantConv1d(_QuantConv, nn.Conv1d):
    FLOAT = nn.Conv1d


class QuantConv2d(_QuantConv, nn.Conv2d):
    FLOAT = nn.Conv2d


class QuantConv3d(_QuantConv, nn.Conv3d):
    FLOAT = nn.Conv3d


class _QuantConvTranspose(QuantLayer):
    WEIGHT_AXIS = 1
    _DIMS = 0
    _FN = staticmethod(F.conv_transpose2d)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        # Same as torch's ConvTranspose*d.forward, with quantized input and weight.
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            x, output_size, self.stride, self.padding, self.kernel_size, self._DIMS, self.dilation  # type: ignore[attr-defined]
        )
        return self._FN(
            self.input_quant(x), self.quantized_weight(), self.bias,  # type: ignore[attr-defined]
            self.stride, self.padding, output_padding, self.groups, self.dilation,  # type: ignore[attr-defined]
        )


class QuantConvTranspose1d(_QuantConvTranspose, nn.ConvTranspose1d):
    FLOAT = nn.ConvTranspose1d
    _DIMS = 1
    _FN = staticmethod(F.conv_transpose1d)


class QuantConvTranspose2d(_QuantConvTranspose, nn.ConvTranspose2d):
    FLOAT = nn.ConvTranspose2d
    _DIMS = 2
    _FN = staticmethod(F.conv_transpose2d)


class QuantConvTranspose3d(_QuantConvTranspose, nn.ConvTranspose3d):
    FLOAT = nn.ConvTranspose3d
    _DIMS = 3
    _FN = staticmethod(F.conv_transpose3d)


class QuantLinear(QuantLayer, nn.Linear):
    FLOAT = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.quantized_weight(), self.bias)


QUANT_CLASSES: dict[type[nn.Module], type[QuantLayer]] = {
    cls.FLOAT: cls
    for cls in (QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d,
                QuantConvTranspose3d, QuantLinear)
}


def quantize_layer(layer: nn.Module, name: str, learnable: bool, weight_bits: int = 8) -> QuantLayer:
    """Turn ``layer`` (exactly one of the ``QUANT_CLASSES`` keys) into its quantized class in place.

    An already-quantized layer keeps its quantizers when they still fit its weight and
    ``learnable``; otherwise fresh, uncalibrated ones are attached.
    """
    if isinstance(layer, QuantLayer):
        if not layer.quantizers_match(learnable, weight_bits):
            layer.attach_quantizers(name, learnable, weight_bits)
        return layer
    cls = QUANT_CLASSES.get(type(layer))
    if cls is None:
        raise TypeError(f"{name}: {type(layer).__qualname__} has no quantized counterpart")
    layer.__class__ = cls
    layer.attach_quantizers(name, learnable, weight_bits)  # type: ignore[attr-defined]
    return layer  # type: ignore[return-value]


def dequantize_layer(layer: nn.Module) -> nn.Module:
    """Undo :func:`quantize_layer`: the float class again, quantizers removed."""
    if isinstance(layer, QuantLayer):
        del layer.input_quant, layer.weight_quant  # type: ignore[attr-defined]
        layer.__class__ = layer.FLOAT
    return layer
