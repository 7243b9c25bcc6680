"""``onnx-int8-cpu`` from a quantized (QAT/PTQ) network: onnxruntime's fusable layout with the
network's own trained scales, verified against the fake-quantized PyTorch model."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from trainer.export import export_artifact
from trainer.export.card import CARD_NAME
from trainer.export.int8_safety import check_int8_accumulation
from trainer.quant.calibrate import quant_layers
from trainer.quant.ptq import post_training_quantize


@pytest.fixture(scope="module")
def ptq_net(net2d, data2d):
    net = copy.deepcopy(net2d)
    images = [b["image"] for b in data2d["val"]] + [data2d["train"][0][:8]]
    post_training_quantize(net, images, "percentile")
    return net.eval()


def _consts(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# The 8-channel toy net: 2.6% of logits land more than 2 output steps off here (default 1%),
# 6.7% when the net was trained and run on an emulated AVX2 CPU (other float kernels, another
# toy net); its Dice moves by hundredths of a point either way. Small nets accumulate relatively
# more rounding noise; these tests check structure, and bound the Dice instead.
TOY = {"max_exceed_fraction": 0.2}


def test_trained_scales_are_kept_and_the_artifact_is_safe_and_verified(tmp_path, ptq_net, data2d, meta2d):
    artifact = export_artifact(ptq_net, "onnx-int8-cpu", tmp_path / "out", data2d["val"], meta2d, threads=1,
                               tolerance=TOY, format_options={"benchmark_runs": 0})
    card = json.loads((artifact.parent / CARD_NAME).read_text())
    details = card["details"]
    assert details["source"].startswith("trained scales")
    assert details["trained_scales"]["layers_with_trained_scales"] == len(quant_layers(ptq_net)) == 13
    assert "re-rounded from the trained 8-bit grid" in details["weights"]
    # the reference was the fake-quantized model, with the trained-scale tolerance
    assert card["verification"]["passed"] and card["verification"]["tolerance"]["max_dice_drop"] == 0.003
    dice = card["metrics"]["dice"]
    assert abs(dice["artifact"]["mean_foreground"] - dice["pytorch"]["mean_foreground"]) < 0.01
    assert check_int8_accumulation(artifact).ok
    model = onnx.load(str(artifact))
    consts = _consts(model)
    q_scales = {float(consts[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}
    trained = {float(layer.input_quant.scale) for layer in quant_layers(ptq_net).values()}
    # every trained input scale appears as a QuantizeLinear scale (float32 rounding aside)
    assert all(any(abs(t - q) <= 1e-6 * t for q in q_scales) for t in trained)
    # weights: the trained integers re-rounded to 7 bits (BatchNorm's folded factor changes
    # the scale, not the integers, up to its sign)
    first = quant_layers(ptq_net)["encoders.0.0"]
    w_int = torch.round(first.weight_quant(first.weight) / first.weight_quant.scale.reshape(-1, 1, 1, 1)).detach().numpy()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    producer = {o: n for n in model.graph.node for o in n.output}
    stored = consts[producer[conv.input[1]].input[0]].astype(int)
    expected = np.round(w_int * 63 / 127)
    assert np.abs(np.abs(stored) - np.abs(expected)).max() <= 1  # sign may flip with a negative BN factor
    assert np.abs(stored).max() <= 63


def test_uint8_weights_keep_the_trained_grid_exactly(tmp_path, ptq_net, data2d, meta2d):
    artifact = export_artifact(ptq_net, "onnx-int8-cpu", tmp_path / "out", data2d["val"], meta2d, threads=1,
                               tolerance=TOY, format_options={"weight_type": "uint8", "benchmark_runs": 0})
    card = json.loads((artifact.parent / CARD_NAME).read_text())
    assert card["details"]["weights"].startswith("uint8, zero point 128 (8-bit as trained)")
    model = onnx.load(str(artifact))
    consts = _consts(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    first = quant_layers(ptq_net)["encoders.0.0"]
    w_int = torch.round(first.weight_quant(first.weight) / first.weight_quant.scale.reshape(-1, 1, 1, 1)).detach().numpy()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    stored = consts[producer[conv.input[1]].input[0]].astype(int) - 128
    assert np.array_equal(np.abs(stored), np.abs(w_int).astype(int))  # the trained integers, bit for bit
    assert card["metrics"]["argmax_agreement"] >= 0.995


def test_seven_bit_trained_weights_are_kept_exactly(tmp_path, net2d, data2d, meta2d):
    """A net quantized with weight_bits=7 needs no re-rounding: the CPU artifact holds its
    trained integers bit for bit (up to the sign a negative BatchNorm factor gives)."""
    net = copy.deepcopy(net2d)
    post_training_quantize(net, [b["image"] for b in data2d["val"]], "percentile", weight_bits=7)
    first = quant_layers(net)["encoders.0.0"]
    w_int = torch.round(first.weight_quant(first.weight) / first.weight_quant.scale.reshape(-1, 1, 1, 1)).detach().numpy()
    assert np.abs(w_int).max() == 63  # the grid QAT/PTQ used
    artifact = export_artifact(net, "onnx-int8-cpu", tmp_path / "out", data2d["val"], meta2d, threads=1,
                               tolerance=TOY, format_options={"benchmark_runs": 0})
    card = json.loads((artifact.parent / CARD_NAME).read_text())
    assert card["details"]["weights"].startswith("int8 holding 7-bit integers (as trained)")
    model = onnx.load(str(artifact))
    consts, producer = _consts(model), {o: n for n in model.graph.node for o in n.output}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    stored = consts[producer[conv.input[1]].input[0]].astype(int)
    assert np.array_equal(np.abs(stored), np.abs(w_int).astype(int))
    assert check_int8_accumulation(artifact).ok


@pytest.mark.parametrize("train_mode", [True, False], ids=["heads-calibrated-as-in-QAT", "heads-never-run-as-in-PTQ"])
def test_deep_supervision_heads_of_a_quantized_net_need_no_match(tmp_path, net2d, data2d, meta2d, train_mode):
    """Deep-supervision heads are quantized with the rest but run only in training: they are not
    in the exported graph. Calibrated in training mode (QAT) they have trained scales the graph
    has no place for; calibrated in eval mode (PTQ) they were never reached. Either way the
    trained-scale export keeps every layer the graph does have (the main job's QAT stage failed
    here: "quantized layers ['ds_heads.0', 'ds_heads.1'] were not found")."""
    from trainer.models import UNet
    from trainer.quant.calibrate import calibrate
    from trainer.quant.convert import quantize_net

    net = UNet(spatial_dims=2, in_channels=1, num_classes=3, depth=2, base_channels=8, deep_supervision=True, ds_levels=1)
    missing, _ = net.load_state_dict(net2d.state_dict(), strict=False)
    assert missing and all(k.startswith("ds_heads.") for k in missing)
    quantize_net(net, (), "error", learnable_scales=False, weight_bits=7)
    calibrate(net, [b["image"] for b in data2d["val"]], "percentile", train_mode=train_mode)
    heads = quant_layers(net)["ds_heads.0"]
    assert heads.input_quant.enabled is train_mode
    artifact = export_artifact(net.eval(), "onnx-int8-cpu", tmp_path / "out", data2d["val"], meta2d, threads=1,
                               tolerance=TOY, format_options={"benchmark_runs": 0})
    card = json.loads((artifact.parent / CARD_NAME).read_text())
    assert card["verification"]["passed"] and card["details"]["source"].startswith("trained scales")
