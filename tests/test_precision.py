"""Callbacks' own forward passes in the precision the run trains in (trainer/precision.py).

On GPUs, DeepSpeed ``16-mixed``/``bf16-mixed`` cast the student and its inputs to half without
autocast, and ``*-true`` precisions cast the whole module. The same dtype paths exist on the
CPU with ``precision="bf16-true"``: the module is bf16, batches reach the training step in
bf16, a callback's own loader yields fp32. These fits failed before the fixes ("Input type
(float) and bias type (c10::BFloat16) should be the same" at the teacher, the adapter, the
calibration and the Taylor batches; torch's fake-quantize kernels reject bf16 scales).
"""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from tinydata import TinySegDataModule
from trainer.callbacks.distill import Distillation
from trainer.callbacks.prune import PruneRetrain
from trainer.callbacks.qat import QuantizationAwareTraining
from trainer.models import UNet
from trainer.module import SegmentationModule
from trainer.precision import as_input, batch_for, param_dtype
from trainer.quant import fake_quant
from trainer.quant.calibrate import quant_layers


def _teacher(path: Path) -> Path:
    torch.manual_seed(1)
    kwargs = dict(spatial_dims=2, num_classes=3, depth=2, base_channels=8)
    module = SegmentationModule(UNet(**kwargs), num_classes=3)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {
        "net": {"class_path": "trainer.models.UNet", "init_args": kwargs}, "num_classes": 3}}, path)
    return path


class _Dtypes(pl.Callback):
    """Records the dtypes a training step sees."""

    def __init__(self):
        self.seen = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.add(("image", batch["image"].dtype))
        self.seen.add(("net", param_dtype(pl_module.net)))
        self.seen.add(("loss", outputs["loss"].dtype))


def _fit(tmp_path: Path, callbacks: list, epochs: int, precision: str = "bf16-true") -> SegmentationModule:
    pl.seed_everything(0, verbose=False)
    module = SegmentationModule(UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4), num_classes=3)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=TinySegDataModule(n_train=8, n_val=2, batch_size=4, size=16))
    return module


def test_bf16_true_distillation_with_adapters_and_qat_learnable_scales(tmp_path):
    probe = _Dtypes()
    distill = Distillation(teacher=str(_teacher(tmp_path / "teacher.ckpt")), kd_weight=1.0,
                           features=[{"student": "decoders.0", "teacher": "decoders.0", "weight": 1.0}])
    qat = QuantizationAwareTraining(learnable_scales=True, calib_batches=1, calibration="max")
    module = _fit(tmp_path, [qat, distill, probe], epochs=1)
    assert ("image", torch.bfloat16) in probe.seen and ("net", torch.bfloat16) in probe.seen
    layer = next(iter(quant_layers(module.net).values()))
    assert layer.weight_quant.scale.dtype == torch.bfloat16  # cast with the module, used as float32
    assert bool((layer.input_quant.scale > 0).all()) and layer.input_quant.enabled
    adapter = module.distill_adapters[distill.features[0].name]
    assert isinstance(adapter, nn.Conv2d) and adapter.weight.dtype == torch.bfloat16
    assert all(torch.isfinite(p.float()).all() for p in module.parameters())


def test_bf16_true_taylor_round_and_mid_fit_qat_calibration(tmp_path):
    prune = PruneRetrain(target_ratio=0.25, rounds=1, epochs_per_round=1, start_epoch=1, importance="taylor",
                         taylor_batches=1)
    qat = QuantizationAwareTraining(calib_batches=1, calibration="max", start_epoch=2)
    module = _fit(tmp_path, [prune, qat], epochs=3)
    assert prune.rounds_done == 1 and qat.calibrated
    assert param_dtype(module.net) == torch.bfloat16
    channels = lambda net: sum(m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d))  # noqa: E731
    assert channels(module.net) < channels(UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4))


@pytest.mark.parametrize("learnable", [False, True])
def test_fake_quant_takes_half_scales_on_the_torch_kernel_path(monkeypatch, learnable):
    """The path CUDA and ONNX export take (torch's fake-quantize ops), forced on the CPU: a
    scale cast to bf16 by the module's precision must reach the kernel as float32."""
    monkeypatch.setattr(fake_quant, "_use_tensor_ops", lambda x: False)
    q = fake_quant.TensorQuantizer("weight", channels=4, axis=0, learnable=learnable)
    w = torch.randn(4, 3, 3, 3)
    q.set_amax(w.abs().amax(dim=(1, 2, 3)))
    reference = q(w)
    q.to(torch.bfloat16)
    assert q.scale.dtype == torch.bfloat16
    out = q(w.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.02)
    if learnable:
        out.float().sum().backward()
        assert q.scale.grad is not None and q.scale.grad.dtype == torch.bfloat16


def test_inputs_follow_the_module_dtype_and_device():
    net = nn.Conv2d(1, 2, 3).to(torch.bfloat16)
    batch = {"image": torch.randn(1, 1, 5, 5), "label": torch.zeros(1, 5, 5, dtype=torch.long), "case": ["a"]}
    moved = batch_for(batch, net)
    assert moved["image"].dtype == torch.bfloat16 and moved["label"].dtype == torch.long and moved["case"] == ["a"]
    assert as_input(torch.randn(2), nn.Identity()).dtype == torch.float32  # no parameters: float32
