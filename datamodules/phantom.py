"""Deterministic abdominal phantoms: organ-like classes, small low-contrast lesions, noise.

Each case is rendered from its own generator ``numpy.random.default_rng([seed, case_index])``
with vectorised numpy only, so the same seed gives byte-identical arrays and a case does not
depend on how many cases are generated. What makes the task hard enough that a small network
scores measurably lower Dice than a large one:

* lesions (class ``lesion``) are 1.5-4 voxels in radius, sit inside the liver and differ from
  it by 0.10-0.22 of the raw intensity scale, against noise of sigma 0.10-0.18, so they are
  only separable by integrating over their whole extent; about 1 case in 6 has none;
* liver (1.55) and spleen (1.47) are nearly iso-intense and are told apart by shape and
  position; a smooth multiplicative bias field (+-15 %) moves intensities by more than that
  contrast across the image;
* every organ is an ellipsoid warped by a smooth random field, with random size, rotation,
  position and body zoom; a kidney is missing in ~10 % of cases;
* strong class imbalance: background dominates and lesions are well under 1 % of voxels.

Intensities are z-scored per case. Spacing (z y x, mm) varies per case and is stored with it.
"""
from __future__ import annotations

import os

import numpy as np

CLASS_NAMES = ("background", "liver", "kidney", "spleen", "lesion")
LIVER, KIDNEY, SPLEEN, LESION = 1, 2, 3, 4
# raw intensities per channel: air, body, liver, kidney, spleen; lesions are liver +- contrast
_TISSUE = {
    0: {"air": 0.0, "body": 1.0, LIVER: 1.55, KIDNEY: 1.80, SPLEEN: 1.47, "lesion_sign": -1.0},
    1: {"air": 0.0, "body": 0.60, LIVER: 0.80, KIDNEY: 1.50, SPLEEN: 1.20, "lesion_sign": +1.0},
}

DEFAULTS_2D = {"cases": 40, "shape": (16, 96, 96)}
DEFAULTS_3D = {"cases": 24, "shape": (48, 64, 64)}


def class_names(num_classes: int = 5) -> list[str]:
    """Class names for a phantom with ``num_classes`` labelled classes (2..5)."""
    _check_num_classes(num_classes)
    return list(CLASS_NAMES[:num_classes])


def describe(num_classes: int = 5, in_channels: int = 1, **_ignored) -> dict:
    """What a phantom file with these arguments will contain, without generating it."""
    return {"num_classes": num_classes, "class_names": class_names(num_classes), "in_channels": in_channels,
            "preprocessing": preprocessing_record(in_channels)}


def preprocessing_record(in_channels: int = 1) -> dict:
    """The phantom's record (:mod:`datamodules.preprocess`): rendered on its own grid, every
    channel z-scored per case."""
    from datamodules.preprocess import ChannelNorm, make_record

    names = ["CT-like", "MR-like"][:in_channels]
    return make_record(norms=[ChannelNorm(n, "zscore") for n in names], orientation=None, target_spacing=None,
                       interpolation="linear", source={"kind": "phantom (datamodules.phantom)"})


def _check_num_classes(num_classes: int) -> None:
    if not 2 <= int(num_classes) <= len(CLASS_NAMES):
        raise ValueError(f"phantom: num_classes={num_classes} must be in [2, {len(CLASS_NAMES)}]")


def _interp_matrix(n: int, c: int) -> np.ndarray:
    """(n, c) matrix that linearly upsamples c control points to n samples."""
    pos = np.linspace(0.0, c - 1.0, n)
    i0 = np.minimum(np.floor(pos).astype(int), c - 2) if c > 1 else np.zeros(n, int)
    w = pos - i0
    m = np.zeros((n, c))
    m[np.arange(n), i0] = 1.0 - w if c > 1 else 1.0
    if c > 1:
        m[np.arange(n), i0 + 1] += w
    return m


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: tuple[int, ...]) -> np.ndarray:
    """A smooth random field: normal control points on a coarse grid, linearly upsampled."""
    grid = rng.standard_normal(coarse)
    for axis, (n, c) in enumerate(zip(shape, coarse)):
        grid = np.moveaxis(np.tensordot(_interp_matrix(n, c), grid, axes=([1], [axis])), 0, axis)
    return grid


def _ellipsoid(z, y, x, center, radii, theta, warp) -> np.ndarray:
    dz, dy, dx = z - center[0], y - center[1], x - center[2]
    c, s = np.cos(theta), np.sin(theta)
    ry, rx = c * dy - s * dx, s * dy + c * dx
    return (dz / radii[0]) ** 2 + (ry / radii[1]) ** 2 + (rx / radii[2]) ** 2 < 1.0 + warp


def _blur_inplane(img: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 along y and x of a (D, H, W) volume: partial-volume edges without scipy."""
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (1, 1)
        p, n = np.pad(img, pad, mode="edge"), img.shape[axis]
        img = 0.25 * p.take(range(0, n), axis) + 0.5 * p.take(range(1, n + 1), axis) + 0.25 * p.take(range(2, n + 2), axis)
    return img


def render_case(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    num_classes: int = 5,
    in_channels: int = 1,
    noise_std: tuple[float, float] = (0.10, 0.18),
    lesion_contrast: tuple[float, float] = (0.10, 0.22),
    bias_strength: float = 0.15,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Render one case: image float32 ``[C, D, H, W]``, label uint8 ``[D, H, W]``, spacing."""
    _check_num_classes(num_classes)
    if in_channels not in _TISSUE:
        raise ValueError(f"phantom: in_channels={in_channels} must be 1 or 2")
    d, h, w = shape
    zoom = rng.uniform(0.85, 1.15)
    shift = rng.uniform(-0.08, 0.08, size=2)
    z = np.linspace(-1.0, 1.0, d)[:, None, None]
    y = ((np.linspace(-1.0, 1.0, h) - shift[0]) / zoom)[None, :, None]
    x = ((np.linspace(-1.0, 1.0, w) - shift[1]) / zoom)[None, None, :]
    warp = lambda amp: amp * smooth_field(rng, shape, (3, 4, 4))  # noqa: E731

    body_r = rng.uniform([0.62, 0.80], [0.72, 0.92])
    body = (y / (body_r[0] * (1 + 0.06 * z))) ** 2 + (x / body_r[1]) ** 2 < 1.0 + warp(0.08)
    organs = {
        LIVER: [_ellipsoid(z, y, x, rng.uniform([-0.15, -0.15, -0.42], [0.15, 0.02, -0.30]),
                           rng.uniform([0.60, 0.38, 0.30], [0.85, 0.50, 0.40]), rng.uniform(-0.4, 0.4), warp(0.3))],
        SPLEEN: [_ellipsoid(z, y, x, rng.uniform([-0.2, 0.0, 0.34], [0.2, 0.15, 0.45]),
                            rng.uniform([0.35, 0.16, 0.10], [0.50, 0.24, 0.14]), rng.uniform(-0.5, 0.5), warp(0.3))],
        KIDNEY: [],
    }
    for side in (-1.0, 1.0):
        center = rng.uniform([-0.25, 0.28, 0.22], [0.10, 0.40, 0.30]) * [1, 1, side]
        radii = rng.uniform([0.30, 0.13, 0.08], [0.40, 0.18, 0.11])
        theta, kidney_warp, present = rng.uniform(-0.4, 0.4), warp(0.2), rng.random() > 0.05
        if present:
            organs[KIDNEY].append(_ellipsoid(z, y, x, center, radii, theta, kidney_warp))

    label = np.zeros(shape, np.uint8)
    for cls in (LIVER, KIDNEY, SPLEEN):
        for mask in organs[cls]:
            label[mask & body] = cls
    liver = label == LIVER

    # lesions: small spheres (in voxels) centred on liver voxels, clipped to the liver
    lesion_id = np.zeros(shape, np.int16)
    n_lesions = int(rng.choice([0, 1, 2, 3, 4], p=[0.15, 0.3, 0.25, 0.2, 0.1]))
    liver_idx = np.flatnonzero(liver)
    zz, yy, xx = np.arange(d)[:, None, None], np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    contrasts = rng.uniform(*lesion_contrast, size=4)
    for k in range(n_lesions if liver_idx.size else 0):
        cz, cy, cx = np.unravel_index(liver_idx[rng.integers(liver_idx.size)], shape)
        r, rz = rng.uniform(1.5, 4.5), rng.uniform(0.8, 2.0) * max(1.0, d / 16)
        sphere = ((zz - cz) / rz) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 <= 1.0
        lesion_id[sphere & liver] = k + 1
    lesion = lesion_id > 0
    label[lesion] = LESION

    images = []
    for ch in range(in_channels):
        t = _TISSUE[ch]
        img = np.where(body, t["body"], t["air"]).astype(np.float64)
        texture = 0.04 * smooth_field(rng, shape, (4, 12, 12))
        for cls in (LIVER, KIDNEY, SPLEEN):
            m = label == cls
            img[m] = t[cls] + texture[m]
        for k in range(n_lesions):
            m = lesion_id == k + 1
            img[m] = t[LIVER] + t["lesion_sign"] * contrasts[k] + texture[m]
        img = _blur_inplane(img)
        img *= np.exp(bias_strength * smooth_field(rng, shape, (2, 3, 3)))
        img += rng.standard_normal(shape) * rng.uniform(*noise_std)
        img = (img - img.mean()) / max(img.std(), 1e-6)
        images.append(img.astype(np.float32))

    # classes beyond num_classes stay in the image as unlabelled distractors; lesions fold into liver
    if num_classes <= LESION:
        label[lesion] = LIVER if num_classes > LIVER else 0
        label[label >= num_classes] = 0
    spacing = (round(float(rng.uniform(1.5, 5.0)), 2), *[round(float(rng.uniform(0.6, 1.0)), 3)] * 2)
    return np.stack(images), label, spacing


def iter_phantom_cases(*, cases: int, shape, num_classes: int = 5, seed: int = 0, in_channels: int = 1,
                       unlabelled: int = 0, **render_kwargs):
    """Yield ``(case_id, image, label, spacing)`` for ``cases`` phantoms; the last
    ``unlabelled`` of them with ``label=None`` (stored as unlabelled cases). Case ``i`` is the
    same whatever ``cases`` is, so a file with extra unlabelled cases keeps the labelled ones."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"phantom: shape={list(shape)} must be (D, H, W) with sizes >= 1")
    if not 0 <= int(unlabelled) < int(cases):
        raise ValueError(f"phantom: unlabelled={unlabelled} must be in [0, cases={cases}): at least one case keeps its label")
    for i in range(int(cases)):
        rng = np.random.default_rng([int(seed), i])
        image, label, spacing = render_case(rng, shape, num_classes, in_channels, **render_kwargs)
        yield f"case_{i:04d}", image, None if i >= int(cases) - int(unlabelled) else label, spacing


def generate_phantom_h5(
    path: str,
    *,
    cases: int = DEFAULTS_2D["cases"],
    shape: tuple[int, int, int] | list[int] = DEFAULTS_2D["shape"],
    num_classes: int = 5,
    seed: int = 0,
    in_channels: int = 1,
    compression: str | None = None,
    noise_std: tuple[float, float] = (0.10, 0.18),
    lesion_contrast: tuple[float, float] = (0.10, 0.22),
    bias_strength: float = 0.15,
    unlabelled: int = 0,
) -> str:
    """Generate a phantom dataset and write it atomically to ``path`` (``compressseg-h5``).

    Args:
        path: output file; written under a temporary name and renamed when complete.
        cases: number of cases. Default 40 (the 2D recipe; 24 for 3D).
        shape: ``(D, H, W)`` of every case. Default ``(16, 96, 96)`` (2D: slices along D;
            3D default ``(48, 64, 64)``).
        num_classes: labelled classes including background, 2..5, in the order
            background, liver, kidney, spleen, lesion. Default 5.
        seed: case ``i`` is rendered from ``default_rng([seed, i])``. Default 0.
        in_channels: 1 (CT-like) or 2 (adds an MR-like contrast). Default 1.
        compression: ``None`` (contiguous, memory-mapped at read: fastest), ``"lzf"``, ``"gzip"``.
        noise_std: range of the per-case Gaussian noise sigma (raw intensity units).
        lesion_contrast: range of the lesion-to-liver intensity difference.
        bias_strength: amplitude of the multiplicative bias field (log scale).
        unlabelled: the last ``unlabelled`` cases are written without their labels (for
            distillation on unlabelled images). Default 0.

    Returns:
        ``path``.
    """
    from datamodules.h5io import write_h5

    _check_num_classes(num_classes)
    write_h5(
        os.fspath(path),
        iter_phantom_cases(cases=cases, shape=shape, num_classes=num_classes, seed=seed, in_channels=in_channels,
                           noise_std=tuple(noise_std), lesion_contrast=tuple(lesion_contrast), bias_strength=bias_strength,
                           unlabelled=unlabelled),
        num_classes=num_classes,
        class_names=class_names(num_classes),
        compression=compression,
        preprocessing=preprocessing_record(in_channels),
    )
    return os.fspath(path)
