"""Float TFLite files into the canonical float graph.

The flatbuffer is read with the TFLite schema the project already writes with (nothing in
the file is executed). TFLite is NHWC: activations become NCHW, convolution filters OIHW,
depthwise filters (C*M, 1, KH, KW), and a fully connected layer that reads a flattened NHWC
tensor gets its columns reordered to the NCHW flatten. float16 weights behind a DEQUANTIZE
are read as float32. The read graph is checked against the TFLite interpreter (every tensor
kept) before any calibration, like the ONNX reader's; data and outputs stay NCHW for now.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EptqError, ModelError, UnsupportedOpError
from .graph import WEIGHTED_OPS, Node, QuantGraph, TensorInfo
from .readers import (
    SourceGraph,
    adopt_source_names,
    as_add_or_mul,
    fold_into_layer,
    held_constant,
    per_channel_constant,
    resolve_input_shape,
    same_pads,
)

#: TFLite ops this reader maps; every other op (and any custom op) is refused by name
SUPPORTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "RELU", "RELU6", "LOGISTIC",
             "HARD_SWISH", "AVERAGE_POOL_2D", "MAX_POOL_2D", "MEAN", "PAD", "RESHAPE", "CONCATENATION", "STRIDED_SLICE",
             "TRANSPOSE", "SOFTMAX", "DEQUANTIZE", "SUB", "DIV", "TANH", "PRELU", "LEAKY_RELU", "TRANSPOSE_CONV",
             "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "SPLIT", "SPLIT_V",
             "TILE (with RESHAPEs repeating rows and columns: Keras 3's nearest UpSampling2D)")
_FUSED = {0: "none", 1: "relu", 3: "relu6"}  # ActivationFunctionType NONE, RELU, RELU6


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as S

    return S


def _nchw(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else shape


class _Reader:
    def __init__(self, model: Any, where: str, input_shape: Sequence[int] | None = None) -> None:
        S = _schema()
        self.S, self.where, self.m = S, where, model
        if len(model.subgraphs) != 1:
            raise ModelError(f"{where} has {len(model.subgraphs)} subgraphs; eptq-deploy reads single-graph models")
        self.sg = model.subgraphs[0]
        self.codes = {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_")}
        # files from before the 127th op keep the code in deprecated_builtin_code (TFLite reads the larger)
        codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
        self.ops = [self.codes.get(k, str(k)) if k != S.BuiltinOperator.CUSTOM
                    else f"custom {c.customCode.decode() if c.customCode else '?'}"
                    for k, c in zip(codes, model.operatorCodes, strict=True)]
        types = {self.sg.tensors[i].type for o in self.sg.operators for i in list(o.outputs)}
        if types & {S.TensorType.INT8, S.TensorType.UINT8, S.TensorType.INT16}:
            raise ModelError(f"{where} is already quantized (integer activations); give the float model")
        if len(self.sg.inputs) != 1 or len(self.sg.outputs) < 1:
            raise ModelError(f"{where} has {len(self.sg.inputs)} inputs and {len(self.sg.outputs)} outputs; "
                             "eptq-deploy reads one-image-input models")
        t_in = self.sg.tensors[self.sg.inputs[0]]
        shape = tuple(int(d) for d in t_in.shape)
        sig = [int(d) for d in t_in.shapeSignature] if t_in.shapeSignature is not None and len(t_in.shapeSignature) \
            else list(shape)
        if len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
            raise ModelError(f"{where}'s input has shape {list(shape)}; eptq-deploy reads one NHWC image input, batch 1")
        if any(d < 0 for d in sig[1:]):  # its tensors' shapes in the file hold placeholders for those sizes
            raise ModelError(f"{where}'s input has dynamic size(s) (H,W,C: {','.join('?' if d < 0 else str(d) for d in sig[1:])}); "
                             "eptq-deploy reads TFLite files at the size they were converted at: re-convert with a "
                             "fixed input shape")
        resolve_input_shape(shape[1:], input_shape, where, "H,W,C")  # a given --input-shape must match the file
        self.input_index = int(self.sg.inputs[0])
        self.nodes: list[Node] = []
        self.tensors: dict[str, TensorInfo] = {"input": TensorInfo("input", _nchw(shape), "input")}
        self.names: dict[int, str] = {self.input_index: "input"}  # TFLite tensor index -> canonical tensor
        self.nhwc_flat: dict[str, tuple[int, int, int]] = {}  # 2-D tensors flattened from NHWC (h, w, c)
        self.const: dict[int, np.ndarray] = {}
        self.count: dict[str, int] = {}
        self.nchw_data: set[int] = set()  # TFLite tensors transposed to NCHW order (only a flatten may read them)
        self.skip: set[int] = set()  # operator indices read as part of a later one (``find_repeats``)
        self.uses: dict[int, int] = {}
        for i in [int(i) for o in self.sg.operators for i in o.inputs] + [int(i) for i in self.sg.outputs]:
            self.uses[i] = self.uses.get(i, 0) + 1
        self.reader_ops: dict[int, set[str]] = {}  # TFLite tensor -> the ops reading it
        for o in self.sg.operators:
            for i in o.inputs:
                self.reader_ops.setdefault(int(i), set()).add(self.ops[o.opcodeIndex])
        self.repeats = self.find_repeats()

    def find_repeats(self) -> dict[int, tuple[int, int, int]]:
        """Chains of RESHAPE and TILE from a 4-D tensor back to a 4-D tensor that repeat every row kh and
        every column kw times (how Keras 3 writes a nearest UpSampling2D): the chain's last operator
        index -> (its input tensor, kh, kw). The chain is checked by running it on the input's element
        indices, so only an exact repeat is read as one; its other operators are skipped by ``run``."""
        ops = list(self.sg.operators)
        name = [self.ops[o.opcodeIndex] for o in ops]
        read_by: dict[int, list[int]] = {}
        for j, o in enumerate(ops):
            for t in o.inputs:
                read_by.setdefault(int(t), []).append(j)
        found: dict[int, tuple[int, int, int]] = {}
        for j, o in enumerate(ops):
            x = int(o.inputs[0]) if len(o.inputs) else -1
            src = tuple(int(d) for d in self.sg.tensors[x].shape) if x >= 0 else ()
            if name[j] != "RESHAPE" or len(src) != 4 or src[0] != 1:
                continue
            values, chain, m = np.arange(int(np.prod(src))).reshape(src), [], j
            while True:
                out = int(ops[m].outputs[0])
                shape = tuple(int(d) for d in self.sg.tensors[out].shape)
                if name[m] == "TILE":
                    mult = self.constant(int(ops[m].inputs[1]))
                    if mult is None or mult.size != values.ndim:
                        break
                    values = np.tile(values, [int(v) for v in mult.ravel()])
                elif np.prod(shape) == values.size:
                    values = values.reshape(shape)
                if values.shape != shape:
                    break
                chain.append(m)
                nxt = read_by.get(out, [])
                if len(shape) == 4 and name[m] == "RESHAPE" and "TILE" in (name[c] for c in chain):
                    kh, kw = shape[1] // src[1], shape[2] // src[2]
                    ref = np.arange(int(np.prod(src))).reshape(src).repeat(kh, 1).repeat(kw, 2)
                    if ref.shape == values.shape and np.array_equal(ref, values):
                        found[m] = (x, kh, kw)
                        self.skip.update(chain[:-1])
                    break
                if self.uses.get(out) != 1 or len(nxt) != 1 or name[nxt[0]] not in ("RESHAPE", "TILE") \
                        or values.size > 1 << 24:
                    break
                m = nxt[0]
        return found

    # -------------------------------------------------------------------- helpers
    def constant(self, i: int) -> np.ndarray | None:
        if i in self.const:
            return self.const[i]
        t = self.sg.tensors[i]
        raw = self.m.buffers[t.buffer].data if t.buffer else None
        if raw is None or not len(raw):
            return None
        S = self.S
        dtype = {S.TensorType.FLOAT32: np.float32, S.TensorType.FLOAT16: np.float16, S.TensorType.INT32: np.int32,
                 S.TensorType.INT64: np.int64}.get(t.type)
        if dtype is None:
            raise ModelError(f"{self.where}: constant {t.name.decode()!r} has tensor type {t.type}; give the float model")
        try:
            return np.frombuffer(bytes(raw), dtype).reshape([int(d) for d in t.shape]).copy()
        except ValueError:
            raise ModelError(f"{self.where}: constant {t.name.decode()!r} holds {len(raw)} bytes, not its shape "
                             f"{list(t.shape)}; the file is malformed") from None

    def act(self, i: int, op: str) -> str:
        if i in self.names:
            return self.names[i]
        raise UnsupportedOpError(f"{op} reads tensor {self.sg.tensors[i].name.decode()!r}, a constant where "
                                 "eptq-deploy needs an activation")

    def producer(self, t: str) -> Node | None:
        return next((n for n in reversed(self.nodes) if t in n.outputs), None)

    def readers(self, i: int) -> int:
        """How many operators (and graph outputs) read TFLite tensor ``i``."""
        return self.uses.get(i, 0)

    def shape(self, i: int) -> tuple[int, ...]:
        return _nchw(tuple(int(d) for d in self.sg.tensors[i].shape))

    def intermediate(self, x: str, op: str, attrs: dict[str, Any], shape: tuple[int, ...], where: str) -> str:
        """A canonical node with no TFLite tensor of its own (one TFLite op read as several)."""
        k = self.count.get(op, 0)
        self.count[op] = k + 1
        name = f"{op}_{k}"
        self.tensors[name] = TensorInfo(name, tuple(shape), "activation")
        self.nodes.append(Node(name, op, [x], [name], attrs, where))
        return name

    def emit(self, out_index: int, op: str, inputs: list[str], attrs: dict[str, Any], where: str,
             weights: tuple[np.ndarray, np.ndarray] | None = None) -> str:
        k = self.count.get(op, 0)
        self.count[op] = k + 1
        name = f"{op}_{k}"
        ins = list(inputs)
        if weights is not None:
            for suffix, data, kind in ((".weight", weights[0], "weight"), (".bias", weights[1], "bias")):
                self.tensors[name + suffix] = TensorInfo(name + suffix, tuple(data.shape), kind,
                                                         data=np.ascontiguousarray(data, np.float32))
                ins.append(name + suffix)
        self.tensors[name] = TensorInfo(name, self.shape(out_index), "activation")
        self.nodes.append(Node(name, op, ins, [name], attrs, where))
        self.names[out_index] = name
        return name

    def held(self, data: np.ndarray) -> str:
        """A float constant held in the graph (a sub's or div's other operand, a PReLU slope)."""
        k = self.count.get("const", 0)
        self.count["const"] = k + 1
        name = f"const_{k}"
        self.tensors[name] = TensorInfo(name, tuple(data.shape), "constant", data=np.ascontiguousarray(data, np.float32))
        return name

    def refuse(self, op: str, where: str, why: str = "") -> None:
        raise UnsupportedOpError(f"TFLite op {op} ({where}){': ' + why if why else ''} is not read by eptq-deploy yet; "
                                 f"readable ops: {', '.join(SUPPORTED)}")

    # ----------------------------------------------------------------------- walk
    def run(self) -> tuple[QuantGraph, dict[str, int]]:
        for j, o in enumerate(self.sg.operators):
            if j in self.skip:
                continue
            op = self.ops[o.opcodeIndex]
            ins = [int(i) for i in o.inputs]
            outs = [int(i) for i in o.outputs]
            where = self.sg.tensors[outs[0]].name.decode() if outs else op
            opts = o.builtinOptions
            if j in self.repeats:
                _repeat(self, *self.repeats[j], outs[0], where)
                continue
            if op == "DEQUANTIZE" and self.constant(ins[0]) is not None:
                self.const[outs[0]] = self.constant(ins[0]).astype(np.float32)  # float16 weights
                continue
            handler = _HANDLERS.get(op)
            if handler is None:
                self.refuse(op, where)
            if op != "RESHAPE" and self.nchw_data & set(ins):
                self.refuse(op, where, "an op other than a flatten reading an NHWC -> NCHW transpose")
            try:
                handler(self, ins, outs, opts, where, op)
            except EptqError:
                raise
            except Exception as e:  # a malformed operator: one line
                raise ModelError(f"cannot read TFLite op {op} ({where}): {' '.join(str(e).split())[:160]}; "
                                 "check the file") from None
        outs = [int(o) for o in self.sg.outputs]
        if any(o not in self.names for o in outs):
            raise ModelError(f"{self.where}'s output does not depend on its input; check the file")
        if len({self.names[o] for o in outs}) != len(outs):
            raise ModelError(f"{self.where} returns one tensor as two outputs; drop the duplicate output")
        g = QuantGraph(_live(self.nodes, [self.names[o] for o in outs]), self.tensors, ["input"],
                       [self.names[o] for o in outs], {"source_layout": "NHWC"})  # users feed and read the file's layout
        g.tensors = {k: v for k, v in g.tensors.items() if v.kind == "input" or any(
            k in n.inputs or k in n.outputs for n in g.nodes)}
        by_canonical = {c: i for i, c in self.names.items()}
        renamed = adopt_source_names(g, {c: self.sg.tensors[i].name.decode(errors="replace")
                                         for c, i in by_canonical.items()})  # the exported file keeps them
        g.validate()
        return g, {renamed.get(c, c): i for c, i in by_canonical.items()}

    def fused(self, opts: Any, op: str, where: str) -> str:
        code = getattr(opts, "fusedActivationFunction", 0) if opts is not None else 0
        if code not in _FUSED:
            self.refuse(op, where, f"fused activation {code}")
        return _FUSED[code]

    def padding(self, opts: Any, x: str, kernel: list[int], stride: list[int], dilation: list[int]) -> list[int]:
        if opts.padding == self.S.Padding.VALID:
            return [0, 0, 0, 0]
        return same_pads(self.tensors[x].shape[2:], kernel, stride, dilation)


def _live(nodes: list[Node], outputs: list[str]) -> list[Node]:
    """The nodes the outputs depend on (a PAD folded into its convolution, a flatten a reshape
    undid, are left behind)."""
    needed, keep = set(outputs), []
    for n in reversed(nodes):
        if set(n.outputs) & needed:
            keep.append(n)
            needed |= set(n.inputs)
    return keep[::-1]


# ---------------------------------------------------------------------- handlers
def _conv(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    x, w = r.act(ins[0], op), r.constant(ins[1])
    if w is None:
        r.refuse(op, where, "filters that are not constant")
    b = r.constant(ins[2]) if len(ins) > 2 and ins[2] >= 0 else None
    stride, dilation = [opts.strideH, opts.strideW], [opts.dilationHFactor, opts.dilationWFactor]
    if op == "CONV_2D":
        w = w.transpose(0, 3, 1, 2)  # OHWI -> OIHW
        cin = r.tensors[x].shape[1]
        if w.shape[1] != cin:
            r.refuse(op, where, "a grouped convolution")
        canonical, groups = "conv2d", 1
    else:
        w = w.transpose(3, 0, 1, 2)  # 1HW(C*M) -> (C*M)1HW
        canonical, groups = "depthwise_conv2d", r.tensors[x].shape[1]
    b = np.zeros(w.shape[0], np.float32) if b is None else b.astype(np.float32)
    pads = r.padding(opts, x, list(w.shape[2:]), stride, dilation)
    prev = r.producer(x)
    if (prev is not None and prev.op == "pad" and not any(pads) and r.readers(ins[0]) == 1
            and not any(prev.attrs["pads"][k] for k in (0, 1, 4, 5))):
        # an explicit PAD of the image only, then a VALID convolution: torch's padded convolution
        p = prev.attrs["pads"]
        x, pads = prev.inputs[0], [p[2], p[3], p[6], p[7]]
    r.emit(outs[0], canonical, [x], {"stride": stride, "pads": pads, "dilation": dilation, "groups": groups,
                                     "activation": r.fused(opts, op, where)}, where, (w.astype(np.float32), b))


def _fully_connected(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    x, w = r.act(ins[0], op), r.constant(ins[1])
    if w is None or len(r.tensors[x].shape) != 2 or (opts is not None and opts.keepNumDims):
        r.refuse(op, where, "non-constant weights, a non-2-D input or keep_num_dims")
    w = w.astype(np.float32)
    if x in r.nhwc_flat:  # columns in NHWC flatten order -> NCHW flatten order
        h, wd, c = r.nhwc_flat[x]
        w = w.reshape(w.shape[0], h, wd, c).transpose(0, 3, 1, 2).reshape(w.shape[0], -1)
    b = r.constant(ins[2]) if len(ins) > 2 and ins[2] >= 0 else None
    b = np.zeros(w.shape[0], np.float32) if b is None else b.astype(np.float32)
    r.emit(outs[0], "linear", [x], {"activation": r.fused(opts, op, where)}, where, (w, b))


def _binary(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    """ADD, MUL, SUB, DIV of two activations, or of an activation and a constant: folded into the
    layer before it where per channel (a separate bias or scale); for SUB and DIV otherwise held in
    the graph as a constant input."""
    act = r.fused(opts, op, where)
    canonical = op.lower()
    consts = [k for k, i in enumerate(ins) if r.constant(i) is not None]
    if consts:
        k = consts[0]
        src, c = ins[1 - k], r.constant(ins[k])
        x = r.act(src, op)
        p = r.producer(x)
        ok = (p is not None and p.op in WEIGHTED_OPS and p.attrs["activation"] == "none" and r.readers(src) == 1
              and (k == 1 or op in ("ADD", "MUL")))
        nhwc = tuple(int(d) for d in r.sg.tensors[outs[0]].shape)
        kind, c_folded = as_add_or_mul(canonical, c)
        v = per_channel_constant(c_folded, r.tensors[x].shape[1], len(nhwc), len(nhwc) - 1) if ok else None
        if v is not None and np.all(np.isfinite(v)):
            fold_into_layer(r.tensors[p.inputs[1]], r.tensors[p.inputs[2]], v, kind)
            p.attrs["activation"] = act
            r.names[outs[0]] = x
            return
        if op in ("ADD", "MUL"):
            r.refuse(op, where, "a constant that is not per channel of a convolution or fully connected layer before it")
        held = held_constant(c, r.tensors[x].shape, channels_last=True)
        if held is None:
            r.refuse(op, where, f"a constant of shape {list(c.shape)} that does not broadcast onto "
                     f"{list(r.sg.tensors[src].shape)} without widening it")
        r.emit(outs[0], canonical, [x, r.held(held)] if k == 1 else [r.held(held), x], {"activation": act}, where)
        return
    x, y = (r.act(i, op) for i in ins)
    sx, sy = r.tensors[x].shape, r.tensors[y].shape
    if op == "ADD" and sx != sy:
        r.refuse(op, where, f"broadcasting add {sx} + {sy}")
    if len(sx) != len(sy):
        r.refuse(op, where, f"tensors of ranks {len(sx)} and {len(sy)}")
    if op == "MUL":
        if act != "none":
            r.refuse(op, where, "MUL with a fused activation")
        r.emit(outs[0], "mul", [x, y], {}, where)
        return
    r.emit(outs[0], canonical, [x, y], {"activation": act}, where)


def _unary(canonical: str) -> Callable[..., None]:
    def h(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
        r.emit(outs[0], canonical, [r.act(ins[0], op)], {}, where)

    return h


def _pool(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    x = r.act(ins[0], op)
    if r.fused(opts, op, where) != "none":
        r.refuse(op, where, "a pool with a fused activation")
    k, s = [opts.filterHeight, opts.filterWidth], [opts.strideH, opts.strideW]
    attrs: dict[str, Any] = {"kernel": k, "stride": s, "pads": r.padding(opts, x, k, s, [1, 1])}
    if op == "AVERAGE_POOL_2D":
        attrs["count_include_pad"] = False  # TFLite averages the pixels inside the image only
    r.emit(outs[0], "avg_pool2d" if op == "AVERAGE_POOL_2D" else "max_pool2d", [x], attrs, where)


def _mean(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    x, axes = r.act(ins[0], op), r.constant(ins[1])
    if len(r.tensors[x].shape) != 4 or axes is None or sorted(int(a) % 4 for a in axes.ravel()) != [1, 2]:
        r.refuse(op, where, "a mean that is not over H and W of an NHWC tensor")
    if opts is not None and opts.keepDims:
        r.emit(outs[0], "global_avg_pool", [x], {}, where)
        return
    k = r.count.get("global_avg_pool", 0)
    r.count["global_avg_pool"] = k + 1
    pooled = f"global_avg_pool_{k}"
    n, c = r.tensors[x].shape[:2]
    r.tensors[pooled] = TensorInfo(pooled, (n, c, 1, 1), "activation")
    r.nodes.append(Node(pooled, "global_avg_pool", [x], [pooled], {}, where))
    r.emit(outs[0], "flatten", [pooled], {}, where)


def _pad(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    x, p = r.act(ins[0], op), r.constant(ins[1])
    if p is None or p.shape != (4, 2) or (p < 0).any():
        r.refuse(op, where, "paddings that are not a constant 4 x 2 of non-negative values")
    order = (0, 3, 1, 2)  # NHWC rows -> NCHW axes
    r.emit(outs[0], "pad", [x], {"pads": [int(p[a, 0]) for a in order] + [int(p[a, 1]) for a in order]}, where)


def _reshape(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    x = r.act(ins[0], op)
    src = r.tensors[x].shape
    out = tuple(int(d) for d in r.sg.tensors[outs[0]].shape)
    if len(out) == 2 and out[0] == src[0]:
        r.emit(outs[0], "flatten", [x], {}, where)
        if len(src) == 4 and src[2] * src[3] > 1 and ins[0] not in r.nchw_data:
            r.nhwc_flat[r.names[outs[0]]] = (src[2], src[3], src[1])
    elif _nchw(out) == src:
        r.names[outs[0]] = x
    elif len(out) == 4 and len(src) == 2 and out[1] * out[2] == 1:  # (N, C) -> (N, 1, 1, C): no pixels to reorder
        prev = r.producer(x)
        if prev is not None and prev.op == "flatten" and r.tensors[prev.inputs[0]].shape == _nchw(out):
            r.names[outs[0]] = prev.inputs[0]  # MEAN without keep_dims, then back to 4-D: the pooled tensor
        else:
            r.emit(outs[0], "reshape", [x], {"shape": list(_nchw(out))}, where)
    elif out[0] == src[0]:  # any other: TFLite reshapes NHWC memory, so the canonical graph does it in NHWC
        y = x
        if len(src) == 4:
            y = r.intermediate(y, "transpose", {"perm": [0, 2, 3, 1]}, (src[0], src[2], src[3], src[1]), where)
        if len(out) == 4:
            y = r.intermediate(y, "reshape", {"shape": list(out)}, out, where)
            r.emit(outs[0], "transpose", [y], {"perm": [0, 3, 1, 2]}, where)
        else:
            r.emit(outs[0], "reshape", [y], {"shape": list(out)}, where)
    else:
        r.refuse(op, where, f"a reshape from {list(src)} (NCHW) to {list(out)} (NHWC) that changes the batch size")


def _concat(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    xs = [r.act(i, op) for i in ins]
    if r.fused(opts, op, where) != "none":
        r.refuse(op, where, "a concatenation with a fused activation")
    rank = len(r.tensors[xs[0]].shape)
    axis = int(opts.axis) % rank
    if rank == 4:
        axis = (0, 2, 3, 1)[axis]
    r.emit(outs[0], "concat", xs, {"axis": axis}, where)


def _transpose(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    """NHWC -> NCHW before a flatten (as exporters write to keep a PyTorch flatten order): in the
    canonical NCHW graph that is the tensor itself, flattened in its own order. Any other permutation
    keeping the batch axis first is a canonical transpose of the NCHW tensors."""
    x, perm = r.act(ins[0], op), r.constant(ins[1])
    rank = len(r.tensors[x].shape)
    if perm is None or sorted(int(p) % rank for p in perm.ravel()) != list(range(rank)) or int(perm.ravel()[0]) != 0:
        r.refuse(op, where, f"permutation {None if perm is None else perm.tolist()} (a constant one keeping the "
                 "batch axis first is read)")
    p = [int(v) % rank for v in perm.ravel()]
    if p == [0, 3, 1, 2] and r.reader_ops.get(outs[0], set()) <= {"RESHAPE"}:
        r.names[outs[0]] = x
        r.nchw_data.add(outs[0])
        return
    if rank == 4:  # the canonical tensors are NCHW views of the NHWC ones on both sides
        p = [[0, 2, 3, 1][p[a]] for a in (0, 3, 1, 2)]
    if p == list(range(rank)):
        r.names[outs[0]] = x
        return
    r.emit(outs[0], "transpose", [x], {"perm": p}, where)


def _split(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    """SPLIT (axis, x) and SPLIT_V (x, sizes, axis): one canonical slice per output, sized as the output."""
    xi, ai = (ins[1], ins[0]) if op == "SPLIT" else (ins[0], ins[2])
    x, axis = r.act(xi, op), r.constant(ai)
    rank = len(r.tensors[x].shape)
    if axis is None or axis.size != 1:
        r.refuse(op, where, "an axis that is not one constant")
    a = int(axis.ravel()[0]) % rank
    a = (0, 2, 3, 1)[a] if rank == 4 else a
    if a == 0:
        r.refuse(op, where, "a split along the batch axis")
    start, size = 0, r.tensors[x].shape[a]
    for o in outs:
        end = start + r.shape(o)[a]
        if (start, end) == (0, size):
            r.names[o] = x
        else:
            r.emit(o, "slice", [x], {"axes": [a], "starts": [start], "ends": [end], "steps": [1]}, where)
        start = end


def _resize(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    """RESIZE_BILINEAR and RESIZE_NEAREST_NEIGHBOR as TFLite's kernels compute them: the input coordinate
    is (x + 0.5 if half_pixel_centers) * step (- 0.5 for bilinear), step = in / out or, with align_corners,
    (in - 1) / (out - 1) in float32; nearest floors it, or rounds half up with align_corners."""
    x = r.act(ins[0], op)
    shape, out = r.tensors[x].shape, r.shape(outs[0])
    align = bool(opts.alignCorners) if opts is not None else False
    half = bool(opts.halfPixelCenters) if opts is not None else False
    nearest = op == "RESIZE_NEAREST_NEIGHBOR"
    if len(shape) == 4 and shape[2:] == (1, 1):  # from one pixel, bilinear copies it: a nearest resize (moves codes)
        nearest, align, half = True, False, False
    if len(shape) != 4 or out[:2] != shape[:2]:
        r.refuse(op, where, f"a resize of {list(shape)} to {list(out)} (NCHW; H and W of a 4-D tensor are read)")
    if align and half and not nearest:
        r.refuse(op, where, "align_corners with half_pixel_centers (TFLite's bilinear kernel refuses it too)")
    r.emit(outs[0], "resize", [x], resize_attrs(shape, out, nearest, align, half), where)


def resize_attrs(shape: tuple[int, ...], out: tuple[int, ...], nearest: bool, align: bool = False,
                 half: bool = False) -> dict[str, Any]:
    """The canonical resize's attributes for TFLite's kernels (NCHW ``shape`` to ``out``): the step per axis
    as they compute it in float32."""
    step = [float(np.float32(i - 1) / np.float32(o - 1)) if align and o > 1 else float(np.float32(i) / np.float32(o))
            for i, o in zip(shape[2:], out[2:], strict=True)]
    if half:
        coord = "tf_half_pixel_for_nn" if nearest else "half_pixel"
    else:
        coord = "align_corners" if align else "asymmetric"
    attrs: dict[str, Any] = {"mode": "nearest" if nearest else "linear", "coord": coord, "size": list(out[2:]),
                             "step": step}
    if nearest:
        attrs["nearest"] = "round_prefer_ceil" if align else "floor"
    return attrs


def _repeat(r: _Reader, x_index: int, kh: int, kw: int, out_index: int, where: str) -> None:
    """A repeat of rows and columns (``find_repeats``) as one nearest resize; refused where TFLite's float32
    step would not land every output pixel on input pixel i // k."""
    x = r.act(x_index, "TILE")
    src = r.tensors[x].shape
    out = (src[0], src[1], src[2] * kh, src[3] * kw)
    attrs = resize_attrs(src, out, nearest=True)
    for n_out, k, step in zip(out[2:], (kh, kw), attrs["step"], strict=True):
        i = np.arange(n_out, dtype=np.float32)
        if not np.array_equal(np.floor(i * np.float32(step)).astype(np.int64), np.arange(n_out) // k):
            r.refuse("TILE", where, f"a repeat by {k} that a float32 nearest resize does not reproduce")
    r.emit(out_index, "resize", [x], attrs, where)


def _leaky_relu(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    alpha = float(np.float32(opts.alpha)) if opts is not None else 0.0
    r.emit(outs[0], "leaky_relu", [r.act(ins[0], op)], {"alpha": alpha}, where)


def _prelu(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    x, alpha = r.act(ins[0], op), r.constant(ins[1])
    rank = len(r.sg.tensors[ins[0]].shape)
    slope = None if alpha is None else per_channel_constant(alpha, r.tensors[x].shape[1], rank, rank - 1)
    if slope is None:
        r.refuse(op, where, "an alpha that is not a constant scalar or one value per channel")
    r.emit(outs[0], "prelu", [x, r.held(slope)], {}, where)


def _transpose_conv(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    """TRANSPOSE_CONV (output shape, OHWI filters, x, optional bias): the output size is the stated one;
    TFLite pads as the convolution it reverses would (SAME: the odd pixel at the end)."""
    x, w = r.act(ins[2], op), r.constant(ins[1])
    if w is None:
        r.refuse(op, where, "filters that are not constant")
    w = w.astype(np.float32).transpose(3, 0, 1, 2)  # OHWI -> (C_in, C_out, kH, kW), torch's layout
    if w.shape[0] != r.tensors[x].shape[1]:
        r.refuse(op, where, "a grouped transposed convolution")
    b = r.constant(ins[3]) if len(ins) > 3 and ins[3] >= 0 else None
    b = np.zeros(w.shape[1], np.float32) if b is None else b.astype(np.float32)
    stride, out = [opts.strideH, opts.strideW], r.shape(outs[0])
    begin = [0, 0] if opts.padding == r.S.Padding.VALID else same_pads(out[2:], w.shape[2:], stride, [1, 1])[:2]
    end = [(i - 1) * s + k - p - o for i, s, k, p, o in zip(r.tensors[x].shape[2:], stride, w.shape[2:], begin,
                                                              out[2:], strict=True)]
    attrs = {"stride": stride, "pads": begin + [max(e, 0) for e in end], "output_padding": [max(-e, 0) for e in end],
             "dilation": [1, 1], "groups": 1, "activation": r.fused(opts, op, where)}
    r.emit(outs[0], "conv_transpose2d", [x], attrs, where, (w, b))


def _strided_slice(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    x = r.act(ins[0], op)
    begin, end, strides = (r.constant(i) for i in ins[1:4])
    rank = len(r.tensors[x].shape)
    masks = (opts.ellipsisMask, opts.newAxisMask, opts.shrinkAxisMask, getattr(opts, "offset", False))
    if begin is None or end is None or strides is None or any(masks) or rank != 4:
        r.refuse(op, where, "non-constant bounds, ellipsis/new-axis/shrink masks or a rank other than 4")
    nhwc = tuple(int(d) for d in r.sg.tensors[ins[0]].shape)
    attrs: dict[str, list[int]] = {"axes": [], "starts": [], "ends": [], "steps": []}
    for a in range(4):
        dim, st, en, sp = nhwc[a], int(begin[a]), int(end[a]), int(strides[a])
        st = 0 if opts.beginMask >> a & 1 else min(max(st + dim if st < 0 else st, 0), dim)
        en = dim if opts.endMask >> a & 1 else min(max(en + dim if en < 0 else en, 0), dim)
        if (st, en, sp) == (0, dim, 1):
            continue
        if sp <= 0 or a == 0:
            r.refuse(op, where, "a slice with a non-positive stride or along the batch axis")
        for key, v in zip(attrs, ((0, 2, 3, 1)[a], st, en, sp), strict=True):
            attrs[key].append(v)
    if not attrs["axes"]:
        r.names[outs[0]] = x
        return
    r.emit(outs[0], "slice", [x], attrs, where)


def _softmax(r: _Reader, ins: list[int], outs: list[int], opts: Any, where: str, op: str) -> None:
    x = r.act(ins[0], op)
    if len(r.tensors[x].shape) != 2 or (opts is not None and opts.beta != 1.0):
        r.refuse(op, where, "a softmax over other than the classes of an (N, classes) tensor, or beta != 1")
    r.emit(outs[0], "softmax", [x], {"axis": 1}, where)


_HANDLERS: dict[str, Callable[..., None]] = {
    "CONV_2D": _conv, "DEPTHWISE_CONV_2D": _conv, "FULLY_CONNECTED": _fully_connected, "ADD": _binary,
    "MUL": _binary, "RELU": _unary("relu"), "RELU6": _unary("relu6"), "LOGISTIC": _unary("sigmoid"),
    "HARD_SWISH": _unary("hardswish"), "AVERAGE_POOL_2D": _pool, "MAX_POOL_2D": _pool, "MEAN": _mean, "PAD": _pad,
    "RESHAPE": _reshape, "CONCATENATION": _concat, "STRIDED_SLICE": _strided_slice,
    "TRANSPOSE": _transpose, "SOFTMAX": _softmax, "SUB": _binary, "DIV": _binary, "TANH": _unary("tanh"),
    "PRELU": _prelu, "LEAKY_RELU": _leaky_relu, "TRANSPOSE_CONV": _transpose_conv, "RESIZE_BILINEAR": _resize,
    "RESIZE_NEAREST_NEIGHBOR": _resize, "SPLIT": _split, "SPLIT_V": _split,
}


def read(source: str | Path, input_shape: Sequence[int] | None = None) -> SourceGraph:
    """The canonical float graph of a float TFLite file, and a runner of the file on the TFLite interpreter."""
    path = Path(source)
    return read_bytes(path.read_bytes(), str(path), input_shape)


def read_bytes(raw: bytes, name: str, input_shape: Sequence[int] | None = None) -> SourceGraph:
    """``read`` of a flatbuffer in memory (what TensorFlow's converter returns, for the Keras reader);
    ``name`` stands for the file in messages, its stem names the model."""
    path = Path(name)
    if len(raw) < 8 or raw[4:8] != b"TFL3":
        raise ModelError(f"{path} is not a TFLite flatbuffer (no TFL3 identifier); check it is a .tflite file")
    try:
        model = _schema().ModelT.InitFromPackedBuf(raw, 0)
    except Exception as e:
        raise ModelError(f"cannot parse {path} as TFLite ({' '.join(str(e).split())[:120]}); the file is "
                         "truncated or malformed") from None
    try:
        reader = _Reader(model, name, input_shape)
        g, names = reader.run()
    except EptqError:
        raise
    except Exception as e:  # missing tables, offsets out of range: the flatbuffer's structure is untrusted
        raise ModelError(f"cannot read {path} as a TFLite model ({type(e).__name__}: {' '.join(str(e).split())[:100]}); "
                         "the file is truncated or malformed") from None

    def run_source(x: np.ndarray, wanted: list[str]) -> list[np.ndarray]:
        from ai_edge_litert.interpreter import Interpreter

        with warnings.catch_warnings():  # keeping every tensor is what the comparison needs, not a debug leftover
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
            it = Interpreter(model_content=raw, experimental_preserve_all_tensors=True, num_threads=1)
        it.allocate_tensors()
        per_sample = []
        for i in range(len(x)):
            it.set_tensor(reader.input_index, np.ascontiguousarray(x[i:i + 1].transpose(0, 2, 3, 1), np.float32))
            it.invoke()
            per_sample.append([it.get_tensor(names[t]) for t in wanted])
        out = [np.concatenate([s[k] for s in per_sample]) for k in range(len(wanted))]
        return [v.transpose(0, 3, 1, 2) if v.ndim == 4 else v for v in out]

    names_by_canonical = {c: c for c in names}  # canonical name -> itself; run_source resolves the index
    return SourceGraph(g, run_source, names_by_canonical, {"input_shape": g.tensors[g.inputs[0]].shape[1:],
                                                            "name": path.stem})
