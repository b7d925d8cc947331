"""The model as its users hold it: a TFLite file takes and returns NHWC everywhere (quantize, simulate,
export's checks, check, the loaded runner), and a trailing softmax runs in float on the host."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ai_edge_litert import schema_py_generated as S
from torch import nn

import eptq_deploy
from eptq_deploy.errors import DataError
from eptq_deploy.graph import Node, QuantGraph, TensorInfo
from eptq_deploy.model_io import apply_float_tail, interface, split_float_tail
from eptq_deploy.read_tflite import read
from eptq_deploy.targets import get_target

KW = {"profile": "tflite-int8", "targets": ["tflite-int8"], "method": "ptq", "progress": False}
X = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(5))
NHWC = X.permute(0, 2, 3, 1).contiguous()


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class Segmenter(nn.Module):
    """A 4-D output: what comes back must be NHWC for a TFLite-sourced model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def float_tflite(module: nn.Module, folder: Path, softmax: bool = False) -> Path:
    """A float TFLite file of ``module`` from the project's writer; ``softmax`` appends a SOFTMAX op,
    as classifier files from model zoos end."""
    qm = eptq_deploy.quantize(module.eval(), X, **KW)
    t = get_target("tflite-int8")
    t.emit(qm.float_graph, folder, quantized=False)
    path = folder / t.float_model_file
    if softmax:
        m = S.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
        sg = m.subgraphs[0]
        logits = sg.outputs[0]
        probs = S.TensorT()
        probs.shape, probs.type, probs.name, probs.buffer = list(sg.tensors[logits].shape), S.TensorType.FLOAT32, b"probs", 0
        sg.tensors.append(probs)
        code = S.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = S.BuiltinOperator.SOFTMAX
        code.version = 1
        m.operatorCodes.append(code)
        op = S.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = len(m.operatorCodes) - 1, [logits], [len(sg.tensors) - 1]
        op.builtinOptionsType, op.builtinOptions = S.BuiltinOptions.SoftmaxOptions, S.SoftmaxOptionsT()
        op.builtinOptions.beta = 1.0
        sg.operators.append(op)
        sg.outputs = [len(sg.tensors) - 1]
        import flatbuffers

        b = flatbuffers.Builder(1024)
        b.Finish(m.Pack(b), file_identifier=b"TFL3")
        path = folder / "with_softmax.tflite"
        path.write_bytes(bytes(b.Output()))
    return path


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return float_tflite(Classifier(), tmp_path_factory.mktemp("cls"), softmax=True)


def test_a_tflite_classifier_takes_nhwc_and_returns_the_files_probabilities(classifier_file: Path,
                                                                             tmp_path: Path) -> None:
    qm = eptq_deploy.quantize(classifier_file, NHWC, **KW)
    face = interface(qm.graph.meta)
    assert face == {"source_layout": "NHWC", "float_tail": [
        {"op": "softmax", "attrs": {"axis": 1}, "source": face["float_tail"][0]["source"],
         "inputs": [qm.graph.outputs[0]], "outputs": face["source_outputs"]}],
        "outputs": list(qm.graph.outputs), "source_outputs": face["source_outputs"], "cut_chosen_by": "auto"}
    assert qm.graph.nodes[-1].op == "linear"  # the integer graph ends at the logits
    probs, logits = qm.simulate(NHWC), qm.simulate(NHWC, raw=True)
    torch.testing.assert_close(probs, torch.softmax(logits, 1))
    float_probs = qm.forward_float(NHWC)
    torch.testing.assert_close(float_probs, torch.softmax(Classifier().eval()(X), 1).detach(), rtol=1e-4, atol=1e-5)
    bundle = eptq_deploy.export(qm, out=tmp_path / "b", data=NHWC)
    manifest = eptq_deploy.bundle.read_manifest(bundle)
    assert manifest["input"]["layout"] == "NHWC" and manifest["input"]["shape"][1:] == [12, 12, 3]
    assert [s["op"] for s in manifest["model"]["float_tail"]] == ["softmax"]
    assert "softmax" in manifest["model"]["output"]["meaning"]
    assert manifest["targets"]["tflite-int8"]["checks"]["max_abs_diff_lsb"] == 0  # raw outputs, bit-exact
    runner = eptq_deploy.load(bundle)
    np.testing.assert_allclose(runner.run(NHWC.numpy()), probs.numpy(), atol=1e-6)
    np.testing.assert_array_equal(runner.run(NHWC.numpy(), raw=True), logits.numpy())
    res = eptq_deploy.check(bundle, NHWC)["tflite-int8"]["checks"]
    assert res["max_abs_diff_lsb"] == 0 and res["argmax_agreement_vs_simulation"] == 1.0


def test_data_in_the_wrong_layout_is_refused_in_one_line(classifier_file: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"takes \(12, 12, 3\) \(NHWC") as err:
        eptq_deploy.quantize(classifier_file, X, **KW)  # NCHW given to an NHWC file
    assert "\n" not in str(err.value)
    qm = eptq_deploy.quantize(classifier_file, NHWC, **KW)
    with pytest.raises(DataError, match="check data has sample shape"):
        eptq_deploy.export(qm, out=tmp_path / "b", data=X)
    assert not (tmp_path / "b").exists()


def test_a_4d_output_comes_back_in_the_files_layout(tmp_path: Path) -> None:
    path = float_tflite(Segmenter(), tmp_path)
    qm = eptq_deploy.quantize(path, NHWC, **KW)
    y = qm.simulate(NHWC)
    assert y.shape == (32, 12, 12, 4)
    ref = Segmenter().eval()(X).detach().permute(0, 2, 3, 1)
    torch.testing.assert_close(qm.forward_float(NHWC), ref, rtol=1e-4, atol=1e-5)
    runner = eptq_deploy.load(eptq_deploy.export(qm, out=tmp_path / "b", data=NHWC[:8]))
    np.testing.assert_array_equal(runner.run(NHWC[:8].numpy()), y[:8].numpy())
    assert read(path).graph.meta["source_layout"] == "NHWC"


def test_onnx_softmax_tail_keeps_nchw(tmp_path: Path) -> None:
    model = nn.Sequential(Classifier(), nn.Softmax(1)).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (X[:1],), path, dynamo=False, opset_version=17)
    qm = eptq_deploy.quantize(path, X, **KW)
    assert interface(qm.graph.meta)["source_layout"] == "NCHW"
    torch.testing.assert_close(qm.forward_float(X), model(X).detach(), rtol=1e-4, atol=1e-5)


def _chain(consumers_of_logits: int) -> QuantGraph:
    t = {n: TensorInfo(n, (2, 4), "input" if n == "x" else "activation") for n in ("x", "y", "p", "q")}
    nodes = [Node("r", "relu", ["x"], ["y"]), Node("s", "softmax", ["y"], ["p"], {"axis": 1})]
    if consumers_of_logits == 2:  # the logits also feed another op: nothing can be cut
        nodes += [Node("a", "add", ["p", "y"], ["q"])]
        return QuantGraph(nodes, t, ["x"], ["q"])
    return QuantGraph(nodes, {k: v for k, v in t.items() if k != "q"}, ["x"], ["p"])


def test_only_a_trailing_softmax_is_cut() -> None:
    g = split_float_tail(_chain(1))
    assert [n.op for n in g.nodes] == ["relu"] and g.outputs == ["y"]
    y = torch.randn(2, 4)
    torch.testing.assert_close(apply_float_tail(g.meta, y), torch.softmax(y, 1))
    np.testing.assert_allclose(apply_float_tail(g.meta, y.numpy()), torch.softmax(y, 1).numpy(), rtol=1e-6)
    kept = _chain(2)
    assert split_float_tail(kept) is kept  # a softmax inside the graph stays (and every target refuses it)


class FullyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean((2, 3))


def test_a_dynamic_onnx_input_is_sized_by_input_shape(tmp_path: Path) -> None:
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(FullyConv().eval(), (X[:1],), path, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    with pytest.raises(eptq_deploy.errors.ModelError, match=r"dynamic size\(s\).*--input-shape 3,224,224") as err:
        eptq_deploy.quantize(path, X, **KW)
    assert "\n" not in str(err.value)
    with pytest.raises(eptq_deploy.errors.ModelError, match="contradicts"):
        eptq_deploy.readers.read_source(path, (4, 12, 12))
    qm = eptq_deploy.quantize(path, X, input_shape=(3, 12, 12), **KW)  # sized as the data
    assert qm.graph.tensors[qm.graph.inputs[0]].shape[1:] == (3, 12, 12)
    torch.testing.assert_close(qm.forward_float(X), FullyConv().eval()(X).detach(), rtol=1e-4, atol=1e-5)
    with pytest.raises(eptq_deploy.errors.UsageError, match="drop input_shape"):
        eptq_deploy.quantize(FullyConv().eval(), X, input_shape=(3, 12, 12), **KW)


def test_a_dynamic_tflite_input_is_refused_with_the_fix(classifier_file: Path, tmp_path: Path) -> None:
    import flatbuffers

    m = S.ModelT.InitFromPackedBuf(classifier_file.read_bytes(), 0)
    m.subgraphs[0].tensors[m.subgraphs[0].inputs[0]].shapeSignature = [-1, -1, -1, 3]
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    path = tmp_path / "dyn.tflite"
    path.write_bytes(bytes(b.Output()))
    with pytest.raises(eptq_deploy.errors.ModelError, match="dynamic size.*re-convert with a fixed input shape"):
        eptq_deploy.quantize(path, NHWC, **KW)
    with pytest.raises(eptq_deploy.errors.ModelError, match="contradicts"):
        eptq_deploy.quantize(classifier_file, NHWC, input_shape=(16, 16, 3), **KW)


def test_the_cli_feeds_a_tflite_file_its_layout_and_size(classifier_file: Path, tmp_path: Path) -> None:
    """Images load as usual (uint8 NHWC .npz, the preset at the file's 12x12 input) and reach the file
    NHWC; check re-runs them the same way."""
    from typer.testing import CliRunner

    from eptq_deploy.cli import app

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (40, 20, 20, 3), dtype=np.uint8))
    out = tmp_path / "bundle"
    res = CliRunner().invoke(app, ["quantize", str(classifier_file), "--data", str(tmp_path / "d.npz"),
                                   "--preset", "unit", "--target", "tflite-int8", "--method", "ptq",
                                   "--samples", "24", "--out", str(out), "--no-progress", "--threads", "1"])
    assert res.exit_code == 0, res.output
    manifest = eptq_deploy.bundle.read_manifest(out)
    assert manifest["input"]["layout"] == "NHWC" and manifest["input"]["preprocessing"]["crop"] == 12
    assert manifest["targets"]["tflite-int8"]["checks"]["max_abs_diff_lsb"] == 0
    res = CliRunner().invoke(app, ["check", str(out), "--data", str(tmp_path / "d.npz"), "--include-calibration"])
    assert res.exit_code == 0, res.output
    assert "agreement with simulation 100.00%" in res.output
