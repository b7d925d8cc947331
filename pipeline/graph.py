"""The quantized graph: the one contract between ``pipeline/`` and ``targets/``.

A framework-neutral, serialisable description of an integer network. Nodes are in
topological order and use a small canonical op set (``OPS``); tensors carry their
shape, their stored data (integer weights, int32 bias) and, where quantized, the
exact grid: bits, signedness, scale(s), zero point(s), channel axis and the
power-of-two exponent where the profile demands one. Layout is NCHW; a target that
needs NHWC transposes when it writes its file.

On disk the graph is ``graph.json`` (structure and quantization, human readable)
plus ``graph.npz`` (tensor data), versioned by ``FORMAT_VERSION``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError

FORMAT_VERSION = 1

#: op name -> (number of inputs or None for variadic, attributes it may carry)
OPS: dict[str, tuple[int | None, frozenset[str]]] = {
    # pad_value: per input channel, the real value the padding holds instead of zero (a folded
    # input normalisation pads with the mean pixel, see fold.py); absent means zero
    "conv2d": (3, frozenset({"stride", "pads", "dilation", "groups", "activation", "pad_value"})),
    "depthwise_conv2d": (3, frozenset({"stride", "pads", "dilation", "groups", "activation"})),
    "linear": (3, frozenset({"activation"})),
    "add": (2, frozenset({"activation"})),
    "mul": (2, frozenset()),
    "concat": (None, frozenset({"axis"})),
    "relu": (1, frozenset()),
    "relu6": (1, frozenset()),
    "hardswish": (1, frozenset()),
    "hardsigmoid": (1, frozenset()),
    "sigmoid": (1, frozenset()),
    "max_pool2d": (1, frozenset({"kernel", "stride", "pads"})),
    "avg_pool2d": (1, frozenset({"kernel", "stride", "pads", "count_include_pad"})),
    "global_avg_pool": (1, frozenset()),
    "pad": (1, frozenset({"pads"})),
    "slice": (1, frozenset({"axes", "starts", "ends", "steps"})),
    "flatten": (1, frozenset()),
    "reshape": (1, frozenset({"shape"})),
    # read from model files; no target has a measured integer kernel for these yet (each refuses them)
    "softmax": (1, frozenset({"axis"})),
    "sub": (2, frozenset({"activation"})),
    "div": (2, frozenset({"activation"})),
    "transpose": (1, frozenset({"perm"})),
    # spatial resize of NCHW: see RESIZE_COORDS; "scale" (output/input, the coordinate divides by it, as
    # onnxruntime computes) or "step" (input pixels per output pixel, multiplied, as TFLite computes)
    "resize": (1, frozenset({"mode", "coord", "nearest", "size", "scale", "step"})),
    "leaky_relu": (1, frozenset({"alpha"})),
    "prelu": (2, frozenset()),  # inputs: x, slope (a constant, one value per channel)
    "tanh": (1, frozenset()),
    "exp": (1, frozenset()),  # a box decode's width and height (runs in the float tail)
    # weight (C_in, C_out / groups, kH, kW) and bias inputs like a conv, but not in WEIGHTED_OPS: quantization
    # never sees it. pads crop the full output (top, left, bottom, right); output_padding extends its end
    "conv_transpose2d": (3, frozenset({"stride", "pads", "output_padding", "dilation", "groups", "activation"})),
}

#: ops that may read a ``constant`` tensor (a float array held in the graph, not a learned weight)
CONSTANT_INPUT_OPS = frozenset({"add", "mul", "sub", "div", "prelu"})
#: resize coordinate rules: output pixel x -> input coordinate (ONNX's coordinate_transformation_mode names)
RESIZE_COORDS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
#: how nearest-neighbour resize rounds the input coordinate (ONNX's nearest_mode names)
RESIZE_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")

#: ops whose output grid is the input grid (they move or select codes, never rescale); see ``moves_codes``
SAME_GRID_OPS = frozenset({"max_pool2d", "pad", "slice", "flatten", "reshape", "transpose"})
#: ops with learnable weights (inputs[1] weight, inputs[2] bias)
WEIGHTED_OPS = frozenset({"conv2d", "depthwise_conv2d", "linear"})
ACTIVATIONS = ("none", "relu", "relu6")


def moves_codes(n: Node) -> bool:
    """Whether node ``n``'s output holds input codes only, moved or selected (so it shares its input's
    grid): the ``SAME_GRID_OPS`` and a nearest-neighbour resize, which copies pixels."""
    return n.op in SAME_GRID_OPS or (n.op == "resize" and n.attrs.get("mode") == "nearest")


@dataclass(frozen=True)
class TargetRules:
    """What a target's runtime demands of the parameters, declared by the target.

    ``rounding`` names the requantisation rule its integer kernels follow (a
    ``simulate.RoundingRule`` the target's module defines and registers, see
    ``simulate.register_rule``); ``shared_grid_ops`` are ops whose inputs and output must sit
    on one grid; ``fixed_grids`` maps an op to the (scale, zero point, signed) its
    output must use.
    """

    rounding: str = "float-half-even"
    shared_grid_ops: frozenset[str] = frozenset()
    fixed_grids: dict[str, tuple[float, int, bool]] = field(default_factory=dict)
    max_weight_bits: int = 8
    activation_bits: tuple[int, ...] = (8,)
    per_tensor_weights: bool = True
    asymmetric_activations: bool = True
    #: whether every activation grid must be a power of two (quantizers stated as thresholds 2**k)
    power_of_two_activations: bool = False


@dataclass
class QParams:
    """An integer grid: real = scale * (q - zero_point), q in [qmin, qmax].

    ``scale`` and ``zero_point`` have one entry per channel along ``axis`` (per-channel)
    or a single entry (``axis`` None). ``exponent`` is set where every scale is exactly
    ``2**exponent`` (power-of-two hardware shifts).
    """

    bits: int
    signed: bool
    scale: np.ndarray  # float32, shape (C,) or (1,)
    zero_point: np.ndarray  # int64, same shape
    axis: int | None = None
    narrow: bool = False
    exponent: np.ndarray | None = None  # int64, same shape

    def __post_init__(self) -> None:
        self.scale = np.asarray(self.scale, dtype=np.float32).reshape(-1)
        self.zero_point = np.asarray(self.zero_point, dtype=np.int64).reshape(-1)
        if self.exponent is not None:
            self.exponent = np.asarray(self.exponent, dtype=np.int64).reshape(-1)

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "bits": self.bits,
            "signed": self.signed,
            "narrow": self.narrow,
            "axis": self.axis,
            "scale": [float(s) for s in self.scale],
            "zero_point": [int(z) for z in self.zero_point],
            "qmin": self.qmin,
            "qmax": self.qmax,
        }
        if self.exponent is not None:
            d["power_of_two_exponent"] = [int(e) for e in self.exponent]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QParams:
        return cls(
            bits=int(d["bits"]),
            signed=bool(d["signed"]),
            narrow=bool(d.get("narrow", False)),
            axis=d.get("axis"),
            scale=np.asarray(d["scale"], dtype=np.float32),
            zero_point=np.asarray(d["zero_point"], dtype=np.int64),
            exponent=(np.asarray(d["power_of_two_exponent"]) if "power_of_two_exponent" in d else None),
        )


@dataclass
class TensorInfo:
    """A tensor: ``kind`` is input, activation, weight, bias or constant (a float array an op such as
    ``sub`` reads, see ``CONSTANT_INPUT_OPS``); ``data`` for weights, biases and constants."""

    name: str
    shape: tuple[int, ...]
    kind: str
    quant: QParams | None = None
    data: np.ndarray | None = None

    @property
    def dtype(self) -> str:
        if self.data is not None:
            return str(self.data.dtype)
        return "float32" if self.quant is None else ("int" if self.quant.signed else "uint") + str(self.quant.bits)


@dataclass
class Node:
    """One operation; ``source`` is where it sits in the original model (module path)."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass
class QuantGraph:
    """Nodes in topological order plus every tensor they touch."""

    nodes: list[Node]
    tensors: dict[str, TensorInfo]
    inputs: list[str]
    outputs: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> QuantGraph:
        """Same structure, node list and tensor records copied (arrays shared until replaced)."""
        return QuantGraph(copy.deepcopy(self.nodes), {k: copy.copy(v) for k, v in self.tensors.items()},
                          list(self.inputs), list(self.outputs), dict(self.meta))

    # ------------------------------------------------------------------ queries
    def producer(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {t: [] for t in self.tensors}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        return out

    def weighted_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.op in WEIGHTED_OPS]

    def batch_size(self, elements: int = 2**24, most: int = 256) -> int:
        """Samples per batch for a whole-network pass: the largest activation then holds about
        ``elements`` numbers, so the simulation's float64 temporaries stay near a GiB at
        224x224 as at 32x32 (at least 1 sample, at most ``most``)."""
        per = max((int(np.prod(self.tensors[t].shape[1:])) for t in self.activation_names()), default=1)
        return max(1, min(most, elements // max(per, 1)))

    def values_per_sample(self, names: list[str]) -> int:
        """Numbers one sample holds in the tensors ``names`` (what a pass keeping them all touches)."""
        return sum(int(np.prod(self.tensors[t].shape[1:])) for t in names)

    def dead_after(self) -> list[list[str]]:
        """Per node, the activations no later node reads (graph outputs never): an executor frees
        them once that node has run, so a 224x224 batch holds a few live tensors, not all of them."""
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for t in [*n.inputs, *n.outputs]:
                last[t] = i
        dead: list[list[str]] = [[] for _ in self.nodes]
        for t, i in last.items():
            if t not in self.outputs and self.tensors[t].data is None:  # constants stay
                dead[i].append(t)
        return dead

    def activation_names(self) -> list[str]:
        """Graph inputs and node outputs, in execution order."""
        return list(self.inputs) + [o for n in self.nodes for o in n.outputs]

    def op_list(self) -> list[str]:
        return sorted({n.op for n in self.nodes})

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of stored constants: ``container`` (int8/int32 as stored), ``packed`` (at bit width)."""
        container = packed = 0
        for t in self.tensors.values():
            if t.data is None or t.kind not in ("weight", "bias"):
                continue
            container += t.data.size * t.data.dtype.itemsize
            bits = t.quant.bits if t.quant is not None else t.data.dtype.itemsize * 8
            packed += (t.data.size * bits + 7) // 8
        return {"container": container, "packed": packed}

    def validate(self) -> None:
        """Structural checks a loader runs on untrusted JSON."""
        if not self.inputs or not self.outputs:
            raise UsageError("the graph declares no inputs or no outputs; re-export the bundle")
        for i in self.inputs:
            if i not in self.tensors:
                raise UsageError(f"graph input {i!r} is not a declared tensor; re-export the bundle")
        seen = set(self.inputs)
        for n in self.nodes:
            if n.op not in OPS:
                raise UsageError(f"graph node {n.name!r} has unknown op {n.op!r} (known ops: {', '.join(sorted(OPS))}); "
                                 "re-export the bundle with this eptq-deploy version")
            arity, allowed = OPS[n.op]
            if arity is not None and len(n.inputs) != arity:
                raise UsageError(f"graph node {n.name!r} ({n.op}) has {len(n.inputs)} inputs, expected {arity}; "
                                 "re-export the bundle")
            unknown = sorted(set(n.attrs) - allowed)
            if unknown:
                raise UsageError(f"graph node {n.name!r} ({n.op}) has unknown attribute(s) {', '.join(unknown)}; "
                                 "re-export the bundle with this eptq-deploy version")
            for i in n.inputs:
                if i not in self.tensors:
                    raise UsageError(f"graph node {n.name!r} reads undeclared tensor {i!r}; re-export the bundle")
                if i not in seen and self.tensors[i].data is None:
                    raise UsageError(f"graph node {n.name!r} reads {i!r} before it is produced (nodes must be topological); "
                                     "re-export the bundle")
            if "pad_value" in n.attrs:
                _check_pad_value(n, self.tensors[n.inputs[0]].shape)
            if n.op in _ATTR_CHECKS:
                _ATTR_CHECKS[n.op](n, self.tensors[n.inputs[0]].shape)
            for i in n.inputs:
                if self.tensors[i].kind == "constant" and (n.op not in CONSTANT_INPUT_OPS or self.tensors[i].data is None):
                    raise UsageError(f"graph node {n.name!r} ({n.op}) reads constant {i!r}, which only "
                                     f"{', '.join(sorted(CONSTANT_INPUT_OPS))} may read, with data; re-export the bundle")
            for o in n.outputs:
                if o not in self.tensors:
                    raise UsageError(f"graph node {n.name!r} writes undeclared tensor {o!r}; re-export the bundle")
                if o in seen or self.tensors[o].data is not None:
                    raise UsageError(f"graph node {n.name!r} writes {o!r}, which is already an input, a constant "
                                     "or another node's output (a cycle or a duplicate); re-export the bundle")
            seen.update(n.outputs)
        for o in self.outputs:
            if o not in seen:
                raise UsageError(f"graph output {o!r} is never produced; re-export the bundle")

    # ------------------------------------------------------------- serialise
    def to_json(self) -> dict[str, Any]:
        return {
            "format": "eptq-deploy quantized graph",
            "version": FORMAT_VERSION,
            "layout": "NCHW",
            "inputs": self.inputs,
            "outputs": self.outputs,
            "meta": self.meta,
            "tensors": {
                name: {
                    "shape": list(t.shape),
                    "kind": t.kind,
                    "dtype": t.dtype,
                    "quant": None if t.quant is None else t.quant.to_json(),
                    "has_data": t.data is not None,
                }
                for name, t in self.tensors.items()
            },
            "nodes": [
                {"name": n.name, "op": n.op, "inputs": n.inputs, "outputs": n.outputs, "attrs": n.attrs, "source": n.source}
                for n in self.nodes
            ],
        }

    def save(self, folder: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``graph.json`` and ``graph.npz`` into ``folder``."""
        folder = Path(folder)
        jpath, npath = folder / "graph.json", folder / "graph.npz"
        jpath.write_text(json.dumps(self.to_json(), indent=1))
        arrays = {name: t.data for name, t in self.tensors.items() if t.data is not None}
        with open(npath, "wb") as f:
            np.savez(f, **arrays)
        return jpath, npath

    @classmethod
    def load(cls, folder: str | os.PathLike) -> QuantGraph:
        """Read a saved graph; the files are treated as untrusted (no pickle)."""
        folder = Path(folder)
        try:
            doc = json.loads((folder / "graph.json").read_text())
            with np.load(folder / "graph.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        # a damaged .npz is a damaged zip (BadZipFile, zlib.error, EOFError); deep JSON nesting
        # overflows the parser's recursion
        except (OSError, ValueError, EOFError, RecursionError, zipfile.BadZipFile, zlib.error) as e:
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            raise UsageError(f"cannot read the quantized graph in {folder} ({type(e).__name__}: {reason}); "
                             "re-export the bundle") from None
        return cls.from_json(doc, arrays)

    @classmethod
    def from_json(cls, doc: Any, arrays: dict[str, np.ndarray]) -> QuantGraph:
        try:
            version = doc.get("version") if isinstance(doc, dict) else None
            if type(version) is not int or version != FORMAT_VERSION:
                raise UsageError(
                    f"quantized graph version {doc.get('version') if isinstance(doc, dict) else None!r} "
                    f"is not {FORMAT_VERSION}; re-export it with this eptq-deploy version"
                )
            tensors = {}
            for name, t in doc["tensors"].items():
                data = arrays.get(name) if t["has_data"] else None
                if t["has_data"] and data is None:
                    raise UsageError(f"tensor {name!r} has no data in graph.npz; the bundle is incomplete")
                shape = tuple(int(s) for s in t["shape"])
                if any(s < 0 for s in shape):
                    raise UsageError(f"tensor {name!r} has a negative size in shape {shape}; re-export the bundle")
                if data is not None:
                    _check_data(name, data, shape)
                q = None if t["quant"] is None else QParams.from_json(t["quant"])
                if q is not None:
                    _check_quant(name, q, shape)
                tensors[name] = TensorInfo(name, shape, str(t["kind"]), q, data)
            nodes = [
                Node(str(n["name"]), str(n["op"]), [str(i) for i in n["inputs"]], [str(o) for o in n["outputs"]],
                     dict(n["attrs"]), str(n.get("source", "")))
                for n in doc["nodes"]
            ]
            g = cls(nodes, tensors, [str(i) for i in doc["inputs"]], [str(o) for o in doc["outputs"]], dict(doc.get("meta", {})))
        except UsageError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise UsageError(f"malformed quantized graph JSON ({type(e).__name__}: {e}); re-export the bundle") from None
        g.validate()
        return g


def _check_data(name: str, data: Any, shape: tuple[int, ...]) -> None:
    """A constant from graph.npz must be a numeric array of the shape graph.json declares."""
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "biuf":
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise UsageError(f"tensor {name!r} in graph.npz is not a numeric array ({kind}); re-export the bundle")
    if data.shape != shape:
        raise UsageError(f"tensor {name!r} in graph.npz has shape {data.shape} but graph.json declares {shape}; "
                         "re-export the bundle")


def _check_pad_value(n: Node, shape: tuple[int, ...]) -> None:
    """A conv's ``pad_value`` is one finite number per input channel (kernels index it by channel)."""
    v = n.attrs["pad_value"]
    channels = shape[1] if len(shape) > 1 else None
    if (not isinstance(v, list) or len(v) != channels
            or not all(type(x) in (int, float) and math.isfinite(x) for x in v)):
        raise UsageError(f"graph node {n.name!r} ({n.op}): pad_value must list one finite number per input channel "
                         f"({channels}); re-export the bundle")


def _check_resize(n: Node, shape: tuple[int, ...]) -> None:
    """What the float resize indexes by: known rules, two positive sizes and one of scale/step."""
    a = n.attrs
    ratio = [k for k in ("scale", "step") if k in a]
    pairs = [a.get("size"), *(a[k] for k in ratio)]
    ok = (len(shape) == 4 and a.get("mode") in ("nearest", "linear") and a.get("coord") in RESIZE_COORDS
          and (a.get("nearest") in RESIZE_NEAREST) == (a["mode"] == "nearest") and len(ratio) == 1
          and all(isinstance(v, list) and len(v) == 2 for v in pairs)
          and all(type(s) is int and s > 0 for s in a["size"])
          # a step may be 0 (align_corners from a 1-pixel input: every output reads pixel 0); a scale divides
          and all(type(s) in (int, float) and math.isfinite(s) and (s > 0 or (s == 0 and ratio[0] == "step"))
                  for s in a[ratio[0]]))
    if not ok:
        raise UsageError(f"graph node {n.name!r} (resize): needs a 4-D input, mode nearest/linear, coord one of "
                         f"{', '.join(RESIZE_COORDS)}, a nearest rounding for mode nearest only, size [h, w] and one of "
                         "scale/step [h, w]; re-export the bundle")


def _check_transpose(n: Node, shape: tuple[int, ...]) -> None:
    perm = n.attrs.get("perm")
    if not isinstance(perm, list) or sorted(perm) != list(range(len(shape))) or perm[:1] != [0]:
        raise UsageError(f"graph node {n.name!r} (transpose): perm {perm!r} must reorder the {len(shape)} axes "
                         "keeping the batch axis first; re-export the bundle")


_ATTR_CHECKS = {"resize": _check_resize, "transpose": _check_transpose}


def _check_quant(name: str, q: QParams, shape: tuple[int, ...]) -> None:
    """The grid's numbers must describe a real integer grid: kernels divide by them."""
    where = f"tensor {name!r} quantization"
    if not 1 <= q.bits <= 32:
        raise UsageError(f"{where}: bits {q.bits} is not 1..32; re-export the bundle")
    if q.scale.size == 0 or not np.all(np.isfinite(q.scale)) or not np.all(q.scale > 0):
        raise UsageError(f"{where}: scales must be finite and positive (got {q.scale[:4].tolist()}); "
                         "re-export the bundle")
    if q.zero_point.shape != q.scale.shape or (q.exponent is not None and q.exponent.shape != q.scale.shape):
        raise UsageError(f"{where}: scale, zero_point and exponent lengths differ; re-export the bundle")
    if np.any(q.zero_point < q.qmin) or np.any(q.zero_point > q.qmax):
        raise UsageError(f"{where}: zero points outside the {q.bits}-bit range {q.qmin}..{q.qmax}; re-export the bundle")
    if q.exponent is not None and (np.any(np.abs(q.exponent) > 160) or np.any(
            np.ldexp(1.0, q.exponent.astype(np.int32)) != q.scale.astype(np.float64))):
        raise UsageError(f"{where}: scales are not 2**power_of_two_exponent; re-export the bundle")
    if q.axis is not None:
        if type(q.axis) is not int or not 0 <= q.axis < len(shape):
            raise UsageError(f"{where}: axis {q.axis!r} is not a dimension of shape {shape}; re-export the bundle")
        if q.scale.size != shape[q.axis]:
            raise UsageError(f"{where}: {q.scale.size} scales for {shape[q.axis]} channels; re-export the bundle")
    elif q.scale.size != 1:
        raise UsageError(f"{where}: {q.scale.size} scales but no channel axis; re-export the bundle")
