"""What a network says about its inputs, whoever wrote it.

This framework's nets expose ``spatial_dims``, ``in_channels`` and ``divisor``. Other people's
do not, or under other names: MONAI's ``UNet`` and ``AttentionUnet`` say ``dimensions``,
``BasicUNet`` says nothing, nnU-Net's ``PlainConvUNet`` keeps its strides in its encoder. These
helpers read what is there and fall back to the first convolution (``Conv3d`` -> 3D, its
``in_channels``), so tracing for pruning or a probe input never needs the user to spell out an
input shape the network already implies. The data knows better still: callers that have a
datamodule use its ``patch_size`` and ``in_channels`` first.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


def _first_conv(net: nn.Module) -> nn.Module | None:
    return next((m for m in net.modules() if type(m) in _CONV_DIMS or isinstance(m, nn.modules.conv._ConvNd)), None)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def spatial_dims(net: nn.Module) -> int | None:
    """2 or 3: ``spatial_dims`` or ``dimensions`` attribute, else the first convolution's kind."""
    for attr in ("spatial_dims", "dimensions"):
        if (dims := _int(getattr(net, attr, None))) is not None:
            return dims
    conv = _first_conv(net)
    if conv is None:
        return None
    for cls, dims in _CONV_DIMS.items():
        if isinstance(conv, cls):
            return dims
    return len(getattr(conv, "kernel_size", ())) or None


def in_channels(net: nn.Module) -> int | None:
    """Image channels: ``in_channels`` attribute, else the first convolution's input channels."""
    if (cin := _int(getattr(net, "in_channels", None))) is not None:
        return cin
    conv = _first_conv(net)
    return int(conv.in_channels) if conv is not None else None


def _stride_product(strides: Sequence[Any]) -> int:
    total = 1
    for s in strides:
        total *= max(s) if isinstance(s, (list, tuple)) else int(s)
    return total


def divisor(net: nn.Module, default: int = 16) -> int:
    """Input sizes the network accepts are multiples of this (the product of its downsampling).

    ``divisor`` attribute; MONAI ``UNet``/``AttentionUnet``/``DynUNet``: the product of
    ``strides``; ``SegResNet``: ``2 ** (len(blocks_down) - 1)``; ``BasicUNet``: 16 (four
    poolings); nnU-Net's networks: the product of ``encoder.strides``; else ``default``.
    """
    if (d := _int(getattr(net, "divisor", None))) is not None:
        return d
    name = type(net).__name__
    strides = getattr(net, "strides", None)
    if strides is None:
        strides = getattr(getattr(net, "encoder", None), "strides", None)
    if isinstance(strides, (list, tuple)) and strides:
        return _stride_product(strides)
    if name == "SegResNet" and isinstance(getattr(net, "blocks_down", None), (list, tuple)):
        return 2 ** (len(net.blocks_down) - 1)
    if name == "BasicUNet":
        return 16
    return default



def training_outputs(out, label_dims: int):
    """Deep-supervision outputs as a list, highest resolution first.

    Networks return them as a list (this framework's, nnU-Net's) or, like MONAI's ``DynUNet``,
    stacked on a new axis 1 (``[B, heads, K, *S]``, all upsampled to full size). A tensor with
    two more axes than the label (``[B, *S]``) is such a stack and is split; anything else is
    returned unchanged.
    """
    if isinstance(out, torch.Tensor) and out.dim() == label_dims + 2:
        return list(out.unbind(1))
    return out
