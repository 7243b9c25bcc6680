"""Runs many tiny fits in one 2-process job (``torchrun --standalone --nproc_per_node=2``).

    torchrun --standalone --nproc_per_node=2 tests/distributed/dist_driver.py OUT SCENARIO...

Each scenario goes through ``launch.py fit``'s own code path (``run_lightning_cli``) with a
recipe from ``scale_kit.recipe`` plus strategy fragments from ``recipes/strategy``; its
checkpoints land in ``OUT/<scenario>/checkpoints`` and rank 0 records every rank's loss per
batch in ``OUT/<scenario>/losses.jsonl``. Paying the start-up once for all scenarios keeps the
suite fast. A scenario that raises is recorded in ``OUT/<scenario>/error.txt`` and the next
one runs.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1]),
                str(Path(__file__).resolve().parents[2])]

import scale_kit as kit  # noqa: E402

FRAGMENTS = kit.ROOT / "recipes" / "strategy"
STEPS = 6


def scenarios(out: Path) -> dict[str, tuple[dict, list[str]]]:
    """name -> (scale_kit.recipe kwargs, extra CLI args)."""
    zero = lambda stage: ["--config", str(FRAGMENTS / f"deepspeed_zero{stage}.yaml")]  # noqa: E731
    ddp = ["--config", str(FRAGMENTS / "ddp.yaml")]
    tiny = dict(devices=2, max_steps=STEPS, val_every=None, ckpt_every=STEPS, keep=1, shuffle=False)
    parity = dict(tiny, net="unet_instance", batch_dice=False)
    teacher = out / "ddp_fp32" / "checkpoints" / "last.ckpt"
    distill = [{"class_path": "trainer.callbacks.distill.Distillation",
                "init_args": {"teacher": str(teacher), "kd_weight": 1.0, "temperature": 2.0}},
               {"class_path": "scale_kit.TeacherProbe", "init_args": {"path": str(out / "zero3_distill" / "teacher.json")}}]
    return {
        # DDP parity with one rank (the 1-rank references run in pytest). Instance norm: per
        # sample, so 2x2 samples == 1x4 samples. (SyncBatchNorm is the GPU alternative; torch's
        # DDP refuses it on CPU.) Batch norm without sync is the control that must differ.
        "ddp_bn_nosync": (dict(parity, net="unet_batch"), ddp),
        "ddp_fp32": (parity, ddp),
        # ZeRO vs DDP (ddp_fp32), fp32: bitwise
        "zero1_fp32": (parity, zero(1)),
        "zero2_fp32": (parity, zero(2)),
        "zero3_fp32": (parity, zero(3)),
        "zero3_offload_fp32": (parity, ["--config", str(FRAGMENTS / "deepspeed_zero3_offload.yaml")]),
        "zero0_fp32": (parity, zero(2) + ["--trainer.strategy.init_args.stage", "0"]),
        "zero0_bf16": (dict(parity, precision="bf16-mixed"), zero(2) + ["--trainer.strategy.init_args.stage", "0"]),
        # bf16 + accumulation, saved every step; then resumed from step 3
        "zero2_bf16_accum": (dict(parity, precision="bf16-mixed", accumulate=2, ckpt_every=1, keep=-1), zero(2)),
        "zero2_bf16_accum_resumed": (dict(parity, precision="bf16-mixed", accumulate=2, ckpt_every=1, keep=-1),
                                     zero(2) + ["--ckpt_path", str(out / "zero2_bf16_accum" / "checkpoints" / "step=0003.ckpt")]),
        "zero3_bf16_accum": (dict(parity, precision="bf16-mixed", accumulate=2), zero(3)),
        # a frozen teacher held by the distillation callback, student under ZeRO-3
        "zero3_distill": (dict(parity, callbacks=distill), zero(3)),
        **gpu_path_scenarios(out, tiny, zero, ddp),
    }


def gpu_path_scenarios(out: Path, tiny: dict, zero, ddp: list[str]) -> dict[str, tuple[dict, list[str]]]:
    """What a first multi-GPU run would have broken, run on CPU ranks over gloo
    (tests/distributed/test_dist_gpu_paths.py; ``OUT/teacher.ckpt`` is written by the test).
    DeepSpeed's bf16 casts the student's parameters and inputs to bf16 (16-mixed on GPUs does
    the same in fp16, which DeepSpeed refuses on CPUs)."""
    teacher = str(out / "teacher.ckpt")
    distill = {"class_path": "trainer.callbacks.distill.Distillation",
               "init_args": {"teacher": teacher, "kd_weight": 1.0,
                             "features": [{"student": "decoders.0", "teacher": "decoders.0", "weight": 1.0}]}}
    qat = lambda **kw: {"class_path": "trainer.callbacks.qat.QuantizationAwareTraining",  # noqa: E731
                        "init_args": {"calib_batches": 1, "calibration": "max", **kw}}
    prune = lambda **kw: {"class_path": "trainer.callbacks.prune.PruneRetrain", "init_args": kw}  # noqa: E731
    unet = dict(tiny, net="unet_instance", batch_dice=False)
    zero3_ckpt = out / "zero3_bf16_distill_qat" / "checkpoints" / "step=0003.ckpt"
    uneven = dict(unet, val_every=2, max_steps=4, precision="bf16-mixed")
    return {
        "zero2_bf16_distill_qat": (dict(unet, precision="bf16-mixed", callbacks=[qat(), distill]), zero(2)),
        "zero3_bf16_distill_qat": (dict(unet, precision="bf16-mixed", ckpt_every=1, keep=-1,
                                        callbacks=[qat(), distill]), zero(3)),
        "zero3_bf16_distill_qat_resumed": (dict(unet, precision="bf16-mixed", callbacks=[qat(), distill]),
                                           zero(3) + ["--ckpt_path", str(zero3_ckpt)]),
        "zero2_bf16_unstructured": (dict(unet, precision="bf16-mixed", callbacks=[prune(
            method="unstructured", target_ratio=0.5, rounds=2, epochs_per_round=1, report_dir=str(out / "prune"))]),
            zero(2)),
        "ddp_taylor_setup_round": (dict(unet, callbacks=[prune(target_ratio=0.5, rounds=1, importance="taylor",
                                                              taylor_batches=1, report_dir=str(out / "prune"))]), ddp),
        "ddp_lsq_frozen": (dict(unet, callbacks=[qat(learnable_scales=True, freeze_ranges_epoch=1)]), ddp),
        # last: a regression would hang every scenario after it
        "zero3_uneven_eval": (dict(uneven, data="uneven_val"), zero(3) + ["--model.roi_size", "[16, 16]"]),
    }


def main(out: Path, names: list[str]) -> None:
    from trainer.recipe_cli import run_lightning_cli

    rank = int(os.environ.get("RANK", "0"))
    table = scenarios(out)
    for name in names:
        kwargs, extra = table[name]
        run = out / name
        rec = {"class_path": "scale_kit.RecordLosses", "init_args": {"path": str(run / "losses.jsonl")}}
        recipe = kit.recipe(run, **dict(kwargs, callbacks=[*kwargs.get("callbacks", []), rec]))
        path = run / f"recipe.rank{rank}.yaml"
        kit.write_recipe(path, recipe)
        try:
            run_lightning_cli(["fit", "--config", str(path), *extra])
            (run / f"done.rank{rank}").write_text("ok")
        except BaseException:  # record and go on: one broken scenario must not hide the others
            (run / f"error.rank{rank}.txt").write_text(traceback.format_exc())
            if not isinstance(sys.exc_info()[1], Exception):
                raise


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
