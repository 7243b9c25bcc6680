"""Teachers trained elsewhere: an nnU-Net v2 model folder (a PlainConvUNet trained here, saved
the way nnU-Net saves it) and a MONAI bundle, with their own preprocessing honoured."""
from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

# dynamic_network_architectures is installed by `launch.py setup` (trainer/env.py): no skip
from distill_testing import data_recipe  # noqa: E402
from nnunet_kit import ct_normalise, raw_ct, write_model_folder  # noqa: E402
from tinydata import TinySegDataModule  # noqa: E402
from trainer.callbacks.distill import Distillation  # noqa: E402
from trainer.distill.cache import main as distill_cache  # noqa: E402
from trainer.distill.teacher import TeacherEnsemble, bind_to_data, load_teacher  # noqa: E402
from trainer.distill.teacher_input import PreprocessedTeacher  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.models import UNet  # noqa: E402
from trainer.module import SegmentationModule  # noqa: E402

RAW = {"channels": [{"name": "CT", "scheme": "noNorm"}]}


class Data:
    def __init__(self, record):
        self.path, self.preprocessing = "scans.h5", record


def _foreground_dice(logits, label):
    pred = logits.argmax(1)
    dice = [2 * ((pred == c) & (label == c)).sum() / ((pred == c).sum() + (label == c).sum()) for c in (1, 2)]
    return float(sum(dice)) / 2


def _bound(path, record, mode="check"):
    net, info = load_teacher(path)
    ensemble = TeacherEnsemble([net])
    said = bind_to_data(ensemble, [info], Data(record), mode)
    return ensemble, net, said


@pytest.fixture(scope="module")
def nnunet_folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("results"))


def test_nnunet_teacher_normalises_raw_ct_its_own_way(nnunet_folder):
    ensemble, net, said = _bound(nnunet_folder, RAW)
    assert isinstance(net, PreprocessedTeacher) and type(net.net).__name__ == "PlainConvUNet"
    assert "CT (clip [-150, 450], subtract 120, divide by 90)" in said[0]
    image, label = raw_ct(4, seed=7)
    with torch.no_grad():
        logits = ensemble(image)
        assert torch.equal(logits, net.net(ct_normalise(image)))  # exactly nnU-Net's input
        raw = net.net(image)  # raw HU is not what it was trained on: unclipped air and bone mislead it
    assert _foreground_dice(logits, label) > 0.75  # it learned (100 steps, here)
    assert _foreground_dice(raw, label) < _foreground_dice(logits, label) - 0.2
    for other in (nnunet_folder / "fold_0", nnunet_folder / "fold_0" / "checkpoint_final.pth"):
        with torch.no_grad():
            assert torch.equal(_bound(other, RAW)[0](image), logits)


def test_data_normalised_the_teachers_way_goes_in_as_is(nnunet_folder):
    same = {"channels": [{"name": "CT", "scheme": "CT", "clip": [-150.0, 450.0], "mean": 120.0, "std": 90.0}]}
    ensemble, net, said = _bound(nnunet_folder, same)
    assert net.transforms is None and "as they are" in said[0]
    x = ct_normalise(raw_ct(2)[0])
    with torch.no_grad():
        assert torch.equal(ensemble(x), net.net(x))


@pytest.mark.parametrize("record, match", [
    ({"channels": [{"scheme": "zscore"}]}, r"channel 0 is normalised as z-score per case, teacher .* expects CT \(clip"),
    ({"channels": [{"scheme": "CT", "clip": [-1000, 1000], "mean": 0, "std": 500}]}, r"normalised as CT \(clip \[-1000"),
    (None, r"scans.h5 records no intensity normalisation, but teacher .* expects channel 0: CT .*teacher_input: as_is"),
    ({"channels": [{"scheme": "noNorm"}, {"scheme": "noNorm"}]}, r"scans.h5 has 2 channels, teacher .* expects 1"),
])
def test_data_the_teacher_cannot_read_is_refused_in_one_line(nnunet_folder, record, match):
    with pytest.raises(UserError, match=match) as err:
        _bound(nnunet_folder, record)
    assert "\n" not in str(err.value)
    assert _bound(nnunet_folder, record, mode="as_is")[1].transforms is None  # the user vouches for the data


def test_per_case_normalisation_cannot_be_done_on_patches(tmp_path):
    folder = write_model_folder(tmp_path, scheme="ZScoreNormalization", steps=1)
    with pytest.raises(UserError, match=r"raw intensities, teacher .* expects z-score per case, which needs the whole "
                                        r"case; convert the data with --normalize zscore"):
        _bound(folder, RAW)
    assert _bound(folder, {"channels": [{"scheme": "zscore"}]})[1].transforms is None


def test_transposed_axes_are_applied_and_undone(tmp_path):
    folder = write_model_folder(tmp_path, transpose=(0, 2, 1), steps=1)
    ensemble, net, _ = _bound(folder, RAW)
    x = torch.randn(1, 1, 32, 32) * 100
    with torch.no_grad():
        expected = net.net(ct_normalise(x).transpose(-1, -2)).transpose(-1, -2)
        assert torch.allclose(ensemble(x), expected)


def test_a_2d_teacher_of_slices_along_another_axis_is_refused(tmp_path):
    folder = write_model_folder(tmp_path, transpose=(1, 0, 2), steps=1)
    ensemble = _bound(folder, RAW)[0]
    with pytest.raises(UserError, match=r"trained on 2D slices along axis 1 \(z y x\) .*a 2D teacher cannot read them"):
        ensemble(torch.zeros(1, 1, 32, 32))


def test_folds_are_chosen_or_ensembled(tmp_path):
    folder = write_model_folder(tmp_path, folds=(0, 1), steps=1)
    with pytest.raises(UserError, match=r"holds folds \['fold_0', 'fold_1'\]; name one"):
        load_teacher(folder)
    members = [load_teacher(folder / f"fold_{i}")[0] for i in (0, 1)]
    assert not torch.equal(members[0].net.decoder.seg_layers[-1].weight, members[1].net.decoder.seg_layers[-1].weight)


def test_plans_cannot_import_arbitrary_code(tmp_path):
    folder = write_model_folder(tmp_path, steps=1)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["2d"]["architecture"]["network_class_name"] = "subprocess.Popen"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(UserError, match=r"names class 'subprocess.Popen', outside the modules"):
        load_teacher(folder)


def _break_plans(folder, change):
    plans = json.loads((folder / "plans.json").read_text())
    change(plans["configurations"]["2d"])
    (folder / "plans.json").write_text(json.dumps(plans))


BROKEN = {
    "plans not JSON": (lambda f: (f / "plans.json").write_text("{"), r"plans.json is not readable JSON"),
    "checkpoint garbage": (lambda f: (f / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint"),
                           r"checkpoint_final.pth is not readable with weights_only=True"),
    "weights of another net": (lambda f: _break_plans(f, lambda c: c["architecture"]["arch_kwargs"].update(
        features_per_stage=[8, 16, 32])), r"checkpoint_final.pth does not fit the network of nnU-Net teacher .*size mismatch"),
    "old plans": (lambda f: _break_plans(f, lambda c: c.pop("architecture")), r"no 'architecture' with 'network_class_name'"),
    "regions": (lambda f: (f / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {
        "background": 0, "whole": [1, 2], "core": 2}})), r"dataset.json defines regions"),
    "no checkpoint": (lambda f: (f / "fold_0" / "checkpoint_final.pth").unlink(), r"fold_0: no checkpoint_final.pth or"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_broken_nnunet_folders_are_named_in_one_line(tmp_path, broken):
    folder = write_model_folder(tmp_path, steps=1)
    damage, match = BROKEN[broken]
    damage(folder)
    with pytest.raises(UserError, match=match) as err:
        load_teacher(folder)
    assert "\n" not in str(err.value)


class RawCT(TinySegDataModule):
    """Tiny 2D data holding raw Hounsfield units, with the record ``data convert --normalize noNorm`` writes."""

    def __init__(self, record=None):
        super().__init__(spatial_dims=2, size=32, n_train=4, n_val=2, num_classes=3, batch_size=2)
        self.preprocessing = record or RAW
        image, label = raw_ct(6, seed=3)
        for items, offset in ((self.train_items, 0), (self.val_items, 4)):
            for i, item in enumerate(items):
                item["image"], item["label"] = image[offset + i], label[offset + i]


def _fit(folder, data, tmp_path, **distill_args):
    torch.manual_seed(0)
    module = SegmentationModule(UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4), num_classes=3)
    distill = Distillation(teacher=str(folder), kd_weight=1.0, kd_ds_weight=0.0, **distill_args)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[distill], num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return distill, trainer


def test_distillation_from_an_nnunet_folder(nnunet_folder, tmp_path):
    hint = {"student": "decoders.1", "teacher": "decoder.stages.1", "weight": 0.5}  # FitNets on nnU-Net's module path
    distill, trainer = _fit(nnunet_folder, RawCT(), tmp_path, features=[hint])
    assert float(trainer.callback_metrics["train/loss_kd"]) > 0
    assert float(trainer.callback_metrics["train/loss_feat_decoders_1"]) > 0
    image = raw_ct(2, seed=11)[0]
    with torch.no_grad():  # the teacher the student learned from saw nnU-Net's input
        assert torch.equal(distill.teacher(image), distill.teacher.members[0].net(ct_normalise(image)))
    assert distill.state_dict()["teachers"][0]["class_path"].endswith("PlainConvUNet")


def test_distillation_refuses_data_normalised_otherwise(nnunet_folder, tmp_path):
    with pytest.raises(UserError, match="normalised as z-score per case, teacher"):
        _fit(nnunet_folder, RawCT({"channels": [{"scheme": "zscore"}]}), tmp_path)


PHANTOM_3_CLASSES = {"cases": 3, "shape": [2, 32, 32], "seed": 0, "num_classes": 3}


def test_offline_cache_command_checks_the_teachers_input(nnunet_folder, tmp_path):
    """`launch.py distill-cache` binds the teacher like the callback: the phantom file records a
    per-case z-score, the CT nnU-Net teacher is refused unless --teacher-input as_is vouches for it."""
    argv = ["--teacher", str(nnunet_folder), "--data-config", str(data_recipe(tmp_path, generate=PHANTOM_3_CLASSES)),
            "--out", str(tmp_path / "cache.h5")]
    with pytest.raises(UserError, match=r"phantom2d.h5 channel 0 is normalised as z-score per case, teacher .*nnUNetPlans__2d expects CT"):
        distill_cache(argv)
    assert not (tmp_path / "cache.h5").exists()
    assert distill_cache([*argv, "--teacher-input", "as_is"]) == 0
    assert (tmp_path / "cache.h5").is_file()


MONAI_2D = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2], "num_res_units": 0}


def test_monai_network_from_a_plain_state_dict_teaches(tmp_path):
    from monai.networks.nets import UNet as MonaiUNet

    torch.manual_seed(1)
    weights = tmp_path / "monai_unet.pt"
    torch.save({f"model.{k}": v for k, v in MonaiUNet(**MONAI_2D).state_dict().items()}, weights)  # a prefix, as often
    distill, trainer = _fit(weights, RawCT(), tmp_path, teacher_class="monai.networks.nets.UNet",
                            teacher_init_args=MONAI_2D)
    assert float(trainer.callback_metrics["train/loss_kd"]) > 0
    assert type(distill.teacher.first).__name__ == "UNet" and not isinstance(distill.teacher.members[0], PreprocessedTeacher)
    saved = torch.load(weights)["model.model.0.conv.weight"]
    assert torch.equal(distill.teacher.first.model[0].conv.weight, saved)


def _bundle(tmp_path, network_def, preprocessing):
    from monai.networks.nets import UNet as MonaiUNet

    root = tmp_path / "spleen_bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    config = {"num_classes": 3, "network_def": network_def, "preprocessing": {"transforms": preprocessing}}
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    args = {k: v for k, v in network_def.items() if k != "_target_"}
    args["out_channels"] = 3
    torch.manual_seed(0)
    torch.save(MonaiUNet(**args).state_dict(), root / "models" / "model.pt")
    return root


NETWORK_DEF = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": "@num_classes",
               "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
SCALE = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0]},
         {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0.0, "b_max": 1.0,
          "clip": True}]


@pytest.mark.parametrize("dims", [3, 2])
def test_monai_bundle_teacher_with_its_intensity_range_and_axis_order(tmp_path, dims):
    root = _bundle(tmp_path, {**NETWORK_DEF, "spatial_dims": dims}, SCALE)
    record = {"channels": [{"scheme": "noNorm"}], "resampling": {"target_spacing_zyx_mm": [2.0, 1.5, 1.5]}}
    net, info = load_teacher(root)
    ensemble = TeacherEnsemble([net])
    said = bind_to_data(ensemble, [info], Data(record))
    assert info["class_path"] == "monai.networks.nets.UNet" and "range ([-57, 164] -> [0, 1], clipped)" in said[0]
    x = torch.randn(1, 1, 8, 12, 16)[..., 0, :, :] * 200 if dims == 2 else torch.randn(1, 1, 8, 12, 16) * 200
    reverse = (0, 1, 3, 2) if dims == 2 else (0, 1, 4, 3, 2)
    with torch.no_grad():  # MONAI's arrays are [C, x, y(, z)]; the data's are [C, (z,) y, x]
        scaled = ((x + 57) / 221).clamp(0, 1)
        expected = net.net(scaled.permute(*reverse)).permute(*reverse)
        assert torch.allclose(ensemble(x), expected, atol=1e-6)
        assert not torch.allclose(ensemble(x), net.net(scaled), atol=1e-3)  # the order matters to it


def test_monai_bundle_expressions_are_not_evaluated(tmp_path):
    root = _bundle(tmp_path, NETWORK_DEF, SCALE)
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["network_def"]["channels"] = "$__import__('os').system('true')"
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"network_def.channels is an expression"):
        load_teacher(root)
