"""Tiny synthetic segmentation data and quickly trained U-Nets for the export tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.models import UNet


def synthetic(n: int, dims: int, size: int, num_classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with boxes (class 1) and balls (class 2) of different brightness, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.arange(size)] * dims, indexing="ij")
    label = torch.zeros((n,) + (size,) * dims, dtype=torch.int64)
    for i in range(n):
        for k in range(1, num_classes):
            for _ in range(2):
                c = torch.randint(3, size - 3, (dims,), generator=gen)
                r = int(torch.randint(2, max(3, size // 5), (1,), generator=gen))
                if k % 2:
                    mask = torch.stack([(g - cc).abs() <= r for g, cc in zip(grids, c)]).all(0)
                else:
                    mask = sum((g - cc).float() ** 2 for g, cc in zip(grids, c)) <= r * r
                label[i][mask] = k
    image = label.float().unsqueeze(1) * 0.8 + 0.3 * torch.randn((n, 1) + (size,) * dims, generator=gen)
    return image, label


def batches(image: torch.Tensor, label: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The datamodule's validation batch contract: ``{"image", "label", ...}``."""
    return [
        {"image": image[i:i + batch_size], "label": label[i:i + batch_size], "case_id": list(range(i, i + batch_size))}
        for i in range(0, len(image), batch_size)
    ]


def train(net: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, steps: int, batch_size: int = 8, seed: int = 0) -> torch.nn.Module:
    """A few Adam steps so logits have real margins (random nets make argmax a coin toss)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(image), (batch_size,))
        loss = F.cross_entropy(net(image[idx]), label[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def unet(dims: int, base: int = 4, depth: int = 2, norm: str = "batch", seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(spatial_dims=dims, in_channels=1, num_classes=3, depth=depth, base_channels=base, norm=norm)
