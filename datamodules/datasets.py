"""Map-style datasets indexed by ``(epoch, key)``: training patches and evaluation slices/volumes.

A sample is a pure function of ``(seed, epoch, key)`` and the data, so any worker of any rank
can produce it, and a resumed run reproduces it bit for bit.

Sample dict (batched by :func:`collate`)::

    image    float32 [C, *spatial]
    label    int64   [*spatial]
    index    int     the key: global sample index within the epoch
    case     str     case id
    spacing  float64 [3] (z, y, x mm)

Evaluation samples also carry where they lie in their case, so metrics can rebuild whole
cases from slices and cut the padding off (:mod:`trainer.metrics`)::

    slice    int     z index of a 2D slice, -1 for a whole 3D volume
    depth    int     slices in the case (1 for a volume)
    size     int64   [*spatial] the unpadded size of the image
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.augment import IDENTITY, AugmentConfig, apply_augment, draw_params, read_patch
from datamodules.sampling import STREAM_AUGMENT, STREAM_PATCH, CaseLabels, choose_patch, sample_rng
from datamodules.store import CaseStore, read_region


def _sample(store: CaseStore, case: int, key: int, image: np.ndarray, label: np.ndarray, **where) -> dict:
    return {
        **where,
        "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
        "label": torch.from_numpy(label.astype(np.int64)),
        "index": key,
        "case": store.cases[case].case_id,
        "labelled": store.cases[case].labelled,
        "spacing": torch.from_numpy(np.asarray(store.cases[case].spacing, dtype=np.float64)),
    }


class PatchDataset(Dataset):
    """Training samples: key ``k`` draws a patch from case ``cases[k % len(cases)]``.

    Args:
        store: the case arrays.
        cases: store indices of the training cases.
        labels: per training case, its :class:`CaseLabels` (same order as ``cases``).
        patch_size: ``[H, W]`` (2D: one slice is chosen per sample) or ``[D, H, W]``.
        num_samples: keys per epoch.
        seed: base seed.
        fg_oversample: fraction of the epoch's samples forced onto a foreground voxel.
        augment: augmentation settings.
        fg_class_weights: per class (background at 0), how often a forced sample targets it
            among the classes present in its case; ``None``: uniformly (nnU-Net).
    """

    def __init__(self, store: CaseStore, cases: list[int], labels: list[CaseLabels], patch_size: list[int],
                 num_samples: int, seed: int, fg_oversample: float, augment: AugmentConfig,
                 fg_class_weights: list[float] | None = None):
        self.store, self.cases, self.labels = store, list(cases), labels
        self.patch_size, self.num_samples, self.seed = tuple(patch_size), num_samples, seed
        self.fg_oversample, self.augment = fg_oversample, augment
        self.fg_class_weights = list(fg_class_weights) if fg_class_weights is not None else None
        self._forced: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_samples

    def forced_mask(self, epoch: int) -> np.ndarray:
        """Which keys of ``epoch`` are forced onto foreground: exactly
        ``round(fg_oversample * num_samples)`` of them, spread independently of the case
        assignment (so no case is always or never forced)."""
        if self._forced is None or self._forced[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch, 2**20]).permutation(self.num_samples)
            mask = np.zeros(self.num_samples, bool)
            mask[perm[: int(round(self.fg_oversample * self.num_samples))]] = True
            self._forced = (epoch, mask)
        return self._forced[1]

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, key = item
        slot = key % len(self.cases)
        case = self.cases[slot]
        info = self.store.cases[case]
        rng = sample_rng(self.seed, epoch, key, STREAM_PATCH)
        starts, _ = choose_patch(rng, info.spatial_shape, self.patch_size, self.labels[slot],
                                 bool(self.forced_mask(epoch)[key]), self.fg_class_weights)
        rng = sample_rng(self.seed, epoch, key, STREAM_AUGMENT)
        params = draw_params(rng, self.augment, self.patch_size)
        image, label = read_patch(self.store.image(case), self.store.label(case), starts, self.patch_size, params)
        image, label = apply_augment(image, label, params, rng)
        return _sample(self.store, case, key, image, label)


class EvalDataset(Dataset):
    """Validation/test/predict samples, no augmentation, in a fixed order.

    2D: one full slice per key (all slices of all ``cases``), padded at the bottom/right
    with 0 (image) and 0 (label, background) up to a multiple of ``pad_multiple``.
    3D: one full volume per key, unpadded (the trainer runs sliding-window inference).
    """

    def __init__(self, store: CaseStore, cases: list[int], spatial_dims: int, pad_multiple: int = 1):
        self.store, self.cases, self.spatial_dims = store, list(cases), spatial_dims
        self.pad_multiple = max(1, int(pad_multiple))
        if spatial_dims == 2:
            self.units = [(c, z) for c in self.cases for z in range(store.cases[c].spatial_shape[0])]
        else:
            self.units = [(c, None) for c in self.cases]

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        _, key = item
        case, z = self.units[key]
        image, label = self.store.image(case), self.store.label(case)
        if z is None:
            return _sample(self.store, case, key, read_region(image, (0, 0, 0), image.shape[1:]),
                           read_region(label, (0, 0, 0), label.shape),
                           slice=-1, depth=1, size=torch.tensor(label.shape, dtype=torch.int64))
        depth, h, w = label.shape
        m = self.pad_multiple
        padded = (-(-h // m) * m, -(-w // m) * m)
        img, lab = read_patch(image, label, (z, 0, 0), padded, IDENTITY)
        return _sample(self.store, case, key, img, lab, slice=z, depth=depth, size=torch.tensor([h, w], dtype=torch.int64))

    def case_sizes(self) -> list[int]:
        """Keys per case in key order (2D: its slices; 3D: 1), for sharding by whole cases."""
        sizes: dict[int, int] = {}
        for case, _ in self.units:
            sizes[case] = sizes.get(case, 0) + 1
        return [sizes[c] for c in self.cases]


def _pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) == shape:
        return t
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def collate(samples: list[dict]) -> dict:
    """Stack samples into the batch contract; differently sized 2D evaluation slices are
    zero-padded at the end of each axis to the largest in the batch."""
    img_shape = tuple(max(s["image"].shape[d] for s in samples) for d in range(samples[0]["image"].dim()))
    lab_shape = img_shape[1:]
    where = {}
    for key in ("slice", "depth"):
        if all(key in s for s in samples):
            where[key] = torch.tensor([s[key] for s in samples], dtype=torch.int64)
    if all("size" in s for s in samples):
        where["size"] = torch.stack([s["size"] for s in samples])
    return {
        **where,
        "image": torch.stack([_pad_to(s["image"], img_shape) for s in samples]),
        "label": torch.stack([_pad_to(s["label"], lab_shape) for s in samples]),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "case": [s["case"] for s in samples],
        "labelled": torch.tensor([s["labelled"] for s in samples], dtype=torch.bool),
        "spacing": torch.stack([s["spacing"] for s in samples]),
    }
