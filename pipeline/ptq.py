"""Post-training quantization: from a float graph and statistics to a quantized graph.

The profile says what the hardware allows (bits, symmetric, power-of-two, ranges);
the targets' rules say which tensors must share a grid or use a fixed one; this
module decides the grids (MSE search) and rounds weights to nearest. EPTQ starts
from the graph built here and learns the rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .calibrate import ActStats, quantize_bias, search_activation_grid, search_weight_grid
from .float_exec import run_float
from .fold import is_folded, pixel_grid
from .graph import WEIGHTED_OPS, Node, QParams, QuantGraph, TargetRules, moves_codes
from .model_io import tail_sources
from .tasks import read_through

#: values kept per tensor per batch for the threshold search
SAMPLES_PER_BATCH = 16384


def grid_groups(g: QuantGraph, rules: Iterable[TargetRules]) -> dict[str, str]:
    """Tensor -> representative of the set of tensors that must share one grid."""
    parent = {t: t for t in g.activation_names()}

    def find(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    shared: set[str] = set()
    for r in rules:
        shared |= r.shared_grid_ops
    for n in g.nodes:
        if moves_codes(n) or n.op in shared:
            for i in n.inputs:
                if i in parent:
                    parent[find(i)] = find(n.outputs[0])
    return {t: find(t) for t in parent}


def collect_stats(g: QuantGraph, batches: Iterable[torch.Tensor], seed: int = 0, progress: bool = True) -> dict[str, ActStats]:
    """Run the float graph over the representative set, sampling every activation."""
    stats = {t: ActStats() for t in g.activation_names()}
    gen = torch.Generator().manual_seed(seed)

    def hook(name: str, y: torch.Tensor) -> None:
        stats[name].update(y, SAMPLES_PER_BATCH, gen)

    with torch.no_grad():
        for x in tqdm(list(batches), desc="calibrate", unit="batch", disable=not progress, leave=False):
            run_float(g, x, hook=hook)
    return stats


def layer_weight_bits(g: QuantGraph, profile) -> dict[str, int]:
    """Weight bits per weighted node: the profile's, with its first/last-layer overrides."""
    nodes = g.weighted_nodes()
    bits = {n.name: profile.weights.bits for n in nodes}
    if nodes and profile.first_layer_weight_bits:
        bits[nodes[0].name] = profile.first_layer_weight_bits
    if nodes and profile.last_layer_weight_bits:
        bits[nodes[-1].name] = profile.last_layer_weight_bits
    return bits


def layer_packed_bytes(g: QuantGraph, n: Node, bits: int, bias_bits: int) -> int:
    """Bytes of one weighted layer's constants packed at ``bits`` per weight and ``bias_bits`` per bias
    (what a chip stores; the figure memory budgets are checked on)."""
    w = g.tensors[n.inputs[1]].data
    b = g.tensors[n.inputs[2]].data if len(n.inputs) > 2 else None
    return (int(np.size(w)) * bits + 7) // 8 + (0 if b is None else int(np.size(b)) * bias_bits // 8)


def packed_weight_bytes(g: QuantGraph, bits: dict[str, int], bias_bits: int) -> int:
    """``layer_packed_bytes`` summed over the weighted layers, each at ``bits[layer]``."""
    return sum(layer_packed_bytes(g, n, bits[n.name], bias_bits) for n in g.weighted_nodes())


def assign_activation_grids(g: QuantGraph, stats: dict[str, ActStats], profile, rules: list[TargetRules]) -> None:
    """Choose one grid per group of tensors that must share it; fixed grids where a target demands
    and for the pixel input of a folded graph."""
    groups = grid_groups(g, rules)
    members: dict[str, list[str]] = {}
    for t, rep in groups.items():
        members.setdefault(rep, []).append(t)
    producer = g.producer()
    a = profile.activations
    for ts in members.values():
        fixed = None
        for t in ts:
            p = producer.get(t)
            for r in rules:
                if p is not None and p.op in r.fixed_grids:
                    fixed = r.fixed_grids[p.op]
        if is_folded(g) and g.inputs[0] in ts:
            qp = pixel_grid(profile)
        elif fixed is not None:
            qp = fixed_grid(fixed, profile)
        else:
            merged = stats[ts[0]]
            for t in ts[1:]:
                merged = merged.merge(stats[t])
            then = consumer_function(g, ts)
            qp = search_activation_grid(merged, a.bits, symmetric=a.symmetric, power_of_two=a.power_of_two,
                                        signedness=a.signedness, then=then, importance=channel_importance(g, ts),
                                        span=getattr(then, "span", None))
        for t in ts:
            g.tensors[t].quant = copy.deepcopy(qp)


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


#: what a tensor's consumers all compute from it, when they saturate (``consumer_function``)
_CONSUMER_FUNCTIONS = {"sigmoid": torch.sigmoid, "silu": _silu, "tanh": torch.tanh, "relu": torch.relu,
                       "relu6": torch.nn.functional.relu6, "hardswish": torch.nn.functional.hardswish,
                       "hardsigmoid": torch.nn.functional.hardsigmoid, "softmax": None}


def consumer_function(g: QuantGraph, ts: list[str]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The element-wise function every reader of tensor group ``ts`` applies to it, or None.

    Readers are the graph's nodes and, for the graph's outputs, the float tail the host runs
    (a detector's objectness logits go through a sigmoid there) and the decode the post-processing
    names (SSD class logits: sigmoid(clip(z, +-100)), ``tasks.read_through``). A SiLU is a sigmoid
    of the tensor and the product of the two; a lone sigmoid, tanh or ReLU-like op reads it whole.
    """
    if len(ts) != 1:
        return None
    t = ts[0]
    if t in g.outputs and g.meta.get("postprocess"):  # an output the host decode reads through a function
        feeds, shapes = tail_sources(g.meta, [g.tensors[o].shape for o in g.outputs])
        through = read_through(g.meta["postprocess"], shapes) if shapes else {}
        fns = {through.get(j) for j in feeds[g.outputs.index(t)]} if feeds else set()
        if len(fns) == 1 and None not in fns:
            return fns.pop()
    readers = [(n.op, n.inputs, n.outputs[0]) for n in g.consumers().get(t, [])]
    if t in g.outputs:
        readers += [(s["op"], s.get("inputs", [t]), s.get("outputs", [""])[0])
                    for s in g.meta.get("float_tail", []) if t in s.get("inputs", [t])]
    if not readers:
        return None
    ops = {op for op, _, _ in readers}
    sig = {out for op, ins, out in readers if op == "sigmoid"}
    if ops == {"sigmoid", "mul"} and all(op == "sigmoid" or sorted(ins) == sorted([t, *sig]) and len(ins) == 2
                                         and t in ins for op, ins, _ in readers):
        return _silu
    if len(ops) == 1 and len(readers) == 1 and readers[0][0] in _CONSUMER_FUNCTIONS:
        return _CONSUMER_FUNCTIONS[readers[0][0]]
    return None


#: element-wise ops an error passes through on its way to the next weighted layer (``channel_importance``)
_PASS_THROUGH = frozenset({"sigmoid", "mul", "relu", "relu6", "hardswish", "hardsigmoid", "tanh", "leaky_relu"})


def channel_importance(g: QuantGraph, ts: list[str], depth: int = 3) -> torch.Tensor | None:
    """Per channel of tensor group ``ts``: the summed squared weights the next weighted layers apply to it.

    An error e_c in channel c moves a conv's output by sum_o,k W[o, c, k] * e_c, so its squared effect
    is e_c**2 * sum W[o, c, k]**2 (the diagonal of the next layer's Gauss-Newton term). Element-wise
    ops on the way (a SiLU's sigmoid and product, ReLUs) pass the channel through; any other reader
    (an add, a concat, a pool, the graph's output) leaves the weighting unknown, and None (every value
    alike) is returned. Normalised to mean 1.
    """
    if len(ts) != 1 or len(g.tensors[ts[0]].shape) < 2:
        return None
    channels = g.tensors[ts[0]].shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    consumers = g.consumers()
    frontier, seen = [ts[0]], set()
    for _ in range(depth):
        nxt = []
        for t in frontier:
            if t in g.outputs:
                return None
            for n in consumers.get(t, []):
                if n.name in seen:
                    continue
                seen.add(n.name)
                if n.op in WEIGHTED_OPS and n.inputs[0] == t:
                    w = torch.from_numpy(np.asarray(g.tensors[n.inputs[1]].data, np.float64))
                    if n.op == "depthwise_conv2d" or (n.op == "conv2d" and n.attrs.get("groups", 1) == channels
                                                      and w.shape[1] == 1):
                        per = w.pow(2).reshape(w.shape[0], -1).sum(1).reshape(channels, -1).sum(1)
                    elif n.op == "conv2d" and n.attrs.get("groups", 1) == 1 or n.op == "linear":
                        per = w.pow(2).transpose(0, 1).reshape(w.shape[1], -1).sum(1)
                    else:
                        return None
                    if per.numel() != channels:
                        return None
                    total += per
                elif n.op in _PASS_THROUGH and g.tensors[n.outputs[0]].shape == g.tensors[t].shape:
                    nxt.append(n.outputs[0])
                else:
                    return None
        frontier = nxt
        if not frontier:
            break
    if frontier or not float(total.sum()) > 0:
        return None
    return total / total.mean()


def fixed_grid(fixed: tuple[float, int, bool], profile) -> QParams:
    """A target's fixed output grid, written the way the profile writes grids.

    A signed grid whose zero point is the lowest code is the same set of real values as
    the unsigned grid with zero point 0; a symmetric or unsigned profile gets the latter.
    A power-of-two scale carries its exponent where the profile demands power-of-two grids.
    """
    a = profile.activations
    scale, zp, signed = fixed
    half = 2 ** (a.bits - 1)
    if signed and zp == -half and (a.symmetric or a.signedness == "unsigned"):
        signed, zp = False, 0
    e = np.log2(scale)
    exponent = [int(e)] if a.power_of_two and e == np.round(e) else None
    return QParams(a.bits, signed, [scale], [zp], exponent=exponent)


#: weight widths below which PTQ corrects biases: measured on resnet20 (imx500, 2,000 test images),
#: 3-bit PTQ 34.2 -> 65.9 %, 4-bit 77.0 -> 77.6 %, 8-bit 81.70 -> 81.55 % (noise); at 8 bits the files
#: stay those the tables check against reference int8 files
BIAS_CORRECTION_BELOW = 8


def rounding_shift(n: Node, w: np.ndarray, w_rounded: np.ndarray, input_mean: np.ndarray) -> np.ndarray | None:
    """The mean change of ``n``'s output that rounding its weights ``w`` to ``w_rounded`` causes,
    per output channel, for inputs of per-channel mean ``input_mean`` (None where the layout does not say).

    Bias correction (Nagel et al., "Data-Free Quantization", 2019): E[(W_q - W) x] = (W_q - W) E[x]
    for a linear map; a convolution sees the channel means at every kernel tap (padding ignored).
    At low bit widths the rounding errors of a channel no longer cancel, and this shift moves
    every later activation off its grid.
    """
    d = w_rounded.astype(np.float64) - w.astype(np.float64)
    m = np.asarray(input_mean, np.float64)
    if n.op == "linear":
        return d @ m if d.ndim == 2 and d.shape[1] == m.size else None
    if d.ndim != 4:
        return None
    groups = int(n.attrs.get("groups", 1))
    per_group_in, out = d.shape[1], d.shape[0]
    if per_group_in * groups != m.size or out % groups:
        return None
    taps = d.sum((2, 3))  # (O, C / groups): a constant input meets every tap
    group_of = np.arange(out) // (out // groups)
    return (taps * m.reshape(groups, per_group_in)[group_of]).sum(1)


def quantize_weights(g: QuantGraph, fg: QuantGraph, profile, hessians: dict[str, np.ndarray] | None = None,
                     weight_bits: dict[str, int] | None = None,
                     input_means: dict[str, np.ndarray] | None = None) -> None:
    """Per-channel weight grids (MSE, Hessian-weighted where given), rounded weights and int32 bias;
    ``weight_bits`` (layer -> bits, e.g. ``mixed_precision``'s choice) overrides the profile's widths.
    ``input_means`` (input tensor -> per-channel mean): each bias of a layer below
    ``BIAS_CORRECTION_BELOW`` bits absorbs the mean shift its rounding causes (``rounding_shift``)."""
    w = profile.weights
    bits = weight_bits or layer_weight_bits(g, profile)
    for n in g.nodes:
        if n.op not in WEIGHTED_OPS:
            continue
        wname, bname = n.inputs[1], n.inputs[2]
        h = None if hessians is None else hessians.get(wname)
        qp, wq = search_weight_grid(fg.tensors[wname].data, bits[n.name], per_channel=w.per_channel,
                                    power_of_two=w.power_of_two, narrow=w.narrow_range, hessian=h)
        if not w.per_channel:  # per-tensor grids still state one scale per channel for kernels
            c = wq.shape[0]
            qp = QParams(qp.bits, True, np.repeat(qp.scale, c), np.zeros(c), axis=0, narrow=qp.narrow,
                         exponent=None if qp.exponent is None else np.repeat(qp.exponent, c))
        g.tensors[wname].quant, g.tensors[wname].data = qp, wq
        bias = fg.tensors[bname].data
        mean = None if input_means is None or bits[n.name] >= BIAS_CORRECTION_BELOW else input_means.get(n.inputs[0])
        shift = None if mean is None else rounding_shift(n, fg.tensors[wname].data, wq * qp.scale.reshape(
            (-1,) + (1,) * (wq.ndim - 1)).astype(np.float64), mean)
        if shift is not None:
            bias = (bias.astype(np.float64) - shift).astype(np.float32)
        set_bias(g, n, bias, profile.bias_bits)


def set_bias(g: QuantGraph, node, bias: np.ndarray, bias_bits: int) -> None:
    """Integer bias of ``node`` at scale s_in * s_w from a float bias."""
    s_in = float(g.tensors[node.inputs[0]].quant.scale[0])
    qp, bq = quantize_bias(bias, s_in, g.tensors[node.inputs[1]].quant.scale, bias_bits)
    g.tensors[node.inputs[2]].quant, g.tensors[node.inputs[2]].data = qp, bq


def ptq(fg: QuantGraph, stats: dict[str, ActStats], profile, rules: list[TargetRules],
        hessians: dict[str, np.ndarray] | None = None, weight_bits: dict[str, int] | None = None,
        bias_correction: bool = True) -> QuantGraph:
    """The calibrated, round-to-nearest quantized graph (``weight_bits``: per-layer widths, else the profile's),
    each bias corrected for its layer's rounding (``bias_correction``) from the calibration means."""
    g = fg.copy()
    assign_activation_grids(g, stats, profile, rules)
    means = None
    if bias_correction:
        means = {n.inputs[0]: m for n in fg.weighted_nodes()
                 if (m := stats[n.inputs[0]].channel_mean()) is not None}
    quantize_weights(g, fg, profile, hessians, weight_bits, means)
    return g
