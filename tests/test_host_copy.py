"""Per-step facts read on the host, not off the GPU (trainer/host_copy.py).

A value read from a CUDA tensor (``bool(t.all())``, ``t.tolist()``, boolean-mask indexing)
waits for every queued kernel: one host sync per step. To show on the CPU that the loss and
the offline-distillation replay no longer read such values, the batch's device tensors are
wrapped in :class:`SyncTrap`, which raises on any read of a value into Python.
"""
from __future__ import annotations

import pytest
import torch

from sync_trap import SyncTrap
from trainer import host_copy
from trainer.losses import DiceCE
from trainer.models import UNet
from trainer.module import SegmentationModule

def _batch(labelled: list[bool]):
    g = torch.Generator().manual_seed(0)
    cpu = {"image": torch.randn(len(labelled), 1, 16, 16, generator=g),
           "label": torch.randint(0, 3, (len(labelled), 16, 16), generator=g),
           "index": torch.arange(len(labelled)), "case": [f"c{i}" for i in range(len(labelled))],
           "labelled": torch.tensor(labelled)}
    host_copy.remember(cpu)
    device = {k: (v.clone().as_subclass(SyncTrap) if isinstance(v, torch.Tensor) else v) for k, v in cpu.items()}
    return cpu, device


@pytest.mark.parametrize("labelled", [[True, False, True], [False, False, False], [True, True, True]],
                         ids=["mixed", "none", "all"])
def test_supervised_loss_reads_the_host_copy_only(labelled):
    torch.manual_seed(0)
    module = SegmentationModule(UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4), num_classes=3,
                                loss=DiceCE())
    cpu, device = _batch(labelled)
    outputs = module.net(cpu["image"])
    expected = module.supervised_loss(outputs, {k: v for k, v in cpu.items() if k != host_copy.KEY})
    got = module.supervised_loss(outputs.as_subclass(SyncTrap), device)
    torch.testing.assert_close(got.as_subclass(torch.Tensor), expected, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="host sync"):  # the trap works: no host copy, a sync
        module.supervised_loss(outputs.as_subclass(SyncTrap), {k: v for k, v in device.items() if k != host_copy.KEY})


def test_remember_keeps_cpu_facts_and_ignores_device_batches():
    cpu, _ = _batch([True, False])
    host = host_copy.of(cpu)
    assert host.index == [0, 1] and host.labelled == [True, False] and host.labelled_index == [0]
    assert host.label is cpu["label"]
    assert host_copy.of({"image": torch.zeros(1)}) is None
