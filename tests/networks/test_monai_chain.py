"""MONAI's UNet (PReLU), BasicUNet, SegResNet (GroupNorm), DynUNet (stacked deep supervision)
and AttentionUnet (broadcast gates), in 2D and 3D: fit -> distill + prune + QAT -> every export
format that runs here, each artifact verified against PyTorch.

One student run composes the techniques as a recipe would list them: ``PruneRetrain`` prunes
in ``setup`` with nothing but the data to trace on (no ``example_shape``), QAT converts at
epoch 1, distillation from the fitted teacher runs throughout. Checkpoints are rebuilt from
their files (``restore_run``) before export, so the pruning history and the quantizers are
replayed on a freshly built MONAI network.
"""
from __future__ import annotations

import pytest
import torch

from chain_kit import build_module, datamodule, fit, image_size, net_config, restored_net
from trainer.callbacks.distill import Distillation
from trainer.callbacks.prune import PruneRetrain
from trainer.callbacks.qat import QuantizationAwareTraining
from trainer.export import ExportMeta, export_artifact
from trainer.models import netinfo
from trainer.structure import history

NETS = ["UNet", "BasicUNet", "SegResNet", "DynUNet", "AttentionUnet"]
# A few steps on four images leave these nets barely trained (logits close together) and two
# validation images calibrate them: INT8 rounding then moves many logits by more than 2 steps
# (up to 16% on the shape probe). Here the chain's plumbing is tested (every layer quantized,
# artifact built, overflow-checked and verified at a loose tolerance); INT8 accuracy of norm
# networks at the default tolerance, layer selection included, in test_int8_norm_networks.py.
UNTRAINED_INT8 = {"max_exceed_fraction": 0.3, "min_argmax_agreement": 0.97}


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _export_all(net, formats, batches, dims, out):
    meta = ExportMeta(spatial_dims=dims, num_classes=3, divisor=netinfo.divisor(net))
    for fmt, tolerance in formats:
        options = {"benchmark_runs": 0, "select_layers": False} if fmt == "onnx-int8-cpu" else None
        export_artifact(net, fmt, out / fmt, batches, meta, threads=1, tolerance=tolerance, format_options=options)
        assert (out / fmt / "model_card.json").is_file(), fmt


@pytest.mark.slow
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", NETS)
def test_fit_distill_prune_qat_export(tmp_path, name, dims):
    config, data = net_config(name, dims), datamodule(dims, image_size(name, dims))
    torch.manual_seed(0)
    teacher = fit(build_module(config), data, tmp_path / "teacher", epochs=3)[-1]

    callbacks = [
        PruneRetrain(target_ratio=0.5, rounds=1, epochs_per_round=1, importance="taylor", taylor_batches=1, round_to=2),
        QuantizationAwareTraining(start_epoch=1, calib_batches=1, calibration="max"),
        Distillation(teacher=str(teacher), kd_weight=0.5, kd_ds_weight=0.25),
    ]
    pruned_ckpt, qat_ckpt = fit(build_module(config, init_from=str(teacher)), data, tmp_path / "student", 2, callbacks)

    full, pruned, qat = restored_net(teacher), restored_net(pruned_ckpt), restored_net(qat_ckpt)
    assert [e["converter"].rsplit(".", 1)[-1] for e in history(qat)] == ["StructuredPrune", "FakeQuantConversion"]
    assert _params(pruned) < 0.45 * _params(full), (name, _params(pruned), _params(full))
    plan = history(pruned)[0]["state"]
    assert plan["example_shape"] == [2, 1, *data.patch_size]  # traced on the data's patch, not a guess
    x = torch.randn(1, 1, *data.patch_size)
    with torch.no_grad():
        assert pruned(x).shape == full(x).shape == (1, 3, *data.patch_size)  # heads kept their classes

    batches = list(data.val_dataloader())
    _export_all(pruned, [("onnx", None), ("onnx-fp16", None), ("onnx-int8-cpu", UNTRAINED_INT8)], batches, dims,
                tmp_path / "pruned")
    _export_all(qat, [("onnx-qdq", None)], batches, dims, tmp_path / "qat")
