"""ONNX reader benchmark: the CIFAR ResNets quantized from their ONNX exports against from the module.

Each model is exported by ``torch.onnx.export`` with the legacy exporter (opset 17) and with
the dynamo exporter (opset 18, needs onnxscript), read back with the ONNX reader (read time
and peak RSS of the read), and quantized with PTQ and EPTQ (``--iters``) from the module and
from each file on the same 1,024 calibration images (the first of ``RandomState(0)``'s
permutation of the training subset) and seed. Top-1 is the ``onnx-qdq`` simulation's on the
CIFAR-10 test set (bit-exact with onnxruntime, see bench_accuracy.py); the goal is the same
accuracy from the file as from the module, within 0.1 point.

    python tools/bench_onnx_reader.py --model resnet20 --method ptq
    python tools/bench_onnx_reader.py --model all --method ptq,eptq

One JSON line per (model, source, method) on stdout, appended to ``--results``; a Markdown
table ends the output. Without the shared data the script prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

import eptq_deploy
from eptq_deploy.preprocess import preprocess_uint8
from eptq_deploy.read_onnx import read
from eptq_deploy.zoo import BUILTIN_MODELS, load_cifar_resnet, shared_data_dir

MODELS = [n for n, spec in BUILTIN_MODELS.items() if spec.preset == "cifar"]
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "bench_onnx_reader.jsonl"


def peak_rss_during(fn):  # noqa: ANN001, ANN201  (a tiny sampler, as in bench_accuracy.py)
    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    before = proc.memory_info().rss
    t.start()
    try:
        out = fn()
    finally:
        stop.set()
        t.join()
    return out, max(peak[0], before) - before


def export(model: torch.nn.Module, path: Path, dynamo: bool) -> None:
    x = torch.randn(1, 3, 32, 32)
    if dynamo:
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, verbose=False)
    else:
        torch.onnx.export(model, x, str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", help="comma-separated CIFAR ResNets, or all")
    p.add_argument("--method", default="ptq", help="comma-separated: ptq, eptq")
    p.add_argument("--iters", type=int, default=800)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    root = shared_data_dir()
    if root is None or not (root / "cifar10" / "test_jpeg_q75.npz").is_file():
        print("skipped: CIFAR-10 data not found (set EPTQ_DATA_DIR to the shared data folder)")
        return 0
    with np.load(root / "cifar10" / "train_subset5000_jpeg_q75.npz") as f:
        train = f["images"]
    calib = preprocess_uint8(train[np.random.RandomState(0).permutation(len(train))[:1024]], "cifar")
    with np.load(root / "cifar10" / "test_jpeg_q75.npz") as f:
        images, labels = f["images"][: args.eval_limit], f["labels"][: args.eval_limit]
    test = preprocess_uint8(images, "cifar")
    try:
        import onnxscript  # noqa: F401
        exporters = ["legacy", "dynamo"]
    except ImportError:
        exporters = ["legacy"]
        print("dynamo exporter skipped: pip install onnxscript", file=sys.stderr)
    models = MODELS if args.model == "all" else args.model.split(",")
    rows = []
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for name in models:
        module = load_cifar_resnet(int(name.removeprefix("resnet")), BUILTIN_MODELS[name].default_weights()).eval()
        with tempfile.TemporaryDirectory() as d:
            sources: dict[str, object] = {"module": module}
            read_facts: dict[str, tuple[float, int]] = {}
            for exp in exporters:
                path = Path(d) / f"{name}-{exp}.onnx"
                export(module, path, exp == "dynamo")
                t0 = time.perf_counter()
                _, rss = peak_rss_during(lambda path=path: read(path))
                read_facts[exp] = (time.perf_counter() - t0, rss)
                sources[exp] = path
            for method in args.method.split(","):
                opts = {"iters": args.iters} if method != "ptq" else {}
                for src_name, src in sources.items():
                    t0 = time.perf_counter()
                    qm = eptq_deploy.quantize(src, calib, profile="int8-pot", targets=["onnx-qdq"], method=method,
                                              seed=0, progress=False, **opts)
                    seconds = time.perf_counter() - t0
                    top1 = float((qm.simulate(test).argmax(1).numpy() == labels).mean())
                    row = {"model": name, "source": src_name, "method": method, "top1": round(100 * top1, 2),
                           "quantize_s": round(seconds, 1), "eval_images": len(labels)}
                    if src_name in read_facts:
                        row["read_s"] = round(read_facts[src_name][0], 2)
                        row["read_peak_rss_mib"] = round(read_facts[src_name][1] / 2**20, 1)
                    print(json.dumps(row), flush=True)
                    with open(args.results, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    rows.append(row)
    print("\n| model | method | source | top-1 | quantize | read | read peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        read_cols = (f"{r['read_s']} s | {r['read_peak_rss_mib']} MiB" if "read_s" in r else "- | -")
        print(f"| {r['model']} | {r['method']} | {r['source']} | {r['top1']:.2f} % | {r['quantize_s']} s | {read_cols} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
