"""trainer/trust.py: a checkpoint never makes us import a module the user did not name.

Each hostile checkpoint names a module whose import would leave a marker file behind; the
tests check the refusal (one line) and that the marker never appears.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from trainer.errors import UserError
from trainer.restore import restore_run
from trainer.structure import replay
from trainer.trust import ENV, check_class_path

sys.path.insert(0, str(Path(__file__).resolve().parent / "distill"))
from distill_testing import framework_checkpoint, unet_kwargs  # noqa: E402

EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("imported")
from trainer.models.unet import UNet as Net  # a real network, so a trusted import restores
class Conv:
    @classmethod
    def rebuild(cls, net, state):
        pathlib.Path({marker!r}).write_text("rebuilt")
'''


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A module ``evilmod`` on sys.path whose import writes ``marker``."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "evilmod.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ENV, raising=False)
    yield marker
    sys.modules.pop("evilmod", None)


def _checkpoint(tmp_path: Path, edit) -> Path:
    path = framework_checkpoint(tmp_path / "base.ckpt", **unet_kwargs())
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    out = tmp_path / "hostile.ckpt"
    torch.save(ckpt, out)
    return out


def _net(ckpt, value):
    ckpt["hyper_parameters"]["net"]["class_path"] = value


@pytest.mark.parametrize("where, edit", [
    ("net.class_path", lambda c: _net(c, "evilmod.Net")),
    ("net.class_path", lambda c: _net(c, "subprocess.Popen")),
    ("loss.class_path", lambda c: c["hyper_parameters"].update(loss={"class_path": "evilmod.Net"})),
    ("net.init_args.norm.class_path",
     lambda c: c["hyper_parameters"]["net"]["init_args"].update(norm={"class_path": "evilmod.Net"})),
    ("_class_path", lambda c: c.update(datamodule_hyper_parameters={"_class_path": "evilmod.Net", "path": "x"})),
])
def test_untrusted_class_paths_are_refused_before_import(tmp_path, evil, where, edit):
    path = _checkpoint(tmp_path, edit)
    with pytest.raises(UserError, match=rf"\({where}\) names class '(evilmod\.Net|subprocess\.Popen)', outside"):
        restore_run(path)
    assert not evil.exists() and "evilmod" not in sys.modules


def test_optimizer_and_scheduler_named_by_a_checkpoint_are_not_rebuilt(tmp_path, evil):
    path = _checkpoint(tmp_path, lambda c: c["hyper_parameters"].update(
        optimizer={"class_path": "torch.optim.AdamW"},
        lr_scheduler={"class_path": "torch.optim.lr_scheduler.LambdaLR", "init_args": {"lr_lambda": "os.system"}}))
    run = restore_run(path, with_data=False)  # evaluation never steps an optimizer: nothing is built
    assert type(run.net).__name__ == "UNet"


def test_own_modules_are_trusted_through_the_environment(tmp_path, evil, monkeypatch):
    path = _checkpoint(tmp_path, lambda c: _net(c, "evilmod.Net"))
    monkeypatch.setenv(ENV, "someone.else, evilmod")
    run = restore_run(path, with_data=False)
    assert evil.read_text() == "imported" and type(run.net).__name__ == "UNet"


def test_prefixes_match_whole_segments(monkeypatch):
    monkeypatch.setenv(ENV, "mylab.nets")
    check_class_path("mylab.nets.deep.UNet3", "x")
    check_class_path("trainer.models.UNet", "x")
    for bad in ("mylab.netsevil.X", "trainer_evil.X", "mylab.X", "", None, 3):
        with pytest.raises(UserError, match="outside the modules a checkpoint may import"):
            check_class_path(bad, "x")


def test_structure_converters_outside_the_framework_are_refused(evil):
    from trainer.models.unet import UNet

    with pytest.raises(UserError, match="untrusted converter.*'evilmod.Conv'"):
        replay(UNet(**unet_kwargs()), [{"converter": "evilmod.Conv", "state": {}}])
    with pytest.raises(UserError, match="structural history is malformed"):
        replay(UNet(**unet_kwargs()), [{"converter": ["not", "a", "string"]}])
    assert not evil.exists()


def test_stored_recipe_alias_bomb_is_refused(tmp_path):
    from test_inputs import alias_bomb

    path = _checkpoint(tmp_path, lambda c: c.update(compressseg={"recipe": alias_bomb()}))
    with pytest.raises(UserError, match="stored recipe: YAML expands to more than"):
        restore_run(path, with_data=False)


def test_hyperparameters_that_are_not_a_mapping_are_one_line(tmp_path):
    path = _checkpoint(tmp_path, lambda c: c.update(hyper_parameters=["net"]))
    with pytest.raises(UserError, match="'hyper_parameters' is a list, not a mapping"):
        restore_run(path, with_data=False)
