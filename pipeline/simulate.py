"""Simulation: run a graph in float, or exactly as an integer target computes it.

``run_float`` executes the canonical graph with float weights (capture check,
calibration statistics). ``run_integer`` executes the quantized graph on integer
codes: integer weights, int32 bias, integer accumulation (float64 holds every
int32 sum exactly), then the target's requantisation rule (``ROUNDING``) with the
fused activation clamps applied in the integer domain. Ops a runtime executes in
float between a dequantize and a quantize (hardswish, sigmoid, mul, ...) are
computed in float32 on dequantized values, as the runtime does; where the runtime
has its own integer kernel for an op instead (TFLite's ADD, onnxruntime's fused
QLinearAdd, ...), the rule's ``integer_op`` computes what that kernel computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError
from .graph import SAME_GRID_OPS, Node, QParams, QuantGraph


# ------------------------------------------------------------- float op table
def _conv(n: Node, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
          pad_value: Sequence[float] | None = None) -> torch.Tensor:
    """Convolution node ``n``; the padding holds ``pad_value`` per channel (default: the
    node's ``pad_value`` attribute, else zero)."""
    t, l, bo, r = n.attrs["pads"]
    values = n.attrs.get("pad_value") if pad_value is None else pad_value
    if values is not None and any(n.attrs["pads"]):
        x, pad = pad_channels(x, n.attrs["pads"], values), (0, 0)
    elif t != bo or l != r:
        x = F.pad(x, (l, r, t, bo))
        pad = (0, 0)
    else:
        pad = (t, l)
    return F.conv2d(x, w, b, tuple(n.attrs["stride"]), pad, tuple(n.attrs["dilation"]), n.attrs["groups"])


def pad_channels(x: torch.Tensor, pads: Sequence[int], values: Sequence[float]) -> torch.Tensor:
    """Spatial padding (top, left, bottom, right) of NCHW ``x`` with one value per channel."""
    t, l, b, r = pads
    n, c, h, w = x.shape
    out = torch.as_tensor(values, dtype=x.dtype).view(1, c, 1, 1).repeat(n, 1, h + t + b, w + l + r)
    out[:, :, t:t + h, l:l + w] = x
    return out


def pad_codes(values: Sequence[float], qp: QParams) -> np.ndarray:
    """Integer codes of per-channel pad values on grid ``qp``; refused unless exact.

    Padding is a constant the integer kernel reads as it is: a value between two codes
    would have to be rounded, and the model would no longer compute its float graph's border.
    """
    q = np.asarray(values, np.float64) / float(qp.scale[0]) + int(qp.zero_point[0])
    if not np.all(q == np.round(q)) or q.min() < qp.qmin or q.max() > qp.qmax:
        raise UsageError(f"pad values {list(values)} are not codes of the input grid (scale {float(qp.scale[0])}, "
                         f"zero point {int(qp.zero_point[0])}); quantize with fold_preprocessing so the input grid "
                         "is the pixel grid")
    return q.astype(np.int64)


def _pool_pad(n: Node, x: torch.Tensor, value: float) -> tuple[torch.Tensor, tuple[int, int]]:
    t, l, bo, r = n.attrs["pads"]
    if t != bo or l != r:
        return F.pad(x, (l, r, t, bo), value=value), (0, 0)
    return x, (t, l)


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "relu6":
        return F.relu6(y)
    return y


def float_op(n: Node, xs: list[torch.Tensor], pad_value: float = 0.0) -> torch.Tensor:
    """Non-weighted canonical ops on float (or integer-code) tensors.

    ``pad_value`` is what zero padding becomes on the tensor's grid (the zero point
    when the tensor holds integer codes).
    """
    op, a = n.op, n.attrs
    x = xs[0]
    if op == "add":
        return apply_activation(xs[0] + xs[1], a.get("activation", "none"))
    if op == "mul":
        return xs[0] * xs[1]
    if op == "concat":
        return torch.cat(xs, a["axis"])
    if op == "relu":
        return F.relu(x)
    if op == "relu6":
        return F.relu6(x)
    if op == "hardswish":
        return F.hardswish(x)
    if op == "hardsigmoid":
        return F.hardsigmoid(x)
    if op == "sigmoid":
        return torch.sigmoid(x)
    if op == "max_pool2d":
        xp, pad = _pool_pad(n, x, float("-inf"))
        if pad != (0, 0):  # torch pads max pools with -inf itself
            return F.max_pool2d(x, a["kernel"], a["stride"], pad)
        return F.max_pool2d(xp, a["kernel"], a["stride"], 0)
    if op == "avg_pool2d":
        xp, pad = _pool_pad(n, x, 0.0)
        return F.avg_pool2d(xp, a["kernel"], a["stride"], pad, count_include_pad=a["count_include_pad"])
    if op == "global_avg_pool":
        return x.mean((2, 3), keepdim=True)
    if op == "pad":
        rank = x.dim()
        p = a["pads"]
        tp: list[int] = []
        for d in reversed(range(rank)):
            tp += [p[d], p[rank + d]]
        return F.pad(x, tp, value=pad_value)
    if op == "slice":
        idx = [slice(None)] * x.dim()
        for ax, s, e, st in zip(a["axes"], a["starts"], a["ends"], a["steps"], strict=True):
            idx[ax] = slice(s, e, st)
        return x[tuple(idx)]
    if op == "flatten":
        return x.reshape(x.shape[0], -1)
    if op == "reshape":
        return x.reshape([x.shape[0]] + list(a["shape"][1:]))
    raise NotImplementedError(op)


def run_float(g: QuantGraph, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None,
              hook: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Execute ``g`` in float; ``weights`` overrides stored constants (name -> tensor)."""
    env: dict[str, torch.Tensor] = {g.inputs[0]: x}
    if hook:
        hook(g.inputs[0], x)
    for n, dead in zip(g.nodes, g.dead_after(), strict=True):
        if n.op in ("conv2d", "depthwise_conv2d", "linear"):
            w = weights[n.inputs[1]] if weights and n.inputs[1] in weights else torch.from_numpy(g.tensors[n.inputs[1]].data)
            b = weights[n.inputs[2]] if weights and n.inputs[2] in weights else torch.from_numpy(g.tensors[n.inputs[2]].data)
            xin = env[n.inputs[0]]
            y = F.linear(xin, w, b) if n.op == "linear" else _conv(n, xin, w, b)
            y = apply_activation(y, n.attrs["activation"])
        else:
            y = float_op(n, [env[i] for i in n.inputs])
        env[n.outputs[0]] = y
        if hook:
            hook(n.outputs[0], y)
        release(env, dead)
    return env[g.outputs[0]]


def release(env: dict[str, torch.Tensor], dead: list[str]) -> None:
    """Drop activations no later node reads (``QuantGraph.dead_after``)."""
    for t in dead:
        env.pop(t, None)


# ------------------------------------------------------------ rounding rules
class RoundingRule:
    """How a runtime turns an int32 accumulator or a float into an integer code.

    Targets declare which rule their runtime follows (by name, see ``ROUNDING``); the
    simulation then reproduces that runtime's integers.
    """

    name = "base"

    def round(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def multiplier(self, s_in: np.ndarray, s_w: np.ndarray, s_out: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def requantize(self, acc: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
        """acc (int32 values in float64) * mult, rounded; before the zero point is added."""
        raise NotImplementedError

    def quantize(self, x: torch.Tensor, qp: QParams) -> torch.Tensor:
        """Float32 values to codes, as the runtime's quantize op does."""
        raise NotImplementedError

    def requantize_node(self, n: Node, acc: torch.Tensor, s_in: np.ndarray, s_w: np.ndarray,
                        s_out: np.ndarray) -> torch.Tensor:
        """The accumulator of weighted node ``n`` on the output grid, before the zero point."""
        mult = self.multiplier(s_in, s_w, s_out)
        return self.requantize(acc, mult.reshape((1, -1) + (1,) * (acc.dim() - 2)))

    def integer_op(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor | None:
        """Output codes of a non-weighted op where the runtime has its own integer kernel for it.

        ``xs`` are the input codes on grids ``qps``; None means the runtime dequantizes,
        computes in float (``float_kernel``) and quantizes (the default).
        """
        return None

    def float_kernel(self, n: Node, xs: list[torch.Tensor]) -> torch.Tensor:
        """A non-weighted op on dequantized float32 inputs, as the runtime computes it between
        its dequantize and quantize (default: torch's float op)."""
        return float_op(n, xs)


class FloatHalfEvenRule(RoundingRule):
    """Strict QDQ: float32 multiplier and product, round half to even; every other op as
    DequantizeLinear -> float32 op -> QuantizeLinear (onnxruntime's QLinearConv and QGemm)."""

    name = "float-half-even"

    def round(self, v: torch.Tensor) -> torch.Tensor:
        return torch.round(v)

    def multiplier(self, s_in: np.ndarray, s_w: np.ndarray, s_out: np.ndarray) -> torch.Tensor:
        m = (np.float32(s_in) * s_w.astype(np.float32)).astype(np.float32) / np.float32(s_out)
        return torch.from_numpy(m.astype(np.float32))

    def requantize(self, acc: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
        return torch.round(acc.float() * mult).double()

    def quantize(self, x: torch.Tensor, qp: QParams) -> torch.Tensor:
        s = torch.tensor(float(qp.scale[0]), dtype=torch.float32)
        q = torch.round(x.float() / s) + float(qp.zero_point[0])
        return q.clamp(qp.qmin, qp.qmax).double()


# ------------------------------------------------------ TFLite fixed point
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


def _srdhm(a: torch.Tensor, b: torch.Tensor | int, bits: int = 32) -> torch.Tensor:
    """gemmlowp SaturatingRoundingDoublingHighMul on int64 tensors holding int32 (or int16) values."""
    lo = -(2 ** (bits - 1))
    ab = a * b
    half = 1 << (bits - 2)
    r = torch.div(ab + torch.where(ab >= 0, half, 1 - half), 2 * half, rounding_mode="trunc")
    return torch.where((a == lo) & (torch.as_tensor(b) == lo), -lo - 1, r)


def _rdbpot(x: torch.Tensor, e: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp RoundingDivideByPOT: x / 2**e rounded half away from zero."""
    e = torch.as_tensor(e, dtype=torch.int64)
    mask = (1 << e) - 1
    threshold = (mask >> 1) + (x < 0).long()
    return (x >> e) + ((x & mask) > threshold).long()


def multiply_by_quantized_multiplier(x: torch.Tensor, q: torch.Tensor | int, shift: torch.Tensor | int) -> torch.Tensor:
    """``tflite::MultiplyByQuantizedMultiplier`` (double rounding, as the ai-edge-litert wheels are built)."""
    shift = torch.as_tensor(shift, dtype=torch.int64)
    left, right = shift.clamp(min=0), (-shift).clamp(min=0)
    return _rdbpot(_srdhm(x * (1 << left), torch.as_tensor(q, dtype=torch.int64)), right)


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
            acc = acc + _rdbpot(_srdhm((x - int(qp.zero_point[0])) * (1 << 20), q), -shift)
        q, shift = self._scalar_multiplier(twice_max / (2.0**20 * so))
        return _rdbpot(_srdhm(acc, q), -shift) + int(out.zero_point[0])

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
        if not _same_grid(qps[0], out):
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
        pre_out = _srdhm(x, m_out, 16)
        relu = x
        if e_relu > 0:
            relu = (relu * (1 << (e_relu - 1))).clamp(-32768, 32767)
        relu = _srdhm(relu, m_relu, 16)
        if e_relu > 0:
            relu = (relu * 2).clamp(-32768, 32767)
        if e_relu < 0:
            relu = _rdbpot(relu, -e_relu)
        relu = (relu + 32768) >> 1
        prod = relu * pre_out
        y = torch.where((relu == -32768) & (pre_out == -32768), 32767, torch.div(prod, 1 << 15, rounding_mode="trunc"))
        return _rdbpot(y, -e_out) + int(out.zero_point[0])

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


# ---------------------------------------------------- onnxruntime's fused kernels
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


class OnnxruntimeRule(FloatHalfEvenRule):
    """onnxruntime's CPU provider on x86-64 (MLAS kernels for AVX2).

    Convolutions and Gemm requantise as float-half-even (their int32 accumulators are exact:
    a layer whose uint8 x int8 pair sums could saturate in int16 gets uint8 weights in the
    onnx-qdq file, see ``targets/onnx_qdq.py``), and so does every op it runs as
    DQ -> float op -> Q, with HardSigmoid and HardSwish computed in float32 as its kernels
    compute them (``float_kernel``). Its QDQ fusion, however, turns DQ -> Add / Mul / AveragePool /
    GlobalAveragePool -> Q into com.microsoft QLinear* kernels whose float32 arithmetic on
    the uint8 codes rounds differently at (near-)ties; ``integer_op`` reproduces them bit
    for bit (measured against onnxruntime 1.32 over every uint8 code pair of many grids).
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
        return super().float_kernel(n, xs)

    def integer_op(self, n: Node, xs: list[torch.Tensor], qps: list[QParams], out: QParams) -> torch.Tensor | None:
        kernel = {"add": self._add, "mul": self._mul, "avg_pool2d": self._avg_pool2d,
                  "global_avg_pool": self._global_avg_pool}.get(n.op)
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
    def _global_avg_pool(n: Node, xs: list[np.ndarray], grids: list[tuple[np.float32, int]]) -> np.ndarray:
        """MlasQLinearGlobalAveragePool (SSE2): the integer sum times float32(s_in / (s_out * N)), clamped to
        the output range, rounded, plus z_out."""
        (si, zi), (so, zo) = grids
        count = xs[0].shape[2] * xs[0].shape[3]
        acc = (xs[0].sum((2, 3), keepdims=True) - zi * count).astype(np.float32)
        y = np.clip(acc * (si / (so * np.float32(count))), np.float32(-zo), np.float32(255 - zo))
        return cvt_f32_to_i32(y) + zo


class OpenvinoRule(FloatHalfEvenRule):
    """OpenVINO's CPU plugin on a QDQ graph: as strict QDQ, except that a residual add is
    fused into the convolution producing one of its inputs, whose own output
    quantization then only clamps (no rounding); the sum is quantized once."""

    name = "openvino"
    folds_residual_add = True


ROUNDING: dict[str, RoundingRule] = {r.name: r for r in (FloatHalfEvenRule(), TfliteRule(), XnnpackRule(),
                                                          OnnxruntimeRule(), OpenvinoRule())}


def folded_into_add(g: QuantGraph) -> set[str]:
    """Weighted nodes whose output feeds only an add, one per add (the later producer)."""
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
        if cands:
            out.add(max(cands, key=lambda c: c[0])[1].name)
    return out


def get_rule(name: str) -> RoundingRule:
    try:
        return ROUNDING[name]
    except KeyError:
        raise ValueError(f"unknown rounding rule {name!r}; known: {', '.join(ROUNDING)}") from None


# ---------------------------------------------------------- integer execution
def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    return ((q - float(qp.zero_point[0])).float() * float(qp.scale[0])).float()


def activation_bounds(activation: str, qp: QParams, rule: RoundingRule) -> tuple[float, float]:
    """Integer clamp range of a grid after a fused activation."""
    lo, hi = float(qp.qmin), float(qp.qmax)
    z = float(qp.zero_point[0])
    if activation in ("relu", "relu6"):
        lo = max(lo, z)
    if activation == "relu6":
        six = rule.round(torch.tensor(6.0, dtype=torch.float32) / float(qp.scale[0])).item() + z
        hi = min(hi, six)
    return lo, hi


def quantize_input(g: QuantGraph, x: torch.Tensor, rule: RoundingRule) -> torch.Tensor:
    return rule.quantize(x, g.tensors[g.inputs[0]].quant)


def run_integer(g: QuantGraph, x: torch.Tensor, rule: RoundingRule,
                hook: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integer codes of the graph output for float input ``x`` (codes as float64)."""
    T = g.tensors
    env: dict[str, torch.Tensor] = {g.inputs[0]: quantize_input(g, x, rule)}
    unrounded = folded_into_add(g) if getattr(rule, "folds_residual_add", False) else set()
    for n, dead in zip(g.nodes, g.dead_after(), strict=True):
        out = T[n.outputs[0]].quant
        if n.op in ("conv2d", "depthwise_conv2d", "linear"):
            xq, wt, bt = T[n.inputs[0]].quant, T[n.inputs[1]], T[n.inputs[2]]
            xc = env[n.inputs[0]] - float(xq.zero_point[0])
            acc = integer_accumulate(n, xc, wt.data, xq) + torch.from_numpy(bt.data.astype(np.float64)).reshape(
                (1, -1) + (1,) * (xc.dim() - 2))
            if n.name in unrounded:  # fused into the next add: the output grid only clamps
                mult = rule.multiplier(xq.scale[0], wt.quant.scale, out.scale[0]).to(acc.dtype)
                y = acc * mult.reshape((1, -1) + (1,) * (acc.dim() - 2)) + float(out.zero_point[0])
            else:
                y = rule.requantize_node(n, acc, xq.scale[0], wt.quant.scale, out.scale[0]) + float(out.zero_point[0])
            lo, hi = activation_bounds(n.attrs["activation"], out, rule)
            y = y.clamp(lo, hi)
        elif n.op in SAME_GRID_OPS:
            src = T[n.inputs[0]].quant
            y = float_op(n, [env[n.inputs[0]]], pad_value=float(src.zero_point[0]))
        elif n.op == "concat" and all(_same_grid(T[i].quant, out) for i in n.inputs):
            y = float_op(n, [env[i] for i in n.inputs])
        else:
            y = rule.integer_op(n, [env[i] for i in n.inputs], [T[i].quant for i in n.inputs], out)
            if y is None:
                xs = [dequantize(env[i], T[i].quant) for i in n.inputs]
                y = rule.quantize(rule.float_kernel(n, xs), out)
            if n.op == "add" and n.attrs.get("activation", "none") != "none":
                lo, hi = activation_bounds(n.attrs["activation"], out, rule)
                y = y.clamp(lo, hi)
        env[n.outputs[0]] = y
        if hook:
            hook(n.outputs[0], y)
        release(env, dead)
    return env[g.outputs[0]]


_F32_EXACT = 2**24  # every integer below this is exact in float32, whatever the summation order


def integer_accumulate(n: Node, xc: torch.Tensor, w_int: np.ndarray, xq: QParams) -> torch.Tensor:
    """Exact int32 accumulator (as float64) of conv/linear on zero-point-shifted codes.

    float32 kernels are much faster than float64 ones and exact while every partial
    sum stays below 2**24; the weights are split into high and low parts where a
    single pass could exceed that bound, and float64 is the fallback.
    """
    fan_in = int(np.prod(w_int.shape[1:]))
    x_max = max(abs(xq.qmin - int(xq.zero_point[0])), abs(xq.qmax - int(xq.zero_point[0])))
    w_max = int(np.abs(w_int).max()) if w_int.size else 0

    # padding in zero-point-shifted codes: the zero point itself, or a pad value's code
    pad = None if "pad_value" not in n.attrs else (pad_codes(n.attrs["pad_value"], xq) - int(xq.zero_point[0])).tolist()

    def run(x: torch.Tensor, w: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        wt = torch.from_numpy(w.astype(np.float64)).to(dtype)
        xx = x.to(dtype)
        y = F.linear(xx, wt) if n.op == "linear" else _conv(n, xx, wt, None, pad)
        return y.double()

    if fan_in * x_max * w_max < _F32_EXACT:
        return run(xc, w_int, torch.float32)
    hi, lo = np.floor_divide(w_int.astype(np.int64), 16), np.mod(w_int.astype(np.int64), 16)
    if fan_in * x_max * max(int(np.abs(hi).max()), 15) < _F32_EXACT:
        return 16.0 * run(xc, hi, torch.float32) + run(xc, lo, torch.float32)
    return run(xc, w_int, torch.float64)


def _same_grid(a: QParams, b: QParams) -> bool:
    return bool(a.scale[0] == b.scale[0] and a.zero_point[0] == b.zero_point[0] and a.signed == b.signed and a.bits == b.bits)


def simulate(g: QuantGraph, x: torch.Tensor, rule: RoundingRule) -> torch.Tensor:
    """Float (dequantized) output of the integer graph."""
    q = run_integer(g, x, rule)
    return dequantize(q, g.tensors[g.outputs[0]].quant)
