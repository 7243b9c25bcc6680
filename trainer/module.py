"""The segmentation LightningModule: one network, Dice+CE, Dice and HD95 per class, any optimizer.

A batch travels: ``batch["image"] -> self.net -> logits (or deep-supervision list)
-> DiceCE + loss terms of technique callbacks -> backward``. Validation runs the network on
whole slices (2D) or by sliding window over whole volumes (3D) through
``trainer.inference.predict_logits`` with the module's ``InferenceSettings``, and scores it
with ``trainer.metrics.SegmentationMetrics``: the same code and settings export verification
and the report use.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import nn

from trainer import host_copy
from trainer.checkpointing import load_checkpoint
from trainer.errors import UserError
from trainer.inference import SW_BATCH_SIZE, InferenceSettings, predict_logits
from trainer.losses import DiceCE
from trainer.metrics import SegmentationMetrics
from trainer.models import netinfo
from trainer.protocols import LossContributor
from trainer.structure import CHECKPOINT_KEY, history, replay
from trainer.zero3_eval import EvenForwards, forward_passes, is_phantom, through_engine


def load_net_from_checkpoint(net: nn.Module, path: str) -> None:
    """Replay ``path``'s structural history on ``net`` and load its network weights."""
    ckpt = load_checkpoint(path)
    replay(net, ckpt.get(CHECKPOINT_KEY, {}).get("structure", []), source=str(path))
    weights = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        missing, unexpected = net.load_state_dict(weights, strict=False)
        problem = f"missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected or not weights else ""
    except RuntimeError as exc:  # shape mismatches
        problem = " ".join(str(exc).split())[:300]
    if problem:
        raise UserError(
            f"model.init_from={path}: its network weights do not fit {type(net).__name__} ({problem}); "
            "is it a checkpoint of the same net?"
        )


def _net_classes(net: nn.Module) -> int:
    for attr in ("num_classes", "out_channels"):
        if isinstance(getattr(net, attr, None), int):
            return getattr(net, attr)
    raise UserError(f"model.num_classes is not set and {type(net).__name__} has no num_classes/out_channels attribute; "
                    "set model.num_classes (classes including background)")


# SegmentationModule.on_before_batch_transfer is meant to run alongside any datamodule (which
# defines no such hook); Lightning warns about that combination on every fit.
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule`")


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


class SegmentationModule(pl.LightningModule):
    """Trains any segmentation ``nn.Module`` that maps ``[B, C, *S]`` to ``[B, K, *S]`` logits.

    Args:
        net: the network (recipe: ``class_path`` + ``init_args``; e.g. ``trainer.models.UNet``).
        num_classes: classes including background; checked against the data and the net.
            Set it once: in a recipe it fills the net's ``num_classes`` (or ``out_channels``)
            when that is left at its default (``trainer.recipe_rules``); ``None`` takes the
            net's ``num_classes``/``out_channels`` attribute.
        loss: supervised loss. Default ``DiceCE()``.
        supervised_weight: weight of the supervised loss among all loss terms. Default 1.0.
        optimizer: optimizer factory (recipe: ``class_path: torch.optim.AdamW``...).
            ``None``: AdamW(lr=1e-3, weight_decay=1e-4).
        lr_scheduler: optional scheduler factory, stepped per epoch.
        roi_size: sliding-window size for validation/test of volumes; ``None`` runs whole
            images (2D). Default None.
        sw_overlap: sliding-window overlap, used by validation, export verification and the
            report alike. Default 0.5.
        divisor: whole-image inputs are padded to a multiple of this; ``None`` reads it from
            the net (``divisor``, MONAI's ``strides``...; ``trainer.models.netinfo``), else 16.
        class_names: names for per-class metrics; ``None`` takes them from the datamodule.
        init_from: a checkpoint of this framework whose network (structure history and
            weights) this run starts from, e.g. the previous stage of a pipeline. Only the
            network is taken: optimizer, schedule and loops start fresh. A resumed run
            (``--ckpt_path``) then overwrites it with its own checkpoint.
        eval_hd95: compute HD95 (mm, per case volume; ``trainer.metrics``) at validation and
            test, logged as ``val/hd95`` and ``val/hd95_<class>``. Surface distances cost CPU
            time on large volumes; False logs Dice only. Default True.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int | None = None,
        loss: nn.Module | None = None,
        supervised_weight: float = 1.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        roi_size: Sequence[int] | None = None,
        sw_overlap: float = 0.5,
        divisor: int | None = None,
        class_names: Sequence[str] | None = None,
        init_from: str | None = None,
        eval_hd95: bool = True,
    ):
        super().__init__()
        num_classes = _net_classes(net) if num_classes is None else num_classes
        if num_classes < 2:
            raise UserError(f"model.num_classes={num_classes}: need at least 2 (background + one class)")
        if supervised_weight < 0:
            raise UserError(f"model.supervised_weight={supervised_weight}: must be >= 0")
        # Under LightningCLI the hparams are the recipe's own dicts (``class_path`` included),
        # which is what lets a checkpoint rebuild the net; built from Python, the modules and
        # factories themselves would be pickled (and break weights_only loading), so they
        # are left out.
        from_python = ["net", "loss", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(ignore=[] if _given_hyperparameters.get() else from_python)
        self.net = net
        self.num_classes = num_classes
        self.loss = loss if loss is not None else DiceCE()
        self.supervised_weight = supervised_weight
        self.optimizer_factory = optimizer or _adamw
        self.scheduler_factory = lr_scheduler
        self.roi_size = list(roi_size) if roi_size else None
        self.sw_overlap = sw_overlap
        self.divisor = divisor or netinfo.divisor(net)  # MONAI/nnU-Net nets: from their strides
        self.class_names = list(class_names) if class_names else None
        self.eval_hd95 = bool(eval_hd95)
        self.val_metrics = self._metrics()
        self.test_metrics = self._metrics()
        if init_from:
            # In __init__, before any technique callback converts the net in its setup, so a
            # QAT or pruning stage starts from the previous stage's exact network.
            load_net_from_checkpoint(self.net, init_from)

    def _metrics(self) -> SegmentationMetrics:
        # Pooled Dice sums overlaps over the whole set: per-slice Dice of a small lesion absent
        # from most slices would be dominated by empty slices. HD95 is per case volume.
        return SegmentationMetrics(self.num_classes, self.class_names, hd95=self.eval_hd95)

    @property
    def inference(self) -> InferenceSettings:
        """How whole images are predicted; export and the report take these same settings."""
        return InferenceSettings(self.roi_size, self.sw_overlap, self.divisor)

    # ---------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(dm, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise UserError(
                f"model.num_classes={self.num_classes} but the data has {data_classes} classes "
                f"({getattr(dm, 'path', 'datamodule')}); set model.num_classes={data_classes}"
            )
        if stage == "fit":
            self._check_unlabelled_use(dm)
        if self.class_names is None:
            names = getattr(dm, "class_names", None)
            self.class_names = list(names) if names else [f"class{i}" for i in range(self.num_classes)]
        self.val_metrics.class_names = self.test_metrics.class_names = list(self.class_names)

    def _check_unlabelled_use(self, dm) -> None:
        splits, store = getattr(dm, "splits", None), getattr(dm, "store", None)
        if not splits or store is None:
            return
        unlabelled = [store.cases[i].case_id for i in splits.get("train", []) if not store.cases[i].labelled]
        if unlabelled and not any(getattr(cb, "learns_from_unlabelled", False) for cb in self.trainer.callbacks):
            raise UserError(
                f"{getattr(dm, 'path', 'data')}: {len(unlabelled)} training cases are unlabelled (e.g. {unlabelled[0]!r}) "
                "but no callback learns from them; add the Distillation callback (its teacher labels them) or leave them out"
            )

    def forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.net(image)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # deep supervision stacked on one axis (MONAI's DynUNet) becomes the usual list
        outputs = netinfo.training_outputs(self.net(batch["image"]), batch["label"].dim())
        self._check_output(outputs, batch)
        terms = {"seg": self.supervised_weight * self.supervised_loss(outputs, batch)}
        for cb in self.trainer.callbacks if self._trainer else []:
            if isinstance(cb, LossContributor):
                terms.update(cb.loss_terms(self, batch, outputs))
        loss = torch.stack([t.float() for t in terms.values()]).sum()
        self._stop_if_not_finite(loss, terms, batch, batch_idx)
        bs = batch["image"].shape[0]
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value.detach(), batch_size=bs, sync_dist=False)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        return loss

    def _stop_if_not_finite(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], batch: dict[str, Any],
                            batch_idx: int) -> None:
        """A NaN/Inf loss stops the run before its backward: the weights (and any checkpoint
        written later) stay those of the last finite step. One scalar sync per step; under
        DDP every rank learns that one of them saw it, so none is left waiting in a collective."""
        bad = not bool(torch.isfinite(loss.detach()))
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))
        if not bad:
            return
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        image = batch["image"]
        cause = ("the batch's images contain NaN/Inf values (run `launch.py data inspect` on the data file)"
                 if not bool(torch.isfinite(image).all()) else
                 "lower the learning rate, set trainer.gradient_clip_val, or check the data with `launch.py data inspect`")
        step = self.trainer.global_step if self._trainer is not None else batch_idx
        cases = list(batch.get("case", []))[:4]
        raise UserError(f"training loss is not finite ({values}) at epoch {self.current_epoch}, step {step}, "
                        f"cases {cases} (or another rank's batch); stopped before this step's update, no checkpoint "
                        f"written for it; {cause}")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # the labelled flags and dataset keys, read on the CPU later without a host sync
        return host_copy.remember(batch)

    def supervised_loss(self, outputs, batch: dict[str, Any]) -> torch.Tensor:
        """``self.loss`` over the batch's labelled samples. Unlabelled samples (there for
        distillation) carry placeholder labels and are left out; a batch of only unlabelled
        samples gives a zero that still touches every output, so DDP sees every parameter used.

        Which samples are labelled is read from the batch's host copy (no GPU sync per step)
        and the labelled ones are selected by index (boolean-mask indexing would sync too)."""
        labelled = batch.get("labelled")
        if labelled is None:
            return self.loss(outputs, batch["label"])
        host = host_copy.of(batch)
        flags = host.labelled if host is not None and host.labelled is not None else labelled.tolist()
        if all(flags):
            return self.loss(outputs, batch["label"])
        many = isinstance(outputs, (list, tuple))
        if not any(flags):
            return sum(o.sum() for o in (outputs if many else [outputs])) * 0.0
        keep = torch.tensor([i for i, f in enumerate(flags) if f], dtype=torch.long).to(batch["label"].device, non_blocking=True)
        pick = lambda t: t.index_select(0, keep)  # noqa: E731
        return self.loss([pick(o) for o in outputs] if many else pick(outputs), pick(batch["label"]))

    def _check_output(self, outputs, batch) -> None:
        main = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        want = (batch["image"].shape[0], self.num_classes, *batch["label"].shape[1:])
        if tuple(main.shape) != want:
            raise UserError(
                f"{type(self.net).__name__} output shape {tuple(main.shape)} != expected {want} "
                f"[batch, num_classes, *label spatial]; check the net's num_classes and spatial_dims"
            )

    # ---------------------------------------------------------------- evaluation
    def predict_full(self, image: torch.Tensor) -> torch.Tensor:
        """Logits for whole slices or volumes (sliding window when ``roi_size`` is set)."""
        return predict_logits(self.net, image, settings=self.inference)

    def _eval_step(self, batch: dict[str, Any], metric: SegmentationMetrics, prefix: str, batch_idx: int = 0) -> None:
        if EvenForwards.needed(self.net, self._trainer):
            logits = self._even_forwards_step(batch["image"], batch_idx)
        else:
            logits = self.predict_full(batch["image"])
        self._check_output(logits, batch)
        metric.update(logits.argmax(1), batch["label"], batch)
        loss = self.loss(logits, batch["label"])
        self.log(f"{prefix}/loss", loss, batch_size=batch["image"].shape[0], sync_dist=True)

    def _even_forwards_step(self, image: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """``predict_full`` in lockstep with the other ranks: under DeepSpeed ZeRO-3 every
        forward pass is a collective (see :mod:`trainer.zero3_eval`)."""
        trainer = self.trainer
        counts = (trainer.num_sanity_val_batches if trainer.sanity_checking else
                  trainer.num_test_batches if trainer.testing else trainer.num_val_batches)
        if getattr(self, "_even", None) is None or batch_idx == 0:
            self._even = EvenForwards(self.net, image, self.roi_size or [self.divisor] * (image.dim() - 2))
        passes = forward_passes(image.shape, self.roi_size, self.sw_overlap, SW_BATCH_SIZE)
        run = lambda fn: predict_logits(fn, image, settings=self.inference)  # noqa: E731
        method = "test_step" if trainer.testing else "validation_step"
        step = lambda phantom: through_engine(trainer.strategy.model, self, method, phantom, batch_idx)  # noqa: E731
        return self._even.batch(trainer, batch_idx, int(counts[0]), passes, run, step)

    def _eval_epoch_end(self, metric: SegmentationMetrics, prefix: str) -> None:
        # summed states are synchronised across ranks by the metric itself (sync_dist=False)
        scores = metric.compute()
        metric.reset()
        nan = float("nan")
        for name, value in scores.dice.items():  # a class never present anywhere logs 0
            self.log(f"{prefix}/dice_{name}", 0.0 if value is None else value, sync_dist=False)
        self.log(f"{prefix}/dice", nan if scores.mean_dice is None else scores.mean_dice, prog_bar=True, sync_dist=False)
        if self.eval_hd95:
            for name, value in scores.hd95.items():
                self.log(f"{prefix}/hd95_{name}", nan if value is None else value, sync_dist=False)
            self.log(f"{prefix}/hd95", nan if scores.mean_hd95 is None else scores.mean_hd95, sync_dist=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if is_phantom(batch):  # ZeRO-3 lockstep for a rank out of batches (trainer/zero3_eval.py)
            return self._even.phantom_round(self.trainer)
        self._eval_step(batch, self.val_metrics, "val", batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if is_phantom(batch):
            return self._even.phantom_round(self.trainer)
        self._eval_step(batch, self.test_metrics, "test", batch_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metrics, "test")

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Never write a checkpoint full of NaN/Inf (the loss check stops a run at the first
        # non-finite loss; this catches weights that overflowed in a step with a finite loss).
        bad = next((name for name, p in self.net.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise UserError(f"network weight {bad!r} holds NaN/Inf values at epoch {self.current_epoch}, step "
                            f"{self.global_step}; the checkpoint was not written. Lower the learning rate or set "
                            "trainer.gradient_clip_val")
        checkpoint.setdefault(CHECKPOINT_KEY, {})["structure"] = history(self.net)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Called by Lightning before the state dict is loaded and before optimizers are
        # built: replaying pruning/QAT here makes the weights fit and the optimizer see the
        # final parameters.
        replay(self.net, checkpoint.get(CHECKPOINT_KEY, {}).get("structure", []))
        self.check_checkpoint_fits(checkpoint, getattr(self._trainer, "ckpt_path", None) if self._trainer else None)

    def check_checkpoint_fits(self, checkpoint: dict[str, Any], path=None) -> None:
        """Refuse, in one line naming ``path``, a checkpoint whose weights do not fit this
        recipe's network (Lightning's strict load would stop with a traceback a moment later)."""
        if "state_dict" not in checkpoint:  # DeepSpeed: its engine holds (and checks) the weights
            return
        theirs, mine = checkpoint["state_dict"], self.state_dict()
        missing = [k for k in mine if k not in theirs]
        unexpected = [k for k in theirs if k not in mine]
        shapes = [f"{k} {list(theirs[k].shape)} vs {list(mine[k].shape)}" for k in mine
                  if k in theirs and hasattr(theirs[k], "shape") and tuple(theirs[k].shape) != tuple(mine[k].shape)]
        if not (missing or unexpected or shapes):
            return
        details = "; ".join(part for part in (
            f"shapes differ: {', '.join(shapes[:2])}" if shapes else "", f"missing {missing[:2]}" if missing else "",
            f"unexpected {unexpected[:2]}" if unexpected else "") if part)
        net = (checkpoint.get("hyper_parameters") or {}).get("net")
        made_by = ""
        if isinstance(net, dict):
            made_by = f"; it was trained with model.net {net.get('class_path')} {dict(net.get('init_args') or {})}"
        raise UserError(f"checkpoint {path or ''} does not fit this recipe's {type(self.net).__name__} ({details}){made_by}; "
                        "resume with the recipe that wrote it, or start from its network with model.init_from")

    def on_train_start(self) -> None:
        # A run resumed with a new trainer.max_epochs: the scheduler state restored from the
        # checkpoint carries the old length; the recipe's (which follows max_epochs) wins.
        for config in self.trainer.lr_scheduler_configs[:1]:
            for attr, wanted in getattr(self, "_schedule_length", {}).items():
                setattr(config.scheduler, attr, wanted)

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        # Only trainable parameters: technique callbacks may hold frozen modules (a teacher)
        # or learnable quantizer scales that they register on the net itself.
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = _build("model.optimizer", self.optimizer_factory, params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = _build("model.lr_scheduler", self.scheduler_factory, optimizer)
        # the length the recipe asks for, kept off the scheduler (whose state the checkpoint restores)
        self._schedule_length = {a: getattr(scheduler, a) for a in ("T_max", "total_iters") if hasattr(scheduler, a)}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def _build(key: str, factory, arg):
    # Optimizers and schedulers are built here, not by the recipe parser: a bad value in the
    # recipe (lr=-1, T_max=0...) surfaces as their ValueError/TypeError/ZeroDivisionError.
    try:
        return factory(arg)
    except (ValueError, TypeError, ZeroDivisionError) as exc:
        raise UserError(f"{key}: {type(exc).__name__}: {exc}") from None
