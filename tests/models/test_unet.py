import pytest
import torch

from trainer.models import UNet


@pytest.mark.parametrize("dims,size", [(2, 32), (3, 16)])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_output_shape_matches_input(dims, size, norm):
    net = UNet(spatial_dims=dims, in_channels=2, num_classes=4, depth=2, base_channels=4, norm=norm).eval()
    x = torch.randn(2, 2, *(size,) * dims)
    assert net(x).shape == (2, 4, *(size,) * dims)


@pytest.mark.parametrize("dims", [2, 3])
def test_deep_supervision_outputs_in_training_only(dims):
    net = UNet(spatial_dims=dims, num_classes=3, depth=3, base_channels=4, deep_supervision=True, ds_levels=2)
    x = torch.randn(2, 1, *(16,) * dims)
    outs = net.train()(x)
    assert [tuple(o.shape[2:]) for o in outs] == [(16,) * dims, (8,) * dims, (4,) * dims]
    assert all(o.shape[:2] == (2, 3) for o in outs)
    assert net.eval()(x).shape == (2, 3, *(16,) * dims)


def test_width_and_depth_change_parameter_count():
    small = sum(p.numel() for p in UNet(base_channels=8, depth=3).parameters())
    big = sum(p.numel() for p in UNet(base_channels=32, depth=3).parameters())
    # conv parameters scale with width squared
    assert 12 < big / small < 17


@pytest.mark.parametrize(
    "kwargs,match",
    [({"spatial_dims": 4}, "spatial_dims"), ({"norm": "group"}, "norm"), ({"num_classes": 1}, "num_classes"),
     ({"deep_supervision": True, "depth": 2, "ds_levels": 2}, "ds_levels")],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)
