"""Collectives stage their tensors on the backend's device (trainer/collectives.py).

NCCL rejects a CPU tensor; gloo takes it, so a CPU run cannot show the defect directly. Here
the strategy's root device is torch's ``lazy`` device (a real second device on a CPU-only
machine) and the process-group calls are replaced by a strict stand-in that, like NCCL,
refuses any tensor not on that device. The callbacks' collectives then fail exactly where
they would on GPUs: in ``setup`` the network is still on the CPU.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from lazy_device import lazy_device
from tinydata import TinySegDataModule
from trainer import collectives
from trainer.callbacks.prune import PruneRetrain
from trainer.models import UNet
from trainer.module import SegmentationModule

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def lazy() -> torch.device:
    device = lazy_device()
    if device is None:
        pytest.skip("this torch build has no lazy device")
    return device


class StrictComm:
    """Process-group calls of a 2-rank job that accept only tensors on ``device`` (as NCCL
    accepts only this rank's GPU); rank 1's values are ``rank1`` (for reductions)."""

    def __init__(self, device: torch.device):
        self.device, self.calls = device, []

    def _check(self, op: str, tensor: torch.Tensor) -> None:
        self.calls.append((op, tensor.device))
        if tensor.device != self.device:
            raise RuntimeError(f"{op}: tensor on {tensor.device}, the backend takes only {self.device} tensors")

    def broadcast(self, tensor, src=0, **_):
        self._check("broadcast", tensor)

    def all_reduce(self, tensor, op=None, **_):
        self._check("all_reduce", tensor)
        tensor.mul_(2)  # rank 1 holds the same value

    def reduce(self, tensor, reduce_op="sum", **_):  # Lightning's strategy.reduce
        self._check("reduce", tensor)
        return tensor * 2 if reduce_op == "sum" else tensor

    def all_gather(self, tensor, **_):
        self._check("all_gather", tensor)
        return torch.stack([tensor, tensor])


@pytest.fixture
def comm(lazy, monkeypatch) -> StrictComm:
    strict = StrictComm(lazy)
    monkeypatch.setattr(collectives, "distributed", lambda trainer: True)  # a process group "exists"
    monkeypatch.setattr(dist, "broadcast", strict.broadcast)
    monkeypatch.setattr(dist, "all_reduce", strict.all_reduce)
    return strict


def _trainer(comm: StrictComm, **extra):
    strategy = SimpleNamespace(root_device=comm.device, reduce=comm.reduce, all_gather=comm.all_gather)
    return SimpleNamespace(strategy=strategy, world_size=2, local_rank=0, optimizers=[], precision_plugin=None, **extra)


def test_helpers_stage_on_the_comm_device_and_hand_back_on_the_tensors_own(comm):
    trainer = _trainer(comm)
    weights = [torch.ones(3), torch.arange(4)]
    collectives.broadcast_(trainer, weights)
    assert [op for op, _ in comm.calls] == ["broadcast", "broadcast"]  # one per dtype
    assert weights[0].device.type == "cpu" and torch.equal(weights[1], torch.arange(4))
    total = collectives.reduce(trainer, torch.full((2,), 3.0), "sum")
    assert total.device.type == "cpu" and torch.equal(total, torch.full((2,), 6.0))
    assert collectives.reduce(trainer, torch.tensor([5]), "max").item() == 10  # the stand-in doubles
    assert collectives.digest_agrees(trainer, "plan")


def test_prune_setup_round_sends_no_cpu_tensor_to_the_backend(comm, monkeypatch):
    """PruneRetrain's epoch-0 round (``start_epoch: 0``, Taylor scores) runs in ``setup``, where
    the module is still on the CPU: the broadcast of rank 0's weights, the sum of the Taylor
    gradients and the check that ranks agree all went to NCCL as CPU tensors."""
    moved = []
    monkeypatch.setattr(SegmentationModule, "to", lambda self, device: moved.append(device) or self)
    module = SegmentationModule(UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4), num_classes=3)
    dm = TinySegDataModule(n_train=4, n_val=2, batch_size=2, size=16)
    trainer = _trainer(comm, datamodule=dm, callbacks=[], ckpt_path=None, current_epoch=0, loggers=[],
                       callback_metrics={}, global_step=0, is_global_zero=True, log_dir=None,
                       default_root_dir=None)
    prune = PruneRetrain(target_ratio=0.5, rounds=1, importance="taylor", taylor_batches=1, report_dir="unused")
    trainer.callbacks.append(prune)
    monkeypatch.setattr("trainer.callbacks.prune.write_table", lambda rows, directory: None)
    prune.setup(trainer, module, "fit")
    assert prune.rounds_done == 1
    assert moved == [comm.device]  # the module goes to the strategy's device before the round
    ops = {op for op, _ in comm.calls}
    assert {"broadcast", "reduce", "all_gather"} <= ops
    assert all(device == comm.device for _, device in comm.calls)


def test_node_local_result_runs_once_per_node_over_gloo(tmp_path):
    """Two real ranks over gloo (one node): only local rank 0 computes; both get its result."""
    import subprocess

    script = tmp_path / "two_ranks.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(TESTS.parent)!r})\n"
        "import torch.distributed as dist\n"
        "from types import SimpleNamespace\n"
        "from trainer import collectives\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "trainer = SimpleNamespace(world_size=2, local_rank=int(os.environ['LOCAL_RANK']))\n"
        "calls = []\n"
        "value = collectives.node_local_result(trainer, lambda: calls.append(rank) or 'digest', 'test file')\n"
        f"open({str(tmp_path)!r} + f'/rank{{rank}}.txt', 'w').write(f'{{value}} {{len(calls)}}')\n"
        "dist.destroy_process_group()\n"
    )
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "rank0.txt").read_text() == "digest 1"
    assert (tmp_path / "rank1.txt").read_text() == "digest 0"


@pytest.mark.gpu
def test_helpers_take_cpu_tensors_over_real_nccl(tmp_path):
    """On GPUs: NCCL itself refuses the CPU tensor, the helpers stage it on the rank's GPU."""
    import subprocess

    ranks = min(2, torch.cuda.device_count())
    script = tmp_path / "nccl_ranks.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(TESTS.parent)!r})\n"
        "import torch.distributed as dist\n"
        "from types import SimpleNamespace\n"
        "from trainer import collectives\n"
        "local = int(os.environ['LOCAL_RANK']); torch.cuda.set_device(local)\n"
        "dist.init_process_group('nccl')\n"
        "strategy = SimpleNamespace(root_device=torch.device('cuda', local),\n"
        "                           reduce=lambda t, reduce_op: (dist.all_reduce(t), t)[1])\n"
        "trainer = SimpleNamespace(world_size=dist.get_world_size(), local_rank=local, strategy=strategy)\n"
        "try:\n"
        "    dist.broadcast(torch.ones(2), src=0); raw = 'accepted'\n"
        "except Exception as exc:\n"
        "    raw = 'refused'\n"
        "w = torch.full((3,), float(dist.get_rank() + 1)); collectives.broadcast_(trainer, [w])\n"
        "s = collectives.reduce(trainer, torch.ones(2), 'sum')\n"
        f"open({str(tmp_path)!r} + f'/rank{{dist.get_rank()}}.txt', 'w').write(f'{{raw}} {{w.tolist()}} {{s.device}} {{s.tolist()}}')\n"
        "dist.destroy_process_group()\n"
    )
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in range(ranks):
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"refused [1.0, 1.0, 1.0] cpu [{float(ranks)}, {float(ranks)}]"
