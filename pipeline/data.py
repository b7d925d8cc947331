"""Calibration and evaluation data: loaders, labels and batching.

Quantization quality depends on feeding the model exactly the preprocessing it
was trained with, so every path in (image folders, ``.npz``/``.npy`` arrays,
tensors, DataLoaders) ends in the same float32 NCHW tensor and every way it can
go wrong is a one-line :class:`DataError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .demo import DEMO_HOLDOUT, DEMO_HOLDOUT_SAMPLES, demo_photos
from .errors import DataError, UsageError
from .preprocess import Preset, fit_image, get_preset, normalize_uint8, preprocess_uint8

__all__ = [
    "iter_batches",
    "load_class_names",
    "load_data",
    "load_labels",
    "take_samples",
]


def _check_finite(x: torch.Tensor, source: str) -> None:
    """NaN/Inf in calibration data silently ruins every range; refuse it."""
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(f"{source} contains {bad} NaN/Inf value(s); clean or drop those samples")


def _array_to_tensor(arr: np.ndarray, preset: Preset, source: str) -> torch.Tensor:
    """uint8 NHWC is preprocessed; float NCHW is used as is; anything else is refused."""
    if arr.dtype == np.uint8:
        if arr.ndim != 4:
            raise DataError(
                f"{source}: uint8 images must have rank 4 (N, H, W, 3), got shape {arr.shape}; "
                "add the batch axis or reshape"
            )
        if arr.shape[-1] != 3:
            raise DataError(
                f"{source}: uint8 images must have 3 RGB channels last (N, H, W, 3), got shape {arr.shape}; "
                "convert grayscale/RGBA images to RGB (e.g. np.repeat(x, 3, axis=-1) for grayscale)"
            )
        return preprocess_uint8(arr, preset)
    if arr.dtype.kind == "f":
        if arr.ndim != 4:
            raise DataError(
                f"{source}: float data must have rank 4 (N, C, H, W), got shape {arr.shape}; "
                "add the batch axis or reshape"
            )
        if arr.shape[1] not in (1, 3) and arr.shape[-1] in (1, 3):
            raise DataError(
                f"{source}: float data of shape {arr.shape} looks NHWC; transpose to NCHW "
                "(x.transpose(0, 3, 1, 2))"
            )
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        _check_finite(x, source)
        return x
    raise DataError(
        f"{source}: unsupported dtype {arr.dtype}; use uint8 NHWC images (0..255) "
        "or preprocessed float NCHW"
    )


def _read_npz_images(path: Path) -> np.ndarray:
    """The ``images`` array of an .npz, or its only array."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "images" in npz.files:
                return npz["images"]
            if len(npz.files) == 1:
                return npz[npz.files[0]]
            raise DataError(
                f"{path} has no 'images' array (keys: {', '.join(npz.files)}); "
                "save the images under the key 'images'"
            )
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read {path} ({type(exc).__name__}: {exc}); re-save it") from exc


def _read_npy(path: Path) -> np.ndarray:
    """An .npy array, refusing pickled object arrays."""
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"cannot read {path} ({type(exc).__name__}: {exc}); re-save it") from exc


#: files an image folder may hold beside its images (labels, annotations, notes): not images, not errors
NOT_IMAGES = frozenset({".csv", ".tsv", ".txt", ".json", ".xml", ".yaml", ".yml", ".md", ".npz", ".npy"})


def _load_folder(root: Path, preset: Preset, limit: int | None, skip_bad: bool,
                 names: list[str] | None = None, exclude: frozenset[str] = frozenset(),
                 sizes: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Every readable image under ``root`` (sorted, recursive), preprocessed.

    ``names`` (if given) receives the relative path of every image loaded, in order,
    so labels can be matched to the images actually read; ``sizes`` (if given) their
    original (width, height), so a detector's boxes can be mapped back to them
    (``preprocess.input_transform``). Files named in ``exclude`` (relative paths) and
    label or annotation files (``NOT_IMAGES``) are passed over.
    """
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
         and p.suffix.lower() not in NOT_IMAGES and p.relative_to(root).as_posix() not in exclude),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    images: list[np.ndarray] = []
    bad: list[str] = []
    converted = upscaled = 0
    for path in files:
        if limit is not None and len(images) >= limit:
            break
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode != "RGB":
                    converted += 1
                    img = img.convert("RGB")
                # a letterbox or stretch scales every frame to fit by design; only a crop warns
                upscaled += preset.fit == "crop" and min(img.size) < preset.crop
                images.append(np.asarray(fit_image(img, preset)))
                if names is not None:
                    names.append(path.relative_to(root).as_posix())
                if sizes is not None:
                    sizes.append(img.size)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            if not skip_bad:
                raise DataError(
                    f"{path} is not a readable image ({type(exc).__name__}); "
                    "remove it, or skip unreadable files (--skip-bad-data, skip_bad=True)"
                ) from None
            bad.append(path.relative_to(root).as_posix())
    if bad:
        warnings.warn(
            f"skipped {len(bad)} unreadable or non-image file(s) in {root} (first: {bad[0]}); "
            "remove them, or refuse such folders with --strict-data (skip_bad=False)",
            stacklevel=3,
        )
    if converted or upscaled:
        # One warning for every image that was changed on the way in, with counts.
        done = [f"converted {converted} image(s) from grayscale/RGBA/other modes to RGB"] if converted else []
        if upscaled:
            done.append(f"upscaled {upscaled} image(s) smaller than the {preset.crop}x{preset.crop} crop")
        warnings.warn(f"{' and '.join(done)} in {root}; check they are the images you meant", stacklevel=3)
    if not images:
        raise DataError(f"no readable images in {root}; point to a folder of JPEG/PNG files")
    return normalize_uint8(np.stack(images), preset)


def load_data(
    path: str | Path,
    preset: str | Preset | None = None,
    *,
    limit: int | None = None,
    resize: int | None = None,
    crop: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    skip_bad: bool = True,
    names: list[str] | None = None,
    exclude: Collection[str] | Collection[int] = (),
    sizes: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Load an image folder, ``.npz`` or ``.npy`` as float32 NCHW.

    uint8 NHWC arrays and image files get the preset's preprocessing (default
    "imagenet"); float NCHW arrays are taken as already preprocessed. For a folder,
    ``names`` receives the loaded files' relative paths (see ``load_labels``) and
    ``sizes`` their original (width, height) (arrays leave both untouched).
    ``exclude`` drops samples before ``limit`` counts them: relative file paths in a
    folder, indices in an array. ``DEMO_HOLDOUT`` names the demo's held-out photos.
    """
    if str(path) == DEMO_HOLDOUT:
        return demo_photos(0, DEMO_HOLDOUT_SAMPLES)[1][:limit]
    path = Path(path)
    p = get_preset(preset, resize=resize, crop=crop, mean=mean, std=std)
    if limit is not None and limit < 1:
        raise UsageError(f"limit {limit} must be at least 1")
    if not path.exists():
        raise DataError(f"data path not found: {path}; give an image folder, .npz or .npy")
    if path.is_dir():
        return _load_folder(path, p, limit, skip_bad, names, frozenset(str(e) for e in exclude), sizes)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arr = _read_npz_images(path)
    elif suffix == ".npy":
        arr = _read_npy(path)
    else:
        raise DataError(f"unsupported data file {path.name}; give an image folder, .npz or .npy")
    if arr.ndim >= 1 and exclude:
        arr = np.delete(arr, [int(i) for i in exclude if 0 <= int(i) < len(arr)], axis=0)
    if arr.ndim >= 1 and limit is not None:
        arr = arr[:limit]
    if arr.ndim >= 1 and len(arr) == 0:
        raise DataError(f"{path} holds no samples; give a non-empty array")
    return _array_to_tensor(arr, p, path.name)


def load_labels(path: str | Path, *, limit: int | None = None, names: list[str] | None = None,
                exclude: Collection[int] = ()) -> np.ndarray | None:
    """Class labels as int64: the ``labels`` array of an .npz, or a CSV matched to image files.

    A CSV needs a ``filename`` column and a ``class_index`` (or ``label``) column;
    ``names`` are the loaded images' paths (``load_data(..., names=...)``), matched by
    file name. Returns None for an .npz without labels; ``exclude`` drops indices of an
    .npz as ``load_data`` does.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return _csv_labels(path, names or [])
    if path.suffix.lower() != ".npz" or not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        if "labels" not in npz.files:
            return None
        labels = np.asarray(npz["labels"]).astype(np.int64).reshape(-1)
    if exclude:
        labels = np.delete(labels, [int(i) for i in exclude if 0 <= int(i) < len(labels)])
    return labels[:limit] if limit is not None else labels


def load_class_names(path: str | Path | None) -> list[str] | None:
    """Class names in index order, where the labels give them: an .npz's ``classes`` array, or
    a labels CSV's name column (``class_name``, ``name`` or another ``*name`` column besides
    ``filename``); classes the CSV never names are called ``class K``. None otherwise."""
    if path is None or not Path(path).is_file():
        return None
    path = Path(path)
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return [str(c) for c in npz["classes"]] if "classes" in npz.files else None
    if path.suffix.lower() != ".csv":
        return None
    import csv

    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    cols = list(rows[0]) if rows else []
    index = "class_index" if "class_index" in cols else "label" if "label" in cols else None
    named = [c for c in ("class_name", "name") if c in cols] + [c for c in cols if c.endswith("name") and
                                                              c not in ("filename", "class_name", "name")]
    if index is None or not named:
        return None
    by_index: dict[int, str] = {}
    for r in rows:
        try:
            by_index.setdefault(int(r[index]), str(r[named[0]]).strip())
        except (TypeError, ValueError):
            return None
    if not by_index or min(by_index) < 0:
        return None
    return [by_index.get(k) or f"class {k}" for k in range(max(by_index) + 1)]


def _csv_labels(path: Path, names: list[str]) -> np.ndarray:
    import csv

    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read labels file {path}: {e}; give a CSV with filename,class_index columns") from None
    cols = set(rows[0]) if rows else set()
    col = "class_index" if "class_index" in cols else "label" if "label" in cols else None
    if "filename" not in cols or col is None:
        raise DataError(f"labels file {path} needs columns filename and class_index (or label); it has: "
                        f"{', '.join(sorted(cols)) or 'none'}")
    try:
        by_name = {Path(r["filename"]).name: int(r[col]) for r in rows}
    except (TypeError, ValueError):
        raise DataError(f"labels file {path}: column {col} must hold integers") from None
    missing = [n for n in names if Path(n).name not in by_name]
    if missing:
        raise DataError(f"labels file {path} has no row for {len(missing)} image(s) (first: {missing[0]}); "
                        "add them or remove the images")
    return np.array([by_name[Path(n).name] for n in names], dtype=np.int64)


# --------------------------------------------------------------------------- batching


def _as_tensor(item: Any) -> torch.Tensor:
    """One batch or sample from any supported container, as float32."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]  # (x, y) pairs: the input is first
    if isinstance(item, dict):
        for key in ("pixel_values", "images", "image", "x", "input"):
            if key in item:
                item = item[key]
                break
        else:
            raise DataError(
                f"batch dict has no image key (keys: {', '.join(map(str, item))}); "
                "yield tensors or (x, y) pairs"
            )
    if isinstance(item, np.ndarray):
        if item.dtype.kind not in "biuf":
            raise DataError(f"cannot use an array of dtype {item.dtype} as model input; pass numbers "
                            "(float32 NCHW, preprocessed as the model expects)")
        item = torch.from_numpy(np.ascontiguousarray(item))
    if not isinstance(item, torch.Tensor):
        raise DataError(
            f"cannot use a {type(item).__name__} as model input; yield tensors, arrays or (x, y) pairs"
        )
    if item.is_complex():
        raise DataError(f"cannot use a {item.dtype} tensor as model input; pass real numbers (float32 NCHW)")
    if item.ndim == 3:
        item = item.unsqueeze(0)
    if item.ndim < 2:
        raise DataError(f"input of shape {tuple(item.shape)} has no batch axis; use (N, C, H, W)")
    return item.to(torch.float32)


def _stream(data: Any) -> Iterator[torch.Tensor]:
    """Batches of whatever size the source yields."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        yield _as_tensor(data if data.ndim != 3 else data[None])
        return
    if isinstance(data, (str, Path)):
        raise DataError(f"got a path {data!s}; load it with load_data() first")
    if not isinstance(data, Iterable):
        raise DataError(
            f"cannot iterate over {type(data).__name__}; pass a tensor, array, "
            "iterable of batches or DataLoader"
        )
    for item in data:
        yield _as_tensor(item)


def iter_batches(data: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """Re-batch any supported data source into float32 batches of ``batch_size``.

    Accepts a tensor/array (N, C, H, W), an iterable of tensors/arrays or (x, y)
    pairs, or a DataLoader; the last batch may be smaller.
    """
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be at least 1")
    pending: list[torch.Tensor] = []
    count = 0
    for chunk in _stream(data):
        while len(chunk):
            take = chunk[: batch_size - count]
            chunk = chunk[len(take) :]
            pending.append(take)
            count += len(take)
            if count == batch_size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, count = [], 0
    if count:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)


def take_samples(data: Any, n: int | None, seed: int = 0, *, at_most: bool = False,
                 picked: list[int] | None = None) -> torch.Tensor:
    """Gather ``n`` samples as one float32 tensor (``n=None``: all of them).

    Fewer than ``n`` available is an error unless ``at_most`` (then all are taken).

    Arrays and tensors larger than ``n`` give a seeded random subset (kept in their
    original order); streams give their first ``n`` samples. ``picked`` (if given)
    receives the indices taken, so a bundle can record which samples calibrated.
    """
    if n is not None and n < 1:
        raise UsageError(f"sample count {n} must be at least 1")
    if isinstance(data, (torch.Tensor, np.ndarray)) and data.ndim == 4:
        total = len(data)
        if total == 0:
            raise DataError(f"the data holds no samples (shape {tuple(data.shape)}); give at least one sample")
        if at_most and n is not None:
            n = min(n, total)
        if n is not None and total < n:
            raise DataError(f"asked for {n} samples but found only {total}; lower n or add data")
        x = _as_tensor(data)
        idx = torch.arange(total)
        if n is not None and n < total:
            gen = torch.Generator().manual_seed(seed)
            idx = torch.randperm(total, generator=gen)[:n].sort().values
            x = x[idx]
        _check_finite(x, "the data")
        if picked is not None:
            picked.extend(idx.tolist())
        return x.contiguous()
    parts: list[torch.Tensor] = []
    got = 0
    for batch in iter_batches(data, batch_size=256):
        if n is not None:
            batch = batch[: n - got]
        parts.append(batch)
        got += len(batch)
        if n is not None and got >= n:
            break
    if got == 0:
        raise DataError("the data yielded no samples; check the data source")
    if n is not None and got < n and not at_most:
        raise DataError(f"asked for {n} samples but found only {got}; lower n or add data")
    x = torch.cat(parts)
    _check_finite(x, "the data")
    if picked is not None:
        picked.extend(range(got))
    return x
