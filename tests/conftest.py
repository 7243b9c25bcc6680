"""Shared fixtures. ``tests/`` is on sys.path, so ``import tinydata`` works in every test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
os.environ.setdefault("WANDB_MODE", "offline")
# The tests' own datamodules and nets live in tests/ (tinydata, scale_kit): checkpoints that
# name them may be restored (trainer/trust.py); subprocesses inherit this.
os.environ.setdefault("COMPRESSSEG_TRUSTED_MODULES", "tinydata,scale_kit")


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


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Node caches and content-check markers go to a per-session temp dir, never to the
    user's /tmp cache (subprocesses inherit it through the environment)."""
    old = os.environ.get("COMPRESSSEG_CACHE_DIR")
    os.environ["COMPRESSSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("COMPRESSSEG_CACHE_DIR", None)
    else:
        os.environ["COMPRESSSEG_CACHE_DIR"] = old


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody can write into, root included: a read-only tmpfs mounted there when the
    tests run as root (permissions do not stop root), mode 0555 otherwise."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"running as root without permission to mount a read-only tmpfs: {done.stderr.decode()[:200]}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests skip, with the reason, where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    reason = f"needs CUDA: torch {torch.__version__} sees no CUDA device"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
