"""Bootstrap of the project's virtual environment. Standard library only.

``python3 launch.py main`` and ``python3 launch.py test`` must work on a fresh machine with
nothing installed: they create ``.venv`` next to ``launch.py``, install the package with its
extras, and re-execute themselves inside it. On machines without an NVIDIA driver the
install is pinned to the CPU build ``torch==2.13.0`` through a constraints file, because an
unpinned torch resolves to a multi-GB CUDA build. pyproject keeps a torch *range* for GPU users.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("COMPRESSSEG_VENV", ROOT / ".venv"))
CPU_TORCH_PIN = "torch==2.13.0"
EXTRAS = "dev,deepspeed"


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def in_project_env() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def _has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


# Installed without their declared dependencies: dynamic-network-architectures (nnU-Net's
# networks, for nnU-Net teachers) requires timm, which pulls a torchvision wheel built for
# another torch; with the CPU torch its C extension fails to load and breaks torchmetrics'
# import. Its U-Nets need only torch, numpy and einops.
NO_DEPS = ("dynamic-network-architectures>=0.4", "einops")


def _stamp() -> str:
    pin = "" if _has_nvidia_gpu() else CPU_TORCH_PIN
    text = (ROOT / "pyproject.toml").read_bytes() + f"{EXTRAS}|{pin}|{','.join(NO_DEPS)}".encode()
    return hashlib.sha256(text).hexdigest()


def ensure_env() -> None:
    """Create/update ``.venv`` if needed and re-exec this command inside it."""
    if in_project_env():
        return
    stamp_file = VENV / ".compressseg-installed"
    if not _venv_python().exists():
        print(f"[setup] creating {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if not stamp_file.exists() or stamp_file.read_text() != _stamp():
        _install()
        stamp_file.write_text(_stamp())
    os.execv(str(_venv_python()), [str(_venv_python()), *sys.argv])


def _install() -> None:
    cmd = [str(_venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as cons:
        if not _has_nvidia_gpu():
            cons.write(CPU_TORCH_PIN + "\n")
    cmd += ["-c", cons.name, "-e", f"{ROOT}[{EXTRAS}]"]
    pin = "CPU build " + CPU_TORCH_PIN if not _has_nvidia_gpu() else "torch from the range in pyproject"
    print(f"[setup] installing compressseg[{EXTRAS}] into {VENV} ({pin}); takes a few minutes once", flush=True)
    try:
        subprocess.run(cmd, check=True)
        subprocess.run([*cmd[:5], "--no-deps", "-c", cons.name, *NO_DEPS], check=True)
    finally:
        os.unlink(cons.name)
