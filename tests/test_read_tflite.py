"""The TFLite reader: float files written by the project's own writer, read back into the canonical
graph and checked against the TFLite interpreter; bad files refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import eptq_deploy
from eptq_deploy.errors import EptqError, ModelError
from eptq_deploy.float_exec import run_float
from eptq_deploy.read_tflite import read
from eptq_deploy.readers import check_against_source
from eptq_deploy.targets import get_target


class Net(nn.Module):
    """NHWC traps: a depthwise conv, a channel concat, a channel pad (option-A shortcut), a
    squeeze-excitation multiply, and a fully connected layer on a flattened 2 x 2 map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.se = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self.a(x))
        y = nn.functional.hardswish(self.b(y))
        y = y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))
        short = nn.functional.pad(y[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        z = torch.relu(self.c(y) + short)
        p = torch.cat([nn.functional.max_pool2d(z, 2), nn.functional.avg_pool2d(z, 2)], 1)
        return self.fc(torch.flatten(nn.functional.avg_pool2d(p, 2), 1))


X = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def float_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    qm = eptq_deploy.quantize(Net().eval(), X, targets=["tflite-int8"], method="ptq", progress=False)
    folder = tmp_path_factory.mktemp("tfl")
    t = get_target("tflite-int8")
    t.emit(qm.float_graph, folder, quantized=False)
    return folder / t.float_model_file


def test_read_graph_computes_the_file_and_the_model(float_file: Path) -> None:
    src = read(float_file)
    check_against_source(src, X[:4])  # against the TFLite interpreter, tensor by tensor where it differs
    with torch.no_grad():
        np.testing.assert_allclose(run_float(src.graph, X).numpy(), Net().eval()(X).numpy(), rtol=1e-4, atol=1e-5)


def test_quantize_from_the_file_equals_quantize_from_the_module(float_file: Path) -> None:
    kw = {"profile": "tflite-int8", "targets": ["tflite-int8"], "method": "ptq", "progress": False}
    nhwc = X.permute(0, 2, 3, 1)  # a TFLite file takes its data as its users feed it: NHWC
    a, b = eptq_deploy.quantize(Net().eval(), X, **kw), eptq_deploy.quantize(float_file, nhwc, **kw)
    torch.testing.assert_close(a.simulate(X), b.simulate(nhwc), rtol=0, atol=0)


def test_bad_files_are_refused_in_one_line(float_file: Path, tmp_path: Path) -> None:
    raw = float_file.read_bytes()
    qm = eptq_deploy.quantize(Net().eval(), X, targets=["tflite-int8"], method="ptq", progress=False)
    get_target("tflite-int8").emit(qm.graph, tmp_path)  # the int8 file
    cases = {"truncated.tflite": (raw[: len(raw) // 3], "truncated or malformed|malformed"),
             "text.tflite": (b"hello, not a model\n", "not a TFLite flatbuffer"),
             "int8.tflite": ((tmp_path / "model.tflite").read_bytes(), "already quantized")}
    for name, (data, pattern) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(EptqError, match=pattern) as err:
            eptq_deploy.quantize(path, X.permute(0, 2, 3, 1), targets=["tflite-int8"], method="ptq", progress=False)
        assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="model file not found"):
        eptq_deploy.quantize(tmp_path / "missing.tflite", X, progress=False)
