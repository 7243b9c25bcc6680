"""Batch contract, exactly-once sharding over ranks x workers, and reader equivalence."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dmhelpers import CASES, SHAPES, make_dm


def _collect(loader) -> list[dict]:
    return [b for b in loader]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("fmt", ["h5", "tfrecord", "tfrecord.gz"])
def test_every_sample_exactly_once_over_2_ranks_x_2_workers(data_files, fmt, dims):
    dm = make_dm(data_files[fmt, dims], dims, num_workers=2, batch_size=3, samples_per_epoch=17)
    n_train = dm.num_train_samples(world_size=2)
    assert n_train == 18  # rounded up to a multiple of world_size * batch_size
    train_keys, steps = [], []
    val_keys, val_sizes = [], []
    for rank in range(2):
        batches = _collect(dm.make_dataloader("train", rank=rank, world_size=2, epoch=3))
        steps.append(len(batches))
        train_keys += [k for b in batches for k in b["index"].tolist()]
        vb = _collect(dm.make_dataloader("val", rank=rank, world_size=2))
        val_keys += [k for b in vb for k in b["index"].tolist()]
        val_sizes.append(sum(len(b["index"]) for b in vb))
    assert sorted(train_keys) == list(range(n_train))
    assert steps[0] == steps[1] == n_train // (2 * 3)
    n_val_units = len(dm.splits["val"]) * (SHAPES[dims][0] if dims == 2 else 1)
    assert sorted(val_keys) == list(range(n_val_units))  # no duplicates, nothing dropped
    assert abs(val_sizes[0] - val_sizes[1]) <= 1


@pytest.mark.parametrize("dims", [2, 3])
def test_batch_contract(data_files, dims):
    dm = make_dm(data_files["h5", dims], dims, batch_size=2)
    assert (dm.num_classes, dm.in_channels, dm.spatial_dims) == (5, 1, dims)
    assert dm.class_names[0] == "background" and len(dm.class_names) == 5
    b = next(iter(dm.train_dataloader()))
    patch = (16, 16) if dims == 2 else (16, 16, 16)
    assert b["image"].dtype == torch.float32 and tuple(b["image"].shape) == (2, 1, *patch)
    assert b["label"].dtype == torch.int64 and tuple(b["label"].shape) == (2, *patch)
    assert b["index"].dtype == torch.int64 and b["index"].shape == (2,)
    assert isinstance(b["case"], list) and all(isinstance(c, str) for c in b["case"])
    assert b["spacing"].shape == (2, 3)
    assert b["labelled"].dtype == torch.bool and b["labelled"].tolist() == [True, True]
    v = next(iter(dm.val_dataloader()))
    if dims == 2:
        assert tuple(v["image"].shape) == (2, 1, 32, 32)  # full slices, val_batch_size = batch_size
    else:
        assert tuple(v["image"].shape) == (1, 1, *SHAPES[3])  # one full volume
        assert tuple(v["label"].shape) == (1, *SHAPES[3])
    assert list(dm.test_dataloader().dataset.cases) == dm.splits["val"]  # no test split -> val


def test_validation_slices_are_padded_to_pad_multiple(tmp_path):
    from datamodules import phantom

    path = phantom.generate_phantom_h5(tmp_path / "odd.h5", cases=3, shape=(2, 20, 28))
    dm = make_dm(path, 2, pad_multiple=8, val_fraction=0.34)
    b = next(iter(dm.val_dataloader()))
    assert tuple(b["image"].shape[2:]) == (24, 32)
    assert torch.all(b["image"][..., 20:, :] == 0) and torch.all(b["label"][..., 28:] == 0)
    from datamodules.h5io import iter_h5_cases

    ref = {cid: (img, lab) for cid, img, lab, _ in iter_h5_cases(path)}
    img, lab = ref[b["case"][0]]
    assert np.array_equal(b["image"][0, :, :20, :28].numpy(), img[:, 0])
    assert np.array_equal(b["label"][0, :20, :28].numpy(), lab[0])


def test_test_split_is_held_out(data_files):
    dm = make_dm(data_files["h5", 3], 3, val_fraction=0.2, test_fraction=0.2)
    train, val, test = (set(dm.splits[s]) for s in ("train", "val", "test"))
    assert len(val) == len(test) == 1 and not (train & val or train & test or val & test)
    assert len(train | val | test) == CASES[3]
    keys = [b["case"][0] for b in dm.test_dataloader()]
    assert keys == [dm.store.cases[i].case_id for i in sorted(test)]
    dm2 = make_dm(data_files["h5", 3], 3, val_cases=["case_0001"], test_cases=["case_0004"], seed=5)
    assert dm2.splits["val"] == [1] and dm2.splits["test"] == [4]


def test_split_does_not_depend_on_training_seed(data_files):
    a = make_dm(data_files["h5", 2], 2, seed=0)
    b = make_dm(data_files["h5", 2], 2, seed=99)
    c = make_dm(data_files["h5", 2], 2, split_seed=3)
    assert a.splits == b.splits and a.splits != c.splits


@pytest.mark.parametrize("dims", [2, 3])
def test_samples_do_not_depend_on_workers(data_files, dims):
    dm = make_dm(data_files["h5", dims], dims, samples_per_epoch=12, aug_affine_prob=1.0, aug_noise_prob=1.0)
    a = _collect(dm.make_dataloader("train", epoch=1))
    dm.num_workers = 2
    b = _collect(dm.make_dataloader("train", epoch=1))
    assert len(a) == len(b) > 1
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
        assert torch.equal(x["label"], y["label"]) and x["case"] == y["case"]


@pytest.mark.parametrize("dims", [2, 3])
def test_all_readers_give_identical_samples(data_files, dims):
    """memmap HDF5, h5py HDF5, node cache of lzf HDF5, TFRecord via index, TFRecord cache."""
    variants = [("h5", {}), ("h5", {"memmap": False}), ("h5", {"cache": "always"}), ("h5-lzf", {}),
                ("h5-lzf", {"cache": "never"}), ("tfrecord", {"cache": "never"}), ("tfrecord.gz", {})]
    reference = None
    for fmt, kw in variants:
        dm = make_dm(data_files[fmt, dims], dims, aug_affine_prob=0.5, **kw)
        batches = _collect(dm.make_dataloader("train", epoch=2)) + _collect(dm.val_dataloader())
        got = [(b["index"], b["image"], b["label"], b["case"]) for b in batches]
        if reference is None:
            reference = got
            continue
        for (i, x, y, c), (ri, rx, ry, rc) in zip(got, reference, strict=True):
            assert torch.equal(i, ri) and torch.equal(x, rx) and torch.equal(y, ry) and c == rc, (fmt, kw)
    store_types = {type(make_dm(data_files[f, dims], dims, **kw).store).__name__ for f, kw in variants}
    assert store_types == {"H5Store", "CacheStore", "TFRecordStore"}


def test_epochs_differ_and_lightning_set_epoch_is_honoured(data_files):
    dm = make_dm(data_files["h5", 2], 2)
    loader = dm.make_dataloader("train", epoch=0)
    first = [b["index"].tolist() for b in loader]
    loader.sampler.set_epoch(1)  # what Lightning does at every epoch start
    second = [b["index"].tolist() for b in loader]
    assert first != second
    again = [b["index"].tolist() for b in dm.make_dataloader("train", epoch=1)]
    assert again == second
