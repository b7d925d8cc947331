"""The model as its users hold it: their tensor layout, and the float tail run on the host.

The canonical graph is NCHW and ends where integer arithmetic ends. A user does not hold
it that way: a model read from a TFLite or Keras file takes NHWC images and returns NHWC
maps; a classifier ends in a softmax, a detector in sigmoids and concats that merge its box
and class heads, a segmenter in an upsampling of its logits: work done in float on the host
in deployments (and exact there), after the integer model's last tensors. Both are stated
once, in the graph's ``meta`` (and from there in the bundle's manifest), as the model's
*interface*:

- ``source_layout``: "NCHW" (PyTorch, ONNX) or "NHWC" (TFLite, Keras); data given to
  ``quantize``, ``export``, ``check``, ``QuantizedModel.simulate`` and a loaded runner's
  ``.run`` is in this layout, and 4-D outputs come back in it.
- ``float_tail``: the trailing ops cut off the integer graph (``cut_graph``: the user's
  ``--outputs``, or found: ``tail_nodes``) and run in float on the host after it, each with
  the tensor names it reads and writes; ``cut`` names the integer graph's outputs and who
  chose them, ``source_outputs`` what the source model returns. ``.run(x)`` returns what the
  source model returns (one array, or a tuple), ``.run(x, raw=True)`` the model file's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import DataError, UsageError
from .float_exec import float_op, pack, unpack
from .graph import WEIGHTED_OPS, Node, QuantGraph

LAYOUTS = ("NCHW", "NHWC")
#: ops the host runs in float after the integer graph when they end a model (``cut_graph``): they
#: compute on a model's final scores (softmax, sigmoid, tanh), upsample them (resize), merge heads
#: whose values differ in kind onto one tensor (concat: a box offset and a class probability must
#: not share one integer grid), reorder a head's layout for the host (transpose) or decode boxes (exp, and
#: arithmetic with a constant: a grid, a stride; ``host_op``)
HOST_TAIL_OPS = frozenset({"softmax", "sigmoid", "tanh", "resize", "concat", "transpose", "exp"})
#: layout ops that may join the tail around them (alone they stay in the file: a flatten moves no data)
TAIL_LAYOUT_OPS = frozenset({"reshape", "flatten", "slice"})


def interface(meta: dict[str, Any]) -> dict[str, Any]:
    """The interface a graph's (or a manifest's) ``meta`` states: layout, float tail and the outputs.

    ``outputs`` are the integer graph's own (the model file's), ``source_outputs`` what the
    source model returns (the tail's outputs, or the same names without a tail).
    """
    layout = meta.get("source_layout", "NCHW")
    if layout not in LAYOUTS:
        raise DataError(f"unknown source layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    cut = dict(meta.get("cut") or {})
    return {"source_layout": layout, "float_tail": list(meta.get("float_tail", [])),
            "outputs": list(cut.get("outputs", [])), "source_outputs": list(meta.get("source_outputs", [])),
            "cut_chosen_by": cut.get("chosen_by")}


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


def host_op(g: QuantGraph, n: Node) -> bool:
    """Whether node ``n`` is float work that may end a model on the host (``HOST_TAIL_OPS``, or arithmetic
    with a constant operand: a box decode adding a grid, multiplying by a stride)."""
    return n.op in HOST_TAIL_OPS or (n.op in ("add", "sub", "mul", "div")
                                     and any(g.tensors[i].kind == "constant" for i in n.inputs))


def tail_nodes(g: QuantGraph) -> set[str]:
    """Names of the nodes the automatic cut leaves to the host: the largest set of trailing
    ``HOST_TAIL_OPS`` / ``TAIL_LAYOUT_OPS`` nodes (nothing outside it reads what they write), less
    the layout ops with no computing op before or after them there (a lone trailing reshape stays
    in the file)."""
    consumers = g.consumers()
    trailing: set[str] = set()
    for n in reversed(g.nodes):
        if (host_op(g, n) or n.op in TAIL_LAYOUT_OPS) and all(
                c.name in trailing for o in n.outputs for c in consumers.get(o, [])):
            trailing.add(n.name)
    producer = g.producer()
    after: set[str] = set()  # trailing nodes that compute, or read what such a node wrote
    for n in g.nodes:
        if n.name in trailing and (host_op(g, n) or any(
                i in producer and producer[i].name in after for i in n.inputs)):
            after.add(n.name)
    before: set[str] = set()  # trailing layout ops feeding such a node (a head's reshape before the concat)
    for n in reversed(g.nodes):
        if n.name in trailing and n.name not in after and any(
                c.name in after | before for o in n.outputs for c in consumers.get(o, [])):
            before.add(n.name)
    return after | before


def cut_graph(g: QuantGraph, outputs: Sequence[str] | None = None) -> QuantGraph:
    """``g`` ending where integer arithmetic should end; the rest becomes the float tail in ``meta``.

    ``outputs`` names the tensors the integer graph ends at (the user's cut); None finds the
    cut (``tail_nodes``); an empty list keeps the whole model in the integer graph. The tail is recorded with its tensor names so the host can run it on
    the model file's outputs; a graph with nothing to cut is returned as it is.
    """
    if interface(g.meta)["float_tail"] or (outputs is not None and len(outputs) == 0):
        return g  # already cut, or the user keeps every op in the integer model (``outputs=[]``)
    producer, consumers = g.producer(), g.consumers()
    if outputs is None:
        tail = tail_nodes(g)
        chosen = "auto"
    else:
        tail = _tail_after(g, list(outputs), producer)
        chosen = "user"
    if not tail:
        return g
    kept = [n for n in g.nodes if n.name not in tail]
    cut: list[str] = [o for o in (outputs or []) if o not in g.inputs]
    for n in kept:  # every tensor the tail reads from the integer graph, in the graph's order
        for o in n.outputs:
            if o not in cut and (o in g.outputs or any(c.name in tail for c in consumers.get(o, []))):
                cut.append(o)
    if outputs is not None:
        extra = [o for o in cut if o not in outputs and o not in g.outputs]
        if extra:
            raise UsageError(f"the float tail after --outputs also reads {', '.join(extra)}; add "
                             f"{'it' if len(extra) == 1 else 'them'} to --outputs")
    if any(o in g.inputs for n in g.nodes if n.name in tail for o in n.inputs) or not cut or not kept:
        return g  # nothing would be left to quantize before the tail
    steps = [{"op": n.op, "attrs": dict(n.attrs), "source": n.source or n.name, "inputs": list(n.inputs),
              "outputs": list(n.outputs), **_constants(g, n)} for n in g.nodes if n.name in tail]
    keep_t = {t for n in kept for t in (*n.inputs, *n.outputs)} | set(g.inputs)
    meta = {**g.meta, "float_tail": steps, "source_outputs": list(g.outputs),
            "cut": {"outputs": cut, "chosen_by": chosen}}
    return QuantGraph(kept, {k: v for k, v in g.tensors.items() if k in keep_t}, list(g.inputs), cut, meta)


def _constants(g: QuantGraph, n: Node) -> dict[str, Any]:
    """A tail step's constant operands (a decode's grid), held in the step itself: the host needs them."""
    held = {i: g.tensors[i].data for i in n.inputs if g.tensors[i].kind == "constant"}
    return {"constants": {k: {"shape": list(v.shape), "values": v.astype(np.float32).ravel().tolist()}
                          for k, v in held.items()}} if held else {}


def _tail_after(g: QuantGraph, outputs: list[str], producer: dict[str, Node]) -> set[str]:
    """The nodes after a user's cut: every node needed for the model's outputs but not for ``outputs``."""
    known = [o for o in outputs if o not in g.tensors or g.tensors[o].data is not None]
    if known or not outputs:
        names = [t for t in g.activation_names()]
        raise UsageError(f"--outputs names {', '.join(known) or 'nothing'}, not a tensor of the model; choose among "
                         f"{', '.join(names[-12:])}{' ...' if len(names) > 12 else ''} (eptq-deploy ops MODEL lists them)")

    def ancestors(ts: list[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(ts)
        while todo:
            n = producer.get(todo.pop())
            if n is not None and n.name not in seen:
                seen.add(n.name)
                todo.extend(n.inputs)
        return seen

    before = ancestors(outputs)
    tail = ancestors(list(g.outputs)) - before
    for n in g.nodes:
        if n.name in tail and n.op in WEIGHTED_OPS:
            raise UsageError(f"node {n.name!r} ({n.op}) comes after --outputs and would run in float on the host; "
                             f"cut at or after its output {n.outputs[0]!r}")
    return tail


def split_float_tail(g: QuantGraph) -> QuantGraph:
    """The automatic cut (``cut_graph`` without ``outputs``)."""
    return cut_graph(g)


def tail_sources(meta: dict[str, Any], shapes: Sequence[Sequence[int]]) -> tuple[list[set[int]], list[tuple[int, ...]]]:
    """Which source outputs each model-file output (of ``shapes``, batch first) feeds through a float tail of
    layout ops (reshape, transpose, concat, slice), and the source outputs' shapes at batch 1: every
    element's index is pushed through the tail. ``([], [])`` where the tail computes (a sigmoid, a decode)."""
    tail = interface(meta)["float_tail"]
    sizes = [int(np.prod(s[1:], dtype=np.int64)) for s in shapes]
    if not tail or any(s["op"] not in _LAYOUT for s in tail) or "inputs" not in tail[0] or sum(sizes) >= 1 << 24:
        return [], []
    starts = np.concatenate([[0], np.cumsum(sizes)])
    ids = [(starts[k] + np.arange(n, dtype=np.float32)).reshape(1, *shapes[k][1:]) for k, n in enumerate(sizes)]
    outs = [np.asarray(v) for v in unpack(apply_float_tail(meta, pack(ids)))]
    feeds = [{int(j) for j, o in enumerate(outs) if np.any((o >= starts[k]) & (o < starts[k + 1]))}
             for k in range(len(shapes))]
    return feeds, [tuple(o.shape) for o in outs]


#: tail ops that only move values (``tail_sources`` follows them)
_LAYOUT = frozenset({"reshape", "flatten", "transpose", "concat", "slice"})


def apply_float_tail(meta: dict[str, Any], y: Any) -> Any:
    """The float tail run on the model file's output(s) (``float_exec.pack``ed, torch or numpy,
    canonical layout): what the source model returns, packed the same way."""
    i = interface(meta)
    tail = i["float_tail"]
    if not tail:
        return y
    ys = unpack(y)
    is_numpy = not isinstance(ys[0], torch.Tensor)
    ts = [torch.as_tensor(np.asarray(v, np.float32)) if is_numpy else v.float() for v in ys]
    if "inputs" not in tail[0]:  # a bundle written before tails had names: one chain on the one output
        t = ts[0]
        with torch.no_grad():
            for k, step in enumerate(tail):
                t = float_op(Node(f"float_tail/{k}", step["op"], ["in"], ["out"], dict(step["attrs"])), [t])
        outs = [t]
    else:
        env = dict(zip(i["outputs"], ts, strict=True))
        with torch.no_grad():
            for k, step in enumerate(tail):
                for name, c in step.get("constants", {}).items():
                    env[name] = torch.tensor(c["values"], dtype=torch.float32).reshape(c["shape"])
                node = Node(f"float_tail/{k}", step["op"], list(step["inputs"]), list(step["outputs"]), dict(step["attrs"]))
                env[node.outputs[0]] = float_op(node, [env[t] for t in node.inputs])
        outs = [env[o] for o in i["source_outputs"]]
    return pack([v.numpy() for v in outs] if is_numpy else outs)


def to_user(meta: dict[str, Any], y: Any, raw: bool = False) -> Any:
    """A canonical output as the source model returns it (float tail run unless ``raw``), in its layout."""
    return pack([to_source_layout(meta, v) for v in unpack(y if raw else apply_float_tail(meta, y))])


def raw_to_user(meta: dict[str, Any], raw: Any) -> Any:
    """A model file's raw outputs as a runner returns them with ``raw=True`` (source layout, packed) turned
    into what the source model returns: back to the canonical layout, then ``to_user``."""
    return to_user(meta, pack([to_graph_layout(meta, np.asarray(v)) for v in unpack(raw)]))


def describe(meta: dict[str, Any]) -> str:
    """One sentence for reports: what the host does around the model file."""
    i = interface(meta)
    parts = [f"inputs and 4-D outputs in {i['source_layout']}"]
    if i["float_tail"]:
        ops = ", ".join(sorted({s["op"] for s in i["float_tail"]}))
        where = ("chosen automatically: the last tensors before the ops that turn scores into probabilities, upsample "
                 "them or merge heads" if i["cut_chosen_by"] == "auto" else "named by the user")
        outs = f" at {', '.join(i['outputs'])}" if i["outputs"] else ""
        parts.append(f"the integer model ends{outs} ({where}); the model's last op(s) ({ops}) run in float on the host "
                     "after the model file; `.run(x, raw=True)` returns the file's own output(s)")
    return "; ".join(parts)


class SourceRunner:
    """A target's runner taking and returning the source model's layout, its float tail applied.

    ``raw`` (default for ``.run``) returns the model file's own output, in the source layout.
    The runner's ``threads``, ``kernels`` and ``rounding`` are the wrapped runner's.
    """

    def __init__(self, runner: Any, meta: dict[str, Any], raw: bool = False) -> None:
        self.runner = runner
        interface(meta)  # a bad layout fails here, not on the first run
        self.meta = dict(meta)
        self.raw = raw

    def __getattr__(self, name: str) -> Any:  # threads, kernels, rounding, runtime-specific extras
        return getattr(self.runner, name)

    def run(self, x: np.ndarray, raw: bool | None = None) -> Any:
        """The source model's output for ``x`` (one array, or a tuple for several outputs)."""
        y = self.runner.run(to_graph_layout(self.meta, np.asarray(x, np.float32)))
        return to_user(self.meta, y, self.raw if raw is None else raw)
