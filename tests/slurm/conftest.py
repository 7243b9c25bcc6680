"""The local SLURM cluster (session-scoped): slurm/localcluster.py, started once, stopped after.

Skips with a reason where Slurm cannot be had (not root and not installed, no apt, apt
unreachable); on CI (``CI=true``) as root it must start, so failing to is a test failure.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_localcluster():
    spec = importlib.util.spec_from_file_location("compressseg_localcluster", ROOT / "slurm" / "localcluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cluster(root: Path, **kwargs):
    """A started LocalCluster under ``root`` (generator: stopped after), or skip/fail."""
    localcluster = load_localcluster()
    must_run = os.environ.get("CI", "").lower() == "true" and os.geteuid() == 0
    reason = localcluster.ensure_installed(log=root / "apt.log")
    if reason:
        (pytest.fail if must_run else pytest.skip)(f"no local SLURM cluster: {reason}")
    cluster = localcluster.LocalCluster(root, **kwargs)
    try:
        cluster.start()
    except Exception as exc:  # noqa: BLE001 - any start failure means: no cluster here
        cluster.stop()
        (pytest.fail if must_run else pytest.skip)(f"local SLURM cluster did not start: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    # 8 CPUs a node (more than the machine has: config_overrides) so a module's jobs run side by side
    yield from _cluster(tmp_path_factory.mktemp("slurm_cluster"), cpus_per_node=8)


@pytest.fixture(scope="module")
def four_cpu_node(tmp_path_factory):
    """A second, one-node cluster whose node has 4 CPUs (room for 2 tasks x 2 CPUs)."""
    yield from _cluster(tmp_path_factory.mktemp("slurm_4cpu"), nodes=1, cpus_per_node=4)
