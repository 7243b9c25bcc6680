"""Bootstrap of the project's virtual environment. Standard library only.

``python3 launch.py main`` and ``python3 launch.py test`` must work on a fresh machine with
nothing installed: they create ``.venv`` next to ``launch.py``, install the package with its
extras, and re-execute themselves inside it. Which torch goes in:

* **No NVIDIA driver, or CI** (``CI`` set, as every CI service does): the CPU build
  ``torch==2.13.0`` through a constraints file, because an unpinned torch resolves to a
  multi-GB CUDA build. This is the test suite's path and never installs CUDA torch.
* **An NVIDIA driver** (``nvidia-smi`` answers): the same torch version, as the CUDA build
  from PyTorch's index that the driver can run: the newest of :data:`CUDA_BUILDS` whose CUDA
  version the driver supports (``nvidia-smi`` prints it; else it is read off the driver
  version). Then TensorRT (``tensorrt-cu12``/``-cu13`` to match that build) for
  ``launch.py export --format tensorrt``; where no wheel installs, setup says so and goes on.
  A driver too old for any build stops with the driver version that is needed.
* ``COMPRESSSEG_TORCH=cpu`` or ``=cu126`` (a tag of :data:`CUDA_BUILDS`) overrides the choice.

pyproject keeps a torch *range* for users who install the package into their own environment.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("COMPRESSSEG_VENV", ROOT / ".venv"))
TORCH_VERSION = "2.13.0"
CPU_TORCH_PIN = f"torch=={TORCH_VERSION}"
EXTRAS = "dev,deepspeed"
TORCH_INDEX = "https://download.pytorch.org/whl/{tag}"
TORCH_BUILD_ENV = "COMPRESSSEG_TORCH"
# CUDA builds of TORCH_VERSION on PyTorch's index, newest first: (tag, CUDA version). Check
# https://pytorch.org/get-started/previous-versions/ when TORCH_VERSION changes.
CUDA_BUILDS: tuple[tuple[str, tuple[int, int]], ...] = (("cu130", (13, 0)), ("cu128", (12, 8)), ("cu126", (12, 6)))
# Lowest Linux driver of each CUDA version (NVIDIA's CUDA toolkit release notes), to read the
# supported CUDA version off the driver when nvidia-smi does not print it.
DRIVER_CUDA: tuple[tuple[tuple[int, int], tuple[int, int]], ...] = (
    ((580, 65), (13, 0)), ((575, 51), (12, 9)), ((570, 26), (12, 8)), ((560, 28), (12, 6)),
    ((555, 42), (12, 5)), ((550, 54), (12, 4)), ((545, 23), (12, 3)), ((535, 54), (12, 2)),
    ((530, 30), (12, 1)), ((525, 60), (12, 0)),
)
# CUDA 12.x runtimes run on any driver >= 525.60 (CUDA minor-version compatibility)
MINOR_COMPAT_DRIVER = (525, 60)


class SetupError(RuntimeError):
    """A machine this setup cannot serve; the message says what to do."""


@dataclass(frozen=True)
class Driver:
    version: tuple[int, ...]  # e.g. (570, 86, 10)
    cuda: tuple[int, int] | None  # "CUDA Version" of nvidia-smi's banner, if printed
    gpus: list[str]


@dataclass(frozen=True)
class TorchBuild:
    tag: str  # "cpu" or a CUDA_BUILDS tag
    reason: str

    @property
    def cuda(self) -> bool:
        return self.tag != "cpu"

    @property
    def index_url(self) -> str | None:
        return TORCH_INDEX.format(tag=self.tag) if self.cuda else None

    @property
    def tensorrt_package(self) -> str | None:
        """The TensorRT wheel built for this torch build's CUDA major version."""
        major = dict(CUDA_BUILDS)[self.tag][0] if self.cuda else None
        return f"tensorrt-cu{major}>=10" if major else None


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


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def parse_nvidia_smi(banner: str, query: str) -> Driver:
    """``nvidia-smi``'s banner (for "CUDA Version: X.Y") and the output of
    ``--query-gpu=driver_version,name --format=csv,noheader`` as a :class:`Driver`."""
    rows = [r.split(",", 1) for r in query.strip().splitlines() if r.strip()]
    if not rows:
        raise SetupError("nvidia-smi lists no GPU")
    cuda = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", banner)
    return Driver(version=_version(rows[0][0]), cuda=(int(cuda[1]), int(cuda[2])) if cuda else None,
                  gpus=[r[1].strip() if len(r) > 1 else "?" for r in rows])


def gpu_driver() -> Driver | None:
    """The NVIDIA driver of this machine, or None without ``nvidia-smi``."""
    if not _has_nvidia_gpu():
        return None
    try:
        banner = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise SetupError(f"nvidia-smi is installed but fails ({exc}); fix the NVIDIA driver, or set "
                         f"{TORCH_BUILD_ENV}=cpu to install the CPU build") from None
    return parse_nvidia_smi(banner, query)


def cuda_of_driver(version: tuple[int, ...]) -> tuple[int, int] | None:
    """The newest CUDA version a Linux driver supports (None: older than CUDA 12)."""
    for driver, cuda in DRIVER_CUDA:
        if tuple(version[:2]) >= driver:
            return cuda
    return None


def choose_torch_build(driver: Driver | None, env: Mapping[str, str] | None = None) -> TorchBuild:
    """Which torch build this machine gets (see the module doc)."""
    env = os.environ if env is None else env
    tags = [tag for tag, _ in CUDA_BUILDS]
    override = env.get(TORCH_BUILD_ENV, "").strip()
    if override:
        if override != "cpu" and override not in tags:
            raise SetupError(f"{TORCH_BUILD_ENV}={override!r}: must be 'cpu' or one of {', '.join(tags)}")
        return TorchBuild(override, f"{TORCH_BUILD_ENV}={override}")
    if env.get("CI"):
        return TorchBuild("cpu", "CI: the CPU build, never CUDA")
    if driver is None:
        return TorchBuild("cpu", "no NVIDIA driver")
    cuda = driver.cuda or cuda_of_driver(driver.version)
    shown = ".".join(map(str, driver.version))
    if cuda is not None:
        for tag, needs in CUDA_BUILDS:
            if needs <= cuda:
                return TorchBuild(tag, f"driver {shown} supports CUDA {cuda[0]}.{cuda[1]}")
    if tuple(driver.version[:2]) >= MINOR_COMPAT_DRIVER:  # CUDA 12 runs on it by minor-version compatibility
        tag = next(tag for tag, needs in reversed(CUDA_BUILDS) if needs[0] == 12)
        return TorchBuild(tag, f"driver {shown} runs CUDA 12 builds by minor-version compatibility")
    low = ".".join(map(str, MINOR_COMPAT_DRIVER))
    raise SetupError(f"NVIDIA driver {shown} is too old for torch {TORCH_VERSION}'s CUDA builds "
                     f"({', '.join(tags)}): upgrade to driver >= {low}, or set {TORCH_BUILD_ENV}=cpu "
                     "to install the CPU build")


def detect_build(env: Mapping[str, str] | None = None) -> TorchBuild:
    """:func:`choose_torch_build` for this machine; ``nvidia-smi`` is not even asked under CI
    or an explicit :data:`TORCH_BUILD_ENV`."""
    env = os.environ if env is None else env
    if env.get(TORCH_BUILD_ENV, "").strip() or env.get("CI"):
        return choose_torch_build(None, env)
    return choose_torch_build(gpu_driver(), env)


def install_commands(python: str, build: TorchBuild, constraints: str) -> list[list[str]]:
    """The pip commands that install the package for ``build`` (the last, TensorRT, may fail).

    ``constraints`` is a file holding :data:`CPU_TORCH_PIN`: it keeps every install on the
    chosen torch version (``torch==2.13.0`` also matches ``2.13.0+cu128``)."""
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    package = ["-c", constraints, "-e", f"{ROOT}[{EXTRAS}]"]
    no_deps = pip + ["--no-deps", "-c", constraints, *NO_DEPS]
    if not build.cuda:
        return [pip + package, no_deps]
    return [pip + ["--index-url", build.index_url, CPU_TORCH_PIN], pip + package, no_deps, pip + [build.tensorrt_package]]


def _stamp(build: TorchBuild) -> str:
    pin = CPU_TORCH_PIN if not build.cuda else f"{CPU_TORCH_PIN}+{build.tag}|tensorrt"
    text = (ROOT / "pyproject.toml").read_bytes() + f"{EXTRAS}|{pin}|{','.join(NO_DEPS)}".encode()
    return hashlib.sha256(text).hexdigest()


def ensure_env() -> None:
    """Create/update ``.venv`` if needed and re-exec this command inside it."""
    if in_project_env():
        return
    try:
        build = detect_build()
    except SetupError as exc:
        print(f"[setup] error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    stamp_file = VENV / ".compressseg-installed"
    if not _venv_python().exists():
        print(f"[setup] creating {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if not stamp_file.exists() or stamp_file.read_text() != _stamp(build):
        _install(build)
        stamp_file.write_text(_stamp(build))
    os.execv(str(_venv_python()), [str(_venv_python()), *sys.argv])


def _install(build: TorchBuild) -> None:
    what = "CPU build " + CPU_TORCH_PIN if not build.cuda else f"torch {TORCH_VERSION}+{build.tag} from {build.index_url}"
    print(f"[setup] installing compressseg[{EXTRAS}] into {VENV} ({what}: {build.reason}); takes a few minutes once",
          flush=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as cons:
        cons.write(CPU_TORCH_PIN + "\n")
    try:
        commands = install_commands(str(_venv_python()), build, cons.name)
        for cmd in commands[:-1] if build.cuda else commands:
            subprocess.run(cmd, check=True)
        if build.cuda:  # TensorRT is optional: a missing wheel must not stop the install
            _install_tensorrt(commands[-1])
            _check_cuda_torch()
    finally:
        os.unlink(cons.name)


def _install_tensorrt(cmd: list[str]) -> None:
    if subprocess.run(cmd).returncode != 0:
        print(f"[setup] warning: {cmd[-1]} did not install (no wheel for this platform, or no network): "
              "`launch.py export --format tensorrt` will be unavailable; everything else works", flush=True)


def _check_cuda_torch() -> None:
    probe = "import torch; print(torch.cuda.is_available(), torch.version.cuda, torch.cuda.device_count())"
    out = subprocess.run([str(_venv_python()), "-c", probe], capture_output=True, text=True)
    if not out.stdout.startswith("True"):
        print(f"[setup] warning: the installed torch cannot use the GPUs ({(out.stdout or out.stderr).strip()[-300:]}); "
              "training would run on the CPU (refused inside SLURM GPU jobs)", flush=True)
