"""The phantom generator: deterministic, organ-like content, hard-but-learnable lesions, fast."""
from __future__ import annotations

import time

import h5py
import numpy as np
import pytest

from datamodules import phantom
from datamodules.h5io import iter_h5_cases


def _cases(**kw):
    return list(phantom.iter_phantom_cases(**{"cases": 4, "shape": (8, 48, 48), **kw}))


def test_same_seed_gives_identical_bytes_through_hdf5(tmp_path):
    a = phantom.generate_phantom_h5(tmp_path / "a.h5", cases=3, shape=(4, 32, 32), seed=7)
    b = phantom.generate_phantom_h5(tmp_path / "b.h5", cases=3, shape=(4, 32, 32), seed=7)
    for (ia, xa, ya, sa), (ib, xb, yb, sb) in zip(iter_h5_cases(a), iter_h5_cases(b), strict=True):
        assert ia == ib and sa == sb
        assert xa.tobytes() == xb.tobytes() and ya.tobytes() == yb.tobytes()


def test_other_seed_differs_and_cases_do_not_depend_on_count():
    a, b = _cases(seed=0), _cases(seed=1)
    assert not np.array_equal(a[0][1], b[0][1])
    longer = _cases(seed=0, cases=6)
    for x, y in zip(a, longer[:4]):
        assert x[0] == y[0] and np.array_equal(x[1], y[1]) and np.array_equal(x[2], y[2])


def test_classes_imbalance_and_spacing():
    cases = _cases(cases=8, shape=(16, 96, 96))
    counts = sum(np.bincount(lab.ravel(), minlength=5) for _, _, lab, _ in cases)
    frac = counts / counts.sum()
    assert frac[0] > 0.85  # background dominates
    assert frac[1] > frac[2] and frac[1] > frac[3] > frac[4] > 0  # liver largest, lesions rarest
    assert frac[4] < 0.005
    for _, image, label, spacing in cases:
        assert image.dtype == np.float32 and image.shape == (1, 16, 96, 96)
        assert label.dtype == np.uint8 and label.max() <= 4
        assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1) < 1e-3  # z-scored
    spacings = {c[3] for c in cases}
    assert len(spacings) == len(cases)  # per-case spacing
    assert all(1.5 <= s[0] <= 5.0 and 0.6 <= s[1] == s[2] <= 1.0 for s in spacings)


def test_lesions_are_small_low_contrast_and_inside_the_liver():
    cases = _cases(cases=12, shape=(16, 96, 96))
    with_lesions = 0
    for _, image, label, _ in cases:
        lesion = label == 4
        if not lesion.any():
            continue
        with_lesions += 1
        # every lesion voxel has a liver or lesion neighbour in-plane: lesions sit in the liver
        pad = np.pad(label, ((0, 0), (1, 1), (1, 1)))
        neigh = np.stack([pad[:, 1 + dy: pad.shape[1] - 1 + dy, 1 + dx: pad.shape[2] - 1 + dx]
                          for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))])
        assert np.all(np.isin(neigh[:, lesion], (1, 4)).any(axis=0))
        img = image[0]
        liver, background = img[label == 1].mean(), img[label == 0].mean()
        # lesion/liver contrast is well below liver/background contrast and below the noise
        assert abs(img[lesion].mean() - liver) < 0.5 * abs(liver - background)
    assert with_lesions >= 6  # most cases have lesions
    none = [c for c in _cases(cases=30, shape=(8, 32, 32)) if not (c[2] == 4).any()]
    assert 0 < len(none) < 15  # ... and some have none


def test_fewer_classes_fold_lesions_into_liver():
    for _, _, label, _ in _cases(num_classes=3):
        assert label.max() <= 2
    assert phantom.class_names(3) == ["background", "liver", "kidney"]
    with pytest.raises(ValueError):
        phantom.class_names(6)


def test_default_recipe_data_generates_in_seconds(tmp_path):
    t = time.perf_counter()
    phantom.generate_phantom_h5(tmp_path / "p.h5", **phantom.DEFAULTS_2D)
    phantom.generate_phantom_h5(tmp_path / "q.h5", **phantom.DEFAULTS_3D)
    assert time.perf_counter() - t < 30  # ~1.1 s on an idle 2-core machine
    with h5py.File(tmp_path / "p.h5") as f:
        assert len(f["cases"]) == 40 and f["cases/case_0000/image"].shape == (1, 16, 96, 96)
        assert f["cases/case_0000/image"].chunks is None  # default layout: contiguous, memory-mappable
