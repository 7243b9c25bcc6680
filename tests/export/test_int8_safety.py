"""The machine-independent INT8 overflow check (``trainer.export.int8_safety``).

Everything here is decided from the files' integers alone, so the results are the same on a
VNNI, an AVX2 or an ARM machine; ``test_int8_emulated_cpu.py`` shows on an emulated AVX2 CPU
that what the check refuses is really wrong there.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trainer.export import export_artifact
from trainer.export.int8_safety import INT16_MAX, check_int8_accumulation
from trainer.export.verify import VerificationError


def _qlinear_conv(weight: np.ndarray, x_type=TensorProto.UINT8) -> onnx.ModelProto:
    x_np = np.uint8 if x_type == TensorProto.UINT8 else np.int8
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "xs"), numpy_helper.from_array(np.array(0, x_np), "xz"),
        numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.full(weight.shape[0], 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(weight.shape[0], weight.dtype), "wz"),
        numpy_helper.from_array(np.array(0.5, np.float32), "ys"), numpy_helper.from_array(np.array(0, x_np), "yz"),
    ]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="conv7", pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", x_type, [1, weight.shape[1], 8, 8])],
                              [helper.make_tensor_value_info("y", x_type, [1, weight.shape[0], 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bound_is_255_times_the_two_largest_weights_of_a_channel():
    w = np.zeros((4, 2, 3, 3), np.int8)
    w[2, 0, 0, 0], w[2, 1, 2, 2] = 100, -29  # channel 2: 255 * 129 = 32895 > 32767
    w[0, 0, 1, 1] = 127  # one large weight alone is fine: its partner is 0
    report = check_int8_accumulation(_qlinear_conv(w))
    (layer,) = report.layers
    assert layer.bound == 255 * 129 and layer.channel == 2 and layer.pair == (100, -29)
    assert not report.ok and "conv7" in report.message() and "output channel 2" in report.message()
    w[2, 1, 2, 2] = -28  # 255 * 128 = 32640: safe
    assert check_int8_accumulation(_qlinear_conv(w)).ok


def test_signed_activations_are_no_escape_and_uint8_weights_always_pass():
    w = np.full((2, 2, 3, 3), 127, np.int8)
    assert not check_int8_accumulation(_qlinear_conv(w, TensorProto.INT8)).ok  # x86 shifts int8 inputs to uint8
    assert check_int8_accumulation(_qlinear_conv(np.full((2, 2, 3, 3), 255, np.uint8))).ok


def test_seven_bit_weights_are_safe_whatever_their_values():
    rng = np.random.default_rng(0)
    w = rng.integers(-64, 65, size=(16, 8, 3, 3)).astype(np.int8)
    report = check_int8_accumulation(_qlinear_conv(w))
    assert report.ok and report.to_card()["worst_pair_bound"] <= INT16_MAX


def test_int8_cpu_export_the_old_way_is_refused_naming_the_layer(tmp_path, net2d, data2d, meta2d):
    """Full-range int8 weights (the setting before 7-bit became the default) fail the check on
    any machine, before the artifact is even run; nothing is written."""
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match=r"onnx-int8-cpu: .*can overflow the 16-bit pair sums.*worst: layer '.*Conv'"):
        export_artifact(net2d, "onnx-int8-cpu", out, data2d["val"], meta2d, threads=1,
                        format_options={"reduce_range": False, "benchmark_runs": 0})
    assert not out.exists() and not list(tmp_path.iterdir())


def test_uint8_weights_keep_eight_bits_and_pass(tmp_path, net2d, data2d, meta2d):
    artifact = export_artifact(net2d, "onnx-int8-cpu", tmp_path / "out", data2d["val"], meta2d, threads=1,
                               tolerance={"max_exceed_fraction": 0.05},
                               format_options={"reduce_range": False, "weight_type": "uint8", "benchmark_runs": 0})
    weights = [t for t in onnx.load(str(artifact)).graph.initializer if t.data_type == TensorProto.UINT8 and len(t.dims) == 4]
    assert len(weights) >= 11 and max(int(numpy_helper.to_array(t).max()) for t in weights) > 192  # 8-bit range used
    assert check_int8_accumulation(artifact).ok
