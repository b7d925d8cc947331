"""The preprocessing: named presets, fitting the frame to the input, normalisation, and back to pixels.

A model is only as accurate as the preprocessing it is fed; every input path (image
folders, uint8 arrays, the demo photos) goes through these functions, and the bundle
states the preset so firmware can reproduce it (``feeding.py`` writes the recipe).
Classifiers take a resize + centre crop; detectors and segmenters keep the whole frame
(letterbox or stretch), and ``input_transform`` maps their boxes back to the frame.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import DataError, UsageError

#: how the frame becomes the crop x crop input (see ``Preset``)
FITS = ("crop", "letterbox", "stretch")
#: channel orders of the model input
CHANNELS = ("RGB", "BGR")
#: the filter of the letterbox and stretch resizes, as the manifest's recipe spells it
BILINEAR_FILTER = ("bilinear (Pillow Image.BILINEAR: triangle filter on pixel centres, antialiased when "
                   "shrinking: the triangle widens by the shrink factor)")


@dataclass(frozen=True)
class Preset:
    """``(x * scale - mean) / std`` on 0..255 pixels, after fitting the frame to the input.

    ``fit`` says how a W x H frame becomes the ``crop`` x ``crop`` input: "crop" resizes
    the shorter side to ``resize`` (bicubic) and takes the centre crop; "letterbox" scales
    by r = crop / max(W, H) keeping the aspect ratio (bilinear), places the image at the
    top-left and fills the rest with ``pad_value``; "stretch" resizes to crop x crop
    (bilinear) ignoring the aspect ratio. ``resize`` only matters for "crop".

    ``channels`` is the model input's channel order: "BGR" takes the decoded RGB pixels
    in reverse order. ``mean``, ``std`` and a per-channel ``pad_value`` are given in the
    model's channel order (as model cards state them), so for "BGR" ``mean[0]`` is blue.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float
    fit: str = "crop"
    pad_value: int | tuple[int, int, int] = 0
    channels: str = "RGB"

    def __post_init__(self) -> None:
        """Refuse what the loaders could not do, once, where the preset is made."""
        if self.fit not in FITS:
            raise UsageError(f"fit {self.fit!r} is not one of {', '.join(FITS)}")
        if self.channels not in CHANNELS:
            raise UsageError(f"channels {self.channels!r} is not one of {', '.join(CHANNELS)}")
        pad = self.pad_value
        values = tuple(pad) if isinstance(pad, (list, tuple)) else (pad,)
        if len(values) not in (1, 3) or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
            raise UsageError(f"pad_value {pad!r} must be one pixel value 0..255 or three (one per channel)")
        # plain ints, a tuple for three: hashable, and written to JSON as the manifest expects
        object.__setattr__(self, "pad_value", tuple(int(v) for v in values) if len(values) == 3 else int(values[0]))


PRESETS: dict[str, Preset] = {
    "imagenet": Preset(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255),
    "cifar": Preset(32, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255),
    "lite": Preset(256, 224, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0), 1.0),
    # pixel ranges as model files from TensorFlow take them (MLPerf Tiny: ResNet-8 "pixels", VWW "unit");
    # no crop margin: a model file's own input size replaces 224 (the CLI sets it from the file)
    "pixels": Preset(224, 224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0),
    "unit": Preset(224, 224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1 / 255),
    "signed": Preset(224, 224, (127.5, 127.5, 127.5), (127.5, 127.5, 127.5), 1.0),
    # YOLOX (Megvii's ValTransform, legacy=False): letterbox to 416 at the top-left, pad 114, BGR, raw 0..255;
    # its cv2 INTER_LINEAR does not antialias when shrinking, Pillow's bilinear does (slightly softer shrunk frames)
    "yolox": Preset(416, 416, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0, fit="letterbox", pad_value=114, channels="BGR"),
    # DeepLabV3 MobileNetV2 (TFLite segmentation example): 257 x 257 stretch, (x - 127.5) / 127.5
    "deeplab": Preset(257, 257, (127.5, 127.5, 127.5), (127.5, 127.5, 127.5), 1.0, fit="stretch"),
    # BlazeFace (MediaPipe short-range face detection): 128 x 128, [-1, 1]. MediaPipe keeps the
    # aspect ratio (keep_aspect_ratio, BORDER_ZERO), so letterbox, not stretch: faces keep their
    # shape. Its CPU converter warps the uint8 frame with a constant 0 border and only then maps
    # 0..255 to [-1, 1], so the border is the black pixel 0 (-1 in the tensor), hence pad 0, not
    # 128. MediaPipe centres the frame; ours sits top-left (input_transform maps boxes back).
    "blazeface": Preset(128, 128, (127.5, 127.5, 127.5), (127.5, 127.5, 127.5), 1.0, fit="letterbox", pad_value=0),
}

#: the preset of models that do not name one (built-in models name their own)
DEFAULT_PRESET = "imagenet"


def describe_presets() -> str:
    """One phrase per preset, for help texts."""

    def one(name: str, p: Preset) -> str:
        unit = "" if p.scale == 1 else " on 0..1"
        mean = ",".join(f"{v:g}" for v in p.mean)
        std = ",".join(f"{v:g}" for v in p.std)
        if p.fit == "crop":
            fit = f"shorter side {p.resize}, centre crop {p.crop}"
        elif p.fit == "letterbox":
            fit = f"letterbox {p.crop} top-left, pad {_pad_text(p.pad_value)}"
        else:
            fit = f"stretch to {p.crop}x{p.crop}"
        order = "" if p.channels == "RGB" else f", {p.channels}"
        return f"{name} ({fit}{order}, mean {mean}, std {std}{unit})"

    return "; ".join(one(n, p) for n, p in PRESETS.items())


def _pad_text(pad: int | tuple[int, ...]) -> str:
    return ",".join(str(v) for v in pad) if isinstance(pad, tuple) else str(pad)


def get_preset(
    preset: str | Preset | None = None,
    *,
    resize: int | None = None,
    crop: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    fit: str | None = None,
    pad_value: int | tuple[int, ...] | None = None,
    channels: str | None = None,
) -> Preset:
    """A preset by name (default "imagenet") with any field overridden.

    Overridden mean/std are read on the 0..255 scale when any given value exceeds 1,
    else on the 0..1 scale, so both common spellings work; like a per-channel
    ``pad_value`` they are in the model's channel order (see ``Preset``).
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
    changes.update({k: v for k, v in (("fit", fit), ("pad_value", pad_value), ("channels", channels)) if v is not None})
    out = replace(base, **changes)
    if out.resize < out.crop:
        out = replace(out, resize=out.crop)
    return out


def preset_info(p: Preset) -> dict[str, Any]:
    """The preprocessing contract as the bundle's manifest states it.

    ``mean``, ``std`` and a per-channel ``pad_value`` are in the model's channel order
    (``channels``); the formula says so where that is not RGB.
    """
    formula = ("(x * scale - mean) / std on RGB 0..255" if p.channels == "RGB" else
               f"(x * scale - mean) / std on {p.channels} 0..255 (the decoded RGB channels reversed; mean and std "
               f"in {', '.join(p.channels)} order)")
    pad = list(p.pad_value) if isinstance(p.pad_value, tuple) else p.pad_value
    return {"resize": p.resize, "crop": p.crop, "formula": formula,
            "scale": p.scale, "mean": list(p.mean), "std": list(p.std),
            "fit": p.fit, "pad_value": pad, "channels": p.channels}


def preset_from_info(info: dict[str, Any]) -> Preset:
    """The preset a manifest's ``preprocessing`` entry states (older manifests: crop, RGB).

    Raises KeyError, TypeError or ValueError (UsageError for bad fit/channels/pad) on a
    malformed entry, for the caller to word.
    """
    pad = info.get("pad_value", 0)
    return Preset(int(info["resize"]), int(info["crop"]), _triple(tuple(info["mean"]), "mean"),
                  _triple(tuple(info["std"]), "std"), float(info["scale"]), fit=str(info.get("fit", "crop")),
                  pad_value=tuple(int(v) for v in pad) if isinstance(pad, list) else int(pad),
                  channels=str(info.get("channels", "RGB")))


def _triple(values: tuple[float, ...], what: str) -> tuple[float, float, float]:
    """One value per channel (a single value is repeated)."""
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise UsageError(
            f"{what} needs 1 or 3 values, got {len(vals)}; pass e.g. 0.5 or 0.5,0.5,0.5"
        )
    return vals  # type: ignore[return-value]


def _order(preset: Preset) -> list[int]:
    """The decoded RGB channel each model input channel reads (its own inverse)."""
    return [2, 1, 0] if preset.channels == "BGR" else [0, 1, 2]


def _fill_rgb(preset: Preset) -> tuple[int, int, int]:
    """``pad_value`` as an RGB pixel (the letterbox fills the decoded frame, before any reorder)."""
    pad = preset.pad_value
    model = tuple(int(v) for v in pad) if isinstance(pad, tuple) else (int(pad),) * 3
    return tuple(model[c] for c in _order(preset))  # type: ignore[return-value]


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


def _resized_size(preset: Preset, w: int, h: int) -> tuple[int, int]:
    """The size the frame is resized to before the crop or the letterbox fill (w, h)."""
    c = preset.crop
    if preset.fit == "stretch":
        return c, c
    if preset.fit == "letterbox":  # r = c / max(w, h), in integers so firmware gets the same sizes
        longer = max(w, h)
        return max(1, w * c // longer), max(1, h * c // longer)
    if min(w, h) == preset.resize:
        return w, h
    short = min(w, h)
    return max(c, round(w * preset.resize / short)), max(c, round(h * preset.resize / short))


def fit_image(img: Image.Image, preset: Preset) -> Image.Image:
    """The ``crop`` x ``crop`` RGB image the preset's ``fit`` makes of ``img`` (RGB)."""
    if preset.fit == "crop":
        return resize_crop(img, preset.resize, preset.crop)
    c = preset.crop
    size = _resized_size(preset, *img.size)
    if size != img.size:
        img = img.resize(size, Image.BILINEAR)
    if preset.fit == "stretch" or size == (c, c):
        return img
    canvas = Image.new("RGB", (c, c), _fill_rgb(preset))
    canvas.paste(img, (0, 0))
    return canvas


def input_transform(preset: str | Preset, original_wh: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(scale_x, scale_y, offset_x, offset_y)`` with ``input = original * scale + offset``.

    So ``original = (input - offset) / scale`` maps a detector's boxes (model-input pixel
    coordinates, edges at integers) back to the W x H frame. The scales are the resized
    size over the frame size on each axis, as ``fit_image`` resizes: for "crop" resize /
    shorter side (the longer side within the rounding of its resized length), offset
    minus the crop's left and top; for "letterbox" r = crop / max(W, H) (the shorter axis
    within the flooring of its resized length), offset 0; for "stretch" crop / W and
    crop / H, offset 0.
    """
    p = get_preset(preset)
    w, h = (int(v) for v in original_wh)
    if w < 1 or h < 1:
        raise UsageError(f"original size {original_wh} must be a positive (width, height)")
    rw, rh = _resized_size(p, w, h)
    left = top = 0
    if p.fit == "crop" and (rw, rh) != (p.crop, p.crop):  # as resize_crop crops
        left, top = int(round((rw - p.crop) / 2)), int(round((rh - p.crop) / 2))
    return rw / w, rh / h, float(-left), float(-top)


def normalize_uint8(images: np.ndarray, preset: Preset) -> torch.Tensor:
    """NHWC uint8 -> normalised float32 NCHW."""
    if not images.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
        images = images.copy()
    return normalize_pixels(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), preset)


def normalize_pixels(pixels: torch.Tensor, preset: Preset) -> torch.Tensor:
    """RGB pixels 0..255 (NCHW) -> ``(x * scale - mean) / std`` in the model's channel order, float32 NCHW."""
    mean = torch.tensor(preset.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(preset.std, dtype=torch.float32).view(1, -1, 1, 1)
    if preset.channels != "RGB":
        pixels = pixels[:, _order(preset)]
    return ((pixels.to(torch.float32) * preset.scale - mean) / std).contiguous()


def to_pixels(x: torch.Tensor, preset: Preset) -> torch.Tensor:
    """Normalised float32 NCHW back to the integer RGB pixels 0..255 it came from (float32).

    The inverse of ``normalize_pixels`` in float64, rounded: data loaded from images is
    recovered exactly; already-preprocessed float arrays land on the nearest pixel value.
    A "BGR" model's channels are put back in R, G, B order (the folded model takes RGB).
    """
    mean = torch.tensor(preset.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(preset.std, dtype=torch.float64).view(1, -1, 1, 1)
    p = (x.to(torch.float64) * std + mean) / preset.scale
    if preset.channels != "RGB":
        p = p[:, _order(preset)]
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
        images = np.stack([np.asarray(fit_image(Image.fromarray(im), p)) for im in images])
    return normalize_uint8(images, p)


# --------------------------------------------------------------------------- loading
