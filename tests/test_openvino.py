"""openvino-ir: the IR holds the graph's integers, runs int8 on the CPU plugin, and stays
within a measured distance of the simulation (the plugin folds residual adds)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eptq_deploy
from eptq_deploy.errors import TargetError
from eptq_deploy.hw_profiles import load_profile
from eptq_deploy.quantized import QuantizedModel
from eptq_deploy.targets import get_target, list_targets
from eptq_deploy.targets.openvino_ir import (
    OpenVinoIrTarget,
    exact_on_this_cpu,
    read_back_mismatches,
)
from eptq_deploy.zoo import BasicBlock

TARGET = "openvino-ir"
#: int8-pot named explicitly; openvino-cpu reaches openvino-ir as its native target
PROFILES = ["int8-pot", "openvino-cpu"]
#: max |runtime - simulation| in output LSBs. The CPU plugin rounds conv + residual once where
#: strict QDQ rounds twice (strict QDQ measured 1 and 2 LSB here); the target's "openvino" rule
#: simulates that fusion, and the runtime matches it to the bit.
MAX_LSB = {"int8-pot": 0.0, "openvino-cpu": 0.0}
#: where the CPU has no VNNI and a layer's u8 x i8 pair sums can saturate in int16, the plugin is not
#: bit-exact (module docstring of targets/openvino_ir.py): the check is then by argmax agreement
AGREEMENT_WITHOUT_VNNI = 0.95


def assert_openvino_matches(qm: QuantizedModel, got: np.ndarray, sim: np.ndarray, max_lsb: float = 0.0) -> None:
    """The CPU plugin's output against the simulation: within ``max_lsb`` output steps where it is
    exact on this CPU, else the same top class on AGREEMENT_WITHOUT_VNNI of the samples."""
    diff = np.abs(got.astype(np.float64) - sim) / float(qm.graph.tensors[qm.graph.outputs[0]].quant.scale[0])
    if exact_on_this_cpu(qm.graph):
        assert diff.max() <= max_lsb + 1e-4, f"max {diff.max():.3f} LSB"
    else:
        agree = float(np.mean(got.argmax(1) == sim.argmax(1)))
        assert agree >= AGREEMENT_WITHOUT_VNNI, f"argmax agreement {agree:.2%} (max {diff.max():.1f} LSB, no VNNI)"


class ResNetLike(nn.Module):
    """conv-bn-relu, depthwise relu6, identity residual, option-A residual (slice + pad), max pool, mean, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.block = BasicBlock(8, 8)
        self.down = BasicBlock(8, 16, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.dw(F.relu(self.bn(self.conv(x)))))
        y = self.pool(self.down(self.block(y)))
        return self.fc(y.mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return ResNetLike().eval()


CALIB = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(3))
X = torch.randn(256, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def _lsb(qm: QuantizedModel) -> float:
    return float(qm.graph.tensors[qm.graph.outputs[0]].quant.scale[0])


@pytest.fixture(scope="module")
def quantized() -> dict[str, QuantizedModel]:
    model = _model()
    return {"int8-pot": eptq_deploy.quantize(model, CALIB, profile="int8-pot", targets=[TARGET], progress=False),
            "openvino-cpu": eptq_deploy.quantize(model, CALIB, profile="openvino-cpu", progress=False)}


@pytest.fixture(scope="module")
def bundles(quantized: dict[str, QuantizedModel], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ov")
    return {p: eptq_deploy.export(qm, target=TARGET, out=root / p, data=X[:32]) for p, qm in quantized.items()}


def test_registered_and_native_to_openvino_cpu(quantized: dict[str, QuantizedModel]) -> None:
    assert TARGET in dict(list_targets())
    assert isinstance(get_target(TARGET), OpenVinoIrTarget)
    assert load_profile("openvino-cpu").native_target == TARGET
    assert quantized["openvino-cpu"].targets == [TARGET]
    assert get_target(TARGET).runtime_versions()["openvino"].startswith("20")


@pytest.mark.parametrize("profile", PROFILES)
def test_bundle_files(profile: str, quantized: dict[str, QuantizedModel], bundles: dict[str, Path]) -> None:
    folder = bundles[profile] / TARGET
    for f in ("model.xml", "model.bin", "model_float.xml", "model_float.bin"):
        assert (folder / f).is_file() and (folder / f).stat().st_size > 0, f
    assert not [p.name for p in folder.iterdir() if p.suffix == ".onnx"]  # no temp ONNX left behind
    entry = json.loads((bundles[profile] / "manifest.json").read_text())["targets"][TARGET]
    assert entry["runtime"] == "openvino" and entry["model_file"] == f"{TARGET}/model.xml"
    assert entry["rounding"] == "openvino"
    assert entry["checks"]["samples"] == 32
    if exact_on_this_cpu(quantized[profile].graph):
        assert entry["checks"]["max_abs_diff_lsb"] <= MAX_LSB[profile] + 1e-4
    else:
        assert entry["checks"]["argmax_agreement_vs_simulation"] >= AGREEMENT_WITHOUT_VNNI
        assert entry["inspect"]["vnni"] is False  # the report says why


@pytest.mark.parametrize("profile", PROFILES)
def test_runtime_matches_simulation(profile: str, quantized: dict[str, QuantizedModel],
                                    bundles: dict[str, Path]) -> None:
    qm = quantized[profile]
    got = eptq_deploy.load(bundles[profile]).run(X.numpy())
    sim = qm.simulate(X, target=TARGET).numpy()
    assert got.shape == sim.shape == (len(X), 5) and got.dtype == np.float32
    assert_openvino_matches(qm, got, sim, MAX_LSB[profile])


def test_strict_qdq_rule_misses_the_fused_residual_add(quantized: dict[str, QuantizedModel],
                                                      bundles: dict[str, Path]) -> None:
    """Why the target has its own rule: strict QDQ rounds the conv before the residual add."""
    from eptq_deploy.simulate import dequantize, get_rule, run_integer

    qm = quantized["int8-pot"]
    got = eptq_deploy.load(bundles["int8-pot"]).run(X.numpy()).astype(np.float64)
    out_q = qm.graph.tensors[qm.graph.outputs[0]].quant
    strict = dequantize(run_integer(qm.graph, X, get_rule("float-half-even")), out_q).numpy()
    assert np.abs(got - strict).max() / _lsb(qm) >= 1.0


def test_without_residual_adds_bit_exact(tmp_path: Path) -> None:
    """Without residual adds the two rules agree, and the runtime matches both to the bit."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.ReLU6(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.MaxPool2d(2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    qm = eptq_deploy.quantize(chain, CALIB, profile="int8-pot", targets=[TARGET], progress=False)
    target = OpenVinoIrTarget()
    target.emit(qm.graph, tmp_path)
    got = target.load(tmp_path).run(X.numpy())
    assert_openvino_matches(qm, got, qm.simulate(X, target=TARGET).numpy())


@pytest.mark.parametrize("profile", PROFILES)
def test_float_model_agrees(profile: str, quantized: dict[str, QuantizedModel], bundles: dict[str, Path]) -> None:
    qm = quantized[profile]
    flt = get_target(TARGET).load(bundles[profile] / TARGET, float_model=True).run(X.numpy())
    ref = qm.forward_float(X).numpy()
    assert np.abs(flt - ref).max() <= 1e-5 * np.abs(ref).max()  # f32 hint: not bf16
    np.testing.assert_array_equal(flt.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("profile", PROFILES)
def test_ir_read_back_exact(profile: str, quantized: dict[str, QuantizedModel], bundles: dict[str, Path]) -> None:
    g = quantized[profile].graph
    rb = OpenVinoIrTarget().read_back(bundles[profile] / TARGET)
    assert read_back_mismatches(g, rb) == []
    assert rb["unattributed"] == []
    for n in g.weighted_nodes():
        assert rb["weights"][n.inputs[1]]["codes"].dtype == np.int8
        assert rb["weights"][n.inputs[2]]["codes"].dtype == np.int32
    # every grid with a quantize of its own: input, convs, adds, mean, output
    assert {"input", "output"} <= set(rb["fake_quantize"]) and len(rb["fake_quantize"]) >= 10
    assert all(fq["levels"] == 256 for fqs in rb["fake_quantize"].values() for fq in fqs)


def test_read_back_catches_changes(quantized: dict[str, QuantizedModel], bundles: dict[str, Path]) -> None:
    """The comparison is not vacuous: a changed code, weight scale or activation grid is named."""
    g = quantized["openvino-cpu"].graph
    rb = OpenVinoIrTarget().read_back(bundles["openvino-cpu"] / TARGET)
    conv = g.weighted_nodes()[1]
    w, act = g.tensors[conv.inputs[1]], conv.outputs[0]
    changed = g.copy()
    codes = w.data.copy()
    codes.flat[0] = codes.flat[0] + (1 if codes.flat[0] < 127 else -1)
    changed.tensors[w.name] = dataclasses.replace(w, data=codes)
    bad = read_back_mismatches(changed, rb)
    assert len(bad) == 1 and w.name in bad[0] and "1 integer codes differ" in bad[0]
    changed = g.copy()
    changed.tensors[w.name] = dataclasses.replace(w, quant=dataclasses.replace(w.quant, scale=w.quant.scale * 1.0001))
    assert any(w.name in b and "scales" in b for b in read_back_mismatches(changed, rb))
    a = g.tensors[act]
    changed = g.copy()
    changed.tensors[act] = dataclasses.replace(a, quant=dataclasses.replace(a.quant, zero_point=a.quant.zero_point + 1))
    assert any(act in b and "input range" in b for b in read_back_mismatches(changed, rb))


@pytest.mark.parametrize("profile", PROFILES)
def test_inspect_every_weighted_layer_int8(profile: str, quantized: dict[str, QuantizedModel],
                                           bundles: dict[str, Path]) -> None:
    info = OpenVinoIrTarget().inspect(bundles[profile] / TARGET)
    layers = len(quantized[profile].graph.weighted_nodes())  # 6 convolutions and the linear
    assert info["total_weighted_layers"] == layers == 7
    assert info["int8_layers"] == layers and info["not_int8"] == []
    # the CPU plugin picks u8 or i8 per layer by the CPU's features: either is integer
    assert set(info["runtime_precisions"].values()) <= {"u8", "i8"}
    kinds: Counter[str] = Counter()
    for key, count in info["runtime_layers"].items():
        kind, precision = key.split(":")
        kinds[kind] += count if precision in ("u8", "i8") else 0
    assert kinds["FullyConnected"] == 1 and kinds["Convolution"] == 6
    assert info["inference_precision"] == "f32"
    manifest = json.loads((bundles[profile] / "manifest.json").read_text())
    assert manifest["targets"][TARGET]["inspect"]["int8_layers"] == layers


def test_sixteen_bit_activations_refused(tmp_path: Path) -> None:
    """openvino-ir stores activations in uint8 QDQ: a 16-bit profile fails before any work."""
    (tmp_path / "a16.yaml").write_text("extends: openvino-cpu\nname: a16\nactivations:\n  bits: 16\n")
    model = _model()
    with pytest.raises(TargetError) as info:
        eptq_deploy.quantize(model, CALIB[:2], profile=tmp_path / "a16.yaml", targets=[TARGET], progress=False)
    msg = str(info.value)
    assert "16-bit activations" in msg and TARGET in msg and "\n" not in msg


class _InputShortcut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_an_add_of_the_network_input_is_not_folded_and_matches_the_plugin(tmp_path) -> None:
    """x + conv(x): the plugin rounds the convolution's output before the sum (strict QDQ); the rule follows."""
    x = torch.randn(8, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    qm = eptq_deploy.quantize(_InputShortcut().eval(), x, profile="int8-pot", targets=[TARGET], method="ptq",
                              progress=False)
    target = get_target(TARGET)
    if not target.exact_here(qm.graph):
        pytest.skip("the CPU plugin is not exact on this CPU for this graph")
    target.emit(qm.graph, tmp_path)
    out = target.load(tmp_path).run(x.numpy())
    sim = qm.simulate(x, target=TARGET).numpy()
    assert np.array_equal(out, sim)
