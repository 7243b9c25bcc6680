"""Distillation test fixtures: subprocess environments pinned to one OpenMP thread."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # distill_testing


@pytest.fixture
def one_thread_env(subprocess_env) -> dict[str, str]:
    return {**subprocess_env, "OMP_NUM_THREADS": "1"}
