"""The ONNX reader: torch -> ONNX files read into the canonical graph, checked against onnxruntime;
bad files refused in one line before any work."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from torch import nn

import eptq_deploy
from eptq_deploy.errors import EptqError, ModelError, UnsupportedOpError
from eptq_deploy.float_exec import run_float
from eptq_deploy.read_onnx import read
from eptq_deploy.readers import check_against_source


class Net(nn.Module):
    """The ops torch exports most: conv + batch norm, ReLU/ReLU6/HardSwish, squeeze-excitation
    (mean, 1x1 convs, HardSigmoid, Mul), max and average pools, an option-A shortcut (strided
    slice + channel pad), concat, flatten and a fully connected layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.c = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 + 16, 10)
        with torch.no_grad():
            self.a[1].running_mean.uniform_(-0.5, 0.5)
            self.a[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = nn.functional.hardswish(self.b(y))
        y = y * nn.functional.hardsigmoid(self.se2(torch.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        short = nn.functional.pad(y[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        z = torch.relu(self.c(y) + short)
        p = torch.cat([nn.functional.max_pool2d(z, 2), nn.functional.avg_pool2d(z, 2)], 1)
        return self.fc(torch.flatten(p.mean((2, 3)), 1))


X = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _export(model: nn.Module, opset: int = 17, dynamic: bool = False, dynamo: bool = False) -> onnx.ModelProto:
    if dynamo:  # torch's current exporter (needs onnxscript)
        return torch.onnx.export(model, (X[:1],), dynamo=True, opset_version=opset, verbose=False).model_proto
    f = io.BytesIO()
    torch.onnx.export(model, X[:1], f, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}} if dynamic else None)
    return onnx.load_from_string(f.getvalue())


@pytest.mark.parametrize(("opset", "dynamic", "dynamo"), [(13, False, False), (17, True, False), (18, False, True)])
def test_read_graph_computes_the_file(opset: int, dynamic: bool, dynamo: bool) -> None:
    model = Net().eval()
    src = read(_export(model, opset, dynamic, dynamo))
    check_against_source(src, X[:4])  # raises where it differs from onnxruntime
    with torch.no_grad():
        np.testing.assert_allclose(run_float(src.graph, X).numpy(), model(X).numpy(), rtol=1e-4, atol=1e-5)
    ops = {n.op for n in src.graph.nodes}
    assert ("hardswish" in ops) == (opset >= 14)  # before opset 14 the exporter writes x * HardSigmoid(x)
    assert {"conv2d", "depthwise_conv2d", "hardsigmoid", "mul", "slice", "pad", "max_pool2d",
            "avg_pool2d", "concat", "global_avg_pool", "linear"} <= ops
    assert "batch_norm" not in ops and sum(n.op == "slice" for n in src.graph.nodes) == 1  # folded, merged


def test_quantize_from_the_file_equals_quantize_from_the_module(tmp_path: Path) -> None:
    model = Net().eval()
    path = tmp_path / "net.onnx"
    onnx.save(_export(model), str(path))
    kw = {"profile": "int8-pot", "targets": ["onnx-qdq"], "method": "ptq", "progress": False}
    a, b = eptq_deploy.quantize(model, X, **kw), eptq_deploy.quantize(path, X, **kw)
    for n, m in zip(a.graph.weighted_nodes(), b.graph.weighted_nodes(), strict=True):
        np.testing.assert_array_equal(a.graph.tensors[n.inputs[1]].data, b.graph.tensors[m.inputs[1]].data)
    torch.testing.assert_close(a.simulate(X), b.simulate(X), rtol=0, atol=0)


def test_a_misread_op_is_named() -> None:
    src = read(_export(Net().eval()))
    node = next(n for n in src.graph.nodes if n.op == "hardswish")
    node.op = "relu"  # as a reader bug would
    with pytest.raises(ModelError, match=f"differs from the source model at relu {node.name}"):
        check_against_source(src, X[:4])


def _tiny(nodes: list, inits: list, shape: list, opset: int = 17, domain_opsets: tuple = ()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *domain_opsets])


def _refusal(tmp_path: Path, model: onnx.ModelProto | bytes) -> str:
    path = tmp_path / "m.onnx"
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    with pytest.raises(EptqError) as err:
        eptq_deploy.quantize(path, X, targets=["onnx-qdq"], method="ptq", progress=False)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_bad_files_are_refused_in_one_line(tmp_path: Path) -> None:
    good = _export(Net().eval()).SerializeToString()
    assert "cannot parse" in _refusal(tmp_path, good[: len(good) // 2])
    assert "cannot parse" in _refusal(tmp_path, b"not a model at all\n")
    custom = _tiny([helper.make_node("Frob", ["x"], ["y"], domain="my.ops")], [], [1, 3, 16, 16],
                   domain_opsets=(helper.make_opsetid("my.ops", 1),))
    assert "custom op my.ops::Frob" in _refusal(tmp_path, custom)
    softmax = _tiny([helper.make_node("Softmax", ["x"], ["y"], name="probs")], [], [1, 3, 16, 16])
    msg = _refusal(tmp_path, softmax)
    assert "ONNX op Softmax (node 'probs')" in msg
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zp = helper.make_tensor("z", TensorProto.INT8, [], [0])
    quantized = _tiny([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                       helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], [scale, zp], [1, 3, 16, 16])
    assert "already quantized" in _refusal(tmp_path, quantized)
    dynamic = _tiny([helper.make_node("Relu", ["x"], ["y"])], [], [1, 3, "h", "w"])
    assert "dynamic size(s)" in (msg := _refusal(tmp_path, dynamic)) and "--input-shape 3,224,224" in msg
    old = _tiny([helper.make_node("Relu", ["x"], ["y"])], [], [1, 3, 16, 16], opset=9)
    assert "opset 9" in _refusal(tmp_path, old)
    with pytest.raises(ModelError, match="model file not found"):
        eptq_deploy.quantize(tmp_path / "missing.onnx", X, progress=False)


def test_unsupported_op_stops_before_calibration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from eptq_deploy import api

    def no_calibration(*a: object, **k: object) -> None:
        raise AssertionError("calibration ran")

    monkeypatch.setattr(api, "collect_stats", no_calibration)
    with pytest.raises(UnsupportedOpError, match="Softmax"):
        eptq_deploy.quantize(_tiny([helper.make_node("Softmax", ["x"], ["y"])], [], [1, 3, 16, 16]), X,
                             method="eptq", progress=False)


def test_external_data_beside_the_file_is_read_and_elsewhere_refused(tmp_path: Path) -> None:
    model = Net().eval()
    proto = _export(model)
    path = tmp_path / "net.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="net.data",
              size_threshold=0)
    src = read(path)
    with torch.no_grad():
        np.testing.assert_allclose(run_float(src.graph, X).numpy(), model(X).numpy(), rtol=1e-4, atol=1e-5)
    evil = onnx.load(str(path), load_external_data=False)
    for t in evil.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.data"
    onnx.save(evil, str(tmp_path / "evil.onnx"))
    with pytest.raises(ModelError, match="not a file beside the model"):
        read(tmp_path / "evil.onnx")


_GOOD = _export(Net().eval()).SerializeToString()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupted_models_end_in_one_line_errors(data: st.DataObject) -> None:
    """Changed or truncated bytes of a valid file that still parse as protobuf: read, or one of the
    project's one-line errors, never a library's traceback (unparsable bytes: test_bad_files...)."""
    raw = bytearray(_GOOD)
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(1, len(raw)))]
    try:
        model = onnx.load_from_string(bytes(raw))
    except Exception:
        return
    try:
        read(model)
    except EptqError as e:
        assert "\n" not in str(e)


def test_a_file_that_aborts_onnx_shape_inference_is_refused_not_fatal() -> None:
    """A Conv whose kernel_shape (37 x 3) contradicts its weights and input (found by mutating a
    file) makes onnx's C++ shape inference, run by onnxruntime on load, abort the process; the
    reader's first run happens in a child process, so the caller gets a one-line error."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.zeros(108, np.float32).tolist())
    conv = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[37, 3], pads=[1, 1, 1, 1])
    with pytest.raises(ModelError, match="onnxruntime (crashed|cannot run)"):
        read(_tiny([conv], [w], [1, 3, 16, 16]))


def test_softmax_is_read_cut_off_at_the_end_and_refused_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    """A classifier ending in Softmax reads (and matches onnxruntime) and its softmax runs on the host
    after the integer graph; a softmax inside the graph has no measured integer kernel in any target,
    so quantize stops with its name before calibration."""
    from eptq_deploy import api
    from eptq_deploy.targets import list_targets

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 5), nn.Softmax(1)).eval()
    src = read(_export(model))
    assert src.graph.nodes[-1].op == "softmax"
    check_against_source(src, X[:4])
    qm = eptq_deploy.quantize(_export(model), X, targets=["onnx-qdq"], method="ptq", progress=False)
    assert qm.graph.nodes[-1].op == "linear" and [s["op"] for s in qm.graph.meta["float_tail"]] == ["softmax"]
    inside = nn.Sequential(model, nn.Linear(5, 3)).eval()  # softmax, then a layer: nothing to cut
    monkeypatch.setattr(api, "collect_stats", lambda *a, **k: pytest.fail("calibration ran"))
    for target, _ in list_targets(compilers=False):
        with pytest.raises(UnsupportedOpError, match="softmax"):
            eptq_deploy.quantize(_export(inside), X, targets=[target], method="eptq", progress=False)


def test_per_channel_constants_follow_broadcasting() -> None:
    """A constant folds into the layer before it only when it broadcasts along the channel axis:
    (C, 1, 1) against NCHW does, (C,) against NCHW broadcasts along W and does not."""
    from eptq_deploy.readers import per_channel_constant

    c = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(per_channel_constant(c.reshape(4, 1, 1), 4, 4, 1), c)
    np.testing.assert_array_equal(per_channel_constant(c.reshape(1, 4, 1, 1), 4, 4, 1), c)
    assert per_channel_constant(c, 4, 4, 1) is None  # ONNX: aligned with W, not C
    np.testing.assert_array_equal(per_channel_constant(c, 4, 4, 3), c)  # TFLite NHWC: channels last
    np.testing.assert_array_equal(per_channel_constant(np.float32(2.0), 3, 4, 1), [2.0, 2.0, 2.0])
    assert per_channel_constant(np.ones((2, 2), np.float32), 4, 2, 1) is None


# ------------------------------------------------- issue 13's missing ops: read in float, refused by targets
def _model(nodes: list, inits: list, shape: list, opset: int = 17, rank_out: int = 4) -> onnx.ModelProto:
    """One image input ``x``, output ``y`` of rank ``rank_out`` (sizes left to onnxruntime)."""
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(rank_out)])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _const(name: str, value: object, dtype: type = np.float32) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(value, dtype), name)


def _reads(model: onnx.ModelProto | nn.Module, x: torch.Tensor | None = None) -> set[str]:
    """Read ``model`` (a module is exported at opset 17) and check it against onnxruntime; its ops."""
    src = read(model if isinstance(model, onnx.ModelProto) else _export(model.eval()))
    check_against_source(src, X[:3] if x is None else x)
    return {n.op for n in src.graph.nodes}


class _Interp(nn.Module):
    def __init__(self, **kw: object) -> None:
        super().__init__()
        self.kw = kw
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(self.conv(x), **self.kw)


@pytest.mark.parametrize("kw", [{"scale_factor": 2, "mode": "nearest"}, {"size": (21, 11), "mode": "nearest"},
                                {"scale_factor": 2, "mode": "bilinear", "align_corners": False},
                                {"scale_factor": 0.5, "mode": "bilinear", "align_corners": False},
                                {"size": (23, 9), "mode": "bilinear", "align_corners": True},
                                {"size": (7, 20), "mode": "bilinear", "align_corners": False}])
def test_torch_interpolate_reads(kw: dict) -> None:
    assert "resize" in _reads(_Interp(**kw))


def _resize(opset: int, coord: str, mode: str, nearest: str = "round_prefer_floor", scales: list | None = None,
            sizes: list | None = None, **extra: object) -> onnx.ModelProto:
    ins = ["x", "roi" if opset == 11 else "", "scales" if scales is not None or opset == 11 else ""]
    inits = [_const("roi", [] if opset == 11 else [0.0]), _const("scales", scales or [])]
    if sizes is not None:
        ins.append("sizes")
        inits.append(_const("sizes", sizes, np.int64))
    node = helper.make_node("Resize", ins, ["y"], coordinate_transformation_mode=coord, mode=mode, nearest_mode=nearest,
                            **extra)
    return _model([node], inits, [1, 3, 16, 16], opset)


@pytest.mark.parametrize("coord", ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                                   "tf_half_pixel_for_nn"])
def test_resize_coordinate_rules_and_rounding(coord: str) -> None:
    """Every coordinate rule, nearest with every rounding, linear; scales (opset 11 with its roi input,
    opset 18 with axes) or sizes; up and down, integer and fractional ratios."""
    for nearest in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
        assert _reads(_resize(11, coord, "nearest", nearest, scales=[1, 1, 2.0, 1.5])) == {"resize"}
        assert _reads(_resize(13, coord, "nearest", nearest, sizes=[1, 3, 27, 10])) == {"resize"}
    assert _reads(_resize(11, coord, "linear", scales=[1, 1, 0.5, 2.5])) == {"resize"}
    assert _reads(_resize(19, coord, "linear", sizes=[1, 3, 9, 37])) == {"resize"}
    assert _reads(_resize(18, coord, "linear", scales=[3.0, 0.75], axes=[2, 3])) == {"resize"}


def test_resize_variants_not_read_are_refused_by_name() -> None:
    cases = {"mode 'cubic'": _resize(13, "half_pixel", "cubic", scales=[1, 1, 2, 2]),
             "tf_crop_and_resize": _resize(13, "tf_crop_and_resize", "linear", scales=[1, 1, 2, 2]),
             "the spatial axes of a 4-D NCHW tensor": _resize(13, "half_pixel", "nearest", scales=[1, 2, 2, 2]),
             "antialias": _resize(18, "half_pixel", "linear", scales=[1, 1, 0.5, 0.5], antialias=1)}
    for why, model in cases.items():
        with pytest.raises(UnsupportedOpError, match=f"ONNX op Resize .*{why}") as err:
            read(model)
        assert "\n" not in str(err.value)


class _Ops(nn.Module):
    """ConvTranspose2d (groups, dilation, output_padding), PReLU per channel and shared, LeakyReLU, tanh,
    SiLU, split, permute, tensor-tensor sub and div, and sub/div by constants (folded after a layer,
    held otherwise)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1)
        self.up2 = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=2, dilation=2)
        self.p1, self.p2 = nn.PReLU(8, 0.1), nn.PReLU(init=0.3)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 10, 5)
        self.register_buffer("c", torch.linspace(0.5, 2.0, 8).view(8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.p1(self.a(x) - self.c)  # folds into a
        y = nn.functional.leaky_relu(self.up(y) / self.c, 0.2)  # held: a transposed conv takes no folding
        s, t = torch.split(y, [3, 5], 1)
        y = torch.cat([t, torch.tanh(s)], 1)
        y = self.p2(self.up2(y))
        z = nn.functional.silu(self.b(x))
        y = y[:, :, :16, :16] - z
        y = (1.0 - y) / (torch.sigmoid(z) + torch.sigmoid(y))
        y = y.permute(0, 3, 1, 2)[:, :2, :, :5]  # NCHW -> NWCH, keep 2 x 6 x 5
        return self.fc(torch.flatten(y, 1))


def test_new_ops_read_from_torch_exports() -> None:
    for opset in (13, 17):
        src = read(_export(_Ops().eval(), opset))
        check_against_source(src, X[:3])
        ops = {n.op for n in src.graph.nodes}
        assert {"conv_transpose2d", "prelu", "leaky_relu", "tanh", "slice", "sub", "div", "transpose",
                "sigmoid", "mul"} <= ops, ops
        assert sum(n.op == "conv2d" for n in src.graph.nodes) == 2
        assert {t.kind for t in src.graph.tensors.values()} >= {"constant"}
    weighted = {n.op for n in src.graph.weighted_nodes()}
    assert weighted == {"conv2d", "linear"}  # conv_transpose2d stays out of quantization


def test_sub_and_div_by_constants_fold_after_a_layer_and_are_held_elsewhere() -> None:
    w, b = _const("w", np.random.default_rng(0).normal(size=(4, 3, 3, 3))), _const("b", np.zeros(4))
    c = _const("c", np.linspace(1, 2, 4).reshape(4, 1, 1))
    conv = helper.make_node("Conv", ["x", "w", "b"], ["h"], pads=[1, 1, 1, 1])
    for op in ("Sub", "Div"):
        src = read(_model([conv, helper.make_node(op, ["h", "c"], ["y"])], [w, b, c], [1, 3, 16, 16]))
        assert [n.op for n in src.graph.nodes] == ["conv2d"]
        check_against_source(src, X[:3])
        flipped = _model([conv, helper.make_node(op, ["c", "h"], ["y"])], [w, b, c], [1, 3, 16, 16])
        assert _reads(flipped) == {"conv2d", op.lower()}
        row = _model([helper.make_node(op, ["x", "r"], ["y"])], [_const("r", np.linspace(1, 2, 16))], [1, 3, 16, 16])
        assert _reads(row) == {op.lower()}  # (16,) broadcasts along W: held as a constant, not folded
    wide = _model([helper.make_node("Sub", ["x", "r"], ["y"])], [_const("r", np.ones((2, 3, 16, 16)))],
                  [1, 3, 16, 16])
    with pytest.raises(UnsupportedOpError, match="Sub .*does not broadcast onto"):
        read(wide)


def test_conv_auto_pad_and_dilation() -> None:
    w = _const("w", np.random.default_rng(0).normal(size=(4, 3, 3, 3)))
    for auto in ("SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET"):
        for stride, dilation in (([1, 1], [2, 2]), ([2, 2], [1, 1]), ([2, 1], [2, 3])):
            if auto.startswith("SAME") and dilation != [1, 1]:
                continue  # onnxruntime: "Dilation not supported for AutoPadType::SAME_UPPER or SAME_LOWER"
            kw = {"pads": [2, 1, 0, 3]} if auto == "NOTSET" else {}
            conv = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad=auto, strides=stride, dilations=dilation, **kw)
            assert _reads(_model([conv], [w], [1, 3, 15, 16]), torch.randn(3, 3, 15, 16)) == {"conv2d"}


def test_conv_transpose_pads_output_padding_and_auto_pad() -> None:
    w = _const("w", np.random.default_rng(0).normal(size=(4, 3, 3, 3)))
    cases = [{"strides": [2, 2], "pads": [0, 1, 2, 1]}, {"strides": [2, 3], "output_padding": [1, 2], "pads": [1, 0, 0, 1]},
             {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, {"strides": [2, 2], "auto_pad": "SAME_LOWER"},
             {"strides": [3, 2], "auto_pad": "VALID", "dilations": [2, 1]},
             {"strides": [2, 2], "output_shape": [34, 33]}, {"group": 2}]
    for kw in cases:
        weights = _const("w", np.random.default_rng(1).normal(size=(4, 2, 3, 3))) if "group" in kw else w
        node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], **kw)
        assert _reads(_model([node], [weights], [1, 4, 16, 16]), torch.randn(3, 4, 16, 16)) == {"conv_transpose2d"}


def test_split_transpose_prelu_leaky_relu_from_onnx_helper() -> None:
    x4 = [1, 3, 16, 16]
    split13 = _model([helper.make_node("Split", ["x", "s"], ["a", "b"], axis=3),
                      helper.make_node("Concat", ["b", "a"], ["y"], axis=3)], [_const("s", [5, 11], np.int64)], x4, 13)
    split11 = _model([helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, split=[1, 1, 1]),
                      helper.make_node("Concat", ["c", "a", "b"], ["y"], axis=1)], [], x4, 11)
    split18 = _model([helper.make_node("Split", ["x"], ["a", "b", "c"], axis=2, num_outputs=3),
                      helper.make_node("Concat", ["c", "b", "a"], ["y"], axis=2)], [], x4, 18)
    for m in (split13, split11, split18):
        assert _reads(m) == {"slice", "concat"}
    assert _reads(_model([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], [], x4)) == {"transpose"}
    assert _reads(_model([helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.3)], [], x4)) == {"leaky_relu"}
    for slope in (np.float32(0.25), np.array([0.1, 0.2, 0.3], np.float32).reshape(3, 1, 1)):
        assert _reads(_model([helper.make_node("PRelu", ["x", "s"], ["y"])], [_const("s", slope)], x4)) == {"prelu"}
    refused = {"moves the batch axis": helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2, 3]),
               "split along the batch axis": helper.make_node("Split", ["x"], ["y"], axis=0)}
    for why, node in refused.items():
        with pytest.raises(UnsupportedOpError, match=why):
            read(_model([node], [], [1, 3, 16, 16]))
    with pytest.raises(UnsupportedOpError, match="slope that is not"):
        read(_model([helper.make_node("PRelu", ["x", "s"], ["y"])], [_const("s", np.ones((1, 16, 16)))], x4))


def test_shape_arithmetic_folds_into_reshape_and_resize_sizes() -> None:
    """Older exporters compute a Reshape's target and a Resize's sizes from the input's Shape (Gather,
    Cast, Mul, Concat, Unsqueeze): the batch-1 run folds the chain away."""
    i64 = np.int64
    nodes = [helper.make_node("Shape", ["x"], ["shp"]),
             helper.make_node("Slice", ["shp", "two", "four"], ["hw"]),
             helper.make_node("Cast", ["hw"], ["hwf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["hwf", "k"], ["hw2f"]),
             helper.make_node("Cast", ["hw2f"], ["hw2"], to=TensorProto.INT64),
             helper.make_node("Slice", ["shp", "zero", "two"], ["nc"]),
             helper.make_node("Concat", ["nc", "hw2"], ["sizes"], axis=0),
             helper.make_node("Resize", ["x", "", "", "sizes"], ["big"], mode="nearest"),
             helper.make_node("Shape", ["big"], ["bshp"]),
             helper.make_node("Gather", ["bshp", "zero_s"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "zero"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["big", "target"], ["y"])]
    inits = [_const("two", [2], i64), _const("four", [4], i64), _const("zero", [0], i64), _const("k", [2.0, 2.0]),
             _const("zero_s", 0, i64), _const("minus1", [-1], i64)]
    src = read(_model(nodes, inits, [1, 3, 16, 16], 13, rank_out=2))
    check_against_source(src, X[:3])
    assert [n.op for n in src.graph.nodes] == ["resize", "flatten"]


def _canonical(op: str) -> eptq_deploy.graph.QuantGraph:
    """A float graph holding ``op`` after a convolution, read from a tiny ONNX file."""
    w = _const("w", np.random.default_rng(0).normal(size=(4, 3, 3, 3)))
    conv = helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1])
    second = {"sub": helper.make_node("Sub", ["h", "h"], ["y"]), "div": helper.make_node("Div", ["h", "h2"], ["y"]),
              "transpose": helper.make_node("Transpose", ["h"], ["y"], perm=[0, 1, 3, 2]),
              "resize": helper.make_node("Resize", ["h", "", "s"], ["y"], mode="linear"),
              "leaky_relu": helper.make_node("LeakyRelu", ["h"], ["y"]), "tanh": helper.make_node("Tanh", ["h"], ["y"]),
              "prelu": helper.make_node("PRelu", ["h", "p"], ["y"]),
              "conv_transpose2d": helper.make_node("ConvTranspose", ["h", "wt"], ["y"], strides=[2, 2]),
              "exp": helper.make_node("Exp", ["h"], ["y"]), "add": helper.make_node("Add", ["h", "g"], ["y"])}[op]
    extra = [helper.make_node("Relu", ["x"], ["x3"]), helper.make_node("Conv", ["x3", "w"], ["h2"], pads=[1, 1, 1, 1])] \
        if op == "div" else []
    inits = [w, _const("s", [1, 1, 2, 2]), _const("p", np.full((4, 1, 1), 0.2)),
             _const("wt", np.random.default_rng(1).normal(size=(4, 2, 3, 3))), _const("g", np.arange(16.0 * 16).reshape(16, 16))]
    src = read(_model([conv, *extra, second], inits, [1, 3, 16, 16]))
    assert op in {n.op for n in src.graph.nodes}
    return src.graph


#: the targets that write an op read from model files (every other target refuses it by name)
WRITTEN_BY = {"transpose": {"onnx-qdq", "openvino-ir", "tflite-int8", "tflite-micro"}, "resize": {"onnx-qdq", "openvino-ir"}}


@pytest.mark.parametrize("op", ["sub", "div", "transpose", "resize", "leaky_relu", "tanh", "prelu", "conv_transpose2d",
                                "exp", "add"])  # add: of a constant that is not per channel (a decode's grid)
def test_new_ops_are_refused_by_every_target_by_name(op: str) -> None:
    """Targets without a measured integer kernel for these refuse the op by name before calibration
    (fusing and the folded-input check run first and must not trip on them); every writer moves a
    transpose's codes, the QDQ writers run a linear resize between a dequantize and a quantize."""
    from eptq_deploy.capture import fuse_activations
    from eptq_deploy.targets import get_target, list_targets

    g = fuse_activations(_canonical(op), ("conv+relu", "add+relu", "linear+relu"))
    arrays = {k: t.data for k, t in g.tensors.items() if t.data is not None}
    back = eptq_deploy.graph.QuantGraph.from_json(g.to_json(), arrays)  # graph.json holds the new ops (validated)
    assert [(n.op, n.attrs) for n in back.nodes] == [(n.op, n.attrs) for n in g.nodes]
    for name, _ in list_targets(compilers=False):
        if name in WRITTEN_BY.get(op, ()):
            get_target(name).validate(g)
            continue
        with pytest.raises(UnsupportedOpError, match=rf"\b{op}\b") as err:
            get_target(name).validate(g)
        assert "\n" not in str(err.value)


def test_graph_json_checks_resize_transpose_and_constants() -> None:
    """An untrusted graph.json cannot carry a resize or transpose the float executor would misindex,
    nor a constant read by an op that expects an activation."""
    from eptq_deploy.errors import UsageError

    for op, attrs in (("resize", {"mode": "cubic"}), ("resize", {"size": [0, 4]}), ("transpose", {"perm": [1, 0, 2, 3]})):
        g = _canonical(op)
        next(n for n in g.nodes if n.op == op).attrs.update(attrs)
        with pytest.raises(UsageError, match=op):
            g.validate()
    g = _canonical("prelu")
    next(n for n in g.nodes if n.op == "prelu").op = "concat"  # concat moves activations: it cannot read one
    with pytest.raises(UsageError, match="reads constant"):
        g.validate()
