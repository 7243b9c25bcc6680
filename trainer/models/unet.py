"""A U-Net parameterised by ``spatial_dims`` so 2D slices and 3D volumes share one implementation.

The layout is deliberately plain (conv-norm-ReLU blocks, strided-conv downsampling,
ConvTranspose upsampling, skip concatenation) because every compression technique in this
framework must handle it: Torch-Pruning follows the concatenations, the QAT quantizer covers
Conv and ConvTranspose, and the ONNX exporter sees only standard ops.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {
    "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "instance": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
}


def _norm(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "instance":
        # affine=True so the norm has a per-channel scale that pruning criteria can read.
        return _NORM[kind][dims](channels, affine=True)
    return _NORM[kind][dims](channels)


class ConvBlock(nn.Sequential):
    """Two (conv -> norm -> ReLU) layers; the first may downsample with ``stride``."""

    def __init__(self, dims: int, cin: int, cout: int, norm: str, stride: int = 1):
        conv = _CONV[dims]
        super().__init__(
            conv(cin, cout, 3, stride=stride, padding=1, bias=False),
            _norm(norm, dims, cout),
            nn.ReLU(inplace=True),
            conv(cout, cout, 3, padding=1, bias=False),
            _norm(norm, dims, cout),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """ConvTranspose x2 upsampling, concatenation with the skip, then a ConvBlock."""

    def __init__(self, dims: int, cin: int, cskip: int, cout: int, norm: str):
        super().__init__()
        self.up = _CONV_T[dims](cin, cout, kernel_size=2, stride=2)
        self.block = ConvBlock(dims, cout + cskip, cout, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """Encoder-decoder segmentation network for 2D or 3D inputs.

    Args:
        spatial_dims: 2 for slices ``[B, C, H, W]``, 3 for volumes ``[B, C, D, H, W]``.
        in_channels: image channels (modalities). Default 1.
        num_classes: output channels, background included. Default 5.
        depth: number of downsampling steps; inputs must be divisible by ``2**depth``
            (sliding-window inference pads for you). Default 4.
        base_channels: channels of the first level; level ``i`` has ``base * 2**i``. Default 32.
        max_channels: cap on channels per level (keeps 3D nets affordable). Default 320.
        norm: ``"batch"`` or ``"instance"``. Default ``"batch"``.
        deep_supervision: in training mode also return lower-resolution logits from the
            decoder (highest resolution first). Eval/export always returns one tensor.
        ds_levels: how many extra lower-resolution outputs deep supervision adds. Default 2.

    Example:
        >>> net = UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4).eval()
        >>> net(torch.zeros(1, 1, 16, 16)).shape
        torch.Size([1, 3, 16, 16])
    """

    def __init__(
        self,
        spatial_dims: Literal[2, 3] = 2,
        in_channels: int = 1,
        num_classes: int = 5,
        depth: int = 4,
        base_channels: int = 32,
        max_channels: int = 320,
        norm: Literal["batch", "instance"] = "batch",
        deep_supervision: bool = False,
        ds_levels: int = 2,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"UNet: spatial_dims={spatial_dims!r} must be 2 or 3")
        if norm not in _NORM:
            raise ValueError(f"UNet: norm={norm!r} must be one of {sorted(_NORM)}")
        if depth < 1 or base_channels < 1 or in_channels < 1 or num_classes < 2:
            raise ValueError(
                f"UNet: need depth>=1, base_channels>=1, in_channels>=1, num_classes>=2; got "
                f"depth={depth}, base_channels={base_channels}, in_channels={in_channels}, "
                f"num_classes={num_classes}"
            )
        if deep_supervision and not 1 <= ds_levels < depth:
            raise ValueError(f"UNet: ds_levels={ds_levels} must be in [1, depth={depth})")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        self.deep_supervision = deep_supervision
        chans = [min(base_channels * 2**i, max_channels) for i in range(depth + 1)]
        self.encoders = nn.ModuleList(
            [ConvBlock(spatial_dims, in_channels, chans[0], norm)]
            + [ConvBlock(spatial_dims, chans[i - 1], chans[i], norm, stride=2) for i in range(1, depth + 1)]
        )
        # decoders[j] goes from level depth-j to level depth-j-1
        self.decoders = nn.ModuleList(
            [UpBlock(spatial_dims, chans[i + 1], chans[i], chans[i], norm) for i in reversed(range(depth))]
        )
        conv = _CONV[spatial_dims]
        self.head = conv(chans[0], num_classes, 1)
        # ds_heads[k] reads the decoder output k+1 levels above full resolution
        self.ds_heads = nn.ModuleList(
            [conv(chans[k + 1], num_classes, 1) for k in range(ds_levels)] if deep_supervision else []
        )

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        x = skips.pop()
        decoded = []
        for dec in self.decoders:
            x = dec(x, skips.pop())
            decoded.append(x)
        logits = self.head(x)
        if not (self.training and self.deep_supervision):
            return logits
        # decoded[-1] is full resolution, decoded[-2] half, ...
        extra = [head(decoded[-2 - k]) for k, head in enumerate(self.ds_heads)]
        return [logits, *extra]
