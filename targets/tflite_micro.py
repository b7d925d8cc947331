"""Target ``tflite-micro``: the int8 TFLite file on TensorFlow Lite for Microcontrollers.

The file is the ``tflite-int8`` writer's (same integers, same grids); it runs on TFLM's
Python interpreter (PyPI ``tflite-micro``), whose reference kernels follow TFLite's Q31
fixed point except in FULLY_CONNECTED (rule ``tflite-micro``, ``TfliteMicroRule``).
TFLM runs batch 1, so the runner loops over a batch.

Beside the file, the folder holds what a microcontroller team compiles in:
``model_data.cc`` (the flatbuffer as a 16-byte-aligned byte array) and ``model_data.h``
(its declaration, the input and output tensors' shapes, scales and zero points, the
tensor arena size TFLM's recording allocator measured, and ``AddModelOps``, the
``MicroMutableOpResolver`` calls the model needs). Both are self-contained C++17: no
TFLM header is needed to compile them.

Weights of fewer than 8 bits are stored compressed with TFLM's own look-up-table compression
(the pinned package's compressor): each such weight tensor becomes packed indices into
per-channel value tables, decoded by a ``TFLM_DECODE`` op into the arena before its layer
runs. The same integers reach the kernels, so the outputs are unchanged (tested); the file
shrinks and the arena grows by the decode buffers, both stated in the manifest.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ai_edge_litert import schema_py_generated as S

from eptq_deploy.errors import TargetError
from eptq_deploy.float_exec import pack
from eptq_deploy.graph import Node, QParams, QuantGraph, TensorInfo
from eptq_deploy.simulate import RoundingRule, register_rule

from . import Runner
from .tflite_int8 import (
    OP_NAMES,
    TfliteInt8Target,
    TfliteRule,
    int8_container_offset,
    multiply_by_quantized_multiplier,
    output_value,
    quantize_codes,
    read_back_mismatches,
    rounding_divide_by_pot,
    srdhm,
    stored_tensors,
)

#: the custom op TFLM's compressor inserts to decode a compressed tensor into the arena
DECODE_OP = "TFLM_DECODE"
#: the header of a TFLM_DECODE op's ancillary data (its DECODE common metadata)
LUT_HEADER_BYTES = 16
#: ``MicroMutableOpResolver`` method of each builtin op the tflite-int8 writer emits
RESOLVER_METHODS = {
    "ADD": "AddAdd", "AVERAGE_POOL_2D": "AddAveragePool2D", "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D", "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize",
    "FULLY_CONNECTED": "AddFullyConnected", "HARD_SWISH": "AddHardSwish", "LOGISTIC": "AddLogistic",
    "MAX_POOL_2D": "AddMaxPool2D", "MEAN": "AddMean", "MUL": "AddMul", "PAD": "AddPad", "PADV2": "AddPadV2",
    "QUANTIZE": "AddQuantize", "RELU": "AddRelu", "RELU6": "AddRelu6", "RESHAPE": "AddReshape",
    "SOFTMAX": "AddSoftmax", "SPLIT": "AddSplit", "STRIDED_SLICE": "AddStridedSlice", "SUB": "AddSub",
    "TRANSPOSE": "AddTranspose", "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", DECODE_OP: "AddDecode",
}
#: the C array's alignment: flatbuffers and TFLM read the model in place
ALIGNMENT = 16


def _interpreter(model: bytes) -> Any:
    from tflite_micro.python.tflite_micro import runtime

    try:
        return runtime.Interpreter.from_bytes(model)
    except (RuntimeError, ValueError) as e:
        raise TargetError(f"TFLM refused the model: {' '.join(str(e).split())[:200]}; re-export it") from None


def arena_bytes(model: bytes) -> int:
    """The tensor arena TFLM's recording allocator uses for ``model`` (its printed total).

    The interpreter prints its allocations from C++ (MicroPrintf), so stdout's and stderr's file
    descriptors are redirected into a temporary file for the call (C's buffers flushed first).
    """
    it = _interpreter(model)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as f:
        for fd in saved:
            os.dup2(f.fileno(), fd)
        try:
            it.print_allocations()
        finally:
            ctypes.CDLL(None).fflush(None)  # C's stdio buffers, before the descriptors go back
            for fd, old in saved.items():
                os.dup2(old, fd)
                os.close(old)
        f.seek(0)
        text = f.read().decode(errors="replace")
    m = re.search(r"Arena allocation total (\d+) bytes", text)
    if m is None:
        raise TargetError("TFLM did not report its arena size; re-export the bundle with this tflite-micro version")
    return int(m.group(1))


def op_names(m: Any) -> list[str]:
    """The name of each operator code of a parsed model (a custom op's own name)."""
    return [c.customCode.decode() if c.builtinCode == S.BuiltinOperator.CUSTOM and c.customCode
            else OP_NAMES.get(c.builtinCode, str(c.builtinCode)) for c in m.operatorCodes]


def model_ops(model: bytes) -> list[str]:
    """The ops of a TFLite flatbuffer, in first-use order."""
    m = S.ModelT.InitFromPackedBuf(model, 0)
    names = op_names(m)
    return list(dict.fromkeys(names[o.opcodeIndex] for o in m.subgraphs[0].operators))


def lut_index_bits(t: TensorInfo, data: np.ndarray, axis: int) -> int | None:
    """The LUT index width that stores ``data`` (a weight tensor ``t`` as the file holds it) in fewer
    bytes, or None: only weights of fewer than 8 bits, and only where the packed indices, one value
    table per channel and the decode header are smaller than the int8 container."""
    if t.quant is None or t.quant.bits >= 8 or data.dtype != np.int8:
        return None
    per_channel = np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1)
    distinct = max(len(np.unique(c)) for c in per_channel)
    bits = max(1, math.ceil(math.log2(distinct)))
    stored = -(-data.size * bits // 8) + data.shape[axis] * 2**bits + LUT_HEADER_BYTES
    return bits if stored < data.size else None


def compress_weights(model: bytes, graph: QuantGraph) -> bytes:
    """``model`` with every sub-8-bit weight tensor LUT-compressed by TFLM's compressor (per
    channel, along the tensor's quantized dimension: TFLM decodes a per-tensor table of a
    per-channel tensor wrongly, measured), or ``model`` itself when nothing would shrink."""
    from tflite_micro.tensorflow.lite.micro.compression import spec
    from tflite_micro.tensorflow.lite.micro.compression.compress import compress

    m = S.ModelT.InitFromPackedBuf(model, 0)
    sg = m.subgraphs[0]
    specs = []
    for i, t in enumerate(sg.tensors):
        gt = graph.tensors.get(t.name.decode())
        if gt is None or gt.data is None or t.type != S.TensorType.INT8 or t.quantization is None:
            continue
        axis = int(t.quantization.quantizedDimension)
        data = np.frombuffer(bytes(m.buffers[t.buffer].data), np.int8).reshape(t.shape)
        bits = lut_index_bits(gt, data, axis)
        if bits is not None:
            specs.append(spec.Tensor(0, i, [spec.LookUpTableCompression(bits, spec.PerChannel(axis))]))
    if not specs:
        return model
    try:
        return bytes(compress(model, specs))
    except Exception as e:  # the compressor's own error types vary by build
        raise TargetError(f"TFLM's weight compression failed: {' '.join(str(e).split())[:200]}; "
                          "quantize with 8-bit weights for tflite-micro") from None


#: beside a compressed model: the uncompressed file's size and arena, for the saving and the cost
COMPRESSION_FILE = "compression.json"


def weight_compression(model: bytes, before: dict[str, int] | None = None) -> dict[str, Any]:
    """What the file's ``TFLM_DECODE`` ops decode (tensors, bytes decoded and stored) and, given the
    uncompressed file's figures (``COMPRESSION_FILE``), the file bytes saved and the arena bytes added."""
    m = S.ModelT.InitFromPackedBuf(model, 0)
    sg, names = m.subgraphs[0], op_names(m)
    decoded = stored = count = 0
    for o in sg.operators:
        if names[o.opcodeIndex] != DECODE_OP:
            continue
        for out in o.outputs:
            decoded += int(np.prod(sg.tensors[out].shape))  # int8: one byte per weight
            count += 1
        stored += sum(len(m.buffers[sg.tensors[i].buffer].data) for i in o.inputs)
    if not count:
        return {"method": "none", "note": "weights stay in int8 containers: LUT compression is applied to weights of fewer than 8 bits where it shrinks them"}
    out: dict[str, Any] = {"method": "TFLM LUT (TFLM_DECODE op; per-channel value tables)", "tensors": count,
                           "decoded_bytes": decoded, "stored_bytes": stored}
    if before:
        out["file_bytes_uncompressed"] = before["model_bytes"]
        out["file_bytes_saved"] = before["model_bytes"] - len(model)
        out["arena_bytes_uncompressed"] = before["arena_bytes"]
    out["note"] = "the arena holds decoded weights while their layer runs (arena_bytes includes them)"
    return out


def decode_lut(encoded: bytes, ancillary: bytes, shape: list[int]) -> np.ndarray:
    """An int8 tensor as a ``TFLM_DECODE`` op rebuilds it from TFLM's LUT format: big-endian packed
    indices into value tables; the ancillary data is a 16-byte header (byte 5: channel axis in the
    high nibble, 15 for one table, index width in the low three bits; byte 6: table length per
    channel) followed by the tables."""
    ancillary = bytes(ancillary)
    axis, bits, stride = ancillary[5] >> 4, ancillary[5] & 7, ancillary[6]
    tables = np.frombuffer(ancillary[LUT_HEADER_BYTES:], np.int8)
    n = int(np.prod(shape))
    packed = np.unpackbits(np.frombuffer(bytes(encoded), np.uint8))[: n * bits].reshape(n, bits)
    index = (packed.astype(np.int64) << np.arange(bits - 1, -1, -1)).sum(1).reshape(shape)
    channel = 0 if axis == 15 else np.indices(shape)[axis]
    return tables[channel * stride + index]


# ---------------------------------------------- gemmlowp's fixed-point logistic, as TFLM runs it
_I32_MAX = 2**31 - 1


def _shift_left_saturating(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x * (1 << n)).clamp(-(2**31), _I32_MAX)


def _exp_on_quarter_interval(a: torch.Tensor) -> torch.Tensor:
    """exp(a) for Q0.31 ``a`` in [-1/4, 0): Taylor series around -1/8 (gemmlowp's constants)."""
    x = a + (1 << 28)
    x2 = srdhm(x, x)
    x3, x4 = srdhm(x2, x), srdhm(x2, x2)
    poly = rounding_divide_by_pot(srdhm(rounding_divide_by_pot(x4, 2) + x3, 715827883) + x2, 1)  # 715827883: 1/3
    return 1895147668 + srdhm(torch.full_like(x, 1895147668), x + poly)  # 1895147668: exp(-1/8)


def _exp_on_negative_values(a: torch.Tensor) -> torch.Tensor:
    """exp(a) for Q4.27 ``a`` <= 0, in Q0.31: the quarter interval, then a barrel of exp(-2**k) factors."""
    quarter = 1 << 25
    a_mod = (a & (quarter - 1)) - quarter
    result = _exp_on_quarter_interval(_shift_left_saturating(a_mod, 4))
    remainder = a_mod - a
    for k, factor in ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535), (3, 720401)):
        result = torch.where((remainder & (1 << (27 + k))) != 0, srdhm(result, factor), result)
    return torch.where(a == 0, _I32_MAX, result)


def _one_over_one_plus_x(a: torch.Tensor) -> torch.Tensor:
    """1 / (1 + a) for Q0.31 ``a`` in [0, 1], in Q0.31: three Newton-Raphson steps in Q2.29."""
    s = a + _I32_MAX
    half = torch.div(s + torch.where(s >= 0, 1, -1), 2, rounding_mode="trunc")  # RoundingHalfSum(a, 1)
    x = 1515870810 + srdhm(half, -1010580540)  # 48/17 - 32/17 * half
    for _ in range(3):
        x = x + _shift_left_saturating(srdhm(x, (1 << 29) - srdhm(half, x)), 2)
    return _shift_left_saturating(x, 1)


def gemmlowp_logistic(a: torch.Tensor) -> torch.Tensor:
    """``gemmlowp::logistic`` of Q4.27 raw values (int64 tensor holding int32), in Q0.31."""
    positive = _one_over_one_plus_x(_exp_on_negative_values(-a.abs()))
    return torch.where(a == 0, 1 << 30, torch.where(a > 0, positive, _I32_MAX - positive))


def tflm_logistic_table(qi: QParams) -> torch.Tensor:
    """The int8 output code of TFLM's LOGISTIC for each int8 input code -128..127 (its Prepare and
    ``reference_integer_ops::Logistic``: input rescaled to Q4.27, gemmlowp's logistic, output on
    scale 1/256 with zero point -128 whatever the output tensor states)."""
    zero = int(qi.zero_point[0]) - int8_container_offset(qi)
    mantissa, shift = math.frexp(float(np.float32(qi.scale[0])) * 2.0 ** 27)
    multiplier = int(math.floor(abs(mantissa) * 2**31 + 0.5)) * (1 if mantissa >= 0 else -1)  # TfLiteRound
    radius = math.floor(15 * 2.0**27 / 2.0**shift)  # CalculateInputRadius(4, shift, 31)
    x = torch.arange(-128, 128, dtype=torch.int64) - zero
    inner = x.clamp(-radius + 1, radius - 1)  # outside the radius the kernel saturates without the math
    q4 = multiply_by_quantized_multiplier(inner, multiplier, shift)
    y = (rounding_divide_by_pot(gemmlowp_logistic(q4), 23) - 128).clamp(-128, 127)
    return torch.where(x <= -radius, -128, torch.where(x >= radius, 127, y))


class TfliteMicroRule(TfliteRule):
    """TFLM's reference kernels: TFLite's Q31 fixed point, except FULLY_CONNECTED, which TFLM
    requantizes per channel with the quantized multiplier (``MultiplyByQuantizedMultiplier``)
    as convolutions do, where TFLite's reference kernel rescales in double (measured: that one
    difference left 1 LSB on 0.1 % of resnet20's outputs), and LOGISTIC, which TFLM computes in
    gemmlowp's fixed point where TFLite looks up a float-built table (found by the property tests)."""

    name = "tflite-micro"

    def requantize_node(self, n: Node, acc: Any, s_in: np.ndarray, s_w: np.ndarray, s_out: np.ndarray) -> Any:
        return RoundingRule.requantize_node(self, n, acc, s_in, s_w, s_out)

    def _sigmoid(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor:
        """LOGISTIC in fixed point (gemmlowp), where TFLite's kernel looks up a table built in float:
        measured 1 LSB apart on some inputs."""
        off_in, off_out = int8_container_offset(qps[0]), int8_container_offset(out)
        return tflm_logistic_table(qps[0])[xs[0] - off_in + 128] + off_out


register_rule(TfliteMicroRule())


class TfliteMicroRunner(Runner):
    """Float NHWC-converted input quantized as the simulation does, one sample per invoke."""

    rounding = "tflite-micro"
    kernels = "TFLM reference"

    def __init__(self, path: Path) -> None:
        data = Path(path).read_bytes()
        self.it = _interpreter(data)
        self.threads = 1
        self.inp = self.it.get_input_details(0)
        count = S.Model.GetRootAs(data, 0).Subgraphs(0).OutputsLength()
        self.outs = [self.it.get_output_details(k) for k in range(count)]

    @staticmethod
    def _grid(details: dict[str, Any]) -> tuple[float, int] | None:
        q = details.get("quantization_parameters") or {}
        scales = q.get("scales")
        return None if scales is None or len(scales) == 0 else (float(scales[0]), int(q["zero_points"][0]))

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 4:
            x = np.transpose(x, (0, 2, 3, 1))
        grid_in = self._grid(self.inp)
        outs: list[list[np.ndarray]] = []
        for i in range(len(x)):
            xi = x[i:i + 1]
            if self.inp["dtype"] == np.int8 and grid_in is not None:
                xi = quantize_codes(xi, *grid_in)
            try:
                self.it.set_input(np.ascontiguousarray(xi, dtype=self.inp["dtype"]), 0)
                self.it.invoke()
            except (RuntimeError, ValueError) as e:
                raise TargetError(f"TFLM failed on input {xi.shape}: {' '.join(str(e).split())[:200]}") from None
            outs.append([output_value(np.array(self.it.get_output(k)), d["dtype"], self._grid(d))
                         for k, d in enumerate(self.outs)])
        return pack([np.concatenate(col).astype(np.float32) for col in zip(*outs, strict=True)])


def _c_array(data: bytes) -> str:
    rows = [", ".join(f"0x{b:02x}" for b in data[i:i + 12]) for i in range(0, len(data), 12)]
    return ",\n    ".join(rows)


def _c_list(values: list[Any]) -> str:
    return "{" + ", ".join(str(int(v)) for v in values) + "}"


def write_sources(model: bytes, io: dict[str, dict[str, Any]], folder: Path, arena: int) -> list[Path]:
    """``model_data.cc`` and ``model_data.h``: the flatbuffer, the I/O grids, the arena size and
    the op resolver calls, self-contained C++17."""
    ops = model_ops(model)
    missing = [op for op in ops if op not in RESOLVER_METHODS]
    if missing:
        raise TargetError(f"no MicroMutableOpResolver method known for {', '.join(missing)}; use another target")
    arena16 = -(-arena // ALIGNMENT) * ALIGNMENT

    def tensor(prefix: str, t: dict[str, Any]) -> list[str]:
        q = t["quantization"]
        return [f"// {prefix.lower()} tensor '{t['name']}': {t['dtype']} {t['layout']}",
                f"constexpr int k{prefix}Dims = {len(t['shape'])};",
                f"constexpr int k{prefix}Shape[k{prefix}Dims] = {_c_list(t['shape'])};",
                f"constexpr float k{prefix}Scale = {q['scale']!r}f;",
                f"constexpr int k{prefix}ZeroPoint = {q['zero_point']};"]

    header = [
        "// Generated by eptq-deploy: the quantized model for TensorFlow Lite for Microcontrollers.",
        "// Self-contained (no TFLM header needed); include it where the interpreter is set up:",
        "//   tflite::MicroMutableOpResolver<kModelOpCount> resolver;  AddModelOps(resolver);",
        "//   alignas(16) static uint8_t arena[kTensorArenaSize];",
        "//   tflite::MicroInterpreter interpreter(tflite::GetModel(g_model_data), resolver, arena, kTensorArenaSize);",
        "#ifndef EPTQ_DEPLOY_MODEL_DATA_H_",
        "#define EPTQ_DEPLOY_MODEL_DATA_H_",
        "",
        "extern const unsigned char g_model_data[];",
        "extern const unsigned int g_model_data_len;",
        "",
        f"// tensor arena measured by TFLM's recording allocator ({arena} bytes), rounded up to {ALIGNMENT}",
        f"constexpr unsigned int kTensorArenaSize = {arena16};",
        *(["// sub-8-bit weights are LUT-compressed: TFLM_DECODE ops (AddDecode) unpack each into the arena",
            "// before its layer runs; the arena size above includes those buffers"] if DECODE_OP in ops else []),
        "",
        *tensor("Input", io["input"]),
        "// codes: q = clamp(round(x / kInputScale) + kInputZeroPoint, -128, 127), halves away from zero",
        *tensor("Output", io["output"]),
        "// scores: (q - kOutputZeroPoint) * kOutputScale",
        *[line for k, o in enumerate(io.get("outputs", [])[1:], start=1)  # further heads: interpreter.output(k)
          for line in tensor(f"Output{k}", o)],
        "",
        f"constexpr int kModelOpCount = {len(ops)};",
        "",
        "// Registers every op the model uses with a tflite::MicroMutableOpResolver<kModelOpCount>.",
        "template <typename Resolver>",
        "inline void AddModelOps(Resolver& resolver) {",
        *[f"  resolver.{RESOLVER_METHODS[op]}();  // {op}" for op in ops],
        "}",
        "",
        "#endif  // EPTQ_DEPLOY_MODEL_DATA_H_",
        "",
    ]
    source = [
        "// Generated by eptq-deploy: the model flatbuffer, read in place by TFLM (hence the alignment).",
        '#include "model_data.h"',
        "",
        f"alignas({ALIGNMENT}) const unsigned char g_model_data[] = {{",
        f"    {_c_array(model)}}};",
        f"const unsigned int g_model_data_len = {len(model)};",
        "",
    ]
    h, cc = Path(folder) / "model_data.h", Path(folder) / "model_data.cc"
    h.write_text("\n".join(header))
    cc.write_text("\n".join(source))
    return [cc, h]


class TfliteMicroTarget(TfliteInt8Target):
    name = "tflite-micro"
    description = ("TFLite int8 flatbuffer on TensorFlow Lite for Microcontrollers (reference kernels), with "
                   "model_data.cc/.h, op resolver calls and the measured tensor arena")
    runtime = "tflite-micro"
    rounding_rules = ("tflite-micro",)
    #: TFLM's RELU6 clamps in its input's grid without requantizing (RELU does requantize): same grid
    rules = replace(TfliteInt8Target.rules, rounding="tflite-micro",
                    shared_grid_ops=TfliteInt8Target.rules.shared_grid_ops | {"relu6"})
    kernel_variants = ({},)

    def emit(self, graph: QuantGraph, folder: Path, *, quantized: bool = True) -> list[Path]:
        written = super().emit(graph, folder, quantized=quantized)
        if not quantized:
            return written
        raw = written[0].read_bytes()
        model = compress_weights(raw, graph)
        if model is not raw:
            written[0].write_bytes(model)
            side = Path(folder) / COMPRESSION_FILE
            side.write_text(json.dumps({"model_bytes": len(raw), "arena_bytes": arena_bytes(raw)}, indent=1) + "\n")
            written.append(side)
        return written + write_sources(model, self.io_contract(graph), Path(folder), arena_bytes(model))

    def load(self, folder: Path, *, float_model: bool = False, threads: int = 1, kernels: str = "auto") -> Runner:
        return TfliteMicroRunner(Path(folder) / (self.float_model_file if float_model else self.model_file))

    def runtime_versions(self) -> dict[str, str]:
        return {"tflite-micro": version("tflite-micro"), "flatbuffers": version("flatbuffers")}

    def read_back_mismatches(self, folder: Path, graph: QuantGraph) -> list[str]:
        """As tflite-int8's, with each LUT-compressed weight decoded from the file first."""
        m = S.ModelT.InitFromPackedBuf((Path(folder) / self.model_file).read_bytes(), 0)
        sg, names, tensors = m.subgraphs[0], op_names(m), stored_tensors(m)
        for o in sg.operators:
            if names[o.opcodeIndex] == DECODE_OP:
                for k, out in enumerate(o.outputs):  # inputs: (packed indices, ancillary data) per output
                    enc, anc = (sg.tensors[i] for i in o.inputs[2 * k:2 * k + 2])
                    decoded = sg.tensors[out]  # shape, type and grid of the weight; the indices keep its name
                    data = decode_lut(m.buffers[enc.buffer].data, m.buffers[anc.buffer].data,
                                      [int(d) for d in decoded.shape])
                    tensors[enc.name.decode()] = {**tensors[decoded.name.decode()], "data": data}
        return read_back_mismatches(m, graph, tensors)

    def inspect(self, folder: Path) -> dict:
        """The ops and resolver calls, the measured arena and the flash the model array takes."""
        path = Path(folder) / self.model_file
        model = path.read_bytes()
        side = Path(folder) / COMPRESSION_FILE
        before = json.loads(side.read_text()) if side.is_file() else None
        m = S.ModelT.InitFromPackedBuf(model, 0)
        codes = op_names(m)
        ops = Counter(codes[o.opcodeIndex] for o in m.subgraphs[0].operators)
        return {"runtime_ops": dict(sorted(ops.items())),
                "resolver": [RESOLVER_METHODS.get(op, op) for op in model_ops(model)],
                "arena_bytes": arena_bytes(model), "model_bytes": len(model), "kernels": "TFLM reference",
                "weight_compression": weight_compression(model, before)}
