"""Decode, NMS and COCO scoring for detector outputs.

A quantized detector is judged by its boxes, not its raw tensors, so every detector
family is decoded to one layout (``[N, A, 5 + C]``: cx, cy, w, h, objectness, C
class scores) and then shares a single postprocess (score threshold, class-wise
NMS, top-k) and a single scorer (pycocotools, the field's own evaluator). Nothing
here knows about graphs: it takes the model's float outputs as numpy arrays.

Conventions: ``input_hw`` is (height, width) of the model input; boxes returned
by :func:`postprocess_decoded` are ``x1, y1, x2, y2`` in model-input pixels; class
indices are contiguous (0..C-1) until :func:`coco_map` maps them to COCO ids.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms

from .errors import DataError, UsageError

__all__ = [
    "COCO80_IDS",
    "Detections",
    "coco_image_ids",
    "coco_map",
    "decode_ssd",
    "decode_yolox",
    "map_vs_reference",
    "postprocess_decoded",
    "ssd_anchors",
    "to_original",
]

# COCO category id of each contiguous class index of an 80-class COCO detector
# (the official ids run 1..90 with 10 gaps).
COCO80_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66),
    67, 70, *range(72, 83), *range(84, 91),
)  # fmt: skip


@dataclass(frozen=True)
class Detections:
    """Detections of one image: ``boxes`` float32 [K, 4] (x1, y1, x2, y2), ``scores``
    float32 [K], ``classes`` int64 [K] (contiguous class index).

    Arrays are normalised on construction so that every consumer can rely on
    dtype and shape without re-checking.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(classes):
            raise DataError(
                f"Detections need as many boxes, scores and classes, got {len(boxes)}, {len(scores)}, "
                f"{len(classes)}; pass arrays of one length"
            )
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "classes", classes)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        """An image with nothing detected (it still counts in every score)."""
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


# --------------------------------------------------------------------------- decode


def _check_hw(input_hw: Sequence[int]) -> tuple[int, int]:
    if len(input_hw) != 2 or min(int(v) for v in input_hw) <= 0:
        raise UsageError(f"input_hw must be (height, width) > 0, got {tuple(input_hw)}; pass the model input size")
    return int(input_hw[0]), int(input_hw[1])


def _check_out(out: np.ndarray, name: str, min_last: int) -> np.ndarray:
    arr = np.asarray(out)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[-1] < min_last or arr.dtype.kind != "f":
        raise DataError(
            f"{name}: expected float [N, A, {min_last - 1}+C] detector output, got {arr.dtype} {arr.shape}; "
            "pass the model's float output for a batch"
        )
    return arr


@functools.lru_cache(maxsize=16)
def _yolox_grid(height: int, width: int, strides: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Grid cell (x, y) and stride of each anchor point, in YOLOX's anchor order."""
    grids, steps = [], []
    for s in strides:
        gh, gw = height // s, width // s
        gy, gx = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")  # row-major: y then x
        grids.append(np.stack([gx.ravel(), gy.ravel()], axis=1))
        steps.append(np.full(gh * gw, s))
    grid = np.concatenate(grids).astype(np.float32)
    stride = np.concatenate(steps).astype(np.float32)[:, None]
    grid.setflags(write=False)
    stride.setflags(write=False)
    return grid, stride


def decode_yolox(out: np.ndarray, input_hw: tuple[int, int], strides: Sequence[int] = (8, 16, 32)) -> np.ndarray:
    """Decode the YOLOX export layout to the shared decoded layout (boxes cx, cy, w, h in pixels).

    ``out`` [N, A, 5+C] holds raw (tx, ty, tw, th), sigmoid-ed objectness and class
    scores per anchor point, anchors ordered stride by stride and row-major within a
    stride: cx = (tx + gx) * s, cy = (ty + gy) * s, w = exp(tw) * s, h = exp(th) * s.
    """
    height, width = _check_hw(input_hw)
    arr = _check_out(out, "YOLOX output", 6)
    strides = tuple(int(s) for s in strides)
    grid, stride = _yolox_grid(height, width, strides)
    if arr.shape[1] != len(grid):
        raise DataError(
            f"YOLOX output has {arr.shape[1]} anchors but input {height}x{width} with strides {strides} gives "
            f"{len(grid)}; pass the model's input_hw and strides"
        )
    dec = arr.astype(np.float32, copy=True)
    dec[..., 0:2] = (dec[..., 0:2] + grid) * stride
    with np.errstate(over="ignore"):  # absurd sizes become inf and are dropped by postprocess
        dec[..., 2:4] = np.exp(dec[..., 2:4]) * stride
    return dec


def ssd_anchors(
    input_hw: tuple[int, int] = (128, 128),
    strides: Sequence[int] = (8, 16, 16, 16),
    offset: float = 0.5,
    aspect_ratios: Sequence[float] = (1.0,),
    interpolated_scale_aspect_ratio: float = 1.0,
    min_scale: float = 0.1484375,
    max_scale: float = 0.75,
    fixed_anchor_size: bool = True,
    reduce_boxes_in_lowest_layer: bool = False,
) -> np.ndarray:
    """SSD anchors [A, 4] (cx, cy, w, h, normalised) as MediaPipe's ``SsdAnchorsCalculator`` makes them.

    Defaults are BlazeFace short range (896 anchors at 128x128). Consecutive layers of
    equal stride are merged into one feature map whose cells carry the anchors of all
    of them, which is why the anchor order is cell-major, not layer-major.
    """
    height, width = _check_hw(input_hw)
    num_layers = len(strides)
    if num_layers == 0:
        raise UsageError("ssd_anchors needs at least one stride; pass strides=(8, 16, 16, 16) for BlazeFace")

    def scale_at(i: int) -> float:
        if num_layers == 1:
            return (min_scale + max_scale) / 2
        return min_scale + (max_scale - min_scale) * i / (num_layers - 1)

    anchors: list[np.ndarray] = []
    layer = 0
    while layer < num_layers:
        ratios: list[float] = []
        scales: list[float] = []
        last = layer
        while last < num_layers and strides[last] == strides[layer]:
            scale = scale_at(last)
            if last == 0 and reduce_boxes_in_lowest_layer:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, scale, scale]
            else:
                ratios += list(aspect_ratios)
                scales += [scale] * len(aspect_ratios)
                if interpolated_scale_aspect_ratio > 0:
                    nxt = 1.0 if last == num_layers - 1 else scale_at(last + 1)
                    ratios.append(interpolated_scale_aspect_ratio)
                    scales.append(math.sqrt(scale * nxt))
            last += 1
        sizes = np.array([[s * math.sqrt(r), s / math.sqrt(r)] for s, r in zip(scales, ratios, strict=True)])
        if fixed_anchor_size:
            sizes = np.ones_like(sizes)
        fh, fw = math.ceil(height / strides[layer]), math.ceil(width / strides[layer])
        gy, gx = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        centres = np.stack([(gx.ravel() + offset) / fw, (gy.ravel() + offset) / fh], axis=1)
        per_cell = np.concatenate([np.repeat(centres, len(sizes), axis=0), np.tile(sizes, (len(centres), 1))], axis=1)
        anchors.append(per_cell)
        layer = last
    return np.concatenate(anchors).astype(np.float32)


#: SSD class logits are clipped to +-this before their sigmoid (MediaPipe's BlazeFace graph)
SSD_SCORE_CLIP = 100.0


def ssd_roles(shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Which of an SSD model's two outputs holds the box regressors and which the class logits:
    the regressors are the wider ([N, A, 4 + keypoints] against [N, A, C])."""
    return (0, 1) if shapes[0][-1] >= shapes[1][-1] else (1, 0)


def decode_ssd(
    regressors: np.ndarray,
    logits: np.ndarray,
    anchors: np.ndarray,
    input_hw: tuple[int, int],
    box_scale: Sequence[float] = (128.0, 128.0, 128.0, 128.0),
    score_clip: float | None = SSD_SCORE_CLIP,
) -> np.ndarray:
    """Decode SSD-style outputs (BlazeFace) to the shared decoded layout, boxes in input pixels.

    Box: cx = reg0 / x_scale * anchor_w + anchor_cx, cy = reg1 / y_scale * anchor_h +
    anchor_cy, w = reg2 / w_scale * anchor_w, h = reg3 / h_scale * anchor_h (normalised,
    then times the input size). Scores: objectness is 1 and the class scores are
    sigmoid(clip(logits, +-score_clip)), so each class keeps its own independent score,
    as MediaPipe treats them. Keypoints (regressors beyond the first 4) are ignored.
    MediaPipe's own pipeline blends overlapping boxes (weighted NMS); here they go
    through the same hard NMS as every other family, so scores stay comparable.
    """
    height, width = _check_hw(input_hw)
    reg, lg = np.asarray(regressors), np.asarray(logits)
    reg, lg = (a[None] if a.ndim == 2 else a for a in (reg, lg))
    anc = np.asarray(anchors, dtype=np.float32)
    if (
        reg.ndim != 3
        or reg.shape[-1] < 4
        or lg.ndim != 3
        or lg.shape[:2] != reg.shape[:2]
        or anc.shape != (reg.shape[1], 4)
    ):
        raise DataError(
            f"SSD outputs do not line up: regressors {reg.shape}, logits {lg.shape}, anchors {anc.shape}; "
            "pass [N, A, K>=4], [N, A, C] and [A, 4] with the same A"
        )
    if len(box_scale) != 4:
        raise UsageError(f"box_scale must be (x, y, w, h) scales, got {tuple(box_scale)}")
    xs, ys, ws, hs = (float(v) for v in box_scale)
    r = reg[..., :4].astype(np.float32)
    cx = r[..., 0] / xs * anc[:, 2] + anc[:, 0]
    cy = r[..., 1] / ys * anc[:, 3] + anc[:, 1]
    w = r[..., 2] / ws * anc[:, 2]
    h = r[..., 3] / hs * anc[:, 3]
    z = lg.astype(np.float32)
    if score_clip is not None:
        z = np.clip(z, -score_clip, score_clip)
    with np.errstate(over="ignore"):
        scores = 1.0 / (1.0 + np.exp(-z))
    boxes = np.stack([cx * width, cy * height, w * width, h * height], axis=-1)
    obj = np.ones(boxes.shape[:2] + (1,), np.float32)
    return np.concatenate([boxes, obj, scores], axis=-1).astype(np.float32)


# --------------------------------------------------------------------------- postprocess


def postprocess_decoded(
    out: np.ndarray,
    input_hw: tuple[int, int],
    normalized: bool = False,
    score_threshold: float = 0.001,
    iou_threshold: float = 0.65,
    max_detections: int = 300,
    class_agnostic: bool = False,
    multi_label: bool = False,
) -> list[Detections]:
    """Score, threshold, NMS and top-k on decoded outputs [N, A, 5+C] (cx, cy, w, h, obj, classes).

    Boxes are in input pixels, or fractions of the input when ``normalized``. Score is
    objectness times class score. By default each anchor proposes only its best class
    (YOLOX's own eval rule); ``multi_label`` makes every (anchor, class) pair at or
    above ``score_threshold`` a candidate. NMS is class-wise (torchvision's
    ``batched_nms``) unless ``class_agnostic``; the ``max_detections`` best survive.
    Non-finite boxes are dropped: they can only come from a broken model.
    """
    height, width = _check_hw(input_hw)
    arr = _check_out(out, "decoded output", 6)
    if max_detections < 1:
        raise UsageError(f"max_detections must be >= 1, got {max_detections}")
    scale = torch.tensor([width, height, width, height], dtype=torch.float32) if normalized else None
    results = []
    for image in arr:
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        obj, cls = x[:, 4], x[:, 5:]
        if multi_label:
            all_scores = obj[:, None] * cls
            anchor_idx, labels = torch.nonzero(all_scores >= score_threshold, as_tuple=True)
            scores = all_scores[anchor_idx, labels]
        else:
            best, labels = cls.max(dim=1)
            scores = obj * best
            anchor_idx = torch.nonzero(scores >= score_threshold, as_tuple=True)[0]
            scores, labels = scores[anchor_idx], labels[anchor_idx]
        cxcywh = x[anchor_idx, :4]
        if scale is not None:
            cxcywh = cxcywh * scale
        half = cxcywh[:, 2:4] / 2
        boxes = torch.cat([cxcywh[:, :2] - half, cxcywh[:, :2] + half], dim=1)
        finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        boxes, scores, labels = boxes[finite], scores[finite], labels[finite]
        groups = torch.zeros_like(labels) if class_agnostic else labels
        keep = batched_nms(boxes, scores, groups, iou_threshold)[:max_detections]
        results.append(Detections(boxes[keep].numpy(), scores[keep].numpy(), labels[keep].numpy()))
    return results


def to_original(dets: Detections, transform: Sequence[float], image_wh: tuple[int, int]) -> Detections:
    """Map boxes from model-input pixels back to the original image, clipped to it.

    ``transform`` = (scale_x, scale_y, offset_x, offset_y) of the preprocessing, so
    original = (input - offset) / scale; a top-left letterbox with ratio r is
    (r, r, 0, 0). ``image_wh`` is the original (width, height).
    """
    if len(transform) != 4:
        raise UsageError(f"transform must be (scale_x, scale_y, offset_x, offset_y), got {tuple(transform)}")
    sx, sy, ox, oy = (float(v) for v in transform)
    if sx <= 0 or sy <= 0:
        raise UsageError(f"transform scales must be > 0, got ({sx}, {sy}); pass the resize ratio of the preprocessing")
    w, h = float(image_wh[0]), float(image_wh[1])
    b = dets.boxes.astype(np.float64)
    b[:, [0, 2]] = np.clip((b[:, [0, 2]] - ox) / sx, 0.0, w)
    b[:, [1, 3]] = np.clip((b[:, [1, 3]] - oy) / sy, 0.0, h)
    return Detections(b, dets.scores.copy(), dets.classes.copy())


# --------------------------------------------------------------------------- COCO scoring


def _load_annotations(annotations: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(annotations, Mapping):
        data = dict(annotations)
        source = "annotation dict"
    else:
        path = Path(annotations)
        source = str(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"annotation file {path} not found; pass the COCO instances_*.json") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read annotation file {path} ({exc}); pass a COCO instances_*.json") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{source} is not COCO format (no 'images' list); pass a COCO instances_*.json")
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    return data


def coco_image_ids(annotations: str | os.PathLike[str] | Mapping[str, Any], file_names: Iterable[str]) -> list[int]:
    """COCO image id of each file, matched by basename, so a folder of images can be scored."""
    data = _load_annotations(annotations)
    by_name = {os.path.basename(img["file_name"]): int(img["id"]) for img in data["images"]}
    names = [os.path.basename(str(n)) for n in file_names]
    missing = [n for n in names if n not in by_name]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"{missing[0]}{more} not among the annotation file's images; pass images of that split "
            "or the matching instances_*.json"
        )
    return [by_name[n] for n in names]


def _default_class_ids(categories: list[dict[str, Any]]) -> list[int]:
    """COCO80_IDS when the file's categories are COCO ones (whole file or a subset),
    else the file's own ids sorted (a custom dataset whose model was trained in that order)."""
    ids = sorted(int(c["id"]) for c in categories)
    if set(ids) <= set(COCO80_IDS):
        return list(COCO80_IDS)
    return ids


def _results(
    detections: Mapping[Any, Detections], image_key: Mapping[Any, int], class_ids: Sequence[int]
) -> list[dict]:
    """COCO result records; boxes with no area are left out (they can never match)."""
    out = []
    for key, det in detections.items():
        if len(det) == 0:
            continue
        if det.classes.min() < 0 or det.classes.max() >= len(class_ids):
            raise DataError(
                f"detections of image {key} have class index {int(det.classes.max())} but only {len(class_ids)} "
                "class ids are known; pass class_ids mapping every class index to a category id"
            )
        b = det.boxes.astype(np.float64)
        wh = b[:, 2:4] - b[:, 0:2]
        ok = (wh > 0).all(axis=1)
        img = image_key[key]
        for (x1, y1), (w, h), s, c in zip(
            b[ok, :2].tolist(), wh[ok].tolist(), det.scores[ok].tolist(), det.classes[ok].tolist(), strict=True
        ):
            out.append({"image_id": img, "category_id": class_ids[c], "bbox": [x1, y1, w, h], "score": s})
    return out


def _evaluate(gt: dict[str, Any], results: list[dict], image_ids: list[int]) -> tuple[float, float]:
    """(mAP@[.5:.95], mAP@.5) in % over ``image_ids``; pycocotools' prints are silenced."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # -1 means no category had ground truth (callers rule that out); rounding keeps a perfect score at 100.0
    m, m50 = (round(max(float(v), 0.0) * 100.0, 9) for v in ev.stats[:2])
    return m, m50


def _gt_copy(data: dict[str, Any]) -> dict[str, Any]:
    """Annotations copied (COCOeval writes into them) with the fields it needs filled in."""
    anns = []
    for i, a in enumerate(data["annotations"]):
        a = dict(a)
        a.setdefault("id", i + 1)
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
        anns.append(a)
    return {**data, "annotations": anns}


def coco_map(
    detections: Mapping[int, Detections],
    annotations: str | os.PathLike[str] | Mapping[str, Any],
    class_ids: Sequence[int] | None = None,
    image_ids: Iterable[int] | None = None,
) -> dict[str, float | int]:
    """COCO box mAP of ``detections`` (image id -> boxes in original-image pixels), with pycocotools.

    ``class_ids[i]`` is the category id of class index i; by default COCO80_IDS when
    the annotation file's categories are COCO ones, else its ids sorted. Only
    ``image_ids`` are scored (default: the images in ``detections``, or every annotated
    image when that is empty); an image without detections still counts (its objects
    are misses). Returns ``map`` (mAP@[.5:.95], %), ``map50`` (%) and ``images``.
    """
    data = _load_annotations(annotations)
    known = {int(img["id"]) for img in data["images"]}
    ids = [int(i) for i in image_ids] if image_ids is not None else [int(k) for k in detections]
    if not ids:
        ids = sorted(known)
    unknown = [i for i in list(ids) + [int(k) for k in detections] if i not in known]
    if unknown:
        raise DataError(
            f"image id {unknown[0]} is not in the annotations; pass detections keyed by the file's image ids "
            "(see coco_image_ids)"
        )
    wanted = set(ids)
    if not any(int(a["image_id"]) in wanted for a in data["annotations"]):
        raise DataError(f"none of the {len(wanted)} scored images has an annotated object; score images with labels")
    cids = list(class_ids) if class_ids is not None else _default_class_ids(data["categories"])
    scored = {k: d for k, d in detections.items() if int(k) in wanted}
    results = _results(scored, {k: int(k) for k in scored}, cids)
    m, m50 = _evaluate(_gt_copy(data), results, sorted(wanted))
    return {"map": m, "map50": m50, "images": len(wanted)}


def map_vs_reference(
    detections: Mapping[Any, Detections],
    reference: Mapping[Any, Detections],
    reference_score_threshold: float = 0.3,
) -> dict[str, float | int]:
    """Label-free mAP: ``detections`` scored against the float model's own ``reference`` detections.

    Reference boxes scoring at least ``reference_score_threshold`` become ground truth of
    their class, so quantization damage is measured on any images, labelled or not.
    Every image of ``reference`` counts, including those whose reference has no boxes
    (there, any detection is a false positive). Identical inputs give 100.0.
    Returns ``map``, ``map50`` (%) and ``images``.
    """
    missing = [k for k in reference if k not in detections]
    extra = [k for k in detections if k not in reference]
    if missing or extra:
        first = (missing or extra)[0]
        where = "detections" if missing else "reference"
        raise DataError(f"image {first!r} is missing from the {where}; score the same images with both models")
    image_key = {k: i + 1 for i, k in enumerate(reference)}
    images, anns, classes = [], [], set()
    for key, ref in reference.items():
        images.append({"id": image_key[key]})
        keep = ref.scores >= reference_score_threshold
        wh = ref.boxes[:, 2:4] - ref.boxes[:, 0:2]
        keep &= (wh > 0).all(axis=1)
        for (x1, y1), (w, h), c in zip(
            ref.boxes[keep, :2].tolist(), wh[keep].tolist(), ref.classes[keep].tolist(), strict=True
        ):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_key[key],
                    "category_id": int(c) + 1,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            classes.add(int(c))
    if not anns:
        raise DataError(
            f"the reference has no detection scoring >= {reference_score_threshold} on any of {len(images)} images; "
            "lower reference_score_threshold or use more images"
        )
    for det in detections.values():
        classes.update(int(c) for c in det.classes)
    n_classes = max(classes) + 1
    gt = {"images": images, "annotations": anns, "categories": [{"id": c + 1, "name": str(c)} for c in sorted(classes)]}
    results = _results(detections, image_key, list(range(1, n_classes + 1)))
    m, m50 = _evaluate(gt, results, sorted(image_key.values()))
    return {"map": m, "map50": m50, "images": len(images)}
