"""Two real processes (torchrun, gloo): each sample of an epoch reaches exactly one rank/worker."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _one_process_scores(path: str, dims: int) -> dict:
    from ddp_data_worker import rolled_scores

    from datamodules.hdf5 import HDF5SegDataModule
    from datamodules.tfrecord import TFRecordSegDataModule

    cls = HDF5SegDataModule if path.endswith(".h5") else TFRecordSegDataModule
    dm = cls(path, dims, [16] * dims, batch_size=3, num_workers=0, val_fraction=0.4)
    dm.setup()
    return rolled_scores(dm, dm.make_dataloader("val"))


@pytest.mark.slow  # ~30 s on 2 cores, mostly two processes importing torch + lightning
def test_torchrun_two_ranks_two_workers_each_sample_once(data_files, tmp_path):
    specs = [f"{data_files['h5', 2]}:2", f"{data_files['tfrecord.gz', 3]}:3", f"{tmp_path / 'phantom_fresh.h5'}:2"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_data_worker.py"), str(tmp_path), *specs]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["world_size"] for r in ranks} == {2} and {r["rank"] for r in ranks} == {0, 1}
    for spec in specs:
        per_rank = [r["results"][spec] for r in ranks]
        n_train, n_val = per_rank[0]["n_train"], per_rank[0]["n_val"]
        assert n_train == 18  # 17 rounded up to world_size * batch_size
        assert sorted(per_rank[0]["train"] + per_rank[1]["train"]) == list(range(n_train)), spec
        assert per_rank[0]["train_steps"] == per_rank[1]["train_steps"] == 3
        assert sorted(per_rank[0]["val"] + per_rank[1]["val"]) == list(range(n_val)), spec
        # evaluation is sharded by whole case, and the metric summed over ranks equals one process's
        scored = [r["scores"] for r in per_rank]
        assert not set(scored[0]["cases"]) & set(scored[1]["cases"]) and scored[0]["partial"] == 0, spec
        path, dims = spec.rsplit(":", 1)
        alone = _one_process_scores(path, int(dims))
        for key in ("n_cases", "mean_dice", "mean_hd95"):
            assert scored[0][key] == scored[1][key] == pytest.approx(alone[key]), (spec, key)
    assert (tmp_path / "phantom_fresh.h5").is_file()  # generated once by local rank 0, read by both
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
