"""The result of a quantization run: the quantized graph plus what made it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import UsageError
from .graph import WEIGHTED_OPS, QuantGraph
from .simulate import dequantize, get_rule, run_float, run_integer


class QuantizedModel:
    """A quantized graph bound to the targets it was quantized for.

    ``simulate`` computes what a target's integer runtime computes; ``forward_float``
    runs the captured float graph (BN folded) for comparisons.
    """

    def __init__(self, graph: QuantGraph, float_graph: QuantGraph, profile: Any, targets: list[str],
                 rounding: dict[str, str], info: dict[str, Any] | None = None) -> None:
        self.graph = graph
        self.float_graph = float_graph
        self.profile = profile
        self.targets = list(targets)
        self.rounding = dict(rounding)
        self.info = dict(info or {})

    def __repr__(self) -> str:
        return (f"QuantizedModel(profile={self.profile.name!r}, targets={self.targets}, "
                f"layers={len(self.graph.weighted_nodes())}, method={self.info.get('method')!r})")

    def _rule(self, target: str | None, rounding: str | None = None):
        target = target or self.targets[0]
        if target not in self.rounding:
            raise UsageError(f"this model was quantized for {', '.join(self.targets)}, not {target!r}; "
                             f"quantize again with targets=[..., {target!r}]")
        return get_rule(rounding or self.rounding[target])

    @torch.no_grad()
    def simulate(self, x: torch.Tensor, target: str | None = None, batch_size: int = 256,
                 rounding: str | None = None) -> torch.Tensor:
        """Dequantized float32 output of the integer network as ``target`` computes it; ``rounding``
        names another of its runtime's rules (a runner's ``rounding``: TFLite's reference kernels)."""
        rule = self._rule(target, rounding)
        x = torch.as_tensor(x, dtype=torch.float32)
        steps = range(0, len(x), batch_size)
        outs = [run_integer(self.graph, x[i:i + batch_size], rule)
                for i in tqdm(steps, desc="simulate", unit="batch", leave=False, disable=len(steps) <= 2)]
        return dequantize(torch.cat(outs), self.graph.tensors[self.graph.outputs[0]].quant)

    @torch.no_grad()
    def forward_float(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        return torch.cat([run_float(self.float_graph, x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def layer_errors(self, x: torch.Tensor, target: str | None = None) -> list[dict[str, Any]]:
        """Per weighted layer: SQNR (dB) of the integer output against the float output."""
        rule = self._rule(target)
        ref: dict[str, torch.Tensor] = {}
        got: dict[str, torch.Tensor] = {}
        names = {n.outputs[0]: n for n in self.graph.nodes if n.op in WEIGHTED_OPS}

        def keep(store: dict[str, torch.Tensor]):
            def hook(name: str, y: torch.Tensor) -> None:
                if name in names:
                    store[name] = y
            return hook

        run_float(self.float_graph, x, hook=keep(ref))
        run_integer(self.graph, x, rule, hook=keep(got))
        rows = []
        for t, n in names.items():
            f = ref[t].double()
            q = dequantize(got[t], self.graph.tensors[t].quant).double()
            noise = float((f - q).pow(2).sum())
            sig = float(f.pow(2).sum())
            sqnr = 10 * np.log10(sig / noise) if noise > 0 else float("inf")
            w = self.graph.tensors[n.inputs[1]]
            rows.append({"layer": n.name, "op": n.op, "source": n.source, "weight_bits": w.quant.bits,
                         "sqnr_db": round(float(sqnr), 2),
                         "hessian": self.info.get("hessian_scores", {}).get(n.name)})
        return rows
