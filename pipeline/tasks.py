"""What a detector's or segmenter's outputs mean: the post-processing spec, decoding and task scores.

A classifier's output is scored by its argmax. A detector's is not: its outputs are decoded
(grids, strides, anchors), thresholded and NMS'd into boxes, and those boxes scored with
COCO's mAP; a segmenter's logits become a mask per image, scored with mIoU. The *spec* is
a small JSON-able dict the bundle's manifest ships (``model.postprocess``), so firmware can
reproduce the post-processing and ``check`` can score any runtime's outputs the same way:

- ``{"task": "detect", "family": "yolox", "strides": [8, 16, 32], ...}``: YOLOX's anchor-free
  head, output [N, A, 5 + C] (raw box, objectness, class scores);
- ``{"task": "detect", "family": "ssd", "anchors": {...}, "box_scale": [...]}``: SSD anchor
  boxes as BlazeFace has them, outputs (regressors, class logits);
- ``{"task": "detect", "family": "decoded", "normalized": bool}``: boxes decoded inside the
  model, [N, A, 5 + C] as cx, cy, w, h, objectness, class scores (the common YOLO export);
- ``{"task": "segment", "classes": C}``: per-pixel class logits.

Every detection spec also states ``score_threshold``, ``iou_threshold`` (class-wise NMS)
and ``max_detections``; ``input_hw`` is the model's input size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .detection import (
    SSD_SCORE_CLIP,
    Detections,
    coco_image_ids,
    coco_map,
    decode_ssd,
    decode_yolox,
    map_vs_reference,
    postprocess_decoded,
    ssd_anchors,
    ssd_roles,
    to_original,
)
from .errors import DataError, UsageError
from .float_exec import unpack
from .segmentation import confusion, miou, miou_vs_reference, predict_mask, read_masks

FAMILIES = ("yolox", "ssd", "decoded", "segment")
#: detection thresholds by default: COCO-style evaluation (every box down to 0.001, as YOLOX's eval)
DETECTION_DEFAULTS: dict[str, Any] = {"score_threshold": 0.001, "iou_threshold": 0.65, "max_detections": 300}
#: the float model's own detections at or above this score become the label-free ground truth
REFERENCE_SCORE = 0.3
#: candidates scored by mAP go down to this score, whatever a deployment's threshold (a face at 0.49 under a
#: 0.5 threshold is a ranked candidate for mAP, not a miss)
SCORING_THRESHOLD = 0.001


def postprocess_spec(family: str, input_hw: Sequence[int], classes: int | None = None, **options: Any) -> dict[str, Any]:
    """The spec of ``family`` for a model taking ``input_hw`` images; ``options`` override its
    defaults (strides, anchors, box_scale, normalized, thresholds)."""
    if family not in FAMILIES:
        raise UsageError(f"unknown post-processing {family!r}; choose one of {', '.join(FAMILIES)}")
    hw = [int(v) for v in input_hw]
    if family == "segment":
        return {"task": "segment", "family": "segment", "input_hw": hw, "classes": classes, **options}
    spec: dict[str, Any] = {"task": "detect", "family": family, "input_hw": hw, **DETECTION_DEFAULTS}
    if family == "yolox":
        spec["strides"] = [8, 16, 32]
    elif family == "ssd":  # BlazeFace short range (MediaPipe's face_detection_short_range graph)
        spec.update(anchors={"strides": [8, 16, 16, 16], "offset": 0.5, "fixed_anchor_size": True},
                    box_scale=[float(hw[1]), float(hw[0]), float(hw[1]), float(hw[0])], score_threshold=0.5,
                    iou_threshold=0.3)
    else:
        spec["normalized"] = False
    unknown = sorted(set(options) - {"strides", "anchors", "box_scale", "normalized", "score_threshold",
                                     "iou_threshold", "max_detections"})
    if unknown:
        raise UsageError(f"unknown post-processing option(s) {', '.join(unknown)} for {family}")
    spec.update(options)
    return spec


def decoded(spec: dict[str, Any], outputs: Any) -> np.ndarray:
    """The source model's outputs (packed, numpy) in the decoded layout [N, A, 5 + C], boxes in input pixels."""
    outs, hw = [np.asarray(o) for o in unpack(outputs)], tuple(spec["input_hw"])
    if spec["family"] == "yolox":
        return decode_yolox(outs[0], hw, spec["strides"])
    if spec["family"] == "ssd":
        if len(outs) != 2:
            raise UsageError(f"ssd post-processing needs two outputs (regressors, class logits); the model returns {len(outs)}")
        reg, logits = (outs[i] for i in ssd_roles([o.shape for o in outs]))
        return decode_ssd(reg, logits, ssd_anchors(hw, **spec["anchors"]), hw, spec["box_scale"])
    out = outs[0]
    if spec.get("normalized"):
        out = out.copy()
        out[..., [0, 2]] *= hw[1]
        out[..., [1, 3]] *= hw[0]
    return out


def _clipped_sigmoid(z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(z.clamp(-SSD_SCORE_CLIP, SSD_SCORE_CLIP))


#: where the sigmoid stops changing: beyond +-16 it is within 1.2e-7 of 0 or 1 (calibration's ``span``)
_clipped_sigmoid.span = 16.0  # type: ignore[attr-defined]


def _box_clamp(limit: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def clamp(z: torch.Tensor) -> torch.Tensor:
        return z.clamp(-limit, limit)

    clamp.span = limit  # type: ignore[attr-defined]
    return clamp


def read_through(spec: dict[str, Any], source_shapes: Sequence[Sequence[int]]) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
    """The source outputs the decode reads only through an element-wise function, by index, so
    calibration can measure their error after it: SSD class logits go through sigmoid(clip(z, +-100)),
    and SSD box regressors matter only up to +-2 image sizes from their anchor (``box_scale`` units over
    the smallest anchor): a centre further out puts a box of at most 2 images' width wholly off the
    image, and a width past 2 images covers it whole, clipped or not, so a no-object anchor's regressor
    at 10^4 need not set the grid of the faces' boxes."""
    if spec.get("family") == "ssd" and len(source_shapes) == 2:
        boxes, logits = ssd_roles(source_shapes)
        anchors = ssd_anchors(tuple(spec["input_hw"]), **spec["anchors"])
        smallest = float(np.min(anchors[:, 2:])) if len(anchors) else 1.0
        limit = 2.0 * max(float(v) for v in spec["box_scale"]) / max(smallest, 1e-6)
        return {boxes: _box_clamp(limit), logits: _clipped_sigmoid}
    return {}


def detect(spec: dict[str, Any], outputs: Any, transforms: Sequence[Sequence[float]] | None = None,
           sizes: Sequence[tuple[int, int]] | None = None, score_threshold: float | None = None) -> list[Detections]:
    """Boxes per image: decode, threshold (the spec's, or ``score_threshold``), class-wise NMS; mapped back to
    each original image when ``transforms`` (``preprocess.input_transform``) and ``sizes`` (w, h) are given."""
    threshold = spec["score_threshold"] if score_threshold is None else score_threshold
    dets = postprocess_decoded(decoded(spec, outputs), tuple(spec["input_hw"]), score_threshold=threshold,
                               iou_threshold=spec["iou_threshold"], max_detections=spec["max_detections"])
    if transforms is None or sizes is None:
        return dets
    return [to_original(d, t, s) for d, t, s in zip(dets, transforms, sizes, strict=True)]


def masks(spec: dict[str, Any], outputs: Any, layout: str, sizes: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray]:
    """Class-index masks per image: argmax of the logits, resized back (nearest) to each original (w, h)."""
    logits = np.asarray(unpack(outputs)[0])
    if sizes is None:
        return list(predict_mask(logits, None, layout))
    return [predict_mask(logits[i:i + 1], (h, w), layout)[0] for i, (w, h) in enumerate(sizes)]


def same_detections(a: Detections, b: Detections) -> bool:
    """Identical boxes after NMS: the same boxes, scores and classes, bit for bit."""
    return (a.boxes.shape == b.boxes.shape and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
            and np.array_equal(a.classes, b.classes))


def task_scores(spec: dict[str, Any], outputs: Any, float_outputs: Any, *, layout: str = "NCHW",
                labels: str | Path | None = None, names: Sequence[str] | None = None,
                transforms: Sequence[Sequence[float]] | None = None,
                sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """The task's scores of ``outputs`` (packed numpy, the source model's outputs) beside the float model's.

    Detection: ``map_vs_float`` (label-free: the float model's boxes scored as ground truth) and,
    given COCO ``labels`` (instances.json) and the images' file ``names``, ``map``/``map50`` and
    the float model's ``float_map``/``float_map50``. Segmentation: ``miou_vs_float`` and, given a
    ``labels`` folder of masks, ``miou`` and ``float_miou``. Percentages.
    """
    if spec["task"] == "segment":
        got, ref = masks(spec, outputs, layout, sizes), masks(spec, float_outputs, layout, sizes)
        classes = int(spec.get("classes") or np.asarray(unpack(outputs)[0]).shape[1 if layout == "NCHW" else -1])
        out: dict[str, Any] = {"miou_vs_float": round(float(miou_vs_reference(got, ref, classes)["miou"]), 2)}
        if labels is not None:
            if names is None:
                raise UsageError("mIoU against label masks needs the images' file names (load an image folder)")
            truth = read_masks(labels, names)
            out["miou"] = round(float(miou(confusion(got, truth, classes))["miou"]), 2)
            out["float_miou"] = round(float(miou(confusion(ref, truth, classes))["miou"]), 2)
        return out
    low = min(spec["score_threshold"], SCORING_THRESHOLD)
    got, ref = (detect(spec, o, transforms, sizes, low) for o in (outputs, float_outputs))
    try:
        scored = map_vs_reference(dict(enumerate(got)), dict(enumerate(ref)), REFERENCE_SCORE)
        out = {"map_vs_float": round(float(scored["map"]), 2), "map50_vs_float": round(float(scored["map50"]), 2)}
    except DataError as e:  # the float model finds nothing on these images: no label-free reference
        out = {"map_vs_float": None, "map_vs_float_note": str(e)}
    if labels is not None:
        if names is None:
            raise UsageError("COCO mAP needs the images' file names (load an image folder)")
        ids = coco_image_ids(labels, names)
        mine, theirs = coco_map(dict(zip(ids, got, strict=True)), labels), coco_map(dict(zip(ids, ref, strict=True)), labels)
        out.update(map=round(float(mine["map"]), 2), map50=round(float(mine["map50"]), 2),
                   float_map=round(float(theirs["map"]), 2), float_map50=round(float(theirs["map50"]), 2))
    return out


def file_scores(meta: dict[str, Any], preprocessing: dict[str, Any] | None, raw: Any, float_raw: Any,
                labels: str | Path | None = None, names: Sequence[str] | None = None,
                sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """``task_scores`` of a model file's raw outputs (packed, the source layout) against the float file's,
    the float tail run on both first; ``preprocessing`` (the manifest's) maps boxes back to ``sizes``."""
    from . import model_io
    from .preprocess import input_transform, preset_from_info

    transforms = None
    if sizes is not None and preprocessing is not None:
        transforms = [input_transform(preset_from_info(preprocessing), s) for s in sizes]
    return task_scores(meta["postprocess"], model_io.raw_to_user(meta, raw), model_io.raw_to_user(meta, float_raw), layout=model_io.interface(meta)["source_layout"],
                       labels=labels, names=names, transforms=transforms,
                       sizes=sizes if transforms is not None else None)
