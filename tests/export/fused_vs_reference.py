"""Run an INT8 ONNX file twice on this CPU: as onnxruntime fuses it into integer kernels, and with
graph optimizations off (every QuantizeLinear/DequantizeLinear computed in float: the file's exact
meaning). Prints the worst difference in output quantization steps. Needs only numpy and
onnxruntime, so it starts quickly under an emulator (``qemu-x86_64 -cpu Haswell``).

    python fused_vs_reference.py MODEL.onnx INPUTS.npy
"""
import sys

import numpy as np
import onnxruntime as ort


def run(path: str, x: np.ndarray, optimize: bool) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


if __name__ == "__main__":
    model, inputs, step = sys.argv[1], np.load(sys.argv[2]), float(sys.argv[3])
    diff = np.abs(run(model, inputs, True) - run(model, inputs, False))
    print(f"max_steps {diff.max() / step:.3f} over_2_steps {(diff > 2 * step).mean():.6f}")
