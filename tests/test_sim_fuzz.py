"""Property tests: the integer simulation computes what the runtimes compute on the exported file.

Hypothesis draws ONE op with random parameters (convolutions of every kernel, stride,
padding, dilation and fused activation; depthwise; linear; add / mul / concat of two or
three branches on different grids; pools; global mean; hardswish, sigmoid, hardsigmoid;
reshapes; option-A slice + pad shortcuts), a random input shape and value range (so the
grids vary over four decades), a weight scale, a profile and a data seed. The tiny model
is quantized with PTQ for every target (``list_targets()``) on 16 samples and exported once;
on 8 fresh samples (a quarter wider than the calibration data, so clamping is exercised) each
runtime, on each kernel set it offers, must equal the simulation of the rule those kernels
follow, to the bit (onnxruntime, TFLite through XNNPACK and through its reference kernels,
TFLM; OpenVINO where ``exact_here`` holds on this CPU). A target may refuse a graph with one of
the project's errors (recorded as a hypothesis event: ``--hypothesis-show-statistics``);
any other exception is a failure. The bugs the fuzzing found are kept as regression tests:
onnxruntime's fused QLinear* kernels rounding ties their own way (the ``onnxruntime`` rule) and
XNNPACK refusing requantization scales of 256 or more (TFLite falls back to its reference kernels).

``EPTQ_SIM_FUZZ_EXAMPLES=200 python -m pytest tests/test_sim_fuzz.py`` hunts longer than CI.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, currently_in_test_context, event, given, note, settings
from hypothesis import strategies as st
from test_tflite import _one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)
from torch import nn

import eptq_deploy
from eptq_deploy.errors import EptqError
from eptq_deploy.quantized import QuantizedModel
from eptq_deploy.simulate import dequantize, get_rule, run_integer
from eptq_deploy.targets import get_target, list_targets

#: every target, built-in and plugin; each is run on every kernel set it offers (``kernel_variants``)
TARGETS = tuple(name for name, _ in list_targets(compilers=False))  # ethos-u: test_ethos_u.py
#: (profile, weight bits or None for the profile's own)
PROFILES = (("tflite-int8", None), ("int8-pot", None), ("imx500", 8), ("imx500", 4), ("imx500", 2),
            ("w4a8-pot", None))
EXAMPLES = int(os.environ.get("EPTQ_SIM_FUZZ_EXAMPLES", "25"))
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Case:
    """One drawn model: ``op`` with ``params`` on a (C, H, W) input, plus how it is quantized."""

    op: str
    params: dict[str, Any]
    shape: tuple[int, int, int]
    profile: str = "tflite-int8"
    weight_bits: int | None = None
    x_scale: float = 1.0  # input values: x_scale * (randn + x_shift), 1.25 * randn for the checked ones
    x_shift: float = 0.0
    w_scale: float = 1.0  # weights U(-1, 1) * w_scale / sqrt(fan_in), biases U(-1, 1) * w_scale * x_scale
    lead: str = "none"  # none | conv | conv_relu: a 1x1 conv in front of the op
    seed: int = 0  # weights and data


# ------------------------------------------------------------------- the model


class OneOp(nn.Module):
    """The drawn op, with the small convolutions its branches need; forward dispatches on ``case.op``."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.case = case
        p, (c, _, _) = case.params, case.shape
        self.lead = nn.Conv2d(c, c, 1) if case.lead != "none" else None
        op = case.op
        if op == "conv2d":
            self.conv = nn.Conv2d(c, p["out"], p["kernel"], p["stride"], p["padding"], p["dilation"], bias=p["bias"])
        elif op == "depthwise_conv2d":
            self.conv = nn.Conv2d(c, c * p["mult"], p["kernel"], p["stride"], p["padding"], p["dilation"], groups=c,
                                  bias=p["bias"])
        elif op == "linear":
            h, w = case.shape[1:]
            self.fc = nn.Linear(c * (h * w if p["pre"] == "flatten" else 1), p["out"], bias=p["bias"])
        elif op in ("add", "mul"):
            k = p.get("out", c)
            self.a = nn.Conv2d(c, k, 1)
            self.b = nn.Conv2d(c, k, 3 if p["variant"] == "residual" else 1, padding=1 if p["variant"] == "residual" else 0)
        elif op == "concat":
            self.branches = nn.ModuleList(nn.Conv2d(c, k, 1) for k in p["branch_out"])
        elif op == "reshape" and p["tail_conv"]:
            h, w = case.shape[1:]
            self.tail = nn.Conv2d({"hcw": h, "one_channel": 1, "column": c * h * w}[p["variant"]], 2, 1)
        elif op == "slice_pad" and p["variant"] == "option_a_residual":
            self.conv = nn.Conv2d(c, c + 2 * p["pads"][4], 3, 2, 1)
        self._scale_weights(case)

    def _scale_weights(self, case: Case) -> None:
        torch.manual_seed(case.seed)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    nn.init.uniform_(m.weight, -1.0, 1.0)
                    m.weight.mul_(case.w_scale / max(1.0, float(np.sqrt(m.weight[0].numel()))))
                    if m.bias is not None:
                        nn.init.uniform_(m.bias, -1.0, 1.0)
                        m.bias.mul_(case.w_scale * case.x_scale)
            if case.op in ("add", "mul", "concat"):  # the branches on very different grids
                convs = [self.a, self.b] if case.op != "concat" else list(self.branches)
                for conv, s in zip(convs[1:], case.params["branch_scales"], strict=False):
                    conv.weight.mul_(s)
                    conv.bias.mul_(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lead is not None:
            x = self.lead(x)
            if self.case.lead == "conv_relu":
                x = F.relu(x)
        return getattr(self, "_" + self.case.op)(x, self.case.params)

    # ---------------------------------------------------------------- one per op
    def _conv2d(self, x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        return _act(self.conv(x), p["act"])

    _depthwise_conv2d = _conv2d

    def _linear(self, x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        x = x.flatten(1) if p["pre"] == "flatten" else x.mean((2, 3))
        return _act(self.fc(x), p["act"])

    def _branches(self, x: torch.Tensor, p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        v = p["variant"]
        if v == "slices":
            k = x.shape[1] // 2
            return x[:, :k], x[:, k:2 * k]
        if v == "self":
            return x, x
        if v == "residual":
            return x, self.b(x)
        if v == "convs":
            return self.a(x), self.b(x)
        # squeeze-excite: a per-channel gate broadcast over H, W
        s = x.mean((2, 3), keepdim=True)
        if v != "se_plain":
            s = _act(self.b(s), p["gate"])
        return x, s

    def _add(self, x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        a, b = self._branches(x, p)
        return _act(a + b, p["act"])

    def _mul(self, x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        a, b = self._branches(x, p)
        return b * a if p["swap"] else a * b

    def _concat(self, x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        parts, convs = [], iter(self.branches)
        for kind in p["kinds"]:
            if kind == "conv":
                parts.append(next(convs)(x))
            elif kind == "relu":
                parts.append(F.relu(x))
            else:
                parts.append(x)
        return torch.cat(parts, p["axis"])

    def _max_pool(self, x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        return F.max_pool2d(x, p["kernel"], p["stride"], p["padding"])

    def _avg_pool(self, x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        return F.avg_pool2d(x, p["kernel"], p["stride"], p["padding"], count_include_pad=p["count_include_pad"])

    def _mean(self, x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        v = p["variant"]
        if v == "adaptive":
            return F.adaptive_avg_pool2d(x, 1)
        return x.mean((-1, -2) if v == "negative_dims" else (2, 3), keepdim=v == "keepdim")

    def _unary(self, x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        return _act(x.flatten(1) if p["flatten_first"] else x, p["fn"])

    def _reshape(self, x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        n, c, h, w = x.shape
        shape = {"flatten": None, "view_flat": (n, -1), "hcw": (n, h, c, w), "rows": (n, c * h, w),
                 "one_channel": (n, 1, c * h, w), "column": (n, c * h * w, 1, 1)}[p["variant"]]
        y = x.flatten(1) if shape is None else x.reshape(shape)
        return self.tail(y) if p["tail_conv"] else y

    def _slice_pad(self, x: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        v, (l, r, t, b, front, back) = p["variant"], p["pads"]
        if v in ("option_a", "option_a_residual"):  # CIFAR ResNet shortcut: subsample, zero channels both sides
            y = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, front, front))
            return self.conv(x) + y if v == "option_a_residual" else y
        c0, h0, hs, w0, ws = p["slice"]
        y = x[:, c0:, h0::hs, w0::ws] if v != "pad" else x
        return F.pad(y, (l, r, t, b, front, back)) if v != "slice" else y


def _act(x: torch.Tensor, fn: str) -> torch.Tensor:
    return {"none": lambda t: t, "relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish,
            "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}[fn](x)


# ----------------------------------------------------------------- strategies


def _log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    """10**e for e in [lo, hi], to three significant digits (readable reproductions)."""
    return st.floats(lo, hi).map(lambda e: float(f"{10.0 ** e:.3g}"))


def _window(draw: st.DrawFn, h: int, w: int, max_k: int, pools: bool) -> dict[str, Any]:
    """Kernel, stride, padding (and dilation for convolutions), square or per axis, that fit (h, w)."""
    square = draw(st.booleans())
    same = not pools and draw(st.integers(0, 5)) == 0  # padding="same": stride 1, asymmetric for even kernels
    axes = []
    for size in ((min(h, w),) if square else (h, w)):
        dil = 1 if pools else draw(st.integers(1, 2))
        stride = 1 if same else draw(st.integers(1, 3))
        if pools:  # torch: padding at most half the kernel
            k = draw(st.integers(1, max_k))
            pad = draw(st.integers(0, k // 2))
            k = min(k, size + 2 * pad)
        else:
            pad = 0 if same else draw(st.integers(0, 2))
            k = draw(st.integers(1, min(max_k, (size + 2 * pad - 1) // dil + 1)))
        axes.append((k, stride, pad, dil))
    (kh, sh, ph, dh), (kw, sw, pw, dw) = axes * 2 if square else axes
    out: dict[str, Any] = {"kernel": (kh, kw), "stride": (sh, sw), "padding": "same" if same else (ph, pw)}
    if not pools:
        out["dilation"] = (dh, dw)
    return out


ACTS = st.sampled_from(["none", "relu", "relu6"])


@st.composite
def cases(draw: st.DrawFn, ops: tuple[str, ...]) -> Case:
    op = draw(st.sampled_from(ops))
    profile, bits = draw(st.sampled_from(PROFILES))
    c = draw(st.integers(2 if op in ("depthwise_conv2d", "add") else 1, 16 if op == "linear" else 8))
    h, w = draw(st.integers(3, 12)), draw(st.integers(3, 12))
    p: dict[str, Any] = {}
    if op in ("conv2d", "depthwise_conv2d"):
        p = _window(draw, h, w, 5, pools=False)
        p |= {"bias": draw(st.booleans()), "act": draw(ACTS)}
        p |= {"out": draw(st.integers(1, 8))} if op == "conv2d" else {"mult": draw(st.integers(1, 2))}
    elif op == "linear":
        p = {"pre": draw(st.sampled_from(["flatten", "mean"])), "out": draw(st.integers(1, 16)),
             "bias": draw(st.booleans()), "act": draw(ACTS)}
        if p["pre"] == "flatten":
            c = min(c, 4)
    elif op == "add":
        p = {"variant": draw(st.sampled_from(["slices", "self", "residual", "convs"])), "act": draw(ACTS),
             "out": c, "branch_scales": [draw(_log_uniform(-1.5, 1.5))]}
    elif op == "mul":
        p = {"variant": draw(st.sampled_from(["self", "convs", "se", "se_plain"])), "swap": draw(st.booleans()),
             "gate": draw(st.sampled_from(["sigmoid", "hardsigmoid", "none", "relu"])),
             "branch_scales": [draw(_log_uniform(-1.5, 1.5))]}
    elif op == "concat":
        axis = draw(st.sampled_from([1, 1, 2, 3, -1]))
        kinds = draw(st.lists(st.sampled_from(["x", "conv", "conv", "relu"]), min_size=2, max_size=3))
        n_conv = kinds.count("conv")
        outs = [draw(st.integers(1, 4)) if axis == 1 else c for _ in range(n_conv)]
        p = {"axis": axis, "kinds": kinds, "branch_out": outs,
             "branch_scales": [draw(_log_uniform(-1.5, 1.5)) for _ in range(max(n_conv - 1, 0))]}
    elif op in ("max_pool", "avg_pool"):
        win = _window(draw, h, w, 4, pools=True)
        p = {"kernel": win["kernel"], "stride": draw(st.sampled_from([None, win["stride"]])), "padding": win["padding"]}
        if op == "avg_pool":
            p["count_include_pad"] = draw(st.booleans())
    elif op == "mean":
        p = {"variant": draw(st.sampled_from(["flat", "keepdim", "adaptive", "negative_dims"]))}
    elif op == "unary":
        p = {"fn": draw(st.sampled_from(["hardswish", "sigmoid", "hardsigmoid", "relu", "relu6"])),
             "flatten_first": draw(st.booleans())}
    elif op == "reshape":
        v = draw(st.sampled_from(["flatten", "view_flat", "hcw", "rows", "one_channel", "column"]))
        p = {"variant": v, "tail_conv": v in ("hcw", "one_channel", "column") and draw(st.booleans())}
    elif op == "slice_pad":
        v = draw(st.sampled_from(["option_a", "option_a_residual", "slice", "pad", "slice_pad"]))
        pads = [draw(st.integers(0, 2)) for _ in range(6)]
        if v.startswith("option_a"):
            pads = [0, 0, 0, 0, draw(st.integers(1, 4)), 0]
        p = {"variant": v, "pads": pads,
             "slice": (draw(st.integers(0, c - 1)), draw(st.integers(0, 1)), draw(st.integers(1, 3)),
                       draw(st.integers(0, 1)), draw(st.integers(1, 3)))}
    else:
        raise AssertionError(op)
    weighted = op in ("conv2d", "depthwise_conv2d", "linear")
    return Case(op=op, params=p, shape=(c, h, w), profile=profile, weight_bits=bits,
                x_scale=draw(_log_uniform(-2, 2)), x_shift=draw(st.sampled_from([0.0, 0.0, 0.5, -1.0, 2.0, -3.0])),
                w_scale=draw(_log_uniform(-2, 2)),
                lead="none" if weighted else draw(st.sampled_from(["none", "conv", "conv_relu"])),
                seed=draw(st.integers(0, 2**16 - 1)))


# ------------------------------------------------------------ data, quantize


def _data(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(case.seed)
    calib = torch.randn(16, *case.shape, generator=gen)
    fresh = 1.25 * torch.randn(8, *case.shape, generator=gen)  # a little past the calibrated range
    return case.x_scale * (calib + case.x_shift), case.x_scale * (fresh + case.x_shift)


def _record(what: str, detail: str = "") -> None:
    """A hypothesis event (counted by --hypothesis-show-statistics) and note; nothing outside @given."""
    if currently_in_test_context():
        event(what)
        if detail:
            note(f"{what}: {detail}")


def _refused(where: str, e: EptqError) -> None:
    _record(f"{where} refused: {type(e).__name__}", str(e))


def _quantize(case: Case) -> tuple[QuantizedModel, torch.Tensor] | None:
    model = OneOp(case).eval()
    calib, x = _data(case)
    try:
        qm = eptq_deploy.quantize(model, calib, profile=case.profile, targets=list(TARGETS), method="ptq", outputs=[],
                                  weight_bits=case.weight_bits, progress=False)
    except EptqError as e:
        _refused("quantize", e)
        return None
    return qm, x


# ---------------------------------------------------------------------- check


def _export(qm: QuantizedModel, root: Path) -> dict[str, Path]:
    """Target -> folder of its emitted model file (the file alone: bundles are tested elsewhere);
    a target that refuses the graph is recorded and left out, and so is one whose runtime is
    not exact on this CPU for this graph (test_conformance.py runs those)."""
    folders = {}
    for t in TARGETS:
        if not get_target(t).exact_here(qm.graph):
            _record(f"{t}: not exact on this CPU, not compared")
            continue
        folder = root / t
        folder.mkdir()
        try:
            get_target(t).emit(qm.graph, folder)
        except EptqError as e:
            _refused(t, e)
            continue
        folders[t] = folder
    return folders


def check_case(case: Case) -> dict[str, np.ndarray]:
    """Quantize, export and run ``case``: per target, |runtime - simulation| in output LSBs."""
    got = _quantize(case)
    if got is None:
        return {}
    qm, x = got
    lsb = float(qm.graph.tensors[qm.graph.outputs[0]].quant.scale[0])
    diffs = {}
    with tempfile.TemporaryDirectory() as d:
        for t, folder in _export(qm, Path(d)).items():
            target = get_target(t)
            for kwargs in target.kernel_variants:
                runner = target.load(folder, **kwargs)
                name = f"{t} ({runner.kernels})" if runner.kernels else t
                if runner.kernels and runner.kernels.startswith("reference ("):
                    _record(f"{t}: {runner.kernels.split(':')[0]})")  # the reference run below covers it
                    continue
                out = runner.run(x.numpy())
                sim = qm.simulate(x, target=t, rounding=runner.rounding).numpy()
                assert out.shape == sim.shape, (name, out.shape, sim.shape)
                diffs[name] = np.rint(np.abs(out.astype(np.float64) - sim.astype(np.float64)) / lsb)
    _record(f"compared: {', '.join(diffs) or 'nothing'}")
    return diffs


def _assert_match(diffs: dict[str, np.ndarray]) -> None:
    bad = {t: (int(np.count_nonzero(d)), d.size, int(d.max())) for t, d in diffs.items() if d.max() > 0}
    assert not bad, "runtime != simulation: " + "; ".join(
        f"{t}: {n} of {size} outputs differ, by up to {m} LSB" for t, (n, size, m) in bad.items())


# ----------------------------------------------------------------------- tests

OPS = ("conv2d", "depthwise_conv2d", "linear", "add", "mul", "concat", "unary", "max_pool", "avg_pool", "mean",
       "reshape", "slice_pad")


@pytest.mark.parametrize("op", OPS)
@FUZZ
@given(data=st.data())
def test_runtimes_match_simulation(op: str, data: st.DataObject) -> None:
    case = data.draw(cases((op,)), label="case")
    _record(f"profile: {case.profile}{'' if case.weight_bits is None else f' w{case.weight_bits}'}")
    diffs = check_case(case)
    assume(diffs)  # every target refused: nothing was tested
    _assert_match(diffs)


# Minimal reproductions of the ties the property test found (hypothesis shrank them): each was 1 LSB off
# while the simulation modelled onnx-qdq as DQ -> float32 op -> QuantizeLinear ("float-half-even").
ORT_FUSED_CASES = {
    # AVERAGE of two codes: (q1 - z) + (q2 - z) odd puts the mean on k + 0.5; the zero point -17 is odd, and
    # QLinearAveragePool rounds (k + 0.5 - 17) half to even where float-half-even rounds k + 0.5 first
    "QLinearAveragePool": Case(op="avg_pool", params={"kernel": (1, 2), "stride": None, "padding": (0, 0),
                                                      "count_include_pad": False},
                               shape=(1, 3, 3), profile="tflite-int8"),
    # x * sigmoid(...) = -127.5 output steps exactly; output zero point 7: QLinearMul gives -120, float-half-even -121
    "QLinearMul": Case(op="mul", params={"variant": "se", "swap": False, "gate": "sigmoid", "branch_scales": [1.0]},
                       shape=(1, 3, 3), profile="tflite-int8", x_scale=10.0, w_scale=10.0, seed=42),
    # two conv branches on free grids: the float32 sum of the dequantized values is 102.50006 output steps (103),
    # QLinearAdd's two FMAs on the raw codes with the zero points folded into one constant give 102
    "QLinearAdd": Case(op="add", params={"variant": "convs", "act": "relu6", "out": 4, "branch_scales": [6.85]},
                       shape=(4, 8, 8), profile="tflite-int8", x_scale=6.49, lead="conv", seed=3439),
    # power-of-two grids, 28 pixels: a sum of 3283 codes is 234.5 output steps; float-half-even rounds the tie to
    # even (234), QLinearGlobalAveragePool multiplies by float32(s_in / (s_out * 28)) and gets 234.50002 (235)
    "QLinearGlobalAveragePool": Case(op="mean", params={"variant": "flat"}, shape=(2, 4, 7), profile="imx500",
                                     weight_bits=8, w_scale=10.0, lead="conv_relu", seed=1),
}


@pytest.mark.parametrize("kernel", list(ORT_FUSED_CASES))
def test_ort_fused_kernel_ties(kernel: str) -> None:
    """onnxruntime runs the op as ``kernel``, float-half-even misses its tie, the ``onnxruntime`` rule does not."""
    qm, x = _quantize(ORT_FUSED_CASES[kernel])
    with tempfile.TemporaryDirectory() as d:
        folder = eptq_deploy.export(qm, target="onnx-qdq", out=Path(d) / "b") / "onnx-qdq"
        assert kernel in get_target("onnx-qdq").inspect(folder)["runtime_ops"]
        out = get_target("onnx-qdq").load(folder).run(x.numpy())
    g = qm.graph
    half_even = dequantize(run_integer(g, x, get_rule("float-half-even")), g.tensors[g.outputs[0]].quant).numpy()
    assert np.any(out != half_even)
    assert qm.rounding["onnx-qdq"] == "onnxruntime"
    diffs = check_case(ORT_FUSED_CASES[kernel])
    # XNNPACK's MEAN rounds the exact ties of the last case downward, where its float rule rounds them to
    # even (4 of 16 outputs, 1 LSB; README, known deviations): these cases are about onnxruntime's kernels
    assert {"onnx-qdq", "tflite-int8 (reference)"} <= set(diffs)
    _assert_match({t: d for t, d in diffs.items() if t != "tflite-int8 (auto)"})


#: 2-bit weights of size ~100 on a 0.25 input grid into ReLU6's 1/32 grid: s_in * s_w / s_out = 412
XNNPACK_CASE = Case(op="conv2d", params={"kernel": (1, 1), "stride": (1, 1), "padding": "same", "dilation": (1, 1),
                                         "bias": False, "act": "relu6", "out": 1},
                    shape=(1, 3, 3), profile="imx500", weight_bits=2, x_scale=10.0, w_scale=100.0, seed=1)


def test_xnnpack_requantization_scale_falls_back_to_reference_kernels(tmp_path: Path) -> None:
    """XNNPACK refuses a requantization scale >= 256; the file is sound, so TFLite's reference kernels run it
    (exactly, rule ``tflite``), and the bundle says so instead of crashing."""
    qm, x = _quantize(XNNPACK_CASE)
    b = eptq_deploy.export(qm, target="tflite-int8", out=tmp_path / "b", data=x)
    entry = json.loads((b / "manifest.json").read_text())["targets"]["tflite-int8"]
    refused = "reference (XNNPACK refused: failed to create XNNPACK runtime"
    assert entry["inspect"]["kernels"].startswith(refused) and "412.2, XNNPACK takes < 256" in entry["inspect"]["kernels"]
    assert entry["inspect"]["xnnpack_partitions"] == 0 and entry["latency"]["kernels"] == entry["inspect"]["kernels"]
    assert entry["checks"]["max_abs_diff_lsb"] == 0
    runner = get_target("tflite-int8").load(b / "tflite-int8")
    assert runner.kernels == entry["inspect"]["kernels"]
    assert runner.rounding == entry["rounding"] == "tflite"
    np.testing.assert_array_equal(runner.run(x.numpy()), qm.simulate(x, target="tflite-int8", rounding="tflite").numpy())
    assert get_target("tflite-int8").load(b / "tflite-int8", kernels="reference").kernels == "reference"
    assert "XNNPACK refused" in (b / "report.md").read_text()


#: drawn by the fuzz test above (a 1x1 max pool reads the input quantizer directly): the input value
#: 10.250001 on a 0.5 grid is 20.500002 steps (code 21 by x / s); OpenVINO's FakeQuantize adds its
#: 128 shift in float32 first, 148.500002 becomes the tie 148.5, and it rounds to even (code 20)
OPENVINO_FQ_TIE = Case(op="max_pool", params={"kernel": (1, 1), "stride": None, "padding": (0, 0)}, shape=(1, 8, 11),
                       profile="int8-pot", x_scale=10.0, x_shift=-1.0, seed=14051)


def test_openvino_fake_quantize_rounds_after_its_shift() -> None:
    qm, x = _quantize(OPENVINO_FQ_TIE)
    strict = run_integer(qm.graph, x, get_rule("float-half-even"))
    assert torch.any(run_integer(qm.graph, x, get_rule("openvino")) != strict)  # the case holds such a tie
    _assert_match(check_case(OPENVINO_FQ_TIE))
