"""A new user's first hour and a firmware engineer's first read of the bundle.

The commands the tool prints run as printed; bundles get the umask's modes; random
weights follow --seed; check leaves the calibration samples out; the report's
"Feeding this model" numbers give the very input codes the runtimes compute.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from test_cli import _quantize, labelled_image_folder, runner, workdir  # noqa: F401  (fixture)
from torch import nn

from eptq_deploy import zoo
from eptq_deploy.cli import app
from eptq_deploy.data import load_data
from eptq_deploy.demo import DEMO_HOLDOUT, DEMO_HOLDOUT_SAMPLES, demo_photos


def _env() -> dict[str, str]:
    """The environment a user's shell has: this interpreter's scripts (eptq-deploy) on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _printed(output: str, prefix: str) -> str:
    (line,) = [ln for ln in output.splitlines() if ln.startswith(prefix)]
    return line.removeprefix(prefix).strip()


def _run_as_printed(command: str) -> subprocess.CompletedProcess:
    assert command.startswith("eptq-deploy "), command
    return subprocess.run(command, shell=True, env=_env(), capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- printed commands


def test_the_printed_recheck_command_runs_as_printed(workdir: Path) -> None:  # noqa: F811
    folder, csv = labelled_image_folder(workdir, 20, (20, 24), seed=3, named=True)
    res = runner.invoke(app, ["quantize", f"{workdir / 'net.py'}:make", "--data", str(folder), "--labels", str(csv),
                              "--preset", "cifar", "--crop", "16", "--samples", "12", "--no-progress", "--threads",
                              "1", "--out", str(workdir / "b"), "--target", "onnx-qdq"])
    assert res.exit_code == 0, res.output
    assert "(int8-pot, ptq, 12 samples)" in res.output  # onnx-qdq's general profile, not the first by name
    command = _printed(res.output, "re-check:")
    assert f"--labels {shlex.quote(str(csv))}" in command  # the labels it was given are kept
    done = _run_as_printed(command)
    assert done.returncode == 0, done.stderr
    assert "skipped 12 calibration sample(s)" in done.stdout and "(8 samples from" in done.stdout
    assert "top-1 float" in done.stdout
    m = json.loads((workdir / "b" / "manifest.json").read_text())
    assert m["check_command"] == command
    assert (workdir / "b" / "classes.txt").read_text().splitlines() == ["kind0", "kind1", "kind2", "kind3"]
    assert m["model"]["output"]["classes"] == 4


class _TinyImageNet(nn.Module):
    """A stand-in for EfficientNet-Lite0 in the demo: 224x224 in, 1,000 classes out, quick."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(3, 4, 3, stride=8, padding=1)
        self.fc = nn.Linear(4, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


def test_demo_prints_a_recheck_command_that_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo, "efficientnet_lite0", lambda pretrained=True: _TinyImageNet().eval())
    out = tmp_path / "demo"
    res = runner.invoke(app, ["quantize", "--out", str(out), "--no-progress", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "About these numbers" in res.output  # the demo explains its numbers
    command = _printed(res.output, "re-check:")
    assert command.endswith(f"--data {DEMO_HOLDOUT}")
    done = _run_as_printed(command)
    assert done.returncode == 0, done.stderr
    assert f"({DEMO_HOLDOUT_SAMPLES} samples from {DEMO_HOLDOUT}" in done.stdout
    report = (out / "report.md").read_text()
    assert "About these numbers" in report and f"`{command}`" in report
    assert "0 tench, 1 goldfish" in report  # ImageNet class names for the demo's classifier


def test_demo_holdout_spec_loads_the_held_out_photos() -> None:
    x = load_data(DEMO_HOLDOUT)
    assert x.shape == (DEMO_HOLDOUT_SAMPLES, 3, 224, 224)
    torch.testing.assert_close(x, demo_photos(0, DEMO_HOLDOUT_SAMPLES)[1])


# ----------------------------------------------------------------------------- modes


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_bundle_modes_follow_the_umask(workdir: Path, umask: int) -> None:  # noqa: F811
    old = os.umask(umask)
    try:
        res = _quantize(workdir, "--target", "onnx-qdq", "--profile", "int8-pot")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    bundle = workdir / "bundle"
    paths = [bundle, *bundle.rglob("*")]
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o777 if p.is_dir() else 0o666) & ~umask, (p, oct(mode))


# ----------------------------------------------------------------------------- seeding


def _random_mobilenet(tmp_path: Path, out: str, seed: int) -> Path:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "photos.npz", images=rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8))
    res = runner.invoke(app, ["quantize", "torchvision:mobilenet_v3_small", "--data", str(tmp_path / "photos.npz"),
                              "--crop", "16", "--method", "ptq", "--samples", "16", "--check-samples", "8",
                              "--target", "onnx-qdq", "--seed", str(seed), "--no-progress", "--threads", "1",
                              "--out", str(tmp_path / out)])
    assert res.exit_code == 0, res.output
    assert f"random weights (seed {seed})" in res.output  # the warning says so
    return tmp_path / out


def test_random_weights_follow_the_seed(tmp_path: Path) -> None:
    a, b, c = (_random_mobilenet(tmp_path, out, seed) for out, seed in (("a", 3), ("b", 3), ("c", 4)))
    for name in ("onnx-qdq/model.onnx", "onnx-qdq/model_float.onnx", "graph.json", "graph.npz"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "graph.npz").read_bytes() != (c / "graph.npz").read_bytes()
    m = json.loads((a / "manifest.json").read_text())
    assert m["model"]["weights"] == "random weights (seed 3)"
    assert "weights random weights (seed 3)" in (a / "report.md").read_text()
    assert m["targets"]["onnx-qdq"]["checks"]["max_abs_diff_lsb"] == 0  # bit-exact on onnxruntime


# ----------------------------------------------------------------------------- check's held-out split


def test_check_skips_the_calibration_samples_of_an_array(workdir: Path) -> None:  # noqa: F811
    res = _quantize(workdir, "--target", "onnx-qdq", "--profile", "int8-pot")
    assert res.exit_code == 0, res.output
    bundle = workdir / "bundle"
    record = json.loads((bundle / "calibration.json").read_text())
    assert record["kind"] == "array file" and record["indices"] == list(range(32))
    args = ["check", str(bundle), "--data", str(workdir / "data.npz"), "--threads", "1"]
    held = runner.invoke(app, args)
    assert held.exit_code == 0, held.output
    assert "(16 samples from" in held.output and "skipped 32 calibration sample(s)" in held.output
    every = runner.invoke(app, [*args, "--include-calibration"])
    assert every.exit_code == 0 and "(48 samples from" in every.output and "skipped" not in every.output
    # another array: nothing of it calibrated the bundle, so nothing is skipped
    np.savez(workdir / "other.npz", images=np.random.default_rng(9).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    other = runner.invoke(app, ["check", str(bundle), "--data", str(workdir / "other.npz"), "--threads", "1"])
    assert other.exit_code == 0 and "(5 samples from" in other.output and "none of them calibrated" in other.output


def test_check_refuses_data_that_only_holds_calibration_samples(workdir: Path) -> None:  # noqa: F811
    res = _quantize(workdir, "--target", "onnx-qdq", "--profile", "int8-pot", "--samples", "48")
    assert res.exit_code == 0, res.output
    done = runner.invoke(app, ["check", str(workdir / "bundle"), "--data", str(workdir / "data.npz")])
    assert done.exit_code == 2 and "all samples of" in done.output and "--include-calibration" in done.output


# ----------------------------------------------------------------------------- feeding the model


def _photo_folder(root: Path) -> Path:
    """Two real photographs at their own sizes (scikit-image's, not square)."""
    import skimage.data

    folder = root / "photos"
    folder.mkdir()
    for name in ("chelsea", "coffee"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
    return folder


def _follow_the_recipe(path: Path, steps: list[dict]) -> np.ndarray:
    """The manifest's input steps done by hand on one image: (H, W, C) codes or floats."""
    img = Image.open(path).convert("RGB")
    crop = next(s["size"] for s in steps if s["step"] == "centre_crop")
    for s in steps:
        if s["step"] == "resize":
            w, h = img.size
            r = s["shorter_side"]
            if min(w, h) != r:
                img = img.resize((max(crop, round(w * r / min(w, h))), max(crop, round(h * r / min(w, h)))),
                                 Image.BICUBIC)
        elif s["step"] == "centre_crop":
            c = s["size"]
            w, h = img.size
            left, top = round((w - c) / 2), round((h - c) / 2)
            img = img.crop((left, top, left + c, top + c))
    v = np.asarray(img, np.float32)
    for s in steps:
        if s["step"] == "normalise":
            v = (v * np.float32(s["scale"]) - np.float32(s["mean"])) / np.float32(s["std"])
        elif s["step"] == "quantize":
            t = v / np.float32(s["scale"])
            if s["rounding"] == "half away from zero":
                r = np.where(np.abs(t - np.trunc(t)) >= 0.5, np.trunc(t) + np.sign(t), np.trunc(t))
            else:
                assert s["rounding"] == "half to even"
                r = np.rint(t)
            v = np.clip(r + s["zero_point"], s["min"], s["max"])
    return v


def test_feeding_recipe_gives_the_runtimes_input_codes(workdir: Path) -> None:  # noqa: F811
    folder = _photo_folder(workdir)
    res = runner.invoke(app, ["quantize", f"{workdir / 'net.py'}:make", "--data", str(folder), "--preset", "imagenet",
                              "--resize", "19", "--crop", "16", "--samples", "1", "--method", "ptq", "--no-progress",
                              "--threads", "1", "--profile", "tflite-int8", "--target", "tflite-int8,onnx-qdq",
                              "--out", str(workdir / "b")])
    assert res.exit_code == 0, res.output
    bundle = workdir / "b"
    m = json.loads((bundle / "manifest.json").read_text())
    x = load_data(folder, None, resize=19, crop=16)  # what check and the runners are given

    tfl = m["targets"]["tflite-int8"]
    steps = tfl["feeding"]["input"]["steps"]
    assert [s["step"] for s in steps] == ["rgb", "resize", "centre_crop", "normalise", "quantize", "layout"]
    assert steps[-2]["done_by"] == "firmware" and steps[-2]["rounding"] == "half away from zero"
    from eptq_deploy.targets.tflite_int8 import TfliteInt8Target

    tr = TfliteInt8Target().load(bundle / "tflite-int8", threads=1)
    for i, name in enumerate(("chelsea.png", "coffee.png")):
        tr.run(x[i:i + 1].numpy())
        runtime_codes = tr.it.get_tensor(tr.inp["index"])[0]  # NHWC int8, as the interpreter holds them
        np.testing.assert_array_equal(_follow_the_recipe(folder / name, steps), runtime_codes)

    qdq = m["targets"]["onnx-qdq"]
    steps = qdq["feeding"]["input"]["steps"]
    assert steps[-2]["done_by"] == "model file" and steps[-2]["rounding"] == "half to even"
    model = onnx.load(str(bundle / qdq["model_file"]))
    q_node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    model.graph.output.append(onnx.helper.make_tensor_value_info(q_node.output[0], onnx.TensorProto.UINT8, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for i, name in enumerate(("chelsea.png", "coffee.png")):
        codes = sess.run([q_node.output[0]], {"input": x[i:i + 1].numpy()})[0][0]  # NCHW uint8
        np.testing.assert_array_equal(_follow_the_recipe(folder / name, steps), codes.transpose(1, 2, 0))

    report = (bundle / "report.md").read_text()
    assert "## Feeding this model" in report and "### tflite-int8: `tflite-int8/model.tflite`" in report
    assert "Resize so that the shorter side is 19 pixels, bicubic" in report
    assert "Crop the centre 16 x 16: left = round((W - 16) / 2), top = round((H - 16) / 2)" in report
    q = tfl["feeding"]["input"]["steps"][-2]
    assert f"q = clamp(round(x / {q['scale']:.9g}) + " in report
    assert "the predicted class is the index of the largest code" in report
    assert "model input: normalised float" not in report


def test_manifest_keeps_firmware_facts_small_and_arrays_aside(workdir: Path) -> None:  # noqa: F811
    res = _quantize(workdir, "--target", "tflite-int8,onnx-qdq", "--profile", "int8-pot")
    assert res.exit_code == 0, res.output
    bundle = workdir / "bundle"
    m = json.loads((bundle / "manifest.json").read_text())
    assert "tensors" not in m and "quantization" not in m["input"] and "quantization" not in m.get("output", {})
    assert list(m)[:7] == ["format", "version", "tool_version", "created", "model", "input", "targets"]
    side = json.loads((bundle / m["quantization_file"]).read_text())
    assert side and all("scale" in q for q in side.values())
    for name in ("quantization.json", "calibration.json", "graph.json", "graph.npz"):
        assert name in m["files"]
    (bundle / "quantization.json").write_text("{}")  # a side file is hashed like the model files
    res = runner.invoke(app, ["check", str(bundle), "--data", str(workdir / "data.npz")])
    assert res.exit_code == 1 and "quantization.json does not match its sha256" in res.output


# ----------------------------------------------------------------------------- small things


def test_unknown_target_suggests_the_closest() -> None:
    res = runner.invoke(app, ["quantize", "resnet20", "--data", ".", "--target", "onnx-qdd"])
    assert res.exit_code == 2 and "did you mean 'onnx-qdq'?" in res.output


def test_help_is_readable_in_a_narrow_terminal() -> None:
    done = subprocess.run("eptq-deploy quantize --help", shell=True, capture_output=True, text=True, timeout=60,
                          env={**_env(), "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout and max(len(line) for line in done.stdout.splitlines()) <= 80
    assert "--no-fold-preprocessing" in done.stdout and "filename,class_index" in done.stdout
    text = " ".join(done.stdout.split())
    assert "imagenet (shorter side 256, centre crop 224" in text and "lite (shorter side 256" in text
    assert "Default: the built-in model's own" in text
    listing = subprocess.run("eptq-deploy --help", shell=True, capture_output=True, text=True, timeout=60,
                             env={**_env(), "COLUMNS": "80"})
    commands = listing.stdout.split("Commands:")[1].splitlines()
    assert commands and not [line for line in commands if line.rstrip().endswith(("...", "…"))]


def test_api_records_which_samples_calibrated(tmp_path: Path) -> None:
    import eptq_deploy

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(20, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    qm = eptq_deploy.quantize(net, x, samples=10, method="ptq", targets=["onnx-qdq"], progress=False)
    picked = qm.info["calibration"]["indices"]
    assert len(picked) == 10 and picked == sorted(set(picked)) and max(picked) < 20
    bundle = eptq_deploy.export(qm, out=tmp_path / "b")
    assert json.loads((bundle / "calibration.json").read_text())["indices"] == picked
    report = (bundle / "report.md").read_text()  # no data path known: the command to complete, said so
    assert "--data IMAGES (a folder or .npz of your own" in report
