"""Loading, freezing and ensembling teachers; bad teacher files are one-line errors."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from distill_testing import LINEAR_TEACHER, framework_checkpoint, linear_teacher, unet_kwargs
from trainer.distill.teacher import TeacherEnsemble, load_teacher
from trainer.errors import UserError
from trainer.models.unet import UNet


def test_framework_checkpoint_is_loaded_frozen_with_its_hash(tmp_path):
    path = framework_checkpoint(tmp_path / "t.ckpt", **unet_kwargs())
    net, info = load_teacher(path)
    assert isinstance(net, UNet) and not net.training
    assert all(not p.requires_grad for p in net.parameters())
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["path"] == str(path) and info["class_path"].endswith("UNet")


def test_class_path_with_plain_or_prefixed_weights(tmp_path):
    path, init_args = linear_teacher(tmp_path / "w.pt", num_classes=3)
    net, _ = load_teacher(path, LINEAR_TEACHER, init_args)
    assert torch.equal(net.weight, torch.load(path)["weight"])
    prefixed = tmp_path / "prefixed.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in torch.load(path).items()}}, prefixed)
    assert torch.equal(load_teacher(prefixed, LINEAR_TEACHER, init_args)[0].weight, net.weight)


def test_weights_that_do_not_match_the_class_name_file_and_class(tmp_path):
    path, init_args = linear_teacher(tmp_path / "w.pt", num_classes=3)
    with pytest.raises(UserError) as err:
        load_teacher(path, LINEAR_TEACHER, {**init_args, "out_channels": 4})
    msg = str(err.value)
    assert "w.pt" in msg and "torch.nn.Conv2d" in msg and "shape" in msg and "\n" not in msg


def test_framework_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = framework_checkpoint(tmp_path / "t.ckpt", **unet_kwargs())
    with pytest.raises(UserError, match="do not match trainer.models.UNet"):
        load_teacher(path, "trainer.models.UNet", unet_kwargs(base=4))


@pytest.mark.parametrize("bad, match", [("missing.ckpt", "does not exist"), ("plain", "teacher_class")])
def test_missing_or_plain_file_without_class(tmp_path, bad, match):
    path = tmp_path / bad
    if bad == "plain":
        path, _ = linear_teacher(path)
    with pytest.raises(UserError, match=match):
        load_teacher(path)


def test_unknown_teacher_class(tmp_path):
    path, _ = linear_teacher(tmp_path / "w.pt")
    with pytest.raises(UserError, match="cannot be imported"):
        load_teacher(path, "torch.nn.NoSuchConv", {})


def test_ensemble_averages_probabilities_at_t_or_logits():
    a, b = torch.nn.Conv2d(1, 3, 1), torch.nn.Conv2d(1, 3, 1)
    x = torch.randn(2, 1, 4, 4)
    za, zb = a(x).detach(), b(x).detach()
    t = 2.0
    probs = TeacherEnsemble([a, b], "probs", t)(x)
    want = (torch.softmax(za / t, 1) + torch.softmax(zb / t, 1)) / 2
    assert torch.allclose(torch.softmax(probs / t, 1), want, atol=1e-6)
    assert torch.allclose(TeacherEnsemble([a, b], "logits", t)(x), (za + zb) / 2, atol=1e-6)
    assert torch.equal(TeacherEnsemble([a], "probs", t)(x), za)  # one teacher: unchanged


def test_ensemble_stays_in_eval_mode():
    ens = TeacherEnsemble([torch.nn.BatchNorm2d(2)], "logits")
    ens.train()
    assert not ens.training and not ens.first.training
    assert math.isclose(ens.temperature, 1.0)
