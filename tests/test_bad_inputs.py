"""Hard inputs: every bad model, data, profile or destination gets one line, an exit code, no files.

One table row per situation (``ROWS``): the CLI is run on a tiny model written into a
temporary folder, and the row states the exit code (2 usage, 1 run time) and the
words the one-line error must hold: the field or file at fault and the fix. After
every failure the --out folder and any ``.bundle.tmp-*`` sibling must be absent. A
few rows run the installed command in a subprocess, where torch's own logging would
reach the real stderr, to prove nothing but the error line gets there.
Read-only and full disks are injected by monkeypatching (CI runs as root).
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_cli import FACTORY  # the CLI tests' model: conv + BN + linear, 3-channel input
from torch import nn
from typer.testing import CliRunner

import eptq_deploy
from eptq_deploy import bundle as bundle_mod
from eptq_deploy.cli import app
from eptq_deploy.data import load_data
from eptq_deploy.errors import DataError, EptqError, ModelError
from eptq_deploy.hw_profiles.registry import BUILTIN_DIR
from eptq_deploy.models import load_model

#: the same model with Python control flow on a tensor's value (torch.export refuses it)
DATA_DEPENDENT = FACTORY.replace("        return self.fc(", "        if x.sum() > 0:\n            x = -x\n        return self.fc(")


class Net(nn.Module):
    """FACTORY's architecture, importable here so a whole pickled module can be loaded back."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.c(x))).mean((2, 3)))


runner = CliRunner()


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "net.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", images=rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8))
    return tmp_path


def _quantize(workdir: Path, *extra: str, model: str | None = None, data: str | Path | None = None) -> Any:
    return runner.invoke(app, ["quantize", model or f"{workdir / 'net.py'}:make",
                               "--data", str(data or workdir / "data.npz"), "--preset", "cifar", "--crop", "16",
                               "--samples", "32", "--no-progress", "--threads", "1",
                               "--out", str(workdir / "bundle"), *extra])


def _error_line(res: Any) -> str:
    """The one ``error:`` line; nothing else of an error reaches the user."""
    assert "Traceback" not in res.output, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.output
    noise = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(("error:", "warning:", "note:"))]
    assert not noise, res.stderr
    return errors[0]


def _nothing_left(workdir: Path) -> None:
    assert not (workdir / "bundle").exists()
    assert not list(workdir.glob(".bundle.tmp-*")) and not list(workdir.glob(".bundle.old-*"))


# ------------------------------------------------------------------ fixtures for rows


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Net().state_dict()


def _weights(w: Path, name: str, make: Callable[[Path], None]) -> list[str]:
    make(w / name)
    return ["--weights", str(w / name)]


def _truncated(path: Path) -> None:
    torch.save(_state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _images(folder: Path, n: int, mode: str = "RGB", size: int = 20, prefix: str = "img") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(list(folder.iterdir())))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    for i in range(n):
        a = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        Image.fromarray(a[..., 0] if channels == 1 else a, mode).save(folder / f"{prefix}{i}_{mode}_{size}.png")


def _mixed_folder(w: Path) -> Path:
    folder = w / "mixed"
    _images(folder, 40)
    (folder / "notes.dat").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    (folder / "labels.csv").write_text("filename,class_index\n")  # labels and notes beside images are no images
    (folder / "README.txt").write_text("where these images come from")
    return folder


def _profile_yaml(w: Path, name: str, **changes: Any) -> str:
    """int8-pot with fields changed (a ``section.key`` name changes one nested field)."""
    doc = yaml.safe_load((BUILTIN_DIR / "int8-pot.yaml").read_text())
    doc["name"] = name
    for key, value in changes.items():
        if "__" in key:
            section, field = key.split("__")
            doc[section][field] = value
        else:
            doc[key] = value
    (w / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    return str(w / f"{name}.yaml")


def _npy(w: Path, name: str, arr: np.ndarray) -> Path:
    np.save(w / name, arr)
    return w / name


def _float_data(channels: int = 3, bad: float | None = None) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((40, channels, 16, 16)).astype(np.float32)
    if bad is not None:
        x[3, 0, 2, 2] = bad
    return x


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _npz(w: Path, name: str, images: np.ndarray) -> Path:
    np.savez(w / name, images=images)
    return w / name


def _existing_bundle(w: Path) -> None:
    (w / "bundle").mkdir()
    (w / "bundle" / "keep.txt").write_text("an earlier bundle")


# ------------------------------------------------------------------------ the table
# id -> (arguments for _quantize from the work folder, exit code, words the error line must hold)

Row = tuple[Callable[[Path], dict[str, Any]], int, list[str]]

ROWS: dict[str, Row] = {
    # ---- model
    "model-file-missing": (lambda w: {"model": f"{w / 'missing.py'}:make"}, 2,
                           ["missing.py", "not found", "check the path before ':'"]),
    "weights-file-missing": (lambda w: {"extra": ["--weights", str(w / "nope.pt")]}, 2,
                             ["nope.pt", "not found", "check the --weights path"]),
    "weights-truncated": (lambda w: {"extra": _weights(w, "half.pt", _truncated)}, 2,
                          ["half.pt", "truncated, corrupt or not a PyTorch file", "re-save or re-download it"]),
    "weights-random-bytes": (lambda w: {"extra": _weights(w, "noise.pt", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)))}, 2,
                             ["noise.pt", "corrupt or not a PyTorch file (neither a torch.save archive",
                              "re-save or re-download it"]),
    "weights-other-architecture": (
        lambda w: {"extra": _weights(w, "other.pt", lambda p: torch.save(
            {"c.weight": torch.zeros(8, 3, 3, 3), "head.weight": torch.zeros(2, 8), "head.bias": torch.zeros(2)}, p))},
        2, ["other.pt", "missing 6 key(s): bn.weight, bn.bias, bn.running_mean", "unexpected 2 key(s): head.weight",
            "pass weights saved from this same architecture"]),
    "weights-wrong-shape": (
        lambda w: {"extra": _weights(w, "shape.pt", lambda p: torch.save(
            {**_state_dict(), "c.weight": torch.zeros(8, 1, 3, 3)}, p))},
        2, ["shape.pt", "c.weight (8, 1, 3, 3) vs (8, 3, 3, 3)", "pass weights saved from this same architecture"]),
    "weights-pickled-module": (lambda w: {"extra": _weights(w, "full.pt", lambda p: torch.save(Net(), p))}, 2,
                               ["full.pt", "pickled Python object", "pass --allow-pickle", "runs code from the file"]),
    "factory-module-missing": (lambda w: {"model": "no_such_module_xyz:make"}, 2,
                               ["no_such_module_xyz", "install it, or give a path/to/file.py:factory"]),
    "factory-attribute-missing": (lambda w: {"model": f"{w / 'net.py'}:build"}, 2,
                                  ["net.py has no attribute 'build'", "name a function defined in it"]),
    "factory-syntax-error": (lambda w: {"model": _write(w / "syn.py", "def make(:\n    pass\n") + ":make"}, 2,
                             ["syn.py", "SyntaxError", "line 1", "fix the file or its imports"]),
    "model-data-dependent": (lambda w: {"model": _write(w / "dd.py", DATA_DEPENDENT) + ":make"}, 2,
                             ["torch.export could not capture the model", "branches on a tensor's value",
                              "dd.py:14", "if x.sum() > 0:", "torch.where", "torch.cond"]),
    # ---- data
    "data-path-missing": (lambda w: {"data": w / "nothere"}, 2, ["nothere", "give an image folder, .npz or .npy"]),
    "data-folder-empty": (lambda w: {"data": _mkdir(w / "empty")}, 2,
                          ["no readable images in", "point to a folder of JPEG/PNG files"]),
    "data-non-images-strict": (lambda w: {"data": _mixed_folder(w), "extra": ["--strict-data"]}, 2,
                               ["broken.jpg is not a readable image", "remove it, or skip unreadable files"]),
    "data-corrupt-npz": (lambda w: {"data": _write_bytes(w / "bad.npz", b"PK\x03\x04garbage")}, 2,
                         ["bad.npz", "BadZipFile", "re-save it"]),
    "data-wrong-rank": (lambda w: {"data": _npy(w, "rank3.npy", np.zeros((5, 16, 16), np.uint8))}, 2,
                        ["rank3.npy", "rank 4 (N, H, W, 3), got shape (5, 16, 16)", "add the batch axis or reshape"]),
    "data-wrong-dtype": (lambda w: {"data": _npy(w, "i64.npy", np.zeros((5, 16, 16, 3), np.int64))}, 2,
                         ["i64.npy", "unsupported dtype int64", "use uint8 NHWC images (0..255) or preprocessed float NCHW"]),
    "data-float-nhwc": (lambda w: {"data": _npy(w, "nhwc.npy", np.zeros((5, 16, 16, 3), np.float32))}, 2,
                        ["nhwc.npy", "looks NHWC", "transpose to NCHW"]),
    "data-nan": (lambda w: {"data": _npy(w, "nan.npy", _float_data(bad=np.nan))}, 2,
                 ["nan.npy contains 1 NaN/Inf value(s)", "clean or drop those samples"]),
    "data-inf": (lambda w: {"data": _npy(w, "inf.npy", _float_data(bad=np.inf))}, 2,
                 ["inf.npy contains 1 NaN/Inf value(s)", "clean or drop those samples"]),
    "data-too-few-samples": (lambda w: {"extra": ["--samples", "100"]}, 2,
                             ["--samples 100", "holds only 48 samples", "lower --samples or add data"]),
    "data-1-channel-for-3-channel-conv": (lambda w: {"data": _npy(w, "gray.npy", _float_data(channels=1))}, 2,
                                          ["shape (1, 16, 16)", "takes 3 channels, i.e. (3, H, W)",
                                           "give 3-channel data"]),
    "data-1-channel-uint8": (lambda w: {"data": _npz(w, "gray.npz", np.zeros((5, 16, 16, 1), np.uint8))}, 2,
                             ["gray.npz", "got shape (5, 16, 16, 1)", "convert grayscale/RGBA images to RGB"]),
    # ---- profiles
    "profile-unknown": (lambda w: {"extra": ["--profile", "int9-pot"]}, 2,
                        ["unknown profile 'int9-pot'", "did you mean 'int8-pot'?", "imx500, int8-pot, openvino-cpu"]),
    "profile-yaml-syntax": (lambda w: {"extra": ["--profile", _write(w / "syn.yaml", "name: syn\nweights: {bits: 8\nx: [\n")]},
                            2, ["syn.yaml", "YAML syntax error at line 3", "fix the YAML syntax there"]),
    "profile-unknown-field": (lambda w: {"extra": ["--profile", _profile_yaml(w, "colour", colour="blue")]}, 2,
                              ["colour.yaml", "unknown field 'colour'", "allowed: name, description"]),
    "profile-out-of-range": (lambda w: {"extra": ["--profile", _profile_yaml(w, "a33", activations__bits=33)]}, 2,
                             ["a33.yaml", "field 'activations.bits' is 33", "allowed: an integer from 4 to 16"]),
    "profile-weight-bits-not-allowed": (lambda w: {"extra": ["--profile", "imx500", "--weight-bits", "3"]}, 2,
                                        ["'imx500'", "3-bit weights", "allowed weight bits: 8, 4, 2"]),
    "profile-target-pair-impossible": (
        lambda w: {"extra": ["--profile", _profile_yaml(w, "a16", activations__bits=16), "--target", "onnx-qdq"]},
        1, ["profile a16 uses 16-bit activations", "target onnx-qdq runs 8-bit activations only",
            "pick another profile (eptq-deploy profiles) or another target"]),
    # ---- output
    "output-exists": (lambda w: {"pre": lambda: _existing_bundle(w)}, 2,
                      ["bundle already exists", "pass --force (force=True) to replace it or choose another --out"]),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_row(workdir: Path, row: str) -> None:
    setup, code, expected = ROWS[row]
    spec = setup(workdir)
    if "pre" in spec:
        spec.pop("pre")()
    res = _quantize(workdir, *spec.get("extra", []), model=spec.get("model"), data=spec.get("data"))
    line = _error_line(res)
    assert res.exit_code == code, res.output
    for words in expected:
        assert words in line, (words, line)
    if row == "output-exists":  # refused, and the earlier bundle is untouched
        assert (workdir / "bundle" / "keep.txt").read_text() == "an earlier bundle"
        assert not list(workdir.glob(".bundle.tmp-*"))
    else:
        _nothing_left(workdir)


# ------------------------------------------------------- rows that succeed with a warning


def test_non_image_files_are_skipped_with_one_counted_warning(workdir: Path) -> None:
    folder = _mixed_folder(workdir)
    res = _quantize(workdir, data=folder)
    assert res.exit_code == 0, res.output
    warns = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1, res.stderr
    assert "skipped 2 unreadable or non-image file(s)" in warns[0] and "--strict-data" in warns[0]
    assert "UserWarning" not in res.output and "load_data(" not in res.output  # no Python warning format
    assert (workdir / "bundle" / "manifest.json").is_file()


def test_odd_images_are_converted_with_one_counted_warning(workdir: Path) -> None:
    folder = workdir / "odd"
    _images(folder, 12, "L")
    _images(folder, 12, "RGBA")
    _images(folder, 10, "RGB", size=8, prefix="small")  # smaller than the 16x16 crop
    _images(folder, 10, "RGB")
    res = _quantize(workdir, data=folder)
    assert res.exit_code == 0, res.output
    warns = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1, res.stderr
    assert "converted 24 image(s) from grayscale/RGBA" in warns[0]
    assert "upscaled 10 image(s) smaller than the 16x16 crop" in warns[0]


def test_load_data_counts_small_images_in_the_same_warning(tmp_path: Path) -> None:
    _images(tmp_path, 2, "L", size=8)
    _images(tmp_path, 1, "RGB", size=40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = load_data(tmp_path, "cifar", crop=16)
    assert x.shape == (3, 3, 16, 16)
    assert [str(w.message).split(" in ")[0] for w in caught] == [
        "converted 2 image(s) from grayscale/RGBA/other modes to RGB and upscaled 2 image(s) smaller than the 16x16 crop"]


# --------------------------------------------------------------------- --allow-pickle


def test_allow_pickle_help_says_it_runs_code() -> None:
    res = runner.invoke(app, ["quantize", "--help"], terminal_width=200)
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.output).split())
    assert "--allow-pickle" in text and "RUNS CODE FROM THE FILE" in text and "only for files you trust" in text
    assert "--strict-data" in text


def test_allow_pickle_loads_a_pickled_module(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(FACTORY)
    torch.save(Net(), tmp_path / "full.pt")
    with pytest.raises(ModelError, match="--allow-pickle"):
        load_model(f"{tmp_path / 'net.py'}:make", weights=str(tmp_path / "full.pt"))
    model, _ = load_model(f"{tmp_path / 'net.py'}:make", weights=str(tmp_path / "full.pt"), allow_pickle=True)
    assert not model.training


# --------------------------------------------------------- read-only and full destinations


def _raise(code: int) -> Callable[..., Any]:
    def boom(*_: Any, **__: Any) -> Any:
        raise OSError(code, os.strerror(code))

    return boom


WRITE_FAULTS: dict[str, tuple[int, str, list[str]]] = {
    # id: (errno, where it is injected, words of the error line)
    "read-only-at-mkdtemp": (errno.EROFS, "mkdtemp", ["read-only file system", "choose a writable --out"]),
    "full-at-mkdtemp": (errno.ENOSPC, "mkdtemp", ["no space left on device", "free some space there or choose another --out"]),
    "read-only-at-manifest": (errno.EROFS, "write_text", ["read-only file system", "choose a writable --out"]),
    "full-at-manifest": (errno.ENOSPC, "write_text", ["no space left on device", "free some space"]),
    "full-at-rename": (errno.ENOSPC, "replace", ["no space left on device", "free some space"]),
    "read-only-at-rename": (errno.EROFS, "replace", ["read-only file system", "choose a writable --out"]),
}


def _inject(monkeypatch: pytest.MonkeyPatch, code: int, where: str) -> None:
    """Make one step of writing the bundle fail with ``code``, leaving every other write alone."""
    if where == "mkdtemp":  # the bundle's own temporary folder (beside --out), not a target's scratch folder
        real_mkdtemp, boom = bundle_mod.tempfile.mkdtemp, _raise(code)

        def mkdtemp(*args: Any, **kwargs: Any) -> str:
            return boom() if kwargs.get("dir") is not None else real_mkdtemp(*args, **kwargs)

        monkeypatch.setattr(bundle_mod.tempfile, "mkdtemp", mkdtemp)
    elif where == "write_text":
        real = Path.write_text

        def write_text(self: Path, *args: Any, **kwargs: Any) -> int:
            if self.name == "manifest.json":
                _raise(code)()
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    else:
        real_replace = os.replace

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if Path(src).name.startswith(".bundle.tmp-"):
                _raise(code)()
            real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(bundle_mod.os, "replace", replace)


@pytest.mark.parametrize("fault", list(WRITE_FAULTS))
def test_unwritable_destination(workdir: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    code, where, expected = WRITE_FAULTS[fault]
    _inject(monkeypatch, code, where)
    res = _quantize(workdir)
    line = _error_line(res)
    assert res.exit_code == 1, res.output
    for words in expected:
        assert words in line.lower(), (words, line)
    assert "nothing was written" in line
    _nothing_left(workdir)


def test_failed_force_replacement_keeps_the_old_bundle(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--force over an existing bundle, disk full at the final move: the old bundle comes back."""
    _existing_bundle(workdir)
    _inject(monkeypatch, errno.ENOSPC, "replace")
    res = _quantize(workdir, "--force")
    assert res.exit_code == 1 and "no space left" in _error_line(res).lower()
    assert (workdir / "bundle" / "keep.txt").read_text() == "an earlier bundle"
    assert not list(workdir.glob(".bundle.tmp-*")) and not list(workdir.glob(".bundle.old-*"))


# ------------------------------------------------------------------------- the API

API_ROWS: dict[str, tuple[Callable[[], Any], type[EptqError], list[str]]] = {
    "nan": (lambda: _float_data(bad=np.nan), DataError, ["1 NaN/Inf value(s)", "clean or drop those samples"]),
    "1-channel": (lambda: _float_data(channels=1), DataError, ["shape (1, 16, 16)", "takes 3 channels"]),
    "too-few": (lambda: (_float_data()[:4], {"samples": 10}), DataError,
                ["asked for 10 samples but found only 4", "add data"]),
    "empty": (lambda: np.zeros((0, 3, 16, 16), np.float32), DataError, ["holds no samples", "at least one sample"]),
    "strings": (lambda: np.full((4, 3, 16, 16), "x"), DataError, ["dtype <U1", "pass numbers"]),
    "wrong-rank": (lambda: np.zeros((4, 10), np.float32), DataError, ["shape (4, 10)", "(N, C, H, W)"]),
    "wrong-size": (lambda: np.zeros((4, 3, 16, 16), np.float32), DataError,
                   ["cannot run on data samples of shape (3, 16, 16)", "mat1 and mat2", "--crop"]),
}


@pytest.mark.parametrize("row", list(API_ROWS))
def test_api_bad_data(row: str) -> None:
    make, kind, expected = API_ROWS[row]
    data, kwargs = make(), {}
    if isinstance(data, tuple):
        data, kwargs = data
    torch.manual_seed(0)
    model: nn.Module = Net().eval()
    if row == "wrong-size":  # a head sized for 8x8 inputs
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(kind) as info:
        eptq_deploy.quantize(model, data, targets="onnx-qdq", progress=False, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    for words in expected:
        assert words in msg, (words, msg)


def test_api_exported_program_refuses_other_input_shapes() -> None:
    program = torch.export.export(Net().eval(), (torch.randn(1, 3, 16, 16),))
    with pytest.raises(DataError, match=re.escape("shape (3, 8, 8) but the exported program takes (3, 16, 16)")):
        eptq_deploy.quantize(program, np.zeros((4, 3, 8, 8), np.float32), targets="onnx-qdq", progress=False)


def test_api_broken_forward_is_a_model_error() -> None:
    """A forward() that fails for its own reasons is not blamed on the data."""

    class Broken(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.missing_layer(x)

    with pytest.raises(ModelError, match="forward\\(\\) fails on data samples of shape \\(3, 16, 16\\)"):
        eptq_deploy.quantize(Broken().eval(), _float_data(), targets="onnx-qdq", progress=False)


def test_api_export_to_a_full_disk_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qm = eptq_deploy.quantize(Net().eval(), _float_data(), targets="onnx-qdq", progress=False)
    _inject(monkeypatch, errno.ENOSPC, "write_text")
    with pytest.raises(EptqError, match="No space left on device; free some space") as info:
        eptq_deploy.export(qm, out=tmp_path / "bundle")
    assert info.value.exit_code == 1
    _nothing_left(tmp_path)


# ------------------------------------------------ the installed command: stderr is one line


@pytest.mark.parametrize("case", ["data-dependent", "wrong-input-size"])
def test_console_error_is_the_only_stderr_line(tmp_path: Path, case: str) -> None:
    """torch logs tracebacks and partial graphs when tracing fails; none of it reaches stderr."""
    rng = np.random.default_rng(0)
    if case == "data-dependent":
        (tmp_path / "m.py").write_text(DATA_DEPENDENT)
        data, expected = ["--data", str(tmp_path / "d.npz"), "--preset", "cifar", "--crop", "16"], "torch.cond"
        np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    else:  # a linear head sized for 8x8 inputs, fed 16x16: torch's fake-tensor logger prints a traceback
        (tmp_path / "m.py").write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), "
                                       "nn.Flatten(), nn.Linear(4 * 6 * 6, 2))\n")
        np.save(tmp_path / "d.npy", rng.standard_normal((40, 3, 16, 16)).astype(np.float32))
        data, expected = ["--data", str(tmp_path / "d.npy")], "cannot run on data samples of shape (3, 16, 16)"
    proc = subprocess.run([sys.executable, "-m", "eptq_deploy.cli", "quantize", f"{tmp_path / 'm.py'}:make", *data,
                           "--samples", "32", "--no-progress", "--threads", "1", "--out", str(tmp_path / "bundle")],
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    _nothing_left(tmp_path)
