"""The command line, end to end on a tiny model written into a temporary folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from eptq_deploy.cli import app

FACTORY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.c(x))).mean((2, 3)))

def make():
    return Net()
'''

runner = CliRunner()


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "net.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", images=images, labels=rng.integers(0, 4, 48))
    return tmp_path


def labelled_image_folder(root: Path, count: int, size: tuple[int, int], seed: int,
                          named: bool = False) -> tuple[Path, Path]:
    """``root/imgs`` of random PNG images and ``root/labels.csv`` (four classes; with a class_name
    column when ``named``)."""
    folder = root / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    rows = ["filename,class_index" + (",class_name" if named else "")]
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
        rows.append(f"im{i:02d}.png,{i % 4}" + (f",kind{i % 4}" if named else ""))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder, root / "labels.csv"


def _quantize(workdir: Path, *extra: str) -> object:
    return runner.invoke(app, ["quantize", f"{workdir / 'net.py'}:make", "--data", str(workdir / "data.npz"),
                               "--preset", "cifar", "--crop", "16", "--samples", "32", "--no-progress",
                               "--threads", "1", "--out", str(workdir / "bundle"), *extra])


def test_quantize_writes_a_checked_bundle(workdir: Path) -> None:
    res = _quantize(workdir, "--profile", "int8-pot", "--target", "onnx-qdq")
    assert res.exit_code == 0, res.output
    m = json.loads((workdir / "bundle" / "manifest.json").read_text())
    checks = m["targets"]["onnx-qdq"]["checks"]
    assert checks["samples"] == 16  # the 16 samples after the 32 used for calibration
    assert checks["argmax_agreement_vs_simulation"] == 1.0
    assert "top1" in checks  # labels came from the .npz
    assert m["profile"]["name"] == "int8-pot"
    assert m["input"]["preprocessing"]["crop"] == 16
    for rel, info in m["targets"]["onnx-qdq"]["files"].items():
        assert (workdir / "bundle" / rel).stat().st_size == info["bytes"]
    assert (workdir / "bundle" / "report.md").read_text().startswith("# eptq-deploy bundle")
    assert "agreement with simulation 100.00%" in res.output


def test_existing_bundle_is_refused_without_force(workdir: Path) -> None:
    (workdir / "bundle").mkdir()
    res = _quantize(workdir)
    assert res.exit_code == 2
    assert "already exists" in res.output and "--force" in res.output


def test_unknown_profile_and_bad_bits(workdir: Path) -> None:
    res = _quantize(workdir, "--profile", "int9-pot")
    assert res.exit_code == 2 and "int8-pot" in res.output  # lists the known ones
    res = _quantize(workdir, "--profile", "imx500", "--weight-bits", "5")
    assert res.exit_code == 2 and "8" in res.output and "4" in res.output
    assert not (workdir / "bundle").exists()


def test_hessian_attention_option(workdir: Path) -> None:
    res = _quantize(workdir, "--method", "eptq", "--iters", "2", "--hessian", "maybe")
    assert res.exit_code == 2 and "'eptq'" in res.output and "'none'" in res.output
    assert not (workdir / "bundle").exists()
    res = _quantize(workdir, "--method", "eptq", "--iters", "2", "--hessian", "eptq", "--target", "onnx-qdq")
    assert res.exit_code == 0, res.output


def test_too_few_samples(workdir: Path) -> None:
    res = _quantize(workdir, "--samples", "100")
    assert res.exit_code == 2 and "48" in res.output
    assert not (workdir / "bundle").exists()


def test_listing_commands() -> None:
    res = runner.invoke(app, ["profiles"])
    assert res.exit_code == 0
    for name in ("tflite-int8", "int8-pot", "imx500", "openvino-cpu", "w4a8-pot"):
        assert name in res.output
    res = runner.invoke(app, ["targets"])
    assert res.exit_code == 0 and "onnx-qdq" in res.output


def test_console_script_error_is_one_line(tmp_path: Path) -> None:
    """The installed command prints one line and exits 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "eptq_deploy.cli", "quantize", "torchvision:resnet18",
                           "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "missing" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
