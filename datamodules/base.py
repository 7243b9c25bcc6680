"""``SegDataModule``: everything that does not depend on the file format.

Splitting by case, the per-epoch sample plan, distributed sampling, augmentation settings and
the DataLoaders live here; a format subclass (:mod:`datamodules.hdf5`,
:mod:`datamodules.tfrecord`) only says how to read a header, how to prepare the files (index,
node cache) and how to open a :class:`~datamodules.store.CaseStore`.

What the design requires from the Trainer:

* ``use_distributed_sampler=False``: the datamodule shards by rank itself (checked).
* Nothing else: no ``reload_dataloaders_every_n_epochs``. ``train_dataloader()`` builds the
  sampler for ``trainer.current_epoch`` (correct on resume, when Lightning restores the loader
  before it sets the epoch), the sampler's ``set_epoch`` (which Lightning calls every epoch)
  moves it on, and every index carries its epoch into the workers.
* Mid-epoch resume is exact through torchdata's ``StatefulDataLoader`` (Lightning stores its
  state in the checkpoint): the sampler is a pure function of ``(seed, epoch)`` and a sample of
  ``(seed, epoch, key)``, so fast-forwarding reproduces the remaining batches bit for bit,
  for any ``num_workers``.
* Validation ranks may get one batch fewer than others (no duplicated samples): reduce
  metrics at epoch end (torchmetrics), not with per-step ``sync_dist``.
* Loader workers are shielded from the cluster's USR1/TERM (Slurm signals every process of a
  job step): they keep serving batches and the main process checkpoints at its next safe point
  (``trainer/requeue_signals.py``).
"""
from __future__ import annotations

import inspect
import math
import os
import warnings
from typing import Literal

import lightning.pytorch as L
import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from datamodules import phantom
from datamodules.augment import AugmentConfig
from datamodules.datasets import EvalDataset, PatchDataset, collate
from datamodules.sampling import CaseLabels, EpochSampler, round_train_samples, scan_labels
from datamodules.schema import DatasetHeader
from datamodules.store import CaseStore
from trainer.errors import UserError
from trainer.requeue_signals import shield_loader_kwargs

CACHE_MODES = ("auto", "always", "never")


def _check_arguments(name: str, *, spatial_dims, patch_size, pad_multiple, batch_size, samples_per_epoch,
                     val_batch_size, num_workers, val_fraction, test_fraction, fg_oversample, cache, generate) -> None:
    """Reject bad constructor arguments up front, naming the value and what is allowed."""
    if spatial_dims not in (2, 3):
        raise UserError(f"{name}: spatial_dims={spatial_dims!r} must be 2 or 3")
    if len(patch_size) != spatial_dims or min(patch_size) < 1:
        raise UserError(f"{name}: patch_size={patch_size} needs {spatial_dims} positive sizes for spatial_dims={spatial_dims}")
    if pad_multiple < 1 or any(p % pad_multiple for p in patch_size):
        raise UserError(f"{name}: patch_size={patch_size} must be a multiple of pad_multiple={pad_multiple} "
                        "(the network's divisor)")
    for arg, value in (("batch_size", batch_size), ("samples_per_epoch", samples_per_epoch),
                       ("val_batch_size", val_batch_size)):
        if value is not None and int(value) < 1:
            raise UserError(f"{name}: {arg}={value} must be >= 1")
    if num_workers < 0:
        raise UserError(f"{name}: num_workers={num_workers} must be >= 0")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"{name}: val_fraction={val_fraction}, test_fraction={test_fraction} must be in [0, 1) "
                        "and sum below 1")
    if not 0 <= fg_oversample <= 1:
        raise UserError(f"{name}: fg_oversample={fg_oversample} must be in [0, 1]")
    if cache not in CACHE_MODES:
        raise UserError(f"{name}: cache={cache!r} must be one of {list(CACHE_MODES)}")
    if generate is not None:
        allowed = set(inspect.signature(phantom.generate_phantom_h5).parameters) - {"path"}
        unknown = sorted(set(generate) - allowed)
        if unknown:
            raise UserError(f"{name}: generate has unknown keys {unknown}; allowed: {sorted(allowed)}")
        cases, unlabelled = generate.get("cases", phantom.DEFAULTS_2D["cases"]), generate.get("unlabelled", 0)
        if not isinstance(unlabelled, int) or not isinstance(cases, int) or not 0 <= unlabelled < cases:
            raise UserError(f"{name}: generate.unlabelled={unlabelled} must be in [0, cases={cases}): at least one case keeps its label")


def class_weight_vector(name: str, weights, class_names: list[str]) -> list[float] | None:
    """``fg_class_weights`` as one weight per class (background 0), checked against the data's
    class names: a mapping may name foreground classes only, a list has one entry per
    foreground class; weights are finite, >= 0 and not all 0."""
    if weights is None:
        return None
    foreground = list(class_names[1:])
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - set(foreground))
        if unknown:
            raise UserError(f"{name}: fg_class_weights names {unknown}, not foreground classes of the data; "
                            f"choose from {foreground}")
        values = [weights.get(c, 1.0) for c in foreground]
    else:
        values = list(weights)
        if len(values) != len(foreground):
            raise UserError(f"{name}: fg_class_weights={values} needs {len(foreground)} weights, one per foreground "
                            f"class {foreground}")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"{name}: fg_class_weights={weights} must be numbers") from None
    if not all(math.isfinite(v) and v >= 0 for v in values) or not any(values):
        raise UserError(f"{name}: fg_class_weights={weights} must be finite, >= 0 and not all 0")
    return [0.0] + values


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_batch_memory(name: str, patch_size: list[int], batch_size: int, in_channels: int) -> None:
    """Refuse a patch/batch that cannot fit in memory before a worker dies allocating it.

    A training sample holds the float32 image patch, an int64 label and the copies
    augmentation makes (about three of each); half the machine's memory is the bound."""
    voxels = math.prod(patch_size)
    need = batch_size * voxels * (4 * in_channels + 8) * 3
    total = _physical_memory()
    if total and need > total // 2:
        raise UserError(f"{name}: patch_size={patch_size} with batch_size={batch_size} and {in_channels} channel(s) "
                        f"needs about {need / 2**30:.1f} GiB per batch, more than half of this machine's "
                        f"{total / 2**30:.1f} GiB; use a smaller patch_size or batch_size")


class SegDataModule(L.LightningDataModule):
    """Format-independent base of the segmentation datamodules.

    Args:
        path: the data file (HDF5) or TFRecord file, directory or glob.
        spatial_dims: 2 (train on slices along D) or 3 (train on volume patches).
        patch_size: training crop, ``[H, W]`` for 2D or ``[D, H, W]`` for 3D; each size must be
            a multiple of ``pad_multiple``. Larger than the data is allowed (zero padded).
        batch_size: training batch size per rank. Default 16.
        num_workers: DataLoader worker processes per rank. Default 2.
        val_fraction: fraction of cases held out for validation (by case, seeded by
            ``split_seed``), ignored when ``val_cases`` is given. Default 0.2.
        test_fraction: fraction of cases held out for testing; 0 means ``test_dataloader``
            uses the validation split. Default 0.0.
        val_cases: explicit validation case ids (overrides ``val_fraction``).
        test_cases: explicit test case ids (overrides ``test_fraction``).
        split_seed: seed of the case split, separate from ``seed`` so runs with different
            training seeds (teacher and student) see the same split. Default 0.
        seed: seed of sample order, patch locations and augmentation. Default 0.
        samples_per_epoch: training samples per epoch (all ranks together), rounded up to a
            multiple of ``world_size * batch_size`` so every rank runs the same number of
            full batches. Default: the number of training slices (2D) or cases (3D).
        fg_oversample: fraction of training samples forced to contain foreground (nnU-Net's
            one third): a present foreground class is picked uniformly, then a voxel of it.
            Default 0.33.
        fg_class_weights: how often a forced sample targets each foreground class, relative
            to the others present in its case: a mapping ``{class name: weight}`` (classes
            left out weigh 1) or a list of one weight per foreground class. ``None`` (default)
            picks uniformly, as nnU-Net does; ``{lesion: 4}`` targets a present lesion four
            times as often as each organ (class-balanced sampling of a rare class).
        val_batch_size: slices per validation batch for 2D (3D always uses 1 volume).
            Default: ``batch_size``.
        pad_multiple: 2D validation slices are zero padded (image 0, label 0) at the
            bottom/right to a multiple of this; ``patch_size`` must be a multiple of it.
            Default 16.
        cache: ``"auto"``: decode compressed/encoded data once per node into a memory-mapped
            cache, read uncompressed contiguous HDF5 in place; ``"always"``: also copy
            uncompressed HDF5 to the cache (slow network filesystems); ``"never"``: read the
            source directly every time. Default ``"auto"``.
        cache_dir: where node caches live. Default ``$COMPRESSSEG_CACHE_DIR`` or
            ``<tmp>/compressseg-cache``.
        pin_memory: pin batches (GPU training). Default False.
        persistent_workers: keep workers alive between epochs. Default False.
        generate: phantom arguments (see :func:`datamodules.phantom.generate_phantom_h5`, e.g.
            ``{"cases": 40, "shape": [16, 96, 96], "seed": 0}``); if ``path`` does not exist it
            is generated there (atomically) on first use. Default None: a missing file is an
            error.
        augment: master switch for training augmentation. Default True.
        aug_flip_prob: probability of flipping each spatial axis. Default 0.5.
        aug_rot90_prob: probability of a random quarter turn in the (H, W) plane (only a half
            turn for non-square patches). Default 0.5.
        aug_affine_prob: probability of an in-plane rotation + zoom (labels nearest). Default 0.2.
        aug_rotate_deg: rotation range in degrees, +-. Default 15.
        aug_scale: zoom range, ``1 +- aug_scale``. Default 0.15.
        aug_intensity_prob: probability of intensity scale and shift. Default 0.3.
        aug_intensity_scale: intensity multiplier range ``1 +- x``. Default 0.1.
        aug_intensity_shift: additive shift range ``+- x`` (z-scored units). Default 0.1.
        aug_gamma_prob: probability of a gamma transform on the patch's range. Default 0.3.
        aug_gamma: gamma range ``(1 + x) ** +-1``. Default 0.3.
        aug_noise_prob: probability of additive Gaussian noise. Default 0.15.
        aug_noise_std: noise sigma drawn from ``[0, x]``. Default 0.1.
    """

    def __init__(
        self,
        path: str,
        spatial_dims: Literal[2, 3],
        patch_size: list[int],
        batch_size: int = 16,
        num_workers: int = 2,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        val_cases: list[str] | None = None,
        test_cases: list[str] | None = None,
        split_seed: int = 0,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        fg_oversample: float = 0.33,
        fg_class_weights: dict[str, float] | list[float] | None = None,
        val_batch_size: int | None = None,
        pad_multiple: int = 16,
        cache: Literal["auto", "always", "never"] = "auto",
        cache_dir: str | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        generate: dict | None = None,
        augment: bool = True,
        aug_flip_prob: float = 0.5,
        aug_rot90_prob: float = 0.5,
        aug_affine_prob: float = 0.2,
        aug_rotate_deg: float = 15.0,
        aug_scale: float = 0.15,
        aug_intensity_prob: float = 0.3,
        aug_intensity_scale: float = 0.1,
        aug_intensity_shift: float = 0.1,
        aug_gamma_prob: float = 0.3,
        aug_gamma: float = 0.3,
        aug_noise_prob: float = 0.15,
        aug_noise_std: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        name = type(self).__name__
        patch_size = [int(p) for p in patch_size]
        _check_arguments(name, spatial_dims=spatial_dims, patch_size=patch_size, pad_multiple=pad_multiple,
                         batch_size=batch_size, samples_per_epoch=samples_per_epoch, val_batch_size=val_batch_size,
                         num_workers=num_workers, val_fraction=val_fraction, test_fraction=test_fraction,
                         fg_oversample=fg_oversample, cache=cache, generate=generate)
        self.path = os.fspath(path)
        self.spatial_dims = int(spatial_dims)
        self.patch_size = patch_size
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.val_cases, self.test_cases = val_cases, test_cases
        self.split_seed, self.seed = int(split_seed), int(seed)
        self.samples_per_epoch, self.fg_oversample = samples_per_epoch, float(fg_oversample)
        self.val_batch_size = int(val_batch_size or batch_size) if spatial_dims == 2 else 1
        self.pad_multiple, self.cache, self.cache_dir = int(pad_multiple), cache, cache_dir
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.generate = dict(generate) if generate is not None else None
        self.augment_config = AugmentConfig(
            augment, aug_flip_prob, aug_rot90_prob, aug_affine_prob, aug_rotate_deg, aug_scale, aug_intensity_prob,
            aug_intensity_scale, aug_intensity_shift, aug_gamma_prob, aug_gamma, aug_noise_prob, aug_noise_std,
        )
        self.augment_config.validate(name)
        self.store: CaseStore | None = None
        self.splits: dict[str, list[int]] = {}
        self.case_labels: dict[int, CaseLabels] = {}
        self._epoch = 0
        info = self.describe()
        self.num_classes, self.class_names, self.in_channels = info["num_classes"], info["class_names"], info["in_channels"]
        # how the file's images were made from raw scans (datamodules.preprocess); None if unrecorded
        self.preprocessing: dict | None = info.get("preprocessing")
        self.fg_class_weights = class_weight_vector(name, fg_class_weights, self.class_names)
        _check_batch_memory(name, self.patch_size, self.batch_size, self.in_channels)

    # -- format hooks ------------------------------------------------------------------------
    def _source_exists(self) -> bool:
        return os.path.exists(self.path)

    def _read_description(self) -> dict:
        """num_classes, class_names, in_channels from the file header only."""
        raise NotImplementedError

    def _write_cases(self, cases, num_classes: int, class_names: list[str], compression: str | None,
                     preprocessing: dict | None = None) -> None:
        """Write phantom cases (and their preprocessing record) to ``self.path`` atomically."""
        raise NotImplementedError

    def _prepare_source(self) -> None:
        """Per-node preparation after the file exists (index files, node cache)."""

    def _open_store(self) -> CaseStore:
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------
    def describe(self) -> dict:
        """``num_classes``, ``class_names``, ``in_channels``, ``spatial_dims`` and
        ``preprocessing`` (the file's record, or None) from the file header only (or from the
        ``generate`` arguments if the file is not generated yet)."""
        if self._source_exists():
            info = self._read_description()
        elif self.generate is not None:
            self._check_phantom_name()
            info = phantom.describe(**self.generate)
        else:
            raise UserError(
                f"data file {self.path} does not exist; create it with `launch.py data generate --out {self.path}` "
                "or `data convert`, or give the datamodule a `generate` dict"
            )
        return {**info, "spatial_dims": self.spatial_dims}

    def _check_phantom_name(self) -> None:
        # A recipe's generate: block stays in when the recipe is reused on real data; a typo
        # in data.path must not silently become a phantom file under the typo'd name.
        if "phantom" not in os.path.basename(self.path.rstrip("/")).lower():
            raise UserError(
                f"data file {self.path} does not exist; the recipe's generate: block only creates phantom data under "
                "a name containing 'phantom' (e.g. data/phantom2d.h5): check data.path for a typo, or name a phantom file"
            )

    def prepare_data(self) -> None:
        """Generate the phantom if needed, then index/cache the files (once per node)."""
        self._ensure_source()
        self._prepare_source()

    def setup(self, stage: str | None = None) -> None:
        if self.store is not None:
            return
        self._ensure_source()
        self._prepare_source()  # no-op when prepare_data already ran on this node
        self.store = self._open_store()
        header = self.store.header
        self.num_classes, self.class_names, self.in_channels = header.num_classes, header.class_names, header.in_channels
        self.splits = self._split(header)
        for i in sorted({i for cases in self.splits.values() for i in cases}):
            label = self.store.label(i)
            self.case_labels[i] = scan_labels(label[...], header.num_classes, f"{header.source} case {header.cases[i].case_id!r}")
        self.store.close()  # workers reopen lazily; no handle crosses a fork

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by ``train_dataloader`` when no Trainer is attached."""
        self._epoch = int(epoch)

    def train_dataloader(self) -> StatefulDataLoader:
        rank, world_size = self._rank_and_world_size()
        return self.make_dataloader("train", rank=rank, world_size=world_size, epoch=self._train_epoch())

    def _train_epoch(self) -> int:
        """The epoch whose samples the train loader serves first.

        ``trainer.current_epoch`` counts completed epochs. A checkpoint written at an epoch's
        end (``on_train_epoch_end``: the epoch processed, not yet completed; what a
        ModelCheckpoint without ``every_n_train_steps`` writes) resumes into the next epoch,
        and Lightning builds that epoch's iterator from the restored loader state before it
        sets the sampler's epoch: the sampler must already be at the next epoch (else the
        resumed run trains that epoch on the previous epoch's samples).
        """
        if self.trainer is None:
            return self._epoch
        progress = getattr(getattr(self.trainer, "fit_loop", None), "epoch_progress", None)
        processed = progress.current.processed if progress is not None else 0
        return max(self.trainer.current_epoch, processed) if self.trainer.state.fn == "fit" else self.trainer.current_epoch

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test" if self.splits.get("test") else "val")

    def predict_dataloader(self):
        return self.test_dataloader()

    def num_train_samples(self, world_size: int = 1) -> int:
        """Training samples per epoch for ``world_size`` ranks (after rounding)."""
        train = self.splits["train"]
        if self.samples_per_epoch is not None:
            base = self.samples_per_epoch
        elif self.spatial_dims == 2:
            base = sum(self.store.cases[i].spatial_shape[0] for i in train)
        else:
            base = len(train)
        return round_train_samples(base, world_size, self.batch_size)

    def make_dataloader(self, split: str, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                        cases: list[int] | None = None):
        """The loader of ``split`` ("train", "val", "test") for an explicit rank and world
        size; ``train_dataloader`` etc. call it with the values of the running job. ``cases``
        (indices into the file) replaces the split's own cases."""
        if self.store is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before building dataloaders")
        cases = self.splits.get(split, []) if cases is None else cases
        where = f"{self.path} {split} split"
        if split == "train":
            n = self.num_train_samples(world_size)
            dataset = PatchDataset(self.store, cases, [self.case_labels[i] for i in cases], self.patch_size, n,
                                   self.seed, self.fg_oversample, self.augment_config, self.fg_class_weights)
            sampler = EpochSampler(n, rank=rank, world_size=world_size, seed=self.seed, epoch=epoch, shuffle=True, what=where)
            with warnings.catch_warnings():  # torchdata 0.11 calls the deprecated torch.set_vital
                warnings.filterwarnings("ignore", message=".*set_vital.*")
                return StatefulDataLoader(dataset, sampler=sampler, batch_size=self.batch_size, collate_fn=collate,
                                          **self._loader_kwargs())
        dataset = EvalDataset(self.store, cases, self.spatial_dims, self.pad_multiple if self.spatial_dims == 2 else 1)
        if len(dataset) == 0:
            raise UserError(f"{where} has no cases; set val_fraction/test_fraction or val_cases/test_cases")
        sampler = EpochSampler(len(dataset), rank=rank, world_size=world_size, shuffle=False, what=where,
                               groups=dataset.case_sizes())  # whole cases per rank: per-case metrics
        return DataLoader(dataset, sampler=sampler, batch_size=self.val_batch_size, collate_fn=collate,
                          **self._loader_kwargs())

    def labelled_dataloader(self):
        """Every labelled case of the file, as evaluation batches (whole slices or volumes):
        ``launch.py verify --data`` checks an artifact on a file no training run split."""
        if self.store is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before building dataloaders")
        labelled = [i for i, case in enumerate(self.store.header.cases) if case.labelled]
        return self.make_dataloader("labelled", cases=labelled)

    # -- internals ---------------------------------------------------------------------------
    def _ensure_source(self) -> None:
        if self._source_exists():
            return
        if self.generate is None:
            self.describe()  # raises the missing-file error
        self._check_phantom_name()
        args = dict(self.generate)
        num_classes = int(args.get("num_classes", 5))
        cases = phantom.iter_phantom_cases(
            cases=args.pop("cases", phantom.DEFAULTS_2D["cases"]),
            shape=args.pop("shape", phantom.DEFAULTS_2D["shape"]),
            **{k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if k != "compression"},
        )
        self._write_cases(cases, num_classes, phantom.class_names(num_classes), args.get("compression"),
                          phantom.preprocessing_record(int(args.get("in_channels", 1))))

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            connector = getattr(self.trainer, "_accelerator_connector", None)
            if self.trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
                raise UserError(
                    f"{type(self).__name__} shards data by rank itself: set trainer.use_distributed_sampler=False "
                    "(otherwise every sample would be split twice)"
                )
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _eval_loader(self, split: str):
        if not self.splits.get(split):
            return []
        rank, world_size = self._rank_and_world_size()
        return self.make_dataloader(split, rank=rank, world_size=world_size)

    def _loader_kwargs(self) -> dict:
        kwargs = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = self.persistent_workers
        # Slurm signals every process of a job step, workers included: they leave USR1/TERM to
        # the main process, which checkpoints at its next safe point (trainer/requeue_signals.py)
        kwargs.update(shield_loader_kwargs(self.num_workers))
        return kwargs

    def _split(self, header: DatasetHeader) -> dict[str, list[int]]:
        ids = [c.case_id for c in header.cases]
        index = {cid: i for i, cid in enumerate(ids)}
        n = len(ids)
        chosen: dict[str, list[int]] = {}
        # unlabelled cases (distillation only) always train; fractions count labelled cases,
        # so adding unlabelled cases to a file leaves its validation split as it was
        labelled = [i for i, c in enumerate(header.cases) if c.labelled]
        for split, explicit in (("test", self.test_cases), ("val", self.val_cases)):
            if explicit is not None:
                unknown = [c for c in explicit if c not in index]
                if unknown:
                    raise UserError(f"{self.path}: {split}_cases {unknown} are not in the file (it has {ids[:5]}...)")
                unlabelled = [c for c in explicit if not header.cases[index[c]].labelled]
                if unlabelled:
                    raise UserError(f"{self.path}: {split}_cases {unlabelled} are unlabelled; only labelled cases can be evaluated")
                chosen[split] = sorted(index[c] for c in explicit)
        perm = [labelled[int(i)] for i in np.random.default_rng(self.split_seed).permutation(len(labelled))]
        taken = {i for cases in chosen.values() for i in cases}
        pool = [i for i in perm if i not in taken]
        for split, fraction in (("test", self.test_fraction), ("val", self.val_fraction)):
            if split not in chosen:
                k = int(round(len(labelled) * fraction))
                k = max(k, 1) if fraction > 0 else 0
                chosen[split], pool = sorted(pool[:k]), pool[k:]
        overlap = set(chosen["val"]) & set(chosen["test"])
        if overlap:
            raise UserError(f"{self.path}: cases {[ids[i] for i in sorted(overlap)]} are in both val_cases and test_cases")
        chosen["train"] = sorted(pool + [i for i in range(n) if not header.cases[i].labelled])
        if not chosen["train"]:
            raise UserError(
                f"{self.path}: no training cases left after the split ({n} cases, "
                f"{len(chosen['val'])} val, {len(chosen['test'])} test); lower val_fraction/test_fraction"
            )
        return chosen
