"""Channel removal on Torch-Pruning's dependency graph: shapes, ratios, rounding, replay."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_helpers import ResidualNet, conv_out_channels, tiny_unet, trained_unet
from trainer.errors import UserError
from trainer.prune.measure import count_macs, count_params
from trainer.prune.structured import apply_plan, keep_count, prune_channels, taylor_gradients

HEADS = ("head", "ds_heads.0")


def _outputs(net, x):
    net.train()
    with torch.no_grad():
        train_out = net(x)
    net.eval()
    with torch.no_grad():
        eval_out = net(x)
    return train_out, eval_out


@pytest.mark.parametrize("dims,norm,ds", [(2, "batch", True), (3, "instance", True), (2, "instance", False), (3, "batch", False)])
def test_channels_removed_through_skips_and_network_still_fits(dims, norm, ds):
    net = tiny_unet(dims=dims, norm=norm, ds=ds)
    before = conv_out_channels(net)
    plan = prune_channels(net, 0.5, importance="l1")
    after = conv_out_channels(net)
    for name, n in before.items():
        if name in HEADS:
            assert after[name] == 3, f"{name} must keep the class outputs"
        else:
            assert after[name] == n // 2, name
    x = torch.randn(2, 1, *([16] * dims))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    train_out, eval_out = _outputs(net, x)
    assert eval_out.shape == (2, 3, *([16] * dims))
    if ds:
        assert [tuple(o.shape) for o in train_out] == [(2, 3, *([16] * dims)), (2, 3, *([8] * dims))]
    # the plan replays on a freshly built net: same structure, same function
    fresh = tiny_unet(seed=1, dims=dims, norm=norm, ds=ds)
    apply_plan(fresh, plan)
    fresh.load_state_dict(state)
    _, fresh_out = _outputs(fresh, x)
    assert torch.equal(fresh_out, eval_out)


def test_residual_adds_and_conv_transpose_stay_coupled():
    torch.manual_seed(0)
    net = ResidualNet(width=16)
    prune_channels(net, 0.5, importance="l2")
    widths = conv_out_channels(net)
    # the stem and both residual branches are one group (added together): pruned alike
    assert widths["stem.0"] == widths["res1.0"] == widths["res2.0"] == 8
    assert widths["up"] == 8 and widths["down"] == 16 and widths["head"] == 3
    assert net.fuse.in_channels == 16  # concat of up (8) and the skip (8)
    assert net(torch.randn(1, 1, 16, 16)).shape == (1, 3, 16, 16)


@pytest.mark.parametrize("ratio,expect", [(0.5, {16: 8, 32: 16, 64: 32}), (0.3, {16: 8, 32: 24, 64: 48})])
def test_round_to_gives_multiples_and_params_macs_drop(ratio, expect):
    net = tiny_unet(base=16, ds=False)
    before = conv_out_channels(net)
    params0, macs0 = count_params(net), count_macs(net, torch.zeros(1, 1, 32, 32))
    prune_channels(net, ratio, round_to=8)
    after = conv_out_channels(net)
    for name, n in before.items():
        if name != "head":
            assert after[name] == expect[n] and after[name] % 8 == 0, name
    params1, macs1 = count_params(net), count_macs(net, torch.zeros(1, 1, 32, 32))
    if ratio == 0.5:  # conv cost scales with in * out channels: about a quarter
        assert 0.22 < params1 / params0 < 0.3 and 0.22 < macs1 / macs0 < 0.3
    else:
        assert params1 < params0 and macs1 < macs0


@pytest.mark.parametrize("original,ratio,round_to,kept", [
    (32, 0.5, 1, 16), (32, 0.25, 8, 24), (12, 0.5, 8, 8), (8, 0.9, 8, 8), (8, 0.5, 16, 8), (10, 0.33, 1, 7), (3, 0.9, 1, 1),
])
def test_keep_count(original, ratio, round_to, kept):
    assert keep_count(original, ratio, round_to) == kept


def test_taylor_abs_accumulation_sums_per_batch_magnitudes():
    # one weight, two batches whose gradients are +1 and -1: "sum" cancels, "abs" gives 2
    net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    x = torch.ones(1, 1, 1, 1)
    batches = [{"image": x, "label": torch.tensor(1.0)}, {"image": x, "label": torch.tensor(-1.0)}]
    loss = lambda out, b: (out.sum() * b["label"])  # noqa: E731  d/dw = label
    assert taylor_gradients(net, batches, loss, accumulate="sum") == 2
    assert net[0].weight.grad.item() == 0.0
    assert taylor_gradients(net, batches, loss, accumulate="abs") == 2
    assert net[0].weight.grad.item() == 2.0


@pytest.mark.parametrize("importance", ["l2", "bn_scale", "taylor"])
def test_importance_criteria(importance):
    from tinydata import make_sample

    net = trained_unet(steps=5, norm="instance" if importance == "bn_scale" else "batch")
    if importance == "taylor":
        batch = [make_sample(i, 2, 16, 3) for i in range(4)]
        batches = [{"image": torch.stack([b["image"] for b in batch]), "label": torch.stack([b["label"] for b in batch])}]
        assert taylor_gradients(net, batches, lambda out, b: nn.functional.cross_entropy(out, b["label"])) == 1
    prune_channels(net, 0.5, importance=importance)
    assert conv_out_channels(net)["encoders.1.0"] == 8
    assert all(p.grad is None for p in net.parameters())


def test_taylor_needs_gradients():
    with pytest.raises(UserError, match="needs gradients"):
        prune_channels(tiny_unet(), 0.5, importance="taylor")


def test_taylor_and_magnitude_choose_differently_on_a_trained_net():
    net_a, net_b = trained_unet(), trained_unet()
    plan_a = prune_channels(net_a, 0.5, importance="l1")
    plan_b = prune_channels(net_b, 0.5, importance="bn_scale")
    assert plan_a["layers"] != plan_b["layers"]


def test_global_pruning_meets_the_total_budget():
    net = trained_unet(ds=False)
    before = conv_out_channels(net)
    prune_channels(net, 0.5, global_pruning=True)
    after = conv_out_channels(net)
    prunable = [n for n in before if n != "head"]
    total0, total1 = sum(before[n] for n in prunable), sum(after[n] for n in prunable)
    assert abs(total1 - total0 / 2) <= len(prunable)  # per-layer rounding only
    assert len({after[n] / before[n] for n in prunable}) > 1  # not uniform: importance decided


def test_layer_ratios_and_protected_layers():
    net = tiny_unet(ds=False)
    prune_channels(net, 0.5, layer_ratios={"encoders.0": 0.25}, protected=["decoders.0.block"])
    after = conv_out_channels(net)
    assert after["encoders.0.0"] == 6 and after["encoders.0.3"] == 6
    assert after["decoders.0.block.0"] == 16 and after["decoders.0.block.3"] == 16
    assert after["encoders.1.0"] == 8 and after["head"] == 3


def test_cumulative_rounds_reach_the_same_widths_as_one_shot():
    net = tiny_unet(base=16, ds=False)
    for ratio in (1 / 6, 2 / 6, 0.5):
        prune_channels(net, ratio)
    from trainer.structure import record
    from trainer.prune.structured import StructuredPrune

    assert conv_out_channels(net)["encoders.2.0"] == 18  # no history: each call took the current width as original
    net2 = tiny_unet(base=16, ds=False)
    for ratio in (1 / 6, 2 / 6, 0.5):
        record(net2, StructuredPrune, prune_channels(net2, ratio))
    assert conv_out_channels(net2)["encoders.2.0"] == 32  # with history: ratios of the original widths


def test_taylor_with_the_module_loss_ignores_unlabelled_samples():
    # PruneRetrain scores with SegmentationModule.supervised_loss: placeholder labels of
    # unlabelled samples must not move the gradients
    from tinydata import make_sample
    from trainer.module import SegmentationModule

    net = trained_unet(steps=5)
    module = SegmentationModule(net, num_classes=3)
    items = [make_sample(i, 2, 16, 3) for i in range(4)]
    image, label = torch.stack([b["image"] for b in items]), torch.stack([b["label"] for b in items])
    mixed = {"image": image, "label": label.clone(), "labelled": torch.tensor([True, False, True, False])}
    mixed["label"][~mixed["labelled"]] = 0  # placeholders
    subset = {"image": image[[0, 2]], "label": label[[0, 2]]}
    taylor_gradients(net, [mixed], module.supervised_loss)
    got = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    taylor_gradients(net, [subset], module.supervised_loss)
    for a, b in zip(got, net.parameters()):
        assert (a is None) == (b.grad is None)
        assert a is None or torch.allclose(a, b.grad, atol=1e-6)
    assert any(g is not None and g.abs().sum() > 0 for g in got)


def test_a_round_pruned_under_sync_batchnorm_replays_on_batchnorm():
    """``trainer.sync_batchnorm`` swaps BatchNorm2d for SyncBatchNorm inside DDP, so a round
    pruned mid-run records SyncBatchNorm; resume and export rebuild the net with BatchNorm2d
    and must replay that plan (the replay compared class names and refused it)."""
    net = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_unet(dims=2, norm="batch"))
    net.eval()  # SyncBatchNorm needs a process group only to train
    plan = prune_channels(net, 0.5, importance="l1")
    assert any(entry["type"] == "SyncBatchNorm" for entry in plan["layers"].values())
    fresh = tiny_unet(dims=2, norm="batch")
    apply_plan(fresh, plan)
    assert conv_out_channels(fresh) == conv_out_channels(net)
    with pytest.raises(UserError, match="is Conv2d, the history expects BatchNorm2d"):
        bad = {**plan, "layers": {next(iter(plan["layers"])): {**next(iter(plan["layers"].values())), "type": "BatchNorm2d"}}}
        apply_plan(tiny_unet(dims=2, norm="batch"), bad)
