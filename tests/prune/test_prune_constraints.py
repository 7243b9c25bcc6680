"""Pruning constraints read from the network: PReLU, GroupNorm, broadcast gates, depthwise and
grouped convolutions, heads behind ``torch.stack``, example inputs without attributes."""
from __future__ import annotations

import pytest
import torch
from monai.networks import nets
from torch import nn

from trainer.errors import UserError
from trainer.prune.structured import apply_plan, prune_channels


def _same_after_replay(make, plan, pruned):
    fresh = make()
    apply_plan(fresh, plan)
    fresh.load_state_dict(pruned.state_dict())
    x = torch.randn(1, 1, 32, 32)
    fresh.eval(), pruned.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))


def _params(net):
    return sum(p.numel() for p in net.parameters())


def _unet():
    torch.manual_seed(0)
    return nets.UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)


def test_monai_unet_with_shared_slope_prelu_prunes():
    # Torch-Pruning alone fails here: "unsupported operand type(s) for +: 'int' and 'NoneType'"
    net = _unet()
    slopes = {n: m.weight.clone() for n, m in net.named_modules() if isinstance(m, nn.PReLU)}
    assert slopes and all(w.numel() == 1 for w in slopes.values())
    before = _params(net)
    plan = prune_channels(net, 0.5)
    assert _params(net) < 0.35 * before
    assert not any(n in plan["layers"] for n in slopes)  # a shared slope has no channel to cut
    for n, m in net.named_modules():
        if n in slopes:
            assert torch.equal(m.weight, slopes[n])
    _same_after_replay(_unet, plan, net)


class PerChannelPReLU(nn.Module):
    spatial_dims, in_channels, divisor = 2, 1, 1

    def __init__(self):
        super().__init__()
        self.a, self.act = nn.Conv2d(1, 8, 3, padding=1), nn.PReLU(8)
        self.shared, self.head = nn.PReLU(), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(self.shared(self.act(self.a(x))))


def test_per_channel_prelu_loses_channels_with_its_conv():
    net = PerChannelPReLU()
    prune_channels(net, 0.5)
    assert net.a.out_channels == net.act.num_parameters == net.head.in_channels == 4
    assert net.shared.num_parameters == 1


def _segresnet(filters=16, groups=8):
    torch.manual_seed(0)
    return nets.SegResNet(spatial_dims=2, in_channels=1, out_channels=3, init_filters=filters, blocks_down=(1, 1, 1),
                          blocks_up=(1, 1), norm=("GROUP", {"num_groups": groups}))


def test_groupnorm_groups_shrink_evenly():
    net = _segresnet()
    old = {n: (m.num_channels, m.num_groups) for n, m in net.named_modules() if isinstance(m, nn.GroupNorm)}
    plan = prune_channels(net, 0.5)
    pruned_norms = 0
    for name, (channels, groups) in old.items():
        norm = net.get_submodule(name)
        assert norm.num_channels % norm.num_groups == 0 and norm.num_groups == groups
        if name in plan["layers"]:
            pruned_norms += 1
            keep = plan["layers"][name]["out"]["keep"]
            per_group = [sum(1 for k in keep if k // (channels // groups) == g) for g in range(groups)]
            assert len(set(per_group)) == 1, (name, per_group)  # every group keeps its own members
    assert pruned_norms >= 4
    _same_after_replay(_segresnet, plan, net)


def test_round_to_combines_with_num_groups():
    # round_to 3 and 8 groups: kept counts are multiples of 24; a 16-channel level is left whole
    net = _segresnet(filters=16, groups=8)
    prune_channels(net, 0.25, round_to=3)
    widths = sorted({m.num_channels for m in net.modules() if isinstance(m, nn.GroupNorm)})
    assert all(w % 24 == 0 or w == 16 for w in widths), widths
    assert 16 in widths and 48 in widths  # 16 kept whole; 64 -> 48


def _attention():
    torch.manual_seed(0)
    return nets.AttentionUnet(spatial_dims=2, in_channels=1, out_channels=3, channels=(8, 16, 32), strides=(2, 2))


def test_attention_gate_is_not_tied_to_the_gated_channels():
    net = _attention()
    plan = prune_channels(net, 0.5)
    gates = [m for n, m in net.named_modules() if n.endswith("psi.0.conv")]
    assert gates and all(g.out_channels == 1 for g in gates)  # the one-channel gate stays one channel
    assert _params(net) < 0.4 * _params(_attention())
    _same_after_replay(_attention, plan, net)


def test_heads_behind_torch_stack_keep_their_classes():
    def make():
        torch.manual_seed(0)
        return nets.DynUNet(spatial_dims=2, in_channels=1, out_channels=3, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                            upsample_kernel_size=[2, 2], filters=[8, 16, 32], deep_supervision=True, deep_supr_num=1)
    net = make()
    plan = prune_channels(net, 0.5)
    heads = [net.output_block.conv.conv, *[h.conv.conv for h in net.deep_supervision_heads]]
    assert [h.out_channels for h in heads] == [3, 3]
    assert plan["output_shapes"] == [[2, 2, 3, 8, 8]]  # training mode: [B, heads, K, *S], unchanged
    net.train()
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 2, 3, 32, 32)


class Separable(nn.Module):
    """A depthwise-separable block, then a grouped (non-depthwise) convolution."""

    spatial_dims, in_channels, divisor = 2, 1, 1

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        x = torch.relu(self.pointwise(torch.relu(self.depthwise(torch.relu(self.stem(x))))))
        return self.head(torch.relu(self.grouped(x)))


def test_depthwise_follows_its_input_and_grouped_convs_stay_whole():
    net = Separable()
    plan = prune_channels(net, 0.5)
    assert net.stem.out_channels == net.depthwise.in_channels == net.depthwise.out_channels == net.depthwise.groups == 8
    assert net.grouped.in_channels == net.grouped.out_channels == 16 and net.pointwise.out_channels == 16
    assert set(plan["kept_whole"]) == {"pointwise", "grouped"}
    assert "grouped convolution 'grouped' (groups=2)" in plan["kept_whole"]["grouped"]
    _same_after_replay(Separable, plan, net)


def test_example_input_read_from_a_network_without_attributes():
    torch.manual_seed(0)
    net = nets.BasicUNet(spatial_dims=2, in_channels=2, out_channels=3, features=(8, 8, 16, 16, 32, 8))
    assert not hasattr(net, "spatial_dims") and not hasattr(net, "in_channels")
    plan = prune_channels(net, 0.5)
    assert plan["example_shape"] == [2, 2, 32, 32]  # first conv: 2 channels, 2D; BasicUNet pools 4 times


def test_a_network_without_convolutions_names_the_fix():
    with pytest.raises(UserError, match=r"cannot tell the input of Sequential .*example_shape") as err:
        prune_channels(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), 0.5)
    assert "\n" not in str(err.value)
