"""A channel-pruned network exports to ONNX and onnxruntime matches PyTorch."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from prune_helpers import trained_unet
from trainer.export.api import ExportMeta, export_artifact
from trainer.export.onnx_tools import OrtPredictor, export_onnx, ort_session
from trainer.prune.sparsity import make_permanent, sparsify
from trainer.prune.structured import prune_channels


@pytest.mark.parametrize("dims,norm", [(2, "batch"), (3, "instance")])
def test_pruned_unet_onnx_matches_pytorch(tmp_path, dims, norm):
    net = trained_unet(dims=dims, norm=norm, steps=3)
    prune_channels(net, 0.5, round_to=4)
    net.eval()
    path = tmp_path / "pruned.onnx"
    export_onnx(net, torch.zeros(1, 1, *([16] * dims)), path)
    weights = {t.name: tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}
    assert any(shape[:2] == (4, 1) for shape in weights.values())  # first conv: 4 of 8 channels left
    predictor = OrtPredictor(ort_session(path, threads=1))
    x = torch.randn(2, 1, *([32] * dims))  # another batch and size than the trace
    with torch.no_grad():
        want = net(x)
    np.testing.assert_allclose(predictor(x).numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


def test_export_artifact_verifies_pruned_and_sparse_nets(tmp_path):
    from tinydata import make_sample

    net = trained_unet(ds=False)
    prune_channels(net, 0.5, round_to=2)
    sparsify(net, 0.3, protected=["head"])
    make_permanent(net)  # an exported graph holds plain zeros, not mask multiplies
    samples = [make_sample(100 + i, 2, 32, 3) for i in range(2)]
    batches = [{"image": torch.stack([s["image"] for s in samples]), "label": torch.stack([s["label"] for s in samples])}]
    artifact = export_artifact(net, "onnx", tmp_path / "out", batches, ExportMeta(spatial_dims=2, num_classes=3, divisor=4), threads=1)
    assert artifact.exists()
