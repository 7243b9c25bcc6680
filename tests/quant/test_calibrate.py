"""Calibrators on known distributions; network calibration side effects."""
from __future__ import annotations

import pytest
import torch

from quant_helpers import tiny_unet
from trainer.quant.calibrate import HistogramObserver, MaxObserver, calibrate, make_observer
from trainer.quant.convert import quantize_net
from trainer.quant.fake_quant import QMAX, fake_quant_per_tensor
from trainer.errors import UserError


def _feed(obs, x: torch.Tensor, chunks: int = 4):
    for part in x.chunk(chunks):
        obs.observe(part)
    return float(obs.compute())


def test_max_is_the_largest_magnitude():
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x[123] = -3.5
    assert _feed(MaxObserver(), x) == 3.5


def test_percentile_of_a_gaussian():
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    # |N(0,1)| has its 99.9th percentile at 3.2905 (two-sided 99.9 %)
    assert _feed(HistogramObserver("percentile", percentile=99.9), x) == pytest.approx(3.2905, abs=0.02)
    assert _feed(HistogramObserver("percentile", percentile=100.0), x) == pytest.approx(float(x.abs().max()), rel=1e-3)


def test_histogram_grows_without_losing_counts():
    obs = HistogramObserver("percentile", percentile=50.0, bins=100)
    obs.observe(torch.linspace(0, 1, 1001))  # first range: [0, 1]
    obs.observe(torch.linspace(0, 10, 1001))  # forces the bins to merge (k = 10)
    assert obs.hist.sum().item() == 2002
    assert obs.width * obs.bins >= 10.0
    # half the values lie below ~1.0 (all of the first batch plus a tenth of the second)
    assert obs.compute().item() == pytest.approx(1.1, abs=0.2)


def test_mse_on_a_laplace_distribution_matches_the_known_optimum():
    # Laplace(0, b=1): the MSE-optimal 8-bit clipping value is ~9.89 b (Banner et al., ACIQ,
    # "Post-training 4-bit quantization of convolution networks", 2019); max |x| is ~13.
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    amax = _feed(HistogramObserver("mse"), x)

    def mse(a: float) -> float:
        return float(((fake_quant_per_tensor(x, torch.tensor(a / QMAX)) - x) ** 2).mean())

    best = min(mse(a) for a in torch.linspace(7.0, 13.0, 25).tolist())
    assert 9.0 < amax < 11.0
    assert mse(amax) <= 1.02 * best
    assert mse(amax) < 0.9 * mse(float(x.abs().max()))  # max of 200k samples is ~11.5


def test_unknown_method_is_named():
    with pytest.raises(UserError, match="calibration='entropy' must be one of max, percentile, mse"):
        make_observer("entropy")


def test_calibrate_sets_weight_and_input_scales_and_leaves_no_trace():
    net = tiny_unet(2, deep_supervision=True, ds_levels=1)
    quantize_net(net)
    images = [torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    bn = net.encoders[0][1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    rng = torch.get_rng_state()
    report = calibrate(net, images, "max", train_mode=False)
    # eval mode: the deep-supervision head is not reached and stays pass-through
    assert report.unobserved == ["ds_heads.0"] and not net.ds_heads[0].input_quant.enabled
    report = calibrate(net, images, "max", train_mode=True)
    assert report.unobserved == [] and report.batches == 3
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))
    first = net.encoders[0][0]
    assert first.input_quant.scale.item() == pytest.approx(max(float(i.abs().max()) for i in images) / QMAX)
    assert torch.allclose(first.weight_quant.scale, first.weight.abs().amax((1, 2, 3)) / QMAX)
    up = net.decoders[0].up  # ConvTranspose: weight [in, out, k, k], channels on axis 1
    assert up.weight_quant.scale.shape == (up.out_channels,)
    assert torch.allclose(up.weight_quant.scale, up.weight.abs().amax((0, 2, 3)) / QMAX)
    assert net.training  # the caller's mode is restored
