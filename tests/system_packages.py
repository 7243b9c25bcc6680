"""Debian packages some tests need (qemu-user for emulated CPUs), installed on first use.

On CI (``CI=true``, root) a missing package is a failure; elsewhere the test is skipped with the
reason. The Slurm harness (``slurm/localcluster.py``) has its own installer: it also runs as a
standalone script outside the tests.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def ensure(binaries: tuple[str, ...], packages: tuple[str, ...], log: Path) -> None:
    """Make ``binaries`` available (``apt-get install packages``) or fail/skip naming why."""
    reason = _install(binaries, packages, log)
    if reason:
        must = os.environ.get("CI", "").lower() == "true" and os.geteuid() == 0
        (pytest.fail if must else pytest.skip)(f"{', '.join(binaries)} unavailable: {reason}")


def _install(binaries: tuple[str, ...], packages: tuple[str, ...], log: Path) -> str | None:
    if all(shutil.which(b) for b in binaries):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"not installed, and cannot apt-get install {' '.join(packages)} (not root or no apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with open(log, "a") as out:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
            try:
                if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600).returncode:
                    return f"`{' '.join(cmd)}` failed; see {log}"
            except subprocess.TimeoutExpired:
                return f"`{' '.join(cmd)}` timed out"
    missing = [b for b in binaries if not shutil.which(b)]
    return f"still missing after install: {missing}" if missing else None
