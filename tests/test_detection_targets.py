"""Detectors and segmenters on every target: several outputs, upsampling, concatenation across
scales, sigmoid and SiLU heads, and the float tail the host runs after the integer model.

Small ONNX models built here (exported from torch) go through the whole pipeline: read, cut
(automatically, or where ``outputs`` says), quantized for each target under each profile it
accepts, written, read back, run on the target's runtime and compared with the simulation
output by output; ``.run(x)`` must return what the source model returns (its tail run on the
host), ``.run(x, raw=True)`` the file's own outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from test_tflite import _one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)
from torch import nn

import eptq_deploy
from eptq_deploy import model_io
from eptq_deploy.api import check_pair, resolve_profile
from eptq_deploy.errors import UsageError
from eptq_deploy.float_exec import unpack
from eptq_deploy.targets import get_target, list_targets

TARGETS = [name for name, _ in list_targets(compilers=False)]  # ethos-u: test_ethos_u.py
PROFILES = [("int8-pot", None), ("tflite-int8", None), ("imx500", 4)]


class Detector(nn.Module):
    """A two-scale anchor-free head: SiLU stem, a strided branch upsampled (nearest) and concatenated
    with the stem, box and class heads per scale, sigmoid scores, everything merged into [N, A, 4 + C]."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(16, 8, 1)
        self.box = nn.ModuleList([nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)])
        self.cls = nn.ModuleList([nn.Conv2d(8, classes, 1), nn.Conv2d(8, classes, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.silu(self.stem(x))
        b = F.silu(self.down(a))
        f = F.silu(self.fuse(torch.cat([a, F.interpolate(b, scale_factor=2.0, mode="nearest")], 1)))
        heads = []
        for k, y in enumerate((f, b)):
            h = torch.cat([self.box[k](y), torch.sigmoid(self.cls[k](y))], 1)
            heads.append(h.flatten(2))
        return torch.cat(heads, 2).transpose(1, 2)


class Segmenter(nn.Module):
    """Image pooling upsampled back (a 1x1 map resized bilinear), concatenated with the features, logits
    upsampled bilinear to the input: the float tail is that last resize."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x))
        p = F.relu(self.pool(y.mean((2, 3), keepdim=True)))
        p = F.interpolate(p, size=y.shape[2:], mode="bilinear", align_corners=True)
        logits = self.head(torch.cat([y, p], 1))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


class TwoHeads(nn.Module):
    """Two outputs, as a file holding regressors and class logits apart (BlazeFace's layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.reg, self.cls = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.relu(self.a(x))
        return self.reg(y).flatten(2).transpose(1, 2), self.cls(y).flatten(2).transpose(1, 2)


class DecodedYolo(nn.Module):
    """The common YOLO export: boxes decoded inside the graph, [N, A, 5 + C] as cx, cy, w, h in pixels (grid
    added, stride multiplied, widths through exp), objectness and class scores through a sigmoid."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 5 + classes, 1)
        gy, gx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
        self.register_buffer("grid", torch.stack([gx, gy], -1).reshape(1, 64, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(F.silu(self.stem(x))).flatten(2).transpose(1, 2)  # [N, 64, 5 + C]
        xy = (y[..., :2] + self.grid) * 2.0
        wh = torch.exp(y[..., 2:4]) * 2.0
        return torch.cat([xy, wh, torch.sigmoid(y[..., 4:])], -1)


MODELS = {"detector": Detector, "segmenter": Segmenter, "two_heads": TwoHeads, "decoded": DecodedYolo}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, cls in MODELS.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
        outputs = ["reg", "cls"] if name == "two_heads" else ["y"]
        torch.onnx.export(cls().eval(), (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=outputs)
        out[name] = path
    return out


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(48, 3, 16, 16, generator=gen), torch.randn(12, 3, 16, 16, generator=gen)


def _source(path: Path, x: torch.Tensor) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # exported at batch 1
    per = [sess.run(None, {"x": x[i:i + 1].numpy()}) for i in range(len(x))]
    return [np.concatenate(col) for col in zip(*per, strict=True)]


#: (target, model, profile) -> a deviation measured on this machine and not yet explained
KNOWN_DEVIATIONS = {
    ("openvino-ir", "segmenter", "imx500"): "OpenVINO's CPU plugin: 1 LSB on 1 of 3,072 head outputs under imx500 W4 "
    "(AMD EPYC without VNNI); the same graph under int8-pot and tflite-int8 is exact",
}


@pytest.mark.parametrize(("profile", "bits"), PROFILES)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("target", TARGETS)
def test_every_output_bit_exact_on_every_target(target: str, model: str, profile: str, bits: int | None,
                                                 files: dict[str, Path], tmp_path: Path,
                                                 request: pytest.FixtureRequest) -> None:
    reason = KNOWN_DEVIATIONS.get((target, model, profile))
    if reason:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=False))
    try:
        check_pair(resolve_profile(profile, bits), get_target(target))
    except UsageError as e:
        pytest.skip(f"{target} refuses {profile}: {e}")
    calib, x = _data()
    try:
        qm = eptq_deploy.quantize(files[model], calib, profile=profile, weight_bits=bits, targets=[target],
                                  method="ptq", progress=False)
    except eptq_deploy.errors.UnsupportedOpError as e:  # the target has no kernel for an op: refused by name, early
        assert target.startswith("tflite") and model == "segmenter" and "resize" in str(e), e
        return
    face = model_io.interface(qm.graph.meta)
    assert face["float_tail"] and face["cut_chosen_by"] == "auto"
    producer = qm.graph.producer()
    assert all(producer[o].op == "conv2d" for o in qm.graph.outputs)  # the heads: scores stay off one grid
    t = get_target(target)
    t.emit(qm.graph, tmp_path)
    assert not t.read_back_mismatches(tmp_path, qm.graph)
    runner = eptq_deploy.model_io.SourceRunner(t.load(tmp_path), qm.graph.meta)
    raw = unpack(runner.run(x.numpy(), raw=True))
    sim = unpack(qm.simulate(x, target, raw=True, rounding=getattr(runner, "rounding", None)))
    assert len(raw) == len(qm.graph.outputs) == len(sim)
    exact = t.exact_here(qm.graph)
    for r, s, o in zip(raw, sim, qm.graph.outputs, strict=True):
        diff = np.abs(r.astype(np.float64) - s.numpy()) / float(qm.graph.tensors[o].quant.scale[0])
        if exact:
            assert diff.max() == 0, f"{target} output {o}: {np.count_nonzero(diff)} values differ, up to {diff.max()} LSB"
        else:  # a CPU deviation the target states (OpenVINO without VNNI): the same function, within 20 dB
            err = float(((r.astype(np.float64) - s.numpy()) ** 2).sum())
            assert err == 0 or 10 * np.log10(float(((s.numpy() - s.numpy().mean()) ** 2).sum()) / err) >= 20
    # .run(x): the source model's outputs, in its order and shapes, the tail run on the host
    got, want = unpack(runner.run(x.numpy())), _source(files[model], x)
    assert [g.shape for g in got] == [w.shape for w in want]
    if exact:
        for g, s in zip(got, unpack(qm.simulate(x, target, rounding=getattr(runner, "rounding", None))), strict=True):
            np.testing.assert_allclose(g, s.numpy(), rtol=1e-6, atol=1e-6)


def test_outputs_names_the_cut_and_refuses_what_it_cannot(files: dict[str, Path]) -> None:
    """--outputs: the integer model ends at the named tensors; a weighted layer after the cut, an unknown
    name, or a tail that reads a tensor not named are refused in one line before any calibration."""
    calib, x = _data()
    auto = eptq_deploy.quantize(files["detector"], calib, method="ptq", progress=False)
    heads = list(auto.graph.outputs)
    qm = eptq_deploy.quantize(files["detector"], calib, method="ptq", progress=False, outputs=heads)
    assert list(qm.graph.outputs) == heads and model_io.interface(qm.graph.meta)["cut_chosen_by"] == "user"
    np.testing.assert_allclose(qm.forward_float(x).numpy(), _source(files["detector"], x)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(UsageError, match="not a tensor of the model") as err:
        eptq_deploy.quantize(files["detector"], calib, method="ptq", progress=False, outputs=["nope"])
    assert "\n" not in str(err.value)
    stem = auto.graph.weighted_nodes()[0].outputs[0]
    with pytest.raises(UsageError, match="would run in float on the host"):
        eptq_deploy.quantize(files["detector"], calib, method="ptq", progress=False, outputs=[stem])
    # a cut after the heads' sigmoids keeps them in the integer model (their outputs on the unit grid)
    read = eptq_deploy.readers.read_source(files["detector"], None).graph
    sig = [n.outputs[0] for n in read.nodes if n.op == "sigmoid" and n.inputs[0] in heads]
    boxes = [h for h in heads if not any(n.inputs[0] == h for n in read.nodes if n.op == "sigmoid")]
    assert len(sig) == 2 and len(boxes) == 2
    late = eptq_deploy.quantize(files["detector"], calib, method="ptq", progress=False, outputs=boxes + sig)
    assert list(late.graph.outputs) == boxes + sig
    assert [s["op"] for s in model_io.interface(late.graph.meta)["float_tail"]].count("sigmoid") == 0
    np.testing.assert_allclose(late.forward_float(x).numpy(), _source(files["detector"], x)[0], rtol=1e-4, atol=1e-4)


def test_bundle_states_the_cut_and_loads_as_the_source(files: dict[str, Path], tmp_path: Path) -> None:
    calib, x = _data()
    qm = eptq_deploy.quantize(files["two_heads"], calib, method="ptq", progress=False)
    bundle = eptq_deploy.export(qm, out=tmp_path / "b", data=x)
    manifest = eptq_deploy.bundle.read_manifest(bundle)
    assert manifest["model"]["cut"]["outputs"] == list(qm.graph.outputs)
    assert manifest["model"]["source_outputs"] and len(manifest["targets"]["onnx-qdq"]["io"]["outputs"]) == 2
    checks = manifest["targets"]["onnx-qdq"]["checks"]
    assert checks["max_abs_diff_lsb"] == 0 and len(checks["outputs"]) == 2
    runner = eptq_deploy.load(bundle)
    reg, cls = runner.run(x.numpy())
    want = _source(files["two_heads"], x)
    assert reg.shape == want[0].shape and cls.shape == want[1].shape
    results = eptq_deploy.check(bundle, x)
    assert results["onnx-qdq"]["checks"]["exact_output_fraction"] == 1.0


def test_cli_detector_bundle_states_postprocess_and_check_scores_map(files: dict[str, Path], tmp_path: Path) -> None:
    """quantize --postprocess ships the decode parameters; check --labels instances.json scores COCO mAP per target
    beside the float file's and the label-free mAP against the float file's own boxes."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from eptq_deploy.cli import app

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(40):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"{k:03d}.png")
    out = tmp_path / "bundle"
    res = CliRunner().invoke(app, ["quantize", str(files["detector"]), "--data", str(images), "--method", "ptq",
                                   "--postprocess", "decoded", "--target", "onnx-qdq", "--samples", "32",
                                   "--no-progress", "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "cut: " in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    spec = manifest["model"]["postprocess"]
    assert spec["family"] == "decoded" and spec["input_hw"] == [16, 16] and spec["iou_threshold"] == 0.65
    assert "map_vs_float" in manifest["targets"]["onnx-qdq"]["checks"]
    # annotations for the held-out images: one box each, class 0 (COCO category 1)
    held = sorted(p.name for p in images.iterdir())[32:]
    coco = {"images": [{"id": i + 1, "file_name": n, "width": 24, "height": 20} for i, n in enumerate(held)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 10, 8], "area": 80,
                             "iscrowd": 0} for i in range(len(held))],
            "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    res = CliRunner().invoke(app, ["check", str(out), "--data", str(images), "--labels", str(tmp_path / "instances.json"),
                                   "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "mAP " in res.output and "mAP vs float" in res.output  # n/a here: random weights find nothing at 0.3
    results = eptq_deploy.check(out, _held(images, held), labels=tmp_path / "instances.json", names=held,
                                sizes=[(24, 20)] * len(held))
    checks = results["onnx-qdq"]["checks"]
    assert {"map", "map50", "float_map", "map_vs_float"} <= set(checks) and 0 <= checks["map"] <= 100


def _held(images: Path, held: list[str]) -> torch.Tensor:
    from eptq_deploy.data import load_data

    names: list[str] = []
    x = load_data(images, "imagenet", crop=16, names=names)
    return x[[names.index(n) for n in held]]


def test_decode_inside_the_model_becomes_the_float_tail(files: dict[str, Path], tmp_path: Path) -> None:
    """A YOLO export that decodes its boxes (grid add, stride multiply, exp) is cut at its head: the decode,
    with its grid, runs on the host, and the loaded runner returns the file's [N, A, 5 + C] boxes."""
    calib, x = _data()
    qm = eptq_deploy.quantize(files["decoded"], calib, method="ptq", progress=False, postprocess="decoded")
    producer = qm.graph.producer()
    assert [producer[o].op for o in qm.graph.outputs] == ["conv2d"]
    tail = model_io.interface(qm.graph.meta)["float_tail"]
    assert {"exp", "add", "mul", "sigmoid", "concat"} <= {s["op"] for s in tail}
    assert any(s.get("constants") for s in tail)  # the grid travels with the tail
    bundle = eptq_deploy.export(qm, out=tmp_path / "b", data=x)
    y = eptq_deploy.load(bundle).run(x.numpy())
    want = _source(files["decoded"], x)[0]
    assert y.shape == want.shape == (12, 64, 8)
    np.testing.assert_allclose(qm.forward_float(x).numpy(), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, qm.simulate(x).numpy(), rtol=1e-6, atol=1e-6)
    boxes = eptq_deploy.tasks.detect(qm.graph.meta["postprocess"], y)
    assert len(boxes) == 12 and all(d.boxes.shape[1] == 4 for d in boxes)
    checks = eptq_deploy.bundle.read_manifest(bundle)["targets"]["onnx-qdq"]["checks"]
    assert checks["max_abs_diff_lsb"] == 0 and "map_vs_float" in checks


def test_a_pytorch_model_with_two_heads_goes_through(tmp_path: Path) -> None:
    """A PyTorch module returning a tuple (box and score heads) is captured with both outputs, quantized,
    exported and run; the loaded runner returns the tuple, the file's heads bit-exact with the simulation."""
    torch.manual_seed(0)
    model = TwoHeads().eval()
    calib, x = _data()
    qm = eptq_deploy.quantize(model, calib, method="ptq", progress=False)
    assert len(qm.graph.outputs) == 2  # the heads' transposes run on the host
    bundle = eptq_deploy.export(qm, out=tmp_path / "b", data=x)
    reg, cls = eptq_deploy.load(bundle).run(x.numpy())
    with torch.no_grad():
        want = model(x)
    assert reg.shape == tuple(want[0].shape) and cls.shape == tuple(want[1].shape)
    assert eptq_deploy.bundle.read_manifest(bundle)["targets"]["onnx-qdq"]["checks"]["max_abs_diff_lsb"] == 0


class TinyFaceDetector(nn.Module):
    """BlazeFace's layout at 128x128: 2 anchors per cell at 16x16 and 6 at 8x8 (896), box regressors
    [N, 896, 16] and class logits [N, 896, 1]; one 8x8 logit channel sits near -3000 and one box width
    near 10^4, as BlazeFace's do on images without faces."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 8, stride=8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.reg = nn.ModuleList([nn.Conv2d(8, 2 * 16, 1), nn.Conv2d(8, 6 * 16, 1)])
        self.cls = nn.ModuleList([nn.Conv2d(8, 2, 1), nn.Conv2d(8, 6, 1)])
        with torch.no_grad():
            self.cls[1].bias[0] = -3000.0
            self.reg[1].bias[2] = 1e4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.relu(self.stem(x))
        b = torch.relu(self.down(a))
        n = len(x)
        reg = torch.cat([h(f).permute(0, 2, 3, 1).reshape(n, -1, 16) for h, f in zip(self.reg, (a, b), strict=True)], 1)
        cls = torch.cat([h(f).permute(0, 2, 3, 1).reshape(n, -1, 1) for h, f in zip(self.cls, (a, b), strict=True)], 1)
        return reg, cls


def test_ssd_logits_are_calibrated_through_the_decode_sigmoid() -> None:
    """The decode reads SSD logits only through sigmoid(clip(z, +-100)): with ``postprocess="ssd"`` the
    logit heads get grids fine enough for the scores (values past +-16 clip for free); without it
    the -3000 channel sets a grid far coarser than any score. Box regressors likewise clip past +-2
    image sizes from their anchor."""
    x = torch.randn(24, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    scales = {}
    for post in ("ssd", None):
        qm = eptq_deploy.quantize(TinyFaceDetector().eval(), x, profile="int8-pot", targets=["onnx-qdq"],
                                  method="ptq", progress=False, postprocess=post)
        g = qm.graph
        feeds, shapes = model_io.tail_sources(g.meta, [g.tensors[o].shape for o in g.outputs])
        assert shapes == [(1, 896, 16), (1, 896, 1)]
        assert feeds == [{0}, {0}, {1}, {1}] or feeds == [{0}, {1}, {0}, {1}]
        logits = [o for o, f in zip(g.outputs, feeds, strict=True) if f == {1}]
        boxes = [o for o, f in zip(g.outputs, feeds, strict=True) if f == {0}]
        scales[post] = max(float(g.tensors[o].quant.scale[0]) for o in logits)
        scales[post, "boxes"] = max(float(g.tensors[o].quant.scale[0]) for o in boxes)
    assert scales["ssd"] <= 0.125 < 16 <= scales[None]
    # boxes: +-2 image sizes (256 at 128x128, anchors of size 1) is all the decode can tell apart
    assert scales["ssd", "boxes"] <= 4 < 64 <= scales[None, "boxes"]
