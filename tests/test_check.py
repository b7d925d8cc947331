"""`eptq-deploy check` and `bench`: re-running a bundle, and refusing a tampered one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_cli import _quantize, labelled_image_folder, runner, workdir  # noqa: F401  (fixture)

from eptq_deploy import api
from eptq_deploy.cli import app
from eptq_deploy.errors import BundleError


@pytest.fixture()
def bundle(workdir: Path) -> Path:  # noqa: F811
    res = _quantize(workdir, "--profile", "int8-pot", "--target", "onnx-qdq")
    assert res.exit_code == 0, res.output
    return workdir / "bundle"


def _check(bundle: Path, *extra: str):
    return runner.invoke(app, ["check", str(bundle), "--data", str(bundle.parent / "data.npz"), "--threads", "1", *extra])


def test_check_reruns_the_bundle_and_agrees(bundle: Path) -> None:
    res = _check(bundle)
    assert res.exit_code == 0, res.output
    assert "onnx-qdq" in res.output and "agreement with simulation 100.00%" in res.output
    assert "top-1 float" in res.output  # the .npz's labels were used
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["check_command"].startswith(f"eptq-deploy check {bundle}")
    assert "avx2" in m["host"]["cpu_features"]


def test_check_api_matches_the_simulation(bundle: Path) -> None:
    x = np.random.default_rng(1).standard_normal((20, 3, 16, 16)).astype(np.float32)
    r = api.check(bundle, x)["onnx-qdq"]["checks"]
    assert r["samples"] == 20
    assert r["max_abs_diff_lsb"] == 0.0
    assert r["diff_lsb_distribution"]["0"] == 1.0


def test_check_fails_under_the_agreement_threshold(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from eptq_deploy.targets import onnx_qdq

    real = onnx_qdq.OnnxQdqTarget.load

    def shuffled(self, folder, *, float_model=False, threads=1):  # a runtime that disagrees with the simulation
        r = real(self, folder, float_model=float_model, threads=threads)
        if float_model:
            return r

        class Flip:
            def run(self, x):
                return -r.run(x)
        return Flip()

    monkeypatch.setattr(onnx_qdq.OnnxQdqTarget, "load", shuffled)
    res = _check(bundle, "--min-agreement", "0.999")
    assert res.exit_code == 1
    assert "below --min-agreement" in res.output


def test_check_fails_on_a_corrupted_scale(bundle: Path) -> None:
    """A file whose hashes are consistent but whose grids no longer match the graph (the classifier's
    per-channel weight scales distorted, the manifest re-hashed): the argmax moves, exit 1."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    path = bundle / "onnx-qdq" / "model.onnx"
    model = onnx.load(str(path))
    init = [t for t in model.graph.initializer if t.name.endswith(".scale") and "weight" in t.name][-1]
    scale = numpy_helper.to_array(init)
    distort = np.where(np.arange(scale.size) % 2 == 0, 8.0, 0.125).astype(np.float32).reshape(scale.shape)
    init.CopyFrom(numpy_helper.from_array(scale * distort, init.name))
    onnx.save(model, str(path))
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["targets"]["onnx-qdq"]["files"]["onnx-qdq/model.onnx"]
    entry.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), bytes=path.stat().st_size)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    res = _check(bundle, "--min-agreement", "0.99")
    assert res.exit_code == 1, res.output
    assert "below --min-agreement" in res.output


def test_check_refuses_a_changed_model_file(bundle: Path) -> None:
    model = bundle / "onnx-qdq" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    res = _check(bundle)
    assert res.exit_code == 1
    assert "onnx-qdq/model.onnx does not match its sha256" in res.output
    with pytest.raises(BundleError, match="sha256"):
        api.load(bundle)


def test_check_refuses_an_edited_manifest(bundle: Path) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    m["targets"]["onnx-qdq"]["model_file"] = "../../etc/passwd"
    (bundle / "manifest.json").write_text(json.dumps(m))
    res = _check(bundle)
    assert res.exit_code == 1
    assert "not among the hashed files" in res.output
    m["targets"]["onnx-qdq"]["files"]["../outside.onnx"] = {"sha256": "0" * 64}
    (bundle / "manifest.json").write_text(json.dumps(m))
    res = _check(bundle)
    assert res.exit_code == 1 and "points outside the bundle" in res.output


def test_check_refuses_a_changed_graph(bundle: Path) -> None:
    (bundle / "graph.json").write_text((bundle / "graph.json").read_text().replace('"bits": 8', '"bits": 7', 1))
    res = _check(bundle)
    assert res.exit_code == 1 and "graph.json does not match its sha256" in res.output


def test_check_rejects_data_of_the_wrong_shape(bundle: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "wrong.npy", np.zeros((4, 3, 8, 8), np.float32))
    res = runner.invoke(app, ["check", str(bundle), "--data", str(tmp_path / "wrong.npy")])
    assert res.exit_code == 2
    assert "sample shape (3, 8, 8)" in res.output and "takes (3, 16, 16)" in res.output


def test_check_reads_a_labels_csv_for_an_image_folder(bundle: Path, tmp_path: Path) -> None:
    folder, csv = labelled_image_folder(tmp_path, 6, (16, 16), seed=0)
    (folder / "notes.dat").write_text("not an image")  # skipped, so labels must follow the loaded files
    res = runner.invoke(app, ["check", str(bundle), "--data", str(folder), "--labels", str(csv)])
    assert res.exit_code == 0, res.output
    assert "top-1 float" in res.output


def test_bench_times_every_target(bundle: Path) -> None:
    res = runner.invoke(app, ["bench", str(bundle), "--repeats", "3"])
    assert res.exit_code == 0, res.output
    (line,) = [line for line in res.output.splitlines() if " onnx-qdq " in line]
    # the median, the float twin's and their ratio, as numbers (times rounded to the microsecond), at the
    # 2 threads quantize and check time with by default
    m = re.search(r"median latency ([\d.]+) ms \(float ([\d.]+) ms, float/int8 x([\d.]+), 2 threads\)", line)
    assert m, line
    q, f, ratio = map(float, m.groups())
    assert q > 0 and f > 0 and abs(ratio - f / q) <= 0.05 * ratio + 0.01


def test_check_on_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    res = runner.invoke(app, ["check", str(tmp_path), "--data", str(tmp_path)])
    assert res.exit_code == 2 and "not a bundle" in res.output
