"""``SyncTrap``: a tensor that refuses to hand its values to Python.

On a GPU every such read (``bool(t)``, ``t.tolist()``, ``t.item()``, boolean-mask indexing,
``t.cpu()``) is a host sync: the CPU waits for every queued kernel. Tests wrap the tensors a
batch holds on its device in ``SyncTrap`` (``t.as_subclass(SyncTrap)``) to show, on a CPU,
that a per-step code path reads none of them.
"""
from __future__ import annotations

import torch

READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy", "all", "any"}


class SyncTrap(torch.Tensor):
    """A tensor that refuses to hand its values to Python (a host sync on a GPU)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or (name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                                            for a in args[1:])):
            raise AssertionError(f"host sync: {name} on a device tensor")
        return super().__torch_function__(func, types, args, kwargs or {})
