"""Distillation on unlabelled cases: the supervised loss sees only labelled samples, the
distillation terms see all, online and offline (the cache covers unlabelled training cases),
and unlabelled data without a teacher is refused."""
from __future__ import annotations

import json

import h5py
import lightning.pytorch as pl
import pytest
import torch

from distill_testing import (LINEAR_TEACHER, data_recipe, fake_trainer, framework_checkpoint, linear_teacher,
                             phantom_datamodule, unet_kwargs)
from trainer.callbacks.distill import Distillation
from trainer.distill.cache import main as distill_cache
from trainer.errors import UserError
from trainer.models.unet import UNet
from trainer.module import SegmentationModule

# 9 cases, the last 3 unlabelled: 6 labelled of which 2 validate
MIXED = {"generate": {"cases": 9, "shape": [4, 48, 48], "seed": 0, "unlabelled": 3}, "samples_per_epoch": 12}
UNLABELLED_IDS = ["case_0006", "case_0007", "case_0008"]


def _student(classes: int = 5, ds: bool = True) -> SegmentationModule:
    torch.manual_seed(0)
    return SegmentationModule(UNet(**unet_kwargs(num_classes=classes, ds=ds)), num_classes=classes)


def _fit(tmp_path, student, dm, callbacks) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(student, datamodule=dm)
    return trainer


def test_supervised_loss_uses_only_labelled_samples():
    student = _student()
    torch.manual_seed(1)
    batch = {"image": torch.randn(4, 1, 32, 32), "label": torch.randint(0, 5, (4, 32, 32)),
             "labelled": torch.tensor([True, False, True, False])}
    outs = student.net(batch["image"])
    want = student.loss([o[[0, 2]] for o in outs], batch["label"][[0, 2]])
    assert torch.allclose(student.supervised_loss(outs, batch), want)
    assert torch.allclose(student.supervised_loss(outs, {**batch, "labelled": torch.ones(4, dtype=torch.bool)}),
                          student.loss(outs, batch["label"]))
    none = student.supervised_loss(outs, {**batch, "labelled": torch.zeros(4, dtype=torch.bool)})
    none.backward()  # a zero that reaches every parameter (DDP needs each one used)
    assert float(none.detach()) == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in student.net.parameters())


def test_unlabelled_cases_without_a_teacher_are_refused(tmp_path):
    dm = phantom_datamodule(tmp_path, **MIXED)
    with pytest.raises(UserError, match=r"3 training cases are unlabelled \(e.g. 'case_0006'\) but no callback learns from them"):
        _fit(tmp_path, _student(), dm, [])


def test_online_distillation_on_unlabelled_cases(tmp_path):
    teacher = framework_checkpoint(tmp_path / "t.ckpt", **unet_kwargs(num_classes=5, base=8))
    dm = phantom_datamodule(tmp_path, **MIXED)
    assert set(UNLABELLED_IDS) <= {dm.store.cases[i].case_id for i in dm.splits["train"]}
    seen: list[bool] = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.extend(batch["labelled"].tolist())

    student = _student()
    before = [p.detach().clone() for p in student.net.parameters()]
    trainer = _fit(tmp_path, student, dm, [Distillation(teacher=str(teacher), kd_weight=0.5, cwd_weight=1.0), Spy()])
    assert False in seen and True in seen
    assert {"train/loss_seg", "train/loss_kd", "train/loss_cwd"} <= set(trainer.callback_metrics)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.net.parameters()))


def test_offline_cache_covers_unlabelled_training_cases(tmp_path):
    path, init_args = linear_teacher(tmp_path / "lin.pt", num_classes=5)
    out = tmp_path / "cache.h5"
    argv = ["--teacher", str(path), "--teacher-class", LINEAR_TEACHER, "--teacher-init-args", json.dumps(init_args),
            "--data-config", str(data_recipe(tmp_path, **MIXED)), "--out", str(out), "--cases", "train"]
    assert distill_cache(argv) == 0
    dm = phantom_datamodule(tmp_path, **MIXED)
    with h5py.File(out) as f:
        assert sorted(f["cases"]) == sorted(dm.store.cases[i].case_id for i in dm.splits["train"])
        assert set(UNLABELLED_IDS) <= set(f["cases"])
    student = _student()
    trainer = _fit(tmp_path, student, dm, [Distillation(cache=str(out), kd_weight=0.0, kd_ds_weight=0.0, cwd_weight=1.0)])
    assert float(trainer.callback_metrics["train/loss_cwd"]) > 0


def test_correct_only_keeps_every_voxel_of_an_unlabelled_sample(tmp_path):
    teacher = framework_checkpoint(tmp_path / "t.ckpt", **unet_kwargs(num_classes=5, base=8))
    dm = phantom_datamodule(tmp_path, **MIXED)
    loader = dm.make_dataloader("train", epoch=0)
    batch = next(iter(loader))
    batch["labelled"] = torch.zeros_like(batch["labelled"])
    student = _student()
    kwargs = dict(teacher=str(teacher), kd_weight=1.0, kd_ds_weight=0.0, cwd_weight=1.0)
    plain, gated = Distillation(**kwargs), Distillation(correct_only=True, **kwargs)
    for cb in (plain, gated):
        cb.setup(fake_trainer(dm, loader, callbacks=[cb]), student, "fit")
    with torch.no_grad():
        outs = student.net(batch["image"])
        got, want = gated.loss_terms(student, batch, outs), plain.loss_terms(student, batch, outs)
        batch["labelled"][:] = True  # placeholder labels of zeros: now the gate drops voxels
        gated_labelled = gated.loss_terms(student, batch, outs)
    for name in ("kd", "cwd"):
        assert torch.allclose(got[name], want[name]), name
        assert not torch.allclose(gated_labelled[name], want[name], rtol=1e-3), name

