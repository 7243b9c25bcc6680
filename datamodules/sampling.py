"""Which samples an epoch contains, which rank gets them, and where each patch lies.

Everything here is a pure function of ``(seed, epoch, key)``: the epoch's order is a
permutation drawn from ``(seed, epoch)``; a sample's patch location and augmentation are drawn
from ``(seed, epoch, key)`` where ``key`` is the sample's global index in the epoch. So the
content of a batch does not depend on the number of workers or on where a run was resumed.

The sampler yields ``(epoch, key)`` pairs, not bare keys: the epoch travels with every index
into the workers, so persistent workers and Lightning's own ``set_epoch`` calls both work and
no dataset state has to be synchronised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

from datamodules.schema import check_label_range
from trainer.errors import UserError

# the stream index separates the independent random draws of one sample
STREAM_PATCH, STREAM_AUGMENT = 0, 1


_GENERATORS: dict[int, tuple[np.random.Philox, np.random.Generator]] = {}


def sample_rng(seed: int, epoch: int, key: int, stream: int) -> np.random.Generator:
    """The generator of ``(seed, epoch, key, stream)``: Philox keyed by the seed, with
    ``(stream, key, epoch)`` in the high words of its 256-bit counter.

    Philox is counter-based, so these streams never overlap (a sample draws far fewer than
    2**64 blocks). Rather than constructing a generator per sample (~25 us of seeding), one
    Philox per stream and process is re-positioned by setting its state (~5 us). The returned
    generator is therefore valid until the next ``sample_rng`` call with the same ``stream``
    in this process (datasets run single-threaded in each worker).
    """
    if stream not in _GENERATORS:
        bit_gen = np.random.Philox(key=0)
        _GENERATORS[stream] = (bit_gen, np.random.Generator(bit_gen))
    bit_gen, gen = _GENERATORS[stream]
    bit_gen.state = {
        "bit_generator": "Philox",
        "state": {"counter": np.array([0, stream, key, epoch % 2**64], np.uint64),
                  "key": np.array([seed % 2**64, 0], np.uint64)},
        "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0,
    }
    return gen


def round_train_samples(samples: int, world_size: int, batch_size: int) -> int:
    """Round ``samples`` up so every rank gets the same whole number of full batches."""
    unit = world_size * batch_size
    return max(1, math.ceil(samples / unit)) * unit


class EpochSampler(Sampler):
    """This rank's ``(epoch, key)`` pairs of one epoch of ``num_samples`` keys.

    Training (``shuffle=True``): ``num_samples`` must be a multiple of ``world_size``
    (see :func:`round_train_samples`); the keys are permuted by ``(seed, epoch)`` and rank
    ``r`` takes every ``world_size``-th one from position ``r``, so ranks are disjoint and
    together complete.

    Evaluation (``shuffle=False``): rank ``r`` takes a contiguous block of the keys; blocks
    differ in size by at most one, nothing is padded or duplicated. With ``groups`` (keys per
    case, in key order: the slices of each 2D case) blocks end only between cases, as close to
    the even split as whole cases allow, so every rank scores whole cases (HD95 and per-case
    Dice need the whole volume). A rank left with no key (or no case) is an error.

    Resuming is exact without any sampler state: the sequence is a function of the epoch, so
    ``StatefulDataLoader`` fast-forwards it by the number of indices already consumed.
    """

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, shuffle: bool = True, what: str = "dataset", groups: list[int] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"EpochSampler: rank={rank} not in [0, world_size={world_size})")
        if shuffle and num_samples % world_size:
            raise ValueError(f"EpochSampler: num_samples={num_samples} is not a multiple of world_size={world_size}")
        if num_samples < world_size:
            raise UserError(
                f"{what}: {num_samples} samples cannot be split over {world_size} ranks, rank "
                f"{num_samples} would get no data; add cases, raise val_fraction/test_fraction or use fewer devices"
            )
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.bounds = self._block_bounds(groups, what) if not shuffle else None

    def _block_bounds(self, groups: list[int] | None, what: str) -> list[int]:
        """Start keys of the ranks' evaluation blocks (plus the end)."""
        n, w = self.num_samples, self.world_size
        if groups is None:
            return [r * n // w for r in range(w + 1)]
        if sum(groups) != n:
            raise ValueError(f"EpochSampler: groups sum to {sum(groups)}, not num_samples={n}")
        if len(groups) < w:
            raise UserError(f"{what}: {len(groups)} cases cannot be split over {w} ranks by whole cases, rank "
                            f"{len(groups)} would get no data; add cases, raise val_fraction/test_fraction or use fewer devices")
        starts = np.concatenate([[0], np.cumsum(groups)]).astype(int)  # key where each case starts
        cut = [0]
        for r in range(1, w):  # the case boundary nearest the even split, leaving a case for each later rank
            target = np.argmin(np.abs(starts - r * n / w))
            cut.append(int(min(max(target, cut[-1] + 1), len(groups) - (w - r))))
        cut.append(len(groups))
        return [int(starts[c]) for c in cut]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def keys(self) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng([int(self.seed), int(self.epoch)]).permutation(self.num_samples)
            return order[self.rank :: self.world_size]
        return np.arange(self.bounds[self.rank], self.bounds[self.rank + 1])

    def __iter__(self):
        epoch = self.epoch
        for key in self.keys().tolist():
            yield (epoch, key)

    def __len__(self) -> int:
        if self.shuffle:
            return self.num_samples // self.world_size
        return self.bounds[self.rank + 1] - self.bounds[self.rank]


@dataclass
class CaseLabels:
    """Per-case label statistics: voxel count per class and sampled voxel locations per class."""

    counts: np.ndarray  # int64 [num_classes]
    locations: dict[int, np.ndarray]  # class -> flat indices into [D, H, W], sorted


def scan_labels(label: np.ndarray, num_classes: int, where: str, max_locations: int = 4096) -> CaseLabels:
    """Count classes (checking the range) and keep up to ``max_locations`` evenly spread
    voxel locations per foreground class, as nnU-Net does, for class-balanced crops."""
    label = np.asarray(label)
    check_label_range(label, num_classes, where)
    flat = label.reshape(-1)
    counts = np.bincount(flat, minlength=num_classes).astype(np.int64)
    nz = np.flatnonzero(flat)
    classes = flat[nz]
    order = np.argsort(classes, kind="stable")
    nz, classes = nz[order], classes[order]
    bounds = np.searchsorted(classes, np.arange(num_classes + 1))
    locations = {}
    for c in range(1, num_classes):
        idx = nz[bounds[c] : bounds[c + 1]]
        if idx.size > max_locations:
            idx = idx[np.linspace(0, idx.size - 1, max_locations).astype(np.int64)]
        if idx.size:
            locations[c] = idx
    return CaseLabels(counts, locations)


def forced_foreground(key: int, fraction: float) -> bool:
    """Exactly ``fraction`` of consecutive keys are forced onto foreground (evenly spread)."""
    return math.floor((key + 1) * fraction + 1e-9) > math.floor(key * fraction + 1e-9)


def _start_containing(rng, voxel: int, patch: int, size: int) -> int:
    """A start such that ``voxel`` lies in the central half of the patch where possible."""
    lo, hi = min(0, size - patch), max(0, size - patch)
    a, b = max(lo, voxel - (3 * patch) // 4), min(hi, voxel - patch // 4)
    if a > b:  # cannot keep it central near a border: any start that contains it
        a, b = max(lo, voxel - patch + 1), min(hi, voxel)
    return int(rng.integers(a, b + 1))


def pick_class(present: list[int], class_weights, u: float) -> int:
    """The foreground class a forced crop targets, from one uniform draw ``u`` in [0, 1).

    ``class_weights`` (indexed by class, background at 0) weighs the classes present in the
    case; ``None`` is nnU-Net's uniform choice. A case whose present classes all weigh 0
    falls back to uniform (a forced crop still lands on foreground)."""
    if class_weights is None:
        return present[int(u * len(present))]
    weights = np.array([float(class_weights[c]) for c in present])
    if weights.sum() <= 0:
        return present[int(u * len(present))]
    cumulative = np.cumsum(weights / weights.sum())
    return present[min(int(np.searchsorted(cumulative, u, side="right")), len(present) - 1)]


def choose_patch(rng: np.random.Generator, spatial_shape, patch_size, labels: CaseLabels, force_fg: bool,
                 class_weights=None):
    """Pick a region of ``patch_size`` (the trailing axes) in a case of ``spatial_shape``.

    For 2D (``len(patch_size) == 2``) a slice index along D is chosen as well. Returns
    ``(starts, fg_class)`` with ``starts`` over all three axes (the D start of a 2D sample is
    its slice) and ``fg_class`` the class it was forced onto (0 when not forced or no
    foreground exists). Forced samples pick a present foreground class (uniformly, as
    nnU-Net does, or by ``class_weights``: see :func:`pick_class`), then a voxel of it
    uniformly.
    """
    shape = tuple(int(s) for s in spatial_shape)
    present = sorted(labels.locations)
    draws = rng.random(4)  # fixed number of draws: the stream stays aligned across branches
    if force_fg and present:
        cls = pick_class(present, class_weights, float(draws[0]))
        locs = labels.locations[cls]
        voxel = np.unravel_index(int(locs[int(draws[1] * locs.size)]), shape)
        if len(patch_size) == 2:
            starts = [int(voxel[0])] + [_start_containing(rng, int(v), p, s) for v, p, s in zip(voxel[1:], patch_size, shape[1:])]
        else:
            starts = [_start_containing(rng, int(v), p, s) for v, p, s in zip(voxel, patch_size, shape)]
        return starts, cls
    if len(patch_size) == 2:
        starts = [int(draws[2] * shape[0])]
        dims = zip(patch_size, shape[1:])
    else:
        starts, dims = [], zip(patch_size, shape)
    for p, s in dims:
        lo, hi = min(0, s - p), max(0, s - p)
        starts.append(int(rng.integers(lo, hi + 1)))
    return starts, 0
