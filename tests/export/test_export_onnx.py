"""FP32 ONNX: parity with PyTorch at several shapes, simplification, the model card."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import onnx
import torch
from onnx import TensorProto, helper

from export_helpers import unet
from trainer.export import (
    ExportMeta,
    OrtPredictor,
    export_artifact,
    node_counts,
    ort_session,
    simplify_onnx,
)
from trainer.export.bundle import BUNDLE_NAME
from trainer.export.card import CARD_NAME
from trainer.errors import UserError


def _card(artifact):
    return json.loads((artifact.parent / CARD_NAME).read_text())


def _assert_parity(net, artifact, shapes, rtol=1e-4):
    """Direct runs (no padding, no sliding window) at shapes other than the traced one."""
    run = OrtPredictor(ort_session(artifact))
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            ref = net(x)
        out = run(x)
        assert out.shape == ref.shape, shape
        scale = max(1.0, float(ref.abs().max()))
        assert float((out - ref).abs().max()) <= rtol * scale, shape
        assert torch.equal(out.argmax(1), ref.argmax(1)), shape


def test_onnx_2d_parity_at_two_sizes_and_batch_sizes(tmp_path, net2d, data2d, meta2d):
    artifact = export_artifact(net2d, "onnx", tmp_path / "out", data2d["val"], meta2d, threads=1)
    assert artifact == tmp_path / "out" / "model.onnx"
    _assert_parity(net2d, artifact, [(1, 1, 32, 32), (3, 1, 48, 64), (2, 1, 16, 40)])
    model = onnx.load(str(artifact))
    assert model.opset_import[0].version == 17
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "height", "width"]
    card = _card(artifact)
    assert card["verification"]["passed"]
    assert card["metrics"]["argmax_agreement"] == 1.0
    assert card["metrics"]["dice"]["artifact"] == card["metrics"]["dice"]["pytorch"]
    assert card["metrics"]["dice"]["pytorch"]["mean_foreground"] > 0.8  # the net really learned


def test_onnx_3d_parity_with_conv_transpose_and_sliding_window(tmp_path, net3d, data3d, meta3d):
    artifact = export_artifact(net3d, "onnx", tmp_path / "out", data3d["val"], meta3d, threads=1)
    by_op = _card(artifact)["graph"]["nodes_after"]["by_op"]
    assert by_op["ConvTranspose"] == 2 and by_op["Conv"] > 0
    _assert_parity(net3d, artifact, [(1, 1, 16, 16, 16), (2, 1, 24, 16, 32)])
    card = _card(artifact)
    # 24^3 volumes with a 16^3 roi went through sliding windows on both sides
    assert [2, 1, 16, 16, 16] in card["input"]["verified_shapes"]
    assert card["input"]["roi_size"] == [16, 16, 16]
    assert card["input"]["shape"] == ["batch", 1, "depth", "height", "width"]
    assert card["metrics"]["max_abs_diff"] < 1e-3


def test_onnx_instance_norm_model(tmp_path, data2d, meta2d):
    net = unet(2, base=4, norm="instance").eval()
    artifact = export_artifact(net, "onnx", tmp_path / "out", data2d["val"], meta2d, threads=1)
    assert "InstanceNormalization" in _card(artifact)["graph"]["nodes_after"]["by_op"]
    _assert_parity(net, artifact, [(2, 1, 32, 48)])


def test_simplify_folds_constants_and_drops_dead_nodes(tmp_path):
    """A hand-made graph with an Identity, a dead branch and a constant subexpression."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [2.0])
    b = helper.make_tensor("b", TensorProto.FLOAT, [1], [3.0])
    nodes = [
        helper.make_node("Add", ["w", "b"], ["wb"]),  # constant: folds to 5
        helper.make_node("Identity", ["x"], ["x_id"]),
        helper.make_node("Mul", ["x_id", "wb"], ["y"]),
        helper.make_node("Neg", ["x"], ["unused"]),  # dead
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "g", [io[0]], [io[1]], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    before, after = simplify_onnx(src, dst)
    assert before == {"total": 4, "by_op": {"Add": 1, "Identity": 1, "Mul": 1, "Neg": 1}}
    assert after == node_counts(dst) == {"total": 1, "by_op": {"Mul": 1}}
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(ort_session(dst).run(None, {"x": x})[0], x * 5.0)


def test_simplification_is_recorded_and_never_grows_the_graph(tmp_path, net3d, data3d, meta3d):
    artifact = export_artifact(net3d, "onnx", tmp_path / "out", data3d["val"], meta3d, threads=1)
    graph = _card(artifact)["graph"]
    before, after = graph["nodes_before"], graph["nodes_after"]
    assert after["total"] <= before["total"]
    assert sum(before["by_op"].values()) == before["total"]
    assert after == node_counts(artifact)
    assert "BatchNormalization" not in after["by_op"]  # folded into the convs
    assert graph["simplifier"].startswith("onnxslim")


def test_model_card_fields_and_hashes(tmp_path, net2d, data2d):
    ckpt = tmp_path / "fake.ckpt"
    ckpt.write_bytes(b"not really a checkpoint, but hashed like one")
    meta = ExportMeta(spatial_dims=2, num_classes=3, class_names=["bg", "box", "ball"], divisor=4, checkpoint=ckpt)
    artifact = export_artifact(net2d, "onnx", tmp_path / "out", data2d["val"], meta, threads=1)
    card = _card(artifact)
    assert sorted(p.name for p in artifact.parent.iterdir()) == sorted([CARD_NAME, "model.onnx", BUNDLE_NAME])
    assert card["card_version"] == 1 and card["format"] == "onnx" and card["opset"] == 17
    assert card["artifact"] == {
        "file": "model.onnx",
        "bytes": artifact.stat().st_size,
        "sha256": hashlib.sha256(artifact.read_bytes()).hexdigest(),
    }
    assert card["source"]["checkpoint"] == str(ckpt)
    assert card["source"]["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert card["source"]["model_class"] == "trainer.models.unet.UNet"
    assert card["source"]["parameters"] == sum(p.numel() for p in net2d.parameters())
    assert card["input"]["name"] == "image" and card["input"]["dtype"] == "float32"
    assert card["input"]["dynamic_axes"] == {"0": "batch", "2": "height", "3": "width"}
    assert card["input"]["channels"] == 1 and card["input"]["divisor"] == 4 and card["input"]["spatial_dims"] == 2
    assert card["output"]["shape"] == ["batch", 3, "height", "width"] and card["output"]["name"] == "logits"
    assert card["class_names"] == ["bg", "box", "ball"]
    assert set(card["metrics"]["dice"]["pytorch"]["per_class"]) == {"bg", "box", "ball"}
    for lib in ("torch", "onnx", "onnxruntime", "onnxslim", "python"):
        assert card["versions"][lib]
    assert card["created"].endswith("+00:00")
    assert card["verification"]["shape_probe"]["shape"] == [2, 1, 36, 36]


def test_sizes_not_divisible_by_the_divisor_are_padded_for_both(tmp_path, net2d, data2d, meta2d):
    """30x30 slices: predict_logits pads them to 32 for PyTorch and the artifact alike."""
    val = [{"image": b["image"][..., 1:31, :30], "label": b["label"][..., 1:31, :30]} for b in data2d["val"]]
    artifact = export_artifact(net2d, "onnx", tmp_path / "out", val, meta2d, threads=1)
    card = _card(artifact)
    assert card["input"]["verified_shapes"] == [[2, 1, 36, 36], [4, 1, 32, 32]]  # probe, padded data
    assert card["verification"]["voxels"] == 8 * 30 * 30
    assert card["metrics"]["argmax_agreement"] == 1.0


@pytest.mark.parametrize("fmt", ["onnx", "onnx-fp16"])
@pytest.mark.parametrize("dims", [2, 3])
def test_dynamo_exporter_path_for_float_formats(tmp_path, fmt, dims, net2d, data2d, meta2d, net3d, data3d, meta3d):
    """The exporter torch keeps (torch.export + onnxscript), beside the deprecated TorchScript
    one: same formats, same verification (2D whole slices, 3D sliding windows and the shape
    probe at other batch and spatial sizes), same I/O names and dynamic axes."""
    net, data, meta = (net2d, data2d, meta2d) if dims == 2 else (net3d, data3d, meta3d)
    artifact = export_artifact(net, fmt, tmp_path / "out", data["val"], meta, opset=18, threads=1,
                               format_options={"exporter": "dynamo"})
    card = json.loads((artifact.parent / CARD_NAME).read_text())
    assert card["graph"]["exporter"] == "torch.onnx (dynamo)" and card["verification"]["passed"]
    assert card["verification"]["shape_probe"]["ok"]
    model = onnx.load(str(artifact))
    dims_in = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims_in == ["batch", 1, *(["height", "width"] if dims == 2 else ["depth", "height", "width"])]
    assert model.graph.output[0].name == "logits"


def test_dynamo_exporter_needs_opset_18(tmp_path, net2d, data2d, meta2d):
    with pytest.raises(UserError, match="the dynamo exporter writes opset >= 18; got --opset 17"):
        export_artifact(net2d, "onnx", tmp_path / "o", data2d["val"], meta2d, format_options={"exporter": "dynamo"})
    with pytest.raises(UserError, match="exporter='jit' must be one of torchscript, dynamo"):
        export_artifact(net2d, "onnx", tmp_path / "o", data2d["val"], meta2d, format_options={"exporter": "jit"})
    assert not (tmp_path / "o").exists()
