"""QuantizationAwareTraining: arguments, checkpoint state, exact resume, composition, restore/export."""
from __future__ import annotations

import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import nn

from tinydata import TinySegDataModule
from trainer.callbacks.qat import QuantizationAwareTraining
from trainer.errors import UserError
from trainer.models import UNet
from trainer.module import SegmentationModule
from trainer.quant.convert import converter_path
from trainer.quant.modules import QuantLayer

QAT = "trainer.callbacks.qat.QuantizationAwareTraining"


@pytest.mark.parametrize("kwargs, message", [
    ({"calibration": "entropy"}, "calibration='entropy' must be one of max, percentile, mse"),
    ({"calib_batches": 0}, "calib_batches=0 must be an integer >= 1"),
    ({"percentile": 0}, "percentile=0 must be in (0, 100]"),
    ({"histogram_bins": 8}, "histogram_bins=8 must be an integer >= 16"),
    ({"freeze_bn_epoch": -1}, "freeze_bn_epoch=-1 must be an epoch number >= 0 or null"),
    ({"freeze_ranges_epoch": 1.5}, "freeze_ranges_epoch=1.5 must be an epoch number"),
    ({"on_unsupported": "skip"}, "on_unsupported='skip' must be one of error, warn"),
    ({"skip_modules": "head"}, "skip_modules='head' must be a list of module paths"),
    ({"weight_bits": 4}, "weight_bits=4 must be one of 8, 7"),
])
def test_arguments_are_validated_up_front(kwargs, message):
    with pytest.raises(UserError, match=f"QuantizationAwareTraining: {message}".replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        QuantizationAwareTraining(**kwargs)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.attn = nn.MultiheadAttention(4, 1)


def test_setup_names_unsupported_and_missing_modules():
    module = types.SimpleNamespace(net=_Attention())
    with pytest.raises(UserError, match=r"cannot quantize attn \(MultiheadAttention"):
        QuantizationAwareTraining().setup(None, module, "fit")
    with pytest.warns(UserWarning, match="left in float"):
        QuantizationAwareTraining(on_unsupported="warn").setup(None, module, "fit")
    assert isinstance(module.net.conv, QuantLayer) and not isinstance(module.net.attn, QuantLayer)
    with pytest.raises(UserError, match="skip_modules: 'decoders.9' is not a module of UNet"):
        QuantizationAwareTraining(skip_modules=["decoders.9"]).setup(None, types.SimpleNamespace(net=_unet()), "fit")
    QuantizationAwareTraining().setup(None, types.SimpleNamespace(net=_unet()), "validate")  # fit only


# ---------------------------------------------------------------- training runs (Python API)
def _unet() -> UNet:
    return UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4)


class _Probe(pl.Callback):
    """Records BN statistics, weights and scales at the end of every training epoch."""

    def __init__(self):
        self.epochs = []

    def on_train_epoch_end(self, trainer, pl_module):
        net = pl_module.net
        self.epochs.append({k: v.detach().clone() for k, v in net.state_dict().items()})


def _fit(tmp: Path, epochs: int, qat: QuantizationAwareTraining, ckpt: Path | None = None, probe=None):
    pl.seed_everything(0, verbose=False)
    module = SegmentationModule(_unet(), num_classes=3)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[qat] + ([probe] if probe else []), default_root_dir=str(tmp),
    )
    trainer.fit(module, datamodule=TinySegDataModule(n_train=8, batch_size=4), ckpt_path=ckpt)
    return trainer, module


@pytest.mark.parametrize("config", [
    {"learnable_scales": False, "calibration": "percentile"},
    {"learnable_scales": True, "calibration": "mse", "freeze_bn_epoch": 1, "freeze_ranges_epoch": 1},
    {"learnable_scales": False, "calibration": "percentile", "weight_bits": 7},
], ids=["fixed-scales", "lsq-frozen-at-1", "fixed-scales-7-bit-weights"])
def test_resume_is_bitwise_exact_and_the_schedule_freezes(tmp_path, config):
    probe = _Probe()
    _, full = _fit(tmp_path / "a", 2, QuantizationAwareTraining(calib_batches=2, **config), probe=probe)

    trainer, _ = _fit(tmp_path / "b", 1, QuantizationAwareTraining(calib_batches=2, **config))
    ckpt = tmp_path / "one_epoch.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["callbacks"]["QuantizationAwareTraining"]["calibrated"] is True
    assert saved["compressseg"]["structure"][0]["converter"] == converter_path()
    assert "net.encoders.0.0.input_quant.scale" in saved["state_dict"]
    qat = QuantizationAwareTraining(calib_batches=2, **config)
    _, resumed = _fit(tmp_path / "b", 2, qat, ckpt=ckpt)

    want, got = full.net.state_dict(), resumed.net.state_dict()
    assert want.keys() == got.keys()
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert different == [], f"resume is not exact for {different[:5]}"
    assert qat.calibrated and qat.report is None  # the checkpoint's scales were used, not recalibrated

    first, second = probe.epochs
    weights_moved = not torch.equal(first["encoders.0.0.weight"], second["encoders.0.0.weight"])
    assert weights_moved
    scale_keys = [k for k in first if k.endswith("_quant.scale")]
    if config.get("freeze_ranges_epoch") == 1:  # scales and BN statistics fixed during epoch 1
        assert all(torch.equal(first[k], second[k]) for k in scale_keys)
        assert torch.equal(first["encoders.0.1.running_mean"], second["encoders.0.1.running_mean"])
        assert qat.bn_frozen and qat.ranges_frozen and qat.schedule_epoch == 1
    else:  # weight scales follow the weights' max, activation scales stay calibrated
        layer = resumed.net.encoders[0][0]
        qmax = 63 if config.get("weight_bits") == 7 else 127
        assert saved["compressseg"]["structure"][0]["state"]["weight_range"] == [-qmax, qmax]
        assert torch.allclose(layer.weight_quant.scale, layer.weight.detach().abs().amax((1, 2, 3)) / qmax)
        ints = layer.weight_quant(layer.weight) / layer.weight_quant.scale.reshape(-1, 1, 1, 1)
        assert ints.abs().max().item() == pytest.approx(qmax)
        assert not torch.equal(first["encoders.0.0.weight_quant.scale"], second["encoders.0.0.weight_quant.scale"])
        assert torch.equal(first["encoders.0.0.input_quant.scale"], second["encoders.0.0.input_quant.scale"])
        assert not torch.equal(first["encoders.0.1.running_mean"], second["encoders.0.1.running_mean"])


def test_resuming_with_other_weight_bits_is_refused(tmp_path):
    trainer, _ = _fit(tmp_path / "a", 1, QuantizationAwareTraining(calib_batches=2, weight_bits=7))
    ckpt = tmp_path / "seven.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.raises(UserError, match=r"weights use the range \[-63, 63\] but the callback has weight_bits=8"):
        _fit(tmp_path / "a", 2, QuantizationAwareTraining(calib_batches=2), ckpt=ckpt)


def test_a_second_fit_keeps_the_quantization_and_its_scales(tmp_path):
    qat = QuantizationAwareTraining(calib_batches=1)
    trainer, module = _fit(tmp_path, 1, qat)
    scale = module.net.encoders[0][0].input_quant.scale.clone()
    trainer2 = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=[qat], num_sanity_val_steps=0)
    trainer2.fit(module, datamodule=TinySegDataModule(n_train=4))
    assert len(module.net.compressseg_structure) == 1
    assert torch.equal(module.net.encoders[0][0].input_quant.scale, scale)


# ---------------------------------------------------------------- recipes (LightningCLI, restore, compose)
def _recipe(tmp: Path, name: str, epochs: int, callbacks: list[dict], **model) -> Path:
    recipe = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": epochs, "accelerator": "cpu", "devices": 1, "default_root_dir": str(tmp / name),
            "enable_progress_bar": False, "enable_model_summary": False, "logger": False, "num_sanity_val_steps": 0,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp / name), "filename": "last", "enable_version_counter": False}},
                          *callbacks],
        },
        "model": {
            "net": {"class_path": "trainer.models.UNet",
                    "init_args": {"spatial_dims": 2, "num_classes": 3, "depth": 2, "base_channels": 8,
                                  "deep_supervision": True, "ds_levels": 1}},
            "num_classes": 3,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
            **model,
        },
        "data": {"class_path": "tinydata.TinySegDataModule", "init_args": {"n_train": 8, "n_val": 2, "batch_size": 4}},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli_fit(recipe: Path):
    from trainer.recipe_cli import run_lightning_cli

    return run_lightning_cli(["fit", "--config", str(recipe)])


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("teacher")
    _cli_fit(_recipe(tmp, "fp32", 2, []))
    return tmp / "fp32" / "last.ckpt"


def test_qat_with_real_distillation_quantizes_only_the_student_and_restores_for_export(tmp_path, teacher_ckpt):
    from trainer.callbacks.distill import Distillation
    from trainer.quant.export_qdq import export_qdq
    from trainer.quant.qdq_check import check_qdq
    from trainer.restore import restore_run

    callbacks = [{"class_path": QAT, "init_args": {"calibration": "percentile", "calib_batches": 2, "freeze_bn_epoch": 0}},
                 {"class_path": "trainer.callbacks.distill.Distillation",
                  "init_args": {"teacher": str(teacher_ckpt), "kd_weight": 1.0, "kd_ds_weight": 0.5}}]
    cli = _cli_fit(_recipe(tmp_path, "qat", 1, callbacks, init_from=str(teacher_ckpt)))
    distill = next(cb for cb in cli.trainer.callbacks if isinstance(cb, Distillation))
    student = cli.model.net
    assert isinstance(student.encoders[0][0], QuantLayer) and isinstance(student.ds_heads[0], QuantLayer)
    assert not any(isinstance(m, QuantLayer) for m in distill.teacher.modules())

    run = restore_run(tmp_path / "qat" / "last.ckpt")
    assert isinstance(run.net.encoders[0][0], QuantLayer)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(run.net(x), student.eval()(x))
    export_qdq(run.net, tmp_path / "qat.onnx", x[:1])
    report = check_qdq(tmp_path / "qat.onnx")
    assert report.ok and len(report.quantized) == 13  # ds head not in the eval graph


def test_structured_pruning_then_qat_in_one_run(tmp_path, teacher_ckpt):
    from trainer.quant.export_qdq import export_qdq
    from trainer.quant.qdq_check import check_qdq
    from trainer.restore import restore_run

    callbacks = [{"class_path": "trainer.callbacks.prune.PruneRetrain",
                  "init_args": {"target_ratio": 0.5, "rounds": 1, "start_epoch": 0, "epochs_per_round": 1}},
                 {"class_path": QAT, "init_args": {"calib_batches": 2}}]
    _cli_fit(_recipe(tmp_path, "prune_qat", 1, callbacks, init_from=str(teacher_ckpt)))
    ckpt = torch.load(tmp_path / "prune_qat" / "last.ckpt", weights_only=True)
    converters = [e["converter"].rsplit(".", 1)[1] for e in ckpt["compressseg"]["structure"]]
    assert converters == ["StructuredPrune", "FakeQuantConversion"]
    run = restore_run(tmp_path / "prune_qat" / "last.ckpt")
    first = run.net.encoders[0][0]
    assert isinstance(first, QuantLayer) and first.out_channels == 4  # 8 -> 4 channels, then quantized
    assert first.weight_quant.scale.shape == (4,)
    export_qdq(run.net, tmp_path / "pq.onnx", torch.randn(1, 1, 32, 32))
    assert check_qdq(tmp_path / "pq.onnx").ok


def test_recipe_smoke(tmp_path):
    """recipes/qat_unet2d.yaml: parses, builds, quantizes, calibrates and trains a few batches.

    Shrunk for the test (data file, sizes, epochs, no init_from: the FP32 checkpoint the
    recipe starts from is not part of the tests); every key of the recipe is still parsed.
    """
    recipe = yaml.safe_load((Path(__file__).resolve().parents[2] / "recipes" / "qat_unet2d.yaml").read_text())
    recipe["model"]["init_from"] = None
    recipe["model"]["net"]["init_args"]["base_channels"] = 8
    trainer = recipe["trainer"]
    trainer.update(max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                   enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer["callbacks"] = [cb for cb in trainer["callbacks"] if cb["class_path"] == QAT]
    trainer["callbacks"][0]["init_args"]["calib_batches"] = 2
    recipe["data"]["init_args"].update(path=str(tmp_path / "phantom2d.h5"), num_workers=0, batch_size=2,
                                       samples_per_epoch=4, generate={"cases": 3, "shape": [2, 96, 96], "seed": 0})
    path = tmp_path / "qat_unet2d.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cli = _cli_fit(path)
    qat = next(cb for cb in cli.trainer.callbacks if isinstance(cb, QuantizationAwareTraining))
    assert qat.calibrated and qat.calibration == "percentile" and qat.freeze_bn_epoch == 2
    assert isinstance(cli.model.net.encoders[0][0], QuantLayer)


# ---------------------------------------------------------------- strategies
class DeepSpeedZeroStrategyStub:
    def __init__(self, stage: int):
        self.config = {"zero_optimization": {"stage": stage}}


class FSDPStrategyStub:
    pass


@pytest.mark.parametrize("strategy, kwargs, message", [
    (DeepSpeedZeroStrategyStub(3), {"start_epoch": 2}, r"start_epoch=2 is refused under .* \(ZeRO stage 3\): ZeRO-3"),
    (DeepSpeedZeroStrategyStub(2), {"learnable_scales": True}, "0-dim parameter, and DeepSpeed's engine fails"),
    (FSDPStrategyStub(), {}, "refused under FSDPStrategyStub"),
])
def test_strategies_that_cannot_follow_are_refused_before_training(strategy, kwargs, message):
    trainer = types.SimpleNamespace(strategy=strategy)
    with pytest.raises(UserError, match=f"QuantizationAwareTraining: .*{message}"):
        QuantizationAwareTraining(**kwargs).setup(trainer, types.SimpleNamespace(net=_unet()), "fit")


def test_what_deepspeed_can_follow_is_accepted():
    for stage, kwargs in [(3, {}), (2, {"start_epoch": 2}), (1, {"freeze_ranges_epoch": 1})]:
        trainer = types.SimpleNamespace(strategy=DeepSpeedZeroStrategyStub(stage))
        QuantizationAwareTraining(**kwargs).setup(trainer, types.SimpleNamespace(net=_unet()), "fit")
