"""Iterative prune-retrain loops (structured channel removal or unstructured sparsity) as a Callback.

A run is ``rounds`` rounds of *prune, then retrain for* ``epochs_per_round`` *epochs*; the
cumulative ratio grows to ``target_ratio`` linearly or by the cubic AGP schedule
(:mod:`trainer.prune.schedule`). What a ratio means:

* ``method: structured`` -- fraction of each prunable layer's *original output channels*
  physically removed (Torch-Pruning's dependency graph cuts every coupled layer: skip
  concatenations, residual adds, ConvTranspose, Batch/Instance norms); kept counts rounded to
  multiples of ``round_to``. The output head and deep-supervision heads keep their outputs.
* ``method: unstructured`` -- fraction of all conv/linear weights set to zero by global
  magnitude (masks; no speed-up on dense kernels), folded into the weights at the end of fit.

When things happen (``fit``):

* ``setup``: check the strategy and names, and -- for a round scheduled at epoch 0 -- prune
  already, before the optimizer and DDP exist and before callbacks listed later (QAT,
  distillation) see the network. The starting network is the model's: a trained one comes
  from ``model.init_from`` (loaded in the module's ``__init__``, so before this ``setup``).
* ``on_train_epoch_start``: later rounds prune (all ranks identically: weights are equal
  after DDP's all-reduce, Taylor gradients are summed over ranks, and the kept channels are
  compared across ranks), then the DDP wrapper, optimizers and schedulers are rebuilt
  (:mod:`trainer.prune.rebuild`; state sliced to the kept channels, or LR rewound).
* after each round's last retraining epoch (validation end), and at the end of fit: a row of
  the round table (round, last trained epoch, channels kept, params, MACs, val Dice; round 0
  is the unpruned network), logged to the Lightning loggers as ``prune/*`` and written to
  ``<log_dir>/prune_rounds.{csv,md}``.
* ``on_train_end``: unstructured masks made permanent (``prune.remove``).

Resume: each round is recorded in the network's structural history
(``trainer.structure.record``; state = kept channel indices per layer, plain data), which
``SegmentationModule.on_load_checkpoint`` replays before the weights and the optimizer are
loaded; this callback's ``state_dict`` holds the schedule position (rounds done) and the
table. A run killed mid-round continues exactly.

Composition (order in ``trainer.callbacks``): ``PruneRetrain`` first, then
``QuantizationAwareTraining`` (rounds must happen at or before its ``start_epoch``: e.g.
rounds at epochs 0 and 2 with ``epochs_per_round: 2``, QAT ``start_epoch: 4`` fine-tunes the
pruned net quantized from epoch 4 on, in one run), then ``Distillation`` (logit KD from the
unpruned model: give it ``teacher:`` the same checkpoint as ``model.init_from``).

Recipe::

    - class_path: trainer.callbacks.prune.PruneRetrain
      init_args: {target_ratio: 0.5, rounds: 3, epochs_per_round: 2, importance: l1, round_to: 8}
    # with model.init_from: runs/unet2d_phantom/checkpoints/best.ckpt (the trained network)
"""
from __future__ import annotations

import itertools
import json
import math
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from trainer import collectives
from trainer.errors import UserError
from trainer.precision import batch_for, forward_context
from trainer.prune import sparsity
from trainer.prune.measure import measure
from trainer.prune.rebuild import rebuild_optimizers, snapshot
from trainer.prune.report import write_table
from trainer.prune.schedule import SCHEDULES, Schedule, check_ratio
from trainer.prune.structured import (
    IMPORTANCES, StructuredPrune, example_input, output_layers, prune_channels, resolve, taylor_gradients,
)
from trainer.structure import history, record

METHODS = ("structured", "unstructured")
STATE_VERSION = 1


def _is_quantized(net: nn.Module) -> bool:
    return any(hasattr(m, "weight_quant") for m in net.modules())


class PruneRetrain(pl.Callback):
    """Prune ``pl_module.net`` in rounds and retrain between them.

    Args:
        method: ``"structured"`` (remove channels) or ``"unstructured"`` (zero weights).
            Default ``"structured"``.
        target_ratio: cumulative ratio after the last round, in (0, 1); see the module doc
            for its meaning per method. Default 0.5.
        rounds: pruning events. Default 3.
        epochs_per_round: retraining epochs after each pruning event. Default 2.
        start_epoch: epoch at whose start the first round prunes (0: in ``setup``). Default 0.
        schedule: ``"linear"`` or ``"cubic"`` (AGP, Zhu & Gupta 2017). Default ``"linear"``.
        importance: channel score: ``"l1"``, ``"l2"`` (weight magnitude), ``"bn_scale"``
            (|gamma| of Batch/Instance norms), ``"taylor"`` (|w * dL/dw| summed over
            ``taylor_batches`` training batches). Structured only. Default ``"l1"``.
        global_pruning: rank all layers' channels together instead of layer by layer.
            Default False.
        layer_ratios: ``{layer or container name: final ratio}`` overriding
            ``target_ratio`` for those layers (scaled by the same schedule). Default none.
        protected: layer names whose output channels are kept, besides the output layers
            (always protected). Default none.
        round_to: kept channel counts are multiples of this (e.g. 8). Default 1.
        taylor_batches: training batches whose gradients feed ``taylor``. Default 4.
        taylor_accumulate: ``"sum"`` scores ``|w * sum_b g_b|`` (gradients summed over the
            batches), ``"abs"`` scores ``sum_b |w * g_b|`` (their magnitudes summed: no
            cancellation between batches near a fit). Default ``"sum"``.
        rewind_lr: after each round, restart optimizer and scheduler at the recipe's
            initial LR (LR rewinding) instead of carrying their state over. Default False.
        example_shape: input shape used to trace the network, e.g. ``[2, 1, 64, 64]``. Not
            needed: by default ``[2, in_channels, *patch_size]`` from the datamodule (the data
            the network trains on), else ``[2, in_channels, 2*divisor, ...]`` read from the
            network (``trainer.models.netinfo``: MONAI's and nnU-Net's networks included).
        make_permanent: unstructured: fold masks into the weights at the end of fit.
            Default True.
        report_dir: where ``prune_rounds.csv/.md`` go; default the trainer's ``log_dir``.
    """

    def __init__(
        self,
        method: Literal["structured", "unstructured"] = "structured",
        target_ratio: float = 0.5,
        rounds: int = 3,
        epochs_per_round: int = 2,
        start_epoch: int = 0,
        schedule: Literal["linear", "cubic"] = "linear",
        importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l1",
        global_pruning: bool = False,
        layer_ratios: dict[str, float] | None = None,
        protected: list[str] | None = None,
        round_to: int = 1,
        taylor_batches: int = 4,
        taylor_accumulate: Literal["sum", "abs"] = "sum",
        rewind_lr: bool = False,
        example_shape: list[int] | None = None,
        make_permanent: bool = True,
        report_dir: str | None = None,
    ):
        if method not in METHODS:
            raise UserError(f"PruneRetrain.method={method!r}: must be one of {list(METHODS)}")
        if importance not in IMPORTANCES:
            raise UserError(f"PruneRetrain.importance={importance!r}: must be one of {list(IMPORTANCES)}")
        if schedule not in SCHEDULES:
            raise UserError(f"PruneRetrain.schedule={schedule!r}: must be one of {list(SCHEDULES)}")
        for arg, value in (("rounds", rounds), ("epochs_per_round", epochs_per_round), ("round_to", round_to),
                           ("taylor_batches", taylor_batches), ("start_epoch", start_epoch + 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"PruneRetrain.{arg}={value if arg != 'start_epoch' else start_epoch!r}: "
                                f"must be an integer >= {0 if arg == 'start_epoch' else 1}")
        self.method = method
        self.schedule = Schedule(check_ratio(target_ratio, "PruneRetrain.target_ratio"), rounds,
                                 epochs_per_round, start_epoch, schedule)
        self.layer_ratios = {str(k): check_ratio(v, f"PruneRetrain.layer_ratios[{k!r}]") for k, v in (layer_ratios or {}).items()}
        if self.layer_ratios and method != "structured":
            raise UserError("PruneRetrain.layer_ratios: only for method: structured")
        if isinstance(protected, str):
            raise UserError(f"PruneRetrain.protected={protected!r}: must be a list of layer names")
        self.protected = list(protected or [])
        self.importance = importance
        self.global_pruning = bool(global_pruning)
        self.round_to = round_to
        self.taylor_batches = taylor_batches
        if taylor_accumulate not in ("sum", "abs"):
            raise UserError(f"PruneRetrain.taylor_accumulate={taylor_accumulate!r}: must be 'sum' or 'abs'")
        self.taylor_accumulate = taylor_accumulate
        self.rewind_lr = bool(rewind_lr)
        self.example_shape = list(example_shape) if example_shape else None
        self.make_permanent = bool(make_permanent)
        self.report_dir = report_dir
        # schedule position and results: in the checkpoint
        self.rounds_done = 0
        self.rows: list[dict[str, Any]] = []
        self._baseline: dict[str, float] = {"dice": float("nan")}  # val Dice before round 1
        self._outputs: list[str] | None = None

    # ------------------------------------------------------------------ public API
    @property
    def ratios(self) -> list[float]:
        """Cumulative ratio after each round."""
        return self.schedule.ratios

    @property
    def finished(self) -> bool:
        return self.rounds_done >= self.schedule.rounds

    def prune_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizers_exist: bool = True) -> dict[str, Any] | None:
        """Prune once to the next round's ratio (override point); returns the plan (structured)."""
        net = self._net(pl_module)
        if _is_quantized(net):
            raise UserError("PruneRetrain: the network is already quantized; list PruneRetrain before "
                            "QuantizationAwareTraining in trainer.callbacks, and give QAT a start_epoch at or "
                            "after the last round")
        index, ratio = self.rounds_done, self.ratios[self.rounds_done]
        if index == 0:
            self._add_row(trainer, pl_module, 0, self._baseline, epoch=trainer.current_epoch - 1)
        before = snapshot(trainer, pl_module) if optimizers_exist else None
        plan = None
        if self.method == "structured":
            if self.importance == "taylor":
                self._taylor(trainer, pl_module, net)
            fraction = ratio / self.schedule.target
            plan = prune_channels(
                net, ratio, importance=self.importance, global_pruning=self.global_pruning,
                layer_ratios={k: v * fraction for k, v in self.layer_ratios.items()},
                protected=self.protected, round_to=self.round_to, example_shape=self._trace_shape(trainer, net),
            )
            plan["round"] = index + 1
            record(net, StructuredPrune, plan)
            self._check_ranks_agree(trainer, plan)
        else:
            sparsity.sparsify(net, ratio, protected=self._protected_and_outputs(trainer, net))
        if before is not None:
            rebuild_optimizers(trainer, pl_module, before, plan, rewind=self.rewind_lr)
        self.rounds_done += 1
        m = self._measure(trainer, net)
        rank_zero_info(f"PruneRetrain: round {self.rounds_done}/{self.schedule.rounds} at epoch "
                       f"{trainer.current_epoch}: ratio {ratio:.3f}, channels kept {m['channels_fraction']:.3f}, "
                       f"params {m['params']:,}, MACs {m['macs']:,}, non-zero weights {m['weights_nonzero_fraction']:.3f}")
        return plan

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        net = self._net(pl_module)
        self._check_strategy(trainer)
        self._check_order(trainer, net)
        resuming = trainer.ckpt_path is not None
        resolve(net, self.protected, "PruneRetrain.protected")
        resolve(net, list(self.layer_ratios), "PruneRetrain.layer_ratios")
        # A round due at epoch 0 prunes now: before the optimizer, DDP and later callbacks
        # (QAT converts in its setup) exist. On resume the checkpoint's history is replayed
        # after setup instead. The module is still on the CPU here; the strategy would move it
        # to its device next anyway, so move it first: the round's collectives then get the
        # device NCCL needs and the Taylor batches run on the GPU.
        if not resuming and self.schedule.due(self.rounds_done, 0):
            pl_module.to(collectives.comm_device(trainer))
            self._sync_from_rank0(trainer, net)
            self.prune_round(trainer, pl_module, optimizers_exist=False)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sparsity.match_mask_dtypes(self._net(pl_module))  # DeepSpeed casts parameters, not buffers
        if self.method == "structured":
            done = sum(e["converter"].endswith(".StructuredPrune") for e in history(self._net(pl_module)))
            if done < self.rounds_done:
                raise UserError(f"PruneRetrain: the checkpoint's state says {self.rounds_done} rounds are done but the "
                                f"network's pruning history holds {done}; the checkpoint and recipe do not match")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.due(self.rounds_done, trainer.current_epoch):
            self.prune_round(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        dice = self._scores(trainer)
        if self.rounds_done == 0 and trainer.current_epoch == self.schedule.start_epoch - 1:
            self._baseline = dice
        elif self.rounds_done > 0 and trainer.current_epoch == self.schedule.last_epoch_of(self.rounds_done - 1):
            self._add_row(trainer, pl_module, self.rounds_done, dice)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Epochs without validation still get their row (Dice from the last validation, if any).
        if self.rounds_done > 0 and trainer.current_epoch == self.schedule.last_epoch_of(self.rounds_done - 1):
            self._add_row(trainer, pl_module, self.rounds_done, self._scores(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A last row after fine-tuning epochs that follow the last round (or an interrupted one).
        if self.rounds_done > 0:
            self._add_row(trainer, pl_module, self.rounds_done, self._scores(trainer), epoch=trainer.current_epoch - 1)
        if self.method == "unstructured" and self.make_permanent:
            sparsity.make_permanent(self._net(pl_module))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "method": self.method, "rounds_done": self.rounds_done,
                "rounds": self.schedule.rounds, "target_ratio": self.schedule.target, "rows": [dict(r) for r in self.rows],
                "baseline": dict(self._baseline)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise UserError(f"PruneRetrain: checkpoint state version {state_dict.get('version')!r} is not {STATE_VERSION}")
        if state_dict["method"] != self.method:
            raise UserError(f"PruneRetrain: the checkpoint was pruned with method={state_dict['method']!r}, "
                            f"this recipe says {self.method!r}; resume with the same method")
        if state_dict["rounds_done"] > self.schedule.rounds:
            raise UserError(f"PruneRetrain: the checkpoint has done {state_dict['rounds_done']} rounds, this recipe "
                            f"has only rounds={self.schedule.rounds}")
        self.rounds_done = int(state_dict["rounds_done"])
        self.rows = [dict(r) for r in state_dict.get("rows", [])]
        self._baseline = dict(state_dict.get("baseline", {"dice": state_dict.get("baseline_dice", float("nan"))}))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _net(pl_module: pl.LightningModule) -> nn.Module:
        net = getattr(pl_module, "net", None)
        if not isinstance(net, nn.Module):
            raise UserError(f"PruneRetrain needs a LightningModule with a `net` network; {type(pl_module).__qualname__} has none")
        return net

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        kind = type(strategy).__name__
        if "DeepSpeed" in kind:
            stage = ((getattr(strategy, "config", None) or {}).get("zero_optimization") or {}).get("stage", 0)
            if self.method == "structured" or stage == 3:
                raise UserError(
                    f"PruneRetrain: {self.method} pruning is refused under {kind} (ZeRO stage {stage}): it changes "
                    "parameters mid-run, which DeepSpeed's partitioned parameters/optimizer cannot follow; prune with "
                    "strategy ddp or one device, then fine-tune under DeepSpeed with init_from the pruned checkpoint")
            if self.rewind_lr:
                raise UserError(f"PruneRetrain: rewind_lr=true is refused under {kind}: the DeepSpeed engine owns the "
                                "optimizer and cannot restart it mid-run; set rewind_lr: false or prune under ddp")
        if "FSDP" in kind or "ModelParallel" in kind:
            raise UserError(f"PruneRetrain: pruning is refused under {kind} (sharded, flattened parameters); "
                            "use strategy ddp or one device")

    def _check_order(self, trainer: pl.Trainer, net: nn.Module) -> None:
        callbacks = list(trainer.callbacks)
        mine = next(i for i, cb in enumerate(callbacks) if cb is self)
        qat = [i for i, cb in enumerate(callbacks) if type(cb).__name__ == "QuantizationAwareTraining"]
        if _is_quantized(net) or (qat and qat[0] < mine):
            raise UserError("PruneRetrain must come before QuantizationAwareTraining in trainer.callbacks "
                            "(the quantized layers cannot lose channels)")
        if not qat:
            return
        # PruneRetrain's hooks run first, so a round at QAT's start epoch still prunes a float net
        qat_start = getattr(callbacks[qat[0]], "start_epoch", 0)
        later = [e for e in (self.schedule.epoch_of(i) for i in range(self.rounds_done, self.schedule.rounds)) if e > qat_start]
        if later:
            raise UserError(
                f"PruneRetrain: rounds are scheduled at epochs {later}, after QuantizationAwareTraining converts the "
                f"net (its start_epoch: {qat_start}); set QuantizationAwareTraining.start_epoch to the last round's "
                f"epoch ({self.schedule.epoch_of(self.schedule.rounds - 1)}) or later")

    def _protected_and_outputs(self, trainer: pl.Trainer, net: nn.Module) -> list[str]:
        if self._outputs is None:
            self._outputs, _ = output_layers(net, example_input(net, self._trace_shape(trainer, net)))
        return [*self.protected, *self._outputs]

    @staticmethod
    def _data_input(trainer: pl.Trainer) -> tuple[int, list[int]] | None:
        """``(channels, patch size)`` of the training data, when the datamodule says."""
        dm = trainer.datamodule if trainer is not None else None
        patch, cin = getattr(dm, "patch_size", None), getattr(dm, "in_channels", None)
        if patch and isinstance(cin, int):
            return cin, [int(s) for s in patch]
        return None

    def _trace_shape(self, trainer: pl.Trainer, net: nn.Module) -> list[int] | None:
        """Input shape for tracing: ``example_shape``, else two training patches, else ``None``
        (the network's own attributes, see :func:`trainer.prune.structured.example_input`)."""
        if self.example_shape:
            return self.example_shape
        data = self._data_input(trainer)
        return [2, data[0], *data[1]] if data else None

    def _train_loader(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        """A fresh training loader (the running one is not touched: its position is checkpointed)."""
        dm = trainer.datamodule
        if dm is not None:
            return dm.train_dataloader()
        loader = trainer.train_dataloader
        if loader is None:
            raise UserError("PruneRetrain: importance 'taylor' needs training data; use a datamodule")
        return loader

    def _taylor(self, trainer: pl.Trainer, pl_module: pl.LightningModule, net: nn.Module) -> None:
        # the module's own supervised loss: it leaves out unlabelled samples (placeholder labels)
        loss = getattr(pl_module, "supervised_loss", None)
        if not callable(loss):
            raise UserError(f"PruneRetrain: importance 'taylor' needs {type(pl_module).__name__}.supervised_loss(outputs, batch)")
        rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        try:  # the extra batches must not shift the run's random stream
            # in the net's dtype (a `*-true` precision has cast it) and the trainer's autocast
            batches = (batch_for(b, net) for b in itertools.islice(self._train_loader(trainer, pl_module), self.taylor_batches))
            reduce = (lambda t: collectives.reduce(trainer, t, "sum")) if trainer.world_size > 1 else None
            with forward_context(trainer) if trainer.optimizers else nullcontext():
                n = taylor_gradients(net, batches, loss, reduce, self.taylor_accumulate)
        finally:
            torch.set_rng_state(rng[0])
            np.random.set_state(rng[1])
            random.setstate(rng[2])
        if n == 0:
            raise UserError("PruneRetrain: importance 'taylor' got no training batch")

    @staticmethod
    def _sync_from_rank0(trainer: pl.Trainer, net: nn.Module) -> None:
        """Before DDP exists (setup), ranks may hold different initial weights (no seed): give
        every rank rank 0's, so that all rank channels alike (DDP would broadcast them anyway)."""
        collectives.broadcast_(trainer, list(net.state_dict().values()), src=0)

    def _check_ranks_agree(self, trainer: pl.Trainer, plan: dict[str, Any]) -> None:
        if not collectives.digest_agrees(trainer, json.dumps(plan["layers"], sort_keys=True)):
            raise UserError("PruneRetrain: ranks chose different channels to remove (their weights differ); "
                            "structured pruning under DDP needs identical weights on every rank")

    def _measure_shape(self, trainer: pl.Trainer, net: nn.Module) -> list[int] | None:
        shape = self._trace_shape(trainer, net)
        return [1, *shape[1:]] if shape else None

    def _measure(self, trainer: pl.Trainer, net: nn.Module) -> dict[str, float]:
        return measure(net, self._measure_shape(trainer, net), protected=self._protected_and_outputs(trainer, net))

    @staticmethod
    def _scores(trainer: pl.Trainer) -> dict[str, float]:
        """The last validation's mean Dice and Dice per class (``dice``, ``dice_<class>``):
        per class, because a round can wipe out one small structure while the mean moves little."""
        scores = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items()
                  if k == "val/dice" or k.startswith("val/dice_")}
        return {"dice": float("nan"), **scores}

    def _add_row(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round_index: int, scores: dict[str, float],
                 epoch: int | None = None) -> None:
        """One table row: the network after ``round_index`` rounds, trained up to ``epoch``
        (the last completed epoch; -1: before any training of this run)."""
        epoch = trainer.current_epoch if epoch is None else epoch
        if any(r["round"] == round_index and r["epoch"] == epoch for r in self.rows):
            return
        net = self._net(pl_module)
        row = {"round": round_index, "epoch": epoch,
               "ratio": 0.0 if round_index == 0 else self.ratios[round_index - 1],
               **self._measure(trainer, net), **scores}
        self.rows.append(row)
        metrics = {f"prune/{k}": float(v) for k, v in row.items() if isinstance(v, (int, float)) and not
                   (isinstance(v, float) and math.isnan(v))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        # ``trainer.log_dir`` is a collective (a broadcast) under DDP: every rank asks.
        directory = Path(self.report_dir or trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            write_table(self.rows, directory)
