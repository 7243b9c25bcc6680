"""Fake-quant numerics against hand computations; STE and LSQ gradients."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.errors import UserError
from trainer.quant.fake_quant import (
    ACT_QMIN, QMAX, WEIGHT_QMIN, TensorQuantizer, fake_quant_per_channel, fake_quant_per_tensor, lsq_grad_factor,
)

S = 0.25  # a power of two: x / S is exact, so the expected codes below are exact too


def test_per_tensor_rounds_half_to_even_and_clamps_to_minus128_127():
    x = torch.tensor([0.125, 0.375, 0.625, -0.875, 31.75, 32.0, -32.0, -40.0, 1.1])
    codes = torch.tensor([0, 2, 2, -4, 127, 127, -128, -128, 4])  # 0.5->0, 1.5->2, 2.5->2, -3.5->-4
    out = fake_quant_per_tensor(x, torch.tensor(S))
    assert torch.equal(out, codes * S)
    assert (ACT_QMIN, QMAX) == (-128, 127)


def test_per_channel_weights_use_symmetric_minus127_127_along_axis():
    w = torch.tensor([[0.3, -32.0, 31.9], [0.3, -32.0, 100.0]])
    scale = torch.tensor([0.25, 0.5])
    out = fake_quant_per_channel(w, scale, axis=0)
    codes = torch.tensor([[1, -127, 127], [1, -64, 127]])  # -128 is never produced for weights
    assert torch.equal(out, codes * scale[:, None])
    assert WEIGHT_QMIN == -127
    # axis 1 (ConvTranspose layout [in, out, ...]): one scale per column
    out_t = fake_quant_per_channel(w.t().contiguous(), scale, axis=1)
    assert torch.equal(out_t, (codes * scale[:, None]).t())


def test_ste_gradient_is_one_inside_and_zero_outside_the_clip_range():
    x = torch.tensor([0.1, -31.9, 31.7, 40.0, -40.0, -32.0], requires_grad=True)
    fake_quant_per_tensor(x, torch.tensor(S)).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0]))  # -32/S = -128 is in range
    w = torch.tensor([[0.1, 40.0], [-40.0, 0.2]], requires_grad=True)
    fake_quant_per_channel(w, torch.tensor([S, S]), axis=0).sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_lsq_scale_gradient_matches_the_paper_formula():
    x = torch.tensor([0.3, -0.6, 1.3, 100.0, -100.0])
    s = torch.tensor(0.01, requires_grad=True)
    g = 0.37
    out = fake_quant_per_tensor(x, s, grad_factor=g)
    out.sum().backward()
    v = x / 0.01
    inside = (v >= ACT_QMIN) & (v <= QMAX)
    hand = torch.where(inside, torch.round(v) - v, torch.where(v > 0, torch.tensor(float(QMAX)), torch.tensor(float(ACT_QMIN))))
    assert s.grad.item() == pytest.approx(g * hand.sum().item(), rel=1e-4)
    assert torch.equal(out.detach(), fake_quant_per_tensor(x, torch.tensor(0.01)))  # same forward


def test_lsq_per_channel_scale_gradient_and_grad_factor():
    w = torch.tensor([[0.3, -0.6, 9.0], [0.02, 0.05, -0.07]])
    s = torch.tensor([0.05, 0.01], requires_grad=True)
    fake_quant_per_channel(w, s, axis=0, grad_factor=1.0).sum().backward()
    v = w / s.detach()[:, None]
    inside = (v >= WEIGHT_QMIN) & (v <= QMAX)
    hand = torch.where(inside, torch.round(v) - v, torch.sign(v) * QMAX)
    assert torch.allclose(s.grad, hand.sum(1), atol=1e-4)
    assert lsq_grad_factor(9) == pytest.approx(1 / math.sqrt(9 * 127))


@pytest.mark.parametrize("scale", [0.01, 0.0231, 0.00371, 1 / 3])
def test_cpu_tensor_op_path_is_bitwise_torch_fake_quantize(scale):
    # the fixed-scale CPU path (faster) must give exactly torch's fake-quantize numbers and STE
    x = (torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    s = torch.tensor(scale)
    out = fake_quant_per_tensor(x, s)
    ref = torch.fake_quantize_per_tensor_affine(ref_x, s, torch.tensor(0, dtype=torch.int32), ACT_QMIN, QMAX)
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(out, ref) and torch.equal(x.grad, ref_x.grad)
    w = torch.randn(16, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    ws = w.abs().amax((0, 2, 3)) / 127 * scale * 50  # axis 1, some weights clip
    ref_w = torch.fake_quantize_per_channel_affine(w, ws, torch.zeros(3, dtype=torch.int32), 1, WEIGHT_QMIN, QMAX)
    assert torch.equal(fake_quant_per_channel(w, ws, axis=1), ref_w)


def test_quantizer_passes_through_until_calibrated_and_learns_its_scale():
    q = TensorQuantizer("input", learnable=True)
    x = torch.tensor([0.3, -0.6, 1.3])
    assert torch.equal(q(x), x)  # uncalibrated: pass-through
    q.set_amax(torch.tensor(1.27))
    assert q.enabled and q.scale.item() == pytest.approx(0.01)
    q(x).sum().backward()
    v = x / 0.01  # 30, -60 inside the range; 130 clips at 127
    hand = torch.where(v > QMAX, torch.tensor(float(QMAX)), torch.round(v) - v).sum()
    assert q.scale.grad.item() == pytest.approx(lsq_grad_factor(x.numel()) * hand.item(), rel=1e-3)
    q.frozen = True  # frozen: no scale gradient
    q.scale.grad = None
    q(x.clone().requires_grad_()).sum().backward()
    assert q.scale.grad is None


def test_state_dict_round_trip_enables_a_fresh_quantizer():
    a = TensorQuantizer("weight", channels=3, axis=1)
    a.set_amax(torch.tensor([1.0, 2.0, 0.0]))  # an all-zero channel still gets a positive scale
    assert bool((a.scale > 0).all())
    b = TensorQuantizer("weight", channels=3, axis=1)
    assert not b.enabled
    b.load_state_dict(a.state_dict())
    assert b.enabled and torch.equal(a.scale, b.scale)
    assert list(a.state_dict()) == ["scale"]  # zero-points are implicit (always 0)


def test_uncalibrated_quantizer_refuses_onnx_export(tmp_path):
    q = TensorQuantizer("input")
    q.label = "encoders.0.0.input_quant"
    with pytest.raises((UserError, RuntimeError), match="encoders.0.0.input_quant"):
        torch.onnx.export(q, (torch.zeros(1, 2),), str(tmp_path / "q.onnx"), dynamo=False)
