"""SiLU channel equalisation: give every channel of a SiLU's tensors the same share of one 8-bit grid.

A conv folded with its batch norm often gives channels of very different ranges (YOLOX-Nano's first
SiLU: 0.15 to 88). One per-tensor activation grid then either rounds the small channels away or clips
the large ones; YOLOX-Nano loses half its mAP that way at int8, and keeps it with 16-bit grids on the
SiLU tensors alone. For a ReLU, cross-layer equalisation (Nagel et al., 2019) rescales channels
through the activation; a SiLU is not scale-invariant, so here the rescale is made exact by the graph:

    before:  z = conv(x; W, b)          s = sigmoid(z)   y = z * s          next(y; V)
    after:   z' = conv(x; W/c, b/c)     z = rescale(z')  s = sigmoid(z)     y' = z' * s     next(y'; V*c)

``rescale`` is a 1x1 depthwise conv with weights ``c`` (one per channel, no bias), so every target
writes it as it writes any depthwise layer. In float the graph computes what it did (y' = y / c,
and ``next`` multiplies its input channel by c); quantized, z' and y' hold equalised channels, and z
is read only by the sigmoid, which saturates, so its grid may clip. Each channel's factor makes its
largest post-SiLU value the tensor's largest (a depthwise ``next`` stores any per-channel factor
exactly); where ``next`` sums channels, the factor is the balance of the channel's activation range
and its weights' range (the square root of their ratio), as in cross-layer equalisation. No channel
is amplified more than the grid's resolution can use (2**(bits-1)).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from .float_exec import run_float
from .graph import Node, QuantGraph, TensorInfo

#: weighted ops that may read an equalised SiLU output (their input channels take the factor)
_READERS = frozenset({"conv2d", "depthwise_conv2d"})


def silu_sites(g: QuantGraph) -> list[tuple[Node, Node, Node]]:
    """(conv, sigmoid, mul) triples computing a SiLU whose rescale can be made exact: the conv's
    output is read only by the sigmoid and the product, the product only by convolutions (as their
    data input), and none of the three tensors is a graph output."""
    consumers, sites = g.consumers(), []
    for p in g.nodes:
        if p.op not in ("conv2d", "depthwise_conv2d") or p.attrs.get("activation", "none") != "none":
            continue
        z = p.outputs[0]
        readers = consumers.get(z, [])
        sig = [n for n in readers if n.op == "sigmoid"]
        mul = [n for n in readers if n.op == "mul"]
        if len(readers) != 2 or len(sig) != 1 or len(mul) != 1:
            continue
        s, m = sig[0], mul[0]
        if sorted(m.inputs) != sorted([z, s.outputs[0]]) or [n.name for n in consumers.get(s.outputs[0], [])] != [m.name]:
            continue
        nxt = consumers.get(m.outputs[0], [])
        if not nxt or any(n.op not in _READERS or n.inputs[0] != m.outputs[0] or n.inputs.count(m.outputs[0]) != 1
                          or n.op == "conv2d" and n.attrs.get("groups", 1) != 1 for n in nxt):
            continue
        if {z, s.outputs[0], m.outputs[0]} & set(g.outputs):
            continue
        sites.append((p, s, m))
    return sites


def channel_ranges(g: QuantGraph, tensors: Iterable[str], batches: Iterable[torch.Tensor]) -> dict[str, np.ndarray]:
    """Largest absolute value per channel (axis 1) of each named tensor over the batches."""
    want = set(tensors)
    out: dict[str, np.ndarray] = {}

    def hook(name: str, y: torch.Tensor) -> None:
        if name in want:
            r = y.detach().abs().transpose(0, 1).reshape(y.shape[1], -1).amax(1).double().numpy()
            out[name] = np.maximum(out[name], r) if name in out else r

    with torch.no_grad():
        for x in batches:
            run_float(g, x, hook=hook)
    return out


def factors(g: QuantGraph, mul: Node, r: np.ndarray, bits: int) -> np.ndarray:
    """Per-channel factor c of one SiLU site (see the module docstring), in [2**-(bits-1), 1]."""
    top = float(r.max())
    if not top > 0:
        return np.ones_like(r)
    readers = [n for n in g.consumers()[mul.outputs[0]]]
    if all(n.op == "depthwise_conv2d" for n in readers):
        c = r / top
    else:  # balance: the channel's activation range over its largest weight, each taken relative to its maximum
        w = np.zeros_like(r)
        for n in readers:
            data = np.abs(np.asarray(g.tensors[n.inputs[1]].data, np.float64))
            per = data.reshape(data.shape[0], -1).max(1) if n.op == "depthwise_conv2d" else \
                data.transpose(1, 0, 2, 3).reshape(data.shape[1], -1).max(1)
            w = np.maximum(w, per)
        a, b = r / top, w / max(float(w.max()), 1e-30)
        c = np.sqrt(a / np.maximum(b, 1e-30))
        c = c / c.max()
    return np.clip(c, 2.0 ** -(bits - 1), 1.0)


def equalize_silu(g: QuantGraph, batches: list[torch.Tensor], bits: int) -> list[str]:
    """Rewrite every equalisable SiLU of ``g`` in place (see the module docstring); returns the
    convolutions whose SiLU was equalised."""
    sites = silu_sites(g)
    if not sites:
        return []
    ranges = channel_ranges(g, [m.outputs[0] for _, _, m in sites], batches)
    done = []
    for p, s, m in sites:
        c = factors(g, m, ranges[m.outputs[0]], bits)
        if np.allclose(c, 1.0):
            continue
        rescale(g, p, s, m, c)
        done.append(p.name)
    return done


def rescale(g: QuantGraph, p: Node, s: Node, m: Node, c: np.ndarray) -> None:
    """Insert the exact rescale of one site with per-channel factors ``c``."""
    T = g.tensors
    w, b = T[p.inputs[1]], T[p.inputs[2]]
    shape = (-1,) + (1,) * (w.data.ndim - 1)
    w.data = (w.data / c.reshape(shape)).astype(w.data.dtype)
    b.data = (b.data / c).astype(b.data.dtype)
    for n in g.consumers()[m.outputs[0]]:
        v = T[n.inputs[1]]
        axis = 0 if n.op == "depthwise_conv2d" else 1
        v.data = (v.data * c.reshape((-1, 1, 1, 1) if axis == 0 else (1, -1, 1, 1))).astype(v.data.dtype)
    z_scaled = p.outputs[0]  # z' keeps the conv's name and is still read by the product
    z = f"{z_scaled}.silu_rescaled"
    name = f"{p.name}.rescale"
    shape_z = T[z_scaled].shape
    T[z] = TensorInfo(z, shape_z, "activation")
    T[f"{name}.weight"] = TensorInfo(f"{name}.weight", (len(c), 1, 1, 1), "weight",
                                     data=c.reshape(-1, 1, 1, 1).astype(np.float32))
    T[f"{name}.bias"] = TensorInfo(f"{name}.bias", (len(c),), "bias", data=np.zeros(len(c), np.float32))
    node = Node(name, "depthwise_conv2d", [z_scaled, f"{name}.weight", f"{name}.bias"], [z],
                {"stride": [1, 1], "pads": [0, 0, 0, 0], "dilation": [1, 1], "groups": len(c), "activation": "none"},
                source=f"{p.source} (SiLU equalisation)")
    s.inputs = [z if i == z_scaled else i for i in s.inputs]
    g.nodes.insert(g.nodes.index(s), node)
