"""TensorRT: the absent path errors cleanly here; the engine tests run where TensorRT and a
CUDA device exist (they skip with the reason otherwise)."""
from __future__ import annotations

import json

import pytest
import torch

from trainer.errors import UserError
from trainer.export import export_artifact, get_format
from trainer.export.card import CARD_NAME
from trainer.export.formats.tensorrt_engine import LAYER_REPORT, profile_shapes, summarize_layers

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except Exception:  # ImportError, or the PyPI placeholder failing to find its libraries
    HAVE_TRT = False
HAVE_CUDA = torch.cuda.is_available()
needs_trt = pytest.mark.skipif(
    not (HAVE_TRT and HAVE_CUDA), reason="tensorrt not importable" if not HAVE_TRT else "no CUDA device"
)


@pytest.mark.skipif(HAVE_TRT and HAVE_CUDA, reason="tensorrt and CUDA are present: nothing is missing")
def test_tensorrt_missing_runtime_errors_before_writing(tmp_path, net2d, data2d, meta2d):
    out = tmp_path / "engine"
    with pytest.raises(UserError) as err:
        export_artifact(net2d, "tensorrt", out, data2d["val"], meta2d)
    message = str(err.value)
    if not HAVE_TRT:
        assert "needs the `tensorrt` Python package" in message and "`import tensorrt` failed" in message
    else:
        assert "needs a CUDA device" in message
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder


def test_tensorrt_options_are_validated():
    with pytest.raises(UserError, match=r"tensorrt: precision='int4' must be one of fp16, int8"):
        get_format("tensorrt", precision="int4")
    with pytest.raises(UserError, match=r"tensorrt: max_batch=0 must be >= 1"):
        get_format("tensorrt", max_batch=0)


def test_profile_covers_every_verified_shape():
    shapes = [(2, 1, 16, 16, 16), (2, 1, 16, 16, 16), (1, 1, 24, 16, 16), (2, 1, 20, 20, 20)]
    low, opt, high = profile_shapes(shapes)
    assert low == (1, 1, 16, 16, 16) and opt == (2, 1, 16, 16, 16) and high == (2, 1, 24, 20, 20)
    assert profile_shapes(shapes, max_batch=8)[2] == (8, 1, 24, 20, 20)
    with pytest.raises(UserError, match="no input shapes"):
        profile_shapes([])


def test_layer_precision_summary_reads_inspector_json():
    info = {
        "Layers": [
            {"Name": "conv1", "Outputs": [{"Name": "a", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}]},
            {"Name": "conv2", "Outputs": [{"Name": "b", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}]},
            {"Name": "head", "Outputs": [{"Name": "logits", "Format/Datatype": "Row major linear FP32"}]},
            "reformat (layer names only)",
        ],
        "Bindings": ["image", "logits"],
    }
    assert summarize_layers(info) == {
        "layers": 4, "by_output_precision": {"fp16": 1, "fp32": 1, "int8": 1, "unknown": 1},
    }


@pytest.mark.parametrize("dims", [2, 3])
@needs_trt
def test_tensorrt_fp16_engine_is_verified(tmp_path, dims, request):
    net, data, meta = (request.getfixturevalue(f"{k}{dims}d") for k in ("net", "data", "meta"))
    artifact = export_artifact(net, "tensorrt", tmp_path / "out", data["val"], meta)
    assert artifact.name == "model.engine"
    card = json.loads((artifact.parent / CARD_NAME).read_text())
    assert card["verification"]["passed"] and card["details"]["precision_built"] == "fp16"
    layers = json.loads((artifact.parent / LAYER_REPORT).read_text())
    assert layers["Layers"] and card["details"]["layer_precisions"]["layers"] == len(layers["Layers"])
    low, _, high = (card["details"]["profile"][k] for k in ("min", "opt", "max"))
    assert all(lo <= hi for lo, hi in zip(low, high))


@needs_trt
def test_tensorrt_int8_without_qdq_falls_back_to_fp16(tmp_path, net2d, data2d, meta2d):
    with pytest.warns(UserWarning, match="building FP16 instead"):
        artifact = export_artifact(net2d, "tensorrt", tmp_path / "out", data2d["val"], meta2d,
                                   format_options={"precision": "int8"})
    details = json.loads((artifact.parent / CARD_NAME).read_text())["details"]
    assert details["precision_requested"] == "int8" and details["precision_built"] == "fp16"
    assert details["notes"]


# ---------------------------------------------------------------- review findings (issue 21)
class _FakeLayer:
    def __init__(self, name, kind, outputs=1):
        self.name, self.type, self.num_outputs = name, kind, outputs
        self.precision, self.output_types = None, {}

    def set_output_type(self, index, dtype):
        self.output_types[index] = dtype


class _FakeTrt:
    """The few names of the TensorRT API these helpers touch, to test which layers they pick
    and what they set; the real build runs in the gpu-marked tests below."""

    float32 = "float32"
    LayerType = type("LayerType", (), {"CONVOLUTION": "conv", "NORMALIZATION": "norm", "SOFTMAX": "softmax",
                                       "REDUCE": "reduce", "ACTIVATION": "act"})
    LayerInformationFormat = type("LayerInformationFormat", (), {"JSON": "json"})


def test_norms_softmax_and_reductions_are_pinned_to_fp32():
    from trainer.export.formats.tensorrt_engine import keep_fp32

    layers = [_FakeLayer("conv", "conv"), _FakeLayer("inorm", "norm"), _FakeLayer("sm", "softmax"),
              _FakeLayer("mean", "reduce", outputs=2), _FakeLayer("relu", "act")]
    network = type("Net", (), {"num_layers": len(layers), "get_layer": lambda self, i: layers[i]})()
    assert keep_fp32(network, _FakeTrt) == ["inorm", "sm", "mean"]
    assert layers[1].precision == "float32" and layers[3].output_types == {0: "float32", 1: "float32"}
    assert layers[0].precision is None and layers[4].precision is None


def test_the_inspector_reads_through_an_execution_context_with_its_input_shape():
    from trainer.export.formats.tensorrt_engine import INPUT_NAME, inspect_engine

    seen = {}

    class Context:
        def set_input_shape(self, name, shape):
            seen["shape"] = (name, shape)

    class Inspector:
        execution_context = None

        def get_engine_information(self, fmt):
            seen["context"] = self.execution_context
            return json.dumps({"Layers": [], "format": fmt})

    context = Context()
    engine = type("Engine", (), {"create_execution_context": lambda self: context,
                                 "create_engine_inspector": lambda self: Inspector()})()
    assert inspect_engine(engine, _FakeTrt, [2, 1, 32, 32]) == {"Layers": [], "format": "json"}
    assert seen == {"shape": (INPUT_NAME, (2, 1, 32, 32)), "context": context}


def _qat_net(net, data):
    import copy

    from trainer.quant.calibrate import calibrate
    from trainer.quant.convert import quantize_net

    qat = copy.deepcopy(net)
    quantize_net(qat)
    calibrate(qat, [b["image"] for b in data["val"]], "max")
    return qat.eval()


@pytest.mark.gpu
@needs_trt
def test_fp16_engine_pins_instance_norms_to_fp32_and_reports_formats(tmp_path, data2d, meta2d):
    from export_helpers import train, unet

    net = train(unet(2, base=8, norm="instance"), *data2d["train"], steps=60)
    artifact = export_artifact(net, "tensorrt", tmp_path / "out", data2d["val"], meta2d)
    details = json.loads((artifact.parent / CARD_NAME).read_text())["details"]
    assert details["fp32_constrained_layers"], "no normalization layer was pinned to FP32"
    counts = details["layer_precisions"]["by_output_precision"]
    assert counts.get("fp16", 0) > 0 and counts.get("fp32", 0) > 0  # formats reported (context set)


@pytest.mark.gpu
@needs_trt
def test_qdq_model_asked_for_fp16_builds_int8_with_the_flag(tmp_path, net2d, data2d, meta2d):
    with pytest.warns(UserWarning, match="always builds in INT8"):
        artifact = export_artifact(_qat_net(net2d, data2d), "tensorrt", tmp_path / "out", data2d["val"], meta2d,
                                   format_options={"precision": "fp16"})
    details = json.loads((artifact.parent / CARD_NAME).read_text())["details"]
    assert details["precision_built"] == "int8" and details["explicit_quantization"]
    assert details["layer_precisions"]["by_output_precision"].get("int8", 0) > 0
