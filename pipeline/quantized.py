"""The result of a quantization run: the quantized graph plus what made it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import model_io
from .errors import UsageError
from .float_exec import pack, run_float, unpack
from .graph import QuantGraph
from .ptq import packed_weight_bytes
from .simulate import dequantize, dequantize_outputs, get_rule, run_integer


def concat_batches(parts: list[Any]) -> Any:
    """Per-batch packed outputs (``float_exec.pack``) joined along the batch axis, packed again."""
    return pack([torch.cat(list(col)) for col in zip(*(unpack(p) for p in parts), strict=True)])


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

    @property
    def weight_bits(self) -> dict[str, int]:
        """Weight bits of every weighted layer (the profile's widths, or a weight-memory budget's choice)."""
        return {n.name: int(self.graph.tensors[n.inputs[1]].quant.bits) for n in self.graph.weighted_nodes()}

    @property
    def weight_bytes(self) -> int:
        """Packed weight bytes: bits/8 per weight, the profile's bias width per bias (what budgets count)."""
        return packed_weight_bytes(self.graph, self.weight_bits, self.profile.bias_bits)

    def _rule(self, target: str | None, rounding: str | None = None):
        target = target or self.targets[0]
        if target not in self.rounding:
            raise UsageError(f"this model was quantized for {', '.join(self.targets)}, not {target!r}; "
                             f"quantize again with targets=[..., {target!r}]")
        return get_rule(rounding or self.rounding[target])

    def _canonical(self, x: torch.Tensor) -> torch.Tensor:
        return model_io.to_graph_layout(self.graph.meta, torch.as_tensor(x, dtype=torch.float32))

    @torch.no_grad()
    def simulate(self, x: torch.Tensor, target: str | None = None, batch_size: int | None = None,
                 rounding: str | None = None, raw: bool = False) -> Any:
        """Dequantized float32 output(s) of the integer network as ``target`` computes it; ``rounding``
        names another of its runtime's rules (a runner's ``rounding``: TFLite's reference kernels).

        ``x`` and the output are in the model's own layout (``model_io``); the output is what the
        source model returns (its float tail run on the host), or with ``raw`` the model file's own.
        """
        rule = self._rule(target, rounding)
        x = self._canonical(x)
        steps = range(0, len(x), batch_size or self.graph.batch_size())
        outs = [run_integer(self.graph, x[i:i + steps.step], rule)
                for i in tqdm(steps, desc="simulate", unit="batch", leave=False, disable=len(steps) <= 2)]
        return model_io.to_user(self.graph.meta, dequantize_outputs(self.graph, concat_batches(outs)), raw)

    @torch.no_grad()
    def forward_float(self, x: torch.Tensor, batch_size: int | None = None, raw: bool = False) -> Any:
        """The float model on ``x``, in and out as ``simulate``."""
        x = self._canonical(x)
        step = batch_size or self.float_graph.batch_size()
        y = concat_batches([run_float(self.float_graph, x[i:i + step]) for i in range(0, len(x), step)])
        return model_io.to_user(self.graph.meta, y, raw)

    @torch.no_grad()
    def layer_errors(self, x: torch.Tensor, target: str | None = None) -> list[dict[str, Any]]:
        """Per weighted layer: SQNR (dB) of the integer output against the float output."""
        rule = self._rule(target)
        names = {n.outputs[0]: n for n in self.graph.weighted_nodes()}
        signal = dict.fromkeys(names, 0.0)
        noise = dict.fromkeys(names, 0.0)
        x = self._canonical(x)
        ref: dict[str, torch.Tensor] = {}  # this batch's float layer outputs, until compared

        def keep_float(name: str, y: torch.Tensor) -> None:
            if name in names:
                ref[name] = y

        def compare(name: str, y: torch.Tensor) -> None:
            if name in names:
                f = ref.pop(name).double()
                signal[name] += float(f.pow(2).sum())
                noise[name] += float((f - dequantize(y, self.graph.tensors[name].quant).double()).pow(2).sum())

        step = self.graph.batch_size()
        for i in range(0, len(x), step):  # sums over batches: one batch of layer outputs alive at a time
            run_float(self.float_graph, x[i:i + step], hook=keep_float)
            run_integer(self.graph, x[i:i + step], rule, hook=compare)
        rows = []
        for t, n in names.items():
            sqnr = 10 * np.log10(signal[t] / noise[t]) if noise[t] > 0 else float("inf")
            w = self.graph.tensors[n.inputs[1]]
            rows.append({"layer": n.name, "op": n.op, "source": n.source, "weight_bits": w.quant.bits,
                         "sqnr_db": round(float(sqnr), 2),
                         "hessian": self.info.get("hessian_scores", {}).get(n.name)})
        return rows
