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

from .float_exec import pack, unpack


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


def run_batches(runner: Any, x: np.ndarray, desc: str, step: int = 64) -> list[np.ndarray]:
    """``runner.run`` over ``x`` in batches: one array per output, batches joined."""
    parts = [unpack(runner.run(x[i:i + step])) for i in tqdm(range(0, len(x), step), desc=desc, unit="batch",
                                                               leave=False, disable=len(x) <= 256)]
    return [np.concatenate(col) for col in zip(*parts, strict=True)]


def runtime_checks(name: str, runner: Any, x: np.ndarray, sim_out: Any, float_out: Any, out_lsb: float | list[float],
                   labels: np.ndarray | None = None, output_names: list[str] | None = None,
                   keep: list[Any] | None = None) -> dict[str, Any]:
    """Run ``x`` on ``runner`` and compare with the simulation and the float model's outputs.

    Outputs are packed (``float_exec.pack``): one array, or a tuple for several. ``out_lsb`` is
    each output grid's scale, so differences are stated in integer steps. Argmax agreement is
    over axis 1 (classes; a segmenter's per-pixel classes) and only for one output; a detector's
    several heads get their differences per output (``outputs``). ``keep`` receives the runtime's
    outputs (packed).
    """
    xn = np.ascontiguousarray(x, dtype=np.float32)
    rts = run_batches(runner, xn, f"{name} runtime")
    if keep is not None:  # the runtime's outputs, for task scores computed by the caller
        keep.append(pack(rts))
    sims, floats = unpack(sim_out), unpack(float_out)
    lsbs = out_lsb if isinstance(out_lsb, list) else [out_lsb]
    diffs = [np.abs(r.astype(np.float64) - s) / lsb for r, s, lsb in zip(rts, sims, lsbs, strict=True)]
    every = np.concatenate([d.ravel() for d in diffs])
    out: dict[str, Any] = {
        "samples": int(len(xn)),
        "max_abs_diff_lsb": float(every.max()),
        "exact_output_fraction": float(np.mean(every < 0.5)),
        "diff_lsb_distribution": lsb_histogram(every),
    }
    if len(rts) == 1:
        rt, sim, flt = rts[0], sims[0], floats[0]
        out["argmax_agreement_vs_simulation"] = float(np.mean(rt.argmax(1) == sim.argmax(1)))
        out["argmax_agreement_vs_float"] = float(np.mean(rt.argmax(1) == flt.argmax(1)))
        out["fidelity_vs_float"] = fidelity(flt, rt) if rt.ndim == 2 else {"sqnr_db": round(sqnr_db(flt, rt), 2)}
        if labels is not None and rt.ndim == 2:
            lab = np.asarray(labels)[: len(xn)]
            out["top1"] = {"float": float(np.mean(flt.argmax(1) == lab)),
                           "simulation": float(np.mean(sim.argmax(1) == lab)),
                           "runtime": float(np.mean(rt.argmax(1) == lab))}
    else:
        names = output_names or [f"output {k}" for k in range(len(rts))]
        out["outputs"] = [{"name": nm, "max_abs_diff_lsb": float(d.max()), "exact_output_fraction": float(np.mean(d < 0.5)),
                           "sqnr_db_vs_float": round(sqnr_db(f, r), 2)}
                          for nm, d, r, f in zip(names, diffs, rts, floats, strict=True)]
    return out


def agreement(c: dict[str, Any]) -> float:
    """The headline agreement with the simulation: argmax agreement for one output, else the share of
    output values that are exactly the simulation's (a detector's heads have no single argmax)."""
    return float(c.get("argmax_agreement_vs_simulation", c["exact_output_fraction"]))


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
    q = median_latency_ms(lambda: runner.run(x1), repeats)  # (several outputs: all of them)
    f = median_latency_ms(lambda: float_runner.run(x1), repeats)
    out = {"int8_ms": round(q, 3), "float_ms": round(f, 3), "speedup_vs_float": round(f / q, 2),
           "threads": int(getattr(runner, "threads", 1)), "repeats": repeats}
    if getattr(runner, "kernels", None):  # a time means little without the kernels that ran (XNNPACK or not)
        out["kernels"] = runner.kernels
    return out
