"""Teacher-student distillation for segmentation, as one composable Lightning callback.

The student is ``SegmentationModule.net``; its supervised Dice+CE stays the module's ``seg``
term (weighted by ``model.supervised_weight``). This callback adds, through the
:class:`trainer.protocols.LossContributor` protocol, one named, weighted term per loss (each
logged as ``train/loss_<name>``; formulas and papers in :mod:`trainer.distill.losses`):

==========  ===================================================================
``kd``      voxel-wise KL(teacher_T || student_T) * T^2 on full-resolution logits
``kd_ds``   the same at every lower-resolution deep-supervision output
``cwd``     channel-wise KL between per-class spatial distributions * T^2
``feat_*``  FitNets MSE between a student and a teacher layer (1x1 adapter)
``aff_*``   pair-wise affinity distillation (Liu et al. 2019) between two layers
==========  ===================================================================

Recipe (maps 1:1 onto the constructor)::

    trainer:
      callbacks:
        - class_path: trainer.callbacks.distill.Distillation
          init_args:
            teacher: runs/unet2d_phantom/checkpoints/best.ckpt   # or a list: an ensemble
            temperature: 2.0
            kd_weight: 0.5
            kd_ds_weight: 0.25
            features: [{student: decoders.1, teacher: decoders.1, weight: 0.5}]
            affinity: [{student: decoders.1, teacher: decoders.1, weight: 1.0, grid: 16}]
            # cache: runs/teacher2d_logits.h5   # offline: read teacher logits, no teacher

Where things live, and why:

* **Teacher**: held by this callback, moved to the student's device at ``on_fit_start``,
  frozen. It is not a submodule of the LightningModule, so it is not in the student's
  ``state_dict``, not in its optimizer (which ``configure_optimizers`` builds from
  ``pl_module.parameters()``), and not reached by pruning/QAT, which act on ``pl_module.net``.
  The student's checkpoint records the teachers' paths and sha256 in this callback's state
  (``checkpoint["callbacks"]["Distillation"]``); resuming with a different teacher file is an
  error.
* **Adapters** (1x1 convs mapping student to teacher channels for ``features`` terms) are
  trainable. ``setup`` registers them as the submodule ``pl_module.distill_adapters`` (an
  ``nn.ModuleDict`` keyed by term name); ``setup`` runs before Lightning builds the optimizer
  (``configure_optimizers`` takes ``pl_module.parameters()``) and wraps DDP, so they are
  optimised and gradient-synchronised with the student. They are training state, not part of
  the student, so they are hidden from ``pl_module.state_dict()`` and saved in this
  callback's checkpoint section instead (``checkpoint["callbacks"]["Distillation"]
  ["adapters"]``, restored on resume before the optimizer is rebuilt): a distilled student's
  checkpoint loads in ``restore_run``/export and in runs without distillation unchanged.
* **Feature hooks**: forward hooks on module paths (never a wrapped ``forward``), re-resolved
  at ``on_fit_start`` and at every ``on_train_batch_start``.

Ordering contract with structural callbacks (pruning, QAT): list ``Distillation`` *after*
them in ``trainer.callbacks``, so that its ``setup`` sees the student they built there
(pruning at epoch 0, QAT conversion). Changes made later are followed at the next
``on_train_batch_start``: hooks are re-resolved by path (a swapped module is found again),
and when the structural history (``trainer.structure``) grew, the distilled student layers
are measured; an adapter whose layer was pruned mid-run keeps the columns of the surviving
channels (the pruning plan in the history names them) and DDP/optimizers/schedulers are
rebuilt with the pruner's own ``trainer.prune.rebuild`` (state carried over).

Offline mode (``cache``): teacher logits precomputed by ``launch.py distill-cache`` are read
instead of running a teacher; see :mod:`trainer.distill.cache`. Only ``kd``/``kd_ds``/``cwd`` work
offline (features are not cached).

Precision: the teacher runs under the trainer's autocast (bf16-mixed speeds it up). Where the
batch arrives in half precision without autocast (DeepSpeed ``16-mixed``/``bf16-mixed`` cast the
student and its inputs; so do ``*-true`` precisions), the fp32 teacher gets the batch in fp32
under autocast of that half dtype. Adapters take the student's features in their own dtype.
Every loss is computed in float32 with autocast off.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from trainer.distill import losses
from trainer.distill.features import Adapters, FeatureTap
from trainer.distill.teacher import ENSEMBLE_MODES, TeacherEnsemble, bind_to_data, load_teacher, main_output
from trainer.distill.teacher_input import MODES as TEACHER_INPUT_MODES
from trainer.errors import UserError
from trainer.precision import as_input, low_precision, param_dtype
from trainer.structure import history

ADAPTERS_ATTR = Adapters.ATTR


@dataclass
class FeatureTerm:
    """FitNets hint between two layers (recipe: ``{student: PATH, teacher: PATH, weight: W}``).

    Args:
        student: module path in the student net (``named_modules()`` name, e.g. ``decoders.3``).
        teacher: module path in the (first) teacher net.
        weight: weight of the term. Default 1.0.
        name: logged as ``train/loss_<name>``; default ``feat_<student path with _>``.
    """

    student: str
    teacher: str
    weight: float = 1.0
    name: str | None = None


@dataclass
class AffinityTerm:
    """Pair-wise affinity distillation between two layers.

    Args:
        student: module path in the student net.
        teacher: module path in the (first) teacher net.
        weight: weight of the term. Default 1.0.
        grid: nodes per spatial axis after max pooling; default 16 in 2D, 8 in 3D.
        name: logged as ``train/loss_<name>``; default ``aff_<student path with _>``.
    """

    student: str
    teacher: str
    weight: float = 1.0
    grid: int | None = None
    name: str | None = None


def _as_terms(items, cls, prefix: str) -> list:
    terms = []
    for item in items or []:
        term = cls(**item) if isinstance(item, Mapping) else item
        if not isinstance(term, cls):
            raise UserError(f"Distillation: {prefix} entry {item!r} must be a mapping with keys student, teacher, weight")
        if term.weight < 0:
            raise UserError(f"Distillation: weight={term.weight} of {prefix} term {term.student!r} must be >= 0")
        term.name = term.name or f"{prefix}_{term.student.replace('.', '_')}"
        terms.append(term)
    return terms


def _teacher_precision(image: torch.Tensor, teacher: nn.Module):
    """Where the batch arrives in half precision without autocast (DeepSpeed ``*-mixed`` and
    ``*-true`` precisions cast the student's inputs), run the float teacher under autocast in
    that dtype: its convolutions as fast as the student's, its norms in fp32. Under AMP the
    trainer's autocast is already on; elsewhere nothing changes."""
    device = image.device.type
    wanted = low_precision(image.dtype) and not low_precision(param_dtype(teacher))
    if wanted and not torch.is_autocast_enabled(device) and _autocast_supports(device, image.dtype):
        return torch.autocast(device_type=device, dtype=image.dtype)
    return nullcontext()


def _autocast_supports(device: str, dtype: torch.dtype) -> bool:
    return device == "cuda" or (device == "cpu" and dtype == torch.bfloat16)


@contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    """Eval mode inside the block, each submodule's own flag restored after (a plain
    ``train()`` would also wake modules that a technique keeps in eval on purpose)."""
    flags = {m: m.training for m in net.modules()}
    net.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


class Distillation(pl.Callback):
    """Distil one teacher (or an ensemble) into the student ``pl_module.net``.

    Args:
        teacher: path of a framework checkpoint, or of a weights file with ``teacher_class``;
            a list of paths makes an ensemble. May be omitted in offline mode (then the
            cache's record of the teacher is used; when given, it is checked against it).
        teacher_class: import path of the teacher's ``nn.Module`` class for plain weights
            files (``None``: the files are framework checkpoints). Default None.
        teacher_init_args: keyword arguments of ``teacher_class``. Default None.
        ensemble: how several teachers combine: ``"probs"`` averages tempered
            probabilities (at ``temperature``), ``"logits"`` averages logits. Default "probs".
        temperature: ``T`` of the logit terms. Default 2.0.
        kd_weight: weight of ``kd`` (full-resolution logits), next to the supervised term's
            ``model.supervised_weight``. Default 0.5: on the phantom benchmark, weight 1 (with
            ``kd_ds`` 0.5) slowed the small classes of a short-budget student below the
            student trained alone.
        kd_ds_weight: weight of ``kd_ds`` (lower-resolution deep-supervision outputs; needs
            a student with deep supervision). Default 0.25.
        cwd_weight: weight of ``cwd``, channel-wise distillation of the full-resolution
            logits at ``cwd_temperature`` (each class weighs the same, whatever its size).
            Default 0.0 (off).
        cwd_temperature: ``T`` of ``cwd``. Default 4.0 (the paper's choice for logits).
        correct_only: distil the logit terms (``kd``, ``kd_ds``, ``cwd``) only on voxels where
            the teacher's argmax equals the label: where the teacher is wrong, its soft target
            teaches the error (on the phantom, students lost lesion Dice that way). Needs
            ``batch["label"]``. Default False.
        ds_weights: per-level weights inside ``kd_ds``; ``None`` halves per level.
        features: FitNets terms (:class:`FeatureTerm` or mappings). Default none.
        affinity: affinity terms (:class:`AffinityTerm` or mappings). Default none.
        cache: HDF5 file of precomputed teacher logits (offline distillation). Default None.
        probe_size: spatial size of the dummy input used in ``setup`` to check shapes and
            size the adapters; default the datamodule's ``patch_size``, else
            ``2 * divisor`` per axis.
        teacher_input: teachers that carry their own preprocessing (nnU-Net folders, MONAI
            bundles): ``"check"`` compares it with the data file's preprocessing record, applies
            the teacher's voxel-wise normalisation to raw channels and refuses other mismatches;
            ``"as_is"`` feeds the batches unchanged (you vouch for the data). Default "check".
    """

    # every term compares student and teacher, not the label (``correct_only`` counts all of an
    # unlabelled sample), so unlabelled training cases (``labelled=False``) are distilled like
    # the others; SegmentationModule leaves them out of the supervised loss and refuses them
    # when no callback declares this
    learns_from_unlabelled = True

    def __init__(
        self,
        teacher: str | list[str] | None = None,
        teacher_class: str | None = None,
        teacher_init_args: dict[str, Any] | None = None,
        ensemble: Literal["probs", "logits"] = "probs",
        temperature: float = 2.0,
        kd_weight: float = 0.5,
        kd_ds_weight: float = 0.25,
        cwd_weight: float = 0.0,
        cwd_temperature: float = 4.0,
        correct_only: bool = False,
        ds_weights: list[float] | None = None,
        features: list[FeatureTerm] | None = None,
        affinity: list[AffinityTerm] | None = None,
        cache: str | None = None,
        probe_size: list[int] | None = None,
        teacher_input: Literal["check", "as_is"] = "check",
    ):
        self.teacher_paths = [teacher] if isinstance(teacher, str) else list(teacher or [])
        if not self.teacher_paths and cache is None:
            raise UserError("Distillation: give teacher (a checkpoint path, or a list for an ensemble) "
                            "or cache (an HDF5 file from `launch.py distill-cache`)")
        if ensemble not in ENSEMBLE_MODES:
            raise UserError(f"Distillation: ensemble={ensemble!r} must be one of {list(ENSEMBLE_MODES)}")
        for arg, value in (("temperature", temperature), ("cwd_temperature", cwd_temperature)):
            if not value > 0:
                raise UserError(f"Distillation: {arg}={value} must be > 0")
        for arg, value in (("kd_weight", kd_weight), ("kd_ds_weight", kd_ds_weight), ("cwd_weight", cwd_weight)):
            if value < 0:
                raise UserError(f"Distillation: {arg}={value} must be >= 0")
        if ds_weights is not None and (not ds_weights or min(ds_weights) < 0 or sum(ds_weights) <= 0):
            raise UserError(f"Distillation: ds_weights={ds_weights} must be non-negative with a positive sum")
        self.features = _as_terms(features, FeatureTerm, "feat")
        self.affinity = _as_terms(affinity, AffinityTerm, "aff")
        names = [t.name for t in (*self.features, *self.affinity)]
        dupes = sorted({n for n in names if names.count(n) > 1} | ({"seg", "kd", "kd_ds", "cwd"} & set(names)))
        if dupes:
            raise UserError(f"Distillation: term names {dupes} are used twice; give the terms distinct `name`s")
        for term in self.affinity:
            if term.grid is not None and term.grid < 1:
                raise UserError(f"Distillation: affinity grid={term.grid} for {term.student!r} must be >= 1")
        if cache is not None and (self.features or self.affinity):
            raise UserError("Distillation: features/affinity terms need the teacher's intermediate features, which "
                            f"the cache {cache} does not hold; run online (drop `cache`) or drop those terms")
        self.teacher_class, self.teacher_init_args = teacher_class, dict(teacher_init_args or {})
        self.ensemble, self.temperature = ensemble, float(temperature)
        self.kd_weight, self.kd_ds_weight = float(kd_weight), float(kd_ds_weight)
        self.cwd_weight, self.cwd_temperature = float(cwd_weight), float(cwd_temperature)
        self.correct_only = bool(correct_only)
        self.ds_weights = list(ds_weights) if ds_weights is not None else None
        self.cache_path, self.probe_size = cache, probe_size
        if teacher_input not in TEACHER_INPUT_MODES:
            raise UserError(f"Distillation: teacher_input={teacher_input!r} must be one of {list(TEACHER_INPUT_MODES)}")
        self.teacher_input = teacher_input
        self.teacher: TeacherEnsemble | None = None
        self.teacher_infos: list[dict[str, str]] = []
        self.cache = None  # trainer.distill.cache.TeacherCache in offline mode
        self._student_tap: FeatureTap | None = None
        self._teacher_tap: FeatureTap | None = None
        self._structure_seen: int | None = None
        self.adapters = Adapters()
        self._trainer: pl.Trainer | None = None

    # ------------------------------------------------------------------ properties
    @property
    def offline(self) -> bool:
        return self.cache_path is not None

    @property
    def _source_name(self) -> str:
        return f"cache {self.cache_path}" if self.offline else f"teacher {', '.join(self.teacher_paths)}"

    @property
    def _layer_terms(self) -> list:
        return [*self.features, *self.affinity]

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        net = self._student(pl_module)
        if sum(isinstance(cb, Distillation) for cb in trainer.callbacks) > 1:
            raise UserError("Distillation: trainer.callbacks holds more than one Distillation; use one "
                            "(several teachers go into one callback's `teacher` list)")
        if stage != "fit":
            return  # validate/test/predict need no teacher; adapters are not part of the student
        self._trainer = trainer
        self._load_sources(trainer)
        if self._layer_terms:
            self._student_tap = FeatureTap([t.student for t in self._layer_terms], "student")
            self._student_tap.attach(net)
            self._teacher_tap = FeatureTap([t.teacher for t in self._layer_terms], "teacher")
            self._teacher_tap.attach(self.teacher.first)
        channels = self._probe(trainer, pl_module)
        if self.features:
            dims = getattr(net, "spatial_dims", None) or getattr(getattr(trainer, "datamodule", None), "spatial_dims", 2)
            self.adapters.register(pl_module, dims, {t.name: channels[t.name] for t in self.features})
        self._structure_seen = len(history(net))

    def _student(self, pl_module: pl.LightningModule) -> nn.Module:
        net = getattr(pl_module, "net", None)
        if not isinstance(net, nn.Module):
            raise UserError(f"Distillation: {type(pl_module).__name__} has no `net` module to distil into")
        return net

    def _load_sources(self, trainer: pl.Trainer) -> None:
        """Load the teachers (online) or open the cache (offline), once."""
        if self.teacher is not None or self.cache is not None:
            return
        if self.offline:
            from trainer.distill.cache import TeacherCache

            self.cache = TeacherCache.open_for_training(self.cache_path, trainer.datamodule, self.teacher_paths,
                                                        self.temperature, self.ensemble, trainer)
            self.teacher_infos = self.cache.teachers
            return
        from trainer.distill.cache import shared_sha256

        hasher = lambda p: shared_sha256(trainer, p)  # noqa: E731  (once per node, not per rank)
        loaded = [load_teacher(p, self.teacher_class, self.teacher_init_args, hasher) for p in self.teacher_paths]
        self.teacher = TeacherEnsemble([net for net, _ in loaded], self.ensemble, self.temperature)
        self.teacher_infos = [info for _, info in loaded]
        rank_zero_info(f"Distillation: teacher(s) {[i['path'] for i in self.teacher_infos]}")
        bind_to_data(self.teacher, self.teacher_infos, trainer.datamodule, self.teacher_input)

    def _probe_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        net, dm = self._student(pl_module), getattr(trainer, "datamodule", None)
        dims = getattr(net, "spatial_dims", None) or getattr(dm, "spatial_dims", None)
        channels = getattr(net, "in_channels", None) or getattr(dm, "in_channels", None) or 1
        size = self.probe_size or getattr(dm, "patch_size", None)
        if size is None:
            if dims is None:
                raise UserError("Distillation: cannot tell the student's spatial_dims; set probe_size")
            divisor = max(getattr(m, "divisor", 16) for m in (net, *(self.teacher.members if self.teacher else [])))
            size = [2 * divisor] * int(dims)
        return torch.zeros(1, int(channels), *[int(s) for s in size], device=pl_module.device)

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, tuple[int, int]]:
        """Run student and teacher once on a dummy input: check the outputs agree and
        return ``{feature term name: (student channels, teacher channels)}``."""
        net = self._student(pl_module)
        x = self._probe_input(trainer, pl_module)
        with torch.no_grad(), _eval_mode(net):
            if self._student_tap:
                self._student_tap.start()
            student_out = main_output(net(x))
            s_feats = self._student_tap.take() if self._student_tap else {}
        if self._student_tap:
            self._student_tap.stop()
        if self.offline:
            self._check_classes(student_out.shape[1], self.cache.num_classes, self._source_name)
            return {}
        self.teacher.to(x.device)
        try:
            t_logits, t_feats = self._run_teacher(x)
        except (RuntimeError, ValueError) as exc:  # shape errors from conv/norm layers
            raise UserError(f"{self._source_name} cannot run on the student's input {tuple(x.shape)}: "
                            f"{' '.join(str(exc).split())[:200]}") from None
        self._check_logits(student_out, t_logits)
        channels = {}
        for term in self._layer_terms:
            s, t = s_feats[term.student], t_feats[term.teacher]
            if s.dim() != t.dim() or s.dim() not in (4, 5):
                raise UserError(f"Distillation: {term.name}: student {term.student!r} gives {tuple(s.shape)}, teacher "
                                f"{term.teacher!r} gives {tuple(t.shape)}; both must be [B, C, *spatial] of equal rank")
            channels[term.name] = (s.shape[1], t.shape[1])
        return channels

    def _check_classes(self, student: int, teacher: int, what: str) -> None:
        if student != teacher:
            raise UserError(f"Distillation: {what} has {teacher} classes but the student outputs {student}; "
                            "teacher and student must share the label set (model.num_classes)")

    def _check_logits(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        self._check_classes(student.shape[1], teacher.shape[1], self._source_name)
        if student.shape != teacher.shape:
            raise UserError(f"Distillation: {self._source_name} logits {tuple(teacher.shape)} and student logits "
                            f"{tuple(student.shape)} differ in shape for the same input; are both "
                            "networks of the same spatial_dims and size-preserving?")

    # ------------------------------------------------------------------ fit hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher is not None:
            self.teacher.to(pl_module.device)
        if self._student_tap:
            self._student_tap.attach(self._student(pl_module))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.cache is not None:
            self.cache.prefetch(trainer, batch)  # replays crops while the student runs forward
        if not self._student_tap:
            return
        net = self._student(pl_module)
        self._student_tap.attach(net)  # follows modules swapped since the last batch
        seen = len(history(net))
        if seen != self._structure_seen:
            self._follow_resized_layers(trainer, pl_module, batch["image"][:1])
            self._structure_seen = seen
        self._student_tap.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._student_tap:
            self._student_tap.stop()
            self._student_tap.clear()

    def _follow_resized_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, image: torch.Tensor) -> None:
        """After a structural change of the student, measure its distilled layers and resize
        the adapters of those whose width changed (see :meth:`Adapters.follow`)."""
        net = self._student(pl_module)
        with torch.no_grad(), _eval_mode(net):
            self._student_tap.start()
            net(image)
            feats = self._student_tap.take()
        self._student_tap.stop()
        widths = {t.name: (t.student, int(feats[t.student].shape[1])) for t in self.features}
        self.adapters.follow(trainer, pl_module, widths, history(net))

    # ------------------------------------------------------------------ loss terms
    def loss_terms(self, pl_module: pl.LightningModule, batch: Mapping[str, Any],
                   outputs: torch.Tensor | list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted distillation terms of one training (micro-)batch."""
        outs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        s_feats = {}
        if self._student_tap:
            self._student_tap.stop()
            s_feats = self._student_tap.take()
        t_logits, t_feats, mask = self.teacher_targets(pl_module, batch)
        self._check_logits(outs[0], t_logits)
        if self.correct_only:
            right = t_logits.argmax(1) == batch["label"].to(t_logits.device)
            if "labelled" in batch:  # an unlabelled sample has no label to check against: all of it counts
                unlabelled = ~batch["labelled"].to(right.device)
                right |= unlabelled.view(-1, *[1] * (right.dim() - 1))
            mask = right if mask is None else mask & right
        with torch.autocast(device_type=outs[0].device.type, enabled=False):
            return self._weighted_terms(pl_module, outs, s_feats, t_logits, t_feats, mask)

    def teacher_targets(self, pl_module: pl.LightningModule, batch: Mapping[str, Any]):
        """``(teacher logits, teacher features, valid mask or None)`` for ``batch``: run the
        teacher (online) or read the cached logits aligned with the batch (offline)."""
        if self.offline:
            logits, mask = self.cache.batch_logits(self._trainer, batch)
            return logits.to(batch["image"].device), {}, mask
        image = batch["image"]
        if next(self.teacher.parameters()).device != image.device:
            self.teacher.to(image.device)
        logits, feats = self._run_teacher(image)
        return logits, feats, None

    def _run_teacher(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.teacher.eval()
        with torch.no_grad(), _teacher_precision(image, self.teacher):
            if self._teacher_tap:
                self._teacher_tap.start()
            logits = self.teacher(as_input(image, self.teacher, image.device))
            feats = self._teacher_tap.take() if self._teacher_tap else {}
        if self._teacher_tap:
            self._teacher_tap.stop()
        return logits, feats

    def _weighted_terms(self, pl_module, outs, s_feats, t_logits, t_feats, mask) -> dict[str, torch.Tensor]:
        T, terms = self.temperature, {}
        if self.kd_weight > 0:
            target = losses.tempered_log_probs(t_logits, T)
            terms["kd"] = self.kd_weight * losses.logit_kd(outs[0], target, T, mask)
        if self.kd_ds_weight > 0 and len(outs) > 1:
            terms["kd_ds"] = self.kd_ds_weight * losses.deep_supervision_kd(outs, t_logits, T, self.ds_weights, mask)
        if self.cwd_weight > 0:
            terms["cwd"] = self.cwd_weight * losses.channel_wise_kd(outs[0], t_logits, self.cwd_temperature, mask)
        for term in self.features:
            student = s_feats[term.student].float()
            adapter = self.adapters[term.name]
            if isinstance(adapter, nn.Conv2d | nn.Conv3d) and student.shape[1] != adapter.in_channels:
                raise UserError(f"Distillation: student layer {term.student!r} has {student.shape[1]} channels but "
                                f"its adapter expects {adapter.in_channels}; did a technique resize it?")
            # the adapter is trained with the student: half under DeepSpeed or a `*-true` precision
            adapted = adapter(student.to(param_dtype(adapter)))
            terms[term.name] = term.weight * losses.feature_mse(adapted, t_feats[term.teacher])
        for term in self.affinity:
            grid = term.grid or (16 if s_feats[term.student].dim() == 4 else 8)
            terms[term.name] = term.weight * losses.pairwise_affinity(s_feats[term.student], t_feats[term.teacher], grid)
        return terms

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Plain data only (checkpoints load with ``weights_only=True``)."""
        return {
            "teachers": [dict(i) for i in self.teacher_infos],
            "cache": self.cache.describe() if self.cache is not None else None,
            "ensemble": self.ensemble,
            "temperature": self.temperature,
            "features": [asdict(t) for t in self.features],
            "affinity": [asdict(t) for t in self.affinity],
            "adapters": self.adapters.state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume, refuse a teacher that differs from the one the run started with."""
        saved = [t.get("sha256") for t in state_dict.get("teachers", [])]
        current = [t.get("sha256") for t in self.teacher_infos]
        if self.teacher_infos and saved and saved != current:
            raise UserError(
                f"Distillation: the checkpoint was trained with teacher(s) "
                f"{[(t.get('path'), t.get('sha256', '')[:12]) for t in state_dict['teachers']]} but this run loads "
                f"{[(t['path'], t['sha256'][:12]) for t in self.teacher_infos]}; resume with the same teacher files"
            )
        self.adapters.load(state_dict.get("adapters") or {}, bool(self._trainer and self._trainer.optimizers))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for tap in (self._student_tap, self._teacher_tap):
            if tap:
                tap.stop()
        if self.cache is not None:
            self.cache.close()
