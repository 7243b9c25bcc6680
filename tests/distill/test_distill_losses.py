"""Each distillation loss term against a hand computation on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.distill import losses


def _softmax(values, t):
    exps = [math.exp(v / t) for v in values]
    return [e / sum(exps) for e in exps]


def test_logit_kd_matches_hand_computation():
    # one image, 2 classes, 1x2 pixels
    zs = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # student [1, 2, 1, 2]
    zt = torch.tensor([[[[3.0, -1.0]], [[0.0, 1.0]]]])
    t = 2.0
    expected = 0.0
    for px in range(2):
        p = _softmax([zt[0, 0, 0, px].item(), zt[0, 1, 0, px].item()], t)
        q = _softmax([zs[0, 0, 0, px].item(), zs[0, 1, 0, px].item()], t)
        expected += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
    expected = expected / 2 * t**2
    got = losses.logit_kd(zs, losses.tempered_log_probs(zt, t), t)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_logit_kd_is_zero_for_identical_logits_and_float32_for_bf16():
    z = torch.randn(2, 4, 3, 3, 3)
    assert losses.logit_kd(z, losses.tempered_log_probs(z, 3.0), 3.0).abs().item() < 1e-6
    out = losses.logit_kd(z.bfloat16(), losses.tempered_log_probs(z.bfloat16(), 1.0), 1.0)
    assert out.dtype == torch.float32


def test_logit_kd_mask_counts_only_valid_voxels():
    zs, zt = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    mask = torch.tensor([[[True, False], [False, False]]])
    got = losses.logit_kd(zs, losses.tempered_log_probs(zt, 1.0), 1.0, mask)
    only = losses.logit_kd(zs[..., :1, :1], losses.tempered_log_probs(zt[..., :1, :1], 1.0), 1.0)
    assert got.item() == pytest.approx(only.item(), rel=1e-6)


def test_deep_supervision_kd_pools_teacher_probabilities():
    t = 1.5
    zt = torch.randn(1, 3, 4, 4)
    half = torch.randn(1, 3, 2, 2)
    # hand: the coarse teacher target is the mean of the 2x2 block's tempered probabilities
    p = torch.softmax(zt / t, 1)
    pooled = torch.stack([torch.stack([p[0, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((1, 2)) for j in range(2)], -1)
                          for i in range(2)], -2)[None]
    q = torch.softmax(half / t, 1)
    expected = (pooled * (pooled.log() - q.log())).sum(1).mean() * t**2
    got = losses.deep_supervision_kd([torch.randn(1, 3, 4, 4), half], zt, t)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_deep_supervision_kd_weights_levels():
    zt = torch.randn(1, 2, 8, 8)
    outs = [torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)]
    each = [losses.logit_kd(o, losses.tempered_log_probs(zt, 1.0, o.shape[2:]), 1.0) for o in outs[1:]]
    got = losses.deep_supervision_kd(outs, zt, 1.0, weights=[3.0, 1.0])
    assert got.item() == pytest.approx(((3 * each[0] + each[1]) / 4).item(), rel=1e-6)


def test_channel_wise_kd_matches_hand_computation():
    # one image, 2 classes, 1x3 pixels: each class is a distribution over the 3 pixels
    zs = torch.tensor([[[[1.0, 0.0, -1.0]], [[0.0, 2.0, 0.5]]]])
    zt = torch.tensor([[[[3.0, -1.0, 0.0]], [[0.0, 1.0, 4.0]]]])
    t = 4.0
    expected = 0.0
    for k in range(2):
        p = _softmax(zt[0, k, 0].tolist(), t)
        q = _softmax(zs[0, k, 0].tolist(), t)
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = expected / 2 * t**2  # mean over B * K = 2 channels
    assert losses.channel_wise_kd(zs, zt, t).item() == pytest.approx(expected, rel=1e-6)


def test_channel_wise_kd_weighs_a_small_class_like_a_large_one():
    # voxel-wise KD of a class that covers 1 of 64 pixels is diluted by the 63 others; the
    # channel-wise term of a mismatch on that one pixel is as large as on a whole-image class
    zt = torch.zeros(1, 2, 8, 8)
    zt[0, 1, 0, 0] = 6.0  # the teacher puts class 1 on pixel (0, 0)
    zs = torch.zeros(1, 2, 8, 8)  # the student puts it nowhere
    cwd = losses.channel_wise_kd(zs, zt, 1.0)
    kd = losses.logit_kd(zs, losses.tempered_log_probs(zt, 1.0), 1.0)
    assert cwd.item() > 20 * kd.item()


def test_channel_wise_kd_mask_leaves_voxels_out_of_both_softmaxes():
    zs, zt = torch.randn(2, 3, 2, 2, 2), torch.randn(2, 3, 2, 2, 2)
    zs.requires_grad_(True)
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[:, 0] = True  # the first depth slice has teacher targets
    got = losses.channel_wise_kd(zs, zt, 2.0, mask)
    only = losses.channel_wise_kd(zs[:, :, :1], zt[:, :, :1], 2.0)
    assert got.item() == pytest.approx(only.item(), rel=1e-5)
    got.backward()
    assert torch.isfinite(zs.grad).all() and zs.grad[:, :, 1:].abs().max() == 0


def test_feature_mse_matches_hand_and_pools_larger_teacher():
    s = torch.tensor([[[[1.0, 2.0]]]])  # [1, 1, 1, 2]
    t = torch.tensor([[[[0.0, 4.0]]]])
    assert losses.feature_mse(s, t).item() == pytest.approx(((1 - 0) ** 2 + (2 - 4) ** 2) / 2)
    big = torch.tensor([[[[0.0, 2.0, 4.0, 6.0], [0.0, 2.0, 4.0, 6.0]]]])  # [1, 1, 2, 4] -> mean of 2x2 blocks
    assert losses.feature_mse(s, big).item() == pytest.approx(((1 - 1) ** 2 + (2 - 5) ** 2) / 2)


def test_match_spatial_upsamples_smaller_teacher():
    t = torch.ones(1, 2, 2, 2, 2)
    assert losses.match_spatial(t, (4, 4, 4)).shape == (1, 2, 4, 4, 4)


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_pairwise_affinity_matches_hand_computation():
    # 1x2 spatial grid -> 2 nodes; student has 2 channels, teacher 3 (no adapter needed)
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # nodes (1,0) and (0,1)
    t = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]], [[1.0, 0.0]]]])  # nodes (1,0,1), (1,1,0)
    # smoothed norms: |f|^2 + 0.01 * mean |f|^2  ->  student 1.01, teacher 2.02 for every node
    a_s = [[1 / 1.01, 0.0], [0.0, 1 / 1.01]]
    a_t = [[2 / 2.02, 1 / 2.02], [1 / 2.02, 2 / 2.02]]
    expected = sum((a_s[i][j] - a_t[i][j]) ** 2 for i in range(2) for j in range(2)) / 4
    assert losses.pairwise_affinity(s, t, grid=4).item() == pytest.approx(expected, rel=1e-5)
    assert a_t[0][1] == pytest.approx(_cos([1, 0, 1], [1, 1, 0]) / 1.01)  # cosine up to the smoothing


def test_pairwise_affinity_gradient_is_bounded_at_dead_nodes():
    s = torch.zeros(1, 3, 4, 4)
    s[0, :, 0, 0] = 1.0  # one live node, fifteen all-zero (dead ReLU) nodes
    s[0, 0, 1, 1] = 1e-6  # and a nearly dead one
    s.requires_grad_(True)
    losses.pairwise_affinity(s, torch.randn(1, 5, 4, 4), grid=4).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 100


def test_pairwise_affinity_max_pools_to_grid_in_3d():
    s = torch.randn(2, 4, 8, 8, 8)
    assert losses.affinity(s, (2, 2, 2)).shape == (2, 8, 8)
    assert losses.pairwise_affinity(s, s * 3.0, grid=2).item() < 1e-10  # scale invariant
