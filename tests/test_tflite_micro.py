"""Target tflite-micro: the int8 TFLite file on TFLM's interpreter, and the C++ sources an MCU team compiles."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import eptq_deploy
from eptq_deploy.targets import get_target

TARGET = "tflite-micro"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c(x))
        return self.fc(torch.relu(self.d(y) + y).mean((2, 3)))


X = torch.randn(160, 3, 8, 8, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[eptq_deploy.QuantizedModel, Path]:
    qm = eptq_deploy.quantize(Net().eval(), X[:64], profile="int8-pot", targets=[TARGET], method="ptq", progress=False)
    return qm, eptq_deploy.export(qm, out=tmp_path_factory.mktemp("tflm") / "b", data=X[64:])


def test_runs_on_tflm_as_simulated(bundle: tuple[eptq_deploy.QuantizedModel, Path]) -> None:
    qm, b = bundle
    runner = eptq_deploy.load(b)
    assert runner.rounding == "tflite-micro" and runner.kernels == "TFLM reference"
    np.testing.assert_array_equal(runner.run(X[64:].numpy()), qm.simulate(X[64:], TARGET).numpy())


@pytest.mark.parametrize("profile", ["int8-pot", "tflite-int8"])
def test_fully_connected_follows_tflm_not_tflite(profile: str, tmp_path: Path) -> None:
    """TFLM's FULLY_CONNECTED requantizes with the quantized multiplier; TFLite's reference kernel
    (rule ``tflite``) rescales in double, which is 1 LSB off here on free-scale grids."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 5)).eval()
    x = torch.randn(600, 3, 8, 8)  # the global stream after the weights: a draw with a free-scale tie
    qm = eptq_deploy.quantize(net, x[:100], profile=profile, targets=[TARGET], method="ptq", progress=False)
    t = get_target(TARGET)
    t.emit(qm.graph, tmp_path)
    got = t.load(tmp_path).run(x[100:].numpy())
    np.testing.assert_array_equal(got, qm.simulate(x[100:], TARGET).numpy())
    if profile == "tflite-int8":  # the rule the TFLite reference kernels follow would miss it
        assert not np.array_equal(got, qm.simulate(x[100:], TARGET, rounding="tflite").numpy())


def test_sources_and_arena(bundle: tuple[eptq_deploy.QuantizedModel, Path]) -> None:
    _, b = bundle
    folder = b / TARGET
    header = (folder / "model_data.h").read_text()
    facts = get_target(TARGET).inspect(folder)
    assert facts["arena_bytes"] > 0 and f"kTensorArenaSize = {-(-facts['arena_bytes'] // 16) * 16};" in header
    assert f"kModelOpCount = {len(facts['resolver'])};" in header
    for method in facts["resolver"]:
        assert f"resolver.{method}();" in header
    source = (folder / "model_data.cc").read_text()
    model = (folder / "model.tflite").read_bytes()
    assert f"g_model_data_len = {len(model)};" in source and "alignas(16)" in source
    assert "#include <" not in header and "tensorflow" not in header  # self-contained
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler here")
    done = subprocess.run(["g++", "-std=c++17", "-Wall", "-c", "model_data.cc", "-o", str(b / "model_data.o")],
                          cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


class Wide(nn.Module):
    """Big enough layers that 4- and 2-bit indices plus value tables beat the int8 container."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Conv2d(3, 16, 3, padding=1)  # 432 weights: tables would cost more than they save
        self.b = nn.Conv2d(16, 32, 3, padding=1)
        self.d = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.d(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.fc(y.mean((2, 3)))


#: per width: (tensors compressed, weights they hold, their output channels). A layer is compressed
#: when ceil(n * bits / 8) + channels * 2**bits + 16 (header) < n: at 4 bits only b (4,608 weights;
#: a: 216 + 256 + 16 > 432, d: 144 + 512 + 16 > 288, fc: 160 + 160 + 16 > 320), at 2 bits all four
LUT_EXPECTED = {4: (1, 4608, 32), 2: (4, 432 + 4608 + 288 + 320, 16 + 32 + 32 + 10)}


@pytest.mark.parametrize("bits", [4, 2])
def test_sub_8_bit_weights_are_lut_compressed_and_exact(bits: int, tmp_path: Path) -> None:
    x = torch.randn(96, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    qm = eptq_deploy.quantize(Wide().eval(), x[:64], profile="imx500", weight_bits=bits, targets=[TARGET],
                              method="ptq", progress=False)
    t = get_target(TARGET)
    t.emit(qm.graph, tmp_path)
    np.testing.assert_array_equal(t.load(tmp_path).run(x[64:].numpy()), qm.simulate(x[64:], TARGET).numpy())
    facts = t.inspect(tmp_path)
    comp = facts["weight_compression"]
    tensors, weights, channels = LUT_EXPECTED[bits]
    assert (comp["tensors"], comp["decoded_bytes"]) == (tensors, weights)
    assert comp["stored_bytes"] >= -(-weights * bits // 8) + channels * 2**bits + 16 * tensors
    assert comp["file_bytes_saved"] > 0
    assert facts["model_bytes"] == comp["file_bytes_uncompressed"] - comp["file_bytes_saved"]
    assert "AddDecode" in facts["resolver"] and "resolver.AddDecode();" in (tmp_path / "model_data.h").read_text()
    assert facts["arena_bytes"] >= comp["arena_bytes_uncompressed"]


def test_eight_bit_weights_stay_uncompressed(bundle: tuple[eptq_deploy.QuantizedModel, Path]) -> None:
    _, b = bundle
    facts = get_target(TARGET).inspect(b / TARGET)
    assert facts["weight_compression"]["method"] == "none" and "AddDecode" not in facts["resolver"]
    assert not (b / TARGET / "compression.json").exists()


def test_read_back_decodes_compressed_weights(tmp_path: Path) -> None:
    """The file holds the graph's integers once its LUT-compressed weights are decoded (and not before)."""
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    qm = eptq_deploy.quantize(Wide().eval(), x, profile="imx500", weight_bits=2, targets=[TARGET], method="ptq",
                              progress=False)
    t = get_target(TARGET)
    t.emit(qm.graph, tmp_path)
    assert t.read_back_mismatches(tmp_path, qm.graph) == []
    from ai_edge_litert import schema_py_generated as S

    from eptq_deploy.targets.tflite_int8 import read_back_mismatches
    raw = read_back_mismatches(S.ModelT.InitFromPackedBuf((tmp_path / t.model_file).read_bytes(), 0), qm.graph)
    assert len([m for m in raw if "integers differ" in m or "no INT8" in m]) == 4  # the four packed weights


def test_standalone_relu6_shares_its_input_grid(tmp_path: Path) -> None:
    """TFLM's RELU6 clamps in its input's grid and never requantizes (RELU does): the tflite-micro
    rules give RELU6 its input's grid, so TFLM computes what the simulation does (found by the
    property tests: 128 LSB off before)."""

    class AddRelu6(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.relu6(x[:, :1] + x[:, 1:])

    x = torch.randn(40, 2, 3, 3, generator=torch.Generator().manual_seed(0)) * 4
    qm = eptq_deploy.quantize(AddRelu6().eval(), x[:24], profile="int8-pot", targets=[TARGET], method="ptq",
                              progress=False)
    relu6 = next(n for n in qm.graph.nodes if n.op == "relu6")
    assert qm.graph.tensors[relu6.inputs[0]].quant == qm.graph.tensors[relu6.outputs[0]].quant
    t = get_target(TARGET)
    t.emit(qm.graph, tmp_path)
    np.testing.assert_array_equal(t.load(tmp_path).run(x[24:].numpy()), qm.simulate(x[24:], TARGET).numpy())


@pytest.mark.parametrize("scale", [0.01, 0.1, 100.0])
def test_logistic_in_gemmlowp_fixed_point(scale: float, tmp_path: Path) -> None:
    """TFLM's LOGISTIC runs gemmlowp's fixed-point logistic (TFLite's kernel a float-built table):
    the tflite-micro rule computes it exactly, over narrow to saturating input grids."""

    class Sigmoid(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(x)

    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * scale
    qm = eptq_deploy.quantize(Sigmoid().eval(), x[:32], profile="int8-pot", targets=[TARGET], method="ptq", outputs=[],
                              progress=False)
    t = get_target(TARGET)
    t.emit(qm.graph, tmp_path)
    got = t.load(tmp_path).run(x.numpy())
    np.testing.assert_array_equal(got, qm.simulate(x, TARGET).numpy())
    if scale < 100:  # at 100 the input grid, chosen for the sigmoid that reads it, saturates: both rules agree
        assert not np.array_equal(got, qm.simulate(x, TARGET, rounding="tflite").numpy())  # 1 to 5 LSB apart


class Shuffle(nn.Module):
    """A ShuffleNet channel shuffle (5-D reshape, transpose, reshape back) and a 4-D transpose mid-network."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c(x))
        y = y.reshape(len(y), 2, 4, 8, 8).transpose(1, 2).reshape(len(y), 8, 8, 8)
        return self.d(y.transpose(2, 3))


def test_transposes_run_on_tflm_as_simulated(tmp_path: Path) -> None:
    qm = eptq_deploy.quantize(Shuffle().eval(), X[:64], profile="int8-pot", targets=[TARGET], method="ptq",
                              progress=False)
    assert sum(n.op == "transpose" for n in qm.graph.nodes) == 2
    t = get_target(TARGET)
    t.emit(qm.graph, tmp_path)
    np.testing.assert_array_equal(t.load(tmp_path).run(X[64:].numpy()), qm.simulate(X[64:], TARGET).numpy())
