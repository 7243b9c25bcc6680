"""Shared fixtures. ``tests/`` is on sys.path, so ``import tinydata`` works in every test."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for ``launch.py`` subprocesses: repo and tests/ importable, quiet, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env["WANDB_MODE"] = "offline"
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op torch thread in the test process: on a shared 2-core machine two OpenMP
    threads stall at every barrier while another process holds a core (tiny steps ran 5-10x
    slower). Subprocesses set their own (``OMP_NUM_THREADS``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests skip, with the reason, where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    reason = f"needs CUDA: torch {torch.__version__} sees no CUDA device"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
