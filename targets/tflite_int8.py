"""Target ``tflite-int8``: a TFLite flatbuffer written directly, run on ai-edge-litert.

The file is built with the flatbuffer schema module that ships inside ``ai-edge-litert``
(no TensorFlow converter), so every int8 weight, int32 bias, scale and zero point in it
is the one the quantized graph holds: a converter re-derives weight scales and lands an
ulp off. Layout is NHWC; every 8-bit activation is an int8 tensor (an unsigned grid with
zero point z becomes int8 with z - 128, the same real values); weights are int8 per
channel (axis 0, axis 3 for DEPTHWISE_CONV_2D's [1, H, W, C*mult]), zero point 0, bias
int32 at s_in * s_w. Torch padding that SAME cannot express becomes an explicit PAD, and a
conv's per-channel ``pad_value`` (folded input normalisation) SPLIT, a PADV2 per channel
and CONCATENATION, all moving codes only.
Ops that only move codes (pads, slices, pools, concatenation, reshapes) need one grid on
their inputs and output, and LOGISTIC a fixed one: ``rules`` declares both, so the grids
are chosen that way. Two simulation rules reproduce the runtime bit for bit: ``xnnpack``
the default path (XNNPACK's float32 requantisation, the target's declared rule) and
``tflite`` the reference kernels (Q31 fixed point); a runner says which one its kernels
follow (``rounding``).
"""

from __future__ import annotations

import re
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import torch
import torch.nn.functional as F
from ai_edge_litert import schema_py_generated as S
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from eptq_deploy.errors import TargetError, UnsupportedOpError
from eptq_deploy.float_exec import pack
from eptq_deploy.graph import Node, QParams, QuantGraph, TargetRules
from eptq_deploy.simulate import (
    FloatHalfEvenRule,
    RoundingRule,
    activation_bounds,
    pad_codes,
    register_rule,
    same_grid,
)

from . import Runner, Target, io_tensor, same_float32

BO, TT, ACT = S.BuiltinOperator, S.TensorType, S.ActivationFunctionType
OP_NAMES = {v: k for k, v in vars(BO).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k for k, v in vars(TT).items() if not k.startswith("_")}
#: op versions the converter writes for int8 tensors (float files use version 1)
INT8_VERSIONS = {BO.CONV_2D: 3, BO.DEPTHWISE_CONV_2D: 3, BO.FULLY_CONNECTED: 4, BO.ADD: 2, BO.MUL: 2,
                 BO.CONCATENATION: 2, BO.MAX_POOL_2D: 2, BO.AVERAGE_POOL_2D: 2, BO.MEAN: 2, BO.PAD: 2,
                 BO.PADV2: 2, BO.SPLIT: 2, BO.STRIDED_SLICE: 2, BO.TRANSPOSE: 2, BO.LOGISTIC: 2, BO.RELU: 2, BO.RELU6: 2,
                 BO.RESIZE_NEAREST_NEIGHBOR: 2}
#: LOGISTIC's int8 output grid (the kernel demands it); hardsigmoid's lowering uses it too
UNIT_GRID = (1.0 / 256.0, -128, True)
#: op-resolver choices of ``load``: XNNPACK, the optimized builtins, the reference kernels
KERNELS = {"auto": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
           "reference": OpResolverType.BUILTIN_REF}
_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}


#: weighted op -> (transpose from the graph's layout to TFLite's, the per-channel axis there)
WEIGHT_LAYOUT: dict[str, tuple[tuple[int, ...], int]] = {
    "conv2d": ((0, 2, 3, 1), 0), "depthwise_conv2d": ((1, 2, 3, 0), 3), "linear": ((), 0)}
_NUMPY_TYPES = {TT.INT8: np.int8, TT.INT32: np.int32, TT.FLOAT32: np.float32, TT.UINT8: np.uint8,
                TT.INT16: np.int16, TT.INT64: np.int64}


def stored_tensors(m: Any) -> dict[str, dict[str, Any]]:
    """A parsed model's tensors by name: type, data (None without a buffer), scales, zero points, axis."""
    out = {}
    for t in m.subgraphs[0].tensors:
        raw = m.buffers[t.buffer].data if t.buffer else None
        data = None
        if raw is not None and len(raw) and t.type in _NUMPY_TYPES:
            data = np.frombuffer(bytes(raw), _NUMPY_TYPES[t.type]).reshape([int(d) for d in t.shape])
        q = t.quantization
        out[t.name.decode()] = {"type": t.type, "data": data,
                                "scales": None if q is None or q.scale is None else np.asarray(q.scale, np.float32),
                                "zero_points": None if q is None or q.zeroPoint is None else np.asarray(q.zeroPoint),
                                "axis": 0 if q is None else int(q.quantizedDimension)}
    return out


def read_back_mismatches(m: Any, g: QuantGraph, tensors: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Every way a parsed model (``tensors``: its ``stored_tensors``, where the caller decoded some)
    differs from ``g``: int8 weights in TFLite's layout with their per-channel scales and axis,
    int32 biases, every activation's int8 grid, and the input and output named as in the graph."""
    tensors = stored_tensors(m) if tensors is None else tensors
    bad = []
    for n in g.weighted_nodes():
        layout, axis = WEIGHT_LAYOUT[n.op]
        for t, ttype in ((g.tensors[n.inputs[1]], TT.INT8), (g.tensors[n.inputs[2]], TT.INT32)):
            got = tensors.get(t.name)
            want = np.transpose(t.data, layout) if ttype == TT.INT8 and layout else t.data
            if got is None or got["type"] != ttype or got["data"] is None:
                bad.append(f"{t.name}: no {_TYPE_NAMES.get(ttype)} constant in the file")
                continue
            if not np.array_equal(got["data"], want):
                bad.append(f"{t.name}: integers differ")
            if not same_float32(got["scales"], t.quant.scale) or np.any(got["zero_points"] != 0):
                bad.append(f"{t.name}: scales or zero points differ")
            if ttype == TT.INT8 and got["axis"] != axis:
                bad.append(f"{t.name}: quantized dimension {got['axis']}, expected {axis}")
    for name in g.activation_names():
        got = tensors.get(name)
        if got is None or got["type"] != TT.INT8 or got["scales"] is None:
            bad.append(f"{name}: no int8 activation tensor in the file")
            continue
        s, z = i8_grid(g.tensors[name].quant)
        if not same_float32(got["scales"], [s]) or got["zero_points"].tolist() != [z]:
            bad.append(f"{name}: grid {got['scales'].tolist()}/{got['zero_points'].tolist()}, expected {s}/{z}")
    sg = m.subgraphs[0]
    io = [sg.tensors[i].name.decode() for i in (*sg.inputs, *sg.outputs)]
    if io != [g.inputs[0], *g.outputs]:
        bad.append(f"input/outputs named {io}, expected {[g.inputs[0], *g.outputs]}")
    return bad


def i8_grid(qp: QParams) -> tuple[float, int]:
    """(scale, int8 zero point) of an 8-bit activation grid in TFLite's int8 container."""
    return float(qp.scale[0]), int(qp.zero_point[0]) - int8_container_offset(qp)


def nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else tuple(shape)


def same_padding(size: int, k: int, stride: int, dilation: int, before: int, after: int) -> bool:
    """Does TFLite SAME read exactly the windows torch's padding (before, after) reads?"""
    keff = dilation * (k - 1) + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + keff - size, 0)
    return (size + before + after - keff) // stride + 1 == out and total // 2 == before


def _memory_order_kept(shape: tuple[int, ...]) -> bool:
    """NCHW and NHWC hold a 4-D tensor in the same order when C == 1 or H * W == 1."""
    return len(shape) != 4 or shape[1] == 1 or shape[2] * shape[3] == 1


class _Emitter:
    def __init__(self, g: QuantGraph, quantized: bool) -> None:
        self.g = g
        self.q = quantized
        self.model = S.ModelT()
        self.model.version = 3
        self.model.description = "eptq-deploy " + ("int8" if quantized else "float32")
        self.model.buffers = [S.BufferT()]  # buffer 0: the empty sentinel
        self.model.operatorCodes = []
        self.sg = S.SubGraphT()
        self.sg.tensors, self.sg.operators = [], []
        self.model.subgraphs = [self.sg]
        self.codes: dict[int, int] = {}
        self.index: dict[str, int] = {}  # graph activation -> tensor index (NHWC)

    # --------------------------------------------------------------- tensors
    def tensor(self, name: str, shape: tuple[int, ...], ttype: int, data: np.ndarray | None = None,
               scale: np.ndarray | float | None = None, zero_point: np.ndarray | int | None = None, axis: int = 0) -> int:
        t = S.TensorT()
        t.name, t.shape, t.type, t.buffer = name, [int(s) for s in shape], ttype, 0
        if data is not None:
            b = S.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.model.buffers.append(b)
            t.buffer = len(self.model.buffers) - 1
        if scale is not None:
            qp = S.QuantizationParametersT()
            qp.scale = [float(s) for s in np.atleast_1d(np.asarray(scale, np.float32))]
            qp.zeroPoint = [int(z) for z in np.atleast_1d(zero_point)]
            qp.quantizedDimension = axis
            t.quantization = qp
        self.sg.tensors.append(t)
        return len(self.sg.tensors) - 1

    def const_i32(self, name: str, values: list[int] | np.ndarray) -> int:
        arr = np.asarray(values, np.int32)
        return self.tensor(name, arr.shape, TT.INT32, arr)

    def act_tensor(self, name: str, shape: tuple[int, ...], grid: str) -> int:
        """An activation tensor (NHWC ``shape``) on the grid of graph tensor ``grid``."""
        if not self.q:
            return self.tensor(name, shape, TT.FLOAT32)
        s, z = i8_grid(self.qp(grid))
        return self.tensor(name, shape, TT.INT8, scale=s, zero_point=z)

    def output(self, t: str) -> int:
        """The tensor of graph activation ``t``, created on first use."""
        if t not in self.index:
            self.index[t] = self.act_tensor(t, nhwc(self.g.tensors[t].shape), t)
        return self.index[t]

    def qp(self, t: str) -> QParams:
        qp = self.g.tensors[t].quant
        if qp is None or qp.bits != 8:
            raise TargetError(f"tflite-int8 needs an 8-bit grid on every activation; {t!r} has "
                              f"{'none' if qp is None else f'{qp.bits} bits'}; quantize with an 8-bit-activation profile")
        return qp

    def op(self, code: int, inputs: list[int], outputs: list[int], opt_type: int = 0, opt: object = None) -> None:
        if code not in self.codes:
            c = S.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode = code, min(code, 127)
            c.version = INT8_VERSIONS.get(code, 1) if self.q else 1
            self.model.operatorCodes.append(c)
            self.codes[code] = len(self.model.operatorCodes) - 1
        o = S.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = self.codes[code], list(inputs), list(outputs)
        o.builtinOptionsType, o.builtinOptions = opt_type, opt
        self.sg.operators.append(o)

    # ---------------------------------------------------------------- checks
    def same_grid(self, n: Node) -> None:
        """TFLite's int8 kernel for ``n`` moves codes: every input must be on the output's grid."""
        if not self.q:
            return
        want = i8_grid(self.qp(n.outputs[0]))
        for i in n.inputs:
            if i8_grid(self.qp(i)) != want:
                raise TargetError(f"TFLite's int8 {n.op} ({n.name}) needs its inputs on its output grid but {i!r} "
                                  "has another; quantize with targets including tflite-int8 so its rules shape the grids")

    def fixed_grid(self, n: Node) -> None:
        if self.q and i8_grid(self.qp(n.outputs[0])) != UNIT_GRID[:2]:
            raise TargetError(f"TFLite's int8 {n.op} ({n.name}) needs the output grid scale 1/256, zero point -128; "
                              "quantize with targets including tflite-int8 so its rules fix that grid")

    # ----------------------------------------------------------------- build
    def build(self) -> bytes:
        g = self.g
        if len(g.inputs) != 1:
            raise TargetError("tflite-int8 writes single-input graphs")
        x = self.output(g.inputs[0])
        for n in g.nodes:
            self.emit_node(n)
        ys = [self.output(o) for o in g.outputs]
        self.sg.inputs, self.sg.outputs = [x], ys
        sig = S.SignatureDefT()
        sig.signatureKey, sig.subgraphIndex = "serving_default", 0
        sig.inputs, sig.outputs = [], []
        for lst, idx in [(sig.inputs, x)] + [(sig.outputs, y) for y in ys]:
            tm = S.TensorMapT()
            tm.name, tm.tensorIndex = self.sg.tensors[idx].name, idx
            lst.append(tm)
        self.model.signatureDefs = [sig]
        b = flatbuffers.Builder(1 << 16)
        b.Finish(self.model.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    def emit_node(self, n: Node) -> None:
        op = n.op
        if any(self.g.tensors[i].kind == "constant" for i in n.inputs):
            raise UnsupportedOpError(f"tflite-int8 cannot write op {op} with a constant operand ({n.name}); cut the "
                                     "model before it with --outputs (it then runs in float on the host) or use another "
                                     "target")
        if op in ("conv2d", "depthwise_conv2d"):
            self.conv(n)
        elif op == "linear":
            self.fully_connected(n)
        elif op in ("add", "mul"):
            self.binary(n)
        elif op == "concat":
            self.same_grid(n)
            o = S.ConcatenationOptionsT()
            o.axis = _NHWC_AXIS[n.attrs["axis"]] if len(self.g.tensors[n.outputs[0]].shape) == 4 else n.attrs["axis"]
            self.op(BO.CONCATENATION, [self.output(i) for i in n.inputs], [self.output(n.outputs[0])],
                    S.BuiltinOptions.ConcatenationOptions, o)
        elif op in ("relu", "relu6", "hardswish", "sigmoid"):
            code = {"relu": BO.RELU, "relu6": BO.RELU6, "hardswish": BO.HARD_SWISH, "sigmoid": BO.LOGISTIC}[op]
            if op == "sigmoid":
                self.fixed_grid(n)
            if op == "hardswish" and self.q:
                self.check_hardswish(n)
            self.op(code, [self.output(n.inputs[0])], [self.output(n.outputs[0])])
        elif op == "hardsigmoid":
            self.hardsigmoid(n)
        elif op in ("max_pool2d", "avg_pool2d"):
            self.pool(n)
        elif op == "global_avg_pool":
            self.mean(n)
        elif op == "pad":
            self.pad(n)
        elif op == "slice":
            self.strided_slice(n)
        elif op in ("flatten", "reshape"):
            self.same_grid(n)
            self.reshape(n.inputs[0], n.outputs[0])
        elif op == "resize" and n.attrs["mode"] == "nearest":
            self.resize_nearest(n)
        elif op == "transpose":
            self.same_grid(n)
            self.transpose(n)
        else:
            raise UnsupportedOpError(f"tflite-int8 cannot write op {op} ({n.name}); use another target for this model")

    def transpose(self, n: Node) -> None:
        """TRANSPOSE moves codes. The graph's perm reorders NCHW axes; a 4-D tensor is NHWC in the file, so
        the file's perm is the graph's seen through both layout changes: NHWC -> NCHW, perm, NCHW -> NHWC."""
        p = [int(v) for v in n.attrs["perm"]]
        if len(p) == 4:
            to_nchw, to_nhwc = (0, 3, 1, 2), (0, 2, 3, 1)
            p = [to_nchw[p[to_nhwc[i]]] for i in range(4)]
        self.op(BO.TRANSPOSE, [self.output(n.inputs[0]), self.const_i32(f"{n.name}/perm", p)],
                [self.output(n.outputs[0])])

    def resize_nearest(self, n: Node) -> None:
        """RESIZE_NEAREST_NEIGHBOR copies codes: input coordinate (x + 0.5 with half_pixel_centers) *
        step, floored, or rounded with align_corners, step = in / out in float32 (the graph's
        ``step``, or a ``scale`` whose reciprocal is that same float32 number)."""
        a, src = n.attrs, self.g.tensors[n.inputs[0]].shape
        flags = {("asymmetric", "floor"): (False, False), ("tf_half_pixel_for_nn", "floor"): (False, True),
                 ("align_corners", "round_prefer_ceil"): (True, False)}.get((a["coord"], a["nearest"]))
        steps = [np.float32(i - 1) / np.float32(o - 1) if flags == (True, False) and o > 1 else np.float32(i) / np.float32(o)
                 for i, o in zip(src[2:], a["size"], strict=True)]
        given = a.get("step") or [1.0 / np.float32(v) for v in a["scale"]]
        if flags is None or any(np.float32(g) != st for g, st in zip(given, steps, strict=True)):
            raise UnsupportedOpError(f"tflite-int8 cannot write nearest resize {n.name} (coordinates {a['coord']}, "
                                     f"rounding {a['nearest']}, ratio {given}): TFLite's kernel computes another "
                                     "source pixel; use onnx-qdq, or cut the model before it with --outputs")
        self.same_grid(n)
        o = S.ResizeNearestNeighborOptionsT()
        o.alignCorners, o.halfPixelCenters = flags
        size = self.const_i32(f"{n.outputs[0]}/size", list(a["size"]))
        self.op(BO.RESIZE_NEAREST_NEIGHBOR, [self.output(n.inputs[0]), size], [self.output(n.outputs[0])],
                S.BuiltinOptions.ResizeNearestNeighborOptions, o)

    # ---------------------------------------------------------------- weights
    def weights(self, n: Node, layout: tuple[int, ...], axis: int) -> tuple[int, int]:
        """Weight (transposed to ``layout``) and bias tensors: int8/int32 with their grids, or float32."""
        wt, bt = self.g.tensors[n.inputs[1]], self.g.tensors[n.inputs[2]]
        w = np.transpose(wt.data, layout) if layout else wt.data
        if not self.q:
            return (self.tensor(wt.name, w.shape, TT.FLOAT32, w.astype(np.float32)),
                    self.tensor(bt.name, bt.data.shape, TT.FLOAT32, bt.data.astype(np.float32)))
        if wt.quant.bits > 8 or np.any(wt.quant.zero_point != 0):
            raise TargetError(f"tflite-int8 stores symmetric weights of at most 8 bits; {wt.name} has "
                              f"{wt.quant.bits} bits; quantize with a profile of 8-bit (or fewer) weights")
        c = w.shape[axis]
        return (self.tensor(wt.name, w.shape, TT.INT8, w.astype(np.int8), wt.quant.scale, np.zeros(c, np.int64), axis),
                self.tensor(bt.name, bt.data.shape, TT.INT32, bt.data.astype(np.int32), bt.quant.scale,
                            np.zeros(c, np.int64), 0))

    def padding(self, src: str, x: int, kernel: list[int], stride: list[int], dilation: list[int],
                pads: list[int], value: str = "zero") -> tuple[int, int]:
        """(SAME or VALID, input tensor): torch's padding as TFLite's, an explicit PAD where SAME differs."""
        if not any(pads):
            return S.Padding.VALID, x
        t, l, b, r = pads
        shape = self.g.tensors[src].shape
        if all(same_padding(shape[2 + i], kernel[i], stride[i], dilation[i], (t, l)[i], (b, r)[i]) for i in (0, 1)):
            return S.Padding.SAME, x
        return S.Padding.VALID, self.explicit_pad(src, x, pads, value)

    def explicit_pad(self, src: str, x: int, pads: list[int], value: str) -> int:
        """PAD ``x`` spatially; ``value`` "zero" pads with the zero point (conv, average pool),
        "lowest" with the lowest code (max pool: the padding never wins)."""
        t, l, b, r = pads
        name = f"{src}/padded_{len(self.sg.tensors)}"
        n, c, h, w = self.g.tensors[src].shape
        xp = self.act_tensor(name, (n, h + t + b, w + l + r, c), src)
        paddings = self.const_i32(f"{name}/paddings", [[0, 0], [t, b], [l, r], [0, 0]])
        if value == "zero":
            self.op(BO.PAD, [x, paddings], [xp], S.BuiltinOptions.PadOptions, S.PadOptionsT())
            return xp
        v = self.scalar_on_grid(f"{name}/value", src, -128 if self.q else np.finfo(np.float32).min)
        self.op(BO.PADV2, [x, paddings, v], [xp], S.BuiltinOptions.PadV2Options, S.PadV2OptionsT())
        return xp

    def scalar_on_grid(self, name: str, src: str, value: float) -> int:
        """A constant scalar of ``src``'s type: an int8 code on its grid (PADV2 demands the
        output's scale and zero point), or a float32 value in the float file."""
        if self.q:
            s, z = i8_grid(self.qp(src))
            return self.tensor(name, (), TT.INT8, np.array(value, np.int8), s, z)
        return self.tensor(name, (), TT.FLOAT32, np.array(value, np.float32))

    def channel_pad(self, src: str, x: int, pads: list[int], values: list[float]) -> int:
        """PAD ``x`` spatially with one value per channel (a conv's ``pad_value``).

        PADV2 takes one scalar per tensor, so the channels are split, each padded with
        its own code, and concatenated again: codes are only moved, hence exact on every
        kernel set.
        """
        t, l, b, r = pads
        name = f"{src}/channel_padded_{len(self.sg.tensors)}"
        n, c, h, w = self.g.tensors[src].shape
        fills = pad_codes(values, self.qp(src)) - int8_container_offset(self.qp(src)) if self.q else values
        parts = [self.act_tensor(f"{name}/ch{k}", (n, h, w, 1), src) for k in range(c)]
        o = S.SplitOptionsT()
        o.numSplits = c
        self.op(BO.SPLIT, [self.const_i32(f"{name}/axis", 3), x], parts, S.BuiltinOptions.SplitOptions, o)
        paddings = self.const_i32(f"{name}/paddings", [[0, 0], [t, b], [l, r], [0, 0]])
        padded = []
        for k, (part, fill) in enumerate(zip(parts, fills, strict=True)):
            padded.append(self.act_tensor(f"{name}/ch{k}/padded", (n, h + t + b, w + l + r, 1), src))
            self.op(BO.PADV2, [part, paddings, self.scalar_on_grid(f"{name}/ch{k}/value", src, fill)], [padded[-1]],
                    S.BuiltinOptions.PadV2Options, S.PadV2OptionsT())
        xp = self.act_tensor(name, (n, h + t + b, w + l + r, c), src)
        o = S.ConcatenationOptionsT()
        o.axis = 3
        self.op(BO.CONCATENATION, padded, [xp], S.BuiltinOptions.ConcatenationOptions, o)
        return xp

    # -------------------------------------------------------------------- ops
    def conv(self, n: Node) -> None:
        a, src = n.attrs, n.inputs[0]
        cin = self.g.tensors[src].shape[1]
        o_ch, _, kh, kw = self.g.tensors[n.inputs[1]].shape
        depthwise = n.op == "depthwise_conv2d"
        if not depthwise and a["groups"] != 1:
            raise UnsupportedOpError(f"tflite-int8 cannot write grouped convolution {n.name} ({a['groups']} groups)")
        if "pad_value" in a and any(a["pads"]):  # SAME and PAD would pad with the zero point
            padding, x = S.Padding.VALID, self.channel_pad(src, self.output(src), a["pads"], a["pad_value"])
        else:
            padding, x = self.padding(src, self.output(src), [kh, kw], a["stride"], a["dilation"], a["pads"])
        if depthwise:
            w, b = self.weights(n, *WEIGHT_LAYOUT[n.op])  # [1, kh, kw, C*mult]
            o = S.DepthwiseConv2DOptionsT()
            o.depthMultiplier = o_ch // cin
            code, ot = BO.DEPTHWISE_CONV_2D, S.BuiltinOptions.DepthwiseConv2DOptions
        else:
            w, b = self.weights(n, *WEIGHT_LAYOUT[n.op])  # [O, kh, kw, I]
            o = S.Conv2DOptionsT()
            code, ot = BO.CONV_2D, S.BuiltinOptions.Conv2DOptions
        o.padding, o.strideH, o.strideW = padding, a["stride"][0], a["stride"][1]
        o.dilationHFactor, o.dilationWFactor = a["dilation"][0], a["dilation"][1]
        o.fusedActivationFunction = self.fused(n)
        self.op(code, [x, w, b], [self.output(n.outputs[0])], ot, o)

    def fully_connected(self, n: Node) -> None:
        w, b = self.weights(n, *WEIGHT_LAYOUT[n.op])
        o = S.FullyConnectedOptionsT()
        o.fusedActivationFunction = self.fused(n)
        self.op(BO.FULLY_CONNECTED, [self.output(n.inputs[0]), w, b], [self.output(n.outputs[0])],
                S.BuiltinOptions.FullyConnectedOptions, o)

    @staticmethod
    def fused(n: Node) -> int:
        return {"none": ACT.NONE, "relu": ACT.RELU, "relu6": ACT.RELU6}[n.attrs.get("activation", "none")]

    def binary(self, n: Node) -> None:
        ranks = {len(self.g.tensors[i].shape) for i in n.inputs}
        if len(ranks) != 1:
            raise UnsupportedOpError(f"tflite-int8 cannot write {n.op} {n.name} of tensors of different ranks "
                                     "(NHWC broadcasting differs from NCHW)")
        if n.op == "add":
            o, ot, code = S.AddOptionsT(), S.BuiltinOptions.AddOptions, BO.ADD
            o.fusedActivationFunction = self.fused(n)
        else:
            o, ot, code = S.MulOptionsT(), S.BuiltinOptions.MulOptions, BO.MUL
        self.op(code, [self.output(i) for i in n.inputs], [self.output(n.outputs[0])], ot, o)

    def check_hardswish(self, n: Node) -> None:
        s_in, s_out = (np.float32(self.qp(t).scale[0]) for t in (n.inputs[0], n.outputs[0]))
        if np.float32(1.0 / 128.0) * s_in / s_out >= 1.0:  # HardSwishPrepare requires a right shift
            raise TargetError(f"TFLite's int8 HARD_SWISH ({n.name}) needs an output scale above 1/128 of the input "
                              "scale; this graph's grids break that, use another target")

    def hardsigmoid(self, n: Node) -> None:
        """x/6 + 1/2 clamped to [0, 1] as a 1x1 depthwise conv (TFLite has no HARD_SIGMOID).

        The int8 file lands on LOGISTIC's grid, whose int8 range is the clamp; the float
        file clamps with RELU_N1_TO_1 then RELU. 2-D tensors run as (N, 1, 1, C) views.
        """
        self.fixed_grid(n)
        src, dst = n.inputs[0], n.outputs[0]
        shape = self.g.tensors[src].shape
        if len(shape) not in (2, 4):
            raise UnsupportedOpError(f"tflite-int8 writes hardsigmoid on 2-D or 4-D tensors only ({n.name})")
        c = shape[1]
        view = nhwc(shape) if len(shape) == 4 else (shape[0], 1, 1, c)
        x = self.output(src)
        if len(shape) == 2:
            x4 = self.act_tensor(f"{src}/as4d_{len(self.sg.tensors)}", view, src)
            self.reshape_op(x, x4, view)
            x = x4
        if self.q:
            code, w_scale, bias = hardsigmoid_as_depthwise(float(self.qp(src).scale[0]))
            s_in = np.float64(np.float32(self.qp(src).scale[0]))
            w = self.tensor(f"{n.name}/weight", (1, 1, 1, c), TT.INT8, np.full((1, 1, 1, c), code, np.int8),
                            np.full(c, w_scale), np.zeros(c, np.int64), 3)
            b = self.tensor(f"{n.name}/bias", (c,), TT.INT32, np.full(c, bias, np.int32),
                            np.full(c, np.float32(s_in * np.float64(w_scale))), np.zeros(c, np.int64), 0)
        else:
            w = self.tensor(f"{n.name}/weight", (1, 1, 1, c), TT.FLOAT32, np.full((1, 1, 1, c), 1 / 6, np.float32))
            b = self.tensor(f"{n.name}/bias", (c,), TT.FLOAT32, np.full(c, 0.5, np.float32))
        o = S.DepthwiseConv2DOptionsT()
        o.padding, o.strideH, o.strideW, o.depthMultiplier = S.Padding.VALID, 1, 1, 1
        o.fusedActivationFunction = ACT.RELU if self.q else ACT.RELU_N1_TO_1
        steps = [(BO.DEPTHWISE_CONV_2D, [w, b], S.BuiltinOptions.DepthwiseConv2DOptions, o)]
        if not self.q:
            steps.append((BO.RELU, [], 0, None))
        for k, (code_op, extra, ot, opt) in enumerate(steps):
            last = k == len(steps) - 1 and len(shape) == 4
            y = self.output(dst) if last else self.act_tensor(f"{dst}/step{k}", view, dst)
            self.op(code_op, [x, *extra], [y], ot, opt)
            x = y
        if len(shape) == 2:
            self.reshape_op(x, self.output(dst), shape)

    def pool(self, n: Node) -> None:
        a, src = n.attrs, n.inputs[0]
        self.same_grid(n)
        x, pads = self.output(src), list(a["pads"])
        if n.op == "max_pool2d":
            code = BO.MAX_POOL_2D
            padding, x = self.padding(src, x, a["kernel"], a["stride"], [1, 1], pads, value="lowest")
        elif not any(pads):
            code, padding = BO.AVERAGE_POOL_2D, S.Padding.VALID
        elif a["count_include_pad"]:  # the padding counts: PAD with the zero point, then VALID
            code, padding, x = BO.AVERAGE_POOL_2D, S.Padding.VALID, self.explicit_pad(src, x, pads, "zero")
        else:  # SAME averages the pixels inside only, as count_include_pad=False does
            code, padding, x = BO.AVERAGE_POOL_2D, *self.padding(src, x, a["kernel"], a["stride"], [1, 1], pads)
            if padding != S.Padding.SAME:
                raise UnsupportedOpError(
                    f"tflite-int8 cannot write average pool {n.name}: count_include_pad=False with padding TFLite's "
                    "SAME does not reproduce; use count_include_pad=True or pad explicitly")
        o = S.Pool2DOptionsT()
        o.padding, o.strideH, o.strideW = padding, a["stride"][0], a["stride"][1]
        o.filterHeight, o.filterWidth = a["kernel"][0], a["kernel"][1]
        self.op(code, [x], [self.output(n.outputs[0])], S.BuiltinOptions.Pool2DOptions, o)

    def mean(self, n: Node) -> None:
        """MEAN over H, W without kept dims (the reference and optimized kernels then agree), reshaped back."""
        src, dst = n.inputs[0], n.outputs[0]
        shape = self.g.tensors[dst].shape
        flat = self.act_tensor(f"{dst}/mean", (shape[0], shape[1]), dst)
        o = S.ReducerOptionsT()
        o.keepDims = False
        self.op(BO.MEAN, [self.output(src), self.const_i32(f"{n.name}/axes", [1, 2])], [flat],
                S.BuiltinOptions.ReducerOptions, o)
        self.reshape_op(flat, self.output(dst), nhwc(shape))

    def pad(self, n: Node) -> None:
        self.same_grid(n)
        shape = self.g.tensors[n.inputs[0]].shape
        rank, p = len(shape), n.attrs["pads"]
        pairs = [[p[d], p[rank + d]] for d in range(rank)]
        if rank == 4:
            pairs = [pairs[d] for d in (0, 2, 3, 1)]
        paddings = self.const_i32(f"{n.name}/paddings", pairs)
        self.op(BO.PAD, [self.output(n.inputs[0]), paddings], [self.output(n.outputs[0])],
                S.BuiltinOptions.PadOptions, S.PadOptionsT())

    def strided_slice(self, n: Node) -> None:
        self.same_grid(n)
        shape = self.g.tensors[n.inputs[0]].shape
        rank, a = len(shape), n.attrs
        begin, end, step = [0] * rank, list(shape), [1] * rank
        for ax, s, e, st in zip(a["axes"], a["starts"], a["ends"], a["steps"], strict=True):
            if ax % rank == 0:
                raise UnsupportedOpError(f"tflite-int8 does not slice the batch axis ({n.name})")
            begin[ax % rank], end[ax % rank], step[ax % rank] = s, min(e, shape[ax % rank]), st
        order = (0, 2, 3, 1) if rank == 4 else tuple(range(rank))
        o = S.StridedSliceOptionsT()
        o.beginMask = o.endMask = 1  # the batch axis whole, whatever the batch size
        ins = [self.output(n.inputs[0])] + [self.const_i32(f"{n.name}/{k}", [v[d] for d in order])
                                            for k, v in (("begin", begin), ("end", end), ("strides", step))]
        self.op(BO.STRIDED_SLICE, ins, [self.output(n.outputs[0])], S.BuiltinOptions.StridedSliceOptions, o)

    def reshape(self, src: str, dst: str) -> None:
        """NCHW reshape semantics on NHWC tensors: transpose around it unless the order is kept."""
        s_in, s_out = self.g.tensors[src].shape, self.g.tensors[dst].shape
        x = self.output(src)
        if not _memory_order_kept(s_in):
            nchw = self.act_tensor(f"{src}/nchw", s_in, src)
            self.op(BO.TRANSPOSE, [x, self.const_i32(f"{src}/to_nchw", [0, 3, 1, 2])], [nchw])
            x = nchw
        if _memory_order_kept(s_out):
            self.reshape_op(x, self.output(dst), nhwc(s_out))
            return
        y = self.act_tensor(f"{dst}/nchw", s_out, dst)
        self.reshape_op(x, y, s_out)
        self.op(BO.TRANSPOSE, [y, self.const_i32(f"{dst}/to_nhwc", [0, 2, 3, 1])], [self.output(dst)])

    def reshape_op(self, x: int, y: int, shape: tuple[int, ...]) -> None:
        new = [-1, *shape[1:]]  # any batch size
        o = S.ReshapeOptionsT()
        o.newShape = new
        self.op(BO.RESHAPE, [x, self.const_i32(f"{self.sg.tensors[y].name}/shape", new)], [y],
                S.BuiltinOptions.ReshapeOptions, o)


def build_model(g: QuantGraph, quantized: bool = True) -> bytes:
    """The int8 (or, with ``quantized=False``, the float32) TFLite flatbuffer of ``g``."""
    return _Emitter(g, quantized).build()


def interpreter(path: Path, threads: int = 1, kernels: str = "auto") -> Interpreter:
    """An ai-edge-litert interpreter, tensors allocated; ``kernels``: auto (XNNPACK), builtin, or reference.

    Whatever the runtime refuses (a file it cannot read, an op a kernel cannot prepare)
    becomes a one-line ``TargetError``.
    """
    if kernels not in KERNELS:
        raise TargetError(f"unknown TFLite kernel set {kernels!r}; choose one of: {', '.join(KERNELS)}")
    try:
        return _allocated(path, threads, kernels)
    except (RuntimeError, ValueError) as e:
        raise TargetError(f"ai-edge-litert ({kernels} kernels) refused {path}: {_one_line(e)}") from None


def open_interpreter(path: Path, threads: int = 1, kernels: str = "auto") -> tuple[Interpreter, str]:
    """``interpreter`` and the kernels it runs. "auto" falls back to TFLite's reference kernels where
    XNNPACK refuses the file (it rejects a conv or FC whose s_in * s_w / s_out is 256 or more) or
    leaves a requantizing op to the builtin kernels: XNNPACK and the builtins round differently, the
    optimized builtins are not bit-exact with the reference ones, and one kernel set end to end is
    what a simulation rule reproduces. It says so: "reference (XNNPACK refused: <reason>)"."""
    if kernels != "auto":
        return interpreter(path, threads, kernels), kernels
    try:
        it = _allocated(path, threads, kernels)
        left = sorted(_builtin_ops_run(it) & REQUANTIZING_OPS)
        if not left:
            return it, kernels
        refused = f"it left {', '.join(left)} to the builtin kernels"
    except (RuntimeError, ValueError) as e:
        refused = _one_line(e)
    it = interpreter(path, threads, "reference")  # the file itself is sound: TFLite's own kernels take it
    return it, f"reference (XNNPACK refused: {'; '.join([refused, *_xnnpack_scale_limit(path)])})"


def _builtin_ops_run(it: Interpreter) -> set[str]:
    """The ops the builtin kernels run beside XNNPACK: walking back from the outputs, a tensor a DELEGATE
    node writes comes from it (the interpreter still lists the nodes it replaced, before it)."""
    producer = {o: d for d in it._get_ops_details() for o in d["outputs"]}  # a DELEGATE, listed last, wins
    todo, seen, ran = [o["index"] for o in it.get_output_details()], set(), set()
    while todo:
        d = producer.get(todo.pop())
        if d is None or d["index"] in seen:
            continue
        seen.add(d["index"])
        ran.add(d["op_name"])
        todo.extend(i for i in d["inputs"] if i >= 0)
    return ran - {"DELEGATE"}


#: ops whose integer results differ between XNNPACK and TFLite's builtin kernels (rules xnnpack, tflite)
REQUANTIZING_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "MEAN"})


#: XNNPACK's limit on a conv or fully connected layer's requantization scale (float32 s_in * s_w / s_out)
XNNPACK_MAX_REQUANT_SCALE = np.float32(256.0)


def _xnnpack_scale_limit(path: Path) -> list[str]:
    """The layers of the int8 file at ``path`` whose requantization scale XNNPACK rejects (it does not say why)."""
    m = S.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    sg, codes = m.subgraphs[0], [c.builtinCode for c in m.operatorCodes]
    over = []
    for o in sg.operators:
        if codes[o.opcodeIndex] not in (BO.CONV_2D, BO.DEPTHWISE_CONV_2D, BO.FULLY_CONNECTED):
            continue
        x, w, y = (sg.tensors[i] for i in (o.inputs[0], o.inputs[1], o.outputs[0]))
        if any(t.quantization is None or t.quantization.scale is None for t in (x, w, y)):
            continue  # a float layer
        scale = (np.float32(x.quantization.scale[0]) * np.asarray(w.quantization.scale, np.float32)
                 / np.float32(y.quantization.scale[0])).max()
        if scale >= XNNPACK_MAX_REQUANT_SCALE:
            over.append(f"{y.name.decode()} has s_in * s_w / s_out = {scale:.4g}, XNNPACK takes < 256")
    return over


def _allocated(path: Path, threads: int, kernels: str) -> Interpreter:
    it = Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=KERNELS[kernels])
    it.allocate_tensors()
    return it


def _one_line(e: Exception) -> str:
    """The runtime's message on one line; its error reporter runs messages together ("...runtimeNode number 1")."""
    return re.sub(r"(?<=[a-z])(?=Node number)", "; ", " ".join(str(e).split())).rstrip(".") or type(e).__name__


def quantize_codes(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """int8 codes of float32 ``x``: float32 x / s rounded half away from zero, plus z, saturated; the
    rules' ``quantize`` in numpy (torch's thread pool would spin against XNNPACK's on every call)."""
    v = np.asarray(x, np.float32) / np.float32(scale)
    t = np.trunc(v)
    r = np.where(np.abs(v - t) >= 0.5, t + np.sign(v), t)
    return np.clip(r + zero_point, -128, 127).astype(np.int8)


def output_value(y: np.ndarray, dtype: Any, grid: tuple[float, int] | None) -> np.ndarray:
    """An output tensor as a runner returns it: int8 codes dequantized as ``simulate.dequantize`` does,
    4-D NHWC back to NCHW."""
    if dtype == np.int8 and grid is not None:
        s, z = grid
        y = (y.astype(np.int32) - z).astype(np.float32) * np.float32(s)
    return np.ascontiguousarray(np.transpose(y, (0, 3, 1, 2)) if y.ndim == 4 else y)


class TfliteRunner(Runner):
    """Float NCHW in, float (dequantized) NCHW out; the int8 input is quantized as the simulation does."""

    def __init__(self, path: Path, threads: int = 1, kernels: str = "auto") -> None:
        self.it, self.kernels = open_interpreter(path, threads, kernels)
        self.threads = threads
        self.rounding = "xnnpack" if self.kernels == "auto" else "tflite"  # builtin: the closest rule
        self.inp, self.outs = self.it.get_input_details()[0], self.it.get_output_details()

    def run(self, x: np.ndarray) -> Any:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 4:
            x = np.transpose(x, (0, 2, 3, 1))
        try:
            if tuple(self.inp["shape"]) != x.shape:
                self.it.resize_tensor_input(self.inp["index"], list(x.shape))
                self.it.allocate_tensors()
                self.inp, self.outs = self.it.get_input_details()[0], self.it.get_output_details()
            if self.inp["dtype"] == np.int8:
                x = quantize_codes(x, *self.inp["quantization"])
            self.it.set_tensor(self.inp["index"], np.ascontiguousarray(x, dtype=self.inp["dtype"]))
            self.it.invoke()
        except (RuntimeError, ValueError) as e:
            raise TargetError(f"ai-edge-litert ({self.kernels} kernels) failed on input {x.shape}: {_one_line(e)}") from None
        return pack([output_value(self.it.get_tensor(d["index"]), d["dtype"], d["quantization"]) for d in self.outs])


class TfliteInt8Target(Target):
    name = "tflite-int8"
    description = "TFLite int8 flatbuffer written directly (per-channel int8 weights, int8 activations), run on ai-edge-litert"
    runtime = "ai-edge-litert"
    rounding_rules = ("xnnpack", "tflite")  # XNNPACK by default, TFLite's reference kernels on request
    rules = TargetRules(
        rounding="xnnpack",
        shared_grid_ops=frozenset({"max_pool2d", "avg_pool2d", "pad", "slice", "flatten", "reshape", "concat",
                                   "transpose"}),
        fixed_grids={"sigmoid": UNIT_GRID, "hardsigmoid": UNIT_GRID},
        max_weight_bits=8, activation_bits=(8,))
    model_file = "model.tflite"
    float_model_file = "model_float.tflite"
    kernel_variants = ({}, {"kernels": "reference"})

    def emit(self, graph: QuantGraph, folder: Path, *, quantized: bool = True) -> list[Path]:
        path = Path(folder) / (self.model_file if quantized else self.float_model_file)
        path.write_bytes(build_model(graph, quantized))
        return [path]

    def load(self, folder: Path, *, float_model: bool = False, threads: int = 1, kernels: str = "auto") -> Runner:
        """``kernels``: "auto" (XNNPACK, the default; the reference kernels where XNNPACK refuses part of the file),
        "builtin" or "reference" (bit-exact with the simulation). The runner's ``kernels`` says which run."""
        return TfliteRunner(Path(folder) / (self.float_model_file if float_model else self.model_file), threads, kernels)

    def runtime_versions(self) -> dict[str, str]:
        return {"ai-edge-litert": version("ai-edge-litert"), "flatbuffers": version("flatbuffers")}

    def io_contract(self, graph: QuantGraph) -> dict[str, dict[str, Any]]:
        """int8 NHWC tensors holding codes: firmware quantizes and dequantizes itself, with the
        int8 zero point (the graph's minus 128 for an unsigned grid, e.g. -128 for pixels)."""
        def one(t: str) -> dict[str, Any]:
            s, z = i8_grid(graph.tensors[t].quant)
            return io_tensor(t, nhwc(graph.tensors[t].shape), "NHWC", "int8",
                             (s, z, "int8", "codes in the tensor"), rounding="half away from zero")

        outs = [one(t) for t in graph.outputs]
        return {"input": one(graph.inputs[0]), "output": outs[0], "outputs": outs}

    def read_back_mismatches(self, folder: Path, graph: QuantGraph) -> list[str]:
        return read_back_mismatches(S.ModelT.InitFromPackedBuf((Path(folder) / self.model_file).read_bytes(), 0), graph)

    def inspect(self, folder: Path) -> dict:
        """The ops (and their versions) and tensors the integer file holds, and the kernels ``load`` runs it on."""
        path = Path(folder) / self.model_file
        it, kernels = open_interpreter(path)  # as ``load`` runs it (and a TargetError if the runtime refuses it)
        m = S.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
        sg = m.subgraphs[0]
        codes = [(OP_NAMES.get(c.builtinCode, str(c.builtinCode)), c.version) for c in m.operatorCodes]
        ops = Counter(codes[o.opcodeIndex][0] for o in sg.operators)
        types = Counter(_TYPE_NAMES.get(t.type, str(t.type)) for t in sg.tensors)
        details = it._get_ops_details()  # XNNPACK's partitions show as DELEGATE nodes
        return {"runtime_ops": dict(sorted(ops.items())), "op_versions": dict(sorted(codes)),
                "tensors": len(sg.tensors), "tensor_types": dict(sorted(types.items())), "file_bytes": path.stat().st_size,
                "kernels": kernels, "xnnpack_partitions": sum(d["op_name"] == "DELEGATE" for d in details)}


# ------------------------------------------------ the rules TFLite's kernels follow
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
#: the least float64 that rounds to float32 inf (float32 max plus half its last step: the tie goes to even, inf)
_F32_ROUNDS_TO_INF = float(np.finfo(np.float32).max) + 2.0**103
#: a float64 exp argument safely below float64's overflow (709.78), far past float32's (88.72)
_F64_EXP_ARG_MAX = 700.0


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """``std::round`` (TfLiteRound): ties away from zero, exact for any float."""
    t = torch.trunc(v)
    return torch.where((v - t).abs() >= 0.5, t + torch.sign(v), t)


def quantize_multiplier(m: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """``tflite::QuantizeMultiplier``: real multipliers -> (Q31 multiplier, shift), int64 arrays."""
    mant, shift = np.frexp(np.asarray(m, dtype=np.float64))
    q = np.sign(mant) * np.floor(np.abs(mant) * 2.0**31 + 0.5)
    top = q == 2.0**31
    q, shift = np.where(top, q / 2, q), np.where(top, shift + 1, shift)
    tiny = shift < -31
    return np.where(tiny, 0, q).astype(np.int64), np.where(tiny, 0, shift).astype(np.int64)


def srdhm(a: torch.Tensor, b: torch.Tensor | int, bits: int = 32) -> torch.Tensor:
    """gemmlowp SaturatingRoundingDoublingHighMul on int64 tensors holding int32 (or int16) values."""
    lo = -(2 ** (bits - 1))
    ab = a * b
    half = 1 << (bits - 2)
    r = torch.div(ab + torch.where(ab >= 0, half, 1 - half), 2 * half, rounding_mode="trunc")
    return torch.where((a == lo) & (torch.as_tensor(b) == lo), -lo - 1, r)


def rounding_divide_by_pot(x: torch.Tensor, e: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp RoundingDivideByPOT: x / 2**e rounded half away from zero."""
    e = torch.as_tensor(e, dtype=torch.int64)
    mask = (1 << e) - 1
    threshold = (mask >> 1) + (x < 0).long()
    return (x >> e) + ((x & mask) > threshold).long()


def multiply_by_quantized_multiplier(x: torch.Tensor, q: torch.Tensor | int, shift: torch.Tensor | int) -> torch.Tensor:
    """``tflite::MultiplyByQuantizedMultiplier`` (double rounding, as the ai-edge-litert wheels are built)."""
    shift = torch.as_tensor(shift, dtype=torch.int64)
    left, right = shift.clamp(min=0), (-shift).clamp(min=0)
    return rounding_divide_by_pot(srdhm(x * (1 << left), torch.as_tensor(q, dtype=torch.int64)), right)


def real_multiplier(s_in: float, s_w: np.ndarray, s_out: float) -> np.ndarray:
    """double(s_in) * double(s_w) / double(s_out) of the float32 scales, as TFLite's conv and FC prepare it."""
    return np.float64(np.float32(s_in)) * np.asarray(s_w, np.float32).astype(np.float64) / np.float64(np.float32(s_out))


def int8_container_offset(qp: QParams) -> int:
    """TFLite holds every 8-bit activation as int8: an unsigned grid's codes shift by -128."""
    return 0 if qp.signed else 2 ** (qp.bits - 1)


def hardsigmoid_as_depthwise(s_in: float) -> tuple[int, np.float32, int]:
    """TFLite has no HARD_SIGMOID: x/6 + 1/2 runs as a 1x1 depthwise conv with these
    (weight code, weight scale, int32 bias); the target writes them, the simulation runs them."""
    s_in = np.float64(np.float32(s_in))
    # weight code 127 for 1/6 where the bias of 1/2 fits int32 (with room for the products); a tiny input
    # grid needs a coarser weight scale, and then x/6 is far below the output's 1/256 anyway
    w_scale = np.float32(max(1.0 / (6 * 127), 0.5 / (s_in * 2.0**30)))
    w = int(np.clip(np.round(1.0 / (6 * np.float64(w_scale))), 0, 127))
    return w, w_scale, int(np.round(0.5 / (s_in * np.float64(w_scale))))


class TfliteRule(RoundingRule):
    """TFLite int8 kernels (ai-edge-litert): Q31 fixed-point multipliers, ties away from zero.

    Conv and depthwise requantise with ``MultiplyByQuantizedMultiplier`` of
    double(s_in) * double(s_w) / double(s_out), fully connected (reference kernel) with
    that multiplier in double and std::round; ADD, MUL, MEAN, AVERAGE_POOL_2D,
    RELU/RELU6, HARD_SWISH and LOGISTIC follow their own reference kernels
    (``integer_op``), which work on int8 containers. ``multiplier`` returns the quantized
    multiplier as the float64 value q * 2**(shift - 31), which holds both exactly.
    """

    name = "tflite"

    def round(self, v: torch.Tensor) -> torch.Tensor:
        return round_half_away(v)

    def multiplier(self, s_in: np.ndarray, s_w: np.ndarray, s_out: np.ndarray) -> torch.Tensor:
        q, shift = quantize_multiplier(real_multiplier(s_in, s_w, s_out))
        return torch.from_numpy(np.ldexp(q.astype(np.float64), shift - 31))

    def requantize(self, acc: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
        mant, e = torch.frexp(mult)
        return multiply_by_quantized_multiplier(acc.long(), (mant * 2.0**31).long(), e.long()).double()

    def requantize_node(self, n: Node, acc: torch.Tensor, s_in: np.ndarray, s_w: np.ndarray,
                        s_out: np.ndarray) -> torch.Tensor:
        """FULLY_CONNECTED's reference kernel rescales in double: round(acc * s_in * s_w / s_out)."""
        if n.op != "linear":
            return super().requantize_node(n, acc, s_in, s_w, s_out)
        m = torch.from_numpy(real_multiplier(s_in, s_w, s_out))
        return round_half_away(acc.double() * m.reshape((1, -1) + (1,) * (acc.dim() - 2)))

    def quantize(self, x: torch.Tensor, qp: QParams) -> torch.Tensor:
        s = torch.tensor(float(qp.scale[0]), dtype=torch.float32)
        q = round_half_away(x.float() / s) + float(qp.zero_point[0])
        return q.clamp(qp.qmin, qp.qmax).double()

    def integer_op(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor | None:
        kernel = {"add": self._add, "mul": self._mul, "relu": self._relu, "relu6": self._relu,
                  "global_avg_pool": self._global_avg_pool, "avg_pool2d": self._avg_pool2d, "hardswish": self._hardswish,
                  "sigmoid": self._sigmoid, "hardsigmoid": self._hardsigmoid}.get(n.op)
        if kernel is None:
            return None
        y = kernel(n, [x.long() for x in xs], qps, out)
        return None if y is None else y.clamp(out.qmin, out.qmax).double()

    # the kernels: int64 codes on the graph's grids in, int64 codes out (clamped by the caller)
    @staticmethod
    def _scalar_multiplier(m: float) -> tuple[int, int]:
        q, shift = quantize_multiplier(m)
        return int(q), int(shift)

    def _add(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor:
        s1, s2, so = (float(np.float32(p.scale[0])) for p in (*qps, out))
        twice_max = 2.0 * max(s1, s2)
        acc = 0
        for x, qp, s in zip(xs, qps, (s1, s2), strict=True):
            q, shift = self._scalar_multiplier(s / twice_max)
            acc = acc + rounding_divide_by_pot(srdhm((x - int(qp.zero_point[0])) * (1 << 20), q), -shift)
        q, shift = self._scalar_multiplier(twice_max / (2.0**20 * so))
        return rounding_divide_by_pot(srdhm(acc, q), -shift) + int(out.zero_point[0])

    def _mul(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor:
        m = np.float32(qps[0].scale[0]) * np.float32(qps[1].scale[0]) / np.float32(out.scale[0])  # float, as mul.cc
        q, shift = self._scalar_multiplier(float(m))
        prod = (xs[0] - int(qps[0].zero_point[0])) * (xs[1] - int(qps[1].zero_point[0]))
        return multiply_by_quantized_multiplier(prod, q, shift) + int(out.zero_point[0])

    def _relu(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor:
        q, shift = self._scalar_multiplier(float(np.float32(qps[0].scale[0]) / np.float32(out.scale[0])))
        y = multiply_by_quantized_multiplier(xs[0] - int(qps[0].zero_point[0]), q, shift) + int(out.zero_point[0])
        lo, hi = activation_bounds(n.op, out, self)
        return y.clamp(int(lo), int(hi))

    def _global_avg_pool(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor:
        """reference_ops::QuantizedMeanOrSum: the 1/N folds into the multiplier."""
        count = xs[0].shape[2] * xs[0].shape[3]
        q, shift = self._scalar_multiplier(float(np.float32(qps[0].scale[0])) / float(np.float32(out.scale[0])))
        k = min(count.bit_length() - 1, 32, 31 + shift)
        q, shift = (q << k) // count, shift - k
        acc = (xs[0] - int(qps[0].zero_point[0])).sum((2, 3), keepdim=True)
        return multiply_by_quantized_multiplier(acc, q, shift) + int(out.zero_point[0])

    def _avg_pool2d(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor | None:
        """reference_integer_ops::AveragePool on int8 codes; padding either skipped (SAME) or the zero point."""
        if not same_grid(qps[0], out):
            return None
        off, a = int8_container_offset(out), n.attrs
        x = (xs[0] - off).double()
        t, l, b, r = a["pads"]
        if a["count_include_pad"]:  # an explicit PAD with the zero point, then a VALID pool
            x, pad = F.pad(x, (l, r, t, b), value=float(out.zero_point[0] - off)), (0, 0)
        elif (t, l) == (b, r):  # SAME: the pixels outside do not count
            pad = (t, l)
        else:
            return None
        total = F.avg_pool2d(x, a["kernel"], a["stride"], pad, divisor_override=1)
        count = F.avg_pool2d(torch.ones_like(x[:1, :1]), a["kernel"], a["stride"], pad, divisor_override=1)
        acc, count = total.long(), count.long()
        y = torch.sign(acc) * torch.div(acc.abs() + count // 2, count, rounding_mode="floor")
        return y + off

    def _hardswish(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor:
        """reference_ops::HardSwish: int16 fixed point."""
        hires = np.float32(1.0 / 128.0) * np.float32(qps[0].scale[0])
        q_out, e_out = self._scalar_multiplier(float(hires / np.float32(out.scale[0])))
        q_relu, e_relu = self._scalar_multiplier(float(hires / np.float32(3.0 / 32768.0)))
        m_out, m_relu = _downscale_to_int16(q_out), _downscale_to_int16(q_relu)
        x = (xs[0] - int(qps[0].zero_point[0])) * 128
        pre_out = srdhm(x, m_out, 16)
        relu = x
        if e_relu > 0:
            relu = (relu * (1 << (e_relu - 1))).clamp(-32768, 32767)
        relu = srdhm(relu, m_relu, 16)
        if e_relu > 0:
            relu = (relu * 2).clamp(-32768, 32767)
        if e_relu < 0:
            relu = rounding_divide_by_pot(relu, -e_relu)
        relu = (relu + 32768) >> 1
        prod = relu * pre_out
        y = torch.where((relu == -32768) & (pre_out == -32768), 32767, torch.div(prod, 1 << 15, rounding_mode="trunc"))
        return rounding_divide_by_pot(y, -e_out) + int(out.zero_point[0])

    def _sigmoid(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor:
        """LOGISTIC's 256-entry table, built in float32 as LUTPopulate does."""
        qi, off_in, off_out = qps[0], int8_container_offset(qps[0]), int8_container_offset(out)
        v = np.arange(-128, 128)
        deq = np.float32(qi.scale[0]) * (v - (int(qi.zero_point[0]) - off_in)).astype(np.float32)
        # float32's exp(-x) is inf beyond x = -88.72, and 1 / (1 + inf) is 0: say so, rather than let the
        # float64 exp (beyond -709.78) or its float32 cast overflow
        e64 = np.exp(np.minimum(-deq.astype(np.float64), _F64_EXP_ARG_MAX))
        inf = e64 >= _F32_ROUNDS_TO_INF
        e = np.where(inf, 0.0, e64).astype(np.float32)
        y = np.where(inf, np.float32(0.0), np.float32(1.0) / (np.float32(1.0) + e))
        r = round_half_away(torch.from_numpy(y * (np.float32(1.0) / np.float32(out.scale[0])))).numpy()
        table = torch.from_numpy(np.clip(r + (int(out.zero_point[0]) - off_out), -128, 127).astype(np.int64))
        return table[xs[0] - off_in + 128] + off_out

    def _hardsigmoid(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor:
        """The 1x1 depthwise conv of ``hardsigmoid_as_depthwise`` with a fused RELU."""
        w, w_scale, bias = hardsigmoid_as_depthwise(float(qps[0].scale[0]))
        acc = (xs[0] - int(qps[0].zero_point[0])) * w + bias
        y = self.requantize_node(n, acc.double(), qps[0].scale[0], np.array([w_scale]), out.scale[0]).long()
        return (y + int(out.zero_point[0])).clamp(min=int(out.zero_point[0]))


class XnnpackRule(TfliteRule):
    """TFLite's default CPU path: the XNNPACK delegate (x86-64) on the ops it takes.

    Conv, depthwise, fully connected and MUL requantise in float32: rne(f32(acc) *
    f32(f32(s_in * s_w) / s_out)), ties to even, where the reference kernels use Q31
    fixed point and ties away from zero. ADD is fixed point with one rounding: both
    inputs' scale ratios become 21-bit multipliers of a common shift and the sum is
    rounded half up. MEAN sums in int32 and rescales in float32. Ops XNNPACK leaves to
    the builtin kernels (and the input quantization) follow ``TfliteRule``.
    """

    name = "xnnpack"

    def requantize_node(self, n: Node, acc: torch.Tensor, s_in: np.ndarray, s_w: np.ndarray,
                        s_out: np.ndarray) -> torch.Tensor:
        mult = FloatHalfEvenRule.multiplier(self, s_in, s_w, s_out)
        return FloatHalfEvenRule.requantize(self, acc, mult.reshape((1, -1) + (1,) * (acc.dim() - 2)))

    def integer_op(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor | None:
        kernel = {"add": self._xnn_add, "mul": self._xnn_mul, "global_avg_pool": self._xnn_mean}.get(n.op)
        if n.op == "add" and not all(2.0**-10 <= np.float32(qp.scale[0]) / np.float32(out.scale[0]) < 2.0**8 for qp in qps):
            kernel = None  # outside the scale ratios XNNPACK's add takes: the builtin kernel runs it
        if kernel is None:
            return super().integer_op(n, xs, qps, out)
        return kernel([x.long() for x in xs], qps, out).clamp(out.qmin, out.qmax).double()

    @staticmethod
    def _xnn_add(xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor:
        """xnn_qs8_vadd: multipliers lrintf(ratio * 2**shift) with shift = 20 - floor(log2(max ratio)),
        acc = sum of (x - z) * multiplier + 2**(shift - 1), arithmetic shift right."""
        so = np.float32(out.scale[0])
        ratios = [np.float32(np.float32(qp.scale[0]) / so) for qp in qps]
        shift = 20 - (int(np.frexp(max(abs(r) for r in ratios))[1]) - 1)
        acc = torch.full_like(xs[0], 1 << (shift - 1))
        for x, qp, r in zip(xs, qps, ratios, strict=True):
            acc = acc + (x - int(qp.zero_point[0])) * int(np.rint(np.float32(np.ldexp(r, shift))))
        return (acc >> shift) + int(out.zero_point[0])

    @staticmethod
    def _xnn_mul(xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor:
        """xnn_qs8_vmul (fp32): the exact integer product times f32(f32(s_a * s_b) / s_out), ties to even."""
        m = np.float32(np.float32(qps[0].scale[0]) * np.float32(qps[1].scale[0])) / np.float32(out.scale[0])
        prod = ((xs[0] - int(qps[0].zero_point[0])) * (xs[1] - int(qps[1].zero_point[0]))).float()
        return torch.round(prod * torch.tensor(m, dtype=torch.float32)).long() + int(out.zero_point[0])

    @staticmethod
    def _xnn_mean(xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor:
        """xnn_qs8 mean over H, W: the int32 sum less N * z_in, times f32(s_in / s_out / N), ties to even."""
        count = xs[0].shape[2] * xs[0].shape[3]
        m = np.float32(np.float32(qps[0].scale[0]) / np.float32(out.scale[0])) / np.float32(count)
        acc = (xs[0].sum((2, 3), keepdim=True) - int(qps[0].zero_point[0]) * count).float()
        return torch.round(acc * torch.tensor(m, dtype=torch.float32)).long() + int(out.zero_point[0])


def _downscale_to_int16(q: int) -> int:
    """``DownScaleInt32ToInt16Multiplier``."""
    return 32767 if q >= _I32_MAX - (1 << 15) else (q + (1 << 15)) >> 16


register_rule(TfliteRule())
register_rule(XnnpackRule())
