"""Offline distillation: the cache command, replay of crops/augmentation, identity checks,
and offline == online loss on the same batch (up to float16 rounding of the cache)."""
from __future__ import annotations

import json

import h5py
import pytest
import torch

from distill_testing import (LINEAR_TEACHER, data_recipe, fake_trainer, framework_checkpoint, linear_teacher,
                             phantom_datamodule, unet_kwargs)
from trainer.callbacks.distill import Distillation
from trainer.distill import losses
from trainer.distill.cache import TeacherCache, main
from trainer.errors import UserError
from trainer.models.unet import UNet
from trainer.module import SegmentationModule

FP16_REL = 2.0**-11  # float16 round-to-nearest relative error


def _make_cache(tmp_path, *, teacher=None, out="cache.h5", extra=(), teacher_class=LINEAR_TEACHER, **data):
    path, init_args = teacher or linear_teacher(tmp_path / "lin.pt", num_classes=5)
    argv = ["--teacher", str(path), "--teacher-class", teacher_class, "--teacher-init-args", json.dumps(init_args),
            "--data-config", str(data_recipe(tmp_path, **data)), "--out", str(tmp_path / out), *extra]
    assert main(argv) == 0
    return tmp_path / out, path, init_args


def _student():
    torch.manual_seed(0)
    return SegmentationModule(UNet(**unet_kwargs(num_classes=5, ds=True)), num_classes=5)


def _setup(cb, dm, loader, epoch, student):
    cb.setup(fake_trainer(dm, loader, epoch=epoch, callbacks=[cb]), student, "fit")
    return cb


def test_cache_file_layout_and_records(tmp_path):
    cache, teacher, _ = _make_cache(tmp_path)
    dm = phantom_datamodule(tmp_path)
    with h5py.File(cache) as f:
        assert f.attrs["format"] == "compressseg-teacher-cache"
        assert json.loads(f.attrs["teachers"])[0]["path"] == str(teacher)
        assert sorted(f["cases"]) == [c.case_id for c in dm.store.cases]
        logits = f["cases/case_0000/logits"]
        assert logits.dtype == "float16" and logits.shape == (5, 4, 48, 48)


def test_replayed_cache_equals_teacher_on_augmented_patches(tmp_path):
    """Crop, flips, quarter turns and the affine: the replayed cached logits equal the
    (pointwise linear) teacher's logits on the augmented batch wherever they are valid."""
    cache, teacher, init_args = _make_cache(tmp_path, aug_affine_prob=0.7)
    dm = phantom_datamodule(tmp_path, aug_affine_prob=0.7)
    loader = dm.make_dataloader("train", epoch=3)
    student = _student()
    online = _setup(Distillation(teacher=str(teacher), teacher_class=LINEAR_TEACHER, teacher_init_args=init_args), dm, loader, 3, student)
    offline = _setup(Distillation(cache=str(cache)), dm, loader, 3, student)
    for batch in loader:
        want, _, _ = online.teacher_targets(student, batch)
        got, _, valid = offline.teacher_targets(student, batch)
        assert valid.float().mean() > 0.8
        err = ((got - want).abs() * valid[:, None]).max()
        assert err <= 2 * FP16_REL * want.abs().max()


def test_replay_in_3d(tmp_path):
    """3D: sliding-window cache of whole volumes, patches replayed with flips/turns/affine."""
    teacher = linear_teacher(tmp_path / "lin3.pt", num_classes=5, spatial_dims=3)
    cache, path, init_args = _make_cache(tmp_path, teacher=teacher, teacher_class="torch.nn.Conv3d",
                                         spatial_dims=3, aug_affine_prob=0.7)
    dm = phantom_datamodule(tmp_path, spatial_dims=3, aug_affine_prob=0.7)
    loader = dm.make_dataloader("train", epoch=2)
    student = SegmentationModule(UNet(**unet_kwargs(spatial_dims=3, num_classes=5)), num_classes=5)
    online = _setup(Distillation(teacher=str(path), teacher_class="torch.nn.Conv3d", teacher_init_args=init_args),
                    dm, loader, 2, student)
    offline = _setup(Distillation(cache=str(cache)), dm, loader, 2, student)
    batch = next(iter(loader))
    want, _, _ = online.teacher_targets(student, batch)
    got, _, valid = offline.teacher_targets(student, batch)
    assert got.shape == want.shape == (4, 5, 16, 16, 16) and valid.any()
    assert ((got - want).abs() * valid[:, None]).max() <= 2 * FP16_REL * want.abs().max()


def test_offline_and_online_give_the_same_loss_on_the_same_batch(tmp_path):
    cache, teacher, init_args = _make_cache(tmp_path, aug_affine_prob=0.0)
    dm = phantom_datamodule(tmp_path, aug_affine_prob=0.0)
    loader = dm.make_dataloader("train", epoch=1)
    student = _student()
    kwargs = dict(temperature=2.0, kd_weight=1.0, kd_ds_weight=0.5, cwd_weight=1.0, cwd_temperature=4.0)
    online = _setup(Distillation(teacher=str(teacher), teacher_class=LINEAR_TEACHER, teacher_init_args=init_args, **kwargs),
                    dm, loader, 1, student)
    offline = _setup(Distillation(cache=str(cache), **kwargs), dm, loader, 1, student)
    batch = next(iter(loader))
    with torch.no_grad():
        outs = student.net(batch["image"])
        on, off = online.loss_terms(student, batch, outs), offline.loss_terms(student, batch, outs)
        # tolerance from float16 rounding of the cached logits: |dz| <= eps = 2^-11 max|z|, and
        # |dL| <= 2 T eps (1 + max|log p - log q|) for L = T^2 KL(p_T || q_T) (first order)
        z, _, _ = online.teacher_targets(student, batch)
        t, tc = kwargs["temperature"], kwargs["cwd_temperature"]
        gap = (losses.tempered_log_probs(z, t) - losses.tempered_log_probs(outs[0], t)).abs().max()
        # cwd: the same bound with the softmax over voxels and its own T
        spatial = [torch.log_softmax(v.flatten(2) / tc, dim=2) for v in (z, outs[0])]
        tols = {"kd": 2 * t * FP16_REL * z.abs().max() * (1 + gap),
                "cwd": 2 * tc * FP16_REL * z.abs().max() * (1 + (spatial[0] - spatial[1]).abs().max())}
    assert set(on) == set(off) == {"kd", "kd_ds", "cwd"}
    for name in on:
        tol = tols.get(name, tols["kd"])
        assert abs(on[name] - off[name]) <= tol, (name, on[name], off[name], tol)
        assert on[name] > 0


def test_correct_only_leaves_out_voxels_the_teacher_gets_wrong(tmp_path):
    cache, _, _ = _make_cache(tmp_path, aug_affine_prob=0.0)
    dm = phantom_datamodule(tmp_path, aug_affine_prob=0.0)
    loader = dm.make_dataloader("train", epoch=1)
    student = _student()
    kwargs = dict(temperature=2.0, kd_weight=1.0, kd_ds_weight=0.0, cwd_weight=1.0)
    plain = _setup(Distillation(cache=str(cache), **kwargs), dm, loader, 1, student)
    gated = _setup(Distillation(cache=str(cache), correct_only=True, **kwargs), dm, loader, 1, student)
    batch = next(iter(loader))
    with torch.no_grad():
        outs = student.net(batch["image"])
        z, _, valid = plain.teacher_targets(student, batch)
        right = z.argmax(1) == batch["label"]
        assert 0 < int(right.sum()) < right.numel()  # the tiny teacher is wrong somewhere
        mask = valid & right
        want = {"kd": losses.logit_kd(outs[0], losses.tempered_log_probs(z, 2.0), 2.0, mask),
                "cwd": losses.channel_wise_kd(outs[0], z, 4.0, mask)}
        got, ungated = gated.loss_terms(student, batch, outs), plain.loss_terms(student, batch, outs)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5), name
        assert not torch.allclose(got[name], ungated[name], rtol=1e-3), name


def test_misaligned_replay_is_detected(tmp_path):
    cache, _, _ = _make_cache(tmp_path)
    dm = phantom_datamodule(tmp_path)
    loader = dm.make_dataloader("train", epoch=0)
    offline = _setup(Distillation(cache=str(cache)), dm, loader, 5, _student())  # trainer says epoch 5
    with pytest.raises(UserError, match="did not reproduce the batch's label"):
        offline.teacher_targets(_student(), next(iter(loader)))


def test_replay_reads_keys_and_labels_from_the_host_copy(tmp_path):
    """Keys and labels of the batch come from its host copy (SegmentationModule stores one
    before the batch moves to the GPU): the replay, meant to overlap the student's forward
    pass, reads nothing off the device (each read would be a host sync)."""
    from sync_trap import SyncTrap
    from trainer import host_copy

    cache, _, _ = _make_cache(tmp_path)
    dm = phantom_datamodule(tmp_path)
    loader = dm.make_dataloader("train", epoch=0)
    offline = _setup(Distillation(cache=str(cache)), dm, loader, 0, _student())
    batch = host_copy.remember(next(iter(loader)))
    on_device = {k: v.as_subclass(SyncTrap) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    got, _, valid = offline.teacher_targets(_student(), on_device)
    want, _, want_valid = offline.teacher_targets(_student(), {k: v for k, v in batch.items() if k != host_copy.KEY})
    assert torch.equal(got.as_subclass(torch.Tensor), want) and torch.equal(valid.as_subclass(torch.Tensor), want_valid)


def test_cache_from_another_dataset_or_teacher_is_refused(tmp_path):
    cache, teacher, init_args = _make_cache(tmp_path)
    other_data = phantom_datamodule(tmp_path / "x", generate={"cases": 6, "shape": [4, 48, 48], "seed": 1})
    with pytest.raises(UserError, match=r"made from dataset .* but training reads"):
        TeacherCache.open_for_training(str(cache), other_data, [], 2.0, "probs")
    other_teacher, _ = linear_teacher(tmp_path / "other.pt", num_classes=5, seed=1)
    dm = phantom_datamodule(tmp_path)
    with pytest.raises(UserError, match="was made from teacher"):
        TeacherCache.open_for_training(str(cache), dm, [str(other_teacher)], 2.0, "probs")
    TeacherCache.open_for_training(str(cache), dm, [str(teacher)], 2.0, "probs")  # the right one passes


def test_not_a_cache_and_missing_cases(tmp_path):
    dm = phantom_datamodule(tmp_path)
    with pytest.raises(UserError, match="is not a teacher cache"):
        TeacherCache(dm.path)
    cache, _, _ = _make_cache(tmp_path, extra=["--cases", "train"])
    with h5py.File(cache) as f:
        assert len(f["cases"]) == len(dm.splits["train"])
    val_case = dm.splits["val"][0]
    store = TeacherCache(cache)
    from trainer.distill.cache import CachedLogitsStore

    with pytest.raises(UserError, match="has no case"):
        CachedLogitsStore(store, dm.store).image(val_case)


def test_offline_refuses_feature_terms_and_wrong_class_count(tmp_path):
    with pytest.raises(UserError, match="intermediate features"):
        Distillation(cache="x.h5", features=[{"student": "a", "teacher": "b"}])
    cache, _, _ = _make_cache(tmp_path)
    dm = phantom_datamodule(tmp_path)
    student = SegmentationModule(UNet(**unet_kwargs(num_classes=3)), num_classes=3)
    with pytest.raises(UserError, match="has 5 classes but the student outputs 3"):
        _setup(Distillation(cache=str(cache)), dm, None, 0, student)


def test_3d_cache_uses_sliding_window_over_whole_volumes(tmp_path):
    teacher = framework_checkpoint(tmp_path / "t3.ckpt", **unet_kwargs(spatial_dims=3, num_classes=5, base=2))
    argv = ["--teacher", str(teacher), "--data-config", str(data_recipe(tmp_path, spatial_dims=3)),
            "--out", str(tmp_path / "c3.h5"), "--overlap", "0.25"]
    assert main(argv) == 0
    with h5py.File(tmp_path / "c3.h5") as f:
        assert f["cases/case_0000/logits"].shape == (5, 24, 32, 32) and f.attrs["spatial_dims"] == 3
        assert json.loads(f.attrs["roi_size"]) == [16, 16, 16]


def test_offline_distillation_in_a_real_fit(tmp_path):
    """The replay reads the real Trainer's training loader and epoch (2 epochs, 2 batches)."""
    import lightning.pytorch as pl

    cache, _, _ = _make_cache(tmp_path, aug_affine_prob=0.5)
    dm = phantom_datamodule(tmp_path, aug_affine_prob=0.5)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/loss_kd"]))

    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, accelerator="cpu",
                         callbacks=[Distillation(cache=str(cache)), Spy()], default_root_dir=tmp_path)
    trainer.fit(_student(), datamodule=dm)
    assert len(seen) == 4 and all(v > 0 for v in seen)
