"""Target ``onnx-qdq``: QuantizeLinear/DequantizeLinear ONNX built with ``onnx.helper``.

Layout chosen so onnxruntime fuses integer kernels (QLinearConv, QGemm, QLinearAdd):
every activation is stored as uint8 (a signed grid with zero point z becomes uint8
with z + 128, the same real values), weights are int8 initializers with per-channel
scales (``axis=0``) and bias int32 initializers, so no optimisation pass can
re-quantize float weights. Ops that only move codes (pads, slices, max pools,
flatten, reshape) run on the uint8 tensor itself, without a DQ/Q pair around them. A conv
that pads with a value per channel (``pad_value``: the mean pixel of a folded input
normalisation) gets its padding the same way, as Split, a Pad per channel and Concat on the
codes, since Pad takes one scalar and Conv pads with zero only.
onnxruntime also fuses DQ -> Add/Mul/AveragePool/GlobalAveragePool -> Q into QLinear* kernels
whose rounding differs from DQ -> float op -> Q at ties: the rounding rule ``onnxruntime``
reproduces them.

On x86-64 without VNNI, onnxruntime's uint8 x int8 GEMM (QLinearConv, QGemm) adds each two
adjacent products in int16 with saturation (VPMADDUBSW), so a conv or linear layer whose weights
hold two large values of one output channel can clip its accumulator (``u8s8_may_saturate``).
The onnx-qdq file stores such a layer's weights as uint8 with zero point 128 (the same integers):
onnxruntime then runs its uint8 x uint8 kernels, which widen the codes to int16 before multiplying
and so accumulate exactly, as the simulation does.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from eptq_deploy.errors import UnsupportedOpError
from eptq_deploy.float_exec import pack
from eptq_deploy.graph import Node, QParams, QuantGraph, TargetRules, moves_codes
from eptq_deploy.simulate import FloatHalfEvenRule, pad_codes, register_rule

from . import Runner, Target, io_tensor, same_float32

OPSET = 17
IR_VERSION = 8
#: the model file's output tensor (the input keeps the graph input's name)
OUTPUT_NAME = "output"
#: largest uint8 activation code, and the int16 bound of VPMADDUBSW's pair sums
_U8_MAX, _I16_MAX = 255, 2**15 - 1


def u8_grid(qp: QParams) -> tuple[float, int]:
    """(scale, uint8 zero point) of an activation grid in the uint8 container."""
    return float(qp.scale[0]), int(qp.zero_point[0]) + uint8_container_offset(qp)


def u8s8_may_saturate(g: QuantGraph, n: Node) -> bool:
    """Whether onnxruntime's uint8 x int8 kernels could clip weighted node ``n``'s accumulator.

    Without VNNI, MLAS (QLinearConv, QGemm) multiplies uint8 activation codes (zero point
    not yet subtracted, so up to 255) by int8 weights with VPMADDUBSW, which adds each two
    adjacent products of one output channel in int16 with saturation; which two weights
    meet depends on the kernel's packing, so the bound takes the two largest magnitudes of
    each output channel: 255 * (|w1| + |w2|) beyond 32767 can clip (8-bit weights nearly
    always can, 7 bits or fewer never). A depthwise conv (one output per group) runs MLAS's
    depthwise kernel, which widens to int16 before multiplying: exact.
    """
    w = g.tensors[n.inputs[1]].data
    if n.op == "depthwise_conv2d" and w.shape[0] == n.attrs["groups"]:
        return False
    mag = np.abs(w.astype(np.int64)).reshape(w.shape[0], -1)
    if mag.shape[1] < 2:
        return False
    top2 = np.sort(mag, axis=1)[:, -2:].sum(axis=1)
    return bool(_U8_MAX * int(top2.max()) > _I16_MAX)


class QdqEmitter:
    """Writes the graph as float ONNX ops between quantizers. This class writes QuantizeLinear and
    DequantizeLinear; another quantizer format (the IMX500's ``mct_quantizers`` ops) overrides the
    methods that place them: ``quantize``, ``float_in``, ``round_to_grid``, ``weight``, ``pad_fill``,
    ``channel_fills``, ``output`` and ``model``."""

    def __init__(self, g: QuantGraph, quantized: bool, u8_weights_where_saturating: bool = False) -> None:
        self.g = g
        self.q = quantized
        self.u8_weights = u8_weights_where_saturating
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.dq_count: Counter[str] = Counter()
        self.grid_inits: dict[str, tuple[str, str]] = {}

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))

    # ---------------------------------------------------------------- grids
    def grid(self, t: str) -> tuple[str, str]:
        """Scale and uint8 zero-point initializers of activation ``t`` (one pair per tensor)."""
        if t not in self.grid_inits:
            s, z = u8_grid(self.g.tensors[t].quant)
            self.grid_inits[t] = (self.init(f"{t}.scale", np.array(s, np.float32)),
                                  self.init(f"{t}.zero_point", np.array(z, np.uint8)))
        return self.grid_inits[t]

    def quantize(self, src: str, t: str) -> str:
        s, z = self.grid(t)
        self.node("QuantizeLinear", [src, s, z], [f"{t}.q"], f"Q_{t}")
        return f"{t}.q"

    def float_in(self, t: str, codes: str | None = None) -> str:
        """Float view of activation ``t`` for one consumer (a DQ each, as ORT's QDQ fusion wants);
        ``codes``: a tensor of codes on ``t``'s grid to read instead of ``t``'s own."""
        if not self.q:
            return codes or t
        k = self.dq_count[t]
        self.dq_count[t] += 1
        s, z = self.grid(t)
        out = f"{t}.dq{k}"
        self.node("DequantizeLinear", [codes or f"{t}.q", s, z], [out], f"DQ_{t}_{k}")
        return out

    def conv_input(self, n: Node) -> tuple[str, list[int]]:
        """Float input of conv ``n`` and the pads left to Conv, which pads with zero only.

        A per-channel ``pad_value`` is applied before the conv on the codes (or floats): Pad
        takes one scalar, so each channel is padded alone and the channels concatenated
        again. Codes are only moved, so it is exact, and DQ -> Conv -> Q still fuses.
        """
        x, pads, values = n.inputs[0], n.attrs["pads"], n.attrs.get("pad_value")
        if values is None or not any(pads):
            return self.float_in(x), pads
        tag, qp = f"{n.outputs[0]}.input_pad", self.g.tensors[x].quant
        fills, src = (self.channel_fills(values, qp), f"{x}.q") if self.q else (np.asarray(values, np.float32), x)
        parts = [f"{tag}.ch{c}" for c in range(len(fills))]
        self.node("Split", [src, self.init(f"{tag}.split", np.ones(len(fills), np.int64))], parts, f"Split_{tag}", axis=1)
        t, l, b, r = pads
        onnx_pads = self.init(f"{tag}.pads", np.array([0, 0, t, l, 0, 0, b, r], np.int64))
        for c, (part, fill) in enumerate(zip(parts, fills, strict=True)):
            self.node("Pad", [part, onnx_pads, self.init(f"{tag}.value{c}", fill)], [f"{part}.padded"],
                      f"Pad_{tag}_{c}", mode="constant")
        self.node("Concat", [f"{p}.padded" for p in parts], [tag], f"Concat_{tag}", axis=1)
        return self.float_in(x, codes=tag), [0, 0, 0, 0]

    def channel_fills(self, values: list[float], qp: QParams) -> np.ndarray:
        """Per-channel padding values as the quantized tensor holds them: codes in the uint8 container."""
        return (pad_codes(values, qp) + u8_grid(qp)[1] - int(qp.zero_point[0])).astype(np.uint8)

    def round_to_grid(self, src: str, t: str, tag: str) -> str:
        """``src`` rounded onto activation ``t``'s grid and read back as float (named after ``tag``)."""
        s, z = self.grid(t)
        self.node("QuantizeLinear", [src, s, z], [f"{tag}.q"], f"Q_{tag}")
        self.node("DequantizeLinear", [f"{tag}.q", s, z], [f"{tag}.dq"], f"DQ_{tag}")
        return f"{tag}.dq"

    def pad_fill(self, t: str) -> np.ndarray:
        """What a Pad on quantized tensor ``t`` fills with: real zero's code in the uint8 container."""
        return np.array(u8_grid(self.g.tensors[t].quant)[1], np.uint8)

    def output(self, t: str, name: str) -> None:
        """Graph output ``name`` from quantized tensor ``t``: dequantized to float."""
        s, z = self.grid(t)
        self.node("DequantizeLinear", [f"{t}.q", s, z], [name], f"DQ_{name}")

    def model(self, graph: onnx.GraphProto) -> onnx.ModelProto:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="eptq-deploy")
        model.ir_version = IR_VERSION
        return model

    def finish(self, src: str, t: str) -> None:
        """Route float result ``src`` to activation ``t`` (quantize it in the QDQ graph)."""
        if self.q:
            self.quantize(src, t)
        else:
            self.node("Identity", [src], [t], f"Id_{t}")

    def weight(self, n: Node) -> tuple[str, str]:
        wt, bt = self.g.tensors[n.inputs[1]], self.g.tensors[n.inputs[2]]
        if not self.q:
            return self.init(wt.name, wt.data.astype(np.float32)), self.init(bt.name, bt.data.astype(np.float32))
        c = wt.data.shape[0]
        if self.u8_weights and u8s8_may_saturate(self.g, n):  # the same integers, run by the exact u8u8 kernels
            w = self.init(f"{wt.name}.int", (wt.data.astype(np.int16) + 128).astype(np.uint8))
            wz = self.init(f"{wt.name}.zero_point", np.full(c, 128, np.uint8))
        else:
            w = self.init(f"{wt.name}.int", wt.data.astype(np.int8))
            wz = self.init(f"{wt.name}.zero_point", np.zeros(c, np.int8))
        ws = self.init(f"{wt.name}.scale", wt.quant.scale.astype(np.float32))
        self.node("DequantizeLinear", [w, ws, wz], [f"{wt.name}.dq"], f"DQ_{wt.name}", axis=0)
        b = self.init(f"{bt.name}.int", bt.data.astype(np.int32))
        bs = self.init(f"{bt.name}.scale", bt.quant.scale.astype(np.float32))
        bz = self.init(f"{bt.name}.zero_point", np.zeros(c, np.int32))
        self.node("DequantizeLinear", [b, bs, bz], [f"{bt.name}.dq"], f"DQ_{bt.name}", axis=0)
        return f"{wt.name}.dq", f"{bt.name}.dq"

    def activation(self, src: str, n: Node, out: str) -> str:
        """Fused ReLU/ReLU6 as float ops before the Q (ORT folds them into the integer kernel)."""
        act = n.attrs.get("activation", "none")
        if act == "none":
            return src
        r = f"{out}.relu"
        self.node("Relu", [src], [r], f"Relu_{out}")
        if act == "relu6" and not self._clip_redundant(out):
            if self.q:  # clip on the grid: Q, DQ, Clip, Q again - exact, and the conv still fuses
                r = self.round_to_grid(r, out, f"{out}.pre6")
            lo, hi = self.init(f"{out}.clip_lo", np.array(0.0, np.float32)), self.init(f"{out}.clip_hi", np.array(6.0, np.float32))
            self.node("Clip", [r, lo, hi], [f"{out}.relu6"], f"Clip_{out}")
            r = f"{out}.relu6"
        return r

    def _clip_redundant(self, out: str) -> bool:
        if not self.q:
            return False
        qp = self.g.tensors[out].quant
        return (qp.qmax - int(qp.zero_point[0])) * float(qp.scale[0]) <= 6.0

    # ----------------------------------------------------------------- build
    def build(self) -> onnx.ModelProto:
        g = self.g
        x = g.inputs[0]
        if self.q:
            self.quantize(x, x)
        for n in g.nodes:
            self.emit_node(n)
        names = output_names(g)
        for out, name in zip(g.outputs, names, strict=True):
            if self.q:
                self.output(out, name)
            else:
                self.node("Identity", [out], [name], f"Id_{name}")
        inp = g.tensors[x].shape
        graph = helper.make_graph(
            self.nodes, "eptq_deploy_" + ("qdq" if self.q else "float"),
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", *inp[1:]])],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *g.tensors[out].shape[1:]])
             for out, name in zip(g.outputs, names, strict=True)],
            self.inits,
        )
        model = self.model(graph)
        onnx.checker.check_model(model)
        return model

    def emit_node(self, n: Node) -> None:
        op, a, out = n.op, n.attrs, n.outputs[0]
        T = self.g.tensors
        if any(T[i].kind == "constant" for i in n.inputs):
            raise UnsupportedOpError(f"the QDQ ONNX writer (onnx-qdq, openvino-ir) cannot write op {op} with a constant "
                                     f"operand ({n.name}): no measured integer kernel for it; cut the model before it "
                                     "with --outputs (it then runs in float on the host) or use another target")
        same_grid = self.q and (moves_codes(n) or (op == "concat" and all(
            u8_grid(T[i].quant) == u8_grid(T[out].quant) for i in n.inputs)))
        if same_grid:  # move uint8 codes directly
            ins = [f"{i}.q" for i in n.inputs]
            self.code_op(n, ins, f"{out}.q")
            return
        if not self.q and (moves_codes(n) or op == "concat"):
            self.code_op(n, list(n.inputs), out)
            return
        if op in ("conv2d", "depthwise_conv2d"):
            w, b = self.weight(n)
            k = list(T[n.inputs[1]].shape[2:])
            src, pads = self.conv_input(n)
            self.node("Conv", [src, w, b], [f"{out}.f"], f"Conv_{out}", kernel_shape=k,
                      strides=a["stride"], pads=pads, dilations=a["dilation"], group=a["groups"])
            self.finish(self.activation(f"{out}.f", n, out), out)
        elif op == "linear":
            w, b = self.weight(n)
            self.node("Gemm", [self.float_in(n.inputs[0]), w, b], [f"{out}.f"], f"Gemm_{out}", transB=1)
            self.finish(self.activation(f"{out}.f", n, out), out)
        elif op == "add":
            self.node("Add", [self.float_in(i) for i in n.inputs], [f"{out}.f"], f"Add_{out}")
            self.finish(self.activation(f"{out}.f", n, out), out)
        else:
            ins = [self.float_in(i) for i in n.inputs]
            simple = {"mul": "Mul", "relu": "Relu", "hardswish": "HardSwish", "sigmoid": "Sigmoid",
                      "global_avg_pool": "GlobalAveragePool", "concat": "Concat"}
            if op in simple:
                attrs = {"axis": a["axis"]} if op == "concat" else {}
                self.node(simple[op], ins, [f"{out}.f"], f"{simple[op]}_{out}", **attrs)
            elif op == "hardsigmoid":
                self.node("HardSigmoid", ins, [f"{out}.f"], f"HardSigmoid_{out}", alpha=1.0 / 6.0, beta=0.5)
            elif op == "relu6":
                lo, hi = self.init(f"{out}.clip_lo", np.array(0.0, np.float32)), self.init(f"{out}.clip_hi", np.array(6.0, np.float32))
                self.node("Clip", [ins[0], lo, hi], [f"{out}.f"], f"Clip_{out}")
            elif op == "avg_pool2d":
                self.node("AveragePool", ins, [f"{out}.f"], f"AveragePool_{out}", kernel_shape=a["kernel"],
                          strides=a["stride"], pads=a["pads"], count_include_pad=int(a["count_include_pad"]))
            elif op == "resize":
                self.resize(n, ins[0], f"{out}.f")
            else:
                raise UnsupportedOpError(f"the QDQ ONNX writer (onnx-qdq, openvino-ir) cannot write op {op} "
                                         f"({n.name}): no measured integer kernel for it yet; use another target")
            self.finish(f"{out}.f", out)

    def code_op(self, n: Node, ins: list[str], out: str) -> None:
        """Ops that move values without arithmetic; on uint8 codes in the QDQ graph."""
        op, a = n.op, n.attrs
        if op == "max_pool2d":
            self.node("MaxPool", ins, [out], f"MaxPool_{out}", kernel_shape=a["kernel"], strides=a["stride"], pads=a["pads"])
        elif op == "pad":
            p = self.init(f"{out}.pads", np.array(a["pads"], np.int64))
            if self.q:
                v = self.init(f"{out}.pad_value", self.pad_fill(n.inputs[0]))
            else:
                v = self.init(f"{out}.pad_value", np.array(0.0, np.float32))
            self.node("Pad", [ins[0], p, v], [out], f"Pad_{out}", mode="constant")
        elif op == "slice":
            arrs = [np.array(a[k], np.int64) for k in ("starts", "ends", "axes", "steps")]
            names = [self.init(f"{out}.{k}", v) for k, v in zip(("starts", "ends", "axes", "steps"), arrs, strict=True)]
            self.node("Slice", [ins[0], *names], [out], f"Slice_{out}")
        elif op == "flatten":
            self.node("Flatten", ins, [out], f"Flatten_{out}", axis=1)
        elif op == "reshape":
            shp = self.init(f"{out}.shape", np.array([0] + list(a["shape"][1:]), np.int64))
            self.node("Reshape", [ins[0], shp], [out], f"Reshape_{out}")
        elif op == "concat":
            self.node("Concat", ins, [out], f"Concat_{out}", axis=a["axis"])
        elif op == "transpose":
            self.node("Transpose", ins, [out], f"Transpose_{out}", perm=a["perm"])
        elif op == "resize":
            self.resize(n, ins[0], out)
        else:
            raise UnsupportedOpError(f"the QDQ ONNX writer (onnx-qdq, openvino-ir) cannot write op {op} ({n.name}); "
                                     "use another target")

    def resize(self, n: Node, src: str, out: str) -> None:
        """Resize with the node's coordinate rule. A ratio the source file gave as a scale is written as
        that scale (onnxruntime divides by it, as the graph's ``scale`` does); a TFLite step as the
        output sizes (batch and channels from the input's Shape, so any batch runs)."""
        a = n.attrs
        attrs: dict[str, Any] = {"mode": a["mode"], "coordinate_transformation_mode": a["coord"]}
        if a["mode"] == "nearest":
            attrs["nearest_mode"] = a["nearest"]
        if "scale" in a:
            scales = self.init(f"{out}.scales", np.array([1.0, 1.0, *a["scale"]], np.float32))
            self.node("Resize", [src, "", scales], [out], f"Resize_{out}", **attrs)
            return
        self.node("Shape", [src], [f"{out}.in_shape"], f"Shape_{out}", end=2)
        hw = self.init(f"{out}.hw", np.array(a["size"], np.int64))
        self.node("Concat", [f"{out}.in_shape", hw], [f"{out}.sizes"], f"Concat_{out}_sizes", axis=0)
        self.node("Resize", [src, "", "", f"{out}.sizes"], [out], f"Resize_{out}", **attrs)


def output_names(g: QuantGraph) -> list[str]:
    """The file's output names: ``output`` for one, ``output_K`` in the graph's order for several."""
    return [OUTPUT_NAME] if len(g.outputs) == 1 else [f"{OUTPUT_NAME}_{k}" for k in range(len(g.outputs))]


def qdq_io_contract(g: QuantGraph) -> dict[str, Any]:
    """The QDQ file's I/O: float32 NCHW with any batch size, quantized to uint8 by the file's
    first QuantizeLinear and dequantized by its last DequantizeLinear(s) (the grids in uint8)."""
    x = g.tensors[g.inputs[0]]
    outs = [io_tensor(name, ["N", *g.tensors[t].shape[1:]], "NCHW", "float32",
                      (*u8_grid(g.tensors[t].quant), "uint8", "DequantizeLinear inside the model"))
            for t, name in zip(g.outputs, output_names(g), strict=True)]
    return {"input": io_tensor(x.name, ["N", *x.shape[1:]], "NCHW", "float32",
                               (*u8_grid(x.quant), "uint8", "QuantizeLinear inside the model")),
            "output": outs[0], "outputs": outs}


def build_model(g: QuantGraph, quantized: bool = True, *, u8_weights_where_saturating: bool = False) -> onnx.ModelProto:
    """The QDQ (or, with ``quantized=False``, the float) ONNX model of ``g``.

    ``u8_weights_where_saturating``: store the weights of every layer ``u8s8_may_saturate``
    flags as uint8 with zero point 128 (the onnx-qdq file); otherwise every weight is int8.
    """
    return QdqEmitter(g, quantized, u8_weights_where_saturating).build()


def session(path: Path, threads: int = 1, optimized_path: Path | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session with the default (full) graph optimisations."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if optimized_path is not None:  # (onnxruntime warns that such a dump is machine-specific: we only read it)
        so.optimized_model_filepath = str(optimized_path)
        so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxRunner(Runner):
    def __init__(self, path: Path, threads: int = 1) -> None:
        self.sess = session(path, threads)
        self.input = self.sess.get_inputs()[0].name
        self.threads = threads

    def run(self, x: np.ndarray) -> Any:
        return pack(self.sess.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)}))


class OnnxQdqTarget(Target):
    name = "onnx-qdq"
    description = ("ONNX QDQ (opset 17), uint8 activations and int8 per-channel weights (as uint8 with zero point 128 "
                   "where onnxruntime's u8s8 kernels could saturate), run on onnxruntime (CPU)")
    runtime = "onnxruntime"
    #: "onnxruntime": float-half-even, plus the fused QLinearAdd/Mul/AveragePool/GlobalAveragePool arithmetic
    rules = TargetRules(rounding="onnxruntime", max_weight_bits=8, activation_bits=(8,))
    rounding_rules = ("onnxruntime",)
    model_file = "model.onnx"
    float_model_file = "model_float.onnx"

    def emit(self, graph: QuantGraph, folder: Path, *, quantized: bool = True) -> list[Path]:
        path = Path(folder) / (self.model_file if quantized else self.float_model_file)
        onnx.save(build_model(graph, quantized, u8_weights_where_saturating=True), str(path))
        return [path]

    def load(self, folder: Path, *, float_model: bool = False, threads: int = 1) -> Runner:
        return OnnxRunner(Path(folder) / (self.float_model_file if float_model else self.model_file), threads)

    def runtime_versions(self) -> dict[str, str]:
        return {"onnxruntime": ort.__version__, "onnx": onnx.__version__}

    def io_contract(self, graph: QuantGraph) -> dict[str, dict[str, Any]]:
        return qdq_io_contract(graph)

    def read_back_mismatches(self, folder: Path, graph: QuantGraph) -> list[str]:
        return read_back_mismatches(Path(folder) / self.model_file, graph)

    def inspect(self, folder: Path) -> dict:
        """Which kernels onnxruntime actually runs after its graph optimisations."""
        opt = Path(folder) / ".ort_optimized.onnx"
        try:
            session(Path(folder) / self.model_file, optimized_path=opt)
            m = onnx.load(str(opt))
        finally:
            opt.unlink(missing_ok=True)
        ops = Counter(n.op_type for n in m.graph.node)
        float_convs = ops.get("Conv", 0) + ops.get("Gemm", 0) + ops.get("FusedConv", 0) + ops.get("MatMul", 0)
        return {"runtime_ops": dict(sorted(ops.items())), "float_conv_or_gemm_nodes": float_convs}


def read_back_mismatches(path: Path, g: QuantGraph) -> list[str]:
    """Every way the file's initializers differ from ``g``: int8 weights (uint8 with zero point 128
    where onnxruntime's u8 x s8 kernels could saturate), int32 biases and each activation grid that
    has a quantizer (the input's and the output's must), bit for bit; no float weight may remain."""
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    bad = []
    for n in g.weighted_nodes():
        wt, bt = g.tensors[n.inputs[1]], g.tensors[n.inputs[2]]
        wi, wz = inits.get(f"{wt.name}.int"), inits.get(f"{wt.name}.zero_point")
        bi = inits.get(f"{bt.name}.int")
        if wi is None or wz is None or bi is None:
            bad.append(f"{n.name}: integer weight or bias missing")
            continue
        u8 = u8s8_may_saturate(g, n)
        want = (np.uint8, 128) if u8 else (np.int8, 0)
        if wi.dtype != want[0] or wz.dtype != want[0] or np.any(wz != want[1]):
            bad.append(f"{wt.name}: stored as {wi.dtype} with zero point {np.unique(wz)}, expected {want}")
        elif not np.array_equal(wi.astype(np.int64) - want[1], wt.data):
            bad.append(f"{wt.name}: weight integers differ")
        if bi.dtype != np.int32 or not np.array_equal(bi, bt.data):
            bad.append(f"{bt.name}: bias integers differ")
        for t in (wt, bt):
            if not same_float32(inits.get(f"{t.name}.scale"), t.quant.scale):
                bad.append(f"{t.name}: scale differs")
    for name in g.activation_names():
        if f"{name}.scale" not in inits:
            if name in (g.inputs[0], *g.outputs):
                bad.append(f"{name}: no quantizer in the file")
            continue  # a code-moving op's output without a DQ of its own
        qp, zp = g.tensors[name].quant, inits[f"{name}.zero_point"]
        if not same_float32(inits[f"{name}.scale"], qp.scale[:1].reshape(())):
            bad.append(f"{name}: activation scale differs")
        if zp.dtype != np.uint8 or zp.shape != () or int(zp) != int(qp.zero_point[0]) + (128 if qp.signed else 0):
            bad.append(f"{name}: activation zero point {zp} differs")
    bad += [f"{k}: float weight left in the integer file" for k in inits if k.endswith((".weight", ".bias"))]
    return bad


# ------------------------------------------------ the rule onnxruntime's kernels follow
def uint8_container_offset(qp: QParams) -> int:
    """onnx-qdq holds every 8-bit activation as uint8: a signed grid's codes shift by +128."""
    return 2 ** (qp.bits - 1) if qp.signed else 0


def fma_f32(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """float32 ``a * b + c`` rounded once, as an FMA instruction computes it.

    The float64 product of two float32 values is exact; the float64 sum may round, and
    rounding that to float32 again can land on the wrong side of a float32 tie. The sum's
    exact error (TwoSum) says which side: one float64 step towards it settles the tie.
    """
    a64, b64, c64 = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    p = a64 * b64
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    return np.where(err != 0, np.nextafter(s, np.copysign(np.inf, err)), s).astype(np.float32)


def cvt_f32_to_i32(v: np.ndarray) -> np.ndarray:
    """x86 CVTPS2DQ: round half to even; out of int32 range gives -2**31 ("integer indefinite")."""
    r = np.rint(np.asarray(v, np.float32)).astype(np.float64)
    return np.where((r >= -(2.0**31)) & (r < 2.0**31), r, -(2.0**31)).astype(np.int64)


#: HardSigmoid's alpha as the onnx-qdq file (and the HardSwish function body) holds it: float32(1/6)
ORT_HARD_SIGMOID_ALPHA = np.float32(1.0 / 6.0)


def ort_hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """onnxruntime's HardSigmoid (alpha 1/6, beta 1/2) in float32: ``min(1, max(0, alpha * x + beta))``
    with the product and the sum each rounded (no FMA)."""
    alpha = torch.tensor(ORT_HARD_SIGMOID_ALPHA, dtype=torch.float32)
    return (x.float() * alpha + torch.tensor(0.5, dtype=torch.float32)).clamp(0.0, 1.0)


#: MLAS's logistic (Eigen's rational approximation): input clamp, then the numerator's odd
#: coefficients alpha_9..alpha_1 and the denominator's even ones beta_10..beta_0 (float32)
MLAS_LOGISTIC_RANGE = (np.float32(-18.0), np.float32(18.0))
MLAS_LOGISTIC_ALPHA = tuple(np.float32(c) for c in (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05,
                                                    8.51377133304701e-03, 2.48287947061529e-01))
MLAS_LOGISTIC_BETA = tuple(np.float32(c) for c in (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06,
                                                   1.70198817374094e-03, 1.16817656904453e-01, 9.93151921023180e-01))


def mlas_logistic(x: np.ndarray) -> np.ndarray:
    """MlasComputeLogistic as its FMA kernels compute it in float32: x clamped to [-18, 18], both
    polynomials in x**2 by Horner's rule with one rounding per step (FMA), ``x * p / q + 0.5``, floored
    at 0. Not ``1 / (1 + exp(-x))``: the two differ in the last bits, which decides a quantizer's tie."""
    v = np.clip(np.asarray(x, np.float32), *MLAS_LOGISTIC_RANGE)
    v2 = v * v
    p = np.full_like(v, MLAS_LOGISTIC_ALPHA[0])
    for c in MLAS_LOGISTIC_ALPHA[1:]:
        p = fma_f32(v2, p, c)
    q = np.full_like(v, MLAS_LOGISTIC_BETA[0])
    for c in MLAS_LOGISTIC_BETA[1:]:
        q = fma_f32(v2, q, c)
    return np.maximum((v * p) / q + np.float32(0.5), np.float32(0.0))


def ort_resize_node(n: Node, in_shape: Any) -> Node:
    """A TFLite-read resize (its ``step``) as onnxruntime computes the file's: given output sizes, it
    divides by the float32 ratio output / input instead of multiplying by a step."""
    a = {k: v for k, v in n.attrs.items() if k != "step"}
    a["scale"] = [float(np.float32(o) / np.float32(i)) for o, i in zip(a["size"], in_shape[2:], strict=True)]
    return Node(n.name, n.op, n.inputs, n.outputs, a, n.source)


class OnnxruntimeRule(FloatHalfEvenRule):
    """onnxruntime's CPU provider on x86-64 (MLAS kernels for AVX2).

    Convolutions and Gemm requantise as float-half-even (their int32 accumulators are exact:
    a layer whose uint8 x int8 pair sums could saturate in int16 gets uint8 weights in the
    onnx-qdq file, see ``targets/onnx_qdq.py``), and so does every op it runs as
    DQ -> float op -> Q, with HardSigmoid and HardSwish computed in float32 as its kernels
    compute them (``float_kernel``). Its QDQ fusion, however, turns DQ -> Add / Mul / AveragePool /
    GlobalAveragePool / Sigmoid -> Q into com.microsoft QLinear* kernels whose float32 arithmetic on
    the uint8 codes rounds differently at (near-)ties (QLinearSigmoid: a table through MLAS's
    rational logistic); ``integer_op`` reproduces them bit for bit (measured against onnxruntime
    1.32 over every uint8 code (pair) of many grids).
    Other CPUs get other MLAS kernels (QLinearAdd without AVX2; QLinearAdd and
    QLinearGlobalAveragePool in fixed point on ARM), which may round those ties otherwise.
    """

    name = "onnxruntime"

    def float_kernel(self, n: Node, xs: list[torch.Tensor]) -> torch.Tensor:
        """HardSigmoid as onnxruntime's CPU kernel computes it, and HardSwish as its ONNX function
        body, ``x * HardSigmoid(x)``: torch's ``relu6(x + 3) / 6`` rounds differently in the last
        float32 bit, which decides a QuantizeLinear tie (on power-of-two grids, ``x / 2`` is one)."""
        if n.op == "hardsigmoid":
            return ort_hard_sigmoid(xs[0])
        if n.op == "hardswish":
            return xs[0].float() * ort_hard_sigmoid(xs[0])
        if n.op == "resize" and "step" in n.attrs:
            return super().float_kernel(ort_resize_node(n, xs[0].shape), xs)
        return super().float_kernel(n, xs)

    def integer_op(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor | None:
        kernel = {"add": self._add, "mul": self._mul, "avg_pool2d": self._avg_pool2d,
                  "global_avg_pool": self._global_avg_pool, "sigmoid": self._sigmoid}.get(n.op)
        if kernel is None or any(qp.bits != 8 for qp in (*qps, out)):
            return None
        off = uint8_container_offset(out)
        if n.attrs.get("activation", "none") != "none" and int(out.zero_point[0]) + off != 0:
            return None  # ReluQuantFusion drops a Relu only before a Q with zero point 0: else Add runs in float
        grids = [(np.float32(qp.scale[0]), int(qp.zero_point[0]) + uint8_container_offset(qp)) for qp in (*qps, out)]
        codes = [x.numpy() + uint8_container_offset(qp) for x, qp in zip(xs, qps, strict=True)]
        y = np.clip(kernel(n, codes, grids), 0, 255) - off
        return torch.from_numpy(y.astype(np.float64)).clamp(out.qmin, out.qmax)

    # the kernels: uint8 codes (float64 arrays) and (float32 scale, uint8 zero point) per input, then
    # the output; they return int64 codes in the uint8 container, before its saturation
    @staticmethod
    def _add(n: Node, xs: list[np.ndarray], grids: list[tuple[np.float32, int]]) -> np.ndarray:
        """MlasQLinearAddKernelAvx2Helper: the zero points folded into one float32 constant, two FMAs
        on the raw codes, CVTPS2DQ. (The graph's add never broadcasts, so neither input is a scalar.)"""
        (sa, za), (sb, zb), (sc, zc) = grids
        ra, rb = sa / sc, sb / sc
        fixed = np.float32(zc) - fma_f32(ra, np.float32(za), rb * np.float32(zb))
        a, b = (x.astype(np.float32) for x in xs)
        return cvt_f32_to_i32(fma_f32(a, ra, fma_f32(b, rb, fixed)))

    @staticmethod
    def _mul(n: Node, xs: list[np.ndarray], grids: list[tuple[np.float32, int]]) -> np.ndarray:
        """MlasQLinearMulKernel (SSE2): the exact integer product times float32(s_a * s_b / s_c), plus z_c."""
        (sa, za), (sb, zb), (sc, zc) = grids
        prod = ((xs[0] - za) * (xs[1] - zb)).astype(np.float32)  # |prod| <= 255**2: exact
        return cvt_f32_to_i32(prod * (sa * sb / sc) + np.float32(zc))

    def _avg_pool2d(self, n: Node, xs: list[np.ndarray], grids: list[tuple[np.float32, int]]) -> np.ndarray:
        """QLinearAveragePool: dequantize to float32, sum each window in float32 in row order, divide by
        the count, then nearbyint(y / s_out + z_out). A window over the whole unpadded input runs as
        QLinearGlobalAveragePool."""
        (si, zi), (so, zo) = grids
        a, x = n.attrs, xs[0]
        (kh, kw), (sh, sw), (t, l, b, r) = a["kernel"], a["stride"], a["pads"]
        if (kh, kw) == x.shape[2:] and not any(a["pads"]):
            return self._global_avg_pool(n, xs, grids)
        pad = ((0, 0), (0, 0), (t, b), (l, r))
        windows = np.lib.stride_tricks.sliding_window_view(  # the padding adds 0.0, as skipping it does
            np.pad(si * (x - zi).astype(np.float32), pad), (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
        total = windows[..., 0, 0]
        for i in range(1, kh * kw):
            total = total + windows[..., i // kw, i % kw]
        if a["count_include_pad"]:
            count = np.float32(kh * kw)
        else:
            inside = np.lib.stride_tricks.sliding_window_view(np.pad(np.ones(x.shape[2:]), pad[2:]), (kh, kw))
            count = inside[::sh, ::sw].sum((-1, -2)).astype(np.float32)
        return cvt_f32_to_i32(total / count / so + np.float32(zo))

    @staticmethod
    def _sigmoid(n: Node, xs: list[np.ndarray], grids: list[tuple[np.float32, int]]) -> np.ndarray:
        """QLinearSigmoid: a 256-entry table, each uint8 code dequantized in float32 (s_in * (code - z_in)),
        through MLAS's logistic (``mlas_logistic``), quantized as QuantizeLinear does (y / s_out, rounded
        half to even, plus z_out)."""
        (si, zi), (so, zo) = grids
        table = cvt_f32_to_i32(mlas_logistic(si * (np.arange(256) - zi).astype(np.float32)) / so) + zo
        return table[xs[0].astype(np.int64)]

    @staticmethod
    def _global_avg_pool(n: Node, xs: list[np.ndarray], grids: list[tuple[np.float32, int]]) -> np.ndarray:
        """MlasQLinearGlobalAveragePool (SSE2): the integer sum times float32(s_in / (s_out * N)), clamped to
        the output range, rounded, plus z_out."""
        (si, zi), (so, zo) = grids
        count = xs[0].shape[2] * xs[0].shape[3]
        acc = (xs[0].sum((2, 3), keepdims=True) - zi * count).astype(np.float32)
        y = np.clip(acc * (si / (so * np.float32(count))), np.float32(-zo), np.float32(255 - zo))
        return cvt_f32_to_i32(y) + zo


register_rule(OnnxruntimeRule())
