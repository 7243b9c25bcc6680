"""Careless and hostile recipes, overrides and --ckpt_path values: one line, exit 2, nothing left.

Most cases run ``launch.py``'s dispatcher in-process (``hostile.run_cli``); the shipped-recipe
case and the checkpoint-trust case run the real script.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hostile import launch, make_fifo, one_line_error, run_cli, tree, written
from test_inputs import alias_bomb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fit_cli import ROOT, tiny_recipe  # noqa: E402


def _edit(recipe: Path, fn) -> Path:
    data = yaml.safe_load(recipe.read_text())
    fn(data)
    recipe.write_text(yaml.safe_dump(data))
    return recipe


def _fit(recipe: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(["fit", "--config", str(recipe), *extra])


# ------------------------------------------------------------------ the class count, once
def test_class_count_is_set_once_in_model_num_classes(tmp_path):
    recipe = _edit(tiny_recipe(tmp_path), lambda d: d["model"]["net"]["init_args"].pop("num_classes"))
    code, _, err = _fit(recipe)
    assert code == 0, err[-2000:]
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["net"]["init_args"]["num_classes"] == 3  # the net got model.num_classes
    assert ckpt["state_dict"]["net.head.weight"].shape[0] == 3


def test_class_count_given_only_on_the_net_is_taken(tmp_path):
    recipe = _edit(tiny_recipe(tmp_path), lambda d: d["model"].pop("num_classes"))
    code, _, err = _fit(recipe, "--trainer.max_epochs", "1")
    assert code == 0, err[-2000:]
    assert torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]["num_classes"] == 3


def test_two_different_class_counts_are_one_line(tmp_path):
    recipe = tiny_recipe(tmp_path)
    code, _, err = _fit(recipe, "--model.net.init_args.num_classes", "4")
    one_line_error(code, err, "model.num_classes=3", "model.net.init_args.num_classes=4", "set the class count once")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ constructors and Lightning refusing values
def _loss_weights_zero(d):
    d["model"]["loss"] = {"class_path": "trainer.losses.DiceCE", "init_args": {"dice_weight": 0.0, "ce_weight": 0.0}}


def _requeue_filename(d):
    d["trainer"]["callbacks"].append({"class_path": "trainer.callbacks.requeue.RequeueOnSignal",
                                      "init_args": {"filename": "../../escape.pt"}})


def _cosine_zero(d):
    d["model"]["lr_scheduler"] = {"class_path": "trainer.schedules.CosineAnnealingLR", "init_args": {"T_max": 0}}


def _monitor_typo(d):
    d["trainer"]["callbacks"][0]["init_args"]["monitor"] = "val/dcie"


@pytest.mark.parametrize("edit, extra, needles", [
    (None, ["--trainer.max_epochs", "-5"], ["max_epochs", "-5"]),
    (None, ["--model.net.init_args.depth", "0"], ["UNet.__init__ refused its arguments", "depth=0"]),
    (None, ["--model.net.init_args.ds_levels", "7"], ["UNet.__init__", "ds_levels=7"]),
    (None, ["--model.optimizer.init_args.lr", "-1"], ["model.optimizer", "Invalid learning rate"]),
    (_loss_weights_zero, [], ["DiceCE.__init__", "dice_weight=0.0"]),
    (_requeue_filename, [], ["RequeueOnSignal.__init__", "../../escape.pt"]),
    (_cosine_zero, [], ["model.lr_scheduler", "T_max=0"]),
])
def test_refused_recipe_values_are_one_line_and_leave_no_run_folder(tmp_path, edit, extra, needles):
    recipe = tiny_recipe(tmp_path)
    if edit is not None:
        _edit(recipe, edit)
    code, _, err = _fit(recipe, *extra)
    one_line_error(code, err, *needles)
    assert tree(tmp_path / "run") == [], "a failed run left folders behind"


def test_monitor_typo_is_one_line_after_the_first_validation(tmp_path):
    recipe = _edit(tiny_recipe(tmp_path), _monitor_typo)
    one_line_error(*_fit(recipe)[::2], "val/dcie")  # Lightning's MisconfigurationException, in one line
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # its logged metrics stay: a record of what ran


def test_a_failed_rerun_leaves_no_new_log_version(tmp_path):
    recipe = tiny_recipe(tmp_path)
    assert _fit(recipe)[0] == 0
    before = tree(tmp_path / "run")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    one_line_error(*_fit(recipe, "--ckpt_path", str(empty))[::2], "empty file")
    assert tree(tmp_path / "run") == before  # no lightning_logs/version_1 holding a config.yaml


# ------------------------------------------------------------------ recipe files that are not recipes
@pytest.mark.timeout(120)
def test_alias_bomb_recipe_and_override_are_refused(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    one_line_error(*_fit(bomb)[::2], f"recipe {bomb}", "through its aliases")
    recipe = tiny_recipe(tmp_path)
    one_line_error(*_fit(recipe, "--model.class_names", alias_bomb())[::2], "through its aliases")


@pytest.mark.timeout(120)
def test_recipe_that_is_a_fifo_directory_or_device_is_named(tmp_path):
    fifo = make_fifo(tmp_path / "recipe.yaml")
    one_line_error(*_fit(fifo)[::2], "is a FIFO")  # opening it would block forever
    one_line_error(*_fit(tmp_path)[::2], "is a directory")
    one_line_error(*run_cli(["fit", "--config", "/dev/zero"])[::2], "device file")


# ------------------------------------------------------------------ --ckpt_path
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    recipe = tiny_recipe(tmp)
    code, _, err = _fit(recipe)
    assert code == 0, err[-2000:]
    return recipe, tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("make, words", [
    (lambda d, good: d / "none.ckpt", "does not exist"),
    (lambda d, good: written(d / "zero.ckpt", b""), "empty file"),
    (lambda d, good: written(d / "half.ckpt", good.read_bytes()[: good.stat().st_size // 2]), "truncated"),
    (lambda d, good: written(d / "text.ckpt", b"not a checkpoint at all"), "not a torch.save file"),
    (lambda d, good: (d / "dir.ckpt").mkdir() or d / "dir.ckpt", "latest"),
    (lambda d, good: make_fifo(d / "fifo.ckpt"), "FIFO"),
])
@pytest.mark.timeout(300)
def test_explicit_ckpt_path_is_checked_before_lightning_reads_it(tmp_path, trained, make, words):
    recipe, good = trained
    bad = make(tmp_path, good)
    code, _, err = run_cli(["fit", "--config", str(recipe), "--trainer.default_root_dir", str(tmp_path / "r"),
                            "--ckpt_path", str(bad)])
    one_line_error(code, err, str(bad), words)


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_checkpoint_of_another_architecture_does_not_replace_the_recipes_network(tmp_path, trained, command):
    recipe, good = trained
    code, _, err = run_cli([command, "--config", str(recipe), "--model.net.init_args.base_channels", "6",
                            "--trainer.default_root_dir", str(tmp_path / "r"), "--ckpt_path", str(good)])
    one_line_error(code, err, "does not fit this recipe's UNet", "shapes differ", "'base_channels': 4",
                   "model.init_from")


def test_init_from_and_teacher_that_are_not_checkpoints_are_one_line(tmp_path):
    recipe = tiny_recipe(tmp_path)
    zero = written(tmp_path / "zero.ckpt", b"")
    one_line_error(*_fit(recipe, "--model.init_from", str(zero))[::2], "zero.ckpt", "empty file")
    fifo = make_fifo(tmp_path / "teacher.ckpt")
    _edit(recipe, lambda d: d["trainer"]["callbacks"].append(
        {"class_path": "trainer.callbacks.distill.Distillation", "init_args": {"teacher": str(fifo)}}))
    one_line_error(*_fit(recipe)[::2], "teacher checkpoint", "FIFO")
    assert tree(tmp_path / "run") == []


def test_resumed_run_with_a_longer_max_epochs_stretches_the_schedule(tmp_path):
    recipe = _edit(tiny_recipe(tmp_path, epochs=1), lambda d: d["model"].update(
        lr_scheduler={"class_path": "trainer.schedules.CosineAnnealingLR", "init_args": {"eta_min": 0.0}}))
    assert _fit(recipe)[0] == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["lr_schedulers"][0]["T_max"] == 1
    code, _, err = _fit(recipe, "--trainer.max_epochs", "3", "--ckpt_path", "last")
    assert code == 0, err[-2000:]
    state = torch.load(last, weights_only=True)["lr_schedulers"][0]
    assert state["T_max"] == 3 and state["last_epoch"] == 3
    assert state["_last_lr"][0] == pytest.approx(0.0, abs=1e-9)  # annealed to eta_min at the new end


def test_nan_loss_stops_the_run_and_every_checkpoint_stays_finite(tmp_path):
    recipe = tiny_recipe(tmp_path, epochs=4)
    code, _, err = _fit(recipe, "--model.optimizer.init_args.lr", "1e30")  # weights blow up after step 0
    one_line_error(code, err, "training loss is not finite", "no checkpoint written for it")
    for ckpt in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        weights = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point()), ckpt


def test_weights_that_overflowed_are_never_saved():
    from trainer.errors import UserError
    from trainer.models.unet import UNet
    from trainer.module import SegmentationModule

    module = SegmentationModule(UNet(num_classes=2, depth=1, base_channels=2), num_classes=2)
    with torch.no_grad():
        module.net.head.weight[0, 0] = math.inf
    with pytest.raises(UserError, match="network weight 'head.weight' holds NaN/Inf values"):
        module.on_save_checkpoint({})


# ------------------------------------------------------------------ shipped recipes on the user's path (subprocess)
@pytest.mark.slow
def test_shipped_recipe_one_run_dir_moves_everything_and_the_schedule_follows_max_epochs(tmp_path, subprocess_env):
    """recipes/unet2d_phantom.yaml reused on other data from the command line, as a new user
    would: one --trainer.default_root_dir moves checkpoints and logs (the phantom run's
    best/last.ckpt are not touched), --trainer.max_epochs alone shortens the cosine, and a
    typo'd data.path does not generate a phantom under the typo'd name."""
    shipped = ROOT / "runs" / "unet2d_phantom"
    before = {p: p.stat().st_mtime_ns for p in shipped.rglob("*")} if shipped.exists() else {}
    small = ["--model.net.init_args.base_channels", "4", "--model.net.init_args.depth", "2",
             "--model.net.init_args.ds_levels", "1", "--data.init_args.num_workers", "0",
             "--data.init_args.samples_per_epoch", "8", "--data.init_args.batch_size", "4",
             "--data.init_args.patch_size", "[32, 32]", "--trainer.limit_val_batches", "2",
             "--data.init_args.generate", "{cases: 5, shape: [4, 32, 32], seed: 0}"]
    data = tmp_path / "phantom_small.h5"
    code, _, err = launch(["fit", "--config", "recipes/unet2d_phantom.yaml", *small, "--data.init_args.path", str(data),
                           "--trainer.default_root_dir", str(tmp_path / "mine"), "--trainer.max_epochs", "2"],
                          subprocess_env)
    assert code == 0, err[-3000:]
    assert {p.name for p in (tmp_path / "mine" / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert list((tmp_path / "mine" / "logs").rglob("metrics.csv"))
    ckpt = torch.load(tmp_path / "mine" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lr_schedulers"][0]["T_max"] == 2  # in step with --trainer.max_epochs 2
    after = {p: p.stat().st_mtime_ns for p in shipped.rglob("*")} if shipped.exists() else {}
    assert after == before, "the phantom run's outputs were touched"
    # a typo in data.path with the recipe's generate: block left in
    typo = tmp_path / "my_scans.h5"
    code, _, err = launch(["fit", "--config", "recipes/unet2d_phantom.yaml", *small, "--data.init_args.path", str(typo),
                           "--trainer.default_root_dir", str(tmp_path / "typo")], subprocess_env)
    one_line_error(code, err, str(typo), "does not exist", "only creates phantom data")
    assert not typo.exists() and not (tmp_path / "typo").exists()


@pytest.mark.slow
def test_resume_never_imports_what_the_checkpoint_names(tmp_path, subprocess_env):
    """A checkpoint whose hyper_parameters name a hostile class: ``fit --ckpt_path`` builds the
    recipe's network, checks the weights fit it, resumes, and never imports the module."""
    recipe = tiny_recipe(tmp_path, epochs=1)
    code, _, err = launch(["fit", "--config", str(recipe)], subprocess_env)
    assert code == 0, err[-2000:]
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["net"]["class_path"] = "evilmod.Net"
    hostile = tmp_path / "hostile.ckpt"
    torch.save(ckpt, hostile)
    marker = tmp_path / "imported.txt"
    (tmp_path / "evilmod.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n")
    env = {**subprocess_env, "PYTHONPATH": f"{tmp_path}:{subprocess_env['PYTHONPATH']}"}
    code, _, err = launch(["fit", "--config", str(recipe), "--trainer.max_epochs", "2", "--ckpt_path", str(hostile)], env)
    assert code == 0, err[-2000:]
    assert not marker.exists()
    assert torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["epoch"] == 1
