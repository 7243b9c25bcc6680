"""Foreground oversampling, class-balanced crops, augmentation applied alike to image and label."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.augment import AugmentConfig, apply_augment, draw_params, read_patch
from datamodules.datasets import PatchDataset
from datamodules.sampling import (EpochSampler, choose_patch, forced_foreground, pick_class, round_train_samples,
                                  sample_rng, scan_labels)
from datamodules.schema import CaseInfo, DatasetHeader
from datamodules.store import ArrayStore, read_region
from dmhelpers import make_dm


def _patches(dm, epoch=0):
    return [b for b in dm.make_dataloader("train", epoch=epoch)]


def test_fg_oversampling_fraction(data_files):
    """With fg_oversample=1 every patch holds foreground; with 0.33 at least a third does."""
    common = {"samples_per_epoch": 96, "augment": False}
    forced = make_dm(data_files["h5", 2], 2, fg_oversample=1.0, **common)
    assert all((b["label"] > 0).flatten(1).any(1).all() for b in _patches(forced))
    third = make_dm(data_files["h5", 2], 2, fg_oversample=0.33, **common)
    ds = third.make_dataloader("train").dataset
    assert ds.forced_mask(0).sum() == round(0.33 * 96)
    assert not np.array_equal(ds.forced_mask(0), ds.forced_mask(1))  # re-drawn every epoch
    has_fg = torch.cat([(b["label"] > 0).flatten(1).any(1) for b in _patches(third)])
    never = make_dm(data_files["h5", 2], 2, fg_oversample=0.0, **common)
    has_fg_never = torch.cat([(b["label"] > 0).flatten(1).any(1) for b in _patches(never)])
    assert has_fg.float().mean() >= 0.33 and has_fg.float().mean() > has_fg_never.float().mean()


def test_class_balanced_crops_pick_a_present_class_uniformly():
    """Forced crops choose among the classes present (uniformly), then a voxel of that class,
    which the patch then contains; the tiny lesion class is targeted as often as the liver."""
    rng = np.random.default_rng(0)
    label = np.zeros((8, 64, 64), np.uint8)
    label[2:6, 5:40, 5:40] = 1  # large
    label[3, 20:22, 20:22] = 3  # tiny, inside class 1
    label[4:8, 50:60, 50:60] = 2
    stats = scan_labels(label, 5, "t")  # class 4 absent: never chosen
    picks = []
    for _ in range(2000):
        for patch in ([16, 16], [4, 16, 16]):
            starts, cls = choose_patch(rng, label.shape, patch, stats, force_fg=True)
            if len(patch) == 2:
                region = label[starts[0], starts[1]:starts[1] + 16, starts[2]:starts[2] + 16]
            else:
                region = label[starts[0]:starts[0] + 4, starts[1]:starts[1] + 16, starts[2]:starts[2] + 16]
            assert (region == cls).any()
            picks.append(cls)
    freq = np.bincount(picks, minlength=5) / len(picks)
    assert freq[0] == freq[4] == 0 and np.allclose(freq[1:4], 1 / 3, atol=0.03)
    starts, cls = choose_patch(rng, label.shape, [16, 16], scan_labels(np.zeros_like(label), 5, "t"), force_fg=True)
    assert cls == 0  # nothing to force onto: a random crop


def test_class_weights_steer_forced_crops_to_a_rare_class():
    """fg_class_weights {3: 4}: among the classes present, the tiny class is targeted 4x as
    often as each other one; an absent class's weight is ignored; a case whose present
    classes all weigh 0 falls back to uniform."""
    rng = np.random.default_rng(0)
    label = np.zeros((8, 64, 64), np.uint8)
    label[2:6, 5:40, 5:40] = 1
    label[3, 20:22, 20:22] = 3
    label[4:8, 50:60, 50:60] = 2
    stats = scan_labels(label, 5, "t")
    weights = [0.0, 1.0, 1.0, 4.0, 9.0]  # class 4 is absent from the case
    picks = []
    for _ in range(3000):
        starts, cls = choose_patch(rng, label.shape, [16, 16], stats, force_fg=True, class_weights=weights)
        assert (label[starts[0], starts[1]:starts[1] + 16, starts[2]:starts[2] + 16] == cls).any()
        picks.append(cls)
    freq = np.bincount(picks, minlength=5) / len(picks)
    assert np.allclose(freq, [0, 1 / 6, 1 / 6, 4 / 6, 0], atol=0.03)
    assert pick_class([1, 2], [0.0, 0.0, 0.0, 5.0], 0.7) == 2  # all present weigh 0: uniform
    assert [pick_class([1, 2, 3], [0, 1, 1, 2], u) for u in (0.0, 0.24, 0.26, 0.49, 0.51, 0.999)] == [1, 1, 2, 2, 3, 3]


def test_class_weights_reach_the_training_batches(data_files):
    """Through the datamodule: {lesion: 8} puts a lesion in more forced samples than uniform
    choice does, and the samples are still a function of (seed, epoch, key)."""
    common = {"samples_per_epoch": 96, "augment": False, "fg_oversample": 1.0}

    def lesion_share(dm):
        return torch.cat([(b["label"] == 4).flatten(1).any(1) for b in _patches(dm)]).float().mean()

    uniform = make_dm(data_files["h5", 2], 2, **common)
    rare = make_dm(data_files["h5", 2], 2, fg_class_weights={"lesion": 8}, **common)
    assert rare.fg_class_weights == [0.0, 1.0, 1.0, 1.0, 8.0]
    assert lesion_share(rare) > lesion_share(uniform) + 0.1  # measured 0.875 vs 0.698
    again = make_dm(data_files["h5", 2], 2, fg_class_weights=[1, 1, 1, 8], **common)
    for x, y in zip(_patches(rare, epoch=3), _patches(again, epoch=3)):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def test_forced_foreground_is_exact_over_consecutive_keys():
    for fraction in (0.0, 0.33, 0.5, 1.0):
        assert sum(forced_foreground(k, fraction) for k in range(300)) == round(300 * fraction)


def test_scan_labels_counts_and_locations():
    label = np.zeros((2, 5, 5), np.uint8)
    label[1, 2, 3] = 2
    label[0, :2, :2] = 1
    stats = scan_labels(label, 3, "t", max_locations=3)
    assert stats.counts.tolist() == [45, 4, 1]
    assert stats.locations[2].tolist() == [1 * 25 + 2 * 5 + 3]
    assert len(stats.locations[1]) == 3 and set(stats.locations[1]) <= {0, 1, 5, 6}


@pytest.mark.parametrize("n,world,shuffle", [(24, 2, True), (24, 3, True), (7, 2, False), (5, 4, False)])
def test_epoch_sampler_partitions(n, world, shuffle):
    keys = [[k for _, k in EpochSampler(n, rank=r, world_size=world, seed=1, epoch=2, shuffle=shuffle)]
            for r in range(world)]
    assert sorted(sum(keys, [])) == list(range(n))
    sizes = [len(k) for k in keys]
    assert max(sizes) - min(sizes) <= (0 if shuffle else 1)
    assert all(len(EpochSampler(n, rank=r, world_size=world, shuffle=shuffle)) == sizes[r] for r in range(world))
    assert round_train_samples(17, 2, 3) == 18 and round_train_samples(18, 2, 3) == 18


def _label_encoding_store(dims):
    """Image channel 0 == label as float, so any spatial mismatch between them shows."""
    rng = np.random.default_rng(0)
    shape = (10, 40, 40) if dims == 2 else (24, 40, 40)
    label = np.zeros(shape, np.uint8)
    for c in range(1, 4):
        z, y, x = (rng.integers(0, s - 8) for s in shape)
        label[z : z + 8, y : y + 12, x : x + 6] = c
    image = label.astype(np.float32)[None]
    header = DatasetHeader(4, ["b", "x", "y", "z"], 1, [CaseInfo("c0", image.shape, (1.0, 1.0, 1.0))])
    return ArrayStore(header, [image], [label]), scan_labels(label, 4, "c0")


@pytest.mark.parametrize("dims", [2, 3])
def test_flips_and_rot90_move_image_and_label_together(dims):
    store, stats = _label_encoding_store(dims)
    cfg = AugmentConfig(flip_prob=0.5, rot90_prob=1.0, affine_prob=0.0, intensity_prob=0, gamma_prob=0, noise_prob=0)
    patch = [24, 24] if dims == 2 else [16, 24, 24]
    ds = PatchDataset(store, [0], [stats], patch, 40, seed=3, fg_oversample=1.0, augment=cfg)
    rotations = set()
    for key in range(40):
        s = ds[(0, key)]
        assert torch.equal(s["image"][0], s["label"].float())
        rotations.add(draw_params(sample_rng(3, 0, key, 1), cfg, patch).rot90)
    assert rotations == {1, 2, 3}


@pytest.mark.parametrize("dims", [2, 3])
def test_affine_moves_image_and_label_together(dims):
    store, stats = _label_encoding_store(dims)
    cfg = AugmentConfig(flip_prob=0, rot90_prob=0, affine_prob=1.0, rotate_deg=30, scale=0.2,
                        intensity_prob=0, gamma_prob=0, noise_prob=0)
    patch = [24, 24] if dims == 2 else [16, 24, 24]
    ds = PatchDataset(store, [0], [stats], patch, 30, seed=5, fg_oversample=1.0, augment=cfg)
    agree, changed = [], 0
    for key in range(30):
        s = ds[(0, key)]
        # bilinear image vs nearest label only disagree on a thin band along edges
        agree.append((s["image"][0].round() == s["label"].float()).float().mean().item())
        plain = read_region(store.label(0), [0, 0, 0], store.label(0).shape)
        changed += int(not any(np.array_equal(s["label"].numpy(), plain[..., y:y + 24, x:x + 24][0 if dims == 2 else slice(None)])
                               for y in range(17) for x in range(17)))
        assert set(np.unique(s["label"].numpy())) <= {0, 1, 2, 3}
    assert min(agree) > 0.85 and np.mean(agree) > 0.93
    assert changed > 20  # rotated/zoomed patches are not plain crops


def test_intensity_transforms_leave_labels_alone_and_are_reproducible():
    store, stats = _label_encoding_store(2)
    cfg = AugmentConfig(intensity_prob=1.0, gamma_prob=1.0, noise_prob=1.0, affine_prob=0.5)
    ds = PatchDataset(store, [0], [stats], [24, 24], 10, seed=0, fg_oversample=0.5, augment=cfg)
    plain = PatchDataset(store, [0], [stats], [24, 24], 10, seed=0, fg_oversample=0.5,
                         augment=AugmentConfig(intensity_prob=0, gamma_prob=0, noise_prob=0, affine_prob=0.5))
    for key in range(10):
        a, b = ds[(1, key)], ds[(1, key)]
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["label"], plain[(1, key)]["label"])
        assert not torch.equal(a["image"], plain[(1, key)]["image"])
    assert not torch.equal(ds[(1, 0)]["image"], ds[(2, 0)]["image"])  # new epoch, new draw


def test_read_region_pads_outside_the_array():
    arr = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)
    ref = np.pad(arr, ((0, 0), (3, 8), (3, 8), (3, 8)))
    for starts in [(0, 0, 0), (-2, 1, 3), (2, -3, 4), (-3, -3, -3), (3, 4, 5)]:
        sizes = (5, 6, 7)
        got = read_region(arr, starts, sizes)
        s = [st + 3 for st in starts]
        assert np.array_equal(got, ref[:, s[0]:s[0] + 5, s[1]:s[1] + 6, s[2]:s[2] + 7])
    inside = read_region(arr, (0, 0, 0), (2, 2, 2))
    inside[:] = -1
    assert arr.min() == 0  # the result never aliases the source


def test_read_patch_2d_takes_one_slice():
    arr = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    lab = (arr[0] > 0).astype(np.uint8)
    img, l2 = read_patch(arr, lab, (2, 1, 1), (4, 4), draw_params(np.random.default_rng(0), AugmentConfig(enabled=False), (4, 4)))
    assert img.shape == (1, 4, 4) and np.array_equal(img, arr[:, 2, 1:5, 1:5]) and np.array_equal(l2, lab[2, 1:5, 1:5])
    img2, lab2 = apply_augment(img, l2, draw_params(np.random.default_rng(0), AugmentConfig(enabled=False), (4, 4)), None)
    assert np.array_equal(img2, img) and np.array_equal(lab2, l2)
