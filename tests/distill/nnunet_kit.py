"""A small nnU-Net v2 model folder made here: a ``dynamic_network_architectures`` PlainConvUNet
trained the nnU-Net way (CT-normalised inputs) and saved with the files nnU-Net writes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CT = {"percentile_00_5": -150.0, "percentile_99_5": 450.0, "mean": 120.0, "std": 90.0}
ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]], "n_conv_per_stage": [1, 1, 1],
        "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def raw_ct(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hounsfield-like images ``[n, 1, size, size]`` (soft tissue ~40, an organ ~300, a lesion
    ~150, air -1000 outside the body, a bone ~1200) and their labels (2 classes + background).
    Air and bone lie outside :data:`CT`'s clip range: unclipped, they swamp the statistics of the
    network's instance norms, so a teacher fed raw HU predicts differently."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for _ in range(n):
        cy, cx = (torch.rand(2, generator=g) * size * 0.5 + size * 0.25).tolist()
        label = torch.zeros(size, size, dtype=torch.long)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 < (size / 5) ** 2] = 1
        label[(yy - size + cy) ** 2 + (xx - size + cx) ** 2 < (size / 7) ** 2] = 2
        hu = torch.tensor([40.0, 300.0, 150.0])[label] + 30 * torch.randn(size, size, generator=g)
        hu[:, :4] = hu[:, -4:] = -1000.0  # air beside the body
        by, bx = (torch.rand(2, generator=g) * (size - 8) + 4).long().tolist()
        bone = ((yy - by) ** 2 + (xx - bx) ** 2 < 6) & (label == 0)
        hu[bone] = 1200.0
        images.append(hu[None])
        labels.append(label)
    return torch.stack(images), torch.stack(labels)


def ct_normalise(x: torch.Tensor) -> torch.Tensor:
    """nnU-Net's CTNormalization with :data:`CT`."""
    return (x.clamp(CT["percentile_00_5"], CT["percentile_99_5"]) - CT["mean"]) / CT["std"]


def make_network(seed: int = 0):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    torch.manual_seed(seed)
    kw = dict(ARCH["arch_kwargs"], conv_op=nn.Conv2d, norm_op=nn.InstanceNorm2d, nonlin=nn.LeakyReLU)
    return PlainConvUNet(input_channels=1, num_classes=3, deep_supervision=False, **kw)


def plans(scheme: str = "CTNormalization", transpose=(0, 1, 2)) -> dict:
    return {
        "dataset_name": "Dataset001_Toy", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 0.8, 0.8], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose), "transpose_backward": [list(transpose).index(i) for i in range(3)],
        "configurations": {"2d": {
            "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 4,
            "patch_size": [32, 32], "spacing": [0.8, 0.8], "normalization_schemes": [scheme],
            "use_mask_for_norm": [False], "architecture": ARCH, "batch_dice": True,
        }},
        "foreground_intensity_properties_per_channel": {"0": {**CT, "max": 900.0, "median": 130.0, "min": -1000.0}},
    }


def write_model_folder(root: Path, *, scheme: str = "CTNormalization", transpose=(0, 1, 2), folds=(0,),
                       steps: int = 100) -> Path:
    """``root/Dataset001_Toy/nnUNetTrainer__nnUNetPlans__2d`` with a network trained ``steps``
    Adam steps on CT-normalised images; returns the configuration folder."""
    folder = root / "Dataset001_Toy" / "nnUNetTrainer__nnUNetPlans__2d"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans(scheme, transpose), indent=1))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": 8, "file_ending": ".nii.gz"}))
    image, label = raw_ct(8)
    for fold in folds:
        net = make_network(seed=fold)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = F.cross_entropy(net(ct_normalise(image)), label)
            opt.zero_grad()
            loss.backward()
            opt.step()
        (folder / f"fold_{fold}").mkdir()
        torch.save({  # the keys nnU-Net v2 writes; its training log holds numpy scalars
            "network_weights": net.state_dict(), "optimizer_state": opt.state_dict(), "grad_scaler_state": None,
            "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)]},
            "_best_ema": np.float64(0.5), "current_epoch": steps, "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": "2d", "fold": fold}, "inference_allowed_mirroring_axes": (0, 1),
        }, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder
