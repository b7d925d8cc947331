"""IMX500 benchmark: our quantized models through Sony's IMX500 converter, and the same ONNX file on
onnxruntime with mct-quantizers' ops against our simulation.

Rows: resnet20 and resnet56 under ``imx500`` at 8-bit weights (PTQ) and 4-bit weights (EPTQ), and
EfficientNet-Lite0 at 8 bits (PTQ), each quantized for the ``imx500`` target and exported (the
export runs ``imxconv-pt``). Reported: the converter's verdict (fits or not), memory used of the
sensor's 8 MB and the margin, conversion time, top-1 of the ONNX file on onnxruntime with
mct-quantizers' ops, and its agreement with the simulation (identical argmax, largest output
difference in LSBs) on the 10,000 CIFAR-10 test images or 500 ImageNet samples.

    python tools/bench_imx500.py                             # every row
    python tools/bench_imx500.py --model resnet20 --config w4-eptq

Needs the imx500 toolchain (``eptq-deploy toolchain install imx500``, Java 17). One JSON line per
row on stdout, appended to ``--results``; a Markdown table ends the output.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# same folder (tools/ is the script's path): data, models and the result writer of the other benchmarks
from bench_accuracy import Skip, load_dataset, load_model
from bench_ethos_u import top1
from bench_mlperf_tiny import emit

import eptq_deploy
from eptq_deploy.float_exec import unpack
from eptq_deploy.targets import get_target
from eptq_deploy.zoo import shared_data_dir

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "bench_imx500.jsonl"
#: configuration -> (weight bits, method)
CONFIGS = {"w8-ptq": (8, "ptq"), "w4-eptq": (4, "eptq")}
ROWS = [("resnet20", "w8-ptq"), ("resnet20", "w4-eptq"), ("resnet56", "w8-ptq"), ("resnet56", "w4-eptq"),
        ("efficientnet_lite0", "w8-ptq")]


def row(model: str, config: str) -> dict[str, Any]:
    bits, method = CONFIGS[config]
    calib, x, y = load_dataset(model, 500 if model == "efficientnet_lite0" else None)
    t0 = time.perf_counter()
    qm = eptq_deploy.quantize(load_model(model), calib, profile="imx500", weight_bits=bits, targets=["imx500"],
                              method=method, seed=0, progress=False)
    quantize_s = round(time.perf_counter() - t0, 1)
    with tempfile.TemporaryDirectory() as d:
        t1 = time.perf_counter()
        bundle = eptq_deploy.export(qm, out=Path(d) / "b")
        convert_s = round(time.perf_counter() - t1, 1)
        chip = json.loads((bundle / "manifest.json").read_text())["targets"]["imx500"]["inspect"]["imx500"]
        runner = eptq_deploy.load(bundle, "imx500")
        rt = np.concatenate([np.asarray(runner.run(x[i:i + 1000].numpy())) for i in range(0, len(x), 1000)])
    sim = np.concatenate([np.asarray(unpack(qm.simulate(x[i:i + 1000], "imx500"))[0]) for i in range(0, len(x), 1000)])
    scale = float(qm.graph.tensors[qm.graph.outputs[0]].quant.scale[0])
    return {"model": model, "config": config, "images": len(y), "fit": chip["fit"],
            "memory_used_bytes": chip["memory_used_bytes"], "memory_total_bytes": chip["memory_total_bytes"],
            "memory_margin_bytes": chip["memory_margin_bytes"], "converter_version": chip["converter_version"],
            "converter_warnings": chip["warnings"], "quantize_s": quantize_s, "export_and_convert_s": convert_s,
            "top1_onnxruntime": top1(rt, y), "top1_simulation": top1(sim, y),
            "argmax_agreement_vs_simulation": round(100 * float(np.mean(rt.argmax(1) == sim.argmax(1))), 2),
            "max_diff_lsb": float(np.abs(rt.astype(np.float64) - sim).max() / scale),
            "exact_outputs": round(100 * float(np.mean(np.abs(rt.astype(np.float64) - sim) < scale / 2)), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="comma-separated models (default: every row's)")
    p.add_argument("--config", default=None, help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    if shared_data_dir() is None:
        print("skipped: benchmark data not found (set EPTQ_DATA_DIR to the shared data folder)")
        return 0
    get_target("imx500").ready()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    rows: list[dict[str, Any]] = []
    for model, config in ROWS:
        if (args.model and model not in args.model.split(",")) or (args.config and config not in args.config.split(",")):
            continue
        try:
            emit(row(model, config), args.results, rows)
        except Skip as e:
            emit({"model": model, "config": config, "skipped": str(e)}, args.results, rows)
    print("\n| model | weights, method | converter | memory used of 8 MB (margin) | convert | top-1 onnxruntime "
          "(simulation) | argmax = simulation | max diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "skipped" not in r:
            print(f"| {r['model']} | {r['config']} | {'fits' if r['fit'] else 'does not fit'} ({r['converter_version']}) | "
                  f"{r['memory_used_bytes'] / 1024:.0f} KiB ({r['memory_margin_bytes'] / 1024:.0f} KiB) | "
                  f"{r['export_and_convert_s']} s | {r['top1_onnxruntime']:.2f} % ({r['top1_simulation']:.2f} %) | "
                  f"{r['argmax_agreement_vs_simulation']:.2f} % | {r['max_diff_lsb']:.0f} LSB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
