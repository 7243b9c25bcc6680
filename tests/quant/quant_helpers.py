"""Tiny networks and data for the quantization tests (seconds on 2 cores)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models import UNet


def tiny_unet(dims: int = 2, base: int = 4, depth: int = 2, seed: int = 0, **kw) -> UNet:
    torch.manual_seed(seed)
    return UNet(spatial_dims=dims, in_channels=1, num_classes=3, depth=depth, base_channels=base, **kw)


def blobs(n: int, dims: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose label (0/1/2) is readable from brightness: easy to fit in a few steps."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * dims, indexing="ij")
    label = torch.zeros((n,) + (size,) * dims, dtype=torch.long)
    for i in range(n):
        for cls in (1, 2):
            c = torch.rand(dims, generator=g) * size * 0.6 + size * 0.2
            r = size * (0.3 - 0.08 * cls)
            label[i][sum((gr - cc) ** 2 for gr, cc in zip(grids, c)) < r * r] = cls
    image = label.float().unsqueeze(1) * 0.7 + 0.2 * torch.randn((n, 1) + (size,) * dims, generator=g)
    return image, label


def fit_quickly(net: nn.Module, image: torch.Tensor, label: torch.Tensor, steps: int = 60, lr: float = 0.02) -> nn.Module:
    """A few Adam steps so logits have margins (an untrained net makes argmax a coin toss)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(image), (4,))
        loss = F.cross_entropy(net(image[idx]), label[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
