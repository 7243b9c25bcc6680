"""Quantization-aware training (int8, TensorRT explicit-quantization convention) as a Callback.

What happens when (``fit`` only):

* ``setup`` (``start_epoch: 0``, the default): turn every supported layer of ``pl_module.net``
  into its quantized class in place (``trainer.quant.modules``). To start from a trained model, give the model
  ``init_from: CKPT`` (``SegmentationModule``: loads the network, replaying its structural
  history, e.g. pruning, in ``__init__``, before any callback). This runs before the
  optimizer is built, so learnable scales are optimized, and after callbacks listed earlier
  (a pruning callback that prunes in its ``setup``), so whatever the net is by then is what
  gets quantized. A teacher held by a distillation callback is not part of ``pl_module.net``
  and is never touched.
* ``on_fit_start``: record the conversion in the net's structural history (done here, not
  in ``setup``, because on resume Lightning replays the checkpoint's history *after*
  ``setup``: a pruned-then-quantized run must then find the pruning first), and calibrate
  the scales on ``calib_batches`` training batches (skipped when the checkpoint's scales
  were restored).
* ``start_epoch: N > 0``: the same conversion and calibration at the start of epoch ``N``,
  then DDP, optimizers and schedulers are rebuilt around the quantized net (state carried
  over by parameter name, as after a pruning round): QAT after the rounds of a
  ``PruneRetrain`` listed before this callback, in one run. A checkpoint from before epoch
  ``N`` resumes float and converts at ``N``; one from after replays the conversion.
* each epoch start: from ``freeze_bn_epoch`` on, BatchNorm layers run on their running
  statistics (eval mode) and stop updating them; from ``freeze_ranges_epoch`` on, the
  scales are fixed (learnable scales get no gradient; otherwise the weight ranges stop
  following the weights).
* after each optimizer step (``on_train_batch_end``): without learnable scales and before
  the ranges freeze, weight scales are reset to the new weights' per-channel max.

Checkpoint: scales live in the net's ``state_dict`` (``<layer>.input_quant.scale``,
``<layer>.weight_quant.scale``); this callback's ``state_dict`` holds the flags
(``calibrated``, ``bn_frozen``, ``ranges_frozen``, ``schedule_epoch``); the conversion is in
``checkpoint["compressseg"]["structure"]``. A resumed run continues bit for bit.

Recipe (``trainer.callbacks``)::

    - class_path: trainer.callbacks.qat.QuantizationAwareTraining
      init_args: {calibration: percentile, calib_batches: 16, percentile: 99.99,
                  freeze_bn_epoch: 2, freeze_ranges_epoch: 4}
    # and under model: init_from: runs/unet2d_phantom/checkpoints/best.ckpt
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from trainer import collectives
from trainer.errors import UserError
from trainer.precision import as_input, forward_context
from trainer.quant.calibrate import METHODS, CalibrationReport, calibrate, quant_layers, set_weight_ranges
from trainer.quant.fake_quant import WEIGHT_BITS, weight_qmax
from trainer.quant.convert import (
    ON_UNSUPPORTED, FakeQuantConversion, is_quantized, quantization_entry, quantize_net,
)
from trainer.structure import record

STATE_VERSION = 1


def _check_epoch(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise UserError(f"QuantizationAwareTraining: {name}={value!r} must be an epoch number >= 0 or null (never)")


class QuantizationAwareTraining(pl.Callback):
    """Int8 QAT of ``pl_module.net``: per-channel weights, per-tensor inputs, zero-point 0.

    Args:
        calibration: activation range estimator before QAT: ``"max"``, ``"percentile"`` or
            ``"mse"`` (see ``trainer.quant.calibrate``). Weights always use per-channel max.
            Default ``"percentile"``.
        calib_batches: training batches used for calibration. Default 16.
        percentile: percentile of ``|x|`` for ``calibration="percentile"``, in (0, 100].
            Default 99.99.
        histogram_bins: histogram resolution for ``percentile``/``mse``. Default 2048.
        learnable_scales: learn the scales by gradient (LSQ, with its gradient scale).
            Default False (activation scales stay at their calibrated value, weight scales
            follow the weights' max until ``freeze_ranges_epoch``).
        freeze_bn_epoch: from this epoch on, BatchNorm uses and keeps its running
            statistics. ``None``: never. Default None.
        freeze_ranges_epoch: from this epoch on, all scales are fixed. ``None``: never.
            Default None.
        skip_modules: module paths of ``net`` kept in float (whole sub-trees), e.g.
            ``["head"]``. Each must exist. Default none.
        on_unsupported: a layer with parameters that cannot be quantized: ``"error"``
            (default) or ``"warn"`` (left in float).
        start_epoch: epoch at whose start the net is converted and calibrated. Default 0
            (in ``setup``, before the optimizer exists); later: after pruning rounds.
        weight_bits: 8 (int8 weights on [-127, 127], TensorRT's grid; default) or 7 (on
            [-63, 63]): the grid onnxruntime's x86 CPUs without VNNI multiply without
            overflowing, so the ``onnx-int8-cpu`` artifact keeps the trained weights exactly
            (from 8-bit weights it re-rounds them to 7 bits; measured -0.39 Dice points vs
            the QAT model in ``bench_int8_cpu.py``). TensorRT runs 7-bit weights too.

    A net that arrives already quantized (``model.init_from`` a PTQ/QAT checkpoint, or a
    second ``fit`` in one process) keeps its scales: no conversion, no calibration.
    """

    def __init__(
        self,
        calibration: Literal["max", "percentile", "mse"] = "percentile",
        calib_batches: int = 16,
        percentile: float = 99.99,
        histogram_bins: int = 2048,
        learnable_scales: bool = False,
        freeze_bn_epoch: int | None = None,
        freeze_ranges_epoch: int | None = None,
        skip_modules: list[str] | None = None,
        on_unsupported: Literal["error", "warn"] = "error",
        start_epoch: int = 0,
        weight_bits: int = 8,
    ):
        if calibration not in METHODS:
            raise UserError(f"QuantizationAwareTraining: calibration={calibration!r} must be one of {', '.join(METHODS)}")
        if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 1:
            raise UserError(f"QuantizationAwareTraining: calib_batches={calib_batches!r} must be an integer >= 1")
        if not 0 < float(percentile) <= 100:
            raise UserError(f"QuantizationAwareTraining: percentile={percentile!r} must be in (0, 100]")
        if isinstance(histogram_bins, bool) or not isinstance(histogram_bins, int) or histogram_bins < 16:
            raise UserError(f"QuantizationAwareTraining: histogram_bins={histogram_bins!r} must be an integer >= 16")
        _check_epoch("freeze_bn_epoch", freeze_bn_epoch)
        _check_epoch("freeze_ranges_epoch", freeze_ranges_epoch)
        _check_epoch("start_epoch", start_epoch)
        if start_epoch is None:
            raise UserError("QuantizationAwareTraining: start_epoch=None must be an epoch number >= 0")
        for name, value in (("freeze_bn_epoch", freeze_bn_epoch), ("freeze_ranges_epoch", freeze_ranges_epoch)):
            if value is not None and value < start_epoch:
                raise UserError(f"QuantizationAwareTraining: {name}={value} is before start_epoch={start_epoch}; "
                                "freezing starts at or after the conversion")
        if on_unsupported not in ON_UNSUPPORTED:
            raise UserError(f"QuantizationAwareTraining: on_unsupported={on_unsupported!r} must be one of {', '.join(ON_UNSUPPORTED)}")
        if weight_bits not in WEIGHT_BITS or isinstance(weight_bits, bool):
            raise UserError(f"QuantizationAwareTraining: weight_bits={weight_bits!r} must be one of "
                            f"{', '.join(map(str, WEIGHT_BITS))}")
        if skip_modules is not None and (isinstance(skip_modules, str) or not all(isinstance(s, str) for s in skip_modules)):
            raise UserError(f"QuantizationAwareTraining: skip_modules={skip_modules!r} must be a list of module paths")
        self.calibration = calibration
        self.calib_batches = calib_batches
        self.percentile = float(percentile)
        self.histogram_bins = histogram_bins
        self.learnable_scales = bool(learnable_scales)
        self.freeze_bn_epoch = freeze_bn_epoch
        self.freeze_ranges_epoch = freeze_ranges_epoch
        self.skip_modules = list(skip_modules or [])
        self.on_unsupported = on_unsupported
        self.start_epoch = start_epoch
        self.weight_bits = weight_bits
        # schedule position and flags: saved in the checkpoint
        self.calibrated = False
        self.bn_frozen = False
        self.ranges_frozen = False
        self.schedule_epoch = -1
        self.report: CalibrationReport | None = None
        self._pending: dict[str, Any] | None = None  # conversion state to record at fit start

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        net = self._net(pl_module)
        self._check_strategy(trainer)
        if is_quantized(net):
            # A second fit in the same process, or model.init_from a quantized (PTQ/QAT)
            # checkpoint: the scales are already there.
            self._pending = None
            self.calibrated = True
            return
        # start_epoch > 0: the float net trains first (a resumed run's history may still
        # replay the conversion after setup)
        self._pending = (quantize_net(net, self.skip_modules, self.on_unsupported, self.learnable_scales, self.weight_bits)
                         if self.start_epoch == 0 else None)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self._net(pl_module)
        entry = quantization_entry(net)
        if entry is None:
            if self._pending is None and self.start_epoch > 0 and not is_quantized(net):
                return  # converts at the start of epoch start_epoch
            if self._pending is None:
                raise UserError("QuantizationAwareTraining: the network was quantized outside this callback "
                                "without a structural record; quantize through the callback or `launch.py quantize`")
            record(net, FakeQuantConversion, self._pending)
        else:
            self._check_same(entry)
        if not self.calibrated:
            self.report = self._calibrate(trainer, pl_module, net)
            self.calibrated = True
        self._apply_schedule(trainer.current_epoch, net, trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self._net(pl_module)
        if not is_quantized(net):
            if trainer.current_epoch < self.start_epoch:
                return
            self._convert_mid_fit(trainer, pl_module, net)
        self._apply_schedule(trainer.current_epoch, net, trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.bn_frozen:  # Lightning may have put the whole module back in train mode
            _batchnorm_eval(self._net(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Runs after the optimizer step: the next forward (and any checkpoint written now)
        # sees scales that match the updated weights; learnable scales are stored positive.
        if self.ranges_frozen:
            return
        net = self._net(pl_module)
        if self.learnable_scales:
            for layer in quant_layers(net).values():
                layer.input_quant.project_scale()
                layer.weight_quant.project_scale()
        else:
            set_weight_ranges(net)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "calibrated": self.calibrated,
            "bn_frozen": self.bn_frozen,
            "ranges_frozen": self.ranges_frozen,
            "schedule_epoch": self.schedule_epoch,
            "calibration": self.calibration,
            "learnable_scales": self.learnable_scales,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise UserError(f"QuantizationAwareTraining: checkpoint state version {state_dict.get('version')!r} "
                            f"is not supported (this code reads {STATE_VERSION})")
        self.calibrated = bool(state_dict["calibrated"])
        self.bn_frozen = bool(state_dict["bn_frozen"])
        self.ranges_frozen = bool(state_dict["ranges_frozen"])
        self.schedule_epoch = int(state_dict["schedule_epoch"])

    # ------------------------------------------------------------------ helpers
    def _convert_mid_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, net: nn.Module) -> None:
        """``start_epoch > 0``: quantize, record, calibrate, then rebuild what holds parameters."""
        from trainer.prune.rebuild import rebuild_optimizers, snapshot

        before = snapshot(trainer, pl_module)
        state = quantize_net(net, self.skip_modules, self.on_unsupported, self.learnable_scales, self.weight_bits)
        record(net, FakeQuantConversion, state)
        self.report = self._calibrate(trainer, pl_module, net)
        self.calibrated = True
        # learnable scales are new parameters (optimizer, DDP); plain ones change nothing there,
        # but the rebuild is the same cheap path either way
        rebuild_optimizers(trainer, pl_module, before)
        rank_zero_info(f"QuantizationAwareTraining: quantized {len(state['layers'])} layers at the start of "
                       f"epoch {trainer.current_epoch}")

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        """Refuse, before any training, what a sharded strategy cannot follow (pruning has the same check)."""
        strategy = getattr(trainer, "strategy", None)
        kind = type(strategy).__name__
        if "FSDP" in kind or "ModelParallel" in kind:
            raise UserError(f"QuantizationAwareTraining: refused under {kind} (sharded, flattened parameters); "
                            "use strategy ddp or DeepSpeed")
        if "DeepSpeed" not in kind:
            return
        if self.learnable_scales:
            # found running ZeRO-2/3 on two CPU ranks: the engine broadcasts every parameter as
            # bytes (``p.data.view(torch.uint8)``), which a 0-dim tensor cannot be
            raise UserError(f"QuantizationAwareTraining: learnable_scales is refused under {kind}: a learnable "
                            "per-tensor scale is a 0-dim parameter, and DeepSpeed's engine fails to broadcast those "
                            "at start-up (\"self.dim() cannot be 0 to view ... as Byte\"); use learnable_scales: "
                            "false (the default) under DeepSpeed, or strategy ddp")
        stage = ((getattr(strategy, "config", None) or {}).get("zero_optimization") or {}).get("stage", 0)
        if self.start_epoch > 0 and stage == 3:
            raise UserError(f"QuantizationAwareTraining: start_epoch={self.start_epoch} is refused under {kind} "
                            f"(ZeRO stage 3): ZeRO-3 partitions the weights the conversion sizes its quantizers "
                            "from; use start_epoch: 0 (conversion before the engine exists), or strategy ddp")

    @staticmethod
    def _net(pl_module: pl.LightningModule) -> nn.Module:
        net = getattr(pl_module, "net", None)
        if not isinstance(net, nn.Module):
            raise UserError(f"QuantizationAwareTraining needs a LightningModule with a `net` network; "
                            f"{type(pl_module).__qualname__} has none")
        return net

    def _check_same(self, entry: dict[str, Any]) -> None:
        if entry.get("learnable_scales") != self.learnable_scales:
            raise UserError(
                f"QuantizationAwareTraining: the checkpoint was quantized with learnable_scales="
                f"{entry.get('learnable_scales')} but the callback has learnable_scales={self.learnable_scales}; "
                "use the same setting"
            )
        trained_range = entry.get("weight_range", [-127, 127])
        if trained_range[1] != weight_qmax(self.weight_bits):
            raise UserError(f"QuantizationAwareTraining: the checkpoint's weights use the range {trained_range} but the "
                            f"callback has weight_bits={self.weight_bits}; use the same setting")
        if self._pending is not None and entry["layers"] != self._pending["layers"]:
            diff = sorted(set(entry["layers"]) ^ set(self._pending["layers"]))
            raise UserError(f"QuantizationAwareTraining: the checkpoint quantized a different set of layers "
                            f"(differs in {diff[:4]}); use the same skip_modules to resume")

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, net: nn.Module) -> CalibrationReport:
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        loader = source.train_dataloader()
        # in the dtype the net holds now (DeepSpeed *-mixed and *-true precisions cast it to half)
        # and under the trainer's autocast, as the training step will feed it
        images = (as_input(_image(b), net, pl_module.device) for b in itertools.islice(loader, self.calib_batches))
        with forward_context(trainer):
            report = calibrate(net, images, self.calibration, self.percentile, self.histogram_bins, train_mode=True)
        if trainer.world_size > 1:  # every rank calibrated on its own batches: use the mean scale
            for layer in quant_layers(net).values():
                scale = layer.input_quant.scale
                with torch.no_grad():
                    scale.copy_(collectives.reduce(trainer, scale.detach().float(), "mean"))
        if report.unobserved:
            rank_zero_warn(f"QuantizationAwareTraining: no calibration batch reached {report.unobserved}; "
                           "they stay float until a checkpoint gives them scales")
        rank_zero_info(f"QuantizationAwareTraining: calibrated {len(report.activation_amax)} activation ranges "
                       f"({self.calibration}) on {report.batches} batches")
        return report

    def _apply_schedule(self, epoch: int, net: nn.Module, trainer: pl.Trainer | None = None) -> None:
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            self.bn_frozen = True
        if self.freeze_ranges_epoch is not None and epoch >= self.freeze_ranges_epoch:
            self.ranges_frozen = True
        for layer in quant_layers(net).values():
            layer.input_quant.frozen = self.ranges_frozen
            layer.weight_quant.frozen = self.ranges_frozen
        if self.ranges_frozen and self.learnable_scales:
            self._stop_scale_gradients(trainer, net)
        if self.bn_frozen:
            _batchnorm_eval(net)
        self.schedule_epoch = epoch

    def _stop_scale_gradients(self, trainer: pl.Trainer | None, net: nn.Module) -> None:
        """Frozen learnable scales get no gradient any more. DDP (``find_unused_parameters:
        false``) would then wait for their gradients and fail at the next step ("parameters
        that were not used in producing loss"): take them out of autograd and wrap DDP anew
        around the parameters that still train. The optimizer skips parameters without a
        gradient, so it needs no rebuild."""
        from trainer.prune.rebuild import rewrap_ddp

        scales = [p for layer in quant_layers(net).values()
                  for p in (layer.input_quant.scale, layer.weight_quant.scale) if isinstance(p, nn.Parameter)]
        if not any(p.requires_grad for p in scales):
            return
        for p in scales:
            p.requires_grad_(False)
        if trainer is not None:
            rewrap_ddp(trainer, trainer.lightning_module)


def _batchnorm_eval(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _image(batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping) and "image" in batch:
        return batch["image"]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, torch.Tensor):
        return batch
    raise UserError(f"QuantizationAwareTraining: cannot find the image in a training batch of type "
                    f"{type(batch).__name__}; batches must be dicts with 'image'")
