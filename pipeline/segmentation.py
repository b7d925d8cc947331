"""Masks and mIoU for semantic-segmentation models.

A quantized segmenter is judged by its class masks, so this module turns logits into
masks with one stated resize rule, reads label masks in the formats VOC-style data
ships in, and scores with a confusion matrix (mIoU against labels, or against the
float model's own masks when there are none).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError, UsageError

__all__ = [
    "VOC_PALETTE",
    "VOID",
    "confusion",
    "miou",
    "miou_vs_reference",
    "predict_mask",
    "read_mask",
    "read_masks",
]

VOID = 255  # the "ignore" label of VOC masks (object borders, unlabelled pixels)


def _voc_palette() -> np.ndarray:
    """Pascal VOC colour map: bits 0/1/2 of the index go, most significant first, to R/G/B."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
        pal[i] = rgb
    pal.setflags(write=False)
    return pal


VOC_PALETTE: np.ndarray = _voc_palette()  # [256, 3] uint8; VOC_PALETTE[255] == (224, 224, 192), the void colour

_PALETTE_KEYS = (VOC_PALETTE.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])).astype(np.int64)
_KEY_ORDER = np.argsort(_PALETTE_KEYS)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Class-id mask int64 [H, W] from a PNG: palette mode (indices are the ids), RGB in
    the VOC palette (colours mapped back; void -> 255), or single-channel class indices."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"mask {path} not found; check the label folder and file names") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read mask {path} ({exc}); pass PNG label masks") from None
    if mode in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L"):
        return arr.astype(np.int64)
    if mode in ("RGB", "RGBA"):
        rgb = arr[..., :3].astype(np.int64)
        keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        uniq, inverse = np.unique(keys, return_inverse=True)
        pos = np.searchsorted(_PALETTE_KEYS, uniq, sorter=_KEY_ORDER).clip(max=255)
        ids = _KEY_ORDER[pos]
        bad = _PALETTE_KEYS[ids] != uniq
        if bad.any():
            k = int(uniq[bad][0])
            raise DataError(
                f"mask {path} has colour ({k >> 16}, {(k >> 8) & 255}, {k & 255}) outside the VOC palette; "
                "save masks as class indices (P or L mode) or in the VOC colours"
            )
        return ids[inverse].reshape(keys.shape).astype(np.int64)
    raise DataError(f"mask {path} has image mode {mode}; save masks as P, L or VOC-coloured RGB PNGs")


def _label_candidates(folder: Path, name: str) -> list[Path]:
    stem = Path(name).stem
    found = []
    if stem.endswith("_image"):
        found.append(folder / f"{stem[: -len('_image')]}_target.png")
    found.append(folder / f"{stem}.png")
    return found


def read_masks(folder: str | os.PathLike[str], names: Sequence[str]) -> list[np.ndarray]:
    """Label mask of each named image, looked up in ``folder`` by two rules, in order:
    ``N_image.<ext>`` -> ``N_target.png`` (VOC sample folders: images and targets side
    by side), then the same stem ``N.png`` (a separate labels folder, as VOC's
    SegmentationClass). Masks may differ in size, so a list is returned."""
    folder = Path(folder)
    paths, missing = [], []
    for name in names:
        cands = _label_candidates(folder, str(name))
        hit = next((p for p in cands if p.is_file()), None)
        if hit is None:
            missing.append(cands[0])
        paths.append(hit)
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"label mask {missing[0]} not found{more}; put N_target.png next to N_image.png or N.png in {folder}"
        )
    return [read_mask(p) for p in paths]


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel: floor((i + 0.5) * n_in / n_out), in exact integers."""
    i = np.arange(n_out, dtype=np.int64)
    return np.minimum(((2 * i + 1) * n_in) // (2 * n_out), n_in - 1)


def predict_mask(logits: np.ndarray, out_hw: tuple[int, int] | None = None, layout: str = "NCHW") -> np.ndarray:
    """Class masks int64 [N, H, W]: argmax at model resolution, then nearest resize to ``out_hw``.

    Taking argmax first keeps labels exact (no blended logits); output pixel (y, x)
    takes model pixel (floor((y + 0.5) * H_in / H_out), floor((x + 0.5) * W_in / W_out)),
    the pixel-centre rule (torch's "nearest-exact", PIL's NEAREST).
    """
    arr = np.asarray(logits)
    if layout not in ("NCHW", "NHWC"):
        raise UsageError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    if arr.ndim != 4:
        raise DataError(f"segmentation logits must be rank 4 ({layout}), got shape {arr.shape}; add the batch axis")
    masks = arr.argmax(axis=1 if layout == "NCHW" else 3).astype(np.int64)
    if out_hw is None:
        return masks
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if oh <= 0 or ow <= 0:
        raise UsageError(f"out_hw must be (height, width) > 0, got {tuple(out_hw)}")
    ys = _nearest_index(masks.shape[1], oh)
    xs = _nearest_index(masks.shape[2], ow)
    return masks[:, ys[:, None], xs[None, :]]


def confusion(
    pred: np.ndarray | Sequence[np.ndarray],
    target: np.ndarray | Sequence[np.ndarray],
    num_classes: int,
    ignore: int | None = VOID,
) -> np.ndarray:
    """Confusion matrix int64 [C, C], rows = target class, columns = predicted class.

    ``pred``/``target`` are arrays of one shape or equal-length lists of masks (which
    may differ in size between images). Target pixels equal to ``ignore`` are skipped.
    """
    if num_classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    preds = [pred] if isinstance(pred, np.ndarray) else list(pred)
    targets = [target] if isinstance(target, np.ndarray) else list(target)
    if len(preds) != len(targets):
        raise DataError(f"{len(preds)} predicted masks but {len(targets)} targets; pass one target per prediction")
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        p, t = np.asarray(p).astype(np.int64), np.asarray(t).astype(np.int64)
        if p.shape != t.shape:
            raise DataError(
                f"mask {i}: prediction {p.shape} and target {t.shape} differ in shape; resize predictions to the "
                "label size (predict_mask out_hw)"
            )
        keep = t != ignore if ignore is not None else np.ones(t.shape, bool)
        p, t = p[keep], t[keep]
        for what, m in (("target", t), ("prediction", p)):
            if m.size and (m.min() < 0 or m.max() >= num_classes):
                bad = int(m.max() if m.max() >= num_classes else m.min())
                raise DataError(
                    f"mask {i}: {what} has class id {bad} outside 0..{num_classes - 1}; pass the right num_classes "
                    "or mark unlabelled pixels with the ignore value"
                )
        conf += np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return conf


def miou(conf: np.ndarray, present_only: bool = True) -> dict[str, object]:
    """Mean IoU (%) from a confusion matrix; IoU_c = TP / (TP + FP + FN).

    ``present_only`` averages over the classes with a nonzero union (present in the
    target or the prediction), the VOC/TF ``mean_iou`` rule on a subset where not every
    class occurs; otherwise over all classes, an absent class counting as 0. Returns
    ``miou``, ``iou`` (per class, %, None where the union is 0) and ``classes`` (how
    many were averaged).
    """
    c = np.asarray(conf, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise DataError(f"confusion matrix must be square [C, C], got shape {c.shape}")
    tp = np.diag(c)
    union = c.sum(axis=0) + c.sum(axis=1) - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    n = int(present.sum()) if present_only else len(tp)
    mean = round(float(iou[present].sum() / n * 100.0), 9) if n else 0.0  # identical masks: exactly 100.0
    per_class = [float(v * 100.0) if ok else None for v, ok in zip(iou, present, strict=True)]
    return {"miou": mean, "iou": per_class, "classes": n}


def miou_vs_reference(
    pred: np.ndarray | Sequence[np.ndarray],
    reference_pred: np.ndarray | Sequence[np.ndarray],
    num_classes: int,
) -> dict[str, object]:
    """Label-free mIoU: predictions scored against the float model's own masks (identical -> 100)."""
    return miou(confusion(pred, reference_pred, num_classes, ignore=None))
