"""Detector and segmenter preprocessing: letterbox, stretch, BGR, mapping boxes back, and folding.

Firmware reproduces the manifest's steps by hand and maps the detector's boxes back with
``input_transform``, so both are checked against what the loaders actually computed.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from eptq_deploy.capture import capture
from eptq_deploy.data import load_data
from eptq_deploy.errors import UsageError
from eptq_deploy.feeding import recipe
from eptq_deploy.float_exec import run_float
from eptq_deploy.fold import fold_preprocessing
from eptq_deploy.preprocess import (
    PRESETS,
    Preset,
    fit_image,
    get_preset,
    input_transform,
    normalize_pixels,
    preprocess_uint8,
    preset_from_info,
    preset_info,
    to_pixels,
)

#: a BGR preset whose mean pixels are whole and differ per channel: a missed reorder shows
BGR = Preset(32, 32, (100.0, 120.0, 140.0), (50.0, 60.0, 70.0), 1.0, channels="BGR")


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _io(c: int) -> dict[str, Any]:
    """A target's I/O contract as the bundle writes it: int8 NHWC input quantized by firmware."""
    q = {"dtype": "int8", "scale": 0.5, "zero_point": -3, "rounding": "half away from zero", "where": "firmware"}
    return {"input": {"name": "input", "dtype": "int8", "layout": "NHWC", "shape": [1, c, c, 3], "quantization": q},
            "output": {"name": "out", "dtype": "float32", "shape": [1, 10]}}


def _steps(p: Preset, folded: bool = False) -> list[dict[str, Any]]:
    return recipe(preset_info(p), _io(p.crop), folded, {"meaning": "boxes"})["input"]["steps"]


# ------------------------------------------------------------------ fitting the frame


@pytest.mark.parametrize(("wh", "resized"), [((8, 4), (6, 3)), ((3, 9), (2, 6)), ((6, 6), (6, 6))])
def test_letterbox_scales_by_the_longer_side_and_pads_at_the_bottom_right(
        wh: tuple[int, int], resized: tuple[int, int]) -> None:
    img = _noise(*wh)
    p = Preset(6, 6, (0.0,) * 3, (1.0,) * 3, 1.0, fit="letterbox", pad_value=(10, 20, 30))
    out = np.asarray(fit_image(img, p))
    w, h = resized
    assert out.shape == (6, 6, 3)
    src = img if (w, h) == img.size else img.resize((w, h), Image.BILINEAR)
    np.testing.assert_array_equal(out[:h, :w], np.asarray(src))  # the image at the top-left, unshifted
    mask = np.ones((6, 6), bool)
    mask[:h, :w] = False
    assert (out[mask] == [10, 20, 30]).all()  # everything else is the fill, in R, G, B order
    r = 6 / max(wh)
    sx, sy, ox, oy = input_transform(p, wh)
    assert (ox, oy) == (0.0, 0.0) and sx == w / wh[0] and sy == h / wh[1]
    assert max(sx, sy) == r and abs(sx - r) * max(wh) < 1 and abs(sy - r) * max(wh) < 1  # floor: under a pixel


def test_bgr_pad_value_is_in_model_order() -> None:
    p = Preset(6, 6, (0.0,) * 3, (1.0,) * 3, 1.0, fit="letterbox", pad_value=(30, 20, 10), channels="BGR")
    out = np.asarray(fit_image(Image.new("RGB", (6, 2), (1, 2, 3)), p))
    assert (out[2:] == [10, 20, 30]).all()  # the RGB frame is filled with the pixel (R, G, B) = (10, 20, 30)
    x = preprocess_uint8(out[None], p)  # ... which the model reads as channels (B, G, R) = pad_value
    assert x[0, :, 5, 0].tolist() == [30.0, 20.0, 10.0] and x[0, :, 0, 0].tolist() == [3.0, 2.0, 1.0]


def test_stretch_ignores_the_aspect_ratio() -> None:
    img = _noise(8, 4)
    p = get_preset("deeplab", crop=6)
    assert p.fit == "stretch" and p.resize == 6
    np.testing.assert_array_equal(np.asarray(fit_image(img, p)), np.asarray(img.resize((6, 6), Image.BILINEAR)))
    assert fit_image(_noise(6, 6), p).tobytes() == _noise(6, 6).tobytes()  # already the size: untouched
    assert input_transform(p, (8, 4)) == (6 / 8, 6 / 4, 0.0, 0.0)


def test_crop_fit_is_resize_crop_and_its_transform_has_the_crop_offset() -> None:
    img = _noise(40, 30)
    p = PRESETS["imagenet"]
    # 40 x 30: shorter side 30 -> 256, longer round(40 * 256 / 30) = 341; crop left round(117 / 2) = 58 (halves to even)
    expect = img.resize((341, 256), Image.BICUBIC).crop((58, 16, 282, 240))
    assert fit_image(img, p).tobytes() == expect.tobytes()
    assert input_transform(p, (40, 30)) == (341 / 40, 256 / 30, -58.0, -16.0)


@pytest.mark.parametrize("name", ["yolox", "blazeface", "deeplab", "imagenet"])
def test_input_transform_maps_a_spot_back_to_the_frame(name: str) -> None:
    """A bright square's centre, found in the model input, lands on its centre in the frame."""
    w, h, x0, y0, size = 150, 90, 100, 30, 9
    frame = np.zeros((h, w, 3), np.uint8)
    frame[y0:y0 + size, x0:x0 + size] = 255
    p = get_preset(name, crop=64)
    fitted = np.asarray(fit_image(Image.fromarray(frame), p), np.float64)[..., 1]
    weight = np.clip(fitted - 120, 0, None)  # the square, above the black frame and any fill (114 at most)
    ys, xs = np.mgrid[: fitted.shape[0], : fitted.shape[1]] + 0.5  # pixel centres, edges at integers
    cx, cy = (weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()
    sx, sy, ox, oy = input_transform(p, (w, h))
    back = ((cx - ox) / sx, (cy - oy) / sy)
    assert back == pytest.approx((x0 + size / 2, y0 + size / 2), abs=0.75)
    there = (back[0] * sx + ox, back[1] * sy + oy)  # and the round trip is the identity
    assert there == pytest.approx((cx, cy), abs=1e-9)


def test_bad_fit_channels_or_pad_are_one_line_usage_errors() -> None:
    for kw, word in (({"fit": "pad"}, "fit"), ({"channels": "RGBA"}, "channels"),
                     ({"pad_value": 256}, "pad_value"), ({"pad_value": (1, 2)}, "pad_value")):
        with pytest.raises(UsageError, match=word) as e:
            get_preset("yolox", **kw)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------ channel order


def test_bgr_normalises_the_reversed_pixels_and_to_pixels_undoes_it() -> None:
    pix = torch.randint(0, 256, (2, 3, 5, 4)).float()
    x = normalize_pixels(pix, BGR)
    for c, rgb in enumerate((2, 1, 0)):  # model channel c reads pixel channel rgb, with mean[c], std[c]
        expect = (pix[:, rgb] - BGR.mean[c]) / BGR.std[c]
        assert torch.equal(x[:, c], expect)
    for p in [*PRESETS.values(), BGR, get_preset("imagenet", channels="BGR")]:
        assert torch.equal(to_pixels(normalize_pixels(pix, p), p), pix)


# ------------------------------------------------------------------ presets and the recipe


def test_new_presets_state_their_fields() -> None:
    assert PRESETS["yolox"] == Preset(416, 416, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0, fit="letterbox",
                                      pad_value=114, channels="BGR")
    assert PRESETS["deeplab"] == Preset(257, 257, (127.5,) * 3, (127.5,) * 3, 1.0, fit="stretch")
    assert PRESETS["blazeface"] == Preset(128, 128, (127.5,) * 3, (127.5,) * 3, 1.0, fit="letterbox", pad_value=0)
    info = preset_info(PRESETS["yolox"])
    assert (info["fit"], info["pad_value"], info["channels"]) == ("letterbox", 114, "BGR")
    assert "BGR" in info["formula"]
    assert preset_info(PRESETS["imagenet"]) == {  # today's entry, with the three new keys at their defaults
        "resize": 256, "crop": 224, "formula": "(x * scale - mean) / std on RGB 0..255", "scale": 1 / 255,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "fit": "crop", "pad_value": 0, "channels": "RGB"}
    for p in [*PRESETS.values(), BGR, get_preset("yolox", pad_value=(1, 2, 3))]:
        assert preset_from_info(preset_info(p)) == p
    old = {k: v for k, v in preset_info(PRESETS["lite"]).items() if k not in ("fit", "pad_value", "channels")}
    assert preset_from_info(old) == PRESETS["lite"]  # manifests written before these fields


def test_recipe_steps_per_fit() -> None:
    names = [s["step"] for s in _steps(PRESETS["imagenet"])]
    assert names == ["rgb", "resize", "centre_crop", "normalise", "quantize", "layout"]
    assert "order" not in _steps(PRESETS["imagenet"])[3]
    steps = _steps(PRESETS["yolox"])
    assert [s["step"] for s in steps] == ["rgb", "letterbox", "normalise", "channel_order", "quantize", "layout"]
    box = steps[1]
    assert box["size"] == 416 and box["fill"] == [114, 114, 114] and "top-left" in box["placement"]
    assert box["ratio"] == "r = min(416 / H, 416 / W) = 416 / max(W, H)" and "BILINEAR" in box["filter"]
    assert steps[3]["order"] == ["B", "G", "R"]
    assert [s["step"] for s in _steps(PRESETS["yolox"], folded=True)] == ["rgb", "letterbox", "quantize", "layout"]
    steps = _steps(PRESETS["deeplab"])
    assert [s["step"] for s in steps] == ["rgb", "stretch", "normalise", "quantize", "layout"]
    assert steps[1]["size"] == 257 and steps[2]["mean"] == [127.5] * 3
    assert _steps(get_preset("blazeface"))[1]["fill"] == [0, 0, 0]


def _follow(img: Image.Image, steps: list[dict[str, Any]]) -> np.ndarray:
    """The letterbox, normalise and channel steps done by hand from their stated formulas: (C, H, W)."""
    for s in steps:
        if s["step"] == "letterbox":
            c, (w, h) = s["size"], img.size
            size = (max(1, w * c // max(w, h)), max(1, h * c // max(w, h)))
            canvas = Image.new("RGB", (c, c), tuple(s["fill"]))
            canvas.paste(img if size == img.size else img.resize(size, Image.BILINEAR), (0, 0))
            img = canvas
    v = np.asarray(img, np.float32)
    for s in steps:
        if s["step"] == "normalise":
            v = (v * np.float32(s["scale"]) - np.float32(s["mean"])) / np.float32(s["std"])
        elif s["step"] == "channel_order":
            v = v[..., ["RGB".index(ch) for ch in s["order"]]]
    return v.transpose(2, 0, 1)


def test_the_recipe_reproduces_the_loader(tmp_path: Path) -> None:
    p = get_preset("yolox", crop=12, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0), pad_value=(1, 2, 3))
    _noise(20, 9, 3).save(tmp_path / "a.png")
    x = load_data(tmp_path, p)
    np.testing.assert_array_equal(_follow(Image.open(tmp_path / "a.png"), _steps(p)), x[0].numpy())


# ------------------------------------------------------------------ folding


class _Net(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, groups=groups)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.c1(x)).mean((2, 3)))


def test_folding_a_bgr_preset_equals_the_float_model_on_rgb_pixels() -> None:
    torch.manual_seed(0)
    pix = torch.randint(0, 256, (4, 3, 8, 8)).float()
    g = capture(_Net().eval(), normalize_pixels(pix[:1], BGR))
    folded = fold_preprocessing(g, BGR)
    ref = run_float(g, normalize_pixels(pix, BGR))
    torch.testing.assert_close(run_float(folded, pix), ref, rtol=1e-5, atol=1e-4)  # border too: whole mean pixels
    assert folded.nodes[0].attrs["pad_value"] == [140.0, 120.0, 100.0]  # zero of B, G, R, per RGB input channel
    assert folded.meta["folded_preprocessing"]["channels"] == "BGR"
    rgb = fold_preprocessing(g, Preset(32, 32, BGR.mean, BGR.std, 1.0))  # without the reorder: wrong
    assert not torch.allclose(run_float(rgb, pix), ref, atol=1e-2)
    assert "channels" not in rgb.meta["folded_preprocessing"]  # RGB records stay as they were


def test_fold_still_refuses_what_it_cannot_do() -> None:
    g = capture(_Net(groups=3).eval(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(UsageError, match="groups 1") as e:
        fold_preprocessing(g, BGR)
    assert "\n" not in str(e.value)
    one = Preset(32, 32, (0.0,) * 3, (1.0,) * 3, 1.0, channels="BGR")
    g = capture(nn.Conv2d(1, 2, 3).eval(), torch.zeros(1, 1, 8, 8))
    with pytest.raises(UsageError, match="1 channels") as e:
        fold_preprocessing(g, one)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ loading


def test_load_data_reports_original_sizes_and_letterboxes(tmp_path: Path) -> None:
    shapes = {"a.png": (20, 10), "b.png": (7, 12), "sub/c.png": (16, 16)}
    for name, wh in shapes.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _noise(*wh).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text("filename,class_index\n")
    names: list[str] = []
    sizes: list[tuple[int, int]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # small frames are letterboxed by design: no upscaling warning
        x = load_data(tmp_path, "blazeface", crop=16, names=names, sizes=sizes)
    assert x.shape == (3, 3, 16, 16)
    assert names == list(shapes) and sizes == list(shapes.values())
    assert (x[0, :, 8:] == -1).all() and (x[1, :, :, 9:] == -1).all()  # pad pixel 0 is -1 after (p - 127.5) / 127.5
    sx, sy, _, _ = input_transform(get_preset("blazeface", crop=16), sizes[1])
    assert (sx, sy) == (9 / 7, 16 / 12)
    sizes = []
    with pytest.warns(UserWarning, match="upscaled 2 image"):  # a crop still warns
        load_data(tmp_path, "cifar", limit=2, sizes=sizes)
    assert sizes == [(20, 10), (7, 12)]
