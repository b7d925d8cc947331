"""ONNX files into the canonical float graph (opsets 11 to 21).

The file is parsed with ``onnx`` (no external data, no custom domains, the ONNX checker
passed), then run once on onnxruntime at batch 1 with every intermediate tensor exposed:
that run gives each activation's static shape and the value of every tensor that does not
depend on the input (shape arithmetic such as Shape -> Gather -> Concat -> Reshape, as
older exporters write it, folds away). The remaining nodes map one by one onto canonical
ops; anything else is refused by its op type and node name before calibration.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.external_data_helper
import onnxruntime as ort
from onnx import helper, numpy_helper

from .capture import extend_slice
from .errors import EptqError, ModelError, UnsupportedOpError
from .graph import RESIZE_COORDS, RESIZE_NEAREST, Node, QuantGraph, TensorInfo
from .readers import (
    SourceGraph,
    as_add_or_mul,
    fold_into_layer,
    held_constant,
    per_channel_constant,
    resolve_input_shape,
    same_pads,
)

MIN_OPSET, MAX_OPSET = 11, 21
#: ONNX op types this reader maps (every other op, and every custom domain, is refused by name)
SUPPORTED = ("Conv", "Gemm", "MatMul", "BatchNormalization", "Relu", "Clip", "Sigmoid", "HardSigmoid",
             "HardSwish", "Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
             "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Pad", "Identity", "Dropout", "Softmax",
             "Sub", "Div", "Transpose", "Split", "Resize", "LeakyRelu", "PRelu", "Tanh", "ConvTranspose", "Shape", "Exp")


#: the child process of ``_Reader._run_everything``: onnxruntime on zeros, every output saved in order
_PROBE = """
import json, sys
import numpy as np, onnxruntime as ort
model, name, shape, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
opts = ort.SessionOptions()
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor by name
opts.intra_op_num_threads = 1
opts.log_severity_level = 3
try:
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {name: np.zeros(shape, np.float32)})
except Exception as e:
    sys.exit(" ".join(str(e).split())[:300] or type(e).__name__)
np.savez(out, *got)
"""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _text(v: Any) -> str:
    """A string attribute (onnx gives bytes)."""
    return v.decode() if isinstance(v, bytes) else str(v)


def load(source: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """Parse and check an ONNX model; every refusal is one line naming the problem and the fix."""
    if isinstance(source, onnx.ModelProto):
        model, where = source, "the ONNX model"
    else:
        where = str(source)
        try:
            model = onnx.load(where, load_external_data=False)
        except Exception as e:  # truncated or not protobuf at all
            raise ModelError(f"cannot parse {where} as ONNX ({_one_line(e)}); check it is an .onnx file") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        _load_external_data(model, source, where)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelError(f"{where} uses ONNX opset {opset}; export it with an opset from {MIN_OPSET} to {MAX_OPSET}")
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(f"custom op {n.domain}::{n.op_type} (node {n.name or n.output[0]!r}) in {where}; "
                                     "export the model with standard ONNX ops only")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelError(f"{where} fails the ONNX checker ({_one_line(e)}); re-export the model") from None
    if any(_is_quantized(t) for t in model.graph.initializer) or any(
            n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv") for n in model.graph.node):
        raise ModelError(f"{where} is already quantized (integer weights or Q/DQ nodes); give the float model")
    return model


def _load_external_data(model: onnx.ModelProto, source: object, where: str) -> None:
    """Weights kept beside the file (as torch's dynamo exporter writes them): read only from plain
    files in the model's own folder, never from a path the file names elsewhere."""
    if isinstance(source, onnx.ModelProto):
        raise ModelError("the ONNX model keeps weights in external data files; load it with onnx.load(path) first "
                         "or pass the .onnx path")
    folder = Path(str(source)).resolve().parent
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or target.parent != folder or not target.is_file():
            raise ModelError(f"{where}: weight {t.name!r} points to external data {location!r}, not a file beside the "
                             "model; keep the .onnx and its data file in one folder (or save without external data)")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(folder))
    except Exception as e:
        raise ModelError(f"cannot read the external data of {where} ({_one_line(e)}); check the data file") from None


def _is_quantized(t: onnx.TensorProto) -> bool:
    return t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) > 1


class _Reader:
    """Walks the ONNX graph once, emitting canonical nodes."""

    def __init__(self, model: onnx.ModelProto, input_shape: Sequence[int] | None = None) -> None:
        self.model = model
        g = model.graph
        inits = {t.name for t in g.initializer}
        inputs = [i for i in g.input if i.name not in inits]
        if len(inputs) != 1:
            raise ModelError(f"the ONNX model takes {len(inputs)} inputs; eptq-deploy handles single-image-input models")
        self.input = inputs[0]
        dims = self.input.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
        if len(shape) != 4 or shape[0] not in (None, 1):
            shown = [s if s is not None else "?" for s in shape]
            raise ModelError(f"ONNX input {self.input.name!r} has shape {shown}; eptq-deploy reads models with one "
                             "NCHW image input (batch 1 or dynamic); re-export the model with one")
        self.shape = (1, *resolve_input_shape(shape[1:], input_shape, f"the ONNX model (tensor {self.input.name!r})", "C,H,W"))
        self.values = self._run_everything()
        self.nodes: list[Node] = []
        self.tensors: dict[str, TensorInfo] = {"input": TensorInfo("input", self.shape, "input")}
        self.names: dict[str, str] = {self.input.name: "input"}  # ONNX tensor -> canonical tensor
        self.const: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.count: dict[str, int] = {}
        self.uses: dict[str, int] = {}
        for n in g.node:
            for i in n.input:
                self.uses[i] = self.uses.get(i, 0) + 1
        for o in g.output:
            self.uses[o.name] = self.uses.get(o.name, 0) + 1

    # ---------------------------------------------------------------- the batch-1 run
    def session_bytes(self, outputs: list[str]) -> bytes:
        """The model with ``outputs`` as its outputs (types left to onnxruntime), serialized."""
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        del m.graph.output[:]
        m.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
        return m.SerializeToString()

    def _run_everything(self) -> dict[str, np.ndarray]:
        """Every tensor at batch 1, computed in a child process: onnx's shape inference (which
        onnxruntime runs on load) aborts the whole process on some malformed files, so the first
        contact with an untrusted file must not be able to take the caller down with it."""
        names = list(dict.fromkeys(o for n in self.model.graph.node for o in n.output if o))
        with tempfile.TemporaryDirectory(prefix="eptq-onnx-") as d:
            model_path, out_path = Path(d) / "model.onnx", Path(d) / "values.npz"
            model_path.write_bytes(self.session_bytes(names))
            args = [sys.executable, "-c", _PROBE, str(model_path), self.input.name, json.dumps(list(self.shape)),
                    str(out_path)]
            done = subprocess.run(args, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                if done.returncode < 0:
                    why = f"onnxruntime crashed (signal {-done.returncode}): the file is malformed"
                raise ModelError(f"onnxruntime cannot run the ONNX model ({' '.join(why.split())[:200]}); "
                                 "check the file")
            with np.load(out_path) as f:
                got = [f[f"arr_{k}"] for k in range(len(names))]
        return dict(zip(names, got, strict=True))

    # -------------------------------------------------------------------- helpers
    def fresh(self, op: str) -> str:
        k = self.count.get(op, 0)
        self.count[op] = k + 1
        return f"{op}_{k}"

    def is_const(self, name: str) -> bool:
        return name == "" or name in self.const

    def value(self, name: str) -> np.ndarray:
        return self.const[name]

    def act(self, name: str, node: onnx.NodeProto) -> str:
        if name in self.names:
            return self.names[name]
        raise UnsupportedOpError(f"{node.op_type} node {node.name or node.output[0]!r} takes constant input {name!r} "
                                 "where eptq-deploy needs an activation; fold it into a layer before export")

    def emit(self, node: onnx.NodeProto, op: str, inputs: list[str], attrs: dict[str, Any],
             weights: tuple[np.ndarray, np.ndarray] | None = None, out: str | None = None) -> str:
        name = self.fresh(op)
        ins = list(inputs)
        if weights is not None:
            w, b = weights
            for suffix, data, kind in ((".weight", w, "weight"), (".bias", b, "bias")):
                self.tensors[name + suffix] = TensorInfo(name + suffix, tuple(data.shape), kind,
                                                         data=np.ascontiguousarray(data, np.float32))
                ins.append(name + suffix)
        onnx_out = out if out is not None else node.output[0]
        self.tensors[name] = TensorInfo(name, tuple(int(s) for s in self.values[onnx_out].shape), "activation")
        self.nodes.append(Node(name, op, ins, [name], attrs, node.name or node.output[0]))
        self.names[onnx_out] = name
        return name

    def constant(self, data: np.ndarray) -> str:
        """A float constant held in the graph (a sub's or div's other operand, a PReLU slope)."""
        name = self.fresh("const")
        self.tensors[name] = TensorInfo(name, tuple(data.shape), "constant", data=np.ascontiguousarray(data, np.float32))
        return name

    def refuse(self, node: onnx.NodeProto, why: str = "") -> None:
        raise UnsupportedOpError(
            f"ONNX op {node.op_type} (node {node.name or node.output[0]!r}){': ' + why if why else ''} is not read by "
            f"eptq-deploy yet; readable ops: {', '.join(SUPPORTED)}")

    # ----------------------------------------------------------------------- walk
    def run(self) -> tuple[QuantGraph, dict[str, str]]:
        for node in self.model.graph.node:
            if all(self.is_const(i) for i in node.input) and node.op_type not in ("Dropout",):
                for o in node.output:  # no path from the image: fold it to its value
                    if o:
                        self.const[o] = self.values[o]
                continue
            handler = _HANDLERS.get(node.op_type)
            if handler is None:
                self.refuse(node)
            try:
                handler(self, node, {a.name: helper.get_attribute_value(a) for a in node.attribute})
            except EptqError:
                raise
            except Exception as e:  # a malformed node the checker let through: one line, not a traceback
                raise ModelError(f"cannot read ONNX node {node.name or node.output[0]!r} ({node.op_type}: "
                                 f"{_one_line(e)}); check the file") from None
        outs = [o.name for o in self.model.graph.output]
        if not outs:
            raise ModelError("the ONNX model declares no output; check the file")
        for o in outs:
            if o not in self.names:
                raise ModelError(f"the ONNX model's output {o!r} does not depend on its input; check the file")
        if len({self.names[o] for o in outs}) != len(outs):
            raise ModelError("the ONNX model returns one tensor as two outputs; drop the duplicate output")
        g = QuantGraph(self.nodes, self.tensors, ["input"], [self.names[o] for o in outs])
        g.validate()
        return g, {c: o for o, c in self.names.items()}

    def only_consumer(self, onnx_name: str) -> bool:
        return self.uses.get(onnx_name, 0) == 1


# ---------------------------------------------------------------------- handlers
def _conv_operands(r: _Reader, n: onnx.NodeProto, what: str) -> tuple[str, np.ndarray]:
    """A (transposed) convolution's input and constant 4-D weights; anything else refused."""
    if len(n.input) < 2 or not r.is_const(n.input[1]):
        r.refuse(n, "weights that are not constant")
    x = r.act(n.input[0], n)
    w = r.value(n.input[1]).astype(np.float32)
    if w.ndim != 4:
        r.refuse(n, f"{w.ndim - 2}-D {what}")
    return x, w


def _conv(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    x, w = _conv_operands(r, n, "convolution")
    b = r.value(n.input[2]).astype(np.float32) if len(n.input) > 2 and n.input[2] else np.zeros(w.shape[0], np.float32)
    stride = [int(s) for s in a.get("strides", [1, 1])]
    dilation = [int(d) for d in a.get("dilations", [1, 1])]
    groups = int(a.get("group", 1))
    pads = _pads(r, n, a, r.tensors[x].shape[2:], w.shape[2:], stride, dilation)
    cin = r.tensors[x].shape[1]
    op = "depthwise_conv2d" if groups > 1 and groups == cin else "conv2d"
    if groups > 1 and op == "conv2d":
        r.refuse(n, f"grouped convolution with {groups} groups (depthwise, groups == input channels, is read)")
    r.emit(n, op, [x], {"stride": stride, "pads": pads, "dilation": dilation, "groups": groups, "activation": "none"},
           (w, b))


def _pads(r: _Reader, n: onnx.NodeProto, a: dict[str, Any], size: tuple[int, ...], kernel: tuple[int, ...],
          stride: list[int], dilation: list[int]) -> list[int]:
    """[top, left, bottom, right] from ``pads`` or ``auto_pad``."""
    auto = _text(a.get("auto_pad", "NOTSET"))
    if auto in ("NOTSET", ""):
        return [int(p) for p in a.get("pads", [0, 0, 0, 0])]
    if auto == "VALID":
        return [0, 0, 0, 0]
    return same_pads(size, kernel, stride, dilation, upper=auto == "SAME_UPPER")


def _gemm(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    if not r.is_const(n.input[1]) or a.get("transA", 0):
        r.refuse(n, "a non-constant B or transA=1")
    x = r.act(n.input[0], n)
    if len(r.tensors[x].shape) != 2:
        r.refuse(n, f"on a rank-{len(r.tensors[x].shape)} input")
    w = r.value(n.input[1]).astype(np.float32)
    w = (w if a.get("transB", 0) else w.T) * np.float32(a.get("alpha", 1.0))
    b = np.zeros(w.shape[0], np.float32)
    if len(n.input) > 2 and n.input[2]:
        b = np.broadcast_to(r.value(n.input[2]).astype(np.float32) * np.float32(a.get("beta", 1.0)), (w.shape[0],))
    r.emit(n, "linear", [x], {"activation": "none"}, (w, b.copy()))


def _matmul(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    if not r.is_const(n.input[1]) or r.value(n.input[1]).ndim != 2:
        r.refuse(n, "a non-constant or non-2-D second operand")
    x = r.act(n.input[0], n)
    if len(r.tensors[x].shape) != 2:
        r.refuse(n, f"on a rank-{len(r.tensors[x].shape)} input")
    w = r.value(n.input[1]).astype(np.float32).T
    r.emit(n, "linear", [x], {"activation": "none"}, (w, np.zeros(w.shape[0], np.float32)))


def _weighted_producer(r: _Reader, onnx_name: str) -> Node | None:
    """The conv/linear node that produced ``onnx_name``, when this tensor feeds nothing else."""
    t = r.names.get(onnx_name)
    if t is None or not r.only_consumer(onnx_name):
        return None
    node = next((m for m in reversed(r.nodes) if m.outputs == [t]), None)
    ok = node is not None and node.op in ("conv2d", "depthwise_conv2d", "linear") and node.attrs["activation"] == "none"
    return node if ok else None


def _batch_norm(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    p = _weighted_producer(r, n.input[0])
    if p is None:
        r.refuse(n, "a batch norm that does not follow a convolution or Gemm alone")
    scale, bias, mean, var = (r.value(i).astype(np.float64) for i in n.input[1:5])
    k = scale / np.sqrt(var + float(a.get("epsilon", 1e-5)))
    wt, bt = r.tensors[p.inputs[1]], r.tensors[p.inputs[2]]
    shape = (-1,) + (1,) * (wt.data.ndim - 1)
    wt.data = (wt.data * k.reshape(shape)).astype(np.float32)
    bt.data = ((bt.data - mean) * k + bias).astype(np.float32)
    r.names[n.output[0]] = p.outputs[0]
    r.tensors[p.outputs[0]].shape = tuple(int(s) for s in r.values[n.output[0]].shape)


def _fold_constant(r: _Reader, n: onnx.NodeProto, op: str, x: str, c: np.ndarray) -> bool:
    """``x op c`` folded into the conv/linear layer that produced ``x`` alone (as torch exports a
    separate bias or scale) where ``c`` is per channel; False where it is not."""
    p = _weighted_producer(r, x)
    if p is None:
        return False
    kind, c = as_add_or_mul(op, c)
    out = r.tensors[p.outputs[0]].shape
    v = per_channel_constant(c, out[1], len(out), 1)
    if v is None or not np.all(np.isfinite(v)):
        return False
    fold_into_layer(r.tensors[p.inputs[1]], r.tensors[p.inputs[2]], v, kind)
    r.names[n.output[0]] = p.outputs[0]
    return True


def _binary(op: str) -> Callable[[_Reader, onnx.NodeProto, dict[str, Any]], None]:
    """Add, Mul, Sub, Div: of two activations, or of an activation and a constant (folded into the layer
    before it where per channel, otherwise held in the graph as a constant input: a box decode's grid)."""
    def h(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
        consts = [k for k, i in enumerate(n.input) if r.is_const(i)]
        if consts:
            k = consts[0]
            src, c = n.input[1 - k], r.value(n.input[k])
            if (k == 1 or op in ("add", "mul")) and _fold_constant(r, n, op, src, c):
                return
            x = r.act(src, n)
            held = held_constant(c, r.tensors[x].shape)
            if held is None:
                r.refuse(n, f"{op} with a constant of shape {list(c.shape)} that does not broadcast onto "
                         f"{list(r.tensors[x].shape)} without widening it")
            ins = [x, r.constant(held)] if k == 1 else [r.constant(held), x]
            r.emit(n, op, ins, {} if op == "mul" else {"activation": "none"})
            return
        x, y = (r.act(i, n) for i in n.input)
        sx, sy = r.tensors[x].shape, r.tensors[y].shape
        if op == "add" and sx != sy:
            r.refuse(n, f"broadcasting add {sx} + {sy}")
        if len(sx) != len(sy):
            r.refuse(n, f"{op} of tensors of ranks {len(sx)} and {len(sy)}")
        r.emit(n, op, [x, y], {} if op == "mul" else {"activation": "none"})

    return h


def _unary(op: str) -> Callable[[_Reader, onnx.NodeProto, dict[str, Any]], None]:
    def h(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
        r.emit(n, op, [r.act(n.input[0], n)], {})

    return h


def _clip(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    lo = float(r.value(n.input[1])) if len(n.input) > 1 and n.input[1] else float(a.get("min", -np.inf))
    hi = float(r.value(n.input[2])) if len(n.input) > 2 and n.input[2] else float(a.get("max", np.inf))
    op = {(0.0, 6.0): "relu6", (0.0, np.inf): "relu"}.get((lo, hi))
    if op is None:
        r.refuse(n, f"Clip({lo}, {hi}) (ReLU = Clip(0, inf) and ReLU6 = Clip(0, 6) are read)")
    r.emit(n, op, [r.act(n.input[0], n)], {})


def _hard_sigmoid(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    if not (np.isclose(alpha, 1 / 6, rtol=1e-6) and beta == 0.5):
        r.refuse(n, f"HardSigmoid(alpha={alpha}, beta={beta}) (torch's, alpha 1/6 and beta 0.5, is read)")
    r.emit(n, "hardsigmoid", [r.act(n.input[0], n)], {})


def _concat(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    xs = [r.act(i, n) for i in n.input]
    r.emit(n, "concat", xs, {"axis": int(a["axis"]) % len(r.tensors[xs[0]].shape)})


def _pool(op: str) -> Callable[[_Reader, onnx.NodeProto, dict[str, Any]], None]:
    def h(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
        x = r.act(n.input[0], n)
        k = [int(v) for v in a["kernel_shape"]]
        s = [int(v) for v in a.get("strides", [1] * len(k))]
        if a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", [1, 1])) or len(k) != 2:
            r.refuse(n, "ceil_mode, dilation or a pool that is not 2-D")
        attrs: dict[str, Any] = {"kernel": k, "stride": s, "pads": _pads(r, n, a, r.tensors[x].shape[2:], tuple(k), s,
                                                                         [1, 1])}
        if op == "avg_pool2d":
            attrs["count_include_pad"] = bool(a.get("count_include_pad", 0))
        r.emit(n, op, [x], attrs)

    return h


def _global_pool(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    r.emit(n, "global_avg_pool", [r.act(n.input[0], n)], {})


def _reduce_mean(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    x = r.act(n.input[0], n)
    rank = len(r.tensors[x].shape)
    axes = a.get("axes") if "axes" in a else (r.value(n.input[1]).tolist() if len(n.input) > 1 else None)
    if rank != 4 or axes is None or sorted(int(v) % rank for v in axes) != [2, 3]:
        r.refuse(n, f"mean over axes {axes} (the spatial mean of an NCHW tensor is read)")
    if a.get("keepdims", 1):
        r.emit(n, "global_avg_pool", [x], {})
        return
    pooled = r.fresh("global_avg_pool")
    nb, c = r.tensors[x].shape[:2]
    r.tensors[pooled] = TensorInfo(pooled, (nb, c, 1, 1), "activation")
    r.nodes.append(Node(pooled, "global_avg_pool", [x], [pooled], {}, n.name or n.output[0]))
    r.emit(n, "flatten", [pooled], {})


def _reshape_like(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    """Flatten, Reshape, Squeeze, Unsqueeze: the output's static shape (from the batch-1 run) decides."""
    x = r.act(n.input[0], n)
    shape = [int(s) for s in r.values[n.output[0]].shape]
    if shape == list(r.tensors[x].shape):
        r.names[n.output[0]] = x
    elif len(shape) == 2 and shape[0] == r.tensors[x].shape[0]:
        r.emit(n, "flatten", [x], {})
    elif shape and shape[0] == 1:
        r.emit(n, "reshape", [x], {"shape": shape})
    else:
        r.refuse(n, f"a reshape to {shape} that moves the batch axis")


def _identity(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    r.names[n.output[0]] = r.act(n.input[0], n)


def _slice(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    x = r.act(n.input[0], n)
    shape = r.tensors[x].shape
    if "starts" in a:  # opset < 10 style attributes
        starts, ends = list(a["starts"]), list(a["ends"])
        axes, steps = list(a.get("axes", range(len(starts)))), [1] * len(starts)
    else:
        starts, ends = r.value(n.input[1]).tolist(), r.value(n.input[2]).tolist()
        axes = r.value(n.input[3]).tolist() if len(n.input) > 3 and n.input[3] else list(range(len(starts)))
        steps = r.value(n.input[4]).tolist() if len(n.input) > 4 and n.input[4] else [1] * len(starts)
    out = {"axes": [], "starts": [], "ends": [], "steps": []}
    for ax, st, en, sp in zip(axes, starts, ends, steps, strict=True):
        ax, dim = int(ax) % len(shape), shape[int(ax) % len(shape)]
        if sp <= 0 or ax == 0:
            r.refuse(n, "a slice with a non-positive step or along the batch axis")
        st = min(max(st + dim if st < 0 else st, 0), dim)
        en = min(max(en + dim if en < 0 else en, 0), dim)
        if (st, en, sp) != (0, dim, 1):
            for k, v in zip(out, (ax, int(st), int(en), int(sp)), strict=True):
                out[k].append(v)
    if not out["axes"]:
        r.names[n.output[0]] = x
        return
    prev = r.nodes[-1] if r.nodes and r.nodes[-1].outputs == [x] else None
    if extend_slice(prev, out, r.only_consumer(n.input[0])):
        r.tensors[x].shape = tuple(int(s) for s in r.values[n.output[0]].shape)
        r.names[n.output[0]] = x
        return
    r.emit(n, "slice", [x], out)


def _pad(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    x = r.act(n.input[0], n)
    mode = _text(a.get("mode", "constant"))
    pads = [int(p) for p in (a["pads"] if "pads" in a else r.value(n.input[1]).tolist())]
    value = float(r.value(n.input[2])) if len(n.input) > 2 and n.input[2] else float(a.get("value", 0.0))
    if mode != "constant" or value != 0.0 or any(p < 0 for p in pads) or (len(n.input) > 3 and n.input[3]):
        r.refuse(n, f"pad mode {mode!r} value {value} (zero constant padding of all axes is read)")
    r.emit(n, "pad", [x], {"pads": pads})


def _softmax(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    x = r.act(n.input[0], n)
    if len(r.tensors[x].shape) != 2 or int(a.get("axis", -1)) % 2 != 1:
        r.refuse(n, "a softmax over other than the classes of an (N, classes) tensor")
    r.emit(n, "softmax", [x], {"axis": 1})


def _shape(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    """The shape of an activation is a constant at batch 1 (the batch-1 run has it): shape arithmetic
    after it folds away, and the ops it feeds (Reshape, Resize sizes) read their output shapes."""
    r.const[n.output[0]] = r.values[n.output[0]]


def _transpose(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    x = r.act(n.input[0], n)
    rank = len(r.tensors[x].shape)
    perm = [int(p) % rank for p in a.get("perm", range(rank - 1, -1, -1))]
    if perm[0] != 0:
        r.refuse(n, f"permutation {perm}, which moves the batch axis")
    if perm == list(range(rank)):
        r.names[n.output[0]] = x
        return
    r.emit(n, "transpose", [x], {"perm": perm})


def _split(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    """Split into one canonical slice per output; the sizes are the outputs' (from the batch-1 run),
    whichever way the file states them (attribute, input or num_outputs)."""
    x = r.act(n.input[0], n)
    shape = r.tensors[x].shape
    axis = int(a.get("axis", 0)) % len(shape)
    if axis == 0 or not all(n.output):
        r.refuse(n, "a split along the batch axis or with an unnamed output")
    start = 0
    for o in n.output:
        end = start + int(r.values[o].shape[axis])
        if (start, end) == (0, shape[axis]):
            r.names[o] = x
        else:
            r.emit(n, "slice", [x], {"axes": [axis], "starts": [start], "ends": [end], "steps": [1]}, out=o)
        start = end


def _resize(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    x = r.act(n.input[0], n)
    shape = r.tensors[x].shape
    out = tuple(int(s) for s in r.values[n.output[0]].shape)
    mode = _text(a.get("mode", "nearest"))
    coord = _text(a.get("coordinate_transformation_mode", "half_pixel"))
    nearest = _text(a.get("nearest_mode", "round_prefer_floor"))
    if len(shape) == 4 and shape[2:] == (1, 1) and mode == "linear":  # from one pixel every rule copies it
        mode, coord, nearest = "nearest", "asymmetric", "floor"
    if len(shape) != 4 or out[:2] != shape[:2]:
        r.refuse(n, f"a resize of {list(shape)} to {list(out)} (the spatial axes of a 4-D NCHW tensor are read)")
    if mode not in ("nearest", "linear"):
        r.refuse(n, f"mode {mode!r} (nearest and linear are read)")
    if coord not in RESIZE_COORDS:
        r.refuse(n, f"coordinate_transformation_mode {coord!r} (read: {', '.join(RESIZE_COORDS)})")
    if mode == "nearest" and nearest not in RESIZE_NEAREST:
        r.refuse(n, f"nearest_mode {nearest!r} (read: {', '.join(RESIZE_NEAREST)})")
    if a.get("antialias", 0) or a.get("exclude_outside", 0) or _text(a.get("keep_aspect_ratio_policy", "stretch")) != \
            "stretch":
        r.refuse(n, "antialias, exclude_outside or a keep_aspect_ratio_policy other than stretch")
    scales = r.value(n.input[2]).ravel() if len(n.input) > 2 and n.input[2] else np.zeros(0)
    if scales.size:  # the coordinate rule divides by the given scales, not by output / input
        full = [1.0] * 4
        for ax, v in zip(a.get("axes", range(4)), scales.tolist(), strict=True):
            full[int(ax) % 4] = v
    else:
        full = [float(np.float32(o) / np.float32(i)) for o, i in zip(out, shape, strict=True)]
    if full[:2] != [1.0, 1.0]:
        r.refuse(n, f"scales {full} that resize the batch or channel axis")
    attrs: dict[str, Any] = {"mode": mode, "coord": coord, "size": list(out[2:]),
                             "scale": [float(np.float32(v)) for v in full[2:]]}
    if mode == "nearest":
        attrs["nearest"] = nearest
    r.emit(n, "resize", [x], attrs)


def _leaky_relu(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    r.emit(n, "leaky_relu", [r.act(n.input[0], n)], {"alpha": float(np.float32(a.get("alpha", 0.01)))})


def _prelu(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    x = r.act(n.input[0], n)
    shape = r.tensors[x].shape
    slope = per_channel_constant(r.value(n.input[1]), shape[1], len(shape), 1) if r.is_const(n.input[1]) else None
    if slope is None:
        r.refuse(n, "a slope that is not a constant scalar or one value per channel")
    r.emit(n, "prelu", [x, r.constant(slope)], {})


def _conv_transpose(r: _Reader, n: onnx.NodeProto, a: dict[str, Any]) -> None:
    x, w = _conv_operands(r, n, "transposed convolution")
    groups = int(a.get("group", 1))
    cout = w.shape[1] * groups
    b = r.value(n.input[2]).astype(np.float32) if len(n.input) > 2 and n.input[2] else np.zeros(cout, np.float32)
    stride = [int(s) for s in a.get("strides", [1, 1])]
    dilation = [int(d) for d in a.get("dilations", [1, 1])]
    extra = [int(p) for p in a.get("output_padding", [0, 0])]
    full = [(i - 1) * s + (k - 1) * d + 1 + e for i, s, k, d, e in
            zip(r.tensors[x].shape[2:], stride, w.shape[2:], dilation, extra, strict=True)]
    auto = _text(a.get("auto_pad", "NOTSET"))
    if auto == "VALID":
        pads = [0, 0, 0, 0]
    elif "output_shape" in a or auto in ("SAME_UPPER", "SAME_LOWER"):  # the crop that gives the stated size
        want = [int(v) for v in a["output_shape"][-2:]] if "output_shape" in a else [
            i * s for i, s in zip(r.tensors[x].shape[2:], stride, strict=True)]
        total = [f - o for f, o in zip(full, want, strict=True)]
        for i, t in enumerate(total):  # a stated size beyond the full output: zeros (and the bias) at the end
            if t < 0:
                extra[i], full[i], total[i] = extra[i] - t, full[i] - t, 0
        small, big = [t // 2 for t in total], [t - t // 2 for t in total]
        pads = small + big if auto == "SAME_UPPER" else big + small
    else:
        pads = [int(p) for p in a.get("pads", [0, 0, 0, 0])]
    got = (1, cout, full[0] - pads[0] - pads[2], full[1] - pads[1] - pads[3])
    if min(pads) < 0 or got != tuple(int(s) for s in r.values[n.output[0]].shape):
        r.refuse(n, f"pads {pads} (auto_pad {auto}) giving {list(got)}, where onnxruntime gives "
                 f"{list(r.values[n.output[0]].shape)}")
    r.emit(n, "conv_transpose2d", [x], {"stride": stride, "pads": pads, "output_padding": extra, "dilation": dilation,
                                        "groups": groups, "activation": "none"}, (w, b))


_HANDLERS: dict[str, Callable[[_Reader, onnx.NodeProto, dict[str, Any]], None]] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _matmul, "BatchNormalization": _batch_norm,
    "Relu": _unary("relu"), "Sigmoid": _unary("sigmoid"), "HardSwish": _unary("hardswish"), "Clip": _clip,
    "HardSigmoid": _hard_sigmoid, "Add": _binary("add"), "Mul": _binary("mul"), "Concat": _concat,
    "MaxPool": _pool("max_pool2d"), "AveragePool": _pool("avg_pool2d"), "GlobalAveragePool": _global_pool,
    "ReduceMean": _reduce_mean, "Flatten": _reshape_like, "Reshape": _reshape_like, "Squeeze": _reshape_like,
    "Unsqueeze": _reshape_like, "Slice": _slice, "Pad": _pad, "Identity": _identity, "Dropout": _identity,
    "Softmax": _softmax, "Sub": _binary("sub"), "Div": _binary("div"), "Transpose": _transpose, "Split": _split,
    "Resize": _resize, "LeakyRelu": _leaky_relu, "PRelu": _prelu, "Tanh": _unary("tanh"), "Exp": _unary("exp"),
    "ConvTranspose": _conv_transpose, "Shape": _shape,
}


def read(source: str | Path | onnx.ModelProto, input_shape: Sequence[int] | None = None) -> SourceGraph:
    """The canonical float graph of an ONNX model, and a runner of the model on onnxruntime."""
    model = load(source)
    reader = _Reader(model, input_shape)
    g, names = reader.run()
    wanted_cache: dict[tuple[str, ...], ort.InferenceSession] = {}

    def run_source(x: np.ndarray, wanted: list[str]) -> list[np.ndarray]:
        key = tuple(wanted)
        if key not in wanted_cache:  # in process: the child run has shown onnxruntime loads this file
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            opts.intra_op_num_threads, opts.log_severity_level = 1, 3
            wanted_cache[key] = ort.InferenceSession(reader.session_bytes(list(wanted)), opts,
                                                     providers=["CPUExecutionProvider"])
        sess = wanted_cache[key]
        per_sample = [sess.run(None, {reader.input.name: x[i:i + 1].astype(np.float32)}) for i in range(len(x))]
        return [np.concatenate([s[k] for s in per_sample]) for k in range(len(wanted))]

    name = Path(source).stem if not isinstance(source, onnx.ModelProto) else (model.graph.name or "onnx-model")
    return SourceGraph(g, run_source, names, {"input_shape": reader.shape[1:], "name": name})
