"""Calibration inputs for static INT8 quantization, drawn from the validation batches.

2D: whole slices padded to the divisor, one array per batch (the shapes the artifact will
see). 3D: ``windows_per_volume`` windows of ``roi_size`` per volume at seeded random
positions (what sliding-window inference feeds the artifact), zero-padded where a volume is
smaller than the window.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from onnxruntime.quantization import CalibrationDataReader

from trainer.inference import pad_to_multiple


def calibration_arrays(
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    num_batches: int,
    divisor: int,
    roi_size: Sequence[int] | None = None,
    windows_per_volume: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Float32 arrays ``[b, C, *S]`` to calibrate on, from the first ``num_batches`` batches."""
    gen = torch.Generator().manual_seed(seed)
    arrays = []
    for batch in batches[:num_batches]:
        image = batch["image"].float()
        if roi_size is None:
            arrays.append(pad_to_multiple(image, divisor)[0].numpy())
            continue
        for volume in image:
            volume = _pad_to_at_least(volume.unsqueeze(0), roi_size)
            for _ in range(windows_per_volume):
                starts = [int(torch.randint(0, s - r + 1, (1,), generator=gen)) for s, r in zip(volume.shape[2:], roi_size)]
                window = volume[(slice(None), slice(None), *[slice(a, a + r) for a, r in zip(starts, roi_size)])]
                arrays.append(window.contiguous().numpy())
    return arrays


def _pad_to_at_least(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    pads: list[int] = []
    for have, want in zip(reversed(x.shape[2:]), reversed(list(size))):
        pads += [0, max(0, want - have)]
    return F.pad(x, pads) if any(pads) else x


class ArrayReader(CalibrationDataReader):
    """An onnxruntime ``CalibrationDataReader`` over a list of arrays for one input."""

    def __init__(self, input_name: str, arrays: list[np.ndarray]):
        self.input_name = input_name
        self.arrays = arrays
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.arrays):
            return None
        self._next += 1
        return {self.input_name: self.arrays[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.arrays)
