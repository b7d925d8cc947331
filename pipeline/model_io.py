"""The model as its users hold it: their tensor layout, and the float tail run on the host.

The canonical graph is NCHW and ends where integer arithmetic ends. A user does not hold
it that way: a model read from a TFLite or Keras file takes NHWC images and returns NHWC
maps, and a classifier read from a file may end in a softmax that no target has a measured
integer kernel for. Both are stated once, in the graph's ``meta`` (and from there in the
bundle's manifest), as the model's *interface*:

- ``source_layout``: "NCHW" (PyTorch, ONNX) or "NHWC" (TFLite, Keras); data given to
  ``quantize``, ``export``, ``check``, ``QuantizedModel.simulate`` and a loaded runner's
  ``.run`` is in this layout, and 4-D outputs come back in it.
- ``float_tail``: the trailing ops (``HOST_TAIL_OPS``) cut off the integer graph and run
  in float on the host after it, the way deployments run a classifier's softmax; ``.run(x)``
  returns what the source model returns, ``.run(x, raw=True)`` the model file's own output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import DataError
from .float_exec import float_op
from .graph import Node, QuantGraph

LAYOUTS = ("NCHW", "NHWC")
#: ops that end a model in float on the host when they are its last ops (no target writes them)
HOST_TAIL_OPS = frozenset({"softmax"})


def interface(meta: dict[str, Any]) -> dict[str, Any]:
    """The interface a graph's (or a manifest's) ``meta`` states: layout and float tail."""
    layout = meta.get("source_layout", "NCHW")
    if layout not in LAYOUTS:
        raise DataError(f"unknown source layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return {"source_layout": layout, "float_tail": list(meta.get("float_tail", []))}


def to_graph_layout(meta: dict[str, Any], x: Any) -> Any:
    """A batch in the user's layout as the canonical graph takes it (NCHW)."""
    if interface(meta)["source_layout"] == "NHWC" and x.ndim == 4:
        return x.permute(0, 3, 1, 2).contiguous() if isinstance(x, torch.Tensor) else \
            np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
    return x


def to_source_layout(meta: dict[str, Any], y: Any) -> Any:
    """A canonical (NCHW) output in the user's layout."""
    if interface(meta)["source_layout"] == "NHWC" and y.ndim == 4:
        return y.permute(0, 2, 3, 1).contiguous() if isinstance(y, torch.Tensor) else \
            np.ascontiguousarray(np.transpose(y, (0, 2, 3, 1)))
    return y


def source_shape(meta: dict[str, Any], shape: tuple[int, ...] | list[int]) -> list[int]:
    """A canonical 4-D shape as the user holds it."""
    shape = list(shape)
    if interface(meta)["source_layout"] == "NHWC" and len(shape) == 4:
        return [shape[0], shape[2], shape[3], shape[1]]
    return shape


def split_float_tail(g: QuantGraph) -> QuantGraph:
    """``g`` without its trailing host ops; they are recorded in ``meta["float_tail"]`` (in order).

    Only a chain at the very end is cut: each op reads the previous one's output alone and
    nothing else reads it, so the integer graph's output is exactly the tail's input.
    """
    nodes, tail = list(g.nodes), list(interface(g.meta)["float_tail"])
    out = g.outputs[0]
    while nodes and nodes[-1].op in HOST_TAIL_OPS and nodes[-1].outputs == [out] and len(nodes[-1].inputs) == 1:
        src = nodes[-1].inputs[0]
        if src in g.inputs or sum(src in n.inputs for n in nodes) != 1:
            break
        last = nodes.pop()
        tail.insert(0, {"op": last.op, "attrs": dict(last.attrs), "source": last.source or last.name})
        out = src
    if len(nodes) == len(g.nodes):
        return g
    kept = {t for n in nodes for t in (*n.inputs, *n.outputs)} | set(g.inputs)
    return QuantGraph(nodes, {k: v for k, v in g.tensors.items() if k in kept}, list(g.inputs), [out],
                      {**g.meta, "float_tail": tail})


def apply_float_tail(meta: dict[str, Any], y: Any) -> Any:
    """The float tail run on a canonical output (torch or numpy, float32)."""
    tail = interface(meta)["float_tail"]
    if not tail:
        return y
    is_numpy = not isinstance(y, torch.Tensor)
    t = torch.as_tensor(np.asarray(y, np.float32)) if is_numpy else y.float()
    with torch.no_grad():
        for i, step in enumerate(tail):
            t = float_op(Node(f"float_tail/{i}", step["op"], ["in"], ["out"], dict(step["attrs"])), [t])
    return t.numpy() if is_numpy else t


def to_user(meta: dict[str, Any], y: Any, raw: bool = False) -> Any:
    """A canonical output as the source model returns it (float tail run unless ``raw``), in its layout."""
    return to_source_layout(meta, y if raw else apply_float_tail(meta, y))


def describe(meta: dict[str, Any]) -> str:
    """One sentence for reports: what the host does around the model file."""
    i = interface(meta)
    parts = [f"inputs and 4-D outputs in {i['source_layout']}"]
    if i["float_tail"]:
        ops = ", ".join(s["op"] for s in i["float_tail"])
        parts.append(f"the model's last op(s) ({ops}) run in float on the host after the model file "
                     "(no target has a measured integer kernel for them); `.run(x, raw=True)` returns the file's output")
    return "; ".join(parts)


class SourceRunner:
    """A target's runner taking and returning the source model's layout, its float tail applied.

    ``raw`` (default for ``.run``) returns the model file's own output, in the source layout.
    The runner's ``threads``, ``kernels`` and ``rounding`` are the wrapped runner's.
    """

    def __init__(self, runner: Any, meta: dict[str, Any], raw: bool = False) -> None:
        self.runner = runner
        self.meta = interface(meta)
        self.raw = raw

    def __getattr__(self, name: str) -> Any:  # threads, kernels, rounding, runtime-specific extras
        return getattr(self.runner, name)

    def run(self, x: np.ndarray, raw: bool | None = None) -> np.ndarray:
        y = self.runner.run(to_graph_layout(self.meta, np.asarray(x, np.float32)))
        return to_user(self.meta, y, self.raw if raw is None else raw)
