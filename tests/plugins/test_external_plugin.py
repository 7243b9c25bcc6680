"""Extension points from outside the repository: a separately installed package adds an export
format and a structural converter through entry points, and nothing in trainer/ is edited.

The package (tests/plugins/demo_plugin) is installed with pip into a throw-away target folder,
so discovery goes through its installed metadata exactly as for a user's package.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

SCRIPT = r'''
import json, sys, torch
from trainer.export import ExportMeta, export_artifact, known_formats
from trainer.models import UNet
from trainer.structure import history, replay

assert "demo-onnx-sidecar" in known_formats(), sorted(known_formats())
torch.manual_seed(0)
net = UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4).eval()
from compressseg_demo_plugin.converters import DropHeadBias
DropHeadBias.apply(net)
fresh = UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4).eval()
replay(fresh, json.loads(json.dumps(history(net))))   # as a checkpoint carries it
fresh.load_state_dict(net.state_dict())                 # strict: the rebuilt net has no head bias
batches = [{"image": torch.randn(2, 1, 16, 16), "label": torch.randint(0, 3, (2, 16, 16))}]
path = export_artifact(fresh, "demo-onnx-sidecar", sys.argv[1], batches, ExportMeta(spatial_dims=2, num_classes=3, divisor=4),
                       format_options={"note": "hello"}, threads=1)
card = json.loads((path.parent / "model_card.json").read_text())
print(card["format"], card["details"]["note"], json.loads((path.parent / "sidecar.json").read_text())["note"])
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "--target", str(site), str(HERE / "demo_plugin")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return site


def _run(site: Path | None, out: Path) -> subprocess.CompletedProcess:
    paths = [str(ROOT)] + ([str(site)] if site else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env.pop("COMPRESSSEG_TRUSTED_MODULES", None)
    return subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_installed_plugin_adds_a_format_and_a_converter(plugin_site, tmp_path):
    done = _run(plugin_site, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["demo-onnx-sidecar", "hello", "hello"]
    assert (tmp_path / "out" / "sidecar.json").is_file() and (tmp_path / "out" / "model.onnx").is_file()


def test_without_the_package_its_checkpoint_history_is_refused_before_import(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("COMPRESSSEG_TRUSTED_MODULES", None)
    script = ("from trainer.structure import replay\nfrom trainer.models import UNet\n"
              "replay(UNet(spatial_dims=2, num_classes=3, depth=2, base_channels=4), "
              "[{'converter': 'compressseg_demo_plugin.converters.DropHeadBias', 'state': {'head': 'head'}}])")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "outside the modules a checkpoint may import" in done.stderr
