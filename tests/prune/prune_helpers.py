"""Tiny networks, modules and checkpoints shared by the pruning tests (seconds on 2 cores).

Imported as ``from prune_helpers import ...``; this folder is put on sys.path below.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from trainer.models.unet import UNet  # noqa: E402
from trainer.module import SegmentationModule  # noqa: E402


def unet_kwargs(dims: int = 2, norm: str = "batch", ds: bool = True, base: int = 8, depth: int = 2, classes: int = 3) -> dict:
    kw = dict(spatial_dims=dims, in_channels=1, num_classes=classes, depth=depth, base_channels=base, norm=norm)
    if ds:
        kw.update(deep_supervision=True, ds_levels=1)
    return kw


def tiny_unet(seed: int = 0, **kw) -> UNet:
    torch.manual_seed(seed)
    return UNet(**unet_kwargs(**kw))


def conv_out_channels(net: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in net.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}


class ResidualNet(nn.Module):
    """Conv stem, two residual blocks (adds), a strided conv, ConvTranspose up, concat skip, head."""

    spatial_dims, in_channels, divisor = 2, 1, 2

    def __init__(self, width: int = 16, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.res1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.res2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.fuse = nn.Conv2d(2 * width, width, 3, padding=1)
        self.head = nn.Conv2d(width, classes, 1)
        self.num_classes = classes

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.res1(x))
        x = F.relu(x + self.res2(x))
        y = self.up(F.relu(self.down(x)))
        return self.head(F.relu(self.fuse(torch.cat([y, x], 1))))


class FunctionalMix(nn.Module):
    """A layer Torch-Pruning cannot follow: its weight is used through ``F.conv2d``."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, 1, 1) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.weight)


class UntraceableNet(nn.Module):
    spatial_dims, in_channels, divisor = 2, 1, 1

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.mix = FunctionalMix(8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(self.mix(self.conv(x)))


class Exploding(nn.Module):
    def forward(self, x):
        raise RuntimeError("this layer only runs on Tuesdays")


class CrashingNet(UntraceableNet):
    def __init__(self):
        super().__init__()
        self.mix = nn.Sequential(nn.Conv2d(8, 8, 1), Exploding())


def make_module(net: nn.Module, lr: float = 1e-2, scheduler: bool = False, init_from: str | None = None) -> SegmentationModule:
    def adam(params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)

    def cosine(opt):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6, eta_min=lr / 10)

    return SegmentationModule(net, num_classes=net.num_classes, optimizer=adam,
                              lr_scheduler=cosine if scheduler else None, init_from=init_from)


def framework_checkpoint(path: Path, net: UNet, net_kwargs: dict) -> Path:
    """A checkpoint shaped like ``launch.py fit`` writes (recipe dicts as hparams), holding ``net``."""
    net_kwargs = {**net_kwargs, "num_classes": net.num_classes}  # as `fit` records it (model.num_classes fills it)
    module = SegmentationModule(net, num_classes=net.num_classes)
    hparams = {"net": {"class_path": "trainer.models.UNet", "init_args": dict(net_kwargs)},
               "num_classes": net.num_classes}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, path)
    return path


def trained_unet(steps: int = 12, seed: int = 0, **kw) -> UNet:
    """A UNet fitted for a few Adam steps on tiny blobs, so channels differ in importance."""
    from tinydata import make_sample

    net = tiny_unet(seed=seed, **kw)
    dims = net.spatial_dims
    samples = [make_sample(i, dims, 16, net.num_classes) for i in range(8)]
    image = torch.stack([s["image"] for s in samples])
    label = torch.stack([s["label"] for s in samples])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(steps):
        out = net(image)
        out = out[0] if isinstance(out, list) else out
        loss = F.cross_entropy(out, label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
