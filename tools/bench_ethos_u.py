"""Ethos-U benchmark: our int8 files compiled by Arm's Vela, beside TensorFlow's reference int8 files
compiled the same way.

Each model is quantized with PTQ under ``tflite-int8`` for the ``ethos-u`` target (Vela 5.2.0,
``--accelerator`` default ethos-u55-128, Vela's Arm/vela.ini system configuration and memory mode
for the NPU family), exported, and the int8 file is run on ai-edge-litert for top-1 (the file the
NPU build is compiled from; the NPU itself is not simulated). Vela's summary gives SRAM, flash,
NPU cycles and inferences per second at the configured clock, and the compiled file the ops left
on the CPU. MLPerf Tiny's reference int8 files (TensorFlow's converter) are compiled with the same
command and scored on the same images.

Models and data: resnet20 and resnet56 (CIFAR-10: 1,024 training images calibrate, 10,000 test
images score), EfficientNet-Lite0 (ImageNet samples: one half calibrates, 500 of the other score),
MLPerf Tiny ResNet-8 (its float .tflite; CIFAR-10 as above) and VWW MobileNetV1 (its float
.tflite; the even-numbered 500 images calibrate, the odd-numbered 500 score, ours and the
reference alike).

    python tools/bench_ethos_u.py                      # every model
    python tools/bench_ethos_u.py --model vww --accelerator ethos-u65-256

Needs the ethos-u toolchain (``eptq-deploy toolchain install ethos-u``). One JSON line per row on
stdout, appended to ``--results``; a Markdown table ends the output. Without the shared data the
script prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# same folder (tools/ is the script's path): data loaders and runners of the other benchmarks
from bench_accuracy import Skip, load_dataset, load_model
from bench_mlperf_tiny import MODELS as MLPERF
from bench_mlperf_tiny import emit, run_tflite
from bench_mlperf_tiny import load_data as load_mlperf

import eptq_deploy
from eptq_deploy.targets import get_target
from eptq_deploy.targets.ethos_u import compile_tflite, vela_report
from eptq_deploy.zoo import shared_data_dir

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "bench_ethos_u.jsonl"
ZOO = ("resnet20", "resnet56", "efficientnet_lite0")
ALL = (*ZOO, "resnet8", "vww")


def datasets(root: Path, model: str) -> tuple[Any, torch.Tensor, np.ndarray, np.ndarray, Path | None]:
    """(model or file, calibration data, evaluation data in the model's layout, labels, reference int8 file)."""
    if model in ZOO:
        calib, x, y = load_dataset(model, 500 if model == "efficientnet_lite0" else None)
        return load_model(model), calib, x.numpy(), y, None
    m = MLPERF[model]
    images, labels, folds = load_mlperf(root, model)
    calib, scored = folds[0]  # VWW: the even half calibrates, the odd half scores; ResNet-8: train / test
    folder = root / "mlperf_tiny" / m["folder"]
    return folder / m["tflite"], torch.from_numpy(calib), images[scored], labels[scored], folder / m["reference"]


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return round(100 * float(np.mean(np.asarray(logits).reshape(len(labels), -1).argmax(1) == labels)), 2)


def chip_row(report: dict[str, Any]) -> dict[str, Any]:
    keep = ("accelerator", "system_config", "memory_mode", "sram_bytes", "off_chip_flash_bytes", "npu_cycles",
            "inferences_per_second", "npu_ops", "cpu_ops")
    return {k: report[k] for k in keep}


def ours(model: str, source: Any, calib: torch.Tensor, x: np.ndarray, y: np.ndarray, opts: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    qm = eptq_deploy.quantize(source, calib, profile="tflite-int8", targets=["ethos-u"], method="ptq", seed=0,
                              progress=False, target_options={"ethos-u": opts})
    seconds = round(time.perf_counter() - t0, 1)
    with tempfile.TemporaryDirectory() as d:
        t1 = time.perf_counter()
        bundle = eptq_deploy.export(qm, out=Path(d) / "bundle")
        export_s = round(time.perf_counter() - t1, 1)
        runner = eptq_deploy.load(bundle, "ethos-u")
        logits = np.concatenate([np.asarray(runner.run(x[i:i + 256])) for i in range(0, len(x), 256)])
        chip = vela_report(bundle / "ethos-u")
    return {"model": model, "file": "ours (PTQ, tflite-int8)", "top1": top1(logits, y), "images": len(y),
            "quantize_s": seconds, "export_and_compile_s": export_s, **chip_row(chip)}


def reference(model: str, path: Path, x: np.ndarray, y: np.ndarray, opts: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(path, Path(d) / "model.tflite")
        t0 = time.perf_counter()
        compile_tflite(Path(d), "model.tflite", opts)
        compile_s = round(time.perf_counter() - t0, 1)
        chip = vela_report(Path(d))
    return {"model": model, "file": f"reference ({path.name})", "top1": top1(run_tflite(path, x), y),
            "images": len(y), "export_and_compile_s": compile_s, **chip_row(chip)}


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| model | file | top-1 | SRAM | flash | NPU cycles | inferences/s | ops on the CPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "skipped" in r:
            continue
        print(f"| {r['model']} | {r['file']} | {r['top1']:.2f} % ({r['images']}) | {r['sram_bytes'] / 1024:.1f} KiB | "
              f"{(r['off_chip_flash_bytes'] or 0) / 1024:.1f} KiB | {r['npu_cycles']:,.0f} | "
              f"{r['inferences_per_second']:.1f} | {', '.join(r['cpu_ops']) or 'none'} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=",".join(ALL), help=f"comma-separated: {', '.join(ALL)}")
    p.add_argument("--accelerator", default="ethos-u55-128")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    root = shared_data_dir()
    if root is None:
        print("skipped: benchmark data not found (set EPTQ_DATA_DIR to the shared data folder)")
        return 0
    target = get_target("ethos-u")
    target.ready()
    opts = target.check_options({"accelerator": args.accelerator})
    args.results.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    rows: list[dict[str, Any]] = []
    for model in args.model.split(","):
        try:
            source, calib, x, y, ref = datasets(root, model)
        except Skip as e:
            emit({"model": model, "skipped": str(e)}, args.results, rows)
            continue
        emit(ours(model, source, calib, x, y, opts), args.results, rows)
        if ref is not None:
            emit(reference(model, ref, x, y, opts), args.results, rows)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
