"""SegmentationModule: loss terms from callbacks, init_from, restore_run."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from tinydata import TinySegDataModule

from trainer.errors import UserError
from trainer.models import UNet
from trainer.module import SegmentationModule


def tiny_net(**kw):
    return UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4, **kw)


def fit(module, tmp_path, epochs=1, callbacks=()):
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=list(callbacks),
                         default_root_dir=tmp_path)
    trainer.fit(module, TinySegDataModule(n_train=4, n_val=2))
    return trainer


class ConstantTerm(pl.Callback):
    """A real LossContributor: adds 3 x mean|logits| (so it has a gradient)."""

    def loss_terms(self, pl_module, batch, outputs):
        main = outputs[0] if isinstance(outputs, list) else outputs
        return {"extra": 3.0 * main.abs().mean()}


def test_callback_loss_terms_are_added_and_logged(tmp_path):
    module = SegmentationModule(tiny_net(), num_classes=3)
    trainer = fit(module, tmp_path, callbacks=[ConstantTerm()])
    logged = trainer.logged_metrics
    assert torch.allclose(logged["train/loss"], logged["train/loss_seg"] + logged["train/loss_extra"], atol=1e-5)


def test_init_from_loads_network_weights(tmp_path):
    module = SegmentationModule(tiny_net(), num_classes=3)
    trainer = fit(module, tmp_path)
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    fresh = SegmentationModule(tiny_net(), num_classes=3, init_from=str(path))
    for (name, a), b in zip(module.net.state_dict().items(), fresh.net.state_dict().values()):
        assert torch.equal(a, b), name


def test_init_from_with_other_architecture_is_named(tmp_path):
    module = SegmentationModule(tiny_net(), num_classes=3)
    trainer = fit(module, tmp_path)
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(UserError, match="init_from=.*a.ckpt"):
        SegmentationModule(UNet(spatial_dims=2, num_classes=3, depth=3, base_channels=4), num_classes=3,
                           init_from=str(path))


def test_not_a_checkpoint_is_named(tmp_path):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(UserError, match="bogus.ckpt.*not a readable checkpoint"):
        SegmentationModule(tiny_net(), num_classes=3, init_from=str(bogus))
    with pytest.raises(UserError, match="does not exist"):
        SegmentationModule(tiny_net(), num_classes=3, init_from=str(tmp_path / "missing.ckpt"))


def test_restore_refuses_weights_of_another_network_in_one_line_naming_the_file(tmp_path):
    """Distillation adapters (training state) are dropped silently; any other weight that does
    not fit the rebuilt network is refused, naming the checkpoint."""
    from trainer.restore import restore_run

    kwargs = dict(spatial_dims=2, num_classes=3, depth=2, base_channels=4)
    torch.manual_seed(0)
    net = UNet(**kwargs)
    module = SegmentationModule(net, num_classes=3)
    hparams = {"net": {"class_path": "trainer.models.UNet", "init_args": kwargs}, "num_classes": 3}
    state = {**module.state_dict(), "distill_adapters.a.weight": torch.zeros(2, 2, 1, 1)}
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    restored = restore_run(path, with_data=False)
    assert not hasattr(restored.module, "distill_adapters")
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {**state, "net.extra.weight": torch.zeros(1)}, "hyper_parameters": hparams}, bad)
    with pytest.raises(UserError, match=r"checkpoint .*other\.ckpt does not fit this recipe's UNet \(unexpected \['net\.extra\.weight'\]\)"):
        restore_run(bad, with_data=False)
