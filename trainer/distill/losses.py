"""Distillation loss terms for segmentation, each a pure function of student and teacher tensors.

Every function computes in float32 whatever the input dtype (bf16 autocast outputs, float16
cached teacher logits): softmax/log of low-precision logits loses the small classes, and the
squared differences of the feature terms underflow in bf16. Shapes are ``[B, C, *S]`` with
``S`` 2D or 3D. Each function returns the *unweighted* term; the weights live in the
recipe and are applied by :class:`trainer.callbacks.distill.Distillation`.

Terms:

* :func:`logit_kd` -- pixel/voxel-wise KL divergence with temperature (Hinton et al. 2015).
* :func:`deep_supervision_kd` -- the same at each lower-resolution deep-supervision output,
  against the teacher's tempered probabilities average-pooled to that resolution.
* :func:`channel_wise_kd` -- KL between per-class *spatial* distributions (Shu et al. 2021):
  every class weighs the same however few voxels it covers.
* :func:`feature_mse` -- FitNets hint loss (Romero et al. 2015) after a 1x1 adapter.
* :func:`pairwise_affinity` -- pair-wise term of Structured Knowledge Distillation
  (Liu et al. 2019), channel-count agnostic.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

_ADAPTIVE_AVG = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_ADAPTIVE_MAX = {2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
_LINEAR = {2: "bilinear", 3: "trilinear"}


def _spatial_dims(x: torch.Tensor) -> int:
    dims = x.dim() - 2
    if dims not in (2, 3):
        raise ValueError(f"expected [B, C, H, W] or [B, C, D, H, W], got shape {tuple(x.shape)}")
    return dims


def tempered_log_probs(logits: torch.Tensor, temperature: float, size: Sequence[int] | None = None) -> torch.Tensor:
    """``log softmax(logits / T)`` over channels, optionally average-pooled to ``size``.

    Pooling averages *probabilities* (not logits): the soft label of a coarse voxel is the
    mean of the soft labels of the fine voxels it covers, the soft analogue of the nearest-
    downsampled hard label the supervised deep-supervision loss uses.
    """
    logp = F.log_softmax(logits.float() / temperature, dim=1)
    if size is None or tuple(size) == tuple(logits.shape[2:]):
        return logp
    probs = _ADAPTIVE_AVG[_spatial_dims(logits)](logp.exp(), tuple(size))
    return probs.clamp_min(torch.finfo(torch.float32).tiny).log()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def pool_mask(mask: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor | None:
    """A coarse voxel is valid only if every fine voxel it covers is (``mask``: ``[B, *S]``)."""
    if mask is None or tuple(mask.shape[1:]) == tuple(size):
        return mask
    pooled = _ADAPTIVE_AVG[mask.dim() - 1](mask[:, None].float(), tuple(size))[:, 0]
    return pooled > 0.999


def logit_kd(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel/voxel-wise knowledge distillation (Hinton, Vinyals, Dean 2015, "Distilling the
    Knowledge in a Neural Network"), as applied per pixel in segmentation KD (Liu et al. 2019).

    With ``p^T = softmax(z_t / T)`` (teacher) and ``q^T = softmax(z_s / T)`` (student), over
    the ``N = B * |S|`` voxels::

        L_kd = T^2 / N * sum_n sum_k p^T_{n,k} * (log p^T_{n,k} - log q^T_{n,k})

    The ``T^2`` keeps the gradient magnitude independent of ``T``.

    Args:
        student_logits: ``[B, K, *S]`` raw student logits.
        teacher_log_probs: ``[B, K, *S]`` teacher ``log p^T`` (see :func:`tempered_log_probs`).
        temperature: ``T > 0``.
        mask: optional ``[B, *S]`` bool, the voxels that have a teacher target (offline
            patches reaching outside the cached volume have none); ``N`` counts those only.

    Example:
        >>> z = torch.randn(2, 3, 4, 4)
        >>> float(logit_kd(z, tempered_log_probs(z, 2.0), 2.0))
        0.0
    """
    if student_logits.shape != teacher_log_probs.shape:
        raise ValueError(f"logit_kd: student {tuple(student_logits.shape)} != teacher {tuple(teacher_log_probs.shape)}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p = teacher_log_probs.float()
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)  # [B, *S]
    return _masked_mean(kl, mask) * temperature**2


def deep_supervision_kd(
    student_outputs: Sequence[torch.Tensor],
    teacher_logits: torch.Tensor,
    temperature: float,
    weights: Sequence[float] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KD at each lower-resolution deep-supervision output (the full-resolution output is
    :func:`logit_kd`'s job). Deep supervision itself: Lee et al. 2015, "Deeply-Supervised
    Nets"; its segmentation use: nnU-Net (Isensee et al. 2021).

    For student outputs ``z_s^(j)`` at sizes ``S_j`` (``j = 1..J``, halving resolution) and the
    teacher's full-resolution logits ``z_t``::

        p^(j) = AvgPool_{S_j}(softmax(z_t / T))
        L_ds  = sum_j w_j * KL(p^(j) || softmax(z_s^(j) / T)) * T^2 / sum_j w_j

    Args:
        student_outputs: ``[full, half, quarter, ...]`` logits; ``student_outputs[0]`` is skipped.
        teacher_logits: ``[B, K, *S]`` teacher logits at full resolution.
        temperature: ``T > 0``.
        weights: ``w_1..w_J``; ``None`` halves the weight per level (``0.5, 0.25, ...``) like
            the supervised deep-supervision loss.
        mask: optional full-resolution ``[B, *S]`` valid mask (see :func:`logit_kd`),
            pooled with :func:`pool_mask`.
    """
    lower = list(student_outputs[1:])
    if not lower:
        raise ValueError("deep_supervision_kd: need at least one lower-resolution output")
    weights = list(weights) if weights is not None else [0.5 ** (j + 1) for j in range(len(lower))]
    if len(weights) != len(lower):
        raise ValueError(f"deep_supervision_kd: {len(lower)} lower-resolution outputs but weights={weights}")
    total = student_outputs[0].new_zeros((), dtype=torch.float32)
    for w, out in zip(weights, lower):
        target = tempered_log_probs(teacher_logits, temperature, out.shape[2:])
        total = total + w * logit_kd(out, target, temperature, pool_mask(mask, out.shape[2:]))
    return total / sum(weights)


def channel_wise_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Channel-wise distillation (Shu, Liu, Gao, Yan, Shen, ICCV 2021, "Channel-wise Knowledge
    Distillation for Dense Prediction").

    Each class channel ``k`` of an image ``b`` becomes a distribution over the ``N`` voxels,
    ``phi(z)_{b,k,i} = softmax_i(z_{b,k,i} / T)``, and the student's distribution is pulled to
    the teacher's::

        L_cwd = T^2 / (B * K) * sum_b sum_k sum_i phi(z_t)_{b,k,i} * (log phi(z_t)_{b,k,i} - log phi(z_s)_{b,k,i})

    Why next to :func:`logit_kd`: the voxel-wise KL is an average over voxels, so background
    dominates it and a small class (a lesion) gets a share proportional to its size; here
    every class channel has the same weight, which is what a mean-Dice student needs.

    Args:
        student_logits: ``[B, K, *S]`` raw student logits.
        teacher_logits: ``[B, K, *S]`` raw teacher logits (or cached ones).
        temperature: ``T > 0``.
        mask: optional ``[B, *S]`` bool of voxels with a teacher target; the others are left
            out of both spatial softmaxes.

    Example:
        >>> z = torch.randn(2, 3, 4, 4)
        >>> float(channel_wise_kd(z, z, 4.0))
        0.0
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"channel_wise_kd: student {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    s = student_logits.float().flatten(2) / temperature  # [B, K, N]
    t = teacher_logits.float().flatten(2) / temperature
    if mask is not None:
        # A finite fill, not -inf: excluded voxels get probability exactly 0 in both softmaxes
        # and the KL terms stay finite (0 * (-inf + inf) would be NaN, also in the gradient).
        outside = ~mask.flatten(1)[:, None, :].bool()
        s, t = s.masked_fill(outside, -1e4), t.masked_fill(outside, -1e4)
    log_p, log_q = F.log_softmax(t, dim=2), F.log_softmax(s, dim=2)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=2)  # [B, K]
    return kl.mean() * temperature**2


def match_spatial(teacher_feat: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a teacher feature map to the student's spatial ``size``: average pooling when
    shrinking (no aliasing), linear interpolation (``align_corners=False``) when growing."""
    size = tuple(int(s) for s in size)
    if tuple(teacher_feat.shape[2:]) == size:
        return teacher_feat
    dims = _spatial_dims(teacher_feat)
    if all(t >= s for t, s in zip(teacher_feat.shape[2:], size)):
        return _ADAPTIVE_AVG[dims](teacher_feat, size)
    return F.interpolate(teacher_feat, size=size, mode=_LINEAR[dims], align_corners=False)


def feature_mse(adapted_student: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets").

    With the student feature ``F_s`` mapped by a learned 1x1 convolution ``A`` to the teacher's
    channel count (``A`` is the identity when the counts agree) and the teacher feature
    ``F_t`` resized to the student's spatial size (:func:`match_spatial`), over all
    ``M = B * C_t * |S|`` elements::

        L_feat = 1 / M * || A(F_s) - F_t ||_2^2

    Args:
        adapted_student: ``A(F_s)``, ``[B, C_t, *S]``.
        teacher_feat: ``F_t``, ``[B, C_t, *S']``; resized to ``S`` if ``S' != S``.
    """
    target = match_spatial(teacher_feat.float(), adapted_student.shape[2:])
    if target.shape != adapted_student.shape:
        raise ValueError(f"feature_mse: adapted student {tuple(adapted_student.shape)} != teacher {tuple(target.shape)}")
    return F.mse_loss(adapted_student.float(), target)


def affinity(features: torch.Tensor, size: Sequence[int], rel_eps: float = 0.01) -> torch.Tensor:
    """Cosine-similarity matrix ``[B, N, N]`` between the ``N = prod(size)`` nodes of a
    feature map max-pooled to ``size`` (Liu et al.'s code pools with max).

    The norm is smoothed, ``|f| -> sqrt(|f|^2 + d^2)`` with ``d^2 = rel_eps`` times the map's
    mean squared node norm (detached): the gradient of ``f / |f|`` grows like ``1 / |f|``, and
    post-ReLU maps of a narrow student have all-zero nodes, whose spikes then dominate every
    clipped update (a base-5 U-Net collapsed to background). Nodes well above ``d`` get the
    plain cosine similarity.
    """
    dims = _spatial_dims(features)
    nodes = _ADAPTIVE_MAX[dims](features.float(), tuple(int(s) for s in size)).flatten(2)  # [B, C, N]
    sq = (nodes * nodes).sum(dim=1, keepdim=True)  # [B, 1, N]
    floor = rel_eps * sq.mean(dim=2, keepdim=True).detach() + 1e-12
    nodes = nodes * torch.rsqrt(sq + floor)
    return torch.einsum("bcm,bcn->bmn", nodes, nodes)


def pairwise_affinity(student_feat: torch.Tensor, teacher_feat: torch.Tensor, grid: int) -> torch.Tensor:
    """Pair-wise distillation of Structured Knowledge Distillation for Semantic Segmentation
    (Liu, Chen, Liu, Qin, Luo, Wang, CVPR 2019), generalised to 3D.

    Both feature maps are max-pooled to the same node grid (at most ``grid`` nodes per axis,
    ``N`` nodes in all); node ``i`` has feature vector ``f_i``. With the affinity
    ``a_ij = f_i . f_j / (|f_i| |f_j|)`` (norms smoothed near zero, see :func:`affinity`)::

        L_pa = 1 / (B * N^2) * sum_b sum_i sum_j (a^s_ij - a^t_ij)^2

    Affinities compare positions with each other, so student and teacher may have different
    channel counts and no adapter is needed. Cost is ``O(B * N^2)`` memory: keep ``grid``
    small in 3D (``N = grid^3``).

    Args:
        student_feat: ``[B, C_s, *S_s]``.
        teacher_feat: ``[B, C_t, *S_t]``; per axis, ``min(S_s, S_t, grid)`` nodes.
        grid: maximum nodes per spatial axis.
    """
    size = [max(1, min(s, t, grid)) for s, t in zip(student_feat.shape[2:], teacher_feat.shape[2:])]
    a_s, a_t = affinity(student_feat, size), affinity(teacher_feat, size)
    if a_s.shape != a_t.shape:
        raise ValueError(f"pairwise_affinity: student nodes {tuple(a_s.shape)} != teacher nodes {tuple(a_t.shape)}")
    return ((a_s - a_t) ** 2).mean()
