"""EPTQ on a CUDA GPU: wall time of each phase and the exact simulated top-1.

    python tools/gpu_eptq_timing.py --data-dir ../shared/data --rows resnet20:4,resnet56:4

The optimisation runs on the GPU when one is present (``EptqConfig.device``
default); capture, calibration and Hessian scores stay on the CPU; the simulated
top-1 is the exact integer simulation on the CPU over the 10,000 JPEG test images.
Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import eptq_deploy
from eptq_deploy.preprocess import preprocess_uint8
from eptq_deploy.zoo import load_cifar_resnet


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("EPTQ_DATA_DIR", "../shared/data")))
    ap.add_argument("--rows", default="resnet20:4,resnet56:4", help="model:weight_bits, comma-separated")
    ap.add_argument("--profile", default="imx500")
    ap.add_argument("--iters", type=int, default=None)
    a = ap.parse_args()
    d = a.data_dir
    if not (d / "cifar10" / "test_jpeg_q75.npz").exists():
        print(f"gpu_eptq_timing: skipped: no cifar10 data under {d}")
        return 0
    tr = np.load(d / "cifar10" / "train_subset5000_jpeg_q75.npz")
    te = np.load(d / "cifar10" / "test_jpeg_q75.npz")
    calib = preprocess_uint8(tr["images"][np.random.RandomState(0).permutation(5000)[:1024]], "cifar")
    test_x, test_y = preprocess_uint8(te["images"], "cifar"), te["labels"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    for row in a.rows.split(","):
        name, bits = row.split(":")
        depth = int(name.removeprefix("resnet"))
        ckpt = next((d / "models" / "resnet_cifar10").glob(f"resnet{depth}-*.th"))
        model = load_cifar_resnet(depth, ckpt)
        opts = {} if a.iters is None else {"iters": a.iters}
        t0 = time.perf_counter()
        qm = eptq_deploy.quantize(model, calib, profile=a.profile, weight_bits=int(bits), method="eptq",
                                  targets="onnx-qdq", progress=False, **opts)
        wall = time.perf_counter() - t0
        top1 = float(np.mean(qm.simulate(test_x).numpy().argmax(1) == test_y))
        print(json.dumps({"model": name, "profile": a.profile, "weight_bits": int(bits), "device": device,
                          "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                          "quant_time_s": round(wall, 1), "timings_s": qm.info["timings_s"],
                          "eptq_device": qm.info["eptq_log"].get("device"), "top1_simulation": top1}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
