"""Feeding a network outside the training step in the precision it trains in.

Callbacks run extra forward passes (QAT calibration, Taylor pruning scores, the distillation
teacher) on batches that never went through Lightning's precision plugin. That is harmless
with fp32 or AMP (``*-mixed`` under DDP: fp32 weights, autocast), but DeepSpeed with
``16-mixed``/``bf16-mixed`` casts the *parameters* to half and feeds half inputs without
autocast, and ``16-true``/``bf16-true`` cast the whole module: an fp32 batch then meets half
weights ("Input type (float) and bias type (c10::Half) should be the same"), and a half batch
meets an fp32 network (the teacher) the same way. These helpers cast a batch to whatever the
network holds, and run the pass in the trainer's own forward context (autocast under AMP).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Mapping

import torch
from torch import nn


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (float32 if it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def param_device(module: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    return next((p.device for p in module.parameters()), torch.device(default))


def as_input(x: torch.Tensor, module: nn.Module, device: torch.device | None = None) -> torch.Tensor:
    """``x`` on ``device`` (default: the module's), floating tensors in the module's dtype."""
    device = device if device is not None else param_device(module)
    if x.is_floating_point():
        return x.to(device=device, dtype=param_dtype(module))
    return x.to(device)


def batch_for(batch: Mapping[str, Any], module: nn.Module, device: torch.device | None = None) -> dict[str, Any]:
    """Every tensor of ``batch`` moved like :func:`as_input`; other values unchanged."""
    return {k: as_input(v, module, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_context(trainer: Any) -> AbstractContextManager:
    """The trainer's precision context for a forward pass (autocast under AMP), as the
    training step gets it; a plain context without a trainer."""
    plugin = getattr(trainer, "precision_plugin", None)
    return plugin.forward_context() if plugin is not None else nullcontext()


def low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)
