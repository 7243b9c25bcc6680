import torch
import torch.nn.functional as F

from trainer.losses import DiceCE, downsample_label


def test_dice_ce_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    label = torch.randint(0, 3, (2, 4, 4))
    loss = DiceCE(batch_dice=True, include_background=False)(logits, label)
    probs = logits.softmax(1)
    onehot = F.one_hot(label, 3).permute(0, 3, 1, 2).float()
    inter = (probs * onehot)[:, 1:].sum((0, 2, 3))
    denom = probs[:, 1:].sum((0, 2, 3)) + onehot[:, 1:].sum((0, 2, 3))
    dice = 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()
    ce = F.cross_entropy(logits, label)
    assert torch.allclose(loss, dice + ce, atol=1e-5)


def test_deep_supervision_weights_and_downsampling():
    torch.manual_seed(0)
    label = torch.randint(0, 3, (1, 8, 8))
    full, half = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4)
    loss_fn = DiceCE(ds_weights=[1.0, 0.5])
    expected = (loss_fn(full, label) + 0.5 * loss_fn(half, downsample_label(label[:, None], (4, 4))[:, 0])) / 1.5
    assert torch.allclose(loss_fn([full, half], label), expected, atol=1e-6)


def test_perfect_prediction_has_near_zero_dice_term():
    label = torch.randint(0, 3, (2, 8, 8))
    logits = 50 * F.one_hot(label, 3).permute(0, 3, 1, 2).float()
    assert float(DiceCE(ce_weight=0.0)(logits, label)) < 1e-4


def test_class_weights_weigh_ce_and_dice_per_class_and_stay_out_of_checkpoints():
    """class_weights [1, 1, 3]: CE is torch's class-weighted mean, each foreground Dice loss is
    scaled by its weight; the weights are configuration (hparams), not state_dict entries."""
    import pytest

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    label = torch.randint(0, 3, (2, 4, 4))
    weights = torch.tensor([1.0, 1.0, 3.0])
    loss = DiceCE(batch_dice=True, include_background=False, class_weights=weights.tolist())
    probs = logits.softmax(1)
    onehot = F.one_hot(label, 3).permute(0, 3, 1, 2).float()
    inter = (probs * onehot)[:, 1:].sum((0, 2, 3))
    denom = probs[:, 1:].sum((0, 2, 3)) + onehot[:, 1:].sum((0, 2, 3))
    dice = ((1 - (2 * inter + 1e-5) / (denom + 1e-5)) * weights[1:]).mean()
    ce = F.cross_entropy(logits, label, weight=weights)
    assert torch.allclose(loss(logits, label), dice + ce, atol=1e-5)
    assert list(loss.state_dict()) == []
    with pytest.raises(ValueError, match="class_weights has 3 entries for 4 classes"):
        loss(torch.randn(1, 4, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    for bad in ([1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="class_weights="):
            DiceCE(class_weights=bad)
