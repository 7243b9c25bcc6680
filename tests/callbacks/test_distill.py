"""The Distillation callback in real (tiny) Lightning runs: the teacher stays frozen and out of
the optimizer and checkpoint, adapters are trained and saved, resume, bf16 + accumulation,
module swaps by other techniques, and one-line errors for bad inputs."""
from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distill"))
from distill_testing import framework_checkpoint, unet_kwargs  # noqa: E402
from tinydata import TinySegDataModule  # noqa: E402
from trainer.callbacks.distill import Distillation  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.models.unet import UNet  # noqa: E402
from trainer.module import SegmentationModule  # noqa: E402
from trainer.structure import record  # noqa: E402

FEATURES = [{"student": "decoders.1", "teacher": "decoders.1", "weight": 0.5}]
AFFINITY = [{"student": "encoders.2", "teacher": "encoders.2", "weight": 1.0}]


@pytest.fixture
def teacher(tmp_path) -> Path:
    return framework_checkpoint(tmp_path / "teacher.ckpt", **unet_kwargs(base=8))


def _student(dims: int = 2, classes: int = 3) -> SegmentationModule:
    torch.manual_seed(1)
    return SegmentationModule(UNet(**unet_kwargs(spatial_dims=dims, num_classes=classes, base=4, ds=True)), num_classes=classes)


def _trainer(tmp_path, callbacks, **kw) -> pl.Trainer:
    args = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                default_root_dir=tmp_path, accelerator="cpu")
    return pl.Trainer(callbacks=callbacks, **{**args, **kw})


def _data(dims: int = 2) -> TinySegDataModule:
    return TinySegDataModule(spatial_dims=dims, size=16, n_train=4, batch_size=2)


def test_teacher_gets_no_gradients_optimizer_state_or_checkpoint_keys(tmp_path, teacher):
    cb = Distillation(teacher=str(teacher), features=FEATURES, affinity=AFFINITY)
    student = _student()
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(student, datamodule=_data())
    assert all(p.grad is None and not p.requires_grad for p in cb.teacher.parameters())
    opt = trainer.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in cb.teacher.parameters()}
    assert not set(opt.state) & set(cb.teacher.parameters())
    adapter = student.distill_adapters["feat_decoders_1"]
    assert {id(p) for p in adapter.parameters()} <= in_opt and adapter.weight.grad is not None
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    ckpt = torch.load(tmp_path / "s.ckpt", weights_only=False)
    assert not [k for k in ckpt["state_dict"] if not k.startswith(("net.", "loss.", "val_dice", "test_dice"))]
    state = ckpt["callbacks"]["Distillation"]
    assert state["teachers"][0]["sha256"] == cb.teacher_infos[0]["sha256"]
    assert torch.equal(state["adapters"]["feat_decoders_1"]["weight"], adapter.weight)
    # the student's checkpoint loads into a plain (undistilled) module, strictly
    _student().load_state_dict(ckpt["state_dict"])


def test_resume_restores_adapters_and_refuses_another_teacher(tmp_path, teacher):
    cb = Distillation(teacher=str(teacher), features=FEATURES)
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(_student(), datamodule=_data())
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    saved = cb.adapters["feat_decoders_1"].weight.detach().clone()

    resumed = Distillation(teacher=str(teacher), features=FEATURES)
    student = _student()
    _trainer(tmp_path, [resumed], max_epochs=1).fit(student, datamodule=_data(), ckpt_path=tmp_path / "s.ckpt")
    assert torch.equal(student.distill_adapters["feat_decoders_1"].weight, saved)  # no step ran: as saved

    other = framework_checkpoint(tmp_path / "other.ckpt", seed=5, **unet_kwargs(base=8))
    with pytest.raises(UserError, match="resume with the same teacher"):
        _trainer(tmp_path, [Distillation(teacher=str(other), features=FEATURES)], max_epochs=2).fit(
            _student(), datamodule=_data(), ckpt_path=tmp_path / "s.ckpt")


def test_bf16_mixed_with_gradient_accumulation_gives_float32_terms(tmp_path, teacher):
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update({k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/loss_")})

    cb = Distillation(teacher=str(teacher), features=FEATURES, affinity=AFFINITY)
    _trainer(tmp_path, [cb, Spy()], precision="bf16-mixed", accumulate_grad_batches=2).fit(_student(), datamodule=_data())
    assert {"train/loss_kd", "train/loss_kd_ds", "train/loss_feat_decoders_1", "train/loss_aff_encoders_2"} <= set(seen)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in seen.values())


def test_3d_teacher_ensemble(tmp_path):
    kw = unet_kwargs(spatial_dims=3, base=4)
    folds = [str(framework_checkpoint(tmp_path / f"fold{i}.ckpt", seed=i, **kw)) for i in range(2)]
    cb = Distillation(teacher=folds, ensemble="probs", features=FEATURES, affinity=AFFINITY)
    _trainer(tmp_path, [cb], limit_train_batches=1).fit(_student(dims=3), datamodule=_data(dims=3))
    assert len(cb.teacher.members) == 2 and cb.teacher_infos[1]["path"] == folds[1]


class _SwapDecoder(pl.Callback):
    """Stands in for QAT: replaces a distilled student layer by a new module at epoch 1."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            old = pl_module.net.decoders[1]
            new = type(old)(2, 8, 4, 4, "batch")
            new.load_state_dict(old.state_dict())
            pl_module.net.decoders[1] = new
            record(pl_module.net, _SwapDecoder, {})
            trainer.strategy.setup_optimizers(trainer)
            self.new = new


def test_hooks_follow_a_module_swapped_mid_run(tmp_path, teacher):
    swap = _SwapDecoder()
    cb = Distillation(teacher=str(teacher), features=FEATURES)
    _trainer(tmp_path, [swap, cb], max_epochs=2).fit(_student(), datamodule=_data())
    assert cb._student_tap.module("decoders.1") is swap.new
    assert any(p.grad is not None for p in swap.new.parameters())


def _prune(**kw):
    from trainer.callbacks.prune import PruneRetrain

    return PruneRetrain(**{"method": "structured", "target_ratio": 0.5, "epochs_per_round": 1, **kw})


def test_composes_with_pruning_mid_run(tmp_path, teacher, recwarn):
    """Round 1 prunes in setup (before Distillation sizes its adapters), round 2 prunes the
    distilled layer mid-run: its adapter keeps the surviving columns and stays optimised."""
    cb = Distillation(teacher=str(teacher), features=FEATURES, affinity=AFFINITY)
    student = _student()
    width = student.net.decoders[1].block[0].out_channels
    trainer = _trainer(tmp_path, [_prune(rounds=2), cb], max_epochs=2)
    trainer.fit(student, datamodule=_data())
    adapter = student.distill_adapters["feat_decoders_1"]
    assert adapter.in_channels == student.net.decoders[1].block[0].out_channels < width
    in_opt = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in adapter.parameters()} <= in_opt and adapter.weight.grad is not None
    assert not [w for w in recwarn if "starts afresh" in str(w.message)]  # followed the pruning plan


def test_composes_with_pruning_and_qat_in_one_run(tmp_path, teacher):
    from trainer.callbacks.qat import QuantizationAwareTraining

    cb = Distillation(teacher=str(teacher), features=FEATURES, affinity=AFFINITY)
    student = _student()
    _trainer(tmp_path, [_prune(rounds=1), QuantizationAwareTraining(calib_batches=1), cb]).fit(student, datamodule=_data())
    assert any(hasattr(m, "weight_quant") for m in student.net.modules())
    assert not any(hasattr(m, "weight_quant") for m in cb.teacher.modules())  # teacher untouched
    assert cb._student_tap.module("decoders.1") is student.net.decoders[1]


@pytest.mark.parametrize("case, match", [
    ("classes", "has 4 classes but the student outputs 3"),
    ("dims", "cannot run on the student's input"),
    ("layer", r"has no layer 'decoders.9'.*available: .*encoders"),
    ("teacher_layer", r"teacher \(UNet\) has no layer 'nope'"),
    ("missing", "does not exist"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, teacher, case, match):
    kwargs = {"teacher": str(teacher)}
    if case == "classes":
        kwargs["teacher"] = str(framework_checkpoint(tmp_path / "t4.ckpt", **unet_kwargs(num_classes=4)))
    elif case == "dims":
        kwargs["teacher"] = str(framework_checkpoint(tmp_path / "t3d.ckpt", **unet_kwargs(spatial_dims=3)))
    elif case == "layer":
        kwargs["features"] = [{"student": "decoders.9", "teacher": "decoders.1"}]
    elif case == "teacher_layer":
        kwargs["affinity"] = [{"student": "decoders.1", "teacher": "nope"}]
    elif case == "missing":
        kwargs["teacher"] = str(tmp_path / "nope.ckpt")
    with pytest.raises(UserError, match=match) as err:
        _trainer(tmp_path, [Distillation(**kwargs)]).fit(_student(), datamodule=_data())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "give teacher"),
    ({"teacher": "t", "temperature": 0}, "temperature=0"),
    ({"teacher": "t", "cwd_temperature": -1}, "cwd_temperature=-1"),
    ({"teacher": "t", "cwd_weight": -0.5}, "cwd_weight=-0.5"),
    ({"teacher": "t", "ensemble": "median"}, "ensemble='median'"),
    ({"teacher": "t", "features": [{"student": "a", "teacher": "b", "weight": -1}]}, "weight=-1"),
    ({"teacher": "t", "features": [{"student": "a", "teacher": "b"}, {"student": "a", "teacher": "c"}]}, "used twice"),
])
def test_bad_arguments_are_refused_up_front(kwargs, match):
    with pytest.raises(UserError, match=match):
        Distillation(**kwargs)
