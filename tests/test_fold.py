"""Folded input normalisation (models that take uint8 pixels) and each target's file I/O contract.

The folded float graph must compute the unfolded model on raw pixels (up to the rounding of
the pad pixel at the border), every target's integer file must reproduce its simulation bit
for bit with the per-channel pad, and the manifest's ``io`` entries must be what the files hold.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from test_cli import _quantize, runner, workdir  # noqa: F401  (fixture)
from test_openvino import assert_openvino_matches
from test_tflite import _one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)
from torch import nn

import eptq_deploy
from eptq_deploy.capture import capture
from eptq_deploy.cli import app
from eptq_deploy.errors import DataError, UsageError
from eptq_deploy.float_exec import run_float
from eptq_deploy.fold import (
    EXPECTS_NORMALISED,
    EXPECTS_PIXELS,
    fold_preprocessing,
    pixel_grid,
)
from eptq_deploy.graph import QuantGraph
from eptq_deploy.hw_profiles import load_profile
from eptq_deploy.preprocess import PRESETS, Preset, normalize_pixels, to_pixels
from eptq_deploy.quantized import QuantizedModel
from eptq_deploy.targets import get_target
from eptq_deploy.targets.openvino_ir import read_back_mismatches
from eptq_deploy.targets.tflite_int8 import interpreter

PRESET = PRESETS["cifar"]  # ImageNet mean/std on 0..1: mean pixels 123.675, 116.28, 103.53
#: target -> profile it is quantized under (each target's native or a power-of-two one)
PROFILE = {"onnx-qdq": "int8-pot", "tflite-int8": "tflite-int8", "openvino-ir": "int8-pot"}


class TinyCnn(nn.Module):
    """Padded first conv (+ BN), a second padded conv, global pool, linear: 10 classes.

    ``stem`` picks the first conv: 3x3 padding 1 (stride 1 or 2), or a 4x4 "same" conv
    whose padding is asymmetric (1 before, 2 after).
    """

    def __init__(self, stem: str = "3x3") -> None:
        super().__init__()
        self.c1 = {"3x3": nn.Conv2d(3, 8, 3, padding=1, bias=False),
                   "3x3_stride2": nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
                   "4x4_same": nn.Conv2d(3, 8, 4, padding="same", bias=False)}[stem]
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c2(F.relu(self.bn(self.c1(x)))))
        return self.fc(y.mean((2, 3)))


def _model(stem: str = "3x3") -> nn.Module:
    torch.manual_seed(0)
    m = TinyCnn(stem)
    with torch.no_grad():  # a batch norm that does something, no class favoured by its bias
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.fc.bias.zero_()
    return m.eval()


def _pixels(n: int, seed: int) -> torch.Tensor:
    """Random RGB images (a colour cast each, smooth texture), integer pixels 0..255 as float
    NCHW, as a camera gives them: images that differ, so the classes the model picks differ."""
    g = torch.Generator().manual_seed(seed)
    texture = F.avg_pool2d(F.pad(torch.randn(n, 3, 12, 12, generator=g), (1, 1, 1, 1), mode="replicate"), 3, 1)
    cast = torch.randint(0, 256, (n, 3, 1, 1), generator=g).float()
    return (cast + 60 * texture).round().clamp(0, 255)


CALIB, HELD = _pixels(64, 0), _pixels(128, 1)




@pytest.fixture(scope="module")
def folded() -> dict[str, QuantizedModel]:
    return {t: eptq_deploy.quantize(_model(), CALIB, profile=PROFILE[t], targets=[t], progress=False,
                                    fold_preprocessing=PRESET) for t in PROFILE}


# ------------------------------------------------------------------ the float graph


def _first_conv_outputs(preset: Preset) -> tuple[torch.Tensor, torch.Tensor, QuantGraph]:
    fg = capture(_model(), normalize_pixels(CALIB[:1], preset))
    ff = fold_preprocessing(fg, preset)
    first = fg.nodes[0].outputs[0]
    got: dict[str, torch.Tensor] = {}
    run_float(fg, normalize_pixels(HELD, preset), hook=lambda t, y: got.setdefault("ref", y) if t == first else None)
    run_float(ff, HELD, hook=lambda t, y: got.setdefault("fold", y) if t == first else None)
    return got["ref"], got["fold"], fg


def test_folded_float_graph_is_the_model_on_pixels() -> None:
    """Interior outputs equal to float rounding; border outputs off by the pad pixel's rounding only."""
    ref, fold, fg = _first_conv_outputs(PRESET)
    np.testing.assert_allclose(fold[:, :, 1:-1, 1:-1], ref[:, :, 1:-1, 1:-1], rtol=1e-5, atol=1e-4)
    w = np.abs(fg.tensors[fg.nodes[0].inputs[1]].data).sum((2, 3))  # (out, in)
    mean, std = np.array(PRESET.mean), np.array(PRESET.std)
    off = np.abs(np.round(mean / PRESET.scale) - mean / PRESET.scale) * PRESET.scale / std
    bound = torch.from_numpy((w * off).sum(1)).float().view(1, -1, 1, 1) + 1e-4
    assert ((fold - ref).abs() <= bound).all()
    # a preset whose mean is a whole pixel (mean 127 on 0..255) folds exactly, border included
    ref, fold, _ = _first_conv_outputs(PRESETS["lite"])
    np.testing.assert_allclose(fold, ref, rtol=1e-5, atol=1e-4)


def test_pad_value_is_the_rounded_mean_pixel(folded: dict[str, QuantizedModel]) -> None:
    qm = folded["onnx-qdq"]
    first = qm.graph.nodes[0]
    assert first.attrs["pad_value"] == [124.0, 116.0, 104.0]
    assert "pad_value" not in qm.graph.nodes[1].attrs  # only the layer that reads pixels
    assert qm.float_graph.nodes[0].attrs["pad_value"] == first.attrs["pad_value"]


# ------------------------------------------------------------ the integer model


@pytest.mark.parametrize("target", list(PROFILE))
def test_input_grid_is_fixed_pixels(target: str, folded: dict[str, QuantizedModel]) -> None:
    qp = folded[target].graph.tensors["input"].quant
    assert (qp.bits, qp.signed, float(qp.scale[0]), int(qp.zero_point[0])) == (8, False, 1.0, 0)
    dark = eptq_deploy.quantize(_model(), CALIB * 0.2, profile=PROFILE[target], targets=[target], progress=False,
                                fold_preprocessing="cifar")  # dark calibration images do not shrink the grid
    assert dark.graph.tensors["input"].quant.to_json() == qp.to_json()


@pytest.mark.parametrize("target", list(PROFILE))
def test_folded_file_matches_its_simulation(target: str, folded: dict[str, QuantizedModel], tmp_path: Path) -> None:
    qm, t = folded[target], get_target(target)
    t.emit(qm.graph, tmp_path)
    t.emit(qm.float_graph, tmp_path, quantized=False)
    kernels = {"kernels": "reference"} if target == "tflite-int8" else {}
    runner = t.load(tmp_path, **kernels)
    sim = qm.simulate(HELD, target, rounding=runner.rounding).numpy()
    if target == "openvino-ir":  # bit for bit where this CPU's plugin is exact (test_openvino.py)
        assert_openvino_matches(qm, runner.run(HELD.numpy()), sim)
    else:
        np.testing.assert_array_equal(runner.run(HELD.numpy()), sim)  # bit for bit, the per-channel pad included
    flt = t.load(tmp_path, float_model=True).run(HELD.numpy())
    np.testing.assert_allclose(flt, qm.forward_float(HELD).numpy(), rtol=1e-5, atol=1e-5)
    facts = t.inspect(tmp_path)
    if target == "onnx-qdq":  # the pad sits on uint8 codes before the conv, which stays integer
        assert facts["float_conv_or_gemm_nodes"] == 0 and facts["runtime_ops"]["QLinearConv"] == 2
    elif target == "openvino-ir":
        assert facts["int8_layers"] == facts["total_weighted_layers"] == 3
        assert read_back_mismatches(qm.graph, t.read_back(tmp_path)) == []
    else:
        assert {"SPLIT", "PADV2", "CONCATENATION"} <= set(facts["runtime_ops"])


@pytest.mark.parametrize("target", ["onnx-qdq", "tflite-int8"])
@pytest.mark.parametrize("stem", ["3x3_stride2", "4x4_same"])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_other_padded_stems_match_their_simulation(stem: str, target: str, tmp_path: Path) -> None:
    """Strided and asymmetric first-layer padding: the pad pixel lands where the kernel reads it."""
    qm = eptq_deploy.quantize(_model(stem), CALIB, profile=PROFILE[target], targets=[target], progress=False,
                              fold_preprocessing=PRESET)
    assert qm.graph.nodes[0].attrs["pads"] == ([1, 1, 2, 2] if stem == "4x4_same" else [1, 1, 1, 1])
    t = get_target(target)
    t.emit(qm.graph, tmp_path)
    for kernels in ["auto", "reference"] if target == "tflite-int8" else [None]:
        runner = t.load(tmp_path, **({"kernels": kernels} if kernels else {}))
        sim = qm.simulate(HELD, target, rounding=runner.rounding).numpy()
        np.testing.assert_array_equal(runner.run(HELD.numpy()), sim, err_msg=str(runner.kernels))


@pytest.mark.parametrize("target", ["onnx-qdq", "tflite-int8"])
def test_folded_and_unfolded_models_agree(target: str, folded: dict[str, QuantizedModel]) -> None:
    """Same network, two input contracts: the argmax of the two integer models agrees."""
    unfolded = eptq_deploy.quantize(_model(), normalize_pixels(CALIB, PRESET), profile=PROFILE[target],
                                    targets=[target], progress=False)
    a = folded[target].simulate(HELD, target).numpy().argmax(1)
    b = unfolded.simulate(normalize_pixels(HELD, PRESET), target).numpy().argmax(1)
    assert np.mean(a == b) >= 0.95


def test_eptq_runs_on_the_folded_graph(tmp_path: Path) -> None:
    qm = eptq_deploy.quantize(_model(), CALIB, profile="int8-pot", targets=["onnx-qdq"], method="eptq", iters=5,
                              hessian="none", hmse=False, progress=False, fold_preprocessing=PRESET)
    assert qm.graph.nodes[0].attrs["pad_value"] == [124.0, 116.0, 104.0]
    t = get_target("onnx-qdq")
    t.emit(qm.graph, tmp_path)
    np.testing.assert_array_equal(t.load(tmp_path).run(HELD.numpy()), qm.simulate(HELD).numpy())


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("first", ["relu", "maxpool", "depthwise"])
def test_refused_when_the_input_feeds_another_op(first: str) -> None:
    head = {"relu": nn.ReLU(), "maxpool": nn.MaxPool2d(2), "depthwise": nn.Conv2d(3, 3, 3, padding=1, groups=3)}[first]
    model = nn.Sequential(head, nn.Conv2d(3, 4, 3)).eval()
    op = {"relu": "relu", "maxpool": "max_pool2d", "depthwise": "depthwise_conv2d"}[first]
    with pytest.raises(UsageError, match=rf"\({op} at .*run without --fold-preprocessing") as e:
        eptq_deploy.quantize(model, CALIB[:8], targets=["onnx-qdq"], progress=False, fold_preprocessing=PRESET)
    assert "\n" not in str(e.value)


def test_refused_on_normalised_data_and_non_8_bit_profiles() -> None:
    with pytest.raises(DataError, match="RGB pixels 0..255"):
        eptq_deploy.quantize(_model(), normalize_pixels(CALIB, PRESET), targets=["onnx-qdq"], progress=False,
                             fold_preprocessing=PRESET)
    p = load_profile("int8-pot")
    with pytest.raises(UsageError, match="8-bit pixels"):  # the built-in targets refuse such profiles earlier
        pixel_grid(dataclasses.replace(p, activations=dataclasses.replace(p.activations, bits=4)))


def test_to_pixels_inverts_the_preprocessing() -> None:
    for preset in PRESETS.values():
        assert torch.equal(to_pixels(normalize_pixels(CALIB, preset), preset), CALIB)


# ----------------------------------------------------------------- graph.json


def test_pad_value_round_trips_and_is_validated(folded: dict[str, QuantizedModel], tmp_path: Path) -> None:
    g = folded["onnx-qdq"].graph
    g.save(tmp_path)
    back = QuantGraph.load(tmp_path)
    assert back.to_json() == g.to_json() and back.nodes[0].attrs["pad_value"] == [124.0, 116.0, 104.0]
    assert back.meta["folded_preprocessing"]["mean"] == list(PRESET.mean)
    arrays = {k: t.data for k, t in g.tensors.items() if t.data is not None}
    for bad, msg in (([1.0, 2.0], "one finite number per input channel"), ([1.0, float("nan"), 3.0], "finite"),
                     ("124", "pad_value must")):
        doc = json.loads(json.dumps(g.to_json()))
        doc["nodes"][0]["attrs"]["pad_value"] = bad
        with pytest.raises(UsageError, match=msg):
            QuantGraph.from_json(doc, arrays)
    doc = json.loads(json.dumps(g.to_json()))
    doc["nodes"][1]["attrs"]["pad_value"] = [0.0] * 8  # max pools, linears... take no pad value
    doc["nodes"][-1]["attrs"]["colour"] = "red"
    with pytest.raises(UsageError, match="unknown attribute"):
        QuantGraph.from_json(doc, arrays)


# ------------------------------------------------- CLI, manifest and the io contract


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_cli_folded_bundle_states_its_contract(workdir: Path) -> None:  # noqa: F811
    res = _quantize(workdir, "--profile", "int8-pot", "--target", "onnx-qdq,tflite-int8,openvino-ir",
                    "--fold-preprocessing")
    assert res.exit_code == 0, res.output
    bundle = workdir / "bundle"
    m = _manifest(bundle)
    assert m["input"]["folded"] is True and m["input"]["expects"] == EXPECTS_PIXELS
    assert m["input"]["preprocessing"]["mean"] == list(PRESETS["cifar"].mean)
    assert "quantization" not in m["input"]  # one form: each target's io
    assert m["targets"]["onnx-qdq"]["io"]["input"]["quantization"]["scale"] == 1.0
    assert m["targets"]["onnx-qdq"]["io"]["input"]["quantization"]["zero_point"] == 0
    assert m["targets"]["tflite-int8"]["io"]["input"]["quantization"]["zero_point"] == -128
    for name, entry in m["targets"].items():
        assert entry["checks"]["argmax_agreement_vs_simulation"] == 1.0, name
        if name != "openvino-ir":
            assert entry["checks"]["max_abs_diff_lsb"] <= (0 if name == "onnx-qdq" else 1), name
    _read_back_io(bundle, m)
    report = (bundle / "report.md").read_text()
    assert "## Feeding this model" in report and "Normalise" not in report  # folded: pixels go in as they are
    assert "Quantize: q = clamp(round(p / 1) + (-128), -128, 127)" in report  # tflite: code = pixel - 128
    assert "the file quantizes it (QuantizeLinear inside the model): q = clamp(round(p / 1) + 0, 0, 255)" in report
    # check re-loads the images with the manifest's preprocessing and gives the model their pixels
    res = runner.invoke(app, ["check", str(bundle), "--data", str(workdir / "data.npz"), "--threads", "1",
                              "--target", "onnx-qdq"])
    assert res.exit_code == 0, res.output
    assert "agreement with simulation 100.00%" in res.output


def test_cli_unfolded_bundle_states_its_contract(workdir: Path) -> None:  # noqa: F811
    res = _quantize(workdir, "--profile", "tflite-int8", "--target", "tflite-int8,onnx-qdq")
    assert res.exit_code == 0, res.output
    m = _manifest(workdir / "bundle")
    assert m["input"]["folded"] is False and m["input"]["expects"] == EXPECTS_NORMALISED
    _read_back_io(workdir / "bundle", m)


def _read_back_io(bundle: Path, m: dict) -> None:
    """Each target's ``io`` entry is what its integer model file holds."""
    for name, entry in m["targets"].items():
        io, path = entry["io"], bundle / entry["model_file"]
        if name == "tflite-int8":
            it = interpreter(path, kernels="reference")
            for key, d in (("input", it.get_input_details()[0]), ("output", it.get_output_details()[0])):
                want = io[key]
                assert d["name"] == want["name"] and d["shape"].tolist() == want["shape"]
                assert d["dtype"] == np.int8 and want["dtype"] == "int8" and want["layout"] in ("NHWC", "NC")
                s, z = d["quantization"]
                assert (np.float32(s), z) == (np.float32(want["quantization"]["scale"]), want["quantization"]["zero_point"])
        elif name == "onnx-qdq":
            model = onnx.load(str(path))
            inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
            for key, vi in (("input", model.graph.input[0]), ("output", model.graph.output[0])):
                want = io[key]
                dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
                assert vi.name == want["name"] and dims == want["shape"] and want["layout"] in ("NCHW", "NC")
                assert vi.type.tensor_type.elem_type == TensorProto.FLOAT and want["dtype"] == "float32"
                op = "QuantizeLinear" if key == "input" else "DequantizeLinear"
                node = next(n for n in model.graph.node if n.op_type == op and vi.name in (n.input[0], n.output[0]))
                scale, zp = inits[node.input[1]], inits[node.input[2]]
                assert zp.dtype == np.uint8 and want["quantization"]["dtype"] == "uint8"
                assert (np.float32(scale), int(zp)) == (np.float32(want["quantization"]["scale"]),
                                                        want["quantization"]["zero_point"])
        else:
            import openvino as ov

            ir = ov.Core().read_model(str(path))
            for key, port in (("input", ir.inputs[0]), ("output", ir.outputs[0])):
                assert io[key]["name"] in port.get_names()
                assert [d.get_length() for d in list(port.get_partial_shape())[1:]] == io[key]["shape"][1:]
                assert port.get_element_type() == ov.Type.f32 and io[key]["dtype"] == "float32"
