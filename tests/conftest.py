"""Shared fixtures. ``tests/`` is on sys.path, so ``import tinydata`` works in every test."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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
