"""Target ethos-u: Arm's Vela compiles the tflite-int8 file of a small model built here.

Vela runs from its own environment (``eptq-deploy toolchain install ethos-u``; ``.ci/run`` installs
it). Where it is not installed these tests skip, unless ``EPTQ_REQUIRE_TOOLCHAINS=1`` (set by
``.ci/run``) makes a missing toolchain a failure, so CI always runs the compiler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tflite import _one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)
from torch import nn
from typer.testing import CliRunner

import eptq_deploy
from eptq_deploy import api
from eptq_deploy.cli import app
from eptq_deploy.errors import TargetError, UsageError
from eptq_deploy.targets import get_target, list_targets
from eptq_deploy.toolchains import CACHE_ENV, installed

TARGET = get_target("ethos-u")


def need_toolchain(target: str) -> None:
    """Skip where ``target``'s toolchain is not installed; fail instead under EPTQ_REQUIRE_TOOLCHAINS=1 (CI)."""
    tc = get_target(target).toolchain
    if installed(tc) is None:
        why = f"the {tc.name} toolchain is not installed (eptq-deploy toolchain install {tc.name})"
        if os.environ.get("EPTQ_REQUIRE_TOOLCHAINS") == "1":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture
def vela() -> None:
    need_toolchain("ethos-u")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def _data(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_missing_toolchain_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty"))
    monkeypatch.setattr(api, "collect_stats", lambda *a, **k: pytest.fail("calibration ran"))
    with pytest.raises(TargetError, match="eptq-deploy toolchain install ethos-u") as err:
        eptq_deploy.quantize(_model(), _data(), profile="tflite-int8", targets=["ethos-u"], method="ptq", progress=False)
    assert "\n" not in str(err.value)
    assert "ethos-u" not in [t.name for t in api.resolve_targets("all", api.resolve_profile("tflite-int8", None))]


def test_options_are_checked_before_any_work(vela: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "collect_stats", lambda *a, **k: pytest.fail("calibration ran"))
    with pytest.raises(UsageError, match="unknown accelerator 'ethos-u99'"):
        eptq_deploy.quantize(_model(), _data(), profile="tflite-int8", targets=["ethos-u"], method="ptq",
                             progress=False, target_options={"ethos-u": {"accelerator": "ethos-u99"}})
    with pytest.raises(UsageError, match="takes no option clock"):
        eptq_deploy.quantize(_model(), _data(), profile="tflite-int8", targets=["ethos-u"], method="ptq",
                             progress=False, target_options={"ethos-u": {"clock": 1}})
    with pytest.raises(UsageError, match="not among the targets"):
        eptq_deploy.quantize(_model(), _data(), profile="tflite-int8", targets=["tflite-int8"], method="ptq",
                             progress=False, target_options={"ethos-u": {"accelerator": "ethos-u55-64"}})


@pytest.mark.parametrize("accelerator", ["ethos-u55-128", "ethos-u65-256"])
def test_bundle_holds_vela_files_and_its_numbers(vela: None, tmp_path: Path, accelerator: str) -> None:
    x = _data()
    qm = eptq_deploy.quantize(_model(), x, profile="tflite-int8", targets=["ethos-u"], method="ptq", progress=False,
                              target_options={"ethos-u": {"accelerator": accelerator}})
    bundle = eptq_deploy.export(qm, out=tmp_path / "b", data=x)
    folder = bundle / "ethos-u"
    assert {"model.tflite", "model_vela.tflite", "vela_summary.csv"} <= {p.name for p in folder.iterdir()}
    entry = json.loads((bundle / "manifest.json").read_text())["targets"]["ethos-u"]
    chip = entry["inspect"]["vela"]
    family = accelerator.rsplit("-", 1)[0]
    assert chip["accelerator"].lower().replace("_", "-") == accelerator
    assert chip["system_config"].lower().startswith(family.replace("-", "_"))
    assert chip["sram_bytes"] > 0 and chip["npu_cycles"] > 0 and chip["inferences_per_second"] > 0
    assert chip["npu_ops"] >= 1 and chip["cpu_ops"] == []  # conv, mean, linear: every op on the NPU
    assert entry["checks"]["max_abs_diff_lsb"] == 0  # the int8 file itself, on LiteRT, as tflite-int8
    assert "compiled for" in (bundle / "report.md").read_text()
    runner = eptq_deploy.load(bundle, "ethos-u")
    np.testing.assert_array_equal(np.asarray(runner.run(x[:4].numpy())), np.asarray(qm.simulate(x[:4], "ethos-u")))


def test_vela_refusal_is_one_line_and_leaves_no_bundle(vela: None, tmp_path: Path) -> None:
    qm = eptq_deploy.quantize(_model(), _data(), profile="tflite-int8", targets=["ethos-u"], method="ptq",
                              progress=False, target_options={"ethos-u": {"system_config": "No_Such_System"}})
    with pytest.raises(TargetError, match="Vela refused") as err:
        eptq_deploy.export(qm, out=tmp_path / "b")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "b").exists()


def test_cli_lists_and_refuses_toolchains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    r = CliRunner().invoke(app, ["toolchain", "list"])
    assert r.exit_code == 0 and "ethos-u" in r.output and "not installed" in r.output
    r = CliRunner().invoke(app, ["toolchain", "install", "nope"])
    assert r.exit_code != 0 and "unknown toolchain 'nope'" in r.output
    assert "ethos-u" in dict(list_targets()) and "ethos-u" not in dict(list_targets(compilers=False))


def test_cli_quantize_for_ethos_u_writes_the_vela_files(vela: None, tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "net.onnx"
    torch.onnx.export(_model(), (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(24):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{k:03d}.png")
    out = tmp_path / "bundle"
    res = CliRunner().invoke(app, ["quantize", str(path), "--data", str(images), "--profile", "tflite-int8",
                                   "--target", "ethos-u", "--accelerator", "ethos-u55-64", "--method", "ptq",
                                   "--samples", "16", "--no-progress", "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "ethos-u" / "model_vela.tflite").is_file()
    chip = json.loads((out / "manifest.json").read_text())["targets"]["ethos-u"]["inspect"]["vela"]
    assert chip["accelerator"] == "Ethos_U55_64" and chip["npu_cycles"] > 0
    res = CliRunner().invoke(app, ["quantize", str(path), "--data", str(images), "--profile", "tflite-int8",
                                   "--target", "ethos-u", "--accelerator", "ethos-u99", "--method", "ptq",
                                   "--out", str(tmp_path / "no")])
    assert res.exit_code != 0 and "unknown accelerator 'ethos-u99'" in res.output and not (tmp_path / "no").exists()
