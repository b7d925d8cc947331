"""What the Hessian buys, and how many images you need: top-1 against calibration-set size.

Rows (``--row``, default all, in this order): resnet20 imx500 W2, resnet20 W3
(``tools/profiles/imx500-w3.yaml``), resnet56 W2, EfficientNet-Lite0 imx500 W4. Each row is
quantized from 64, 256 and 1,024 calibration images (Lite0: 64, 256, 500) with EPTQ's label-free
Hessian sample attention (``hessian="eptq"``) and with uniform attention (``hessian="none"``, the
default), same iteration budget (the defaults); AdaRound-style layer-wise optimisation and plain PTQ at the largest size only.
The resnet20 rows run seeds 0, 1, 2 at 64 and 1,024 images (``--seeds``, ``--seed-sizes``).

The calibration images: the benchmark's set (the 1,024 CIFAR-10 training images of
``bench_accuracy.py``, or the 500-image calibration half of the ImageNet samples); a smaller
size takes ``RandomState(1000 + seed).choice`` of them, so a seed changes both the images and the
optimisation's random draws (batches, activation-quantization masks). At the full size every
seed sees the same images and only the optimisation's draws differ.

Top-1 is the simulation's (onnx-qdq's rule; every runtime is bit-exact with it, tested) on the
10,000 CIFAR-10 test images or the 500 held-out ImageNet samples.

    python tools/bench_calibration_size.py                      # everything (about 4-5 h on 2 cores)
    python tools/bench_calibration_size.py --row resnet20-w2 --row resnet20-w3
    python tools/bench_calibration_size.py --row lite0-w4 --size 500 --method "eptq, uniform attention"
    python tools/bench_calibration_size.py --report             # table and plot from the results so far

One JSON line per run goes to stdout and is appended to ``--results``; a run already there is
skipped, so the study survives interruptions. ``--report`` (or the end of a run) prints the table
(mean and spread over seeds) and draws ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

# same folder (tools/ is the script's path): data, models and the result writer of the other benchmarks
from bench_accuracy import Skip, load_dataset, load_model
from bench_ethos_u import top1
from bench_mixed_precision import simulated_outputs

import eptq_deploy
from eptq_deploy.float_exec import unpack
from eptq_deploy.zoo import shared_data_dir

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "bench_calibration_size.jsonl"
DEFAULT_PLOT = HERE / "calibration_size.png"
TARGET = "onnx-qdq"

#: row name -> (model, profile, weight bits)
ROWS: dict[str, tuple[str, str, int]] = {
    "resnet20-w2": ("resnet20", "imx500", 2),
    "resnet20-w3": ("resnet20", str(HERE / "profiles" / "imx500-w3.yaml"), 3),
    "resnet56-w2": ("resnet56", "imx500", 2),
    "lite0-w4": ("efficientnet_lite0", "imx500", 4),
}
#: method label -> (quantize's method, its options)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "eptq, Hessian attention": ("eptq", {"hessian": "eptq"}),
    "eptq, uniform attention": ("eptq", {"hessian": "none"}),
    "adaround (layer-wise)": ("adaround", {}),
    "ptq": ("ptq", {}),
}
EVERY_SIZE = ("eptq, Hessian attention", "eptq, uniform attention")
#: rows of earlier revisions kept in the report (not run again): the attention before each
#: layer's scores were scaled to mean 1 (layers weighted against each other by their scores)
EARLIER = ("eptq, Hessian attention across layers (earlier revision)",)


def subset(calib: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """``size`` of the calibration images; all of them, in order, at the full size."""
    if size >= len(calib):
        return calib
    return calib[np.sort(np.random.RandomState(1000 + seed).choice(len(calib), size, replace=False))]


def plan(row: str, seeds: list[int], seed_sizes: list[int]) -> list[tuple[int, str, int]]:
    """(size, method label, seed) of every run of ``row``, cheapest information first."""
    lite = row.startswith("lite0")
    sizes = [64, 256, 500] if lite else [64, 256, 1024]
    runs = [(s, m, 0) for s in sizes for m in EVERY_SIZE]
    runs += [(sizes[-1], m, 0) for m in METHODS if m not in EVERY_SIZE]
    if row.startswith("resnet20"):
        runs += [(s, m, seed) for seed in seeds if seed != 0 for s in seed_sizes for m in EVERY_SIZE]
    return runs


def key(r: dict[str, Any]) -> tuple[str, int, str, int]:
    return r["row"], r["calibration_images"], r["method"], r["seed"]


def float_agreement(qm: Any, x: torch.Tensor, sim: np.ndarray | None = None) -> float:
    """Share (%) of ``x`` whose simulated top class (``sim``: the simulation's outputs, if already
    computed) is the float model's: on the calibration images against the held-out ones, it
    shows how much the optimisation fitted its own set."""
    sim = simulated_outputs(qm, x, TARGET) if sim is None else sim
    ref = np.concatenate([np.asarray(unpack(qm.forward_float(x[i:i + 500]))[0]) for i in range(0, len(x), 500)])
    return round(float((sim.argmax(1) == ref.argmax(1)).mean()) * 100, 2)


def run(row: str, size: int, label: str, seed: int, data: tuple[Any, Any, Any]) -> dict[str, Any]:
    model, profile, bits = ROWS[row]
    calib, x, y = data
    method, options = METHODS[label]
    t0 = time.perf_counter()
    qm = eptq_deploy.quantize(load_model(model), subset(calib, size, seed), profile=profile, weight_bits=bits,
                              targets=[TARGET], method=method, seed=seed, progress=False, **options)
    seconds = round(time.perf_counter() - t0, 1)
    timings = qm.info.get("timings_s", {})
    sim = simulated_outputs(qm, x, TARGET)  # one simulation of the held-out images serves both scores
    return {"row": row, "model": model, "weight_bits": bits, "calibration_images": size, "method": label,
            "seed": seed, "images": len(y), "top1_simulation": top1(sim, y), "quantize_s": seconds,
            "hessian_s": timings.get("hessian"), "optimisation_s": timings.get("optimisation"),
            "float_agreement_calibration": float_agreement(qm, subset(calib, size, seed)),
            "float_agreement_held_out": float_agreement(qm, x, sim)}


def read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(rows: list[dict[str, Any]], field: str = "top1_simulation") -> dict[tuple[str, str, int], list[float]]:
    """(row, method, size) -> ``field`` of every seed measured (where the run recorded it)."""
    out: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        if r.get(field) is not None:
            out[(r["row"], r["method"], r["calibration_images"])].append(r[field])
    return out


def report(rows: list[dict[str, Any]], plot_path: Path | None) -> None:
    cells = summarise(rows)
    fit = {k: summarise(rows, f"float_agreement_{k}") for k in ("calibration", "held_out")}
    print("\n| row | method | images | top-1 mean | spread (min..max) | seeds | argmax = float: calibration / held-out |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    labels = list(METHODS) + list(EARLIER)
    for (row, label, size), acc in sorted(cells.items(), key=lambda kv: (list(ROWS).index(kv[0][0]),
                                                                           labels.index(kv[0][1]), kv[0][2])):
        spread = f"{min(acc):.2f}..{max(acc):.2f}" if len(acc) > 1 else "-"
        agree = " / ".join(f"{np.mean(fit[k][(row, label, size)]):.2f} %" if fit[k].get((row, label, size)) else "-"
                           for k in ("calibration", "held_out"))
        print(f"| {row} | {label} | {size} | {np.mean(acc):.2f} % | {spread} | {len(acc)} | {agree} |")
    if plot_path is not None and cells:
        plot(cells, plot_path)
        print(f"\nplot: {plot_path}")


def plot(cells: dict[tuple[str, str, int], list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r for r in ROWS if any(k[0] == r for k in cells)]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, row in zip(axes[0], names, strict=True):
        for label in list(METHODS) + list(EARLIER):
            pts = sorted((size, acc) for (r, m, size), acc in cells.items() if r == row and m == label)
            if not pts:
                continue
            sizes = [p[0] for p in pts]
            mean = [float(np.mean(p[1])) for p in pts]
            lo = [m - min(p[1]) for m, p in zip(mean, pts, strict=True)]
            hi = [max(p[1]) - m for m, p in zip(mean, pts, strict=True)]
            style = "o-" if label in EVERY_SIZE else ("x:" if label in EARLIER else "s")
            ax.errorbar(sizes, mean, yerr=[lo, hi], fmt=style, capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(row, fontsize=9)
        ax.set_xlabel("calibration images")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", action="append", choices=list(ROWS), help="rows to run (default: all, in order)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the resnet20 rows (default 0,1,2)")
    p.add_argument("--seed-sizes", default="64,1024", help="sizes the extra seeds run at (default 64,1024)")
    p.add_argument("--size", type=int, action="append", help="only these calibration-set sizes (default: every one)")
    p.add_argument("--method", action="append", choices=list(METHODS), help="only these methods (default: every one)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    p.add_argument("--report", action="store_true", help="only print the table and draw the plot from --results")
    args = p.parse_args(argv)
    done = read(args.results)
    if args.report:
        report(done, args.plot)
        return 0
    if shared_data_dir() is None:
        print("skipped: benchmark data not found (set EPTQ_DATA_DIR to the shared data folder)")
        return 0
    args.results.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    seen = {key(r) for r in done}
    seeds = [int(s) for s in args.seeds.split(",")]
    seed_sizes = [int(s) for s in args.seed_sizes.split(",")]
    for row in args.row or list(ROWS):
        model = ROWS[row][0]
        try:
            data = load_dataset(model, None)
        except Skip as e:
            print(json.dumps({"row": row, "skipped": str(e)}), flush=True)
            continue
        for size, label, seed in plan(row, seeds, seed_sizes):
            if (row, size, label, seed) in seen or (args.size and size not in args.size) or (
                    args.method and label not in args.method):
                continue
            r = run(row, size, label, seed, data)
            print(json.dumps(r), flush=True)
            with args.results.open("a") as f:
                f.write(json.dumps(r) + "\n")
            done.append(r)
    report(done, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
