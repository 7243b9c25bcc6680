"""Forward-hook feature taps: recording, one-line errors for unknown layers, module swaps."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.distill.features import (
    FeatureTap, detach_from_parent_state, kept_output_channels, make_adapter, resized_adapter, resolve,
)
from trainer.errors import UserError
from trainer.models.unet import UNet


def test_tap_records_only_while_recording():
    net = UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4)
    tap = FeatureTap(["decoders.1", "encoders.2"], "student")
    tap.attach(net)
    net(torch.zeros(1, 1, 16, 16))
    with pytest.raises(UserError, match="did not run"):
        tap.take()
    with tap.recording():
        net(torch.zeros(1, 1, 16, 16))
    feats = tap.take()
    assert feats["decoders.1"].shape == (1, 4, 16, 16) and feats["encoders.2"].shape == (1, 16, 4, 4)


def test_unknown_layer_lists_available_names_in_one_line():
    net = UNet(spatial_dims=3, num_classes=3, depth=3, base_channels=4)
    with pytest.raises(UserError) as err:
        resolve(net, "decoder.2", "student")
    msg = str(err.value)
    assert "'decoder.2'" in msg and "did you mean decoders.2" in msg and "encoders" in msg
    assert "more)" in msg and "\n" not in msg and len(msg) < 600


def test_tap_follows_a_swapped_module():
    """A technique replacing the hooked module (as QAT does) is followed on re-attach."""
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU())
    tap = FeatureTap(["0"], "student")
    tap.attach(net)
    assert not tap.attach(net)  # idempotent: nothing moved
    net[0] = nn.Conv2d(1, 2, 1)
    assert tap.attach(net)
    with tap.recording():
        net(torch.ones(1, 1, 2, 2))
    assert torch.allclose(tap.take()["0"], net[0](torch.ones(1, 1, 2, 2)))


def test_adapters_are_hidden_from_the_parent_state_dict():
    parent = nn.Module()
    parent.net = nn.Conv2d(1, 1, 1)
    parent.distill_adapters = detach_from_parent_state(nn.ModuleDict({"a": make_adapter(2, 4, 8)}))
    assert all(not k.startswith("distill_adapters") for k in parent.state_dict())
    assert set(parent.distill_adapters.state_dict()) == {"a.weight", "a.bias"}
    before = parent.distill_adapters["a"].weight.clone()
    parent.load_state_dict({k: torch.zeros_like(v) for k, v in parent.state_dict().items()})  # strict
    assert torch.equal(parent.distill_adapters["a"].weight, before)
    assert isinstance(make_adapter(3, 4, 4), nn.Identity) and isinstance(make_adapter(3, 4, 2), nn.Conv3d)


def test_adapter_follows_a_pruning_plan():
    structure = [{"converter": "trainer.prune.structured.StructuredPrune",
                  "state": {"layers": {"decoders.1.block.0": {"out": {"before": 8, "keep": [0, 2, 3, 7]}},
                                       "decoders.1.block.3": {"out": {"before": 8, "keep": [1, 2, 5, 6]}}}}}]
    keep = kept_output_channels(structure, "decoders.1", 8, 4)
    assert keep == [1, 2, 5, 6]  # the last layer under the hooked container gives its output
    assert kept_output_channels(structure, "encoders.1", 8, 4) is None
    conv = make_adapter(2, 8, 16)
    smaller = resized_adapter(conv, 2, keep, 4, 16)
    assert torch.equal(smaller.weight, conv.weight[:, keep]) and torch.equal(smaller.bias, conv.bias)
    selector = resized_adapter(nn.Identity(), 2, keep, 4, 8)  # was identity (8 == 8 channels)
    x = torch.randn(1, 8, 3, 3)
    assert torch.allclose(selector(x[:, keep]), x * torch.isin(torch.arange(8), torch.tensor(keep)).view(1, 8, 1, 1))


def test_a_resized_identity_adapter_lands_where_the_student_trains():
    """An identity adapter has no parameter to tell its device: the conv replacing it after a
    pruning round was built on the CPU in fp32, next to a student on a GPU (or in bf16)."""
    from lazy_device import lazy_device

    device = lazy_device() or torch.device("cpu")  # a second device on a CPU-only machine
    keep = [1, 2, 5, 6]
    selector = resized_adapter(nn.Identity(), 2, keep, 4, 8, device=device, dtype=torch.bfloat16)
    assert selector.weight.device == device and selector.weight.dtype == torch.bfloat16
    x = torch.randn(1, 8, 3, 3)
    got = selector(x[:, keep].to(device, torch.bfloat16)).cpu().float()
    torch.testing.assert_close(got, (x * torch.isin(torch.arange(8), torch.tensor(keep)).view(1, 8, 1, 1)).bfloat16().float())
