"""Mid-epoch resume: the remaining batches (keys and augmented tensors) are bit-identical."""
from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch

from dmhelpers import make_dm

STRONG_AUG = {"aug_affine_prob": 1.0, "aug_noise_prob": 1.0, "aug_gamma_prob": 1.0, "aug_intensity_prob": 1.0}


def _fingerprint(batch) -> tuple:
    return batch["index"].tolist(), batch["case"], batch["image"].clone(), batch["label"].clone()


def _assert_same(a, b):
    assert len(a) == len(b)
    for (ia, ca, xa, ya), (ib, cb, xb, yb) in zip(a, b):
        assert ia == ib and ca == cb
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fmt,dims", [("h5", 2), ("tfrecord", 3), ("tfrecord.gz", 2), ("h5-lzf", 3)])
def test_interrupted_loader_continues_exactly(data_files, fmt, dims, workers):
    path = data_files[fmt, dims]
    kwargs = {"num_workers": workers, "samples_per_epoch": 24, **STRONG_AUG}
    full = [_fingerprint(b) for b in make_dm(path, dims, **kwargs).make_dataloader("train", epoch=4)]
    assert len(full) == 6

    loader = make_dm(path, dims, **kwargs).make_dataloader("train", epoch=4)
    it = iter(loader)
    head = [_fingerprint(next(it)) for _ in range(2)]
    state = loader.state_dict()
    del it, loader  # the "killed" run

    resumed = make_dm(path, dims, **kwargs).make_dataloader("train", epoch=4)
    resumed.load_state_dict(state)
    tail = [_fingerprint(b) for b in resumed]
    _assert_same(head + tail, full)


def test_resumed_state_from_other_rank_count_is_not_mixed_up(data_files):
    """Rank 1 of 2 resumes its own shard, not rank 0's."""
    dm = make_dm(data_files["h5", 2], 2, samples_per_epoch=24)
    loader = dm.make_dataloader("train", rank=1, world_size=2, epoch=0)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    rest = [b["index"].tolist() for b in it]
    again = dm.make_dataloader("train", rank=1, world_size=2, epoch=0)
    again.load_state_dict(state)
    assert [b["index"].tolist() for b in again] == rest


class _Recorder(L.LightningModule):
    """A 1x1 conv 'network' that records what every training step saw."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 5, 1)
        self.seen = []

    def training_step(self, batch, _):
        self.seen.append((self.global_step, batch["index"].tolist(), float(batch["image"].double().sum())))
        return torch.nn.functional.cross_entropy(self.conv(batch["image"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, max_steps, callbacks=()):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                     use_distributed_sampler=False, limit_val_batches=0, default_root_dir=tmp_path)


@pytest.mark.parametrize("workers", [0, 2])
def test_lightning_resume_mid_epoch_sees_the_same_batches(data_files, tmp_path, workers):
    """A run checkpointed at step 5 (mid-epoch, epochs of 8 steps) and stopped at step 7,
    resumed to step 12 by a new Trainer, trains on exactly the batches of one uninterrupted
    12-step run. No reload_dataloaders_every_n_epochs needed."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    kwargs = {"samples_per_epoch": 32, "num_workers": workers, **STRONG_AUG}
    path = data_files["h5", 2]

    straight = _Recorder()
    _trainer(tmp_path, 12).fit(straight, make_dm(path, 2, **kwargs))

    first = _Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    _trainer(tmp_path, 7, [ckpt]).fit(first, make_dm(path, 2, **kwargs))
    second = _Recorder()
    ckpt2 = ModelCheckpoint(dirpath=tmp_path / "ck2", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    _trainer(tmp_path, 12, [ckpt2]).fit(second, make_dm(path, 2, **kwargs), ckpt_path=tmp_path / "ck" / "step=5.ckpt")

    assert len(straight.seen) == 12 and {len(set(s[1])) for s in straight.seen} == {4}
    assert first.seen[:5] + second.seen == straight.seen
