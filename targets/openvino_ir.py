"""Target ``openvino-ir``: OpenVINO IR (``model.xml`` + ``model.bin``) run on the CPU plugin.

The IR is converted in memory from the onnx-qdq target's QDQ model: OpenVINO's ONNX
frontend turns each QuantizeLinear/DequantizeLinear pair into a FakeQuantize and keeps
the int8 weight and int32 bias initializers as integer constants with their scales, so
the file holds the graph's integers by construction (``read_back`` proves it), and the
CPU plugin runs u8 x i8 convolutions (a per-channel conv padding arrives as the ONNX's
Split/Pad/Concat on u8 codes, which the plugin runs in u8).

Not strict QDQ: the CPU plugin folds a residual Add (with its quantize) into the
convolution producing one of its inputs, which skips the rounding of that convolution's
own output grid (it only clamps to its range), so the sum is rounded once instead of
twice. The target's rounding rule ``openvino`` simulates exactly that (measured: 0 LSB
on resnet20 under int8-pot, where strict QDQ was 3 LSB and 98.3 % argmax agreement);
the bundle reports the measured agreement either way. An add whose shortcut is the network
input itself is not folded: rounded twice, as strict QDQ (measured on an Intel Xeon with
AVX-512 VNNI: x + conv(x), with or without a ReLU, 0 LSB from strict QDQ, hundreds of outputs off
with the fold; a sliced and padded input as the shortcut is folded). Also measured there and not
yet modelled: max-pooled input + conv(...) is not folded either (1 LSB on a third of the outputs).

CPU-dependent: on x86 CPUs without VNNI (AVX2 or AVX-512 alone), the plugin's u8 x i8
convolutions add each two adjacent products in int16 with saturation, so a layer whose
weights hold two large values of one output channel (``exact_on_this_cpu``) can clip its
accumulator: measured on an AMD EPYC with AVX2 only, 1 to 3 output LSB on the test
networks, and up to the full output range on a synthetic conv of full-range weights
over 255-valued inputs. Layers with 7-bit weights never saturate; on VNNI CPUs nothing
does. ``inspect`` states which case the host is.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch

from eptq_deploy.float_exec import pack
from eptq_deploy.graph import WEIGHTED_OPS, Node, QParams, QuantGraph, moves_codes
from eptq_deploy.host import has_vnni
from eptq_deploy.simulate import FloatHalfEvenRule, register_rule

from . import Runner, Target
from .onnx_qdq import (
    OUTPUT_NAME,
    OnnxQdqTarget,
    build_model,
    fma_f32,
    output_names,
    qdq_io_contract,
    u8_grid,
    u8s8_may_saturate,
)

#: CPU plugin layer types that hold weights; ``inspect`` reports their runtime precision
WEIGHTED_LAYER_TYPES = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"})
INT8_PRECISIONS = frozenset({"u8", "i8"})
#: the onnx-qdq emitter names its tensors ``<t>.q`` (codes), ``<t>.dq<k>`` (a consumer's float
#: view), ``<t>.pre6.q/.dq`` (the grid before a ReLU6 clip) and the graph output ``output``
_TENSOR_RE = re.compile(r"^(?P<t>.+?)(?:\.pre6)?\.(?:q|dq\d*)$")
_ONNX_OUTPUT = OUTPUT_NAME


@cache
def _core() -> ov.Core:
    return ov.Core()


def convert(graph: QuantGraph, quantized: bool = True) -> ov.Model:
    """The OpenVINO model of ``graph``, converted from the onnx-qdq ONNX without a temp file."""
    proto = build_model(graph, quantized)
    return ov.convert_model(io.BytesIO(proto.SerializeToString()))


def exact_on_this_cpu(graph: QuantGraph) -> bool:
    """Whether the CPU plugin computes ``graph`` exactly here: a VNNI CPU, or no layer whose
    u8 x i8 pair sums could saturate in int16 (see the module docstring)."""
    return has_vnni() or not any(u8s8_may_saturate(graph, n) for n in graph.weighted_nodes())


def compile_cpu(path: Path, threads: int = 1) -> ov.CompiledModel:
    """Compile on the CPU plugin in f32: its default hint runs float layers in bf16 on CPUs
    that have it, which would make neither the float nor the int8 run comparable."""
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": int(threads)}
    return _core().compile_model(_core().read_model(str(path)), "CPU", config)


class OpenVinoRunner(Runner):
    def __init__(self, path: Path, threads: int = 1) -> None:
        self.compiled = compile_cpu(path, threads)
        self.request = self.compiled.create_infer_request()
        self.threads = threads

    def run(self, x: np.ndarray) -> Any:
        out = self.request.infer([np.ascontiguousarray(x, dtype=np.float32)])  # outputs copied, not shared
        return pack([np.asarray(out[k], dtype=np.float32) for k in range(len(self.compiled.outputs))])


# ------------------------------------------------------------------ IR read-back
def _const(out: ov.Output) -> np.ndarray | None:
    node = out.get_node()
    return node.get_data().copy() if node.get_type_name() == "Constant" else None


def _tensor_of(names: set[str]) -> str | None:
    """The graph tensor an IR value belongs to, from the ONNX names the frontend kept."""
    for n in sorted(names):
        if n == _ONNX_OUTPUT or re.fullmatch(rf"{_ONNX_OUTPUT}_\d+", n):
            return n
        m = _TENSOR_RE.match(n)
        if m:
            return m.group("t")
    return None


def _dequantize_source(op: ov.Node) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, bool]:
    """For a Multiply ``Convert(x) [- zp] * scale``: (integer constant or None, zero point, scale,
    whether it is such a pattern at all). x is a Constant for weights and biases, a runtime
    tensor (uint8 codes) for activations moved as codes."""
    for i in (0, 1):
        scale = _const(op.input_value(1 - i))
        src = op.input_value(i).get_node()
        if scale is None:
            continue
        zp = None
        if src.get_type_name() == "Subtract":
            zp_node = src.input_value(1).get_node()
            if zp_node.get_type_name() == "Convert":
                zp_node = zp_node.input_value(0).get_node()
            zp = zp_node.get_data().copy() if zp_node.get_type_name() == "Constant" else None
            src = src.input_value(0).get_node()
        if src.get_type_name() != "Convert":
            continue
        return _const(src.input_value(0)), zp, scale, True
    return None, None, None, False


def read_back(xml: Path) -> dict[str, Any]:
    """The integers and grids stored in an IR file, keyed by the quantized graph's tensor names.

    ``weights``: name -> {codes, scale, zero_point} for every integer constant that is
    dequantized (weights and biases); ``fake_quantize``: name -> list of {node, levels,
    input_range, output_range}; ``dequantize``: name -> list of {scale, zero_point} where
    uint8 codes are dequantized after a code-moving op; ``unattributed``: FakeQuantize
    nodes whose tensor could not be named (always a mismatch).
    """
    model = _core().read_model(str(xml))
    out: dict[str, Any] = {"weights": {}, "fake_quantize": {}, "dequantize": {}, "unattributed": []}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize":
            names = set(op.output(0).get_names())
            for consumer in op.output(0).get_target_inputs():  # a Q feeding code-moving ops: Convert(u8)
                names |= set(consumer.get_node().output(0).get_names())
            t = _tensor_of(names)
            il, ih, ol, oh = (_const(op.input_value(k)) for k in range(1, 5))
            if t is None or il is None or ih is None or ol is None or oh is None:
                out["unattributed"].append(op.get_friendly_name())
                continue
            out["fake_quantize"].setdefault(t, []).append({
                "node": op.get_friendly_name(), "levels": int(op.get_attributes()["levels"]),
                "input_range": (il.ravel(), ih.ravel()), "output_range": (ol.ravel(), oh.ravel())})
        elif kind == "Multiply":
            codes, zp, scale, is_dq = _dequantize_source(op)
            names = set(op.output(0).get_names())
            if not is_dq or not names:
                continue
            if codes is not None:  # "<w>.dq": a weight or bias initializer "<w>.int"
                w = next((n[: -len(".dq")] for n in sorted(names) if n.endswith(".dq")), None)
                if w is not None:
                    out["weights"][w] = {"codes": codes, "scale": scale.ravel(),
                                         "zero_point": None if zp is None else zp.ravel()}
            else:
                t = _tensor_of(names)
                if t is not None:
                    out["dequantize"].setdefault(t, []).append(
                        {"scale": scale.ravel(), "zero_point": None if zp is None else zp.ravel()})
    return out


def _same_f32(a: np.ndarray, b: np.ndarray) -> bool:
    a32, b32 = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
    if a32.size == 1 and b32.size > 1:  # the frontend may store a uniform scale once
        a32 = np.broadcast_to(a32, b32.shape)
    return a32.shape == b32.shape and bool(np.array_equal(a32.view(np.uint32), b32.view(np.uint32)))


def read_back_mismatches(graph: QuantGraph, rb: dict[str, Any]) -> list[str]:
    """Every way the IR read back (``read_back``) differs from ``graph``; empty when it holds
    exactly the graph's integer weights, biases and scales, and each FakeQuantize spans
    exactly its activation grid: levels 2**bits over [s*(qmin-zp), s*(qmax-zp)], output
    either the same real range or the uint8 container's codes [0, 255]."""
    T = graph.tensors
    bad = [f"FakeQuantize {n} belongs to no tensor of the graph" for n in rb["unattributed"]]
    for n in graph.weighted_nodes():
        for t, dtype in ((T[n.inputs[1]], np.int8), (T[n.inputs[2]], np.int32)):
            got = rb["weights"].get(t.name)
            if got is None:
                bad.append(f"{t.name}: no integer constant in the IR")
                continue
            codes = got["codes"]
            if codes.dtype != dtype or codes.size != t.data.size:
                bad.append(f"{t.name}: stored as {codes.dtype}{list(codes.shape)}, expected {np.dtype(dtype)}{list(t.data.shape)}")
            elif not np.array_equal(codes.reshape(t.data.shape), t.data):
                bad.append(f"{t.name}: {int(np.sum(codes.reshape(t.data.shape) != t.data))} integer codes differ")
            if not _same_f32(got["scale"], t.quant.scale):
                bad.append(f"{t.name}: scales differ from the graph's")
            if got["zero_point"] is not None and np.any(got["zero_point"] != 0):
                bad.append(f"{t.name}: non-zero zero point {got['zero_point'][:4]}")
    seen = set()
    for key, fqs in rb["fake_quantize"].items():
        name = dict(zip(output_names(graph), graph.outputs, strict=True)).get(key, key)
        qp = T[name].quant if name in T else None
        if qp is None:
            bad.append(f"FakeQuantize {fqs[0]['node']} is on {name!r}, which has no grid in the graph")
            continue
        seen.add(name)
        s, z = np.float32(qp.scale[0]), int(qp.zero_point[0])
        lo, hi = s * np.float32(qp.qmin - z), s * np.float32(qp.qmax - z)
        for fq in fqs:
            if fq["levels"] != 2**qp.bits:
                bad.append(f"{fq['node']} ({name}): {fq['levels']} levels, grid has {2 ** qp.bits}")
            if not (_same_f32(fq["input_range"][0], lo) and _same_f32(fq["input_range"][1], hi)):
                bad.append(f"{fq['node']} ({name}): input range {fq['input_range']} != ({lo}, {hi})")
            ol, oh = fq["output_range"]
            codes = _same_f32(ol, 0.0) and _same_f32(oh, 2.0**qp.bits - 1)
            if not codes and not (_same_f32(ol, lo) and _same_f32(oh, hi)):
                bad.append(f"{fq['node']} ({name}): output range ({ol}, {oh}) is neither the grid nor its codes")
    for key, dqs in rb["dequantize"].items():
        qp = T[key].quant if key in T else None
        if qp is None:
            bad.append(f"dequantize of {key!r}, which has no grid in the graph")
            continue
        s, z = u8_grid(qp)
        for dq in dqs:
            zp = 0 if dq["zero_point"] is None else dq["zero_point"]
            if not _same_f32(dq["scale"], s) or np.any(np.asarray(zp) != z):
                bad.append(f"dequantize of {key}: scale {dq['scale']} zero point {zp}, expected {s} and {z}")
    producer = graph.producer()
    for t in graph.activation_names():  # every grid the emitter quantizes to must be in the IR
        p = producer.get(t)
        if t not in seen and (p is None or not (moves_codes(p) or p.op == "concat")):
            bad.append(f"{t}: no FakeQuantize for its grid in the IR")
    return bad


# ----------------------------------------------------------------------- target
class OpenVinoIrTarget(Target):
    name = "openvino-ir"
    description = "OpenVINO IR (from the QDQ ONNX), uint8 activations and int8 per-channel weights, run on OpenVINO (CPU)"
    runtime = "openvino"
    # what the file can express is the onnx-qdq emitter's; the rounding is strict QDQ except
    # where the CPU plugin folds a residual add into a convolution (rule "openvino")
    rules = replace(OnnxQdqTarget.rules, rounding="openvino")
    rounding_rules = ("openvino",)
    model_file = "model.xml"
    float_model_file = "model_float.xml"

    def emit(self, graph: QuantGraph, folder: Path, *, quantized: bool = True) -> list[Path]:
        xml = Path(folder) / (self.model_file if quantized else self.float_model_file)
        ov.save_model(convert(graph, quantized), str(xml), compress_to_fp16=False)  # fp16 would round the scales
        return [xml, xml.with_suffix(".bin")]

    def validate(self, graph: QuantGraph) -> None:
        """The ONNX builder the IR is converted from is what refuses an op (OpenVINO's converter reads
        every op it writes: the conformance and property tests convert them all), so validating with
        the builder alone is exact and skips the conversion's second or so."""
        build_model(graph, False)

    def load(self, folder: Path, *, float_model: bool = False, threads: int = 1) -> Runner:
        return OpenVinoRunner(Path(folder) / (self.float_model_file if float_model else self.model_file), threads)

    def runtime_versions(self) -> dict[str, str]:
        return {"openvino": ov.__version__}

    def io_contract(self, graph: QuantGraph) -> dict[str, dict[str, Any]]:
        """The QDQ ONNX's I/O: the frontend keeps its tensor names, float32 I/O and FakeQuantize grids."""
        return qdq_io_contract(graph)

    def inspect(self, folder: Path) -> dict:
        """Which weighted layers the CPU plugin executes in int8, compiled as ``load`` compiles."""
        compiled = compile_cpu(Path(folder) / self.model_file)
        precisions: dict[str, str] = {}
        census: Counter[str] = Counter()
        for op in compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            kind = str(rt["layerType"].astype(str)) if "layerType" in rt else ""
            prec = str(rt["runtimePrecision"].astype(str)) if "runtimePrecision" in rt else ""
            if kind in ("Input", "Output", "Const", "Parameter", "Result", "Constant"):
                continue
            census[f"{kind}:{prec}"] += 1
            if kind in WEIGHTED_LAYER_TYPES:
                precisions[op.get_friendly_name()] = prec
        return {"int8_layers": sum(p in INT8_PRECISIONS for p in precisions.values()),
                "total_weighted_layers": len(precisions),
                "not_int8": [n for n, p in precisions.items() if p not in INT8_PRECISIONS],
                "runtime_precisions": precisions,
                "runtime_layers": dict(sorted(census.items())),
                "vnni": has_vnni(),  # without it, u8 x i8 pair sums saturate in int16 (not bit-exact)
                "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()}

    def read_back(self, folder: Path) -> dict[str, Any]:
        """The integers and grids in this target's integer IR (see :func:`read_back`)."""
        return read_back(Path(folder) / self.model_file)

    def read_back_mismatches(self, folder: Path, graph: QuantGraph) -> list[str]:
        return read_back_mismatches(graph, self.read_back(folder))

    def exact_here(self, graph: QuantGraph) -> bool:
        """Exact on this CPU (see :func:`exact_on_this_cpu`) and outside the two measured deviations
        of the ``openvino`` rule: asymmetric activation grids, and an add fed by a weighted layer on
        both sides (a projection shortcut)."""
        producer = graph.producer()
        two_sided = any(n.op == "add" and all(i in producer and producer[i].op in WEIGHTED_OPS for i in n.inputs)
                        for n in graph.nodes)
        asymmetric = any(graph.tensors[t].quant is not None and np.any(graph.tensors[t].quant.zero_point != 0)
                         for t in graph.activation_names())
        return exact_on_this_cpu(graph) and not two_sided and not asymmetric


# ------------------------------------------------ the rule the CPU plugin follows
class OpenvinoRule(FloatHalfEvenRule):
    """OpenVINO's CPU plugin on a QDQ graph: as strict QDQ, except that a residual add is
    fused into the convolution producing one of its inputs, whose own output
    quantization then only clamps (no rounding); the sum is quantized once."""

    name = "openvino"

    def unrounded_nodes(self, g: QuantGraph) -> set[str]:
        return folded_into_add(g)

    def quantize(self, x: torch.Tensor, qp: QParams) -> torch.Tensor:
        """A FakeQuantize as the CPU plugin computes it: the range [il, ih] of the frontend
        ((q_min - z) * s, (q_max - z) * s in float32), then in float32 an input scale
        ``(levels - 1) / (ih - il)`` and shift ``-il * (levels - 1) / (ih - il)``, one FMA on the
        clamped value and round half to even: the level, q_min below the code. Adding the shift
        (128 on an int8 grid) before rounding drops the value's last bits, so a value just above a
        half step can round as the tie does (10.250001 on a 0.5 grid: code 20, where x / s gives 21)."""
        s = np.float32(qp.scale[0])
        zp = int(qp.zero_point[0])
        il, ih = np.float32(qp.qmin - zp) * s, np.float32(qp.qmax - zp) * s
        steps = np.float32(qp.qmax - qp.qmin)
        isc, ish = steps / (ih - il), (-il * steps) / (ih - il)
        v = np.clip(x.detach().numpy().astype(np.float32), il, ih)
        level = np.rint(fma_f32(v, isc, ish)).astype(np.float64)
        return torch.from_numpy(level + qp.qmin).clamp(qp.qmin, qp.qmax)



def folded_into_add(g: QuantGraph) -> set[str]:
    """Weighted nodes whose output feeds only an add, one per add (the later producer), unless the
    add's other input is the network input itself (the plugin does not fold that add)."""
    consumers: dict[str, list[Node]] = {}
    for n in g.nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    producer = {n.outputs[0]: (k, n) for k, n in enumerate(g.nodes)}
    out: set[str] = set()
    for n in g.nodes:
        if n.op != "add":
            continue
        cands = [producer[i] for i in n.inputs if i in producer and producer[i][1].op in ("conv2d", "depthwise_conv2d")
                 and len(consumers.get(i, [])) == 1]
        if not cands:
            continue
        folded = max(cands, key=lambda c: c[0])[1]
        if not any(i in g.inputs for i in n.inputs if i != folded.outputs[0]):
            out.add(folded.name)
    return out


register_rule(OpenvinoRule())
