"""The preprocessing: named presets, resize + centre crop, normalisation, and back to pixels.

A model is only as accurate as the preprocessing it is fed; every input path (image
folders, uint8 arrays, the demo photos) goes through these functions, and the bundle
states the preset so firmware can reproduce it (``feeding.py`` writes the recipe).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import DataError, UsageError


@dataclass(frozen=True)
class Preset:
    """``(x * scale - mean) / std`` on 0..255 RGB, after resize + centre crop.

    ``resize`` is the shorter side before the ``crop`` x ``crop`` centre crop.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float


PRESETS: dict[str, Preset] = {
    "imagenet": Preset(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255),
    "cifar": Preset(32, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255),
    "lite": Preset(256, 224, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0), 1.0),
    # pixel ranges as model files from TensorFlow take them (MLPerf Tiny: ResNet-8 "pixels", VWW "unit");
    # no crop margin: a model file's own input size replaces 224 (the CLI sets it from the file)
    "pixels": Preset(224, 224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0),
    "unit": Preset(224, 224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1 / 255),
    "signed": Preset(224, 224, (127.5, 127.5, 127.5), (127.5, 127.5, 127.5), 1.0),
}

#: the preset of models that do not name one (built-in models name their own)
DEFAULT_PRESET = "imagenet"


def describe_presets() -> str:
    """One phrase per preset, for help texts."""

    def one(name: str, p: Preset) -> str:
        unit = "" if p.scale == 1 else " on 0..1"
        mean = ",".join(f"{v:g}" for v in p.mean)
        std = ",".join(f"{v:g}" for v in p.std)
        return f"{name} (shorter side {p.resize}, centre crop {p.crop}, mean {mean}, std {std}{unit})"

    return "; ".join(one(n, p) for n, p in PRESETS.items())


def get_preset(
    preset: str | Preset | None = None,
    *,
    resize: int | None = None,
    crop: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Preset:
    """A preset by name (default "imagenet") with any field overridden.

    Overridden mean/std are read on the 0..255 scale when any given value exceeds 1,
    else on the 0..1 scale, so both common spellings work.
    """
    if preset is None:
        base = PRESETS[DEFAULT_PRESET]
    elif isinstance(preset, Preset):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise UsageError(f"unknown data preset {preset!r}; use one of {', '.join(PRESETS)}")
    changes: dict[str, Any] = {}
    if mean is not None or std is not None:
        new_mean = _triple(mean, "mean") if mean is not None else None
        new_std = _triple(std, "std") if std is not None else None
        given = (new_mean or ()) + (new_std or ())
        scale = 1.0 if max(given) > 1.0 else 1 / 255
        if new_mean is None:  # only std given: keep the preset's mean on the new scale
            new_mean = tuple(m * base.scale / scale for m in base.mean)
        if new_std is None:
            new_std = tuple(s * base.scale / scale for s in base.std)
        if any(s <= 0 for s in new_std):
            raise UsageError(f"std {new_std} must be positive; pass values like 0.229,0.224,0.225")
        changes.update(mean=new_mean, std=new_std, scale=scale)
    if crop is not None:
        if crop < 1:
            raise UsageError(f"crop {crop} must be a positive size in pixels")
        changes["crop"] = crop
        # Keep the preset's resize-to-crop ratio (256/224) unless resize is given.
        changes["resize"] = round(crop * base.resize / base.crop)
    if resize is not None:
        changes["resize"] = resize
    out = replace(base, **changes)
    if out.resize < out.crop:
        out = replace(out, resize=out.crop)
    return out


def preset_info(p: Preset) -> dict[str, Any]:
    """The preprocessing contract as the bundle's manifest states it."""
    return {"resize": p.resize, "crop": p.crop, "formula": "(x * scale - mean) / std on RGB 0..255",
            "scale": p.scale, "mean": list(p.mean), "std": list(p.std)}


def _triple(values: tuple[float, ...], what: str) -> tuple[float, float, float]:
    """One value per RGB channel (a single value is repeated)."""
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise UsageError(
            f"{what} needs 1 or 3 values, got {len(vals)}; pass e.g. 0.5 or 0.5,0.5,0.5"
        )
    return vals  # type: ignore[return-value]


# --------------------------------------------------------------------------- preprocessing


def resize_crop(img: Image.Image, resize: int, crop: int) -> Image.Image:
    """Bicubic resize of the shorter side to ``resize``, then a centre crop."""
    w, h = img.size
    if min(w, h) != resize:  # each side round(side * resize / shorter), as the manifest's recipe states
        short = min(w, h)
        img = img.resize((max(crop, round(w * resize / short)), max(crop, round(h * resize / short))), Image.BICUBIC)
        w, h = img.size
    if (w, h) != (crop, crop):
        left, top = int(round((w - crop) / 2)), int(round((h - crop) / 2))
        img = img.crop((left, top, left + crop, top + crop))
    return img


def normalize_uint8(images: np.ndarray, preset: Preset) -> torch.Tensor:
    """NHWC uint8 -> normalised float32 NCHW."""
    if not images.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
        images = images.copy()
    return normalize_pixels(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), preset)


def normalize_pixels(pixels: torch.Tensor, preset: Preset) -> torch.Tensor:
    """RGB pixels 0..255 (NCHW) -> ``(x * scale - mean) / std``, float32 NCHW."""
    mean = torch.tensor(preset.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(preset.std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((pixels.to(torch.float32) * preset.scale - mean) / std).contiguous()


def to_pixels(x: torch.Tensor, preset: Preset) -> torch.Tensor:
    """Normalised float32 NCHW back to the integer RGB pixels 0..255 it came from (float32).

    The inverse of ``normalize_pixels`` in float64, rounded: data loaded from images is
    recovered exactly; already-preprocessed float arrays land on the nearest pixel value.
    """
    mean = torch.tensor(preset.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(preset.std, dtype=torch.float64).view(1, -1, 1, 1)
    p = (x.to(torch.float64) * std + mean) / preset.scale
    return torch.round(p).clamp(0, 255).to(torch.float32).contiguous()


def preprocess_uint8(images: np.ndarray, preset: str | Preset) -> torch.Tensor:
    """NHWC uint8 RGB -> float32 NCHW, resizing only when not already crop-sized."""
    p = get_preset(preset)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise DataError("preprocess_uint8 needs a uint8 numpy array (N, H, W, 3); convert it first")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"uint8 images must be NHWC with 3 channels, got shape {images.shape}; "
            "store RGB images as (N, H, W, 3)"
        )
    if images.shape[1:3] != (p.crop, p.crop):
        images = np.stack(
            [np.asarray(resize_crop(Image.fromarray(im), p.resize, p.crop)) for im in images]
        )
    return normalize_uint8(images, p)


# --------------------------------------------------------------------------- loading
