"""Which torch the bootstrap installs (trainer/env.py), decided without installing anything.

The CPU path is the CI path: it must stay exactly one pip command pinned to the CPU build
through a constraints file, whatever the machine has, whenever ``CI`` is set."""
from __future__ import annotations

import pytest

from trainer import env

BANNER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 570.86.10              Driver Version: 570.86.10      CUDA Version: 12.8     |
|-----------------------------------------+------------------------+----------------------+"""
QUERY = "570.86.10, NVIDIA H100 80GB HBM3\n570.86.10, NVIDIA H100 80GB HBM3\n"


def test_nvidia_smi_is_read():
    driver = env.parse_nvidia_smi(BANNER, QUERY)
    assert driver.version == (570, 86, 10) and driver.cuda == (12, 8) and driver.gpus == ["NVIDIA H100 80GB HBM3"] * 2
    with pytest.raises(env.SetupError, match="lists no GPU"):
        env.parse_nvidia_smi(BANNER, "")


@pytest.mark.parametrize("version, cuda, tag", [
    ((580, 95, 5), (13, 0), "cu130"),
    ((570, 86, 10), (12, 8), "cu128"),
    ((570, 86, 10), None, "cu128"),  # no "CUDA Version" printed: read off the driver
    ((565, 57), (12, 7), "cu126"),
    ((550, 54, 15), (12, 4), "cu126"),  # CUDA 12 minor-version compatibility (driver >= 525.60)
    ((525, 60, 13), None, "cu126"),
])
def test_the_newest_cuda_build_the_driver_runs_is_chosen(version, cuda, tag):
    build = env.choose_torch_build(env.Driver(version, cuda, ["GPU"]), {})
    assert build.tag == tag and build.index_url == f"https://download.pytorch.org/whl/{tag}"
    assert build.tensorrt_package == f"tensorrt-cu{tag[2:4]}>=10"


def test_too_old_a_driver_says_what_is_needed():
    with pytest.raises(env.SetupError, match=r"driver 470.199.2 is too old .* upgrade to driver >= 525.60, or set "
                                             r"COMPRESSSEG_TORCH=cpu"):
        env.choose_torch_build(env.Driver((470, 199, 2), (11, 4), ["GPU"]), {})


def test_ci_and_machines_without_a_driver_get_the_pinned_cpu_build(monkeypatch):
    h100 = env.Driver((570, 86, 10), (12, 8), ["GPU"])
    assert env.choose_torch_build(h100, {"CI": "true"}).tag == "cpu"
    assert env.choose_torch_build(None, {}).tag == "cpu"
    monkeypatch.setattr(env, "gpu_driver", lambda: pytest.fail("nvidia-smi asked under CI"))
    assert env.detect_build({"CI": "true"}).tag == "cpu"
    commands = env.install_commands("/v/bin/python", env.detect_build({"CI": "1"}), "/tmp/cons.txt")
    pip = ["/v/bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    assert commands == [pip + ["-c", "/tmp/cons.txt", "-e", f"{env.ROOT}[dev,deepspeed]"],
                        pip + ["--no-deps", "-c", "/tmp/cons.txt", *env.NO_DEPS]]


def test_gpu_install_pins_torch_to_the_driver_build_then_adds_tensorrt():
    build = env.choose_torch_build(env.Driver((570, 86, 10), (12, 8), ["GPU"]), {})
    torch_cmd, package_cmd, no_deps_cmd, trt_cmd = env.install_commands("py", build, "cons.txt")
    assert torch_cmd[-3:] == ["--index-url", "https://download.pytorch.org/whl/cu128", f"torch=={env.TORCH_VERSION}"]
    assert package_cmd[-4:] == ["-c", "cons.txt", "-e", f"{env.ROOT}[dev,deepspeed]"]  # stays on that torch
    assert no_deps_cmd[-len(env.NO_DEPS) - 3:] == ["--no-deps", "-c", "cons.txt", *env.NO_DEPS]
    assert trt_cmd[-1] == "tensorrt-cu12>=10"  # last: optional


def test_override_picks_the_build_and_is_checked():
    assert env.choose_torch_build(None, {"COMPRESSSEG_TORCH": "cu126"}).tag == "cu126"
    assert env.choose_torch_build(env.Driver((570, 86), (12, 8), []), {"COMPRESSSEG_TORCH": "cpu"}).tag == "cpu"
    with pytest.raises(env.SetupError, match="COMPRESSSEG_TORCH='cu99': must be 'cpu' or one of cu130, cu128, cu126"):
        env.choose_torch_build(None, {"COMPRESSSEG_TORCH": "cu99"})
