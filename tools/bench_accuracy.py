"""Accuracy benchmark: the CIFAR-10 ResNets and EfficientNet-Lite0, quantized and checked on the real runtime.

For each (model, profile, weight bits, method) the model is quantized once with the
public API, calibrated on 1,024 JPEG training images (the first 1,024 of
``numpy.random.RandomState(0).permutation(5000)`` over ``train_subset5000_jpeg_q75.npz``),
then exported to every requested target with the labelled test set
(``test_jpeg_q75.npz``, all 10,000 images unless ``--eval-limit``). Every accuracy and
latency number is read back from the bundle's ``manifest.json``, i.e. measured on the
target's own runtime, never taken from the simulation alone. EfficientNet-Lite0 runs on
the 1,000 ImageNet validation samples of ``imagenet_samples/``: calibrated on one half
(``RandomState(0).permutation(1000)[:500]``), top-1 against ``labels.csv`` on the other.

    python tools/bench_accuracy.py --model resnet20 --profile int8-pot --target onnx-qdq
    python tools/bench_accuracy.py --model all --target all --eval-limit 500

One JSON line per (model, profile, weight bits, method, target) goes to stdout and is
appended to ``--results``; a row already there is not recomputed (``--rerun`` forces
it), so a long matrix survives an interrupted run. A summary table ends the output.
Progress messages go to stderr. Without the shared benchmark data the script prints
one line saying what is missing and exits 0 ("skipped").

Peak RSS is measured by a psutil sampling thread (every 25 ms) while
``eptq_deploy.quantize`` runs: ``peak_rss_mib`` is the process's largest resident set
in that window, ``quant_rss_delta_mib`` that peak minus the resident set just before
the call (the test set and model are already loaded at that point).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

import eptq_deploy
from eptq_deploy.api import METHODS, check_pair, resolve_profile
from eptq_deploy.errors import EptqError
from eptq_deploy.preprocess import preprocess_uint8
from eptq_deploy.targets import get_target, list_targets
from eptq_deploy.zoo import BUILTIN_MODELS, load_cifar_resnet, shared_data_dir

CIFAR_MODELS = [name for name, spec in BUILTIN_MODELS.items() if spec.preset == "cifar"]
IMAGENET_MODELS = ["efficientnet_lite0"]
MODELS = CIFAR_MODELS + IMAGENET_MODELS
IMAGENET_DIR = "imagenet_samples"
CALIB_FILE = "cifar10/train_subset5000_jpeg_q75.npz"
TEST_FILE = "cifar10/test_jpeg_q75.npz"
CALIB_SAMPLES = 1024
CALIB_SEED = 0
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "bench_accuracy.jsonl"
KEY_FIELDS = ("model", "profile", "weight_bits", "method", "target", "eval_samples", "options")


class Skip(Exception):
    """The benchmark data is not there; the message says what is missing."""


# --------------------------------------------------------------------------- data


def load_cifar(eval_limit: int | None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(calibration images, test images, test labels), preprocessed with the "cifar" preset."""
    root = shared_data_dir()
    if root is None:
        where = os.environ.get("EPTQ_DATA_DIR") or "../shared/data"
        raise Skip(f"benchmark data folder not found ({where}); set EPTQ_DATA_DIR to the shared data folder")
    paths = {name: root / name for name in (CALIB_FILE, TEST_FILE)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise Skip(f"missing CIFAR-10 data file(s): {', '.join(missing)}")
    with np.load(paths[CALIB_FILE]) as f:
        train = f["images"]
    idx = np.random.RandomState(CALIB_SEED).permutation(len(train))[:CALIB_SAMPLES]
    calib = preprocess_uint8(train[idx], "cifar")
    with np.load(paths[TEST_FILE]) as f:
        images, labels = f["images"], f["labels"]
    if eval_limit is not None:
        images, labels = images[:eval_limit], labels[:eval_limit]
    return calib, preprocess_uint8(images, "cifar"), np.asarray(labels, dtype=np.int64)


def load_imagenet_samples(eval_limit: int | None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(calibration half, evaluation half, its labels) of the ImageNet samples, "lite" preprocessing."""
    from eptq_deploy.data import load_data, load_labels

    root = shared_data_dir()
    folder = root / IMAGENET_DIR if root is not None else None
    if folder is None or not (folder / "labels.csv").is_file():
        raise Skip(f"ImageNet samples not found ({IMAGENET_DIR}/images and labels.csv under the data folder)")
    names: list[str] = []
    x = load_data(folder / "images", "lite", names=names)
    y = load_labels(folder / "labels.csv", names=names)
    order = np.random.RandomState(CALIB_SEED).permutation(len(x))
    half = len(x) // 2
    calib, ev = order[:half], order[half:]
    if eval_limit is not None:
        ev = ev[:eval_limit]
    return x[calib], x[ev], y[ev]


def family(model: str) -> str:
    """Which dataset a model is benchmarked on."""
    return "imagenet" if model in IMAGENET_MODELS else "cifar"


def load_dataset(model: str, eval_limit: int | None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    return load_imagenet_samples(eval_limit) if family(model) == "imagenet" else load_cifar(eval_limit)


def load_model(name: str) -> torch.nn.Module:
    if name in IMAGENET_MODELS:
        return BUILTIN_MODELS[name].factory()
    path = BUILTIN_MODELS[name].default_weights()
    if path is None:
        raise Skip(f"{name} weights not found (models/resnet_cifar10/{name}-*.th under the data folder)")
    return load_cifar_resnet(int(name.removeprefix("resnet")), path)


# --------------------------------------------------------------------------- measuring


class PeakRss:
    """Largest resident set of this process while the ``with`` block runs (sampled)."""

    def __init__(self, interval_s: float = 0.025) -> None:
        self.interval_s = interval_s
        self.proc = psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def row_key(row: dict[str, Any]) -> str:
    return json.dumps([row.get(k) for k in KEY_FIELDS], sort_keys=True)


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """Stored rows by key (the last one wins); unreadable lines are ignored."""
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("status") == "ok":
            rows[row_key(row)] = row
    return rows


def run_row(model_name: str, model: torch.nn.Module, profile: str, weight_bits: int | None, method: str,
            targets: list[str], options: dict[str, Any], data: tuple[torch.Tensor, torch.Tensor, np.ndarray],
            threads: int, out_dir: Path, keep: bool) -> list[dict[str, Any]]:
    """Quantize once, export to ``targets`` with the test set, one result row per target."""
    calib, test_x, test_y = data
    prof = resolve_profile(profile, weight_bits)
    base = {"model": model_name, "profile": profile, "weight_bits": weight_bits, "method": method,
            "eval_samples": int(len(test_x)), "options": options}
    rows, ok = [], []
    for t in targets:
        try:
            check_pair(prof, get_target(t))
            ok.append(t)
        except EptqError as e:
            rows.append({**base, "target": t, "profile_weight_bits": prof.weights.bits, "status": "unsupported",
                         "error": str(e)})
    if not ok:
        return rows
    print(f".. {model_name} {profile} w{prof.weights.bits} {method}: quantizing for {', '.join(ok)}",
          file=sys.stderr, flush=True)
    with PeakRss() as rss:
        t0 = time.perf_counter()
        qm = eptq_deploy.quantize(model, calib, profile=prof, targets=ok, method=method, weight_bits=None,
                                  samples=min(CALIB_SAMPLES, len(calib)), seed=CALIB_SEED, progress=False, **options)
        quant_s = time.perf_counter() - t0
    print(f".. quantized in {quant_s:.1f} s; exporting and evaluating {len(test_x)} images",
          file=sys.stderr, flush=True)
    tag = f"{model_name}-{profile}-w{prof.weights.bits}-{method}-{'-'.join(f'{k}{v}' for k, v in options.items())}"
    bundle = out_dir / tag.rstrip("-").replace("/", "_")
    eptq_deploy.export(qm, target=None, out=bundle, data=test_x, labels=test_y, check_samples=None,
                       threads=threads, force=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    if not keep:
        shutil.rmtree(bundle, ignore_errors=True)
    common = {
        "profile_weight_bits": prof.weights.bits, "calibration_samples": manifest["calibration"]["samples"],
        "quant_time_s": round(quant_s, 3), "quant_phases_s": qm.info.get("timings_s"),
        "graph_sha256": manifest["files"]["graph.npz"]["sha256"], "peak_rss_mib": round(rss.peak / 2**20, 1),
        "quant_rss_delta_mib": round((rss.peak - rss.start) / 2**20, 1),
        "rss_method": "psutil sampling thread, 25 ms", "threads": threads,
        "tool_version": eptq_deploy.__version__, "torch": torch.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if keep:
        common["bundle"] = str(bundle)
    for t in ok:
        entry = manifest["targets"][t]
        checks, lat = entry["checks"], entry["latency"]
        top1 = checks["top1"]
        rows.append({
            **base, "target": t, "status": "ok", "runtime": entry.get("runtime"),
            "top1_float": top1["float"], "top1_simulation": top1["simulation"], "top1_runtime": top1["runtime"],
            "agreement_runtime_vs_simulation": checks["argmax_agreement_vs_simulation"],
            "agreement_runtime_vs_float": checks["argmax_agreement_vs_float"],
            "max_abs_diff_lsb": checks["max_abs_diff_lsb"],
            "exact_output_fraction": checks.get("exact_output_fraction"),
            "float_ms": lat["float_ms"], "int8_ms": lat["int8_ms"], "speedup_vs_float": lat["speedup_vs_float"],
            **common,
        })
    return rows


# --------------------------------------------------------------------------- output

COLUMNS = [  # (header, how to show a row)
    ("model", lambda r: r["model"]),
    ("profile", lambda r: r["profile"]),
    ("wbits", lambda r: r.get("profile_weight_bits", r["weight_bits"] or "")),
    ("method", lambda r: r["method"] + ("".join(f" {k}={v}" for k, v in r["options"].items()))),
    ("target", lambda r: r["target"]),
    ("n", lambda r: r["eval_samples"]),
    ("float", lambda r: _pct(r.get("top1_float"))),
    ("sim", lambda r: _pct(r.get("top1_simulation"))),
    ("runtime", lambda r: _pct(r.get("top1_runtime"))),
    ("rt=sim", lambda r: _pct(r.get("agreement_runtime_vs_simulation"))),
    ("max LSB", lambda r: _num(r.get("max_abs_diff_lsb"), 2)),
    ("quant s", lambda r: _num(r.get("quant_time_s"), 1)),
    ("peak RSS MiB", lambda r: _num(r.get("peak_rss_mib"), 0)),
    ("+MiB", lambda r: _num(r.get("quant_rss_delta_mib"), 0)),
    ("thr", lambda r: r.get("threads", "")),
    ("float ms", lambda r: _num(r.get("float_ms"), 3)),
    ("int8 ms", lambda r: _num(r.get("int8_ms"), 3)),
    ("status", lambda r: r.get("shown_as", r["status"])),
]


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def _num(v: float | None, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    """A markdown table of ``rows`` with aligned columns; errors are listed underneath."""
    cells = [[str(show(r)) for _, show in COLUMNS] for r in rows]
    heads = [h for h, _ in COLUMNS]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + " |")
    for r in rows:
        if r.get("error"):
            print(f"  {r['model']} {r['profile']} {r['method']} {r['target']}: {r['status']}: {r['error']}")


def emit(row: dict[str, Any]) -> None:
    print(json.dumps({k: v for k, v in row.items() if k != "shown_as"}), flush=True)


# --------------------------------------------------------------------------- CLI


def _names(values: list[str] | None, default: list[str]) -> list[str]:
    """Flatten repeatable, comma-separated option values, keeping order and dropping repeats."""
    out = [v.strip() for item in (values or default) for v in item.split(",") if v.strip()]
    return list(dict.fromkeys(out))


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--opt needs key=value, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", metavar="NAME",
                   help=f"{'|'.join(MODELS)}|all; repeatable or comma list (default resnet20)")
    p.add_argument("--profile", action="append", metavar="NAME",
                   help="hardware profile name or YAML path; repeatable or comma list (default int8-pot)")
    p.add_argument("--weight-bits", type=_positive, default=None, help="override the profile's weight bits")
    p.add_argument("--method", action="append", metavar="NAME",
                   help=f"{'|'.join(METHODS)}; repeatable or comma list (default ptq)")
    p.add_argument("--opt", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="method option passed to quantize(**options); VALUE is read as JSON if it parses")
    p.add_argument("--hessian", choices=("eptq", "none"), default=None,
                   help="EPTQ's sample attention: 'eptq' weighs each sample by its label-free Hessian score at each layer "
                        "(the paper's), 'none' (the default) weighs samples equally (same as --opt hessian=...)")
    p.add_argument("--iters", type=_positive, default=None, help="EPTQ/AdaRound iterations (same as --opt iters=N)")
    p.add_argument("--target", action="append", metavar="NAME",
                   help="target name(s) or 'all'; repeatable or comma list (default onnx-qdq)")
    p.add_argument("--eval-limit", type=_positive, default=None, help="evaluate on the first N test images")
    p.add_argument("--threads", type=_positive, default=2, help="torch and runtime threads (default 2)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=f"JSONL results file (default {DEFAULT_RESULTS})")
    p.add_argument("--rerun", action="store_true", help="recompute rows already in --results")
    p.add_argument("--out-dir", type=Path, default=None, help="where bundles are written (default: a temp dir)")
    p.add_argument("--keep-bundles", action="store_true", help="keep the bundles instead of deleting them")
    args = p.parse_args(argv)

    models = _names(args.model, ["resnet20"])
    args.models = MODELS if "all" in models else models
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(MODELS)} or all")
    args.methods = _names(args.method, ["ptq"])
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    targets = _names(args.target, ["onnx-qdq"])
    args.targets = [n for n, _ in list_targets()] if "all" in targets else targets
    args.profiles = _names(args.profile, ["int8-pot"])
    try:
        for t in args.targets:
            get_target(t)
        for prof in args.profiles:
            resolve_profile(prof, args.weight_bits)
    except EptqError as e:
        p.error(str(e))
    args.options = dict(args.opt)
    if args.hessian is not None:
        args.options["hessian"] = args.hessian
    if args.iters is not None:
        args.options["iters"] = args.iters
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        datasets = {f: load_dataset(m, args.eval_limit) for f, m in {family(m): m for m in args.models}.items()}
    except Skip as e:
        print(f"bench_accuracy: skipped: {e}")
        return 0
    stored = {} if args.rerun else read_results(args.results)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench_accuracy-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        for model_name in args.models:
            data = datasets[family(model_name)]
            model = None
            for profile in args.profiles:
                for method in args.methods:
                    base = {"model": model_name, "profile": profile, "weight_bits": args.weight_bits,
                            "method": method, "eval_samples": int(len(data[1])), "options": args.options}
                    bits = resolve_profile(profile, args.weight_bits).weights.bits
                    todo = []
                    for t in args.targets:
                        old = stored.get(row_key({**base, "target": t}))
                        if old is None:
                            todo.append(t)
                        else:
                            rows.append({**old, "shown_as": "stored"})
                            emit(old)
                    if not todo:
                        continue
                    try:
                        if model is None:
                            model = load_model(model_name)
                        new = run_row(model_name, model, profile, args.weight_bits, method, todo, args.options,
                                      data, args.threads, out_dir, args.keep_bundles)
                    except Skip as e:
                        new = [{**base, "target": t, "profile_weight_bits": bits, "status": "skipped", "error": str(e)}
                               for t in todo]
                    except EptqError as e:
                        new = [{**base, "target": t, "profile_weight_bits": bits, "status": "error", "error": str(e)}
                               for t in todo]
                    for row in new:
                        emit(row)
                        if row["status"] == "ok":
                            with open(args.results, "a") as f:
                                f.write(json.dumps(row) + "\n")
                    rows += new
    finally:
        if args.out_dir is None and not args.keep_bundles:
            shutil.rmtree(out_dir, ignore_errors=True)
    print()
    print_table(rows)
    if args.keep_bundles:
        print(f"bundles kept in {out_dir}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
