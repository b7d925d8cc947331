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
