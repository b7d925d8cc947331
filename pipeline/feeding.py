"""How to feed a bundle's model file and read its output, with the exact numbers.

A firmware engineer holds camera pixels and a model file. What lies between (the
resize, the crop, the normalisation, the quantization to input codes, and on the way
out the dequantization and what the numbers mean) is stated twice from one recipe:
machine-readable in the manifest (each target's ``feeding``) and step by step in the
report ("Feeding this model"), with a worked example computed by the same arithmetic.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import model_io
from .graph import QuantGraph

#: how Pillow's bicubic resize is spelled in the recipe (the filter the data loader uses)
RESIZE_FILTER = "bicubic (Pillow Image.BICUBIC: Keys cubic, a = -0.5, antialiased when shrinking)"
#: a pixel the worked example pushes through the steps
EXAMPLE_PIXEL = (200, 120, 40)


def output_meaning(g: QuantGraph) -> str:
    """What the graph's output values are, judged from the op that produces them."""
    producer = next((n for n in g.nodes if g.outputs[0] in n.outputs), None)
    op = producer.op if producer is not None else ""
    tail = [s["op"] for s in model_io.interface(g.meta)["float_tail"]]
    if tail == ["softmax"]:
        return ("logits: unnormalised class scores; the source model applies softmax to them, which runs in float "
                "on the host (the Python runner's .run() does it, .run(x, raw=True) returns the logits)")
    if tail:
        return f"the model file's raw output; the host then runs {', '.join(tail)} in float (model.float_tail)"
    if op == "softmax":
        return "class probabilities (softmax already applied)"
    if op in ("sigmoid", "hardsigmoid"):
        return "independent per-class probabilities (sigmoid already applied)"
    if op in ("linear", "conv2d", "depthwise_conv2d"):
        return "logits: unnormalised class scores (apply softmax for probabilities)"
    return f"the model's raw output (its last op is {op or 'unknown'})"


def recipe(preprocessing: dict[str, Any] | None, io: dict[str, Any], folded: bool,
           output: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``feeding`` entry of one target: camera pixels to input, output to scores.

    ``io`` is the target's I/O contract (its quantization entries carry ``rounding`` and
    ``where``); ``output`` the manifest's output section (``meaning``, ``classes``).
    """
    inp, outp = io["input"], io["output"]
    steps: list[dict[str, Any]] = [{"step": "rgb", "text": "decode the frame to 8-bit RGB, channels in R, G, B order"}]
    if preprocessing is None:
        steps.append({"step": "preprocess", "text": "not recorded (the model was quantized from tensors through the "
                      "Python API): preprocess exactly as the data given to quantize() was"})
    else:
        # the letterbox and stretch filter, stated beside fit_image, which uses it
        from .preprocess import BILINEAR_FILTER

        r, c = int(preprocessing["resize"]), int(preprocessing["crop"])
        fit = preprocessing.get("fit", "crop")  # manifests before letterbox/stretch: crop, RGB
        bgr = preprocessing.get("channels", "RGB") == "BGR"
        if fit == "letterbox":
            pad = preprocessing.get("pad_value", 0)
            fill = [int(v) for v in pad] if isinstance(pad, list) else [int(pad)] * 3
            if bgr:  # pad_value is in the model's B, G, R order; the fill is a pixel of the decoded RGB frame
                fill = fill[::-1]
            steps.append({"step": "letterbox", "size": c, "ratio": f"r = min({c} / H, {c} / W) = {c} / max(W, H)",
                          "resized": f"W' = floor(W * {c} / max(W, H)), H' = floor(H * {c} / max(W, H)), in "
                                     "integer arithmetic, each at least 1",
                          "filter": BILINEAR_FILTER, "skip_resize_when": "W' = W and H' = H",
                          "placement": f"top-left: resized pixel (x, y) is input pixel (x, y); columns W'..{c - 1} and "
                                       f"rows H'..{c - 1} are fill", "fill": fill,
                          "fill_order": "R, G, B pixels 0..255, before any normalisation",
                          "to_original": "x = x_in * W / W', y = y_in * H / H' (pixel edges at integers)",
                          "text": f"Letterbox into {c} x {c}: resize W x H to W' = floor(W x {c} / max(W, H)) by "
                                  f"H' = floor(H x {c} / max(W, H)), {BILINEAR_FILTER} (skip when W' = W and "
                                  f"H' = H); put it at the top-left of a {c} x {c} canvas filled with the pixel "
                                  f"(R, G, B) = ({', '.join(map(str, fill))}). Boxes map back as x = x_in x W / W', "
                                  "y = y_in x H / H'."})
        elif fit == "stretch":
            steps.append({"step": "stretch", "size": c, "filter": BILINEAR_FILTER,
                          "resized": f"W x H to {c} x {c}, ignoring the aspect ratio",
                          "skip_when": f"the frame already is {c} x {c}",
                          "to_original": f"x = x_in * W / {c}, y = y_in * H / {c} (pixel edges at integers)",
                          "text": f"Resize W x H to {c} x {c} ignoring the aspect ratio, {BILINEAR_FILTER} (skip when "
                                  f"already {c} x {c}). Boxes map back as x = x_in x W / {c}, y = y_in x H / {c}."})
        else:
            steps.append({"step": "resize", "shorter_side": r, "filter": RESIZE_FILTER,
                          "longer_side": f"round(longer * {r} / shorter), at least {c} (Python round, halves to even)",
                          "skip_when": f"the shorter side already is {r} (arrays already {c} x {c} are not resized)"})
            steps.append({"step": "centre_crop", "size": c, "left": f"round((W - {c}) / 2)",
                          "top": f"round((H - {c}) / 2)"})
        if not folded:  # folded, the first layer does both the normalisation and any channel reorder
            mean, std = [float(v) for v in preprocessing["mean"]], [float(v) for v in preprocessing["std"]]
            norm: dict[str, Any] = {"step": "normalise", "formula": "x = (p * scale - mean[c]) / std[c], in float32",
                                    "scale": float(preprocessing["scale"]), "mean": mean, "std": std}
            if bgr:  # normalise the R, G, B pixels as decoded (mean, std turned to that order), then reverse
                norm.update(mean=mean[::-1], std=std[::-1], order="R, G, B (the manifest's preprocessing "
                            "states mean and std in the model's B, G, R order)")
            steps.append(norm)
            if bgr:
                steps.append({"step": "channel_order", "order": ["B", "G", "R"],
                              "text": "Reverse the channel order of x to B, G, R: the model's channel 0 is blue, 2 is red."})
    q = inp.get("quantization")
    if q is not None:
        lo, hi = _range(q["dtype"])
        steps.append({"step": "quantize", "formula": "q = clamp(round(v / scale) + zero_point, min, max), in float32",
                      "input": "p (pixels, 0..255)" if folded else "x", "scale": q["scale"],
                      "zero_point": q["zero_point"], "min": lo, "max": hi, "rounding": q.get("rounding"),
                      "done_by": "firmware" if inp["dtype"] != "float32" else "model file", "where": q["where"]})
    steps.append({"step": "layout", "text": f"{inp['dtype']} {inp['layout']} {inp['shape']}"})
    oq = outp.get("quantization")
    out: dict[str, Any] = {"tensor": outp["name"], "dtype": outp["dtype"], "shape": outp["shape"],
                           "meaning": output["meaning"], "classes": output.get("classes"),
                           "classes_file": output.get("classes_file")}
    if oq is not None:
        out.update(scale=oq["scale"], zero_point=oq["zero_point"], formula="score = (q - zero_point) * scale",
                   done_by="firmware" if outp["dtype"] != "float32" else "model file", where=oq["where"],
                   argmax="the largest code is the largest score (scale > 0): argmax the codes directly")
    return {"input": {"tensor": inp["name"], "dtype": inp["dtype"], "layout": inp["layout"], "shape": inp["shape"],
                      "steps": steps}, "output": out}


def _range(dtype: str) -> tuple[int, int]:
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def quantize(v: np.ndarray, step: dict[str, Any]) -> np.ndarray:
    """A recipe's ``quantize`` step on float32 ``v``, as the recipe states it."""
    t = np.asarray(v, np.float32) / np.float32(step["scale"])
    if step["rounding"] == "half away from zero":
        r = np.trunc(t) + np.where(np.abs(t - np.trunc(t)) >= 0.5, np.sign(t), 0)
    else:  # half to even
        r = np.rint(t)
    return np.clip(r + step["zero_point"], step["min"], step["max"]).astype(np.int64)


def normalise(p: np.ndarray, step: dict[str, Any]) -> np.ndarray:
    """A recipe's ``normalise`` step on pixels ``p`` (channels last), in float32."""
    mean, std = np.float32(step["mean"]), np.float32(step["std"])
    return (np.asarray(p, np.float32) * np.float32(step["scale"]) - mean) / std


def example(feed: dict[str, Any], pixel: tuple[int, int, int] = EXAMPLE_PIXEL) -> dict[str, list[float]]:
    """One pixel through the normalise and quantize steps: the report's worked example."""
    steps = {s["step"]: s for s in feed["input"]["steps"]}
    v = np.asarray(pixel, np.float32)
    out: dict[str, list[float]] = {"pixel": [float(c) for c in pixel]}
    if "normalise" in steps:
        v = normalise(v, steps["normalise"])
        out["x"] = [float(c) for c in v]
    if "quantize" in steps:
        out["q"] = [float(c) for c in quantize(v, steps["quantize"])]
    return out


def _num(v: float) -> str:
    return f"{v:.6g}" if v >= 0 else f"({v:.6g})"


def report_lines(name: str, model_file: str, feed: dict[str, Any], classes: list[str] | None = None) -> list[str]:
    """The report's "Feeding this model" subsection of one target (``classes``: the class names)."""
    i, o = feed["input"], feed["output"]
    lines = [f"### {name}: `{model_file}`", "",
             f"From camera pixels to the input tensor `{i['tensor']}` ({i['dtype']}, {i['layout']}, {i['shape']}):", ""]
    k = 0
    for s in i["steps"]:
        k += 1
        if s["step"] == "rgb":
            text = "Decode the frame to 8-bit RGB pixels p (0..255), channels in R, G, B order."
        elif s["step"] == "preprocess":
            text = s["text"][0].upper() + s["text"][1:] + "."
        elif s["step"] == "resize":
            r = s["shorter_side"]
            text = (f"Resize so that the shorter side is {r} pixels, {s['filter']}; the longer side becomes "
                    f"round(L x {r} / S). Skip this when the shorter side already is {r}.")
        elif s["step"] == "centre_crop":
            c = s["size"]
            text = f"Crop the centre {c} x {c}: left = round((W - {c}) / 2), top = round((H - {c}) / 2)."
        elif s["step"] == "normalise":
            per = "; ".join(f"{ch}: x = (p x {s['scale']:.6g} - {m:.6g}) / {d:.6g}"
                            for ch, m, d in zip("RGB", s["mean"], s["std"], strict=True))
            text = f"Normalise each channel in float32 ({per})."
        elif s["step"] == "quantize":
            v = "p" if s["input"].startswith("p") else "x"
            formula = (f"q = clamp(round({v} / {s['scale']:.9g}) + {_num(s['zero_point'])}, {s['min']}, {s['max']}), "
                       f"in float32, rounding halves {s['rounding'].removeprefix('half ')}")
            if s["done_by"] == "firmware":
                text = f"Quantize: {formula}."
            else:
                text = f"Give {v} to the file as float32; the file quantizes it ({s['where']}): {formula}."
        elif s["step"] in ("letterbox", "stretch", "channel_order"):
            text = s["text"]
        else:
            text = f"Lay the values out as {s['text']}."
        lines.append(f"{k}. {text}")
    ex = example(feed)
    if "x" in ex or "q" in ex:
        parts = [f"pixel (R, G, B) = ({', '.join(f'{v:.0f}' for v in ex['pixel'])})"]
        if "x" in ex:
            parts.append(f"x = ({', '.join(f'{v:.6g}' for v in ex['x'])})")
        if "q" in ex:
            parts.append(f"q = ({', '.join(f'{v:.0f}' for v in ex['q'])})")
        lines += ["", "Worked example: " + " -> ".join(parts) + "."]
    lines += ["", f"From the output tensor `{o['tensor']}` ({o['dtype']}, {o['shape']}) to class scores:", ""]
    if "scale" in o:
        how = "you compute" if o["done_by"] == "firmware" else f"the file computes ({o['where']})"
        lines.append(f"- {how} score = (q - {_num(o['zero_point'])}) x {o['scale']:.9g} from the codes q;")
    lines.append(f"- the scores are {o['meaning']};")
    if "argmax" in o and o["dtype"] != "float32":
        lines.append("- the predicted class is the index of the largest code (the same as of the largest score);")
    else:
        lines.append("- the predicted class is the index of the largest score;")
    if classes:
        shown = ", ".join(f"{j} {c}" for j, c in enumerate(classes[:5]))
        lines.append(f"- class k is line k + 1 of `{o['classes_file']}` ({len(classes)} classes: {shown}, ...).")
    else:
        lines.append("- class names: not known (give labels with names to quantize to record them).")
    return lines + [""]
