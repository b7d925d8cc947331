"""Post-training quantization: from a float graph and statistics to a quantized graph.

The profile says what the hardware allows (bits, symmetric, power-of-two, ranges);
the targets' rules say which tensors must share a grid or use a fixed one; this
module decides the grids (MSE search) and rounds weights to nearest. EPTQ starts
from the graph built here and learns the rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .calibrate import ActStats, quantize_bias, search_activation_grid, search_weight_grid
from .float_exec import run_float
from .fold import is_folded, pixel_grid
from .graph import SAME_GRID_OPS, WEIGHTED_OPS, QParams, QuantGraph, TargetRules

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

    shared = set(SAME_GRID_OPS)
    for r in rules:
        shared |= r.shared_grid_ops
    for n in g.nodes:
        if n.op in shared:
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
            qp = search_activation_grid(merged, a.bits, symmetric=a.symmetric, power_of_two=a.power_of_two,
                                        signedness=a.signedness)
        for t in ts:
            g.tensors[t].quant = copy.deepcopy(qp)


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


def quantize_weights(g: QuantGraph, fg: QuantGraph, profile, hessians: dict[str, np.ndarray] | None = None) -> None:
    """Per-channel weight grids (MSE, Hessian-weighted where given), rounded weights and int32 bias."""
    w = profile.weights
    bits = layer_weight_bits(g, profile)
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
        set_bias(g, n, fg.tensors[bname].data, profile.bias_bits)


def set_bias(g: QuantGraph, node, bias: np.ndarray, bias_bits: int) -> None:
    """Integer bias of ``node`` at scale s_in * s_w from a float bias."""
    s_in = float(g.tensors[node.inputs[0]].quant.scale[0])
    qp, bq = quantize_bias(bias, s_in, g.tensors[node.inputs[1]].quant.scale, bias_bits)
    g.tensors[node.inputs[2]].quant, g.tensors[node.inputs[2]].data = qp, bq


def ptq(fg: QuantGraph, stats: dict[str, ActStats], profile, rules: list[TargetRules],
        hessians: dict[str, np.ndarray] | None = None) -> QuantGraph:
    """The calibrated, round-to-nearest quantized graph."""
    g = fg.copy()
    assign_activation_grids(g, stats, profile, rules)
    quantize_weights(g, fg, profile, hessians)
    return g
