"""Simulation: run a graph in float, or exactly as an integer target computes it.

``run_float`` executes the canonical graph with float weights (capture check,
calibration statistics). ``run_integer`` executes the quantized graph on integer
codes: integer weights, int32 bias, integer accumulation (float64 holds every
int32 sum exactly), then the target's requantisation rule (``ROUNDING``) with the
fused activation clamps applied in the integer domain. Ops a runtime executes in
float between a dequantize and a quantize (hardswish, sigmoid, mul, ...) are
computed in float32 on dequantized values, as the runtime does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .graph import SAME_GRID_OPS, Node, QParams, QuantGraph


# ------------------------------------------------------------- float op table
def _conv(n: Node, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    t, l, bo, r = n.attrs["pads"]
    if t != bo or l != r:
        x = F.pad(x, (l, r, t, bo))
        pad = (0, 0)
    else:
        pad = (t, l)
    return F.conv2d(x, w, b, tuple(n.attrs["stride"]), pad, tuple(n.attrs["dilation"]), n.attrs["groups"])


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
    for n in g.nodes:
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
    return env[g.outputs[0]]


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


class FloatHalfEvenRule(RoundingRule):
    """onnxruntime: float32 multiplier, float32 product, round half to even."""

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


ROUNDING: dict[str, RoundingRule] = {r.name: r for r in (FloatHalfEvenRule(),)}


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
    for n in g.nodes:
        out = T[n.outputs[0]].quant
        if n.op in ("conv2d", "depthwise_conv2d", "linear"):
            xq, wt, bt = T[n.inputs[0]].quant, T[n.inputs[1]], T[n.inputs[2]]
            xc = env[n.inputs[0]] - float(xq.zero_point[0])
            acc = integer_accumulate(n, xc, wt.data, xq) + torch.from_numpy(bt.data.astype(np.float64)).reshape(
                (1, -1) + (1,) * (xc.dim() - 2))
            mult = rule.multiplier(xq.scale[0], wt.quant.scale, out.scale[0])
            shape = (1, -1) + (1,) * (acc.dim() - 2)
            y = rule.requantize(acc, mult.reshape(shape)) + float(out.zero_point[0])
            lo, hi = activation_bounds(n.attrs["activation"], out, rule)
            y = y.clamp(lo, hi)
        elif n.op in SAME_GRID_OPS:
            src = T[n.inputs[0]].quant
            y = float_op(n, [env[n.inputs[0]]], pad_value=float(src.zero_point[0]))
        elif n.op == "concat" and all(_same_grid(T[i].quant, out) for i in n.inputs):
            y = float_op(n, [env[i] for i in n.inputs])
        else:
            xs = [dequantize(env[i], T[i].quant) for i in n.inputs]
            y = rule.quantize(float_op(n, xs), out)
            if n.op == "add" and n.attrs.get("activation", "none") != "none":
                lo, hi = activation_bounds(n.attrs["activation"], out, rule)
                y = y.clamp(lo, hi)
        env[n.outputs[0]] = y
        if hook:
            hook(n.outputs[0], y)
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

    def run(x: torch.Tensor, w: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        wt = torch.from_numpy(w.astype(np.float64)).to(dtype)
        xx = x.to(dtype)
        y = F.linear(xx, wt) if n.op == "linear" else _conv(n, xx, wt, None)
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
