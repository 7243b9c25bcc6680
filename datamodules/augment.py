"""Patch reading and augmentation for 2D and 3D, drawn from one seeded generator per sample.

Spatial transforms act on image and label together (the label with nearest-neighbour
interpolation, so its values are never blended); intensity transforms act on the image only.
All parameters come from ``rng`` (seeded by ``(seed, epoch, sample key)``), drawn as a
fixed-length vector first, so a sample's augmentation is reproducible on resume and does not
depend on which branch another sample took.

The small affine (in-plane rotation and isotropic in-plane scaling) is applied by reading the
*source region* of the transformed patch from the case, not by rotating an already cut
patch, so rotated patches have no empty corners away from the volume border (as nnU-Net).
For 3D patches the same in-plane transform applies to every slice, which suits the
anisotropic spacing typical of CT/MR.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.store import read_region


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation probabilities and ranges (see ``SegDataModule`` for the recipe names).

    Every transform is skipped when its probability is 0; ``enabled=False`` skips all.
    """

    enabled: bool = True
    flip_prob: float = 0.5
    rot90_prob: float = 0.5
    affine_prob: float = 0.2
    rotate_deg: float = 15.0
    scale: float = 0.15
    intensity_prob: float = 0.3
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    gamma_prob: float = 0.3
    gamma: float = 0.3
    noise_prob: float = 0.15
    noise_std: float = 0.1

    def validate(self, where: str = "augmentation") -> None:
        from trainer.errors import UserError

        for name in ("flip_prob", "rot90_prob", "affine_prob", "intensity_prob", "gamma_prob", "noise_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{where}: aug_{name}={value} must be a probability in [0, 1]")
        for name in ("rotate_deg", "intensity_scale", "intensity_shift", "gamma", "noise_std"):
            if getattr(self, name) < 0:
                raise UserError(f"{where}: aug_{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.scale < 1:
            raise UserError(f"{where}: aug_scale={self.scale} must be in [0, 1) (zoom range is 1 +- scale)")


@dataclass(frozen=True)
class AugmentParams:
    flips: tuple[bool, ...]  # one per spatial axis of the patch
    rot90: int  # quarter turns in the (y, x) plane
    angle: float  # radians; 0 with scale 1 means no affine
    zoom: float
    intensity: tuple[float, float] | None  # (scale, shift)
    gamma: float | None
    noise_sigma: float | None

    @property
    def affine(self) -> bool:
        return self.angle != 0.0 or self.zoom != 1.0


IDENTITY = AugmentParams((False, False, False), 0, 0.0, 1.0, None, None, None)


def draw_params(rng: np.random.Generator, cfg: AugmentConfig, patch_size) -> AugmentParams:
    """Draw all parameters of one sample (always 15 uniforms, whichever transforms apply)."""
    u = rng.random(15)
    nd = len(patch_size)
    if not cfg.enabled:
        return AugmentParams((False,) * nd, 0, 0.0, 1.0, None, None, None)
    flips = tuple(bool(u[i] < cfg.flip_prob) for i in range(nd))
    rot90 = 0
    if u[3] < cfg.rot90_prob:
        square = patch_size[-1] == patch_size[-2]
        rot90 = 1 + int(u[4] * 3) if square else 2  # non-square patches keep their shape
    angle, zoom = 0.0, 1.0
    if u[5] < cfg.affine_prob:
        angle = math.radians((2 * u[6] - 1) * cfg.rotate_deg)
        zoom = 1.0 + (2 * u[7] - 1) * cfg.scale
    intensity = None
    if u[8] < cfg.intensity_prob:
        intensity = (1.0 + (2 * u[9] - 1) * cfg.intensity_scale, (2 * u[10] - 1) * cfg.intensity_shift)
    gamma = math.exp((2 * u[12] - 1) * math.log1p(cfg.gamma)) if u[11] < cfg.gamma_prob else None
    noise = float(u[13] * cfg.noise_std) if u[14] < cfg.noise_prob else None
    return AugmentParams(flips, rot90, angle, zoom, intensity, gamma, noise)


def read_patch(image, label, starts, patch_size, params: AugmentParams) -> tuple[np.ndarray, np.ndarray]:
    """Read the (possibly affinely transformed) patch at ``starts`` (over D, H, W).

    ``patch_size`` has 2 entries for a 2D sample (one slice ``starts[0]``) or 3 for a 3D patch.
    Returns ``image [C, *patch]`` float32 and ``label [*patch]`` uint8, before flips/rot90.
    """
    depth = 1 if len(patch_size) == 2 else patch_size[0]
    ph, pw = patch_size[-2:]
    if not params.affine:
        sizes = (depth, ph, pw)
        img, lab = read_region(image, starts, sizes), read_region(label, starts, sizes)
    else:
        img, lab = _read_affine(image, label, starts, depth, ph, pw, params.angle, params.zoom)
    if len(patch_size) == 2:
        img, lab = img[:, 0], lab[0]
    return img, lab


def _read_affine(image, label, starts, depth, ph, pw, angle, zoom):
    # output pixel (i, j) samples the source at centre + R(angle) @ ((i, j) - centre_out) / zoom
    cy, cx = (ph - 1) / 2.0, (pw - 1) / 2.0
    src_cy, src_cx = starts[1] + cy, starts[2] + cx
    ii, jj = np.meshgrid(np.arange(ph) - cy, np.arange(pw) - cx, indexing="ij")
    c, s = math.cos(angle) / zoom, math.sin(angle) / zoom
    sy = src_cy + c * ii - s * jj
    sx = src_cx + s * ii + c * jj
    y0, x0 = int(math.floor(sy.min())) - 1, int(math.floor(sx.min())) - 1
    h, w = int(math.ceil(sy.max())) + 2 - y0, int(math.ceil(sx.max())) + 2 - x0
    img = read_region(image, (starts[0], y0, x0), (depth, h, w))
    lab = read_region(label, (starts[0], y0, x0), (depth, h, w))
    # align_corners=True: index 0 -> -1, index n-1 -> +1 (h, w >= 3 by construction)
    grid = np.stack([2.0 * (sx - x0) / (w - 1) - 1.0, 2.0 * (sy - y0) / (h - 1) - 1.0], axis=-1)
    grid_t = torch.from_numpy(grid.astype(np.float32))[None]
    channels = img.shape[0]
    img_t = torch.from_numpy(img.reshape(1, channels * depth, h, w))
    out_img = F.grid_sample(img_t, grid_t, mode="bilinear", padding_mode="zeros", align_corners=True)
    lab_t = torch.from_numpy(lab.astype(np.float32).reshape(1, depth, h, w))
    out_lab = F.grid_sample(lab_t, grid_t, mode="nearest", padding_mode="zeros", align_corners=True)
    return (out_img.numpy().reshape(channels, depth, ph, pw),
            out_lab.numpy().reshape(depth, ph, pw).round().astype(np.uint8))


def apply_augment(img: np.ndarray, lab: np.ndarray, params: AugmentParams, rng: np.random.Generator):
    """Flips and quarter turns (image and label), then intensity transforms (image only).

    ``img`` is ``[C, *spatial]``, ``lab`` is ``[*spatial]``. ``rng`` is the same generator
    ``draw_params`` used; only the noise field is drawn from it here, last.
    """
    nd = lab.ndim
    for axis, flip in enumerate(params.flips[:nd]):
        if flip:
            img, lab = np.flip(img, axis + 1), np.flip(lab, axis)
    if params.rot90:
        img, lab = np.rot90(img, params.rot90, axes=(-2, -1)), np.rot90(lab, params.rot90, axes=(-2, -1))
    img = np.ascontiguousarray(img, dtype=np.float32)
    lab = np.ascontiguousarray(lab)
    if params.intensity is not None:
        scale, shift = params.intensity
        img = img * np.float32(scale) + np.float32(shift)
    if params.gamma is not None:
        lo, hi = float(img.min()), float(img.max())
        if hi > lo:
            img = (((img - lo) / (hi - lo)) ** np.float32(params.gamma) * (hi - lo) + lo).astype(np.float32)
    if params.noise_sigma:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(params.noise_sigma)
    return img, lab
