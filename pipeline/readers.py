"""Model files in, the canonical float graph out: readers looked up by file suffix.

A reader turns an untrusted model file (nothing in it is executed) into the same float
``QuantGraph`` that ``capture`` makes from PyTorch code, so every profile, method and
target applies. Right after reading, the graph is run beside the file's own runtime
(:func:`check_against_source`): a reader that misreads an op stops there, naming it,
before any calibration. A new format is one module with a ``read(path) -> SourceGraph``
function, registered here by name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ModelError
from .float_exec import run_float
from .graph import QuantGraph, TensorInfo

#: reader name -> (file suffixes, "module:function", one-line description)
READERS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "keras": ((".h5", ".keras"), "eptq_deploy.read_keras:read",
              "Keras models, read by TensorFlow and its float TFLite converter (pip install \"eptq-deploy[keras]\")"),
    "onnx": ((".onnx",), "eptq_deploy.read_onnx:read",
             "ONNX files, opsets 11 to 21 (eptq_deploy.read_onnx.SUPPORTED lists the ops; others are refused by name)"),
    "tflite": ((".tflite",), "eptq_deploy.read_tflite:read",
               "float TFLite files, float16 weights included (eptq_deploy.read_tflite.SUPPORTED lists the ops)"),
}
#: model files above this size are refused before parsing (a protobuf holds at most 2 GiB)
MAX_FILE_BYTES = 2**31


@dataclass
class SourceGraph:
    """A model read from a file: its float graph, and how to run the file itself for comparison.

    ``run_source(x, names)`` runs the source model's own runtime on ``x`` (NCHW float32) and
    returns the values of the source tensors ``names``; ``source_names`` maps each canonical
    tensor to the source tensor it reproduces (in execution order), so the first op that
    diverges can be named.
    """

    graph: QuantGraph
    run_source: Callable[[np.ndarray, list[str]], list[np.ndarray]]
    source_names: dict[str, str] = field(default_factory=dict)
    hints: dict[str, Any] = field(default_factory=dict)


def read_source(model: Any, input_shape: Sequence[int] | None = None) -> SourceGraph | None:
    """The model as a read file: a ``SourceGraph`` as is, a path with a reader's suffix, or an in-memory
    ``onnx.ModelProto``; None for anything else (PyTorch modules and programs are captured instead).
    ``input_shape`` sizes a file's dynamic input dimensions (see ``resolve_input_shape``)."""
    if isinstance(model, SourceGraph):
        return model
    if isinstance(model, str | os.PathLike) and Path(model).suffix.lower() in model_file_suffixes():
        return read_model_file(model, input_shape)
    if type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx"):
        module, _, func = READERS["onnx"][1].partition(":")
        return getattr(import_module(module), func)(model, input_shape=input_shape)
    return None


def resolve_input_shape(declared: Sequence[int | None], given: Sequence[int] | None, where: str,
                        layout: str) -> tuple[int, ...]:
    """The input's sample shape (batch excluded) the graph is read at: the file's sizes, with
    ``given`` (``--input-shape``, with or without the batch) for the dynamic ones (None). A dynamic
    size without ``given``, or a ``given`` that contradicts a fixed size, is a one-line error."""
    declared = list(declared)
    shown = ",".join("?" if d is None else str(d) for d in declared)
    if given is not None:
        given = [int(v) for v in given]
        if len(given) == len(declared) + 1:
            given = given[1:]  # the batch: any batch runs, whatever was given
        if len(given) != len(declared) or any(v < 1 for v in given):
            raise ModelError(f"--input-shape {','.join(map(str, given))} does not fit the input of {where} ({layout} "
                             f"without the batch: {shown}); give {len(declared)} positive sizes")
        clash = [(d, v) for d, v in zip(declared, given, strict=True) if d is not None and d != v]
        if clash:
            raise ModelError(f"--input-shape {','.join(map(str, given))} contradicts the fixed input size of {where} "
                             f"{shown} ({layout}); drop --input-shape or match it")
        return tuple(given)
    if any(d is None for d in declared):
        example = ",".join("224" if d is None else str(d) for d in declared)
        raise ModelError(f"the input of {where} has dynamic size(s) ({layout} without the batch: {shown}); pass "
                         f"--input-shape {example} (input_shape= in the API) with the size to quantize at")
    return tuple(int(d) for d in declared)  # type: ignore[arg-type]


def same_pads(size: tuple[int, ...] | list[int], kernel: tuple[int, ...] | list[int], stride: list[int],
              dilation: list[int], upper: bool = True) -> list[int]:
    """[begins..., ends...] of "SAME" padding (TensorFlow's, ONNX's SAME_UPPER; SAME_LOWER with
    ``upper=False``): the output is ceil(size / stride), the odd pixel goes at the end."""
    begin, end = [], []
    for s, k, st, d in zip(size, kernel, stride, dilation, strict=True):
        total = max((-(-s // st) - 1) * st + (k - 1) * d + 1 - s, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if upper else big)
        end.append(big if upper else small)
    return begin + end


def per_channel_constant(c: np.ndarray, channels: int, rank: int, channel_axis: int) -> np.ndarray | None:
    """``c`` as one value per channel when it broadcasts against a rank-``rank`` output as a scalar
    or along ``channel_axis`` only (numpy/ONNX/TFLite broadcasting aligns trailing axes); else None."""
    if c.size == 1:
        return np.full(channels, float(c.ravel()[0]), np.float32)
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    if shape[channel_axis] != channels or any(s != 1 for i, s in enumerate(shape) if i != channel_axis):
        return None
    return c.reshape(-1).astype(np.float32)


def fold_into_layer(weight: TensorInfo, bias: TensorInfo, v: np.ndarray, op: str) -> None:
    """A per-channel constant added to (``op`` "add") or multiplying ("mul") a conv/linear output,
    folded into its weights and bias: what exporters write as a separate bias or scale."""
    if op == "add":
        bias.data = (bias.data + v).astype(np.float32)
    else:
        weight.data = (weight.data * v.reshape((-1,) + (1,) * (weight.data.ndim - 1))).astype(np.float32)
        bias.data = (bias.data * v).astype(np.float32)


def as_add_or_mul(op: str, c: np.ndarray) -> tuple[str, np.ndarray]:
    """``x op c`` as an add or a multiply by a constant: a sub adds -c, a div multiplies by 1/c (so a
    per-channel one folds into the layer before it as Add and Mul do)."""
    c = np.asarray(c, np.float32)
    if op == "sub":
        return "add", -c
    if op == "div":
        with np.errstate(divide="ignore"):
            return "mul", (np.float32(1) / c).astype(np.float32)
    return op, c


def held_constant(c: np.ndarray, shape: tuple[int, ...], channels_last: bool = False) -> np.ndarray | None:
    """``c`` as a graph constant broadcasting onto an activation of canonical ``shape`` (NCHW for 4-D),
    at the activation's rank with batch axis 1 so any batch size broadcasts; None where it would widen
    the activation or broadcast along the batch axis. ``channels_last``: ``c`` broadcasts onto the
    NHWC tensor (TFLite) and is moved to NCHW."""
    c = np.asarray(c, np.float32)
    rank = len(shape)
    if c.ndim > rank:
        return None
    c = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if channels_last and rank == 4:
        c = c.transpose(0, 3, 1, 2)
    try:
        fits = np.broadcast_shapes(c.shape, shape) == tuple(shape)
    except ValueError:
        return None
    return np.ascontiguousarray(c) if fits and c.shape[0] == 1 else None


#: a source tensor name kept as is: printable, no quotes, backslashes or spaces (names end up in
#: generated C++ comments and file formats), at most 200 characters
SAFE_TENSOR_NAME = re.compile(r"[A-Za-z0-9_.:;/+\-]{1,200}")


def adopt_source_names(g: QuantGraph, source_name: dict[str, str]) -> dict[str, str]:
    """Rename ``g``'s input and activation tensors (in place) to the names the source file gives them,
    so exported files keep the names a firmware team already binds to; a name that is unsafe
    (``SAFE_TENSOR_NAME``) or taken keeps the reader's own. Returns old name -> new name."""
    taken = set(g.tensors)
    renamed: dict[str, str] = {}
    for old, new in source_name.items():
        t = g.tensors.get(old)
        if t is None or t.kind not in ("input", "activation") or new in taken or not SAFE_TENSOR_NAME.fullmatch(new):
            continue
        taken.add(new)
        renamed[old] = new
    for n in g.nodes:
        n.inputs = [renamed.get(t, t) for t in n.inputs]
        n.outputs = [renamed.get(t, t) for t in n.outputs]
    g.tensors = {renamed.get(k, k): v for k, v in g.tensors.items()}
    for new in renamed.values():
        g.tensors[new].name = new
    g.inputs = [renamed.get(t, t) for t in g.inputs]
    g.outputs = [renamed.get(t, t) for t in g.outputs]
    return renamed


def list_readers() -> list[tuple[str, str]]:
    """(name, suffixes and description) of every model-file reader."""
    return [(name, f"{', '.join(suffixes)}: {text}") for name, (suffixes, _, text) in sorted(READERS.items())]


def model_file_suffixes() -> set[str]:
    return {s for suffixes, _, _ in READERS.values() for s in suffixes}


def read_model_file(path: str | Path, input_shape: Sequence[int] | None = None) -> SourceGraph:
    """Read ``path`` with the reader its suffix names; one-line errors for a missing or oversized file."""
    path = Path(path)
    spec = next((spec for suffixes, spec, _ in READERS.values() if path.suffix.lower() in suffixes), None)
    if spec is None:
        raise ModelError(f"no reader for {path.suffix or 'files without a suffix'} ({path.name}); "
                         f"readable: {', '.join(sorted(model_file_suffixes()))}")
    if not path.is_file():
        raise ModelError(f"model file not found: {path}; check the path")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ModelError(f"{path} is {path.stat().st_size:,} bytes, above the {MAX_FILE_BYTES:,}-byte limit for a "
                         "model file; check it is the model")
    module, _, func = spec.partition(":")
    return getattr(import_module(module), func)(path, input_shape=input_shape)


#: float tolerance of the reader check: |graph - source| <= ATOL_REL * max|source| + RTOL * |source|. Summation
#: order alone differs by more than 1e-4 of a tensor's range after a hundred layers on 0..255 pixels (YOLOX-Nano's
#: objectness head: 6.5e-4); a misread op is off by a sizeable part of its range
ATOL_REL, RTOL = 1e-3, 1e-3


def close_to(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Same shape and within the readers' float tolerance of the source's values."""
    scale = float(np.abs(theirs).max()) if theirs.size else 0.0
    return ours.shape == theirs.shape and bool(
        np.all(np.abs(ours - theirs) <= ATOL_REL * max(scale, 1e-6) + RTOL * np.abs(theirs)))


#: values per sample above which a tensor is taken for a malformed shape field (4 GiB of float32)
MAX_SAMPLE_VALUES = 2**30


def _run_source(src: SourceGraph, x: torch.Tensor, names: list[str]) -> list[np.ndarray]:
    """The source runtime's values of ``names``; its refusal (a malformed file) as one line."""
    try:
        return src.run_source(x.numpy(), names)
    except Exception as e:  # the runtime's own exception types vary (ValueError, RuntimeError, decode errors)
        raise ModelError(f"the model's own runtime refuses it ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:140]}); the file is malformed") from None


def check_against_source(src: SourceGraph, x: torch.Tensor) -> None:
    """Run the float graph and the source runtime on ``x``; beyond float tolerance, stop with the
    first canonical op whose output differs from the source tensor it stands for."""
    g = src.graph
    big = next((t for t in g.tensors.values() if int(np.prod(t.shape[1:], dtype=np.int64)) > MAX_SAMPLE_VALUES), None)
    if big is not None:  # a shape field, not a real model: refuse before allocating it
        raise ModelError(f"tensor {big.name!r} holds {int(np.prod(big.shape[1:], dtype=np.int64)):,} values per sample "
                         f"(above {MAX_SAMPLE_VALUES:,}); the file is malformed")
    ours: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            run_float(g, x, hook=lambda t, v: ours.__setitem__(t, v) if t in src.source_names else None)
    except (RuntimeError, ValueError, IndexError) as e:  # shapes a real model cannot have (a malformed file)
        raise ModelError(f"the read graph cannot run ({' '.join(str(e).split())[:140]}); the file's shapes are "
                         "inconsistent: it is malformed") from None
    outs = list(g.outputs)
    theirs = _run_source(src, x, [src.source_names[o] for o in outs])
    if all(close_to(ours[o].numpy(), v) for o, v in zip(outs, theirs, strict=True)):
        return
    names = [t for t in g.activation_names() if t in src.source_names and t not in g.inputs]
    values = _run_source(src, x, [src.source_names[t] for t in names])
    for t, v in zip(names, values, strict=True):
        if not close_to(ours[t].numpy(), v):
            node = g.producer()[t]
            raise ModelError(f"the read graph differs from the source model at {node.op} {node.name} (source tensor "
                             f"{src.source_names[t]!r}): max |diff| {float(np.abs(ours[t].numpy().ravel() - v.ravel()).max()):.3g}"
                             "; the reader misreads this op: please report it with the model")
    worst = max(float(np.abs(ours[o].numpy() - v).max()) for o, v in zip(outs, theirs, strict=True))
    raise ModelError(f"the read graph's output differs from the source model's (max |diff| {worst:.3g}); "
                     "please report it with the model")
