"""FP16 and INT8 ONNX artifacts: built, verified in onnxruntime, described in the card."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from trainer.export import OrtPredictor, Tolerance, export_artifact, ort_session
from trainer.export.card import CARD_NAME


def _card(artifact):
    return json.loads((artifact.parent / CARD_NAME).read_text())


def test_fp16_artifact_is_half_precision_and_verified(tmp_path, net2d, data2d, meta2d):
    artifact = export_artifact(net2d, "onnx-fp16", tmp_path / "out", data2d["val"], meta2d, threads=1)
    model = onnx.load(str(artifact))
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    dtypes = {t.data_type for t in model.graph.initializer if t.name in conv_weights}
    assert dtypes == {onnx.TensorProto.FLOAT16}
    # I/O stays float32 so callers need not change
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    card = _card(artifact)
    assert card["verification"]["passed"]
    assert card["verification"]["tolerance"]["atol"] == 1e-2
    assert card["metrics"]["max_abs_diff"] > 0  # really computed in half precision
    assert card["metrics"]["argmax_agreement"] >= 0.999
    assert card["details"]["casts"] >= 2


def test_fp16_keeps_instance_norm_in_float32(tmp_path, data2d, meta2d):
    from export_helpers import unet

    net = unet(2, base=4, norm="instance").eval()
    artifact = export_artifact(net, "onnx-fp16", tmp_path / "out", data2d["val"], meta2d, threads=1)
    assert _card(artifact)["details"]["fp32_ops_present"] == ["InstanceNormalization"]
    model = onnx.load(str(artifact))
    norm_scales = {n.input[1] for n in model.graph.node if n.op_type == "InstanceNormalization"}
    assert {t.data_type for t in model.graph.initializer if t.name in norm_scales} == {onnx.TensorProto.FLOAT}


def test_int8_cpu_artifact_is_quantized_and_verified(tmp_path, net2d, data2d, meta2d):
    # This 8-channel toy net keeps the argmax (>= 99.9%) but ~2% of its logits land more than
    # 2 output steps off (0.2% with 8-bit weights), above the default 0.1%: small nets
    # accumulate relatively more rounding noise, and 7-bit weights (the default, correct on
    # every CPU) add some. The documented knob is the tolerance, relaxed here in the open.
    tol = {"max_exceed_fraction": 0.05}
    artifact = export_artifact(net2d, "onnx-int8-cpu", tmp_path / "out", data2d["val"], meta2d, threads=1, tolerance=tol)
    card = _card(artifact)
    quantized = card["details"]["quantized_ops"]
    assert quantized["QuantizeLinear"] > 0 and quantized["DequantizeLinear"] > 0
    int8_weights = [t for t in onnx.load(str(artifact)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 11  # every Conv weight
    # 7-bit weights: no pair of products can overflow a 16-bit sum on any CPU
    assert max(abs(onnx.numpy_helper.to_array(t).astype(int)).max() for t in int8_weights) <= 64
    accumulation = card["verification"]["static_checks"]["int8_accumulation"]
    assert accumulation["safe_on_every_cpu"] and accumulation["worst_pair_bound"] <= 32767
    assert card["verification"]["machine"]["onnxruntime"] and card["verification"]["machine"]["arch"]
    assert card["details"]["output_step"] > 0
    assert card["verification"]["tolerance"] == {
        "atol": 2.0, "unit": "quant_step", "max_exceed_fraction": 0.05,
        "min_argmax_agreement": 0.999, "max_dice_drop": None,
    }
    assert card["verification"]["passed"] and card["metrics"]["argmax_agreement"] >= 0.999
    assert card["details"]["calibration"]["arrays"] == 2  # both validation batches
    assert set(card["details"]["latency"]) >= {"fp32_onnx_ms", "int8_ms", "speedup"}
    dice = card["metrics"]["dice"]
    assert abs(dice["artifact"]["mean_foreground"] - dice["pytorch"]["mean_foreground"]) < 0.02
    # onnxruntime fuses the QDQ pairs into integer kernels (QLinearConv) when it loads the file
    sess = ort_session(artifact)
    x = data2d["val"][0]["image"]
    with torch.no_grad():
        assert (OrtPredictor(sess)(x).argmax(1) == net2d(x).argmax(1)).float().mean() > 0.99


def test_int8_cpu_qoperator_and_3d_calibration_windows(tmp_path, net3d, data3d, meta3d):
    artifact = export_artifact(
        net3d, "onnx-int8-cpu", tmp_path / "out", data3d["val"], meta3d, threads=1,
        format_options={"quant_format": "qoperator", "windows_per_volume": 3, "benchmark_runs": 0},
        tolerance=Tolerance(atol=2.0, unit="quant_step", max_exceed_fraction=0.05, min_argmax_agreement=0.98),
    )
    card = _card(artifact)
    assert card["details"]["quantized_ops"]["QLinearConv"] > 0
    assert card["details"]["calibration"]["shapes"] == [[1, 1, 16, 16, 16]]
    assert card["details"]["calibration"]["arrays"] == 2 * 3
    assert "latency" not in card["details"]


@pytest.mark.parametrize(
    "options, match",
    [
        ({"calibration_method": "magic"}, "calibration_method='magic' must be one of minmax, entropy, percentile"),
        ({"calibration_batches": 0}, "calibration_batches=0 must be >= 1"),
        ({"bogus": 1}, "unexpected keyword argument 'bogus'"),
    ],
)
def test_int8_cpu_rejects_bad_options(tmp_path, net2d, data2d, meta2d, options, match):
    from trainer.errors import UserError

    with pytest.raises(UserError, match=match):
        export_artifact(net2d, "onnx-int8-cpu", tmp_path / "out", data2d["val"], meta2d, format_options=options)
    assert not (tmp_path / "out").exists()


class FakeQuantInput(torch.nn.Module):
    """A network that already carries quantization (as a QAT checkpoint does)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.fake_quantize_per_tensor_affine(x, 0.05, 0, -128, 127))


def test_int8_cpu_refuses_an_already_quantized_network(tmp_path, net2d, data2d, meta2d):
    from trainer.errors import UserError

    with pytest.raises(UserError, match="FakeQuantInput exports Q/DQ nodes of its own: use --format onnx-qdq"):
        export_artifact(FakeQuantInput(net2d), "onnx-int8-cpu", tmp_path / "out", data2d["val"], meta2d, threads=1)
    assert not (tmp_path / "out").exists()
