"""MLPerf Tiny benchmark: our tflite-int8 files from the reference models' own float files against
the reference int8 files TensorFlow's converter made, all run on the TFLite interpreter.

Models (``$EPTQ_DATA_DIR/mlperf_tiny``): the image-classification ResNet-8 (CIFAR-10, input raw
0..255 RGB NHWC) read from its float ``.tflite`` and from its Keras ``.h5``, and the Visual Wake
Words MobileNetV1 (96x96, input x / 255) from its ``.h5`` and float ``.tflite``. Each source is
read by eptq-deploy's reader (read time and peak RSS of the read), quantized with PTQ and EPTQ
under the ``tflite-int8`` profile (8-bit) and with EPTQ under ``imx500 --weight-bits 4``, exported
to a ``tflite-int8`` bundle, and that file is run on ai-edge-litert on the evaluation images:
top-1 and argmax agreement with the float file (run on the same interpreter). The reference
int8 file is run on the same images.

Data: ResNet-8 calibrates on 1,024 images of the CIFAR-10 training subset and is evaluated on
the 10,000-image JPEG test set. VWW has one labelled set of 1,000 images, so it is scored in
two folds: the model calibrated on the even-numbered 500 scores the odd-numbered ones and vice
versa, every image scored once by a model it did not calibrate (``quantize_s`` is per fold);
the float and reference files are scored on the same 1,000.

    python tools/bench_mlperf_tiny.py                       # every model, source and configuration
    python tools/bench_mlperf_tiny.py --model resnet8 --source tflite --config ptq-w8

One JSON line per row on stdout, appended to ``--results``; a Markdown table ends the output.
Without the shared data the script prints one line and exits 0; an ``.h5`` row without
TensorFlow installed (``pip install -e ".[keras]"``) is printed as skipped.
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

# same folder (tools/ is the script's path): one RSS sampler for the reader benchmarks
from bench_onnx_reader import peak_rss_during

import eptq_deploy
from eptq_deploy.errors import EptqError
from eptq_deploy.readers import read_model_file
from eptq_deploy.zoo import shared_data_dir

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "bench_mlperf_tiny.jsonl"
MODELS = {
    "resnet8": {"folder": "resnet8_cifar10", "h5": "pretrainedResnet.h5", "tflite": "pretrainedResnet.tflite",
                "reference": "pretrainedResnet_quant.tflite", "scale": 1.0},
    "vww": {"folder": "vww_mobilenetv1_96", "h5": "vww_96.h5", "tflite": "vww_96_float.tflite",
            "reference": "vww_96_int8.tflite", "scale": 1 / 255},
}
#: configuration -> (profile, method, weight bits)
CONFIGS = {"ptq-w8": ("tflite-int8", "ptq", None), "eptq-w8": ("tflite-int8", "eptq", None),
           "eptq-w4": ("imx500", "eptq", 4)}


def load_data(root: Path, model: str) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """(evaluation images, labels, folds): float32 NHWC as the model takes them; each fold is
    (calibration images, indices of the evaluation images it is scored on), the folds' indices
    covering every evaluation image once."""
    scale = np.float32(MODELS[model]["scale"])
    if model == "resnet8":
        with np.load(root / "cifar10" / "train_subset5000_jpeg_q75.npz") as f:
            train = f["images"]
        calib = train[np.random.RandomState(0).permutation(len(train))[:1024]]
        with np.load(root / "cifar10" / "test_jpeg_q75.npz") as f:
            images, labels = f["images"], f["labels"]
        folds = [(calib.astype(np.float32) * scale, np.arange(len(images)))]
    else:  # one labelled set: two folds, each half calibrates the model scored on the other half
        with np.load(root / "mlperf_tiny" / "vww_mobilenetv1_96" / "vww96_1000.npz") as f:
            images, labels = f["images"], f["labels"]
        idx = np.arange(len(images))
        folds = [(images[idx % 2 == k].astype(np.float32) * scale, idx[idx % 2 != k]) for k in (0, 1)]
    return images.astype(np.float32) * scale, labels, folds


def run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    """Outputs of a .tflite file on the interpreter (builtin kernels, the reference file's int8 I/O
    quantized and dequantized with its own parameters), batch by batch."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], [1, *x.shape[1:]])
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    ys = []
    for i in range(len(x)):
        xi = x[i:i + 1]
        if inp["dtype"] == np.int8:
            s, z = inp["quantization"]
            xi = np.clip(np.round(xi / s) + z, -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], xi)
        it.invoke()
        y = it.get_tensor(out["index"])
        if out["dtype"] == np.int8:
            s, z = out["quantization"]
            y = (y.astype(np.float32) - z) * s
        ys.append(y.reshape(1, -1))
    return np.concatenate(ys)


def score(logits: np.ndarray, labels: np.ndarray, float_pred: np.ndarray) -> dict[str, float]:
    pred = logits.argmax(1)
    return {"top1": round(100 * float(np.mean(pred == labels)), 2),
            "agreement_vs_float": round(100 * float(np.mean(pred == float_pred)), 2)}


def emit(row: dict[str, Any], results: Path, rows: list[dict[str, Any]]) -> None:
    print(json.dumps(row), flush=True)
    with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")
    rows.append(row)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet8,vww", help="comma-separated: resnet8, vww")
    p.add_argument("--source", default="tflite,h5", help="comma-separated: tflite, h5")
    p.add_argument("--config", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N images only")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    root = shared_data_dir()
    if root is None or not (root / "mlperf_tiny").is_dir():
        print("skipped: MLPerf Tiny data not found (set EPTQ_DATA_DIR to the shared data folder)")
        return 0
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for model in args.model.split(","):
        spec, folder = MODELS[model], root / "mlperf_tiny" / MODELS[model]["folder"]
        images, labels, folds = load_data(root, model)
        if args.eval_limit is not None:
            images, labels = images[: args.eval_limit], labels[: args.eval_limit]
            folds = [(c, i[i < args.eval_limit]) for c, i in folds]
        float_logits = run_tflite(folder / spec["tflite"], images)
        float_pred = float_logits.argmax(1)
        base = {"model": model, "eval_images": len(labels), "calibration_images": [len(c) for c, _ in folds]}
        emit({**base, "source": spec["tflite"], "config": "float", **score(float_logits, labels, float_pred)},
             args.results, rows)
        emit({**base, "source": spec["reference"], "config": "reference int8 (TensorFlow's converter)",
              **score(run_tflite(folder / spec["reference"], images), labels, float_pred)}, args.results, rows)
        for source in args.source.split(","):
            path = folder / spec[source]
            t0 = time.perf_counter()
            try:
                _, rss = peak_rss_during(lambda path=path: read_model_file(path))
            except EptqError as e:
                emit({**base, "source": path.name, "skipped": str(e)}, args.results, rows)
                continue
            read_facts = {"read_s": round(time.perf_counter() - t0, 2), "read_peak_rss_mib": round(rss / 2**20, 1)}
            for config in args.config.split(","):
                profile, method, bits = CONFIGS[config]
                logits, seconds = np.zeros_like(float_logits), []
                for calib, scored in folds:  # each image scored by the model it did not calibrate
                    t0 = time.perf_counter()
                    qm = eptq_deploy.quantize(path, calib, profile=profile, targets=["tflite-int8"], method=method,
                                              weight_bits=bits, seed=0, progress=False)
                    seconds.append(time.perf_counter() - t0)
                    with tempfile.TemporaryDirectory() as d:
                        runner = eptq_deploy.load(eptq_deploy.export(qm, out=Path(d) / "bundle"))
                        logits[scored] = np.concatenate([runner.run(images[scored[i:i + 250]])
                                                         for i in range(0, len(scored), 250)])
                emit({**base, "source": path.name, "config": config, **score(logits, labels, float_pred),
                      "quantize_s": round(float(np.mean(seconds)), 1), **read_facts}, args.results, rows)
    print("\n| model | source | configuration | top-1 | agreement with float | quantize | read | read peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['model']} | {r['source']} | skipped: {r['skipped']} | | | | | |")
            continue
        extra = (f"{r['quantize_s']} s | {r['read_s']} s | {r['read_peak_rss_mib']} MiB" if "quantize_s" in r
                 else "- | - | -")
        print(f"| {r['model']} | {r['source']} | {r['config']} | {r['top1']:.2f} % | {r['agreement_vs_float']:.2f} % "
              f"| {extra} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
