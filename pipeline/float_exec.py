"""Float execution of the canonical graph: what calibration, the Hessian pass and EPTQ run.

``run_float`` executes the graph with float weights (the capture check, calibration
statistics, Hessian scores, EPTQ's float targets); ``float_op`` is the float op table that
the integer simulation (``simulate.py``) also uses for ops a runtime computes in float.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .graph import Node, QuantGraph


# ------------------------------------------------------------- float op table
def conv(n: Node, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
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


def pool_pad(n: Node, x: torch.Tensor, value: float) -> tuple[torch.Tensor, tuple[int, int]]:
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


_OFFSET = {"half_pixel": (0.5, 0.5), "pytorch_half_pixel": (0.5, 0.5), "tf_half_pixel_for_nn": (0.5, 0.0),
           "align_corners": (0.0, 0.0), "asymmetric": (0.0, 0.0)}  # coord -> (before, after) the ratio


def resize_source(a: dict, axis: int, in_size: int) -> torch.Tensor:
    """Input coordinate (float32, as the runtimes compute it) of each output pixel along spatial ``axis``
    (0: H, 1: W) of a resize node with attributes ``a``: ``(x + before) / scale - after`` as onnxruntime
    divides, ``(x + before) * step - after`` as TFLite multiplies."""
    out = int(a["size"][axis])
    x = torch.arange(out, dtype=torch.float32)
    coord = a["coord"]
    if out == 1 and coord == "pytorch_half_pixel":
        return torch.zeros(1)
    before, after = _OFFSET[coord]
    if "step" in a:
        return (x + before) * torch.tensor(a["step"][axis], dtype=torch.float32) - after
    if coord == "align_corners":  # onnxruntime: x * (in - 1) / (out - 1), in that order
        return torch.zeros(1) if out == 1 else x * float(in_size - 1) / float(out - 1)
    return (x + before) / torch.tensor(a["scale"][axis], dtype=torch.float32) - after


def resize(x: torch.Tensor, a: dict) -> torch.Tensor:
    """Nearest or (bi)linear resize of NCHW ``x``, one spatial axis after the other."""
    for axis, dim in ((0, 2), (1, 3)):
        size = x.shape[dim]
        c = resize_source(a, axis, size)
        if a["mode"] == "nearest":
            c64, rule = c.double(), a["nearest"]  # rounded in float64: c + 0.5 in float32 can round up
            i = {"floor": torch.floor(c64), "ceil": torch.ceil(c64), "round_prefer_ceil": torch.floor(c64 + 0.5),
                 "round_prefer_floor": torch.ceil(c64 - 0.5)}[rule]
            x = x.index_select(dim, i.long().clamp(0, size - 1))
            continue
        c = c.clamp(0, size - 1)  # outside the image: the edge pixel (both runtimes)
        lo = c.floor().long()
        hi = (lo + 1).clamp(max=size - 1)
        shape = [1, 1, 1, 1]
        shape[dim] = -1
        w = (c - lo.float()).view(shape).to(x.dtype)
        x = x.index_select(dim, lo) * (1 - w) + x.index_select(dim, hi) * w
    return x


def conv_transpose(n: Node, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Transposed convolution node ``n``: torch's full output, extended by output_padding at the end,
    cropped by pads, plus the bias (ONNX's and TFLite's definition)."""
    a = n.attrs
    y = F.conv_transpose2d(x, w, None, tuple(a["stride"]), 0, 0, a["groups"], tuple(a["dilation"]))
    t, l, bo, r = a["pads"]
    oh, ow = a["output_padding"]
    y = F.pad(y, (0, ow, 0, oh))
    y = y[:, :, t:y.shape[2] - bo, l:y.shape[3] - r] + b.view(1, -1, 1, 1)
    return apply_activation(y, a.get("activation", "none"))


def float_op(n: Node, xs: list[torch.Tensor], pad_value: float = 0.0) -> torch.Tensor:
    """Non-weighted canonical ops on float (or integer-code) tensors.

    ``pad_value`` is what zero padding becomes on the tensor's grid (the zero point
    when the tensor holds integer codes).
    """
    op, a = n.op, n.attrs
    x = xs[0]
    if op == "add":
        return apply_activation(xs[0] + xs[1], a.get("activation", "none"))
    if op == "softmax":
        return torch.softmax(x, a["axis"])
    if op == "sub":
        return apply_activation(xs[0] - xs[1], a.get("activation", "none"))
    if op == "div":
        return apply_activation(xs[0] / xs[1], a.get("activation", "none"))
    if op == "transpose":
        return x.permute(a["perm"])
    if op == "resize":
        return resize(x, a)
    if op == "leaky_relu":
        return F.leaky_relu(x, a["alpha"])
    if op == "prelu":
        slope = xs[1].reshape((1, -1) + (1,) * (x.dim() - 2))
        return torch.where(x >= 0, x, x * slope)
    if op == "tanh":
        return torch.tanh(x)
    if op == "exp":
        return torch.exp(x)
    if op == "conv_transpose2d":
        return conv_transpose(n, x, xs[1], xs[2])
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
        xp, pad = pool_pad(n, x, float("-inf"))
        if pad != (0, 0):  # torch pads max pools with -inf itself
            return F.max_pool2d(x, a["kernel"], a["stride"], pad)
        return F.max_pool2d(xp, a["kernel"], a["stride"], 0)
    if op == "avg_pool2d":
        xp, pad = pool_pad(n, x, 0.0)
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


def pack(values: list[Any]) -> Any:
    """A graph's outputs as callers take them: the value itself for one output, a tuple for several
    (a classifier keeps returning one tensor; a detector's heads come back in the graph's order)."""
    return values[0] if len(values) == 1 else tuple(values)


def unpack(y: Any) -> list[Any]:
    """The list of outputs ``pack`` made (a single tensor or array is one output)."""
    return list(y) if isinstance(y, (tuple, list)) else [y]


def run_float(g: QuantGraph, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None,
              hook: Callable[[str, torch.Tensor], None] | None = None) -> Any:
    """Execute ``g`` in float; ``weights`` overrides stored constants (name -> tensor). Returns the
    output tensor, or a tuple of them in ``g.outputs`` order (``pack``)."""
    env: dict[str, torch.Tensor] = {g.inputs[0]: x}
    if hook:
        hook(g.inputs[0], x)
    for n, dead in zip(g.nodes, g.dead_after(), strict=True):
        if n.op in ("conv2d", "depthwise_conv2d", "linear"):
            w = weights[n.inputs[1]] if weights and n.inputs[1] in weights else torch.from_numpy(g.tensors[n.inputs[1]].data)
            b = weights[n.inputs[2]] if weights and n.inputs[2] in weights else torch.from_numpy(g.tensors[n.inputs[2]].data)
            xin = env[n.inputs[0]]
            y = F.linear(xin, w, b) if n.op == "linear" else conv(n, xin, w, b)
            y = apply_activation(y, n.attrs["activation"])
        else:
            y = float_op(n, node_inputs(g, n, env, weights))
        env[n.outputs[0]] = y
        if hook:
            hook(n.outputs[0], y)
        release(env, dead)
    return pack([env[o] for o in g.outputs])


def node_inputs(g: QuantGraph, n: Node, env: dict[str, torch.Tensor],
                weights: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The input values of ``n``: activations from ``env``, stored constants (a conv_transpose2d's
    weights, a sub's constant) from the graph unless ``weights`` overrides them."""
    def one(i: str) -> torch.Tensor:
        if i in env:
            return env[i]
        if weights and i in weights:
            return weights[i]
        return torch.from_numpy(g.tensors[i].data)

    return [one(i) for i in n.inputs]


def release(env: dict[str, torch.Tensor], dead: list[str]) -> None:
    """Drop activations no later node reads (``QuantGraph.dead_after``)."""
    for t in dead:
        env.pop(t, None)
