"""``launch.py verify ARTIFACT_DIR``: re-verification of an export folder on another machine."""
from __future__ import annotations

import copy
import json
import shutil

import onnx
import pytest
from onnx import numpy_helper

from trainer.export import export_artifact
from trainer.export.bundle import BUNDLE_NAME
from trainer.export.card import CARD_NAME, sha256_file
from trainer.export.verify_cli import main
from trainer.quant.ptq import post_training_quantize

TOY = {"max_exceed_fraction": 0.05}  # 8-channel toy net in INT8 (see test_export_formats)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, net2d, data2d, meta2d):
    """One export folder per format that runs on this machine (TensorRT needs a GPU)."""
    root = tmp_path_factory.mktemp("exports")
    ptq = copy.deepcopy(net2d)
    post_training_quantize(ptq, [b["image"] for b in data2d["val"]], "percentile")
    made = {}
    for fmt, net, tol in (("onnx", net2d, None), ("onnx-fp16", net2d, None), ("onnx-int8-cpu", net2d, TOY),
                          ("onnx-qdq", ptq, None)):
        options = {"benchmark_runs": 0} if fmt == "onnx-int8-cpu" else None
        made[fmt] = export_artifact(net, fmt, root / fmt, data2d["val"], meta2d, threads=1, tolerance=tol,
                                    format_options=options).parent
    return made


@pytest.mark.parametrize("fmt", ["onnx", "onnx-fp16", "onnx-int8-cpu", "onnx-qdq"])
def test_every_format_verifies_again_from_its_folder_alone(exports, fmt, tmp_path, capsys):
    folder = tmp_path / "copied"
    shutil.copytree(exports[fmt], folder)  # as if moved to the deployment machine
    out = tmp_path / "outcome.json"
    assert main([str(folder), "--threads", "1", "--json", str(out)]) == 0
    line = capsys.readouterr().out
    assert f"({fmt}) on " in line and "onnxruntime" in line and "argmax agreement" in line
    outcome = json.loads(out.read_text())
    card = json.loads((folder / CARD_NAME).read_text())
    assert outcome["passed"] and outcome["verification"]["batches"] == card["verification"]["bundle"]["batches"] == 2
    assert outcome["verification"]["shape_probe"]["ok"]
    # the same numbers as at export: same file, same inputs, same machine
    assert outcome["metrics"]["dice"]["artifact"] == card["metrics"]["dice"]["artifact"]
    assert outcome["machine"]["arch"] == card["verification"]["machine"]["arch"]


def test_a_modified_artifact_is_refused(exports, tmp_path, capsys):
    folder = tmp_path / "f"
    shutil.copytree(exports["onnx"], folder)
    with open(folder / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    assert main([str(folder)]) == 2
    line = _error_line(capsys)
    assert "model.onnx: sha256" in line and "does not match the model card" in line


def test_modified_or_missing_verification_data_is_refused(exports, tmp_path, capsys):
    folder = tmp_path / "f"
    shutil.copytree(exports["onnx"], folder)
    with open(folder / BUNDLE_NAME, "ab") as fh:
        fh.write(b"\0")
    assert main([str(folder)]) == 2
    assert f"{BUNDLE_NAME}: sha256" in _error_line(capsys)
    (folder / BUNDLE_NAME).unlink()
    assert main([str(folder)]) == 2
    assert "verification data named in the model card is missing" in _error_line(capsys)


def test_an_artifact_that_can_overflow_is_refused_before_it_runs(exports, tmp_path, capsys):
    """A hand-made 'old way' file (full-range int8 weights) in a valid folder: the static check
    refuses it on any machine, even this one where it would compute correctly."""
    folder = tmp_path / "f"
    shutil.copytree(exports["onnx-int8-cpu"], folder)
    model = onnx.load(str(folder / "model.onnx"))
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4:
            w = numpy_helper.to_array(t).copy()
            w[0].flat[:2] = 127
            t.CopyFrom(numpy_helper.from_array(w, t.name))
            break
    onnx.save(model, str(folder / "model.onnx"))
    card = json.loads((folder / CARD_NAME).read_text())
    card["artifact"]["sha256"] = sha256_file(folder / "model.onnx")
    (folder / CARD_NAME).write_text(json.dumps(card))
    assert main([str(folder)]) == 2
    assert "can overflow the 16-bit pair sums" in _error_line(capsys)


def test_bad_folders_get_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "is not a directory written by `launch.py export`" in _error_line(capsys)
    assert main([str(tmp_path)]) == 2
    assert f"has no {CARD_NAME}" in _error_line(capsys)
    (tmp_path / CARD_NAME).write_text("{not json")
    assert main([str(tmp_path)]) == 2
    assert "cannot read the model card" in _error_line(capsys)


def test_export_without_verification_data_points_to_data(tmp_path, net2d, data2d, meta2d, capsys):
    folder = export_artifact(net2d, "onnx", tmp_path / "o", data2d["val"], meta2d, threads=1, bundle_max_mb=0).parent
    assert not (folder / BUNDLE_NAME).exists()
    assert main([str(folder)]) == 2
    assert "pass --data FILE --ckpt CKPT" in _error_line(capsys)
