"""What machine an artifact was verified on: CPU model, the ISA flags that change integer
results or speed, and the runtime versions. Recorded in every model card (``verification.machine``)
and printed by ``launch.py verify``, because an INT8 result can depend on the CPU (see
``int8_safety``): a card must say where its numbers were measured.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

# Flags (as /proc/cpuinfo spells them) that decide which integer kernels onnxruntime picks.
X86_FLAGS = ("sse4_1", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx512_fp16", "amx_int8", "amx_bf16")
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")
# numpy's runtime CPUID detection, in cpuinfo spelling: it reads the CPU the process runs on,
# so under an emulator (``launch.py verify --cpu``) it reports the emulated CPU.
_NUMPY_NAMES = {"SSE41": "sse4_1", "AVX": "avx", "AVX2": "avx2", "FMA3": "fma", "AVX512F": "avx512f",
                "AVX512BW": "avx512bw", "AVX512VNNI": "avx512_vnni", "AVX512BF16": "avx512_bf16",
                "AVX512FP16": "avx512_fp16", "ASIMD": "asimd", "ASIMDDP": "asimddp", "SVE": "sve"}
EMULATION_ENV = "COMPRESSSEG_EMULATED_CPU"  # set by ``launch.py verify --cpu`` for its emulated child


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str | None, set[str]]:
    """``(model name, flags)`` from Linux's cpuinfo; ``(None, set())`` elsewhere."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None, set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def integer_kernels(arch: str, flags: set[str]) -> str:
    """Which 8-bit dot-product family onnxruntime's CPU kernels use here, in words."""
    if arch in ("x86_64", "amd64", "i686", "x86"):
        if "amx_int8" in flags:
            return "AMX (int32 accumulation)"
        if flags & {"avx512_vnni", "avx_vnni"}:
            return "VNNI (int32 accumulation)"
        if "avx2" in flags or "avx512bw" in flags:
            return "AVX2/AVX-512 vpmaddubsw (16-bit pair sums: can saturate with full-range int8 weights)"
        return "SSE (16-bit widening)"
    if arch in ("aarch64", "arm64"):
        return "ARM dot product (int32 accumulation)" if flags & {"asimddp", "i8mm"} else "ARM NEON (widening)"
    return "unknown"


def _cpuid_flags() -> set[str] | None:
    """Flags from numpy's CPUID probe (the CPU this process really runs on), None if unavailable."""
    try:  # numpy keeps the probe's result in a private attribute; /proc/cpuinfo is the fallback
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return None
    return {name for key, name in _NUMPY_NAMES.items() if features.get(key)}


def _flags() -> tuple[str | None, set[str]]:
    """``(cpu model, flags)``: CPUID's flags, plus cpuinfo-only ones (avx_vnni, amx, i8mm) on real hardware."""
    model, proc_flags = _cpuinfo()
    cpuid = _cpuid_flags()
    emulated = os.environ.get(EMULATION_ENV)
    if emulated:
        return f"{emulated} (emulated) on {model or 'an unknown host'}", cpuid or set()
    if cpuid is None:
        return model, proc_flags
    return model, cpuid | {f for f in proc_flags if f not in _NUMPY_NAMES.values()}


def machine_info() -> dict[str, Any]:
    """The card's ``machine`` section."""
    arch = platform.machine().lower()
    model, flags = _flags()
    known = X86_FLAGS if arch in ("x86_64", "amd64") else ARM_FLAGS
    try:
        ort_version = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        ort_version = None
    return {
        "cpu": model or platform.processor() or None,
        "arch": arch,
        "isa_flags": sorted(f for f in known if f in flags),
        "integer_kernels": integer_kernels(arch, flags),
        "cpus": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "onnxruntime": ort_version,
    }


def describe(info: dict[str, Any]) -> str:
    """One line for logs: ``AMD EPYC (x86_64; avx2 avx512_vnni ...; onnxruntime 1.32.0)``."""
    flags = " ".join(info.get("isa_flags") or []) or "no listed ISA flags"
    return f"{info.get('cpu') or 'unknown CPU'} ({info.get('arch')}; {flags}; onnxruntime {info.get('onnxruntime')})"
