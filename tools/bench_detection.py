"""Detection and segmentation benchmark: YOLOX-Nano (COCO), DeepLabV3 (Pascal VOC), BlazeFace.

Each model file is read by eptq-deploy, quantized under a profile (PTQ at 8 bits under ``int8-pot``
and ``tflite-int8``; EPTQ under ``imx500 --weight-bits 4``), exported to its targets, and every
target's file is run on its own runtime. Scores are the task's (``eptq_deploy.tasks``):

- YOLOX-Nano (416x416 letterbox, BGR 0..255): COCO mAP@[.5:.95] and mAP@.5 on ``coco_mini/val2017``
  (79 images, pycocotools), and label-free mAP of the quantized model's boxes against the float
  model's own (score >= 0.3 as ground truth) on ImageNet samples; decode + class-wise NMS at
  score 0.001, IoU 0.65.
- DeepLabV3-MobileNetV2 (257x257 stretch, [-1, 1]): mIoU on the 14 ``voc_samples`` (argmax
  resized back nearest, void ignored) and mIoU against the float model's masks on ImageNet samples.
- BlazeFace short range (128x128 letterbox, [-1, 1]): label-free mAP against the float model's
  faces on the ``coco_mini`` images (train2017 and val2017) that hold a person.

Calibration: ``coco_mini/train2017`` plus the first ImageNet samples (YOLOX), ImageNet samples
(DeepLabV3), ImageNet samples (BlazeFace, scored on every coco_mini image with a person); the
label-free ImageNet evaluation uses the samples after those, so no image both calibrates and scores.

Per target: the runtime's scores, the simulation's agreement with it (identical boxes after NMS,
or identical argmax per pixel) and the largest difference of the raw outputs in output LSBs.

    python tools/bench_detection.py                                   # every model and configuration
    python tools/bench_detection.py --model yolox --config int8-pot-ptq --free-limit 200

One JSON line per row on stdout, appended to ``--results``; a Markdown table ends the output.
Without the shared data the script prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# same folder (tools/ is the script's path): one JSON-line writer for the benchmarks
from bench_mlperf_tiny import emit

import eptq_deploy
from eptq_deploy import model_io, tasks
from eptq_deploy.data import load_data
from eptq_deploy.errors import EptqError
from eptq_deploy.float_exec import pack, unpack
from eptq_deploy.preprocess import get_preset, input_transform
from eptq_deploy.zoo import shared_data_dir

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "bench_detection.jsonl"
ALL_TARGETS = ["onnx-qdq", "openvino-ir", "tflite-int8", "tflite-micro"]
#: configuration -> (profile, method, weight bits, targets)
CONFIGS = {"int8-pot-ptq": ("int8-pot", "ptq", None, ALL_TARGETS),
           "tflite-int8-ptq": ("tflite-int8", "ptq", None, ALL_TARGETS),
           "imx500-w4-eptq": ("imx500", "eptq", 4, ["onnx-qdq"])}
MODELS = {
    "yolox": {"file": "detection/yolox_nano.onnx", "preset": "yolox", "family": "yolox", "hw": (416, 416)},
    "deeplab": {"file": "segmentation/deeplabv3_257_mv_gpu.tflite", "preset": "deeplab", "family": "segment",
                "hw": (257, 257), "classes": 21},
    "blazeface": {"file": "detection/face_detection_short_range.tflite", "preset": "blazeface", "family": "ssd",
                  "hw": (128, 128)},
}
#: TFLM runs its reference kernels one image at a time: its label-free set is cut to this many images
TFLM_FREE_LIMIT = 100


def person_images(root: Path, split: str) -> set[str]:
    """File names of the coco_mini images of ``split`` that hold a person."""
    doc = json.loads((root / "coco_mini" / "annotations" / f"instances_{split}.json").read_text())
    ids = {a["image_id"] for a in doc["annotations"] if a["category_id"] == 1}
    return {im["file_name"] for im in doc["images"] if im["id"] in ids}


def images(folder: Path, preset: Any, keep: Any = None, skip: int = 0, limit: int | None = None) -> dict[str, Any]:
    """A folder's images preprocessed (NCHW), with their file names, original sizes and box transforms;
    ``keep`` filters by file name, ``skip``/``limit`` select a range."""
    names: list[str] = []
    sizes: list[tuple[int, int]] = []
    x = load_data(folder, preset, names=names, sizes=sizes)
    idx = [i for i, n in enumerate(names) if keep is None or Path(n).name in keep][skip:]
    idx = idx[:limit] if limit is not None else idx
    return {"x": x[idx], "names": [names[i] for i in idx], "sizes": [sizes[i] for i in idx],
            "transforms": [input_transform(preset, sizes[i]) for i in idx]}


def datasets(root: Path, model: str, free_limit: int | None) -> dict[str, dict[str, Any]]:
    """Calibration, labelled evaluation and label-free evaluation sets of ``model``."""
    preset = get_preset(MODELS[model]["preset"])
    imagenet = root / "imagenet_samples" / "images"
    if model == "yolox":
        train = images(root / "coco_mini" / "train2017", preset)
        net = images(imagenet, preset, limit=176)
        calib = torch.cat([train["x"], net["x"]])
        val = images(root / "coco_mini" / "val2017", preset)
        val["labels"] = root / "coco_mini" / "annotations" / "instances_val2017.json"
        return {"calib": {"x": calib}, "val": val, "free": images(imagenet, preset, skip=176, limit=free_limit)}
    if model == "deeplab":
        calib = images(imagenet, preset, limit=256)
        val = images(root / "voc_samples", preset, keep={p.name for p in (root / "voc_samples").glob("*_image.png")})
        val["labels"] = root / "voc_samples"
        return {"calib": calib, "val": val, "free": images(imagenet, preset, skip=256, limit=free_limit)}
    persons = person_images(root, "train2017") | person_images(root, "val2017")
    free = images(root / "coco_mini" / "train2017", preset, keep=persons)
    more = images(root / "coco_mini" / "val2017", preset, keep=persons)
    free = {k: (torch.cat([v, more[k]]) if k == "x" else v + more[k]) for k, v in free.items()}
    return {"calib": {"x": images(imagenet, preset, limit=256)["x"]}, "free": free}


def batched(fn: Any, x: torch.Tensor | np.ndarray, step: int = 16) -> Any:
    """``fn`` over ``x`` in batches, packed outputs joined (numpy)."""
    parts = [[np.asarray(v) for v in unpack(fn(x[i:i + step]))] for i in range(0, len(x), step)]
    return pack([np.concatenate(col) for col in zip(*parts, strict=True)])


def score_set(spec: dict[str, Any], qm: Any, runner: Any, target: str, data: dict[str, Any],
              float_out: Any) -> dict[str, Any]:
    """The runtime's task scores on one set, its agreement with the simulation and the raw LSB distance."""
    meta, x = qm.graph.meta, data["x"]
    layout = model_io.interface(meta)["source_layout"]
    xs = x if layout == "NCHW" else x.permute(0, 2, 3, 1).contiguous()
    raw_rt = batched(lambda b: runner.run(b.numpy(), raw=True), xs)
    raw_sim = batched(lambda b: [v.numpy() for v in unpack(qm.simulate(b, target, raw=True))], xs)
    lsb = max(float(np.abs(r.astype(np.float64) - s).max() / qm.graph.tensors[o].quant.scale[0])
              for r, s, o in zip(unpack(raw_rt), unpack(raw_sim), qm.graph.outputs, strict=True))

    rt, sim = model_io.raw_to_user(meta, raw_rt), model_io.raw_to_user(meta, raw_sim)
    out = tasks.task_scores(spec, rt, float_out, layout=layout, labels=data.get("labels"), names=data.get("names"),
                            transforms=data.get("transforms"), sizes=data.get("sizes"))
    if spec["task"] == "detect":
        a, b = tasks.detect(spec, rt), tasks.detect(spec, sim)
        out["identical_boxes_vs_simulation"] = round(100 * float(np.mean([tasks.same_detections(p, q)
                                                                          for p, q in zip(a, b, strict=True)])), 2)
    else:
        a, b = tasks.masks(spec, rt, layout), tasks.masks(spec, sim, layout)
        out["identical_argmax_vs_simulation"] = round(100 * float(np.mean([np.mean(p == q) for p, q in zip(a, b, strict=True)])), 4)
    out["max_raw_diff_lsb"] = lsb
    return out


def float_scores(spec: dict[str, Any], qm: Any, data: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The float model's outputs on a set (the read graph, checked against the file's own runtime) and scores."""
    layout = model_io.interface(qm.graph.meta)["source_layout"]
    xs = data["x"] if layout == "NCHW" else data["x"].permute(0, 2, 3, 1).contiguous()
    out = batched(lambda b: [v.numpy() for v in unpack(qm.forward_float(b))], xs)
    return out, tasks.task_scores(spec, out, out, layout=layout, labels=data.get("labels"), names=data.get("names"),
                                  transforms=data.get("transforms"), sizes=data.get("sizes"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--config", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--targets", default=None, help="comma-separated targets (default: each configuration's)")
    p.add_argument("--free-limit", type=int, default=None, help="label-free ImageNet images (default: all left)")
    p.add_argument("--iters", type=int, default=None, help="EPTQ iterations (default: the tool's)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    root = shared_data_dir()
    if root is None or not (root / "detection").is_dir():
        print("skipped: detection data not found (set EPTQ_DATA_DIR to the shared data folder)")
        return 0
    args.results.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    rows: list[dict[str, Any]] = []
    for model in args.model.split(","):
        m = MODELS[model]
        spec = tasks.postprocess_spec(m["family"], m["hw"], m.get("classes"))
        sets = datasets(root, model, args.free_limit)
        scored = {k: v for k, v in sets.items() if k != "calib"}
        base = {"model": model, "calibration_images": len(sets["calib"]["x"]),
                **{f"{k}_images": len(v["x"]) for k, v in scored.items()}}
        floats: dict[str, Any] = {}
        for config in args.config.split(","):
            profile, method, bits, targets = CONFIGS[config]
            targets = args.targets.split(",") if args.targets else targets
            layout_x = sets["calib"]["x"] if model == "yolox" else sets["calib"]["x"].permute(0, 2, 3, 1).contiguous()
            options = {"iters": args.iters} if args.iters and method == "eptq" else {}
            t0 = time.perf_counter()
            try:
                qm = eptq_deploy.quantize(root / m["file"], layout_x, profile=profile, targets=targets, method=method,
                                          weight_bits=bits, seed=0, progress=False, postprocess=spec, **options)
            except EptqError as e:
                emit({**base, "config": config, "skipped": str(e)}, args.results, rows)
                continue
            seconds = round(time.perf_counter() - t0, 1)
            timings = qm.info.get("timings_s", {})
            if not floats:
                for k, data in scored.items():
                    floats[k] = float_scores(spec, qm, data)
                emit({**base, "config": "float", "cut": qm.graph.outputs,
                      **{f"{k}_{n}": v for k, (_, s) in floats.items() for n, v in s.items()}}, args.results, rows)
            with tempfile.TemporaryDirectory() as d:
                bundle = eptq_deploy.export(qm, targets, out=Path(d) / "bundle")
                for t in targets:
                    runner = eptq_deploy.load(bundle, t)
                    row = {**base, "config": config, "target": t, "quantize_s": seconds,
                           "hessian_s": timings.get("hessian"), "optimisation_s": timings.get("optimisation"),
                           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
                    for k, data in scored.items():
                        if t == "tflite-micro" and k == "free" and len(data["x"]) > TFLM_FREE_LIMIT:
                            data = {key: v[:TFLM_FREE_LIMIT] for key, v in data.items() if key != "labels"}
                            fl = pack([v[:TFLM_FREE_LIMIT] for v in unpack(floats[k][0])])
                            row[f"{k}_images_{t}"] = TFLM_FREE_LIMIT
                        else:
                            fl = floats[k][0]
                        row.update({f"{k}_{n}": v for n, v in score_set(spec, qm, runner, t, data, fl).items()})
                    emit(row, args.results, rows)
    print("\n| model | configuration | target | score (labelled) | vs float (label-free) | identical to simulation "
          "| max raw diff (LSB) | quantize |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['model']} | {r['config']} | skipped: {r['skipped']} | | | | | |")
            continue
        lab = " / ".join(f"{k.split('_', 1)[1]} {v}" for k, v in r.items() if k in ("val_map", "val_map50", "val_miou"))
        free = " / ".join(f"{v}" for k, v in r.items() if k in ("free_map_vs_float", "free_miou_vs_float"))
        same = " / ".join(f"{v} %" for k, v in r.items() if k.endswith(("identical_boxes_vs_simulation",
                                                                         "identical_argmax_vs_simulation")))
        lsb = max((v for k, v in r.items() if k.endswith("max_raw_diff_lsb")), default="")
        print(f"| {r['model']} | {r['config']} | {r.get('target', '')} | {lab} | {free} | {same} | {lsb} | "
              f"{r.get('quantize_s', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
