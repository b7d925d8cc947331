"""Checks on the real runtime: agreement with the simulation and the float model, latency.

The numbers a report states come from here, measured on the file as the target's
own runtime executes it, never from the simulation alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm.auto import tqdm


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - got) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / noise))


def fidelity(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Label-free agreement of ``got`` with ``ref`` (both logits, N x classes)."""
    r1 = ref.argmax(1)
    top5 = np.argsort(-got, 1)[:, :5]
    return {
        "top1_agreement": float(np.mean(got.argmax(1) == r1)),
        "top5_agreement": float(np.mean((top5 == r1[:, None]).any(1))),
        "sqnr_db": round(sqnr_db(ref, got), 2),
    }


def runtime_checks(name: str, runner: Any, x: np.ndarray, sim_out: np.ndarray, float_out: np.ndarray, out_lsb: float,
                   labels: np.ndarray | None = None) -> dict[str, Any]:
    """Run ``x`` on ``runner`` and compare with the simulation and the float model's outputs.

    ``out_lsb`` is the output grid's scale, so differences are stated in integer steps.
    """
    xn = np.ascontiguousarray(x, dtype=np.float32)
    rt = np.concatenate([runner.run(xn[i:i + 64]) for i in tqdm(range(0, len(xn), 64), desc=f"{name} runtime",
                                                                   unit="batch", leave=False, disable=len(xn) <= 256)])
    diff = np.abs(rt.astype(np.float64) - sim_out) / out_lsb
    out: dict[str, Any] = {
        "samples": int(len(xn)),
        "argmax_agreement_vs_simulation": float(np.mean(rt.argmax(1) == sim_out.argmax(1))),
        "argmax_agreement_vs_float": float(np.mean(rt.argmax(1) == float_out.argmax(1))),
        "max_abs_diff_lsb": float(diff.max()),
        "exact_output_fraction": float(np.mean(diff < 0.5)),
        "diff_lsb_distribution": lsb_histogram(diff),
        "fidelity_vs_float": fidelity(float_out, rt),
    }
    if labels is not None:
        lab = np.asarray(labels)[: len(xn)]
        out["top1"] = {"float": float(np.mean(float_out.argmax(1) == lab)),
                       "simulation": float(np.mean(sim_out.argmax(1) == lab)),
                       "runtime": float(np.mean(rt.argmax(1) == lab))}
    return out


def lsb_histogram(diff: np.ndarray) -> dict[str, float]:
    """Fraction of output elements at 0, 1, 2 and more output LSBs from the simulation."""
    r = np.rint(diff)
    return {"0": float(np.mean(r == 0)), "1": float(np.mean(r == 1)), "2": float(np.mean(r == 2)),
            ">2": float(np.mean(r > 2))}


def median_latency_ms(fn: Callable[[], object], repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def latency(runner: Any, float_runner: Any, x1: np.ndarray, repeats: int = 50) -> dict[str, Any]:
    """Median batch-1 latency of the integer and float files on the same runtime."""
    x1 = np.ascontiguousarray(x1[:1], dtype=np.float32)
    q = median_latency_ms(lambda: runner.run(x1), repeats)
    f = median_latency_ms(lambda: float_runner.run(x1), repeats)
    out = {"int8_ms": round(q, 3), "float_ms": round(f, 3), "speedup_vs_float": round(f / q, 2),
           "threads": int(getattr(runner, "threads", 1)), "repeats": repeats}
    if getattr(runner, "kernels", None):  # a time means little without the kernels that ran (XNNPACK or not)
        out["kernels"] = runner.kernels
    return out
