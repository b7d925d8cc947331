"""Capture: a ``torch.nn.Module`` to a float graph in the canonical op set.

``torch.export`` traces the model into ATen ops; each supported ATen op maps to
one canonical op (``graph.OPS``), identity ops (dropout, clone) vanish, batch norm
folds into the convolution before it, consecutive slices merge, and a ReLU/ReLU6
after a conv, linear or add is fused into it where the profile's fusing patterns
allow. The result is a :class:`~eptq_deploy.graph.QuantGraph` with float32 weights
and no quantization yet: the input of calibration.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .errors import DataError, ModelError, UnsupportedOpError
from .graph import WEIGHTED_OPS, Node, QuantGraph, TensorInfo

_IDENTITY = {
    "aten.dropout.default", "aten.dropout_.default", "aten.clone.default", "aten.contiguous.default",
    "aten.alias.default", "aten.detach.default", "aten.detach_.default", "aten.feature_dropout.default",
    "aten.lift_fresh_copy.default", "aten.feature_dropout_.default",
}
_FUSE_KIND = {"conv2d": "conv", "depthwise_conv2d": "conv", "linear": "linear", "add": "add"}


def export_model(model: torch.nn.Module | torch.export.ExportedProgram, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Trace with ``torch.export``; a model it cannot capture gets one line saying why.

    torch logs tracebacks and prints partial graphs to stderr when tracing fails;
    that noise is held back so the user sees only the one-line error.
    """
    if isinstance(model, torch.export.ExportedProgram):
        _check_program_input(model, example)
        return model
    model = model.eval()
    try:
        with _quiet_torch() as noise:
            ep = torch.export.export(model, (example,))
    except Exception as e:  # torch raises many types here; the user needs the first line
        _diagnose_input(model, example)
        raise ModelError(_export_failure(e)) from None
    sys.stderr.write(noise.getvalue())  # a successful export's own messages are kept
    return ep


@contextlib.contextmanager
def _quiet_torch() -> Iterator[io.StringIO]:
    """Hold back torch's stderr prints and log records (up to ERROR) while tracing."""
    noise = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        with contextlib.redirect_stderr(noise):
            yield noise
    finally:
        logging.disable(previous)


def _export_failure(e: BaseException) -> str:
    """Why torch.export failed, where in the user's code, and what to try."""
    text = str(e)
    lines = text.strip().splitlines()
    first = lines[0].strip() if lines else type(e).__name__
    if len(first) > 200:
        first = first[:199] + "…"
    calls = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.+)', text)
    where = ""
    if calls:
        path, line, code = calls[-1]
        where = f" at {os.path.basename(path)}:{line} `{code.strip()[:80]}`"
    if "data-dependent" in text or "GuardOnDataDependentSymNode" in type(e).__name__:
        return (f"torch.export could not capture the model: forward() branches on a tensor's value{where} "
                f"({type(e).__name__}); replace the Python `if` on tensor values with tensor ops "
                "(torch.where) or torch.cond, or export a .pt2 program yourself and pass that")
    return (f"torch.export could not capture the model{where} ({type(e).__name__}: {first}); make forward() "
            "traceable (no data-dependent Python control flow, no unsupported Python calls on tensors), "
            "or export a .pt2 program yourself and pass that")


def _first_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The first convolution or linear layer in definition order (what the input meets first)."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            return name, m
    return None


def _diagnose_input(model: torch.nn.Module, example: torch.Tensor) -> None:
    """When export fails, run the model eagerly: if that fails too, the data does not fit it."""
    try:
        with torch.no_grad():
            model(example)
        return
    except Exception as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        error = e
    sample = tuple(example.shape[1:])
    if not isinstance(error, RuntimeError | ValueError | IndexError):  # torch reports shape clashes as these
        raise ModelError(f"the model's forward() fails on data samples of shape {sample} "
                         f"({type(error).__name__}: {detail}); fix forward() so it runs on one NCHW batch") from None
    first = _first_layer(model)
    if first is not None:
        name, layer = first
        if isinstance(layer, torch.nn.Conv2d) and example.dim() == 4 and example.shape[1] != layer.in_channels:
            raise DataError(
                f"data samples have shape {sample} (C, H, W) but the model's first layer {name} (Conv2d) takes "
                f"{layer.in_channels} channels, i.e. ({layer.in_channels}, H, W); give {layer.in_channels}-channel "
                "data (e.g. RGB images) preprocessed as the model expects"
            ) from None
        if isinstance(layer, torch.nn.Linear) and example.dim() == 2 and example.shape[1] != layer.in_features:
            raise DataError(
                f"data samples have shape {sample} but the model's first layer {name} (Linear) takes "
                f"({layer.in_features},); give data shaped as the model's input"
            ) from None
    raise DataError(
        f"the model cannot run on data samples of shape {sample} ({type(error).__name__}: {detail}); "
        "give data shaped and preprocessed as the model's input (N, C, H, W), e.g. the right --crop size"
    ) from None


def _check_program_input(program: torch.export.ExportedProgram, example: torch.Tensor) -> None:
    """An exported program is fixed to its input shape; refuse other data before tracing it."""
    names = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            val = node.meta.get("val")
            shape = tuple(getattr(val, "shape", ()))
            static = [d if isinstance(d, int) else None for d in shape]
            got = tuple(example.shape)
            if len(static) != len(got) or any(s is not None and s != g for s, g in zip(static[1:], got[1:], strict=False)):
                want = tuple("?" if d is None else d for d in static[1:])
                raise DataError(f"data samples have shape {got[1:]} but the exported program takes {want}; "
                                "give data shaped and preprocessed as the program's input")
            return


class _Builder:
    """Walks the exported FX graph once, emitting canonical nodes."""

    def __init__(self, ep: torch.export.ExportedProgram, profile_name: str) -> None:
        self.ep = ep
        self.profile_name = profile_name
        self.nodes: list[Node] = []
        self.tensors: dict[str, TensorInfo] = {}
        self.names: dict[str, str] = {}  # fx node name -> IR tensor name
        #: fx node of a split/chunk -> (its input, axis, each piece's (start, end), each piece's shape)
        self.pieces: dict[str, tuple[str, int, list[tuple[int, int]], list[tuple[int, ...]]]] = {}
        self.consts: dict[str, np.ndarray] = {}  # fx placeholder name -> constant value
        self.bn: dict[str, tuple] = {}  # IR tensor from a pending batch norm
        self.count: dict[str, int] = {}
        sig = ep.graph_signature
        state = dict(ep.state_dict)
        state.update({k: v for k, v in getattr(ep, "constants", {}).items() if isinstance(v, torch.Tensor)})
        lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
        for ph, key in lifted.items():
            if key in state:
                self.consts[ph] = state[key].detach().to(torch.float32).cpu().numpy()
        self.user_inputs = list(sig.user_inputs)

    # ----------------------------------------------------------------- helpers
    def fresh(self, op: str) -> str:
        k = self.count.get(op, 0)
        self.count[op] = k + 1
        return f"{op}_{k}"

    def const(self, arg: Any) -> np.ndarray | None:
        if arg is None:
            return None
        if isinstance(arg, torch.fx.Node) and arg.name in self.consts:
            return self.consts[arg.name]
        return None

    def tensor(self, arg: Any, where: str) -> str:
        if isinstance(arg, torch.fx.Node) and arg.name in self.names:
            return self.names[arg.name]
        raise UnsupportedOpError(
            f"{where}: an operand is a constant or non-tensor value ({arg!r}), which the canonical op set does not take "
            f"(profile {self.profile_name}); compute it inside a module as a parameter-free tensor op or fold it into a layer"
        )

    def emit(self, fx: torch.fx.Node, op: str, inputs: list[str], attrs: dict[str, Any], source: str,
             weights: tuple[np.ndarray, np.ndarray] | None = None) -> str:
        name = self.fresh(op)
        ins = list(inputs)
        if weights is not None:
            w, b = weights
            self.tensors[f"{name}.weight"] = TensorInfo(f"{name}.weight", tuple(w.shape), "weight", data=w.astype(np.float32))
            self.tensors[f"{name}.bias"] = TensorInfo(f"{name}.bias", tuple(b.shape), "bias", data=b.astype(np.float32))
            ins += [f"{name}.weight", f"{name}.bias"]
        out = name
        self.tensors[out] = TensorInfo(out, tuple(int(s) for s in fx.meta["val"].shape), "activation")
        self.nodes.append(Node(name, op, ins, [out], attrs, source))
        self.names[fx.name] = out
        return out

    def unsupported(self, fx: torch.fx.Node, source: str, why: str = "") -> None:
        raise UnsupportedOpError(
            f"unsupported op {fx.target} at {source or fx.name} (profile {self.profile_name}){': ' + why if why else ''}; "
            "replace it with a supported layer (eptq-deploy ops lists them) or register a lowering"
        )

    def piece(self, fx: torch.fx.Node, split: str, i: int, source: str) -> None:
        """One piece of a split or chunk: a slice of its input along the split axis (the input itself if whole)."""
        x, axis, bounds, shapes = self.pieces[split]
        start, end = bounds[i]
        if (start, end) == (0, self.tensors[x].shape[axis]):
            self.names[fx.name] = x
            return
        name = self.fresh("slice")
        self.tensors[name] = TensorInfo(name, shapes[i], "activation")
        self.nodes.append(Node(name, "slice", [x], [name], {"axes": [axis], "starts": [start], "ends": [end],
                                                           "steps": [1]}, source))
        self.names[fx.name] = name

    # ------------------------------------------------------------------- walk
    def run(self) -> QuantGraph:
        outputs: list[str] = []
        for fx in self.ep.graph.nodes:
            if fx.op == "placeholder":
                if fx.name in self.user_inputs:
                    name = "input" if not self.tensors else f"input_{len(self.user_inputs)}"
                    self.tensors[name] = TensorInfo(name, tuple(int(s) for s in fx.meta["val"].shape), "input")
                    self.names[fx.name] = name
                continue
            if fx.op == "output":
                outs = fx.args[0]
                outs = outs if isinstance(outs, list | tuple) else [outs]
                outputs = [self.tensor(o, "graph output") for o in outs]
                continue
            if fx.op != "call_function":
                self.unsupported(fx, fx.name, f"FX node kind {fx.op}")
            self.call(fx)
        if len(self.user_inputs) != 1:
            raise ModelError(f"the model takes {len(self.user_inputs)} inputs; eptq-deploy handles single-image-input models (one NCHW tensor)")
        if not outputs or len(set(outputs)) != len(outputs):
            raise ModelError(f"the model returns {len(outputs)} outputs{' (one tensor twice)' if outputs else ''}; "
                             "return each tensor once (a tuple of tensors for several heads)")
        g = QuantGraph(self.nodes, self.tensors, [self.names[self.user_inputs[0]]], outputs)
        return g

    def call(self, fx: torch.fx.Node) -> None:
        t = str(fx.target)
        stack = fx.meta.get("nn_module_stack") or {}
        source = list(stack.values())[-1][0] if stack else fx.name
        handler = _HANDLERS.get(t)
        if t in _IDENTITY:
            self.names[fx.name] = self.tensor(fx.args[0], source)
            return
        if t == "_operator.getitem" or t == "<built-in function getitem>":
            base = fx.args[0]
            if isinstance(base, torch.fx.Node) and base.name in self.names and fx.args[1] == 0:
                self.names[fx.name] = self.names[base.name]
                return
            if isinstance(base, torch.fx.Node) and base.name in self.pieces:
                self.piece(fx, base.name, int(fx.args[1]), source)
                return
            self.unsupported(fx, source, "tuple output of an op other than batch norm")
        if handler is None:
            self.unsupported(fx, source)
        handler(self, fx, source)


# ---------------------------------------------------------------- handlers
def _conv(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    a = list(fx.args) + [None] * 7
    x = b.tensor(a[0], source)
    w = b.const(a[1])
    if w is None:
        b.unsupported(fx, source, "convolution weights must be parameters")
    bias = b.const(a[2])
    bias = np.zeros(w.shape[0], np.float32) if bias is None else bias
    stride = _pair(a[3] if a[3] is not None else 1)
    dilation = _pair(a[5] if a[5] is not None else 1)
    groups = int(a[6] if a[6] is not None else 1)
    kh, kw = w.shape[2], w.shape[3]
    if isinstance(a[4], str):
        if a[4] == "valid":
            pads = [0, 0, 0, 0]
        else:  # "same" (stride 1 only in torch): extra pixel at the end
            th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            pads = [th // 2, tw // 2, th - th // 2, tw - tw // 2]
    else:
        p = _pair(a[4] if a[4] is not None else 0)
        pads = [p[0], p[1], p[0], p[1]]
    cin = b.tensors[x].shape[1]
    op = "depthwise_conv2d" if groups > 1 and groups == cin else "conv2d"
    if groups > 1 and op == "conv2d":
        b.unsupported(fx, source, f"grouped convolution with {groups} groups (only depthwise groups == in_channels is supported)")
    b.emit(fx, op, [x], {"stride": stride, "pads": pads, "dilation": dilation, "groups": groups, "activation": "none"},
           source, (w, bias))


def _linear(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    x = b.tensor(fx.args[0], source)
    w = b.const(fx.args[1])
    if w is None:
        b.unsupported(fx, source, "linear weights must be parameters")
    if len(b.tensors[x].shape) != 2:
        b.unsupported(fx, source, f"linear on a rank-{len(b.tensors[x].shape)} tensor (flatten to (N, features) first)")
    bias = b.const(fx.args[2]) if len(fx.args) > 2 else None
    bias = np.zeros(w.shape[0], np.float32) if bias is None else bias
    b.emit(fx, "linear", [x], {"activation": "none"}, source, (w, bias))


def _batch_norm(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    """Fold into the preceding conv/linear; a batch norm anywhere else is refused."""
    a = list(fx.args)
    x = b.tensor(a[0], source)
    if str(fx.target) == "aten.batch_norm.default":
        gamma, beta, mean, var, eps = b.const(a[1]), b.const(a[2]), b.const(a[3]), b.const(a[4]), float(a[7])
    else:  # _native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)
        gamma, beta, mean, var, eps = b.const(a[1]), b.const(a[2]), b.const(a[3]), b.const(a[4]), float(a[6])
    prod = next((n for n in b.nodes if x in n.outputs), None)
    users = [u for u in a[0].users] if isinstance(a[0], torch.fx.Node) else []
    if prod is None or prod.op not in WEIGHTED_OPS or len(users) != 1 or mean is None or var is None:
        b.unsupported(fx, source, "batch norm that does not directly follow a convolution or linear layer")
    c = mean.shape[0]
    gamma = np.ones(c) if gamma is None else gamma.astype(np.float64)
    beta = np.zeros(c) if beta is None else beta.astype(np.float64)
    k = gamma / np.sqrt(var.astype(np.float64) + eps)
    wt, bt = b.tensors[prod.inputs[1]], b.tensors[prod.inputs[2]]
    shape = (-1,) + (1,) * (wt.data.ndim - 1)
    wt.data = (wt.data.astype(np.float64) * k.reshape(shape)).astype(np.float32)
    bt.data = ((bt.data.astype(np.float64) - mean) * k + beta).astype(np.float32)
    b.names[fx.name] = x


def _unary(op: str) -> Callable[[_Builder, torch.fx.Node, str], None]:
    def h(b: _Builder, fx: torch.fx.Node, source: str) -> None:
        b.emit(fx, op, [b.tensor(fx.args[0], source)], {}, source)

    return h


def _hardtanh(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    lo = float(fx.args[1]) if len(fx.args) > 1 else -1.0
    hi = float(fx.args[2]) if len(fx.args) > 2 else 1.0
    if (lo, hi) != (0.0, 6.0):
        b.unsupported(fx, source, f"hardtanh({lo}, {hi}) (only ReLU6 = hardtanh(0, 6) is in the op set)")
    b.emit(fx, "relu6", [b.tensor(fx.args[0], source)], {}, source)


def _binary(op: str) -> Callable[[_Builder, torch.fx.Node, str], None]:
    def h(b: _Builder, fx: torch.fx.Node, source: str) -> None:
        if len(fx.args) > 2 or fx.kwargs.get("alpha", 1) != 1:
            b.unsupported(fx, source, "add with alpha")
        x, y = b.tensor(fx.args[0], source), b.tensor(fx.args[1], source)
        if op == "add" and b.tensors[x].shape != b.tensors[y].shape:
            b.unsupported(fx, source, f"broadcasting add {b.tensors[x].shape} + {b.tensors[y].shape}")
        attrs = {"activation": "none"} if op == "add" else {}
        b.emit(fx, op, [x, y], attrs, source)

    return h


def _cat(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    xs = [b.tensor(a, source) for a in fx.args[0]]
    axis = int(fx.args[1]) if len(fx.args) > 1 else 0
    axis = axis % len(b.tensors[xs[0]].shape)
    b.emit(fx, "concat", xs, {"axis": axis}, source)


def _max_pool(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    a = list(fx.args) + [None] * 6
    k = _pair(a[1])
    s = _pair(a[2]) if a[2] else k
    p = _pair(a[3] if a[3] is not None else 0)
    if a[4] not in (None, 1, [1, 1], (1, 1)) or a[5]:
        b.unsupported(fx, source, "max pool with dilation or ceil_mode=True")
    b.emit(fx, "max_pool2d", [b.tensor(a[0], source)], {"kernel": k, "stride": s, "pads": [p[0], p[1], p[0], p[1]]}, source)


def _avg_pool(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    a = list(fx.args) + [None] * 7
    k = _pair(a[1])
    s = _pair(a[2]) if a[2] else k
    p = _pair(a[3] if a[3] is not None else 0)
    if a[4] or a[6] is not None:
        b.unsupported(fx, source, "average pool with ceil_mode=True or divisor_override")
    cip = True if a[5] is None else bool(a[5])
    b.emit(fx, "avg_pool2d", [b.tensor(a[0], source)],
           {"kernel": k, "stride": s, "pads": [p[0], p[1], p[0], p[1]], "count_include_pad": cip}, source)


def _adaptive_avg(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    x = b.tensor(fx.args[0], source)
    if tuple(_pair(fx.args[1])) != (1, 1):
        b.unsupported(fx, source, f"adaptive average pool to {fx.args[1]} (only global pooling to 1x1)")
    b.emit(fx, "global_avg_pool", [x], {}, source)


def _mean(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    x = b.tensor(fx.args[0], source)
    rank = len(b.tensors[x].shape)
    dims = sorted(int(d) % rank for d in fx.args[1])
    keep = bool(fx.args[2]) if len(fx.args) > 2 else bool(fx.kwargs.get("keepdim", False))
    if rank != 4 or dims != [2, 3]:
        b.unsupported(fx, source, f"mean over dims {fx.args[1]} (only the spatial mean of an NCHW tensor)")
    out = b.emit(fx, "global_avg_pool", [x], {}, source)
    n, c = b.tensors[x].shape[:2]
    b.tensors[out].shape = (n, c, 1, 1)
    if not keep:
        fl = b.fresh("flatten")
        b.tensors[fl] = TensorInfo(fl, (n, c), "activation")
        b.nodes.append(Node(fl, "flatten", [out], [fl], {}, source))
        b.names[fx.name] = fl


def _flatten(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    x = b.tensor(fx.args[0], source)
    shape = tuple(int(s) for s in fx.meta["val"].shape)
    if len(shape) == 2 and shape[0] == b.tensors[x].shape[0]:
        b.emit(fx, "flatten", [x], {}, source)
    else:
        b.emit(fx, "reshape", [x], {"shape": list(shape)}, source)


def _reshape(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    x = b.tensor(fx.args[0], source)
    shape = [int(s) for s in fx.meta["val"].shape]
    if len(shape) == 2 and shape[0] == b.tensors[x].shape[0]:
        b.emit(fx, "flatten", [x], {}, source)
    elif shape == list(b.tensors[x].shape):
        b.names[fx.name] = x
    else:
        b.emit(fx, "reshape", [x], {"shape": shape}, source)


def _transpose(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    """transpose(x, a, b) and permute(x, dims): the canonical transpose (the batch axis stays first)."""
    x = b.tensor(fx.args[0], source)
    rank = len(b.tensors[x].shape)
    if "permute" in str(fx.target):
        perm = [int(d) % rank for d in fx.args[1]]
    else:
        perm = list(range(rank))
        i, j = int(fx.args[1]) % rank, int(fx.args[2]) % rank
        perm[i], perm[j] = perm[j], perm[i]
    if perm[:1] != [0]:
        b.unsupported(fx, source, "a transpose that moves the batch axis")
    b.emit(fx, "transpose", [x], {"perm": perm}, source)


def _slice(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    a = list(fx.args) + [None] * 5
    x = b.tensor(a[0], source)
    shape = b.tensors[x].shape
    axis = int(a[1] if a[1] is not None else 0) % len(shape)
    start, end, step = int(a[2] or 0), a[3], int(a[4] or 1)
    end = shape[axis] if end is None else min(int(end), shape[axis])
    start = start % shape[axis] if start < 0 else start
    end = end % shape[axis] if end < 0 else end
    if step <= 0:
        b.unsupported(fx, source, "slice with a non-positive step")
    if start == 0 and end == shape[axis] and step == 1:
        b.names[fx.name] = x
        return
    prod = b.nodes[-1] if b.nodes and b.nodes[-1].outputs == [x] else None
    attrs = {"axes": [axis], "starts": [start], "ends": [end], "steps": [step]}
    if extend_slice(prod, attrs, len(fx.args[0].users) == 1):
        b.tensors[x].shape = tuple(int(s) for s in fx.meta["val"].shape)
        b.names[fx.name] = x
        return
    b.emit(fx, "slice", [x], attrs, source)


def _split(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    """chunk, split and split_with_sizes: the pieces' sizes come from the traced shapes; each piece read
    (``getitem``) becomes a slice, so a piece nothing reads costs nothing."""
    x = b.tensor(fx.args[0], source)
    rank = len(b.tensors[x].shape)
    axis = int(fx.args[2] if len(fx.args) > 2 else fx.kwargs.get("dim", 0)) % rank
    if axis == 0:
        b.unsupported(fx, source, "a split along the batch axis")
    shapes = [tuple(int(d) for d in v.shape) for v in fx.meta["val"]]
    ends = np.cumsum([s[axis] for s in shapes]).tolist()
    b.pieces[fx.name] = (x, axis, [(e - s[axis], e) for s, e in zip(shapes, ends, strict=True)], shapes)


def _pad(b: _Builder, fx: torch.fx.Node, source: str) -> None:
    x = b.tensor(fx.args[0], source)
    p = [int(v) for v in fx.args[1]]
    mode = fx.args[2] if len(fx.args) > 2 else fx.kwargs.get("mode", "constant")
    value = fx.args[3] if len(fx.args) > 3 else fx.kwargs.get("value", None)
    if str(fx.target).startswith("aten.constant_pad_nd"):
        mode, value = "constant", (fx.args[2] if len(fx.args) > 2 else 0)
    if mode != "constant" or (value not in (None, 0, 0.0)):
        b.unsupported(fx, source, f"pad mode {mode!r} value {value!r} (only zero constant padding)")
    if any(v < 0 for v in p):
        b.unsupported(fx, source, "negative padding (cropping)")
    rank = len(b.tensors[x].shape)
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(p) // 2):  # torch lists (last dim begin, last dim end, ...)
        begins[rank - 1 - i], ends[rank - 1 - i] = p[2 * i], p[2 * i + 1]
    b.emit(fx, "pad", [x], {"pads": begins + ends}, source)


def _pair(v: Any) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = [int(i) for i in v]
    return v * 2 if len(v) == 1 else v


_HANDLERS: dict[str, Callable[[_Builder, torch.fx.Node, str], None]] = {
    "aten.conv2d.default": _conv,
    "aten.conv2d.padding": _conv,
    "aten.linear.default": _linear,
    "aten.batch_norm.default": _batch_norm,
    "aten._native_batch_norm_legit_no_training.default": _batch_norm,
    "aten.relu.default": _unary("relu"),
    "aten.relu_.default": _unary("relu"),
    "aten.relu6.default": _unary("relu6"),
    "aten.hardtanh.default": _hardtanh,
    "aten.hardtanh_.default": _hardtanh,
    "aten.hardswish.default": _unary("hardswish"),
    "aten.hardswish_.default": _unary("hardswish"),
    "aten.hardsigmoid.default": _unary("hardsigmoid"),
    "aten.hardsigmoid_.default": _unary("hardsigmoid"),
    "aten.sigmoid.default": _unary("sigmoid"),
    "aten.sigmoid_.default": _unary("sigmoid"),
    "aten.add.Tensor": _binary("add"),
    "aten.add_.Tensor": _binary("add"),
    "aten.mul.Tensor": _binary("mul"),
    "aten.mul_.Tensor": _binary("mul"),
    "aten.cat.default": _cat,
    "aten.max_pool2d.default": _max_pool,
    "aten.avg_pool2d.default": _avg_pool,
    "aten.adaptive_avg_pool2d.default": _adaptive_avg,
    "aten.mean.dim": _mean,
    "aten.flatten.using_ints": _flatten,
    "aten.view.default": _reshape,
    "aten.reshape.default": _reshape,
    "aten.slice.Tensor": _slice,
    "aten.chunk.default": _split,
    "aten.split.Tensor": _split,
    "aten.split_with_sizes.default": _split,
    "aten.transpose.int": _transpose,
    "aten.permute.default": _transpose,
    "aten.pad.default": _pad,
    "aten.constant_pad_nd.default": _pad,
}


def supported_ops() -> list[str]:
    """ATen ops the front end understands (for ``eptq-deploy ops`` and error messages)."""
    return sorted(set(_HANDLERS) | _IDENTITY)


def extend_slice(prev: Node | None, attrs: dict[str, list[int]], sole_consumer: bool) -> bool:
    """Fold a slice on other axes into ``prev``, the slice whose output (read by nothing else) it
    takes: ``x[:, :, ::2][..., ::2]`` (an option-A shortcut, as torch and its ONNX exporter write
    it) becomes one strided slice, one op and one grid, whichever format the model came in."""
    if prev is None or prev.op != "slice" or not sole_consumer or set(prev.attrs["axes"]) & set(attrs["axes"]):
        return False
    for k in ("axes", "starts", "ends", "steps"):
        prev.attrs[k] = prev.attrs[k] + attrs[k]
    return True


def fuse_activations(g: QuantGraph, fusing: tuple[str, ...]) -> QuantGraph:
    """Fold a ReLU/ReLU6 into the conv, linear or add that feeds only it, as the profile allows."""
    consumers = g.consumers()
    producer = g.producer()
    drop: set[str] = set()
    rename: dict[str, str] = {}
    for n in g.nodes:
        if n.op not in ("relu", "relu6"):
            continue
        src = n.inputs[0]
        p = producer.get(src)
        if p is None or p.op not in _FUSE_KIND or p.attrs.get("activation", "none") != "none":
            continue
        if f"{_FUSE_KIND[p.op]}+{n.op}" not in fusing or len(consumers.get(src, [])) != 1 or src in g.outputs:
            continue
        p.attrs["activation"] = n.op
        drop.add(n.name)
        rename[n.outputs[0]] = src
    if not drop:
        return g
    nodes = [n for n in g.nodes if n.name not in drop]
    for n in nodes:
        n.inputs = [rename.get(i, i) for i in n.inputs]
    outputs = [rename.get(o, o) for o in g.outputs]
    tensors = {k: v for k, v in g.tensors.items() if k not in rename}
    return QuantGraph(nodes, tensors, g.inputs, outputs, g.meta)


def capture(model: torch.nn.Module | torch.export.ExportedProgram, example: torch.Tensor, *,
            fusing: tuple[str, ...] = (), profile_name: str = "-") -> QuantGraph:
    """Trace ``model`` on ``example`` (one NCHW batch) into a float canonical graph."""
    ep = export_model(model, example)
    g = _Builder(ep, profile_name).run()
    g = fuse_activations(g, fusing)
    g.validate()
    return g
