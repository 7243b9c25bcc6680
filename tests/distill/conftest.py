"""Distillation tests run torch on one thread: on a shared 2-core machine, two OpenMP threads
stall at every barrier while another process holds a core (tiny steps ran 5-10x slower)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # distill_testing


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread_env(subprocess_env) -> dict[str, str]:
    return {**subprocess_env, "OMP_NUM_THREADS": "1"}
