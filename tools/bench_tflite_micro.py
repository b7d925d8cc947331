"""TFLite Micro handoff figures of the benchmark models: flash, tensor arena, resolver, LUT compression.

For each model and profile the model is quantized with PTQ (64 calibration images: the
figures do not depend on the weights' values, only on their widths) and emitted for
``tflite-micro``; the numbers are the target's own ``inspect`` (the model array's bytes,
the arena TFLM's recording allocator reports, the resolver calls) and one batch-1 run on
TFLM's reference kernels on this machine (indicative: a microcontroller runs other kernels).
Sub-8-bit rows (imx500 at 4 and 2 bits) show TFLM's LUT weight compression: the file
before and after, and the arena before and after (decoded weights live in the arena).

    python tools/bench_tflite_micro.py
    python tools/bench_tflite_micro.py --model resnet20 --profile imx500:4

One JSON line per row on stdout, then a Markdown table. Without the shared benchmark
data the script prints one line saying what is missing and exits 0 ("skipped").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import eptq_deploy
from eptq_deploy.demo import demo_photos
from eptq_deploy.preprocess import preprocess_uint8
from eptq_deploy.targets import get_target
from eptq_deploy.zoo import BUILTIN_MODELS, load_cifar_resnet, shared_data_dir

TARGET = "tflite-micro"
MODELS = ("resnet20", "resnet56", "efficientnet_lite0")
PROFILES = ("int8-pot", "tflite-int8", "imx500:4", "imx500:2")


def calibration(model: str) -> object | None:
    if model == "efficientnet_lite0":
        return demo_photos(32, 0)[0]
    root = shared_data_dir()
    path = root / "cifar10" / "test_jpeg_q75.npz" if root else None
    if path is None or not path.is_file():
        return None
    with np.load(path) as f:
        return preprocess_uint8(f["images"][:64], "cifar")


def network(model: str) -> object | None:
    spec = BUILTIN_MODELS[model]
    if spec.preset != "cifar":
        return spec.factory()
    weights = spec.default_weights()
    return None if weights is None else load_cifar_resnet(int(model.removeprefix("resnet")), weights)


def row(model: str, profile: str) -> dict | None:
    net, x = network(model), calibration(model)
    if net is None or x is None:
        print(f"skipped: {model}'s weights or CIFAR-10 images not found under the data folder (EPTQ_DATA_DIR)")
        return None
    name, _, bits = profile.partition(":")
    qm = eptq_deploy.quantize(net, x, profile=name, weight_bits=int(bits) if bits else None, targets=[TARGET],
                              method="ptq", progress=False)
    t = get_target(TARGET)
    with tempfile.TemporaryDirectory() as d:
        t.emit(qm.graph, Path(d))
        facts = t.inspect(Path(d))
        runner = t.load(Path(d))
        runner.run(x[:1].numpy())  # warm-up
        t0 = time.perf_counter()
        runner.run(x[:1].numpy())
        ms = (time.perf_counter() - t0) * 1e3
    comp = facts["weight_compression"]
    return {"model": model, "profile": profile, "model_bytes": facts["model_bytes"], "arena_bytes": facts["arena_bytes"],
            "resolver_calls": len(facts["resolver"]), "compressed_tensors": comp.get("tensors", 0),
            "model_bytes_uncompressed": comp.get("file_bytes_uncompressed", facts["model_bytes"]),
            "arena_bytes_uncompressed": comp.get("arena_bytes_uncompressed", facts["arena_bytes"]),
            "tflm_reference_ms": round(ms, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=",".join(MODELS), help="comma-separated built-in models")
    p.add_argument("--profile", default=",".join(PROFILES), help="comma-separated profiles, NAME or NAME:WEIGHT_BITS")
    args = p.parse_args(argv)
    rows = []
    for model in args.model.split(","):
        for profile in args.profile.split(","):
            r = row(model, profile)
            if r is None:
                return 0
            print(json.dumps(r), flush=True)
            rows.append(r)
    print("\n| model | profile | model array (flash) | tensor arena | LUT-compressed tensors | "
          "without compression (flash / arena) | resolver calls | TFLM reference, x86 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        before = (f"{r['model_bytes_uncompressed']:,} B / {r['arena_bytes_uncompressed']:,} B"
                  if r["compressed_tensors"] else "-")
        print(f"| {r['model']} | {r['profile']} | {r['model_bytes']:,} B | {r['arena_bytes']:,} B | "
              f"{r['compressed_tensors']} | {before} | {r['resolver_calls']} | {r['tflm_reference_ms']} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
