"""One rank of the 2-rank DDP distillation test; run by torchrun (see test_distill_ddp.py).

Usage: ``torchrun --standalone --nproc_per_node=2 ddp_distill_worker.py TEACHER OUT_JSON``.
Rank 0 writes what the test checks: adapters identical on both ranks after training (DDP
synchronised their gradients), the teacher outside the DDP-wrapped module, finite losses.
The last batch of each rank holds only unlabelled samples (supervised loss 0, distillation
terms as usual), which DDP must get through like any other.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinydata import TinySegDataModule  # noqa: E402
from trainer.callbacks.distill import Distillation  # noqa: E402
from trainer.models.unet import UNet  # noqa: E402
from trainer.module import SegmentationModule  # noqa: E402


def main(teacher: str, out: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    cb = Distillation(teacher=teacher, features=[{"student": "decoders.1", "teacher": "decoders.1", "weight": 0.5}],
                      affinity=[{"student": "encoders.2", "teacher": "encoders.2"}])
    student = SegmentationModule(UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4, deep_supervision=True,
                                      ds_levels=1), num_classes=3)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, callbacks=[cb],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    # 12 items, rank r takes items r, r+2, ...: batches of 2, the third one unlabelled on both
    trainer.fit(student, datamodule=TinySegDataModule(size=16, n_train=8, n_unlabelled=4, batch_size=2))
    adapter = student.distill_adapters["feat_decoders_1"].weight.detach().flatten()
    gathered = [torch.zeros_like(adapter) for _ in range(2)]
    dist.all_gather(gathered, adapter)
    wrapped = {id(p) for p in trainer.strategy.model.parameters()}
    result = {
        "adapters_equal": bool(torch.equal(gathered[0], gathered[1])),
        "adapter_in_ddp": all(id(p) in wrapped for p in student.distill_adapters.parameters()),
        "teacher_in_ddp": any(id(p) in wrapped for p in cb.teacher.parameters()),
        "teacher_grads": any(p.grad is not None for p in cb.teacher.parameters()),
        "losses": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/loss_")},
        "world_size": trainer.world_size,
    }
    if trainer.global_rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    # an un-destroyed gloo group aborts the interpreter at exit now and then
    # ("terminate called without an active exception", exit -6)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
