"""Folding the input normalisation into the first layer: a model that takes camera pixels.

A camera or ISP hands firmware uint8 RGB pixels; a model trained on
``(p * scale - mean_c) / std_c`` would need that computed in float on the device before
the first quantize. Folded, the first conv or linear layer does it: its weights are
scaled per input channel by ``scale / std_c`` and its bias absorbs ``- mean_c / std_c``,
so the exported model takes pixels 0..255 on the fixed grid scale 1, zero point 0, which
a uint8 buffer is exactly (no rounding at the input at all).

A "BGR" model reads the pixels in reverse order; folded, its first layer's input channels
are reversed instead (a permutation: exact), so the folded model takes RGB pixels like
every other. The letterbox and stretch of detectors are resizes on the host, not folded:
the folded model still takes the fitted crop x crop pixels, letterbox fill included.

Zero padding in the normalised model is the pixel ``mean_c / scale``; the folded
conv pads with that pixel rounded to an integer (the ``pad_value`` attribute, per RGB
input channel), so the integer model can hold it as a code. That rounding is the one
difference from the unfolded float model: on border outputs only, by at most
``sum |W[:, c]| * 0.5 * scale / std_c``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import UsageError
from .graph import QParams, QuantGraph
from .preprocess import Preset

#: graph meta key stating the fold (and the preprocessing folded)
META_KEY = "folded_preprocessing"
#: what the model's input is, as the manifest states it
EXPECTS_PIXELS = "uint8 RGB pixels 0..255"
EXPECTS_NORMALISED = "normalised float"


def fold_preprocessing(g: QuantGraph, preset: Preset) -> QuantGraph:
    """A copy of float graph ``g`` that takes RGB pixels 0..255 instead of normalised values.

    Every consumer of the input must be a conv2d (groups 1) or a linear layer: any other
    op would see pixels where it expects normalised values. ``preset``'s mean and std are
    in the model's channel order; for "BGR" the weights' input channels are reversed.
    """
    x = g.inputs[0]
    mean, std = np.asarray(preset.mean, np.float64), np.asarray(preset.std, np.float64)
    # rgb[j]: the model channel that reads RGB pixel channel j (reversal is its own inverse)
    rgb = [2, 1, 0] if preset.channels == "BGR" else [0, 1, 2]
    channels = g.tensors[x].shape[1]
    if channels != len(mean):
        raise UsageError(f"cannot fold the preprocessing: the model input has {channels} channels but the preset "
                         f"normalises {len(mean)}; run without --fold-preprocessing (fold_preprocessing=None)")
    out = g.copy()
    for n in out.consumers()[x]:
        if not (n.op == "linear" or (n.op == "conv2d" and n.attrs["groups"] == 1)):
            raise UsageError(f"cannot fold the preprocessing into {n.name} ({n.op} at {n.source or n.name}): the model "
                             "input must feed only conv2d (groups 1) or linear layers; run without "
                             "--fold-preprocessing (fold_preprocessing=None)")
        wt, bt = out.tensors[n.inputs[1]], out.tensors[n.inputs[2]]
        w = wt.data.astype(np.float64)
        per_channel = (1, channels) + (1,) * (w.ndim - 2)  # the input channel axis of the weight
        wt.data = (w * (preset.scale / std).reshape(per_channel)).astype(np.float32)[:, rgb]
        shift = (w * (mean / std).reshape(per_channel)).reshape(len(w), -1).sum(1)
        bt.data = (bt.data.astype(np.float64) - shift).astype(np.float32)
        if n.op == "conv2d" and any(n.attrs["pads"]):
            n.attrs["pad_value"] = [float(v) for v in np.round(mean / preset.scale)[rgb]]
    out.meta[META_KEY] = {"scale": preset.scale, "mean": list(preset.mean), "std": list(preset.std)}
    if preset.channels != "RGB":  # RGB bundles keep today's record
        out.meta[META_KEY]["channels"] = preset.channels
    return out


def is_folded(g: QuantGraph) -> bool:
    return META_KEY in g.meta


def pixel_grid(profile: Any) -> QParams:
    """The fixed input grid of a folded graph: uint8 pixels, scale 1, zero point 0 (2**0 for
    power-of-two profiles). Calibrating it could only lose pixels to clipping or rounding."""
    a = profile.activations
    if a.bits != 8:
        raise UsageError(f"--fold-preprocessing feeds 8-bit pixels but profile {profile.name} uses {a.bits}-bit "
                         "activations; run without --fold-preprocessing or pick an 8-bit profile")
    return QParams(8, False, [1.0], [0], exponent=[0] if a.power_of_two else None)


def input_contract(g: QuantGraph) -> dict[str, Any]:
    """The manifest's statement of what the model input is."""
    folded = is_folded(g)
    return {"folded": folded, "expects": EXPECTS_PIXELS if folded else EXPECTS_NORMALISED}
