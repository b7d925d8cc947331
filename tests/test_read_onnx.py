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
    assert "fixed input size" in _refusal(tmp_path, dynamic)
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


def test_softmax_is_read_and_refused_by_every_target_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A classifier ending in Softmax reads (and matches onnxruntime); no target has a measured
    integer softmax yet, so quantize stops with its name before calibration."""
    from eptq_deploy import api
    from eptq_deploy.targets import list_targets

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 5), nn.Softmax(1)).eval()
    src = read(_export(model))
    assert src.graph.nodes[-1].op == "softmax"
    check_against_source(src, X[:4])
    monkeypatch.setattr(api, "collect_stats", lambda *a, **k: pytest.fail("calibration ran"))
    for target, _ in list_targets():
        with pytest.raises(UnsupportedOpError, match="softmax"):
            eptq_deploy.quantize(_export(model), X, targets=[target], method="eptq", progress=False)


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
