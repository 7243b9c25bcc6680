"""The layer swap, planning (skip/unsupported), and rebuilding from the structural record."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from quant_helpers import tiny_unet
from trainer.errors import UserError
from trainer.quant.calibrate import calibrate
from trainer.quant.convert import FakeQuantConversion, converter_path, quantization_entry, quantize_net
from trainer.quant.modules import QuantConv2d, QuantConvTranspose2d, QuantLinear, QuantLayer, dequantize_layer
from trainer.structure import history, record, replay


def test_swap_keeps_objects_names_parameters_and_hooks():
    net = tiny_unet(2)
    keys = set(net.state_dict())
    conv = net.encoders[0][0]
    weight = conv.weight
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    state = quantize_net(net)
    assert net.encoders[0][0] is conv and type(conv) is QuantConv2d and conv.weight is weight
    assert type(net.decoders[0].up) is QuantConvTranspose2d and net.decoders[0].up.weight_quant.axis == 1
    assert isinstance(conv, nn.Conv2d)  # Torch-Pruning and isinstance checks still see a Conv2d
    new = set(net.state_dict()) - keys
    assert keys <= set(net.state_dict())
    assert new == {f"{n}.{q}_quant.scale" for n in state["layers"] for q in ("input", "weight")}
    net(torch.zeros(1, 1, 16, 16))
    assert seen  # the hook registered before the swap still fires
    assert state["layers"][0] == "encoders.0.0" and "head" in state["layers"] and state["float_layers"] == []
    dequantize_layer(conv)
    assert type(conv) is nn.Conv2d and not hasattr(conv, "input_quant")


def test_skip_modules_stay_float_and_must_exist():
    net = tiny_unet(2)
    state = quantize_net(net, skip_modules=["head", "decoders.1"])
    assert type(net.head) is nn.Conv2d and type(net.decoders[1].up) is nn.ConvTranspose2d
    assert "head" in state["float_layers"] and "decoders.1.up" in state["float_layers"]
    with pytest.raises(UserError, match=r"skip_modules: 'decoder' is not a module of UNet"):
        quantize_net(tiny_unet(2), skip_modules=["decoder"])


class _WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)

    def forward(self, x):
        return self.proj(x)


def test_unsupported_layers_are_named_or_left_float_with_a_warning():
    with pytest.raises(UserError, match=r"cannot quantize attn \(MultiheadAttention: no quantized counterpart\), "
                                        r"up \(ConvTranspose2d: grouped ConvTranspose"):
        quantize_net(_WithAttention())
    net = _WithAttention()
    with pytest.warns(UserWarning, match=r"attn \(MultiheadAttention.*left in float"):
        state = quantize_net(net, on_unsupported="warn")
    assert type(net.proj) is QuantLinear and state["layers"] == ["proj"]
    assert state["float_layers"] == ["attn", "up"]
    with pytest.raises(UserError, match="on_unsupported='ignore' must be one of error, warn"):
        quantize_net(_WithAttention(), on_unsupported="ignore")


def test_quantizing_twice_is_refused():
    net = tiny_unet(2)
    quantize_net(net)
    with pytest.raises(UserError, match="already quantized"):
        quantize_net(net)


def test_structural_record_rebuilds_a_fresh_net_with_identical_outputs():
    net = tiny_unet(2)
    state = quantize_net(net, skip_modules=["head"], learnable_scales=True)
    calibrate(net, [torch.randn(2, 1, 16, 16)], "percentile")
    record(net, FakeQuantConversion, state)
    assert quantization_entry(net) == state and history(net)[0]["converter"] == converter_path()
    weights = {k: v.clone() for k, v in net.state_dict().items()}

    fresh = tiny_unet(2, seed=1)
    replay(fresh, history(net))
    fresh.load_state_dict(weights)  # strict: every scale key has a home
    assert isinstance(fresh.encoders[0][0].input_quant.scale, nn.Parameter)  # learnable recorded
    assert not isinstance(fresh.head, QuantLayer)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(net.eval()(x), fresh.eval()(x))
    # replaying onto a net the QAT callback already converted is a no-op on the layers
    replay(fresh, history(net))


def test_rebuild_names_a_missing_layer():
    state = quantize_net(tiny_unet(2))
    state = {**state, "layers": [*state["layers"], "encoders.9.0"]}
    with pytest.raises(UserError, match="quantized layer 'encoders.9.0' is not a module of the rebuilt UNet"):
        FakeQuantConversion.rebuild(tiny_unet(2), state)


def test_quantizes_whatever_structure_the_net_has_after_channel_pruning():
    tp = pytest.importorskip("torch_pruning")
    net = tiny_unet(2, base=8)
    example = torch.randn(1, 1, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MagnitudePruner(net, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=0.5, ignored_layers=[net.head])
        pruner.step()
    assert net.encoders[0][0].out_channels == 4
    quantize_net(net)
    calibrate(net, [example], "max")
    assert net.encoders[0][0].weight_quant.scale.shape == (4,)
    assert net.decoders[0].up.weight_quant.scale.shape == (net.decoders[0].up.out_channels,)
    assert net.eval()(example).shape == (1, 3, 16, 16)
