"""Offline distillation: teacher logits computed once, stored in HDF5, replayed per batch.

Command::

    python launch.py distill-cache --teacher runs/unet2d_phantom/checkpoints/best.ckpt \\
        --data-config recipes/distill_unet2d.yaml --out runs/teacher2d_logits.h5

File layout (``format="compressseg-teacher-cache"``, ``version=1``), parallel to the dataset's::

    /                  attrs: format, version, dataset (JSON {path, sha256}), teachers (JSON
                       [{path, sha256, class_path}]), ensemble, temperature, num_classes,
                       spatial_dims, roi_size (JSON or null)
    /cases/<case_id>/logits   float16 [K, D, H, W]   teacher logits of the whole case

Why whole un-augmented cases: the training datamodule (:mod:`datamodules.datasets`) draws each
patch's location and spatial augmentation from ``(seed, epoch, sample key)``. Caching per
patch would freeze one epoch's draws; caching whole cases lets every epoch's patch be cut
from the cache. Alignment is done by :class:`PatchReplay`: it runs the training dataset's
own ``__getitem__`` for the batch's ``(epoch, index)`` with the case arrays swapped for the
cached logits (plus a channel of ones that becomes the valid mask) and intensity
augmentation switched off, so crop, flips, quarter turns and the small affine are applied
by the very code that made the batch. The replayed label must equal the batch's label,
checked on every sample, so a datamodule that changed its sampling fails loudly instead of
distilling misaligned targets. The replay of a batch starts in a background thread at
``on_train_batch_start`` and overlaps the student's forward pass. A datamodule that already
delivers aligned logits as ``batch["teacher_logits"]`` (optionally ``batch["teacher_mask"]``)
is used as is.

What offline cannot reproduce, by design: the online teacher sees the *augmented* patch
(intensity changes, the patch border); the cache holds the teacher's view of the clean whole
case (2D: whole slices; 3D: sliding window over the volume with ``roi_size``). Voxels that an
augmented patch takes from outside the case have no cached target and are masked out.

Identity: the file records the sha256 of the dataset file and of every teacher file; a
training run whose dataset (or given teacher) hashes differently is refused in one line.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np
import torch

from trainer.distill.teacher import ENSEMBLE_MODES, TeacherEnsemble, bind_to_data, load_teacher, sha256_file
from trainer.distill.teacher_input import MODES as TEACHER_INPUT_MODES
from trainer import collectives, host_copy
from trainer.atomic import atomic_path
from trainer.errors import UserError
from trainer.inference import predict_logits

CACHE_FORMAT = "compressseg-teacher-cache"
CACHE_VERSION = 1
VALID_THRESHOLD = 0.999  # a voxel is valid if (almost) all of its interpolation weight is inside
_HASHES: dict[tuple[str, int, int], str] = {}


# ---------------------------------------------------------------------------- identity
def _file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def shared_sha256(trainer: Any, path: str) -> str:
    """sha256 of ``path``, hashed once per node of a multi-rank run and shared (see
    :func:`trainer.collectives.node_local_result`); plain hashing without a trainer."""
    return collectives.node_local_result(trainer, lambda: _file_sha256(path), f"file {path}")


def dataset_fingerprint(datamodule: Any) -> dict[str, str]:
    """``{"path", "sha256"}`` of the data a datamodule reads (a file, or every file of a
    directory in sorted order)."""
    path = getattr(datamodule, "path", None)
    if not path or not os.path.exists(path):
        raise UserError(f"offline distillation needs a datamodule that reads a data file (`path`); "
                        f"{type(datamodule).__name__} has {path!r}")
    if os.path.isfile(path):
        return {"path": str(path), "sha256": _file_sha256(path)}
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}\0{_file_sha256(str(file))}\0".encode())
    return {"path": str(path), "sha256": digest.hexdigest()}


# ---------------------------------------------------------------------------- reading
class TeacherCache:
    """A cache file opened for reading; checks what it was made from."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise UserError(f"teacher cache {self.path} does not exist; make it with `launch.py distill-cache`")
        try:
            with h5py.File(self.path, "r") as f:
                attrs = dict(f.attrs)
                self.case_ids = sorted(f["cases"].keys()) if "cases" in f else []
        except OSError as exc:
            raise UserError(f"teacher cache {self.path} is not a readable HDF5 file ({exc})") from None
        if attrs.get("format") != CACHE_FORMAT:
            raise UserError(f"{self.path} is not a teacher cache (format={attrs.get('format')!r}, want {CACHE_FORMAT!r}); "
                            "make one with `launch.py distill-cache`")
        self.dataset = json.loads(attrs["dataset"])
        self.teachers = json.loads(attrs["teachers"])
        self.ensemble, self.temperature = str(attrs["ensemble"]), float(attrs["temperature"])
        self.num_classes, self.spatial_dims = int(attrs["num_classes"]), int(attrs["spatial_dims"])
        self._replay: PatchReplay | None = None
        self._replay_source: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[torch.Tensor, Future] | None = None

    @classmethod
    def open_for_training(cls, path: str, datamodule: Any, teacher_paths: Sequence[str], temperature: float,
                          ensemble: str, trainer: Any = None) -> "TeacherCache":
        """Open ``path`` and refuse it if it was made from other data, another teacher, or
        (for an averaged-probability ensemble) another temperature. With a ``trainer`` of
        several ranks, the dataset and teacher files are hashed once per node, not by every
        rank (a multi-GB file read eight times over on an eight-GPU node)."""
        cache = cls(path)
        data = json.loads(collectives.node_local_result(
            trainer, lambda: json.dumps(dataset_fingerprint(datamodule)), f"dataset of teacher cache {path}"))
        if data["sha256"] != cache.dataset["sha256"]:
            raise UserError(
                f"teacher cache {path} was made from dataset {cache.dataset['path']} (sha256 {cache.dataset['sha256'][:12]}) "
                f"but training reads {data['path']} (sha256 {data['sha256'][:12]}); rebuild it with `launch.py distill-cache`"
            )
        if teacher_paths:
            given = [shared_sha256(trainer, p) if os.path.isfile(p) else f"missing file {p}" for p in teacher_paths]
            made = [t["sha256"] for t in cache.teachers]
            if given != made:
                raise UserError(
                    f"teacher cache {path} was made from teacher(s) {[(t['path'], t['sha256'][:12]) for t in cache.teachers]} "
                    f"but the recipe names {list(zip(teacher_paths, [g[:12] for g in given]))}; rebuild the cache"
                )
        if len(cache.teachers) > 1 and cache.ensemble == "probs" and abs(cache.temperature - temperature) > 1e-9:
            raise UserError(f"teacher cache {path} averaged {len(cache.teachers)} teachers' probabilities at T={cache.temperature}, "
                            f"the recipe asks T={temperature}; rebuild it with --temperature {temperature}")
        if len(cache.teachers) > 1 and cache.ensemble != ensemble:
            raise UserError(f"teacher cache {path} holds a {cache.ensemble!r} ensemble, the recipe asks {ensemble!r}")
        classes = getattr(datamodule, "num_classes", None)
        if classes is not None and int(classes) != cache.num_classes:
            raise UserError(f"teacher cache {path} has {cache.num_classes} classes, the data has {classes}")
        dims = getattr(datamodule, "spatial_dims", None)
        if dims is not None and int(dims) != cache.spatial_dims:
            raise UserError(f"teacher cache {path} was made for spatial_dims={cache.spatial_dims}, the data has {dims}")
        return cache

    def describe(self) -> dict[str, Any]:
        """Plain-data summary recorded in the student's checkpoint."""
        return {"path": self.path, "dataset": dict(self.dataset), "ensemble": self.ensemble,
                "temperature": self.temperature}

    def prefetch(self, trainer: Any, batch: Mapping[str, Any]) -> None:
        """Start :meth:`batch_logits` for ``batch`` in a background thread (the replay is
        mostly Python and file reads; it overlaps the student's forward pass, whose torch
        kernels release the GIL). :meth:`batch_logits` collects it."""
        if "teacher_logits" in batch:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-replay")
        self._pending = (batch["index"], self._executor.submit(self._replay_batch, trainer, batch))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._executor, self._pending = None, None

    def batch_logits(self, trainer: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher logits ``[B, K, *S]`` (float32) aligned with ``batch``, and the valid mask."""
        if "teacher_logits" in batch:
            return batch["teacher_logits"].float(), batch.get("teacher_mask")
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is batch["index"]:
            return pending[1].result()
        return self._replay_batch(trainer, batch)

    def _replay_batch(self, trainer: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        replay = self._replay_for(trainer)
        epoch = int(trainer.current_epoch)
        logits, masks = [], []
        # keys and labels from the batch's host copy: reading them off the GPU would wait for
        # the student's forward pass this replay is meant to overlap
        host = host_copy.of(batch)
        keys = host.index if host is not None and host.index is not None else batch["index"].tolist()
        labels = host.label if host is not None and host.label is not None else batch["label"].cpu()
        for i, key in enumerate(keys):
            z, valid, label = replay(epoch, key)
            if not torch.equal(label, labels[i]):
                raise UserError(
                    f"teacher cache {self.path}: replaying the datamodule's crop/augmentation for sample {key} "
                    f"(case {batch['case'][i]!r}, epoch {epoch}) did not reproduce the batch's label; the training "
                    "data must be a function of (seed, epoch, index) for offline distillation"
                )
            logits.append(z)
            masks.append(valid)
        device = batch["label"].device
        return torch.stack(logits).to(device, non_blocking=True), torch.stack(masks).to(device, non_blocking=True)

    def _replay_for(self, trainer: Any) -> "PatchReplay":
        dataset = getattr(getattr(trainer, "train_dataloader", None), "dataset", None)
        if self._replay is None or self._replay_source != id(dataset):
            self._replay, self._replay_source = PatchReplay(dataset, self), id(dataset)
        return self._replay


class _LogitsWithValid:
    """Array-like ``[K+1, D, H, W]`` float32: the cached fp16 logits of one case plus a channel
    of ones, read region by region (only what a patch needs is read from the file)."""

    def __init__(self, array):
        self._array = array
        self.shape = (array.shape[0] + 1, *array.shape[1:])
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if not index or index[0] is not Ellipsis or len(index) != self.ndim:
            raise TypeError(f"cached logits support array[..., d, h, w] reads only, got {index!r}")
        region = self._array[(slice(None), *index[1:])]
        out = np.empty((self.shape[0], *region.shape[1:]), np.float32)
        out[:-1] = region
        out[-1] = 1.0
        return out


def _open_array(dset: h5py.Dataset, path: str):
    """A read-only memory map of a contiguous, uncompressed dataset (a patch read is then a
    memory copy, as the datamodule reads its cases), else the h5py dataset itself."""
    offset = dset.id.get_offset() if dset.chunks is None and dset.compression is None else None
    if offset is None:
        return dset
    return np.memmap(path, dtype=dset.dtype, mode="r", offset=offset, shape=dset.shape)


class CachedLogitsStore:
    """Duck-typed :class:`datamodules.store.CaseStore`: cached logits as the ``image`` of each
    case, the dataset's own label as ``label``; cases in the dataset's order."""

    def __init__(self, cache: TeacherCache, source: Any):
        self.cache, self.source, self.header = cache, source, source.header
        self._file: h5py.File | None = None
        self._arrays: dict[str, Any] = {}
        self._pid: int | None = None

    @property
    def cases(self):
        return self.source.cases

    def _array(self, case_id: str):
        if self._pid != os.getpid():  # never use a handle inherited through fork
            self._file, self._arrays, self._pid = h5py.File(self.cache.path, "r"), {}, os.getpid()
        if case_id not in self._arrays:
            group = self._file.get(f"cases/{case_id}")
            if group is None:
                raise UserError(f"teacher cache {self.cache.path} has no case {case_id!r}; rebuild it with "
                                "`launch.py distill-cache --cases all`")
            self._arrays[case_id] = _open_array(group["logits"], self.cache.path)
        return self._arrays[case_id]

    def image(self, i: int) -> _LogitsWithValid:
        case_id = self.source.cases[i].case_id
        array = self._array(case_id)
        if tuple(array.shape[1:]) != tuple(self.source.cases[i].spatial_shape):
            raise UserError(f"teacher cache {self.cache.path}: case {case_id!r} logits {array.shape} do not match "
                            f"the case's shape {self.source.cases[i].spatial_shape}")
        return _LogitsWithValid(array)

    def label(self, i: int):
        return self.source.label(i)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_arrays": {}, "_pid": None}


class PatchReplay:
    """Cut the cached logits exactly as the training dataset cut the batch's patch.

    ``dataset`` must be a map-style dataset indexed by ``(epoch, key)`` with a ``store``
    (the case arrays) and an ``augment`` config (:class:`datamodules.datasets.PatchDataset`).
    """

    def __init__(self, dataset: Any, cache: TeacherCache):
        if dataset is None or not all(hasattr(dataset, a) for a in ("store", "augment", "__getitem__")):
            raise UserError(
                f"offline distillation: the training data ({type(dataset).__name__}) neither delivers "
                "batch['teacher_logits'] nor is a datamodules PatchDataset whose crops can be replayed"
            )
        replay = copy.copy(dataset)
        replay.store = CachedLogitsStore(cache, dataset.store)
        # spatial parameters are drawn before (and independently of) the intensity ones, so
        # switching intensity off keeps the exact same crop, flips, turns and affine
        replay.augment = dataclasses.replace(dataset.augment, intensity_prob=0.0, gamma_prob=0.0, noise_prob=0.0)
        self._dataset = replay

    def __call__(self, epoch: int, key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [K, *P], valid [*P] bool, label [*P])`` of sample ``key`` in ``epoch``."""
        sample = self._dataset[(epoch, key)]
        stack = sample["image"]
        return stack[:-1], stack[-1] > VALID_THRESHOLD, sample["label"]


# ---------------------------------------------------------------------------- writing
def case_logits(teacher: TeacherEnsemble, image: np.ndarray, spatial_dims: int, roi_size: Sequence[int] | None,
                divisor: int, batch_size: int = 8, overlap: float = 0.5, device: str = "cpu") -> np.ndarray:
    """Teacher logits ``[K, D, H, W]`` (float32) of one whole case ``image [C, D, H, W]``:
    slice by slice in 2D, sliding window (``roi_size``) in 3D."""
    x = torch.from_numpy(np.array(image, dtype=np.float32))  # a writable copy
    if spatial_dims == 3:
        out = predict_logits(teacher, x[None].to(device), roi_size, overlap, divisor)[0]
        return out.float().cpu().numpy()
    slices = x.permute(1, 0, 2, 3)  # [D, C, H, W]
    parts = [predict_logits(teacher, slices[i:i + batch_size].to(device), None, overlap, divisor).float().cpu()
             for i in range(0, slices.shape[0], batch_size)]
    return torch.cat(parts).permute(1, 0, 2, 3).numpy()


def write_cache(out: str, teacher: TeacherEnsemble, teacher_infos: list[dict], datamodule: Any,
                case_indices: Sequence[int] | None = None, batch_size: int = 8, overlap: float = 0.5,
                device: str = "cpu", log=print) -> None:
    """Run ``teacher`` over whole cases of ``datamodule`` (set up) and write ``out`` atomically."""
    store, dims = datamodule.store, int(datamodule.spatial_dims)
    roi = list(datamodule.patch_size) if dims == 3 else None
    divisor = int(getattr(teacher.first, "divisor", 16))
    indices = list(range(len(store.cases))) if case_indices is None else list(case_indices)
    attrs = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION,
        "dataset": json.dumps(dataset_fingerprint(datamodule)), "teachers": json.dumps(teacher_infos),
        "ensemble": teacher.mode, "temperature": teacher.temperature, "num_classes": int(datamodule.num_classes),
        "spatial_dims": dims, "roi_size": json.dumps(roi),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    teacher.to(device).eval()
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(attrs)
        for n, i in enumerate(indices):
            case = store.cases[i]
            logits = case_logits(teacher, np.asarray(store.image(i)[...]), dims, roi, divisor, batch_size, overlap, device)
            if logits.shape[0] != int(datamodule.num_classes):
                raise UserError(f"teacher outputs {logits.shape[0]} classes, the data {datamodule.path} has "
                                f"{datamodule.num_classes}")
            f.create_dataset(f"cases/{case.case_id}/logits", data=logits.astype(np.float16))
            if log and (n + 1) % max(1, len(indices) // 10) == 0:
                log(f"[distill-cache] {n + 1}/{len(indices)} cases")


# ---------------------------------------------------------------------------- command
def _datamodule_from_recipe(path: str):
    import lightning.pytorch as pl
    import yaml
    from lightning.pytorch.cli import instantiate_module

    import datamodules  # noqa: F401  (built-in datamodules importable by class_path)

    if not os.path.isfile(path):
        raise UserError(f"--data-config {path} does not exist")
    with open(path) as fh:
        recipe = yaml.safe_load(fh) or {}
    data = recipe.get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise UserError(f"--data-config {path} has no `data: {{class_path: ..., init_args: ...}}` section")
    try:
        dm = instantiate_module(pl.LightningDataModule, {"_class_path": data["class_path"], **(data.get("init_args") or {})})
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"--data-config {path}: cannot build {data['class_path']}: {' '.join(str(exc).split())[:300]}") from None
    dm.prepare_data()
    dm.setup("fit")
    if getattr(dm, "store", None) is None:
        raise UserError(f"--data-config {path}: {data['class_path']} exposes no case store; offline caching needs "
                        "a datamodules.SegDataModule")
    return dm


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py distill-cache",
                                description="Precompute teacher logits for offline distillation (see trainer/distill/cache.py).")
    p.add_argument("--teacher", action="append", required=True, help="teacher checkpoint; repeat for an ensemble")
    p.add_argument("--teacher-class", default=None, help="nn.Module class path for plain weights files")
    p.add_argument("--teacher-init-args", default="{}", help="JSON keyword arguments of --teacher-class")
    p.add_argument("--data-config", required=True, help="recipe whose `data:` section names the dataset")
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--ensemble", default="probs", choices=ENSEMBLE_MODES)
    p.add_argument("--temperature", type=float, default=2.0, help="T of a probability-averaged ensemble")
    p.add_argument("--cases", default="all", choices=("all", "train"), help="cache every case or the training split")
    p.add_argument("--batch-size", type=int, default=8, help="2D slices per teacher forward")
    p.add_argument("--overlap", type=float, default=0.5, help="3D sliding-window overlap")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--teacher-input", default="check", choices=TEACHER_INPUT_MODES,
                   help="teachers with their own preprocessing (nnU-Net folders, MONAI bundles): check the data's "
                        "record and normalise raw channels their way, or feed the cases as they are (as_is)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        init_args = json.loads(args.teacher_init_args)
    except json.JSONDecodeError as exc:
        raise UserError(f"--teacher-init-args {args.teacher_init_args!r} is not JSON ({exc})") from None
    if not args.temperature > 0:
        raise UserError(f"--temperature={args.temperature} must be > 0")
    dm = _datamodule_from_recipe(args.data_config)
    loaded = [load_teacher(p, args.teacher_class, init_args) for p in args.teacher]
    teacher = TeacherEnsemble([net for net, _ in loaded], args.ensemble, args.temperature)
    bind_to_data(teacher, [info for _, info in loaded], dm, args.teacher_input)
    indices = dm.splits["train"] if args.cases == "train" else None
    write_cache(args.out, teacher, [info for _, info in loaded], dm, indices, args.batch_size, args.overlap, args.device)
    size = os.path.getsize(args.out) / 2**20
    print(f"[distill-cache] wrote {args.out} ({size:.1f} MiB) from {len(loaded)} teacher(s) over {dm.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
