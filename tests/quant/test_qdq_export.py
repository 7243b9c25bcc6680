"""QDQ export: TensorRT layout (checker), onnxruntime parity in 2D/3D, the onnx-qdq format."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from quant_helpers import blobs, fit_quickly, tiny_unet
from trainer.errors import UserError
from trainer.quant.calibrate import calibrate
from trainer.quant.convert import quantize_net
from trainer.quant.export_qdq import export_qdq, ort_parity
from trainer.quant.ptq import post_training_quantize
from trainer.quant.qdq_check import check_qdq


@pytest.fixture(scope="module")
def ptq_models():
    """A briefly trained, PTQ-calibrated tiny U-Net per spatial dimensionality."""
    out = {}
    for dims, size in ((2, 32), (3, 16)):
        image, label = blobs(10, dims, size)
        net = fit_quickly(tiny_unet(dims), image, label, steps=25 if dims == 2 else 12)
        post_training_quantize(net, [image[:4], image[4:8]], "percentile")
        out[dims] = (net, image, label)
    return out


def _dq_feeding(model: onnx.ModelProto, node: onnx.NodeProto, index: int) -> onnx.NodeProto:
    producer = {o: n for n in model.graph.node for o in n.output}
    return producer[node.input[index]]


@pytest.mark.parametrize("dims", [2, 3])
def test_export_passes_the_checker_and_matches_onnxruntime(ptq_models, dims, tmp_path):
    net, image, _ = ptq_models[dims]
    path = tmp_path / "qdq.onnx"
    export_qdq(net, path, image[:1])
    report = check_qdq(path)
    assert report.ok, report.summary()
    assert len(report.quantized) == 13 and report.float_layers == []  # 11 Conv + 2 ConvTranspose
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "ConvTranspose" in ops and "BatchNormalization" in ops  # BN left for TensorRT to fuse
    convt = next(n for n in model.graph.node if n.op_type == "ConvTranspose")
    dq = _dq_feeding(model, convt, 1)
    assert [a.i for a in dq.attribute if a.name == "axis"] == [1]
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert [a.i for a in _dq_feeding(model, conv, 1).attribute if a.name == "axis"] == [0]
    # other batch and spatial sizes than the traced one (dynamic axes)
    other = torch.cat([image[8:10], image[8:10].flip(-1)])
    other = nn.functional.pad(other, [0, 8] * dims)
    parity = ort_parity(net, path, other)
    assert parity["argmax_agreement"] >= 0.999
    # a value on a rounding tie may land one int8 step away (ORT divides, torch multiplies by
    # the reciprocal): the onnx-qdq format's tolerance, 2 steps of range/255 for 99.9 %
    assert parity["p999_abs_diff"] <= 2 * parity["logit_range"] / 255


def _mutate(path, out, fn):
    model = onnx.load(str(path))
    fn(model)
    onnx.save(model, str(out))
    return check_qdq(out)


def test_checker_names_a_wrong_axis_a_missing_axis_and_a_nonzero_zero_point(ptq_models, tmp_path):
    net, image, _ = ptq_models[2]
    path = tmp_path / "qdq.onnx"
    export_qdq(net, path, image[:1])

    def convt_axis_zero(model):
        convt = next(n for n in model.graph.node if n.op_type == "ConvTranspose")
        for node in (_dq_feeding(model, convt, 1),):
            for a in node.attribute:
                if a.name == "axis":
                    a.i = 0
    report = _mutate(path, tmp_path / "a.onnx", convt_axis_zero)
    assert any("ConvTranspose" in p and "axis is 0, expected 1" in p for p in report.problems), report.problems

    def drop_conv_axis(model):
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        dq = _dq_feeding(model, conv, 1)
        keep = [a for a in dq.attribute if a.name != "axis"]
        del dq.attribute[:]
        dq.attribute.extend(keep)
    report = _mutate(path, tmp_path / "b.onnx", drop_conv_axis)
    assert any("axis is 1, expected 0" in p for p in report.problems), report.problems  # ONNX default axis=1

    def nonzero_zero_point(model):
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        dq = _dq_feeding(model, conv, 0)
        inits = {t.name: t for t in model.graph.initializer}
        zp = inits[dq.input[2]] if dq.input[2] in inits else None
        if zp is None:  # a Constant node
            const = next(n for n in model.graph.node if dq.input[2] in n.output)
            const.attribute[0].t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(const.attribute[0].t) + 3))
        else:
            zp.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(zp) + 3, zp.name))
    report = _mutate(path, tmp_path / "c.onnx", nonzero_zero_point)
    assert any("zero-point is [3]" in p for p in report.problems), report.problems
    assert not report.ok


def test_checker_reports_float_layers(tmp_path):
    net = tiny_unet(2)
    quantize_net(net, skip_modules=["head"])
    calibrate(net, [torch.randn(2, 1, 16, 16)], "max")
    path = tmp_path / "qdq.onnx"
    export_qdq(net.eval(), path, torch.randn(1, 1, 16, 16))
    report = check_qdq(path)
    assert report.ok and len(report.quantized) == 12
    assert report.float_layers == ["Conv /head/Conv"]
    assert "1 float (Conv /head/Conv)" in report.summary()


def test_conv1d_and_linear_export_as_quantized_conv_and_gemm(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 5))
    quantize_net(net)
    x = torch.randn(6, 2, 8)
    calibrate(net, [x], "max")
    path = tmp_path / "lin.onnx"
    export_qdq(net.eval(), path, x[:1])
    report = check_qdq(path)
    assert report.ok, report.summary()
    assert sorted(q.split()[0] for q in report.quantized) == ["Conv", "Gemm"]
    assert ort_parity(net, path, x)["max_abs_diff"] < 1e-4


def test_export_refuses_a_float_net(tmp_path):
    with pytest.raises(UserError, match="has no quantized layers"):
        export_qdq(tiny_unet(2), tmp_path / "x.onnx", torch.zeros(1, 1, 16, 16))


def test_onnx_qdq_format_is_registered_verified_and_carded(ptq_models, tmp_path):
    from trainer.export import ExportMeta, export_artifact, known_formats

    assert "onnx-qdq" in known_formats()
    net, image, label = ptq_models[2]
    batches = [{"image": image[8:], "label": label[8:]}]
    meta = ExportMeta(spatial_dims=2, num_classes=3, divisor=4)
    path = export_artifact(net, "onnx-qdq", tmp_path / "out", batches, meta)
    card = json.loads((path.parent / "model_card.json").read_text())
    assert card["format"] == "onnx-qdq"
    assert card["details"]["quantized_layers"] == 13 and card["details"]["float_layers"] == []
    assert check_qdq(path).ok
    with pytest.raises(UserError, match="onnx-qdq needs a quantized network"):
        export_artifact(tiny_unet(2).eval(), "onnx-qdq", tmp_path / "float", batches, meta)
