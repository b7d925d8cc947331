"""Simulation: run the quantized graph exactly as an integer target computes it.

``run_integer`` executes the quantized graph on integer
codes: integer weights, int32 bias, integer accumulation (float64 holds every
int32 sum exactly), then the target's requantisation rule (``get_rule``) with the
fused activation clamps applied in the integer domain. Ops a runtime executes in
float between a dequantize and a quantize (hardswish, sigmoid, mul, ...) are
computed in float32 on dequantized values, as the runtime does; where the runtime
has its own integer kernel for an op instead (TFLite's ADD, onnxruntime's fused
QLinearAdd, ...), the rule's ``integer_op`` computes what that kernel computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError
from .float_exec import conv, float_op, pack, release, unpack
from .graph import Node, QParams, QuantGraph, moves_codes


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


# ------------------------------------------------------------ rounding rules
class RoundingRule:
    """How a runtime turns an int32 accumulator or a float into an integer code.

    Targets declare which rule their runtime follows (by name); each target module defines
    and registers its runtime's rules (``register_rule``), so the simulation reproduces that
    runtime's integers and a plugin target brings its own.
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

    def unrounded_nodes(self, g: QuantGraph) -> set[str]:
        """Weighted nodes whose output grid the runtime only clamps, without rounding (a kernel
        fusing them into their consumer); none by default."""
        return set()


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


#: rules by name: the generic strict-QDQ rule here, each runtime's in its target's module
_RULES: dict[str, RoundingRule] = {}


def register_rule(rule: RoundingRule) -> RoundingRule:
    """Make ``rule`` findable by its name (target modules register their runtime's rules)."""
    _RULES[rule.name] = rule
    return rule


register_rule(FloatHalfEvenRule())


def get_rule(name: str) -> RoundingRule:
    try:
        return _RULES[name]
    except KeyError:
        raise ValueError(f"unknown rounding rule {name!r}; known: {', '.join(_RULES)} (a target module "
                         "registers its runtime's rules when it is loaded)") from None


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
                hook: Callable[[str, torch.Tensor], None] | None = None) -> Any:
    """Integer codes of the graph output(s) for float input ``x`` (codes as float64; a tuple in
    ``g.outputs`` order for several outputs, as ``float_exec.pack``)."""
    T = g.tensors
    env: dict[str, torch.Tensor] = {g.inputs[0]: quantize_input(g, x, rule)}
    unrounded = rule.unrounded_nodes(g)
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
        elif moves_codes(n):
            src = T[n.inputs[0]].quant
            y = float_op(n, [env[n.inputs[0]]], pad_value=float(src.zero_point[0]))
        elif n.op == "concat" and all(same_grid(T[i].quant, out) for i in n.inputs):
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
    return pack([env[o] for o in g.outputs])


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
        y = F.linear(xx, wt) if n.op == "linear" else conv(n, xx, wt, None, pad)
        return y.double()

    if fan_in * x_max * w_max < _F32_EXACT:
        return run(xc, w_int, torch.float32)
    hi, lo = np.floor_divide(w_int.astype(np.int64), 16), np.mod(w_int.astype(np.int64), 16)
    if fan_in * x_max * max(int(np.abs(hi).max()), 15) < _F32_EXACT:
        return 16.0 * run(xc, hi, torch.float32) + run(xc, lo, torch.float32)
    return run(xc, w_int, torch.float64)


def same_grid(a: QParams, b: QParams) -> bool:
    return bool(a.scale[0] == b.scale[0] and a.zero_point[0] == b.zero_point[0] and a.signed == b.signed and a.bits == b.bits)


def dequantize_outputs(g: QuantGraph, q: Any) -> Any:
    """``run_integer``'s codes as floats, each output on its own grid (packed the same way)."""
    return pack([dequantize(c, g.tensors[o].quant) for c, o in zip(unpack(q), g.outputs, strict=True)])


def simulate(g: QuantGraph, x: torch.Tensor, rule: RoundingRule) -> Any:
    """Float (dequantized) output(s) of the integer graph."""
    return dequantize_outputs(g, run_integer(g, x, rule))
