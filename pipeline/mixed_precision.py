"""Mixed precision under a weight-memory budget: one weight width per layer, the least expected loss.

A layer's cost at width ``b`` is the Hessian-weighted error of its weights on that width's grid,
``sum_i H_ii (w_i - Q_b(w_i))**2`` with ``H`` the label-free Gauss-Newton diagonal EPTQ already
computes (``hessian.py``) and ``Q_b`` the Hessian-weighted grid PTQ would pick at ``b`` bits: the
second-order estimate of how much the network's output moves when that layer is rounded. Costs of
different layers add (the diagonal approximation), so the widths are an exact integer program:
one width per layer, the packed bytes (``ptq.layer_packed_bytes``: bits/8 per weight, the
profile's bias width per bias) within the budget, the least summed cost. scipy's ``milp``
(HiGHS) solves it; EPTQ then runs on the chosen configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .calibrate import search_weight_grid
from .errors import UsageError
from .graph import QuantGraph
from .hw_profiles import Profile
from .ptq import layer_packed_bytes, layer_weight_bits

SOLVER = "scipy.optimize.milp (HiGHS)"


@dataclass
class WidthPlan:
    """The chosen width of every layer, what it packs to, and why."""

    budget_bytes: int
    bits: dict[str, int]
    packed_bytes: int
    #: layer -> {width: expected loss increase}; the sensitivity the choice was made on
    costs: dict[str, dict[int, float]] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget_bytes, "packed_bytes": self.packed_bytes, "weight_bits": self.bits,
                "costs": {k: {str(b): c for b, c in v.items()} for k, v in self.costs.items()},
                "solver": SOLVER, "note": self.note}


def layer_widths(g: QuantGraph, profile: Profile) -> dict[str, tuple[int, ...]]:
    """The widths each weighted layer may take: the profile's allowed ones, or the one it pins
    (``first_layer_weight_bits`` / ``last_layer_weight_bits``)."""
    pinned = layer_weight_bits(g, profile)
    nodes = g.weighted_nodes()
    out = {n.name: tuple(sorted(profile.weights.allowed_bits)) for n in nodes}
    for i, key in ((0, "first_layer_weight_bits"), (-1, "last_layer_weight_bits")):
        if nodes and getattr(profile, key):
            out[nodes[i].name] = (pinned[nodes[i].name],)
    return out


def size_range(g: QuantGraph, profile: Profile) -> tuple[int, int]:
    """Packed bytes with every layer at its smallest width, and at its largest."""
    widths = layer_widths(g, profile)
    nodes = {n.name: n for n in g.weighted_nodes()}
    lo = sum(layer_packed_bytes(g, nodes[k], min(w), profile.bias_bits) for k, w in widths.items())
    hi = sum(layer_packed_bytes(g, nodes[k], max(w), profile.bias_bits) for k, w in widths.items())
    return lo, hi


def check_budget(g: QuantGraph, profile: Profile, budget: int) -> None:
    """Refuse, before any work, a budget no configuration fits (with the minimum that would)."""
    lo, _ = size_range(g, profile)
    if budget < lo:
        raise UsageError(f"weight memory {budget:,} bytes is below the smallest configuration: every layer at its "
                         f"smallest width ({profile.name}: {min(profile.weights.allowed_bits)}-bit) packs to {lo:,} "
                         f"bytes; give at least {lo:,} bytes")
    if profile.memory_bytes is not None and budget > profile.memory_bytes:
        raise UsageError(f"weight memory {budget:,} bytes is more than the {profile.memory_bytes:,} bytes profile "
                         f"'{profile.name}' states for its chip; give at most {profile.memory_bytes:,} bytes")


def layer_costs(g: QuantGraph, profile: Profile, hessians: dict[str, np.ndarray]) -> dict[str, dict[int, float]]:
    """Each layer's expected loss increase at each width it may take (see the module's docstring)."""
    w = profile.weights
    costs: dict[str, dict[int, float]] = {}
    for n in g.weighted_nodes():
        data = np.asarray(g.tensors[n.inputs[1]].data, np.float64)
        h = np.asarray(hessians.get(n.inputs[1], np.ones_like(data)), np.float64)
        costs[n.name] = {}
        for bits in layer_widths(g, profile)[n.name]:
            qp, q = search_weight_grid(data, bits, per_channel=w.per_channel, power_of_two=w.power_of_two,
                                       narrow=w.narrow_range, hessian=h)
            scale = np.asarray(qp.scale, np.float64).reshape(-1, *([1] * (data.ndim - 1)))
            costs[n.name][bits] = float(np.sum(h * (q * scale - data) ** 2))
    return costs


def solve(costs: dict[str, dict[int, float]], sizes: dict[str, dict[int, int]], budget: int) -> dict[str, int]:
    """One width per layer, summed ``sizes`` at most ``budget``, least summed ``costs``: an exact
    integer program (binary x[layer, width]); raises if no choice fits."""
    keys = [(k, b) for k in costs for b in sorted(costs[k])]
    # each layer's least cost is paid whatever the choice: only the extra counts, scaled so that
    # HiGHS's absolute gap (1e-6) is far below any difference between choices
    extra = np.array([costs[k][b] - min(costs[k].values()) for k, b in keys])
    c = extra * (1e6 / extra.max()) if extra.size and extra.max() > 0 else extra
    one = np.zeros((len(costs), len(keys)))
    for j, (k, _) in enumerate(keys):
        one[list(costs).index(k), j] = 1.0
    size = np.array([[sizes[k][b] for k, b in keys]], dtype=np.float64)
    res = milp(c, constraints=[LinearConstraint(one, 1, 1), LinearConstraint(size, -np.inf, budget)],
               integrality=np.ones(len(keys)), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise UsageError(f"no choice of weight widths fits {budget:,} bytes ({res.message})")
    return {k: b for (k, b), v in zip(keys, res.x, strict=True) if v > 0.5}


def plan_widths(g: QuantGraph, profile: Profile, hessians: dict[str, np.ndarray], budget: int) -> WidthPlan:
    """The per-layer widths for ``budget`` bytes of packed weights (``g``: the float graph)."""
    check_budget(g, profile, budget)
    nodes = {n.name: n for n in g.weighted_nodes()}
    widths = layer_widths(g, profile)
    sizes = {k: {b: layer_packed_bytes(g, nodes[k], b, profile.bias_bits) for b in w} for k, w in widths.items()}
    costs = layer_costs(g, profile, hessians)
    hi = sum(sizes[k][max(w)] for k, w in widths.items())
    if hi <= budget:
        bits = {k: max(w) for k, w in widths.items()}
        note = (f"the budget holds every layer at its widest width ({hi:,} of {budget:,} bytes): "
                f"the uniform {max(profile.weights.allowed_bits)}-bit model")
    else:
        bits = solve(costs, sizes, budget)
        used = sorted(set(bits.values()), reverse=True)
        note = (f"{', '.join(_count(bits, b) for b in used)}, "
                f"least expected loss within {budget:,} bytes")
    packed = sum(sizes[k][b] for k, b in bits.items())
    return WidthPlan(budget, bits, packed, costs, note)


def _count(bits: dict[str, int], b: int) -> str:
    n = sum(v == b for v in bits.values())
    return f"{n} layer{'s' if n != 1 else ''} at {b} bits"


def plot_widths(plan: dict[str, Any], path: Path) -> None:
    """A small figure: each layer's chosen width above its sensitivity (cost at its smallest width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(plan["weight_bits"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(4.0, 0.18 * len(names) + 2), 4), sharex=True)
    x = np.arange(len(names))
    top.bar(x, [plan["weight_bits"][k] for k in names], color="tab:blue")
    top.set_ylabel("weight bits")
    top.set_title(f"{plan['packed_bytes']:,} of {plan['budget_bytes']:,} bytes")
    smallest = [plan["costs"][k][min(plan["costs"][k], key=int)] for k in names]
    bottom.bar(x, np.maximum(smallest, 1e-30), color="tab:orange")
    bottom.set_yscale("log")
    bottom.set_ylabel("sensitivity")
    bottom.set_xlabel("layer (execution order)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
