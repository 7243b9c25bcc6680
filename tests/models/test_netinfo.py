"""What other people's networks say about their inputs (trainer.models.netinfo)."""
from __future__ import annotations

import pytest
import torch
from monai.networks import nets

from trainer.models import UNet, netinfo

MONAI = {
    "UNet": (lambda d: nets.UNet(spatial_dims=d, in_channels=2, out_channels=3, channels=(4, 8, 16), strides=(2, 2)), 4),
    "BasicUNet": (lambda d: nets.BasicUNet(spatial_dims=d, in_channels=2, out_channels=3, features=(4, 4, 4, 4, 4, 4)), 16),
    "SegResNet": (lambda d: nets.SegResNet(spatial_dims=d, in_channels=2, out_channels=3, init_filters=8), 8),
    "DynUNet": (lambda d: nets.DynUNet(spatial_dims=d, in_channels=2, out_channels=3, kernel_size=[3] * 4,
                                       strides=[1, 2, 2, 2], upsample_kernel_size=[2] * 3), 8),
    "AttentionUnet": (lambda d: nets.AttentionUnet(spatial_dims=d, in_channels=2, out_channels=3, channels=(4, 8, 16, 32),
                                                   strides=(2, 2, 2)), 8),
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", sorted(MONAI))
def test_monai_networks_describe_their_input(name, dims):
    make, divisor = MONAI[name]
    net = make(dims).eval()
    assert (netinfo.spatial_dims(net), netinfo.in_channels(net), netinfo.divisor(net)) == (dims, 2, divisor)
    with torch.no_grad():  # the divisor is a size the network really accepts
        assert net(torch.zeros(1, 2, *[divisor * 2] * dims)).shape[1] == 3


def test_own_unet_and_unknown_networks():
    net = UNet(spatial_dims=3, in_channels=2, num_classes=3, depth=3, base_channels=4)
    assert (netinfo.spatial_dims(net), netinfo.in_channels(net), netinfo.divisor(net)) == (3, 2, 8)
    plain = torch.nn.Sequential(torch.nn.Conv2d(4, 3, 1))
    assert (netinfo.spatial_dims(plain), netinfo.in_channels(plain), netinfo.divisor(plain)) == (2, 4, 16)
    assert netinfo.spatial_dims(torch.nn.Linear(2, 2)) is None


def test_stacked_deep_supervision_becomes_a_list():
    stacked = torch.zeros(2, 3, 4, 8, 8)  # DynUNet in training: [B, heads, K, H, W]
    out = netinfo.training_outputs(stacked, label_dims=3)
    assert isinstance(out, list) and len(out) == 3 and out[0].shape == (2, 4, 8, 8)
    plain = torch.zeros(2, 4, 8, 8)
    assert netinfo.training_outputs(plain, label_dims=3) is plain
    listed = [plain, plain]
    assert netinfo.training_outputs(listed, label_dims=3) is listed
