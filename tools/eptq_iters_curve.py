"""Accuracy versus EPTQ iterations on a CIFAR-10 ResNet: the curve behind the default budget.

    python tools/eptq_iters_curve.py --model resnet20 --profile imx500 --weight-bits 4 \\
        --iters 0,100,200,400,800,1600

Prints one JSON line per point (appended to ``--results``; points already there are
re-used) and writes a PNG plot of simulated top-1 (exact integer simulation, 10,000
test images) and quantization wall time against iterations. ``0`` iterations is PTQ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import eptq_deploy
from eptq_deploy.models import load_model
from eptq_deploy.preprocess import preprocess_uint8
from eptq_deploy.zoo import shared_data_dir

HERE = Path(__file__).resolve().parent


def load_cifar(root: Path, eval_limit: int | None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    train = np.load(root / "cifar10" / "train_subset5000_jpeg_q75.npz")
    test = np.load(root / "cifar10" / "test_jpeg_q75.npz")
    idx = np.random.RandomState(0).permutation(5000)[:1024]
    n = eval_limit or len(test["labels"])
    return (preprocess_uint8(train["images"][idx], "cifar"), preprocess_uint8(test["images"][:n], "cifar"),
            test["labels"][:n])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--profile", default="imx500")
    ap.add_argument("--weight-bits", type=int, default=4)
    ap.add_argument("--iters", default="0,100,200,400,800,1600")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "eptq_iters_curve.jsonl")
    ap.add_argument("--plot", type=Path, default=HERE / "eptq_iters_curve.png")
    a = ap.parse_args()
    root = shared_data_dir()
    if root is None or not (root / "cifar10" / "test_jpeg_q75.npz").exists():
        print("eptq_iters_curve: skipped: ../shared/data (or EPTQ_DATA_DIR) with cifar10/ is not present")
        return 0
    torch.set_num_threads(a.threads)
    calib, test_x, test_y = load_cifar(root, a.eval_limit)
    model, _ = load_model(a.model)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if a.results.exists():
        for line in a.results.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["profile"], r["weight_bits"], r["iters"], r["eval_samples"])] = r
    rows = []
    for it in [int(v) for v in a.iters.split(",")]:
        key = (a.model, a.profile, a.weight_bits, it, len(test_y))
        if key in done:
            rows.append(done[key])
            print(json.dumps(done[key]))
            continue
        t0 = time.perf_counter()
        if it == 0:
            qm = eptq_deploy.quantize(model, calib, profile=a.profile, weight_bits=a.weight_bits, method="ptq",
                                      targets="onnx-qdq", progress=False)
        else:
            qm = eptq_deploy.quantize(model, calib, profile=a.profile, weight_bits=a.weight_bits, method="eptq",
                                      targets="onnx-qdq", iters=it, progress=False)
        wall = time.perf_counter() - t0
        pred = qm.simulate(test_x).numpy().argmax(1)
        r = {"model": a.model, "profile": a.profile, "weight_bits": a.weight_bits, "iters": it,
             "eval_samples": int(len(test_y)), "top1_simulation": float(np.mean(pred == test_y)),
             "quant_time_s": round(wall, 1), "threads": a.threads, "timings_s": qm.info["timings_s"]}
        with open(a.results, "a") as f:
            f.write(json.dumps(r) + "\n")
        rows.append(r)
        print(json.dumps(r), flush=True)
    plot(rows, a.plot)
    print("\n| iters | top-1 (sim) | quantization s |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['iters']} | {100 * r['top1_simulation']:.2f} | {r['quant_time_s']} |")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["iters"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [max(r["iters"], 1) for r in rows]
    ax.plot(xs, [100 * r["top1_simulation"] for r in rows], "o-", color="#3a6ea5")
    ax.set_xscale("log")
    ax.set_xlabel("EPTQ iterations (1 = PTQ, no optimisation)")
    ax.set_ylabel("top-1 % (exact integer simulation)", color="#3a6ea5")
    tx = ax.twinx()
    tx.plot(xs, [r["quant_time_s"] for r in rows], "s--", color="#a55a3a")
    tx.set_ylabel("quantization wall time (s)", color="#a55a3a")
    r0 = rows[0]
    ax.set_title(f"{r0['model']} {r0['profile']} W{r0['weight_bits']}, 2 CPU threads")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
