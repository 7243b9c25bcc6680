"""torch's ``lazy`` device: a second, real device on a CPU-only machine (TorchScript backend).

Tests that must tell "on the right device" from "on the CPU" (NCCL takes only GPU tensors)
use it as a stand-in GPU. The backend registers once per process; later calls reuse it."""
from __future__ import annotations

import importlib

import torch


def lazy_device() -> torch.device | None:
    """``lazy:0``, initialised if needed; None where this torch build has no lazy backend."""
    try:
        torch.ones(1).to("lazy").cpu()
        return torch.device("lazy", 0)
    except Exception:  # noqa: BLE001 - not initialised yet, or not built
        pass
    try:  # (imported by name: `import torch._lazy...` here would make `torch` a local)
        importlib.import_module("torch._lazy.ts_backend").init()
        torch.ones(1).to("lazy").cpu()
        return torch.device("lazy", 0)
    except Exception:  # noqa: BLE001
        return None
