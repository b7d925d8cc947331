"""Mixed precision under a weight-memory budget against uniform widths (imx500 profile, EPTQ).

Budgets are stated as average bits per weight: ``--avg 3`` is ``3/8`` of the weights' 8-bit size
plus the int32 biases (what ``weight_memory=`` counts), so "uniform W4" is the 4.0 row's size.
Rows per model: the budgets of ``--avg`` (default 2.5, 3, 3.5; Lite0: 4.5) and uniform
``--uniform`` widths (default 4 and 2; Lite0: 8 and 4), each EPTQ with the defaults. Reported:
top-1 of the simulation (onnx-qdq's rule; the runtimes are bit-exact with it, tested) on the
10,000 CIFAR-10 test images or the 500 held-out ImageNet samples, packed bytes, the widths chosen,
time. A plot of top-1 against packed bytes (the accuracy-versus-size curve, one panel per
model) goes to ``--plot``, drawn from every row in ``--results`` (the latest of each model and
configuration), so runs of one model at a time add up to one figure.

    python tools/bench_mixed_precision.py --model resnet20
    python tools/bench_mixed_precision.py --model efficientnet_lite0 --avg 4.5 --uniform 8,4
    python tools/bench_mixed_precision.py --report     # table and plot from the results so far

One JSON line per row on stdout, appended to ``--results``; a Markdown table ends the output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

# same folder (tools/ is the script's path): data, models and the result writer of the other benchmarks
from bench_accuracy import Skip, load_dataset, load_model
from bench_ethos_u import top1
from bench_mlperf_tiny import emit

import eptq_deploy
from eptq_deploy.capture import capture
from eptq_deploy.float_exec import unpack
from eptq_deploy.hw_profiles import load_profile
from eptq_deploy.ptq import packed_weight_bytes
from eptq_deploy.zoo import shared_data_dir

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "bench_mixed_precision.jsonl"
TARGET = "onnx-qdq"


def budget_for(model: torch.nn.Module, example: torch.Tensor, avg_bits: float) -> int:
    """Bytes for ``avg_bits`` bits per weight on average, plus the int32 biases."""
    prof = load_profile("imx500")
    g = capture(model, example[:1], fusing=prof.fusing, profile_name=prof.name)
    weights = sum(int(np.size(g.tensors[n.inputs[1]].data)) for n in g.weighted_nodes())
    biases = packed_weight_bytes(g, {n.name: 0 for n in g.weighted_nodes()}, prof.bias_bits)
    return int(weights * avg_bits / 8) + biases


def simulated_outputs(qm: Any, x: torch.Tensor, target: str) -> np.ndarray:
    """``qm``'s simulation under ``target``'s rule (its first output), 500 images at a time."""
    return np.concatenate([np.asarray(unpack(qm.simulate(x[i:i + 500], target))[0]) for i in range(0, len(x), 500)])


def simulated_top1(qm: Any, x: torch.Tensor, y: np.ndarray, target: str) -> float:
    """Top-1 (%) of ``qm``'s simulation under ``target``'s rule."""
    return top1(simulated_outputs(qm, x, target), y)


def row(model: str, config: str, avg: float | None, bits: int | None, data: tuple[Any, Any, Any],
        seed: int = 0) -> dict[str, Any]:
    calib, x, y = data
    net = load_model(model)
    options: dict[str, Any] = {"weight_memory": budget_for(net, calib, avg)} if avg is not None else {"weight_bits": bits}
    t0 = time.perf_counter()
    qm = eptq_deploy.quantize(net, calib, profile="imx500", targets=[TARGET], method="eptq", seed=seed, progress=False,
                              **options)
    seconds = round(time.perf_counter() - t0, 1)
    timings = qm.info.get("timings_s", {})
    return {"model": model, "config": config, "seed": seed, "budget_bytes": options.get("weight_memory"),
            "packed_bytes": qm.weight_bytes, "widths": dict(sorted(Counter(qm.weight_bits.values()).items())),
            "weight_bits": qm.weight_bits, "images": len(y), "top1_simulation": simulated_top1(qm, x, y, TARGET),
            "quantize_s": seconds, "hessian_s": timings.get("hessian"), "optimisation_s": timings.get("optimisation")}


def latest_rows(path: Path) -> list[dict[str, Any]]:
    """The last measured row of each (model, configuration, seed) in the results file, in first-seen order."""
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line) if line.strip() else {}
            if "config" in r:
                rows[(r["model"], r["config"], r.get("seed", 0))] = r
    return list(rows.values())


def seed_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, configuration): the first seed's row with top-1 averaged over its seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["config"]), []).append(r)
    return [{**g[0], "seeds": len(g), "top1_simulation": float(np.mean([r["top1_simulation"] for r in g]))}
            for g in groups.values()]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per model (their sizes differ by orders of magnitude): mixed budgets and uniform widths,
    top-1 averaged over the seeds measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = seed_means(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        mixed = sorted((r["packed_bytes"], r["top1_simulation"]) for r in mine if r["budget_bytes"])
        uniform = sorted((r["packed_bytes"], r["top1_simulation"]) for r in mine if not r["budget_bytes"])
        if mixed:
            ax.plot(*zip(*mixed, strict=True), "o-", label="mixed")
        if uniform:
            ax.plot(*zip(*uniform, strict=True), "s--", label="uniform")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("packed weight bytes")
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| model | weights | seed | budget | packed bytes | layers per width | top-1 (simulation) | "
          "EPTQ time (Hessian) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        widths = ", ".join(f"{n}x{b}" for b, n in sorted(r["widths"].items(), reverse=True))
        budget = f"{r['budget_bytes']:,} B" if r["budget_bytes"] else "-"
        print(f"| {r['model']} | {r['config']} | {r.get('seed', 0)} | {budget} | {r['packed_bytes']:,} B | {widths} | "
              f"{r['top1_simulation']:.2f} % | {r['quantize_s']} s ({r['hessian_s']} s) |")
    for m in seed_means(rows):
        if m["seeds"] > 1:
            print(f"| {m['model']} | {m['config']} | mean of {m['seeds']} | | | | {m['top1_simulation']:.2f} % | |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20,resnet56", help="comma-separated models")
    p.add_argument("--avg", default=None, help="budgets as average bits per weight (default 2.5,3,3.5; Lite0 4.5; '' for none)")
    p.add_argument("--uniform", default=None, help="uniform widths (default 4,2; Lite0 8,4; '' for none)")
    p.add_argument("--seed", type=int, default=0, help="EPTQ's seed (rows of several seeds are averaged in the plot)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--plot", type=Path, default=Path(__file__).resolve().parent / "mixed_precision_curve.png")
    p.add_argument("--report", action="store_true", help="only print the table and draw the plot from --results")
    args = p.parse_args(argv)
    if args.report:
        rows = latest_rows(args.results)
        if rows:
            plot(rows, args.plot)
        print_table(rows)
        return 0
    if shared_data_dir() is None:
        print("skipped: benchmark data not found (set EPTQ_DATA_DIR to the shared data folder)")
        return 0
    args.results.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    rows: list[dict[str, Any]] = []
    for model in args.model.split(","):
        lite = model == "efficientnet_lite0"
        budgets = args.avg if args.avg is not None else ("4.5" if lite else "2.5,3,3.5")
        avgs = [float(a) for a in budgets.split(",") if a]
        widths = args.uniform if args.uniform is not None else ("8,4" if lite else "4,2")
        uniform = [int(b) for b in widths.split(",") if b]
        try:
            data = load_dataset(model, 500 if lite else None)
        except Skip as e:
            emit({"model": model, "skipped": str(e)}, args.results, rows)
            continue
        for avg in avgs:
            emit(row(model, f"mixed {avg:g} bits/weight", avg, None, data, args.seed), args.results, rows)
        for bits in uniform:
            emit(row(model, f"uniform W{bits}", None, bits, data, args.seed), args.results, rows)
    done = [r for r in rows if "skipped" not in r]
    if done:
        plot(latest_rows(args.results), args.plot)
    print_table(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
