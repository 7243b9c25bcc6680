"""CPU latency of PyTorch and onnxruntime models, measured interleaved.

The machines this runs on are shared and noisy, so absolute times drift: every comparison
times its candidates in alternating rounds within one process and reports medians, and
callers report ratios between candidates of the same run, never absolute thresholds.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn


def torch_runner(net: nn.Module, example: torch.Tensor) -> Callable[[], Any]:
    net = net.eval()

    def run():
        with torch.inference_mode():
            return net(example)

    return run


def ort_runner(path: str, example: torch.Tensor, threads: int = 1) -> Callable[[], Any]:
    from trainer.export.onnx_tools import ort_session

    session = ort_session(path, threads=threads)
    inp = session.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    feed = {inp.name: example.numpy().astype(dtype)}
    return lambda: session.run(None, feed)


def time_interleaved(
    runners: dict[str, Callable[[], Any]], rounds: int = 7, calls: int = 5, warmup: int = 2, threads: int = 1
) -> dict[str, float]:
    """Median seconds per call of each runner, timed in alternating rounds.

    ``threads`` fixes torch's intra-op threads for the measurement (onnxruntime sessions
    are built with their own count), so both runtimes get the same cores.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for run in runners.values():
            for _ in range(warmup):
                run()
        samples: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(rounds):
            for key, run in runners.items():
                start = time.perf_counter()
                for _ in range(calls):
                    run()
                samples[key].append((time.perf_counter() - start) / calls)
        return {k: statistics.median(v) for k, v in samples.items()}
    finally:
        torch.set_num_threads(previous)
