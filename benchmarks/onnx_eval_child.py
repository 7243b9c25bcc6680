"""Score ONNX files on stored inputs; numpy + onnxruntime only, so it starts fast under an emulator.

    python benchmarks/onnx_eval_child.py DATA.npz OUT.json MODEL.onnx [MODEL.onnx ...]

``DATA.npz`` holds ``images [N, C, H, W]``, ``labels [N, H, W]``, ``steps`` (each model's output
quantization step, in the order given) and one reference array per model (``ref_<i>``: the
PyTorch logits that model should reproduce). Writes, per model: mean foreground Dice (pooled over
the set), argmax agreement with its reference, and the fraction of logits more than 2 output
steps away. ``bench_int8_cpu.py`` runs it natively and under ``qemu-x86_64 -cpu MODEL``.
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    scores = []
    for c in range(1, num_classes):
        p, t = pred == c, label == c
        denom = p.sum() + t.sum()
        if denom:
            scores.append(2.0 * (p & t).sum() / denom)
    return float(np.mean(scores)) if scores else float("nan")


def score(path: str, images: np.ndarray, labels: np.ndarray, ref: np.ndarray, step: float) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: images[i:i + 1]})[0] for i in range(len(images))])
    diff = np.abs(out - ref)
    return {
        "dice": dice(out.argmax(1), labels, out.shape[1]),
        "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
        "beyond_2_steps": float((diff > 2 * step).mean()),
        "max_steps": float(diff.max() / step),
    }


if __name__ == "__main__":
    data = np.load(sys.argv[1])
    models = sys.argv[3:]
    results = {m: score(m, data["images"], data["labels"], data[f"ref_{i}"], float(data["steps"][i]))
               for i, m in enumerate(models)}
    with open(sys.argv[2], "w") as fh:
        json.dump(results, fh)
