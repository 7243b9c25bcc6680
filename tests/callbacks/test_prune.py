"""PruneRetrain in real (tiny) fits: rounds, optimizer rebuild, exact resume, composition, DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "prune"))

from prune_helpers import conv_out_channels, framework_checkpoint, make_module, tiny_unet, trained_unet, unet_kwargs  # noqa: E402
from tinydata import TinySegDataModule  # noqa: E402
from trainer.callbacks.prune import PruneRetrain  # noqa: E402
from trainer.callbacks.rng import RNGState  # noqa: E402
from trainer.checkpointing import load_checkpoint  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.structure import history  # noqa: E402

ROOT = TESTS.parent


def _data(**kw):
    return TinySegDataModule(**{"size": 16, "n_train": 4, "n_val": 2, "batch_size": 2, **kw})


def _fit(tmp_path, callbacks, max_epochs, module=None, ckpt_path=None, checkpoints=False, **trainer_kw):
    pl.seed_everything(0, verbose=False)
    module = module or make_module(tiny_unet(), scheduler=True)
    extra = [ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1,
                             enable_version_counter=False)] if checkpoints else []
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=[*callbacks, *extra],
                         logger=False, enable_checkpointing=checkpoints, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, **trainer_kw)
    trainer.fit(module, datamodule=_data(), ckpt_path=ckpt_path)
    return trainer, module


class StateProbe(pl.Callback):
    """Records optimizer facts at each epoch start (list it before or after PruneRetrain)."""

    def __init__(self):
        self.seen = {}

    def on_train_epoch_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        params = dict(pl_module.named_parameters())
        self.seen[trainer.current_epoch] = {
            "lr": opt.param_groups[0]["lr"],
            "same_params": [id(p) for g in opt.param_groups for p in g["params"]] == [id(p) for p in pl_module.parameters() if p.requires_grad],
            "state_fits": all(v.shape == p.shape for p in opt.state for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim()),
            "exp_avg": {n: opt.state[p]["exp_avg"].clone() for n, p in params.items() if p in opt.state},
        }


def test_rounds_prune_retrain_and_write_the_table(tmp_path):
    before, after = StateProbe(), StateProbe()
    cb = PruneRetrain(target_ratio=0.5, rounds=2, epochs_per_round=1, start_epoch=1, round_to=2, report_dir=str(tmp_path))
    trainer, module = _fit(tmp_path, [before, cb, after], max_epochs=3)
    widths = conv_out_channels(module.net)
    assert widths["encoders.0.0"] == 4 and widths["encoders.2.0"] == 16 and widths["head"] == 3 and widths["ds_heads.0"] == 3
    assert [r["round"] for r in cb.rows] == [0, 1, 2] and cb.rows[-1]["channels_fraction"] == pytest.approx(0.5)
    assert cb.rows[0]["params"] > 3 * cb.rows[-1]["params"] and cb.rows[0]["macs"] > 3 * cb.rows[-1]["macs"]
    assert all(r["dice"] == r["dice"] for r in cb.rows)  # Dice measured (not NaN) for every row
    classes = [k for k in cb.rows[-1] if k.startswith("dice_")]  # per class too: a round can wipe out one
    assert len(classes) == 2 and all(r[k] == r[k] for r in cb.rows for k in classes)
    table = (tmp_path / "prune_rounds.md").read_text()
    assert "| 2 | 2 | 0.5000 |" in table and (tmp_path / "prune_rounds.csv").exists()
    assert all(f"Dice {k.removeprefix('dice_')}" in table for k in classes)
    assert classes[0] in (tmp_path / "prune_rounds.csv").read_text().splitlines()[0]
    # the optimizer holds the new parameters and its Adam moments were cut to the kept channels
    for epoch in (1, 2):
        assert after.seen[epoch]["same_params"] and after.seen[epoch]["state_fits"]
        assert after.seen[epoch]["lr"] == before.seen[epoch]["lr"]  # no rewind: LR carried over
    plan = [e["state"] for e in history(module.net) if e["converter"].endswith("StructuredPrune")][0]
    keep_out, keep_in = plan["layers"]["encoders.1.0"]["out"]["keep"], plan["layers"]["encoders.1.0"]["in"]["keep"]
    old = before.seen[1]["exp_avg"]["net.encoders.1.0.weight"]
    assert torch.equal(after.seen[1]["exp_avg"]["net.encoders.1.0.weight"], old[keep_out][:, keep_in])


def test_lr_rewind_restarts_optimizer_and_schedule(tmp_path):
    probe = StateProbe()
    cb = PruneRetrain(target_ratio=0.5, rounds=1, start_epoch=2, rewind_lr=True)
    _fit(tmp_path, [cb, probe], max_epochs=3)
    assert probe.seen[1]["lr"] < 1e-2 and probe.seen[2]["lr"] == 1e-2  # cosine had decayed; rewound
    assert probe.seen[2]["exp_avg"] == {} and probe.seen[2]["same_params"]


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method", ["structured", "unstructured"])
def test_resume_mid_round_is_bitwise_exact(tmp_path, method):
    def callback():
        return PruneRetrain(method=method, target_ratio=0.5, rounds=2, epochs_per_round=2, start_epoch=1,
                            importance="taylor" if method == "structured" else "l1", taylor_batches=2, round_to=2,
                            make_permanent=False)

    _, full = _fit(tmp_path, [callback(), RNGState()], max_epochs=5, checkpoints=True)
    want = _weights(full)
    # epoch=1: inside round 1 (pruned, one retraining epoch left); epoch=2: round 2 prunes next
    for ckpt in ("epoch=1.ckpt", "epoch=2.ckpt"):
        path = tmp_path / "ckpt" / ckpt
        assert load_checkpoint(path)["callbacks"]  # weights_only load works
        cb, probe = callback(), StateProbe()
        _, resumed = _fit(tmp_path / ckpt, [cb, RNGState(), probe], max_epochs=5, ckpt_path=path)
        assert sorted(probe.seen) == list(range(int(ckpt[6]) + 1, 5))  # really resumed, not rerun
        got = _weights(resumed)
        assert got.keys() == want.keys()
        diff = [k for k in want if not torch.equal(got[k], want[k])]
        assert not diff, f"resumed from {ckpt}: {diff[:5]} differ"
        assert cb.rounds_done == 2


def test_unstructured_masks_made_permanent_at_the_end(tmp_path):
    cb = PruneRetrain(method="unstructured", target_ratio=0.6, rounds=2, epochs_per_round=1, schedule="cubic")
    _, module = _fit(tmp_path, [cb], max_epochs=2)
    assert not any(k.endswith(("_orig", "_mask")) for k in module.state_dict())
    assert [e["converter"].rsplit(".", 1)[1] for e in history(module.net)] == ["SparsityMasks", "SparsityPermanent"]
    assert cb.rows[-1]["weights_nonzero_fraction"] < 0.45  # 60% of prunable weights zeroed (heads dense)


def test_refused_under_deepspeed_zero3_and_fsdp():
    class DeepSpeedStrategy:  # stands in for Lightning's (the name and config are what is read)
        config = {"zero_optimization": {"stage": 3}}

    class FSDPStrategy:
        pass

    for strategy, method, match in [(DeepSpeedStrategy(), "structured", "ZeRO stage 3"),
                                    (DeepSpeedStrategy(), "unstructured", "ZeRO stage 3"),
                                    (FSDPStrategy(), "structured", "FSDPStrategy")]:
        with pytest.raises(UserError, match=match):
            PruneRetrain(method=method)._check_strategy(SimpleNamespace(strategy=strategy))


# ---------------------------------------------------------------------------- composition
def test_prune_then_qat_in_one_run_and_resume(tmp_path):
    from trainer.callbacks.qat import QuantizationAwareTraining
    from trainer.quant.modules import QuantLayer

    def callbacks():
        return [PruneRetrain(target_ratio=0.5, rounds=1, start_epoch=0, round_to=2),
                QuantizationAwareTraining(calibration="max", calib_batches=1)]

    _, module = _fit(tmp_path, callbacks(), max_epochs=2, checkpoints=True)
    net = module.net
    assert conv_out_channels(net)["encoders.1.0"] == 8 and isinstance(net.encoders[1][0], QuantLayer)
    assert net.encoders[1][0].weight_quant.scale.shape[0] == 8  # quantized after pruning
    assert [e["converter"].rsplit(".", 1)[1] for e in history(net)] == ["StructuredPrune", "FakeQuantConversion"]
    # resume: QAT's setup quantizes the fresh net, then the history replays prune -> quantize
    _, resumed = _fit(tmp_path / "r", callbacks(), max_epochs=2, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert conv_out_channels(resumed.net)["encoders.1.0"] == 8
    with pytest.raises(UserError, match=r"rounds are scheduled at epochs \[1\].*start_epoch: 0"):
        _fit(tmp_path / "e", [PruneRetrain(rounds=2, epochs_per_round=1), QuantizationAwareTraining(calib_batches=1)], max_epochs=1)
    with pytest.raises(UserError, match="must come before QuantizationAwareTraining"):
        _fit(tmp_path / "o", [QuantizationAwareTraining(calib_batches=1), PruneRetrain(rounds=1)], max_epochs=1)


def test_iterative_rounds_then_qat_from_its_start_epoch_in_one_run_resume_exactly(tmp_path):
    from trainer.callbacks.qat import QuantizationAwareTraining
    from trainer.quant.modules import QuantLayer

    def callbacks(probe=None):  # rounds at epochs 0 and 1, QAT from epoch 2
        return [PruneRetrain(target_ratio=0.5, rounds=2, epochs_per_round=1, round_to=2),
                QuantizationAwareTraining(calibration="max", calib_batches=1, start_epoch=2, freeze_bn_epoch=3),
                RNGState(), *([probe] if probe else [])]

    probe = StateProbe()
    _, full = _fit(tmp_path, callbacks(probe), max_epochs=4, checkpoints=True)
    net = full.net
    assert conv_out_channels(net)["encoders.1.0"] == 8 and isinstance(net.encoders[1][0], QuantLayer)
    assert net.encoders[1][0].weight_quant.scale.shape[0] == 8
    assert [e["converter"].rsplit(".", 1)[1] for e in history(net)] == ["StructuredPrune", "StructuredPrune",
                                                                       "FakeQuantConversion"]
    assert probe.seen[2]["same_params"] and probe.seen[2]["state_fits"]  # optimizer rebuilt around the quantized net
    want = _weights(full)
    # epoch=1: pruned twice, still float (QAT converts on resume at epoch 2); epoch=2: quantized
    for ckpt in ("epoch=1.ckpt", "epoch=2.ckpt"):
        _, resumed = _fit(tmp_path / ckpt, callbacks(), max_epochs=4, ckpt_path=tmp_path / "ckpt" / ckpt)
        got = _weights(resumed)
        assert got.keys() == want.keys(), f"resumed from {ckpt}: {sorted(set(got) ^ set(want))[:4]}"
        diff = [k for k in want if not torch.equal(got[k], want[k])]
        assert not diff, f"resumed from {ckpt}: {diff[:5]} differ"
    with pytest.raises(UserError, match="freeze_bn_epoch=1 is before start_epoch=2"):
        QuantizationAwareTraining(start_epoch=2, freeze_bn_epoch=1)


def test_distillation_from_the_unpruned_model_during_retraining(tmp_path):
    from trainer.callbacks.distill import Distillation

    kw = unet_kwargs()
    teacher = framework_checkpoint(tmp_path / "teacher.ckpt", trained_unet(), kw)
    logged = []

    class LossProbe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(float(trainer.callback_metrics["train/loss_kd"]))

    cb = PruneRetrain(target_ratio=0.5, rounds=2, epochs_per_round=1)
    distill = Distillation(teacher=str(teacher), kd_weight=1.0, kd_ds_weight=0.5)
    module = make_module(tiny_unet(seed=7), init_from=str(teacher))  # model.init_from: start from the teacher
    _, module = _fit(tmp_path, [cb, distill, LossProbe()], max_epochs=2, module=module)
    assert conv_out_channels(module.net)["encoders.1.0"] == 8
    assert len(logged) == 4 and all(v > 0 for v in logged)
    # round 1 pruned the teacher's own weights at setup: the student starts close to it
    assert logged[0] < 1.0


# ---------------------------------------------------------------------------- DDP (2 processes)
DDP_SCRIPT = r"""
import json, os, sys, torch, lightning.pytorch as pl
sys.path[:0] = [{tests!r}, {prune!r}]
from prune_helpers import make_module, tiny_unet
from tinydata import TinySegDataModule
from trainer.callbacks.prune import PruneRetrain
torch.set_num_threads(1)
pl.seed_everything(0, verbose=False)
module = make_module(tiny_unet())
# round 1 in setup (before DDP wraps: weights broadcast from rank 0), round 2 at epoch 1 (DDP rewrapped)
cb = PruneRetrain(target_ratio=0.5, rounds=2, epochs_per_round=1, start_epoch=0, importance=sys.argv[2], taylor_batches=2)
seen = {{}}

class Probe(pl.Callback):  # what DDP wraps while training, after the last round
    def on_train_epoch_end(self, trainer, pl_module):
        wrapper = trainer.strategy.model
        seen.update(wrapped=type(wrapper).__name__,
                    same=[id(p) for p in wrapper.parameters()] == [id(p) for p in pl_module.parameters()])

trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", callbacks=[cb, Probe()], logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, default_root_dir=sys.argv[1])
trainer.fit(module, datamodule=TinySegDataModule(size=16, n_train=8, n_val=2, batch_size=2))
flat = torch.cat([p.detach().flatten() for p in module.parameters()])
out = dict(rank=trainer.global_rank, **seen, params=flat.numel(),
           checksum=float(flat.double().sum()), first=flat[:8].tolist(), rounds=cb.rounds_done,
           opt_ok=[id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]] == [id(p) for p in module.parameters()])
open(os.path.join(sys.argv[1], f"rank{{trainer.global_rank}}.json"), "w").write(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("importance", ["taylor"])
def test_ddp_two_ranks_prune_identically_and_stay_in_sync(tmp_path, subprocess_env, importance):
    script = tmp_path / "ddp_prune.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS), prune=str(TESTS / "prune")))
    env = {**subprocess_env, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path), importance], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0, out[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["wrapped"] == "DistributedDataParallel" and r["same"] and r["rounds"] == 2 and r["opt_ok"]
    # each rank trained on its own shard after pruning: equal weights prove DDP synced the new parameters
    assert ranks[0]["params"] == ranks[1]["params"] and ranks[0]["first"] == ranks[1]["first"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


# ---------------------------------------------------------------------------- recipe
def test_recipe_smoke(tmp_path):
    """recipes/prune_unet2d.yaml, every key parsed: model.init_from a (tiny) teacher, three rounds
    with distillation from it, then restore_run of the result. Shrunk: net width, data, epochs."""
    import yaml

    from trainer.recipe_cli import run_lightning_cli
    from trainer.restore import restore_run

    recipe = yaml.safe_load((ROOT / "recipes" / "prune_unet2d.yaml").read_text())
    net_args = recipe["model"]["net"]["init_args"]
    net_args.update(base_channels=8, depth=2, ds_levels=1)
    teacher = framework_checkpoint(tmp_path / "teacher.ckpt", trained_unet(**{"classes": 5, "ds": True}), net_args)
    recipe["model"]["init_from"] = str(teacher)
    trainer = recipe["trainer"]
    trainer.update(max_epochs=4, limit_val_batches=1, num_sanity_val_steps=0, enable_progress_bar=False,
                   default_root_dir=str(tmp_path))  # moves every output: checkpoints/, logs/
    prune = trainer["callbacks"][1]["init_args"]
    prune.update(epochs_per_round=1)
    trainer["callbacks"][2]["init_args"]["teacher"] = str(teacher)
    recipe["data"]["init_args"].update(path=str(tmp_path / "phantom2d.h5"), num_workers=0, batch_size=2,
                                       patch_size=[32, 32], samples_per_epoch=4,
                                       generate={"cases": 3, "shape": [2, 64, 64], "seed": 0})
    path = tmp_path / "prune_unet2d.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cli = run_lightning_cli(["fit", "--config", str(path)])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, PruneRetrain))
    assert cb.rounds_done == 3 and [(r["round"], r["epoch"]) for r in cb.rows] == [(0, -1), (1, 0), (2, 1), (3, 2), (3, 3)]
    assert any(p.name == "prune_rounds.md" for p in tmp_path.rglob("prune_rounds.md"))
    run = restore_run(tmp_path / "checkpoints" / "last.ckpt", with_data=False)
    widths = conv_out_channels(run.net)
    assert widths["encoders.2.0"] == 16 and widths["encoders.1.0"] == 8 and widths["head"] == 5  # round_to 8


# ---------------------------------------------------------------------------- SIGKILL (scale-out harness)
@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_sigkill_mid_round_then_resume_is_bitwise_exact(tmp_path, devices):
    """Real SIGKILLs (whole process group) mid-epoch inside round 1 and inside round 2, then
    ``--ckpt_path last``; the final weights equal an uninterrupted run's bit for bit. Uses the
    scale-out harness (tests/distributed/scale_kit.py: resumable data, KillAt, launch)."""
    sys.path.insert(0, str(TESTS / "distributed"))
    import scale_kit as kit

    prune = {"class_path": "trainer.callbacks.prune.PruneRetrain",
             "init_args": {"target_ratio": 0.5, "rounds": 2, "epochs_per_round": 1, "start_epoch": 1,
                           "importance": "taylor", "taylor_batches": 2}}
    config = dict(devices=devices, net="unet_batch", max_steps=12 if devices == 1 else 6, n_train=8, val_every=None)
    log = tmp_path / "runs.log"
    ref = tmp_path / "ref"
    kit.write_recipe(ref / "recipe.yaml", kit.recipe(ref, callbacks=[prune], **config))
    kit.launch(["fit", "--config", str(ref / "recipe.yaml")], kit.env_with_kit(), log=log)

    # 1 rank: 4 batches per epoch, rounds prune at batches 4 and 8; 2 ranks: 2 per epoch, at 2 and 4
    kills = [(6, 0), (9, 1)] if devices == 1 else [(2, 0), (4, 1)]
    killers = [{"class_path": "scale_kit.KillAt", "init_args": {"phase": "batch_end", "batch": b, "attempt": a}}
               for b, a in kills]
    run = tmp_path / "run"
    kit.write_recipe(run / "recipe.yaml", kit.recipe(run, callbacks=[prune, *killers], **config))
    for attempt in range(len(kills) + 1):
        args = ["fit", "--config", str(run / "recipe.yaml")] + (["--ckpt_path", "last"] if attempt else [])
        done = kit.launch(args, kit.env_with_kit(SCALE_KIT_ATTEMPT=str(attempt)), check=False, log=log)
        assert done.returncode == (0 if attempt == len(kills) else -9), f"attempt {attempt}: see {log}\n{done.stdout[-3000:]}"
    kit.assert_bitwise_equal(kit.final_weights(ref), kit.final_weights(run), f"{devices} rank(s), kills {kills}")
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["callbacks"]["PruneRetrain"]["rounds_done"] == 2
    assert ckpt["state_dict"]["net.encoders.1.0.weight"].shape[0] == 4  # 8 -> 4 channels
