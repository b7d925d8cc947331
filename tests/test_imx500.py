"""Target imx500: the mct_quantizers ONNX file of small models built here, compiled by Sony's IMX500
converter and run on onnxruntime with mct-quantizers' ops (both in the imx500 toolchain).

Where the toolchain is not installed these tests skip, unless ``EPTQ_REQUIRE_TOOLCHAINS=1`` (set by
``.ci/run``) makes that a failure, so CI always runs the converter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_cli import _quantize, workdir  # noqa: F401  (fixture)
from test_ethos_u import need_toolchain
from test_tflite import _one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)
from torch import nn

import eptq_deploy
from eptq_deploy import api
from eptq_deploy.errors import TargetError, UsageError
from eptq_deploy.targets.imx500 import DOMAIN, MCTQ_VERSION
from eptq_deploy.toolchains import CACHE_ENV


@pytest.fixture
def converter() -> None:
    need_toolchain("imx500")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
                         nn.ReLU6(), nn.Conv2d(8, 16, 1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 4)).eval()


def _data(n: int = 48) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "collect_stats", lambda *a, **k: pytest.fail("calibration ran"))
    with pytest.raises(TargetError, match="power-of-two activation thresholds only|no zero points"):
        eptq_deploy.quantize(_model(), _data(), profile="tflite-int8", targets=["imx500"], method="ptq", progress=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(TargetError, match="eptq-deploy toolchain install imx500") as err:
        eptq_deploy.quantize(_model(), _data(), profile="imx500", targets=["imx500"], method="ptq", progress=False)
    assert "\n" not in str(err.value)


def test_w4_bundle_holds_the_converters_output_and_runs_as_simulated(converter: None, tmp_path: Path) -> None:
    x = _data()
    qm = eptq_deploy.quantize(_model(), x, profile="imx500", weight_bits=4, targets=["imx500"], method="ptq",
                              progress=False)
    bundle = eptq_deploy.export(qm, out=tmp_path / "b", data=x)
    folder = bundle / "imx500"
    assert {"model.onnx", "packerOut.zip", "memory_report.json", "converter.log"} <= {p.name for p in folder.iterdir()}
    entry = json.loads((bundle / "manifest.json").read_text())["targets"]["imx500"]
    chip = entry["inspect"]["imx500"]
    assert chip["fit"] is True and 0 < chip["memory_used_bytes"] < chip["memory_total_bytes"] == 8388480
    assert chip["converter_version"].startswith("3.19")
    memory = json.loads((bundle / "manifest.json").read_text())["memory"]  # the profile's figure is the converter's
    assert memory["chip_memory_bytes"] == chip["memory_total_bytes"] and 0 < memory["chip_margin_bytes"]
    # onnxruntime with mct-quantizers' ops against the simulation: this small model, exact
    assert entry["checks"]["max_abs_diff_lsb"] == 0
    runner = eptq_deploy.load(bundle, "imx500")
    np.testing.assert_array_equal(np.asarray(runner.run(x[:4].numpy())), np.asarray(qm.simulate(x[:4], "imx500")))

    m = onnx.load(str(folder / "model.onnx"))
    assert m.producer_name == "pytorch" and {p.key: p.value for p in m.metadata_props}["mctq_version"] == MCTQ_VERSION
    quantizers = [n for n in m.graph.node if n.domain == DOMAIN]
    acts = [n for n in quantizers if n.op_type == "ActivationPOTQuantizer"]
    weights = [n for n in quantizers if n.op_type == "WeightsSymmetricQuantizer"]
    assert len(weights) == len(qm.graph.weighted_nodes()) and acts
    for n in acts:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        assert a["num_bits"] == 8 and np.log2(a["threshold"]) == round(np.log2(a["threshold"]))  # power of two
    assert {onnx.helper.get_attribute_value(x) for n in weights for x in n.attribute if x.name == "num_bits"} == {4}
    assert "memory" in (bundle / "report.md").read_text()


def test_weights_over_the_sensors_memory_are_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "collect_stats", lambda *a, **k: pytest.fail("calibration ran"))
    big = nn.Sequential(nn.Conv2d(3, 2048, 1), nn.ReLU(), nn.Conv2d(2048, 4608, 1)).eval()
    # 3*2048 + 2048*4608 one-byte weights + (2048 + 4608) four-byte biases = 9,469,952 bytes
    with pytest.raises(UsageError, match=r"need 9,469,952 bytes at 8-bit.*8,388,480 bytes.*--weight-bits 4") as err:
        eptq_deploy.quantize(big, torch.randn(8, 3, 4, 4), profile="imx500", targets=["onnx-qdq"], method="ptq",
                             progress=False)
    assert "\n" not in str(err.value)


def test_a_model_over_the_sensors_memory_ends_with_the_verdict(converter: None, tmp_path: Path) -> None:
    torch.manual_seed(0)
    # 8.29 MB of 8-bit weights: under the sensor's 8.39 MB, so quantize goes on; with the
    # activations the converter counts 8.95 MB
    big = nn.Sequential(nn.Conv2d(3, 1792, 1), nn.ReLU(), nn.Conv2d(1792, 4608, 1)).eval()
    qm = eptq_deploy.quantize(big, torch.randn(4, 3, 8, 8), profile="imx500", method="ptq", progress=False)
    assert qm.targets == ["imx500"]  # the profile's native target
    with pytest.raises(TargetError, match="does not fit in the IMX500: it needs [0-9,]+ of 8,388,480 bytes") as err:
        eptq_deploy.export(qm, out=tmp_path / "b")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "b").exists()


def test_cli_quantize_with_the_imx500_profile_runs_the_converter(converter: None, workdir: Path) -> None:  # noqa: F811
    # no --target: the imx500 profile's native target is the converter's
    res = _quantize(workdir, "--profile", "imx500", "--weight-bits", "4", "--method", "ptq")
    assert res.exit_code == 0, res.output
    bundle = workdir / "bundle"
    assert (bundle / "imx500" / "packerOut.zip").is_file() and (bundle / "imx500" / "memory_report.json").is_file()
    manifest = json.loads((bundle / "manifest.json").read_text())
    chip = manifest["targets"]["imx500"]["inspect"]["imx500"]
    assert chip["fit"] is True and chip["memory_used_bytes"] > 0
    assert manifest["memory"]["chip_memory_bytes"] == chip["memory_total_bytes"]
