"""trainer.prune.rebuild under DeepSpeed: nothing is rebuilt (the engine owns the optimizer);
a change the engine can follow goes on, any other is refused in one line.

Lightning's ``DeepSpeedStrategy.setup_optimizers`` sets ``optimizers = []``: calling it mid-run,
as the rebuild did for DDP, left the trainer with no optimizer at all."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from prune_helpers import tiny_unet
from trainer.errors import UserError
from trainer.module import SegmentationModule
from trainer.prune.rebuild import rebuild_optimizers, snapshot
from trainer.prune.sparsity import sparsify
from trainer.quant.convert import quantize_net


class DeepSpeedStrategyStub:
    """Named like Lightning's strategy; fails the test if anything rebuilds through it."""

    root_device = torch.device("cpu")

    def setup_optimizers(self, trainer):
        raise AssertionError("optimizers rebuilt under DeepSpeed")


def _run():
    module = SegmentationModule(tiny_unet(dims=2), num_classes=3)
    optimizer = torch.optim.AdamW(module.parameters())
    trainer = SimpleNamespace(strategy=DeepSpeedStrategyStub(), optimizers=[optimizer], lr_scheduler_configs=[])
    return trainer, module, optimizer


def test_same_parameters_need_no_rebuild_under_deepspeed():
    trainer, module, optimizer = _run()
    before = snapshot(trainer, module)
    sparsify(module.net, 0.3)  # masks: weight -> weight_orig, the same Parameter objects
    quantize_net(module.net)  # fixed scales: buffers only, layers change class in place
    rebuild_optimizers(trainer, module, before)
    assert trainer.optimizers == [optimizer]


@pytest.mark.parametrize("change, message", [
    ("learnable", r"trainable parameters changed mid-run \(\d+ new, 0 gone\)"),
    ("rewind", "cannot restart it mid-run"),
    ("shapes", "parameters changed shape mid-run"),
])
def test_changes_deepspeed_cannot_follow_are_refused(change, message):
    trainer, module, _ = _run()
    before = snapshot(trainer, module)
    plan = {"layers": {"encoders.0.0": {}}} if change == "shapes" else None
    if change == "learnable":
        quantize_net(module.net, learnable_scales=True)
    with pytest.raises(UserError, match=f"DeepSpeedStrategyStub: .*{message}"):
        rebuild_optimizers(trainer, module, before, plan=plan, rewind=change == "rewind")


def test_masks_follow_the_weight_dtype():
    """DeepSpeed *-mixed casts parameters, not buffers: a bf16 weight_orig times an fp32 mask
    is an fp32 weight that a bf16 input cannot meet."""
    from trainer.prune.sparsity import match_mask_dtypes

    net = nn.Sequential(nn.Conv2d(1, 4, 3))
    sparsify(net, 0.5)
    for param in net.parameters():  # what DeepSpeed does to parameters (buffers stay fp32)
        param.data = param.data.bfloat16()
    match_mask_dtypes(net)
    assert net[0].weight_mask.dtype == torch.bfloat16
    assert net(torch.randn(1, 1, 5, 5).bfloat16()).dtype == torch.bfloat16
