"""onnx-int8-cpu for networks normalised by InstanceNorm/GroupNorm (MONAI's defaults), at the
format's default tolerance: the equalization in front of the norms is exact, and trained nets
export an INT8 artifact that passes verification, with what was done recorded in the card."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from chain_kit import build_module, build_net, datamodule, fit, net_config, restored_net

from trainer.export import ExportMeta, export_artifact
from trainer.export.norm_equalize import equalize_for_norms
from trainer.export.onnx_tools import export_onnx, ort_session, simplify_onnx
from trainer.models import netinfo

# InstanceNorm + PReLU (MONAI UNet's defaults) and GroupNorm(8) (SegResNet's)
NORM_NETS = ["UNet", "SegResNet"]


def _float_onnx(net: torch.nn.Module, path, size: int) -> None:
    """The float graph the format quantizes: exported and simplified as ``BuildContext`` does."""
    raw = path.with_name("raw.onnx")
    export_onnx(net.eval(), torch.randn(1, 1, size, size), raw, opset=17)
    simplify_onnx(raw, path)


@pytest.mark.parametrize("name", NORM_NETS)
def test_equalizing_the_convolutions_before_norms_computes_the_same_function(tmp_path, name):
    torch.manual_seed(0)
    net = build_net(net_config(name, 2))
    with torch.no_grad():  # channels of very different ranges: what equalization is for
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(torch.logspace(-1, 0, m.weight.shape[0]).view(-1, 1, 1, 1))
    _float_onnx(net, tmp_path / "float.onnx", 32)
    arrays = [np.random.default_rng(i).standard_normal((2, 1, 32, 32)).astype(np.float32) for i in range(2)]
    report = equalize_for_norms(tmp_path / "float.onnx", tmp_path / "eq.onnx", arrays, "image")
    assert report.convolutions > 0 and report.max_gain > 2, report  # it found and rescaled the norms' inputs
    x = np.random.default_rng(9).standard_normal((1, 1, 32, 32)).astype(np.float32)
    before = ort_session(tmp_path / "float.onnx", threads=1).run(None, {"image": x})[0]
    after = ort_session(tmp_path / "eq.onnx", threads=1).run(None, {"image": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-3, atol=1e-3 * float(np.abs(before).max()))


@pytest.mark.slow
@pytest.mark.parametrize("name", NORM_NETS)
def test_trained_norm_network_exports_int8_that_verifies_at_the_default_tolerance(tmp_path, name):
    config, data = net_config(name, 2), datamodule(2, 64)
    torch.manual_seed(0)
    net = restored_net(fit(build_module(config), data, tmp_path / "fit", epochs=40)[-1])
    meta = ExportMeta(spatial_dims=2, num_classes=3, divisor=netinfo.divisor(net))
    out = tmp_path / "int8"
    export_artifact(net, "onnx-int8-cpu", out, list(data.val_dataloader()), meta, threads=1,
                    format_options={"benchmark_runs": 0})  # default tolerance and layer selection
    card = json.loads((out / "model_card.json").read_text())
    assert card["verification"]["passed"] is True
    details = card["details"]
    assert details["norm_equalization"]["convolutions_equalized"] > 0  # the norms' inputs were equalized first
    selection = details["layer_selection"]  # measured; the card says which layers stayed in float
    assert selection["chosen"]["argmax_agreement"] >= 0.999
    assert len(selection["left_float"]) < selection["weighted_layers"]  # some layers do run in INT8
