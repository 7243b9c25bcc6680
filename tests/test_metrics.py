"""``trainer.metrics``: Dice and HD95 cross-checked against MONAI on the same predictions, the
missed/spurious convention, whole cases rebuilt from 2D slices, and the one implementation
shared by validation, export verification and the report."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance

from trainer.metrics import SegmentationMetrics, score_case

K = 4


def _blobs(rng, shape, present: float = 0.8) -> np.ndarray:
    out = np.zeros(shape, np.int64)
    for c in range(1, K):
        if rng.random() < present:
            z, y, x = (int(rng.integers(0, s)) for s in shape)
            dz, dy, dx = (int(rng.integers(1, 5)) for _ in range(3))
            out[max(0, z - dz):z + dz, max(0, y - dy):y + dy + 2, max(0, x - dx):x + dx + 1] = c
    return out


def _cases(seed: int = 0, n: int = 12):
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (int(rng.integers(2, 10)), int(rng.integers(14, 24)), int(rng.integers(14, 24)))
        spacing = [float(rng.uniform(0.5, 4.0)) for _ in range(3)]
        yield f"case{i}", _blobs(rng, shape), _blobs(rng, shape), spacing


def _onehot(a: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(a)[None], K).movedim(-1, 1)


def test_hd95_and_dice_agree_with_monai_case_by_case():
    checked = {"hd": 0, "worst": 0, "dice": 0, "empty": 0}
    for case, pred, label, spacing in _cases():
        ours = score_case(case, pred, label, spacing, K)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about every empty class
            hd = compute_hausdorff_distance(_onehot(pred), _onehot(label), percentile=95, spacing=spacing)[0]
            dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(_onehot(pred), _onehot(label))[0]
        diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing)))
        for c in range(1, K):
            has_p, has_l = bool((pred == c).any()), bool((label == c).any())
            if has_p and has_l:  # both present: MONAI's number, in mm
                assert ours.hd95[c] == pytest.approx(float(hd[c - 1]), abs=1e-4)
                checked["hd"] += 1
            elif has_p or has_l:  # missed or spurious: MONAI gives no number, we the worst one
                assert not math.isfinite(float(hd[c - 1])) and ours.hd95[c] == pytest.approx(diagonal)
                checked["worst"] += 1
            else:
                assert ours.hd95[c] is None
            if has_p or has_l:  # Dice agrees wherever it is defined (MONAI scores empty-empty 1, we leave it out)
                assert ours.dice()[c] == pytest.approx(float(dice[c - 1]), abs=1e-7)
                checked["dice"] += 1
            else:
                assert ours.dice()[c] is None and float(dice[c - 1]) == 1.0
                checked["empty"] += 1
    assert min(checked.values()) >= 2, checked  # every branch was exercised


def test_pooled_and_per_case_dice_and_mean_hd95_over_a_set_match_monai():
    metric = SegmentationMetrics(K, ["bg", "a", "b", "c"])
    cases = list(_cases(seed=1, n=8))
    for case, pred, label, spacing in cases:
        metric.update(torch.from_numpy(pred)[None], torch.from_numpy(label)[None],
                      {"case": [case], "spacing": torch.tensor([spacing])})
    scores = metric.compute()
    # pooled Dice = MONAI's Dice of the whole set concatenated into one image
    flat = lambda i: np.concatenate([c[i].reshape(-1) for c in cases])[None, None]  # noqa: E731
    pooled = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(_onehot(flat(1)), _onehot(flat(2)))[0]
    assert [scores.dice[n] for n in "abc"] == pytest.approx(pooled.tolist(), abs=1e-7)
    assert scores.mean_dice == pytest.approx(float(pooled.mean()), abs=1e-7)
    # per-case Dice and HD95: mean over the cases where each is defined
    per = [score_case(*c, K) for c in cases]
    for j, name in enumerate("abc", start=1):
        dice = [s.dice()[j] for s in per if s.dice()[j] is not None]
        hd = [s.hd95[j] for s in per if s.hd95[j] is not None]
        assert scores.case_dice[name] == pytest.approx(np.mean(dice))
        assert scores.hd95[name] == pytest.approx(np.mean(hd))
        assert scores.missed[name] == sum((lab == j).any() and not (p == j).any() for _, p, lab, _ in cases)
        assert scores.spurious[name] == sum((p == j).any() and not (lab == j).any() for _, p, lab, _ in cases)
    assert scores.cases == 8 and scores.partial_cases == 0 and scores.scope == "case volumes"


def test_a_missed_organ_counts_in_hd95():
    """The issue's case: a kidney the model never predicts must not vanish from HD95."""
    label = np.zeros((4, 20, 20), np.int64)
    label[1:3, 2:8, 2:8], label[1:3, 12:16, 12:16] = 1, 2
    pred = np.where(label == 1, 1, 0)  # liver perfect, kidney missed
    s = score_case("c", pred, label, [3.0, 1.0, 1.0], 3)
    assert s.hd95[1] == 0.0 and s.dice()[2] == 0.0
    assert s.hd95[2] == pytest.approx(math.sqrt(12.0 ** 2 + 20 ** 2 + 20 ** 2))
    metric = SegmentationMetrics(3, ["bg", "liver", "kidney"])
    metric.update(torch.from_numpy(pred)[None], torch.from_numpy(label)[None], {"case": ["c"], "spacing": [[3.0, 1.0, 1.0]]})
    scores = metric.compute()
    assert scores.hd95["kidney"] > 30 and scores.missed == {"liver": 0, "kidney": 1}


def test_2d_slices_rebuild_their_case_and_padding_is_cut_off():
    rng = np.random.default_rng(3)
    pred, label = _blobs(rng, (5, 13, 11)), _blobs(rng, (5, 13, 11))
    spacing = [2.5, 0.8, 0.7]
    expected = score_case("x", pred, label, spacing, K)
    metric = SegmentationMetrics(K, keep_cases=True)
    order = [3, 0, 4, 1, 2]  # slices arrive in any order, in batches of two, padded to 16x16
    for start in range(0, 5, 2):
        zs = order[start:start + 2]
        p = np.full((len(zs), 16, 16), 1, np.int64)  # foreground predicted in the padding: must not count
        lab = np.zeros((len(zs), 16, 16), np.int64)
        p[:, :13, :11], lab[:, :13, :11] = pred[zs], label[zs]
        metric.update(torch.from_numpy(p), torch.from_numpy(lab),
                      {"case": ["x"] * len(zs), "spacing": torch.tensor([spacing] * len(zs)), "slice": torch.tensor(zs),
                       "depth": torch.tensor([5] * len(zs)), "size": torch.tensor([[13, 11]] * len(zs))})
    scores = metric.compute()
    got = scores.per_case[0]
    assert scores.cases == 1 and got["shape"] == [5, 13, 11] and not got["partial"]
    assert [got["hd95"][f"class{c}"] for c in range(1, K)] == pytest.approx(expected.hd95[1:])
    assert [got["dice"][f"class{c}"] for c in range(1, K)] == pytest.approx(expected.dice()[1:])


def test_a_cut_short_evaluation_and_batches_without_metadata_say_so():
    metric = SegmentationMetrics(2)
    one = torch.zeros((1, 8, 8), dtype=torch.long)
    one[0, 2:5, 2:5] = 1
    metric.update(one, one, {"case": ["a"], "spacing": [[1.0, 1.0, 1.0]], "slice": [0], "depth": [3], "size": [[8, 8]]})
    scores = metric.compute()  # two of three slices never came
    assert scores.cases == 1 and scores.partial_cases == 1
    bare = SegmentationMetrics(2)
    bare.update(one, one)  # a datamodule of one's own: no case, no spacing
    scores = bare.compute()
    assert scores.cases == 1 and scores.mean_dice == 1.0 and scores.mean_hd95 is None
    assert "no case metadata" in scores.scope and "no HD95" in scores.scope


def test_validation_reports_whole_case_hd95_in_mm(tmp_path):
    """SegmentationModule's val/hd95 is the metric above, on the datamodule's whole cases."""
    import lightning.pytorch as pl

    from datamodules.hdf5 import HDF5SegDataModule
    from trainer.models import UNet
    from trainer.module import SegmentationModule

    dm = HDF5SegDataModule(str(tmp_path / "phantom.h5"), 2, [32, 32], batch_size=4, num_workers=0, val_batch_size=3,
                           val_fraction=0.5, generate={"cases": 2, "shape": [5, 30, 28], "num_classes": 3})
    module = SegmentationModule(UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4), num_classes=3)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False)
    trainer.fit(module, dm)
    logged = trainer.callback_metrics
    dm.setup("validate")
    module.eval()
    expected = SegmentationMetrics(3, dm.class_names)
    for batch in dm.val_dataloader():
        expected.update(module.predict_full(batch["image"]).argmax(1), batch["label"], batch)
    scores = expected.compute()
    assert scores.cases == 1 and scores.partial_cases == 0  # 5 slices in batches of 3: one whole case
    assert float(logged["val/dice"]) == pytest.approx(scores.mean_dice, abs=1e-6)
    assert float(logged["val/hd95"]) == pytest.approx(scores.mean_hd95, abs=1e-4)
    assert float(logged["val/hd95_liver"]) == pytest.approx(scores.hd95["liver"], abs=1e-4)
