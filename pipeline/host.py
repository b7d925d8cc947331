"""The machine the runtimes run on: the CPU features that pick their integer kernels.

The same model file can compute differently on two x86 CPUs: without VNNI, the uint8 x
int8 products of onnxruntime's and OpenVINO's integer convolutions are added in pairs in
int16 with saturation. Bundles record these features; targets consult them.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

#: CPU features that select different integer kernels (and so can change results or speed)
INTEGER_CPU_FEATURES = ("sse4_1", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                        "amx_bf16", "amx_int8", "asimddp", "i8mm")


def cpu_features() -> dict[str, Any]:
    """The host CPU's model and which integer-relevant features it has (Linux /proc/cpuinfo)."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("flags", "Features") and not flags:
                flags = set(value.split())
            elif key == "model name":
                model = value.strip()
    except OSError:
        pass
    return {"model": model, **{f: f in flags for f in INTEGER_CPU_FEATURES}}


def has_vnni() -> bool:
    """Whether the CPU multiplies uint8 by int8 with 32-bit accumulation (AVX-512 VNNI, AVX-VNNI,
    AMX or Arm's dot product): no int16 pair sums to saturate."""
    f = cpu_features()
    return any(f[k] for k in ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp"))
