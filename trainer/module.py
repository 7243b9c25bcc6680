"""The segmentation LightningModule: one network, Dice+CE, Dice per class, any optimizer.

A batch travels: ``batch["image"] -> self.net -> logits (or deep-supervision list)
-> DiceCE + loss terms of technique callbacks -> backward``. Validation runs the network on
whole slices (2D) or by sliding window over whole volumes (3D) through
``trainer.inference.predict_logits``, the same function export verification uses.
"""
from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import nn
from torchmetrics.segmentation import DiceScore

from trainer.checkpointing import load_checkpoint
from trainer.errors import UserError
from trainer.inference import predict_logits
from trainer.losses import DiceCE
from trainer.models import netinfo
from trainer.protocols import LossContributor
from trainer.structure import CHECKPOINT_KEY, history, replay


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
        sw_overlap: sliding-window overlap. Default 0.5.
        divisor: whole-image inputs are padded to a multiple of this; ``None`` reads it from
            the net (``divisor``, MONAI's ``strides``...; ``trainer.models.netinfo``), else 16.
        class_names: names for per-class metrics; ``None`` takes them from the datamodule.
        init_from: a checkpoint of this framework whose network (structure history and
            weights) this run starts from, e.g. the previous stage of a pipeline. Only the
            network is taken: optimizer, schedule and loops start fresh. A resumed run
            (``--ckpt_path``) then overwrites it with its own checkpoint.
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
        self.val_dice = self._dice_metric()
        self.test_dice = self._dice_metric()
        if init_from:
            # In __init__, before any technique callback converts the net in its setup, so a
            # QAT or pruning stage starts from the previous stage's exact network.
            load_net_from_checkpoint(self.net, init_from)

    def _dice_metric(self) -> DiceScore:
        # Global aggregation sums overlaps over the whole set: per-sample Dice of a small
        # lesion absent from most slices would be dominated by empty slices.
        return DiceScore(
            num_classes=self.num_classes, include_background=False, average="none",
            aggregation_level="global", input_format="index",
        )

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

    def supervised_loss(self, outputs, batch: dict[str, Any]) -> torch.Tensor:
        """``self.loss`` over the batch's labelled samples. Unlabelled samples (there for
        distillation) carry placeholder labels and are left out; a batch of only unlabelled
        samples gives a zero that still touches every output, so DDP sees every parameter used."""
        labelled = batch.get("labelled")
        if labelled is None or bool(labelled.all()):
            return self.loss(outputs, batch["label"])
        many = isinstance(outputs, (list, tuple))
        if not bool(labelled.any()):
            return sum(o.sum() for o in (outputs if many else [outputs])) * 0.0
        keep = labelled.to(batch["label"].device)
        return self.loss([o[keep] for o in outputs] if many else outputs[keep], batch["label"][keep])

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
        return predict_logits(self.net, image, self.roi_size, self.sw_overlap, self.divisor)

    def _eval_step(self, batch: dict[str, Any], metric: DiceScore, prefix: str) -> None:
        logits = self.predict_full(batch["image"])
        self._check_output(logits, batch)
        metric.update(logits.argmax(1), batch["label"])
        loss = self.loss(logits, batch["label"])
        self.log(f"{prefix}/loss", loss, batch_size=batch["image"].shape[0], sync_dist=True)

    def _eval_epoch_end(self, metric: DiceScore, prefix: str) -> None:
        # foreground classes, NaN where never present; torchmetrics returns a 0-d tensor when
        # there is one foreground class (binary segmentation)
        per_class = metric.compute().reshape(-1)
        metric.reset()
        names = (self.class_names or [])[1:] or [f"class{i}" for i in range(1, self.num_classes)]
        for name, value in zip(names, per_class):
            self.log(f"{prefix}/dice_{name}", torch.nan_to_num(value, 0.0), sync_dist=False)
        self.log(f"{prefix}/dice", torch.nanmean(per_class), prog_bar=True, sync_dist=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_dice, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_dice, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_dice, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_dice, "test")

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
        self._check_checkpoint_fits(checkpoint)

    def _check_checkpoint_fits(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in one line, a checkpoint whose weights do not fit this recipe's network
        (Lightning's strict load would stop with a traceback a moment later)."""
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
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
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
