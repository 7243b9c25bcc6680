"""The forward-pass count ZeRO-3 evaluation plans with (trainer/zero3_eval.py) is the count
the sliding window really makes; the lockstep itself runs under real ZeRO-3 in
tests/distributed/test_dist_gpu_paths.py."""
from __future__ import annotations

import pytest
import torch

from trainer.inference import SW_BATCH_SIZE, predict_logits
from trainer.zero3_eval import forward_passes


@pytest.mark.parametrize("shape, roi", [
    ((1, 1, 40, 33, 17), (16, 16, 16)),
    ((1, 1, 16, 16, 16), (16, 16, 16)),  # one window: whole image
    ((2, 1, 9, 50, 31), (16, 16, 16)),   # an axis smaller than the window (padded) and batch 2
    ((1, 1, 64, 64), (24, 24)),
    ((3, 1, 20, 20), None),              # 2D whole slices
    ((1, 2, 31, 17, 70), (8, 16, 16)),
])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_planned_passes_equal_the_sliding_windows_calls(shape, roi, overlap):
    calls = []

    def net(x):
        calls.append(tuple(x.shape))
        return torch.zeros(x.shape[0], 3, *x.shape[2:])

    predict_logits(net, torch.zeros(shape), roi, overlap, divisor=1)
    assert forward_passes(shape, roi, overlap, SW_BATCH_SIZE) == len(calls)
