"""Whole-image inference shared by validation, export verification and reports.

Any callable ``fn(batch) -> logits`` works (a torch module, or an onnxruntime session
wrapped by the exporter), so the PyTorch model and its exported artifact are scored by the
same code path. 3D volumes go through MONAI's sliding-window inferer (Gaussian blending,
padding of small volumes); 2D slices are padded to the network's divisor and run whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

Predictor = Callable[[torch.Tensor], torch.Tensor]
SW_BATCH_SIZE = 2  # windows per forward call; changes speed only, never the result
SW_MODE = "gaussian"


@dataclass(frozen=True)
class InferenceSettings:
    """How a whole image is predicted: the one set of settings validation, export verification,
    ``launch.py verify``, the report and a deployed model's card share.

    Args:
        roi_size: sliding-window size (3D); ``None`` runs the image whole (2D).
        overlap: fraction of overlap between windows (``model.sw_overlap``). Default 0.5.
        divisor: whole-image inputs are zero padded to a multiple of this.
    """

    roi_size: Sequence[int] | None = None
    overlap: float = 0.5
    divisor: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "roi_size", None if self.roi_size is None else tuple(int(r) for r in self.roi_size))
        if not 0.0 <= float(self.overlap) < 1.0:
            from trainer.errors import UserError

            raise UserError(f"sliding-window overlap={self.overlap} must be in [0, 1)")

    def card(self) -> dict[str, Any]:
        """The model card's description of these settings."""
        return {"roi_size": list(self.roi_size) if self.roi_size else None, "divisor": int(self.divisor),
                "sliding_window_overlap": float(self.overlap) if self.roi_size else None,
                "sliding_window_mode": SW_MODE if self.roi_size else None}


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, list[slice]]:
    """Zero-pad the spatial dims of ``x`` (``[B, C, *S]``) up to multiples of ``multiple``.

    Returns the padded tensor and the slices that crop a prediction back to ``x``'s size.
    """
    spatial = x.shape[2:]
    pads: list[int] = []
    for size in reversed(spatial):  # F.pad wants the last dim first
        pads += [0, (-size) % multiple]
    crop = [slice(None), slice(None)] + [slice(0, s) for s in spatial]
    return (F.pad(x, pads) if any(pads) else x), crop


@torch.no_grad()
def predict_logits(
    fn: Predictor,
    image: torch.Tensor,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    divisor: int = 16,
    sw_batch_size: int = SW_BATCH_SIZE,
    settings: InferenceSettings | None = None,
) -> torch.Tensor:
    """Logits for a whole image ``[B, C, *S]``.

    Args:
        fn: maps a ``[b, C, *roi]`` tensor to ``[b, K, *roi]`` logits.
        image: full slices or volumes.
        roi_size: window size for sliding-window inference; ``None`` runs the image whole.
        overlap: fraction of overlap between windows. Default 0.5.
        divisor: pad whole-image inputs to a multiple of this (``2**depth`` of a U-Net).
        sw_batch_size: windows per forward call.
        settings: ``InferenceSettings`` replacing ``roi_size``, ``overlap`` and ``divisor``.
    """
    if settings is not None:
        roi_size, overlap, divisor = settings.roi_size, settings.overlap, settings.divisor
    if roi_size is not None and any(s > r for s, r in zip(image.shape[2:], roi_size)):
        return sliding_window_inference(
            image, list(roi_size), sw_batch_size, fn, overlap=overlap, mode=SW_MODE
        )
    padded, crop = pad_to_multiple(image, divisor)
    return fn(padded)[tuple(crop)]
