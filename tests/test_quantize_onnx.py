"""quantize -> QuantGraph constraints per profile -> onnx-qdq bundle read back bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import eptq_deploy
import eptq_deploy.bundle
from eptq_deploy.errors import EptqError, ProfileError, UsageError
from eptq_deploy.graph import WEIGHTED_OPS, QParams, QuantGraph
from eptq_deploy.hw_profiles import list_profiles, load_profile
from eptq_deploy.ptq import BIAS_CORRECTION_BELOW, collect_stats, rounding_shift
from eptq_deploy.quantized import QuantizedModel
from eptq_deploy.targets import same_float32
from eptq_deploy.targets.onnx_qdq import OnnxQdqTarget, read_back_mismatches

PROFILES = [name for name, _ in list_profiles()]
TARGET = "onnx-qdq"


class TinyCNN(nn.Module):
    """conv-bn-relu, depthwise conv-bn-relu6, 1x1 conv, residual add+relu, max pool, mean, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        z = F.relu6(self.bn_dw(self.dw(y)))
        z = F.relu(self.pw(z) + y)
        z = self.pool(z)
        return self.fc(z.mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = TinyCNN()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (m.bn, m.bn_dw):
            bn.running_mean.copy_(0.1 * torch.randn(8, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(8, generator=gen))
            bn.weight.copy_(0.5 + torch.rand(8, generator=gen))
            bn.bias.copy_(0.2 * torch.randn(8, generator=gen))
    return m.eval()


MODEL = _model()
CALIB = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(3))
HELD = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(4))


def _quantize(profile: str, **kw) -> QuantizedModel:
    return eptq_deploy.quantize(MODEL, CALIB, profile=profile, targets=TARGET, progress=False, **kw)


@pytest.fixture(scope="module")
def quantized() -> dict[str, QuantizedModel]:
    return {p: _quantize(p) for p in PROFILES}


@pytest.fixture(scope="module")
def bundles(quantized: dict[str, QuantizedModel], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {p: eptq_deploy.export(qm, target=TARGET, out=root / p, data=HELD) for p, qm in quantized.items()}


def test_builtin_profiles_listed() -> None:
    assert set(PROFILES) >= {"tflite-int8", "int8-pot", "imx500", "openvino-cpu", "w4a8-pot"}


# ------------------------------------------------------------------ graph constraints


def _check_pow2(qp: QParams) -> None:
    e = np.log2(qp.scale.astype(np.float64))
    assert np.all(e == np.round(e)), qp.scale
    assert qp.exponent is not None
    np.testing.assert_array_equal(qp.exponent, e.astype(np.int64))


def _check_weight(qp: QParams, data: np.ndarray, bits: int, narrow: bool, pow2: bool) -> None:
    c = data.shape[0]
    assert qp.bits == bits and qp.signed and qp.narrow is narrow
    assert qp.axis == 0 and qp.scale.shape == (c,) and qp.zero_point.shape == (c,)
    assert np.all(qp.zero_point == 0)
    assert np.all(qp.scale > 0)
    top = 2 ** (bits - 1) - 1
    lo = -top if narrow else -top - 1
    assert (qp.qmin, qp.qmax) == (lo, top)
    assert data.dtype == np.int8
    assert data.min() >= lo and data.max() <= top
    if pow2:
        _check_pow2(qp)
    else:
        assert qp.exponent is None


def _check_graph(qm: QuantizedModel, w_bits: int | None = None) -> None:
    prof = qm.profile
    g, fg = qm.graph, qm.float_graph
    w, a = prof.weights, prof.activations
    producer = g.producer()
    for name in g.activation_names():
        qp = g.tensors[name].quant
        assert qp is not None, name
        assert qp.bits == a.bits and qp.axis is None
        assert qp.scale.shape == (1,) and qp.scale[0] > 0
        assert qp.qmin <= qp.zero_point[0] <= qp.qmax
        if a.symmetric:
            assert qp.zero_point[0] == 0, name
        if a.power_of_two:
            _check_pow2(qp)
        else:
            assert qp.exponent is None
        if a.signedness == "signed":
            assert qp.signed, name
        elif a.signedness == "unsigned":
            assert not qp.signed, name
        p = producer.get(name)
        if p is not None and p.attrs.get("activation", "none") != "none":
            if a.signedness == "auto":
                assert not qp.signed, f"{name} follows a fused {p.attrs['activation']} but is signed"
            else:  # a signed grid after a ReLU must start at real zero (asymmetric) or be symmetric
                assert not qp.signed or qp.zero_point[0] in (qp.qmin, 0), name
    stats = collect_stats(fg, [CALIB], progress=False)  # what PTQ calibrated on: its input means
    means = {t: st.channel_mean() for t, st in stats.items()}
    for n in g.nodes:
        if n.op not in WEIGHTED_OPS:
            continue
        wt, bt = g.tensors[n.inputs[1]], g.tensors[n.inputs[2]]
        _check_weight(wt.quant, wt.data, w_bits or w.bits, w.narrow_range, w.power_of_two)
        assert wt.data.shape == fg.tensors[n.inputs[1]].data.shape
        # int32 bias on the accumulator grid s_in * s_w
        s_in = np.float64(g.tensors[n.inputs[0]].quant.scale[0])
        acc = s_in * wt.quant.scale.astype(np.float64)
        assert bt.data.dtype == np.int32 and bt.data.shape == (wt.data.shape[0],)
        assert bt.quant.bits == prof.bias_bits and bt.quant.axis == 0
        np.testing.assert_allclose(bt.quant.scale, acc.astype(np.float32), rtol=1e-6)
        bias = fg.tensors[n.inputs[2]].data.astype(np.float64)
        if wt.quant.bits < BIAS_CORRECTION_BELOW:  # PTQ's bias absorbs the mean shift of the rounding
            s_w = wt.quant.scale.astype(np.float64).reshape((-1,) + (1,) * (wt.data.ndim - 1))
            bias = bias - rounding_shift(n, fg.tensors[n.inputs[1]].data, wt.data * s_w, means[n.inputs[0]])
        expect = np.round(bias / acc)
        assert np.all(np.abs(bt.data.astype(np.float64) - expect) <= 1), n.name
    # fused ReLU grids really exist in this model
    assert any(n.attrs.get("activation") == "relu" for n in g.nodes)
    assert any(n.op == "depthwise_conv2d" and n.attrs["activation"] == "relu6" for n in g.nodes)
    assert any(n.op == "add" and n.attrs["activation"] == "relu" for n in g.nodes)


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_constraints(profile: str, quantized: dict[str, QuantizedModel]) -> None:
    qm = quantized[profile]
    assert qm.targets == [TARGET] and qm.profile.name == profile
    assert qm.graph.meta["profile"] == profile
    _check_graph(qm)
    # the integer network still computes roughly the float one
    sim, flt = qm.simulate(HELD), qm.forward_float(HELD)
    err = float((sim - flt).abs().max())
    assert err < 0.25 * float(flt.abs().max()) + 8 * float(qm.graph.tensors[qm.graph.outputs[0]].quant.scale[0])


def test_imx500_four_bit_weights() -> None:
    qm = _quantize("imx500", weight_bits=4)
    assert qm.profile.weights.bits == 4
    _check_graph(qm, w_bits=4)
    for n in qm.graph.weighted_nodes():
        ints = qm.graph.tensors[n.inputs[1]].data
        assert ints.min() >= -8 and ints.max() <= 7
    # the full 4-bit range is used, -8 included
    assert min(int(qm.graph.tensors[n.inputs[1]].data.min()) for n in qm.graph.weighted_nodes()) == -8


def test_imx500_three_bit_weights_refused() -> None:
    with pytest.raises(UsageError) as info:
        _quantize("imx500", weight_bits=3)
    assert isinstance(info.value, ProfileError)
    msg = str(info.value)
    assert "3" in msg and "8, 4, 2" in msg and "\n" not in msg


def test_profile_weight_bits_refused_before_work() -> None:
    with pytest.raises(ProfileError, match="allowed weight bits: 8"):
        _quantize("int8-pot", weight_bits=4)


# -------------------------------------------------------------------- onnx read-back


def _inits(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}




@pytest.mark.parametrize("profile", PROFILES)
def test_onnx_initializers_bit_exact(profile: str, quantized: dict[str, QuantizedModel],
                                     bundles: dict[str, Path]) -> None:
    assert_onnx_holds_graph(bundles[profile] / TARGET / "model.onnx", quantized[profile].graph)


def assert_onnx_holds_graph(path: Path, g: QuantGraph) -> None:
    """The file's initializers hold the graph's integers and grids bit for bit (the target's read-back),
    and at least six activations carry a quantizer of their own."""
    assert read_back_mismatches(path, g) == []
    inits = _inits(path)
    assert sum(f"{name}.scale" in inits for name in g.activation_names()) >= 6


@pytest.mark.parametrize("profile", PROFILES)
def test_onnxruntime_matches_simulation(profile: str, quantized: dict[str, QuantizedModel],
                                        bundles: dict[str, Path]) -> None:
    qm, b = quantized[profile], bundles[profile]
    runner = eptq_deploy.load(b)
    got = runner.run(HELD.numpy())
    sim = qm.simulate(HELD).numpy()
    assert got.shape == sim.shape == (len(HELD), 5)
    assert qm.rounding[TARGET] == "onnxruntime"
    np.testing.assert_array_equal(got, sim)  # QLinearAdd and QLinearGlobalAveragePool ties included
    manifest = json.loads((b / "manifest.json").read_text())
    entry = manifest["targets"][TARGET]
    assert entry["checks"]["argmax_agreement_vs_simulation"] == 1.0
    assert entry["checks"]["samples"] == len(HELD)
    ops = entry["inspect"]["runtime_ops"]
    assert ops.get("QLinearConv", 0) >= 1
    assert "Conv" not in ops and "FusedConv" not in ops
    assert entry["inspect"]["float_conv_or_gemm_nodes"] == 0
    assert manifest["profile"]["name"] == profile
    assert entry["model_file"] == f"{TARGET}/model.onnx"
    assert (b / TARGET / "model_float.onnx").is_file() and (b / "report.md").is_file()


# ----------------------------------------------------------------- graph round trip


def _assert_graph_equal(a: QuantGraph, b: QuantGraph) -> None:
    assert a.inputs == b.inputs and a.outputs == b.outputs and a.meta == b.meta
    assert [(n.name, n.op, n.inputs, n.outputs, n.attrs, n.source) for n in a.nodes] == \
        [(n.name, n.op, n.inputs, n.outputs, n.attrs, n.source) for n in b.nodes]
    assert list(a.tensors) == list(b.tensors)
    for name, ta in a.tensors.items():
        tb = b.tensors[name]
        assert (ta.name, tuple(ta.shape), ta.kind) == (tb.name, tuple(tb.shape), tb.kind)
        assert (ta.data is None) == (tb.data is None), name
        if ta.data is not None:
            assert ta.data.dtype == tb.data.dtype
            np.testing.assert_array_equal(ta.data, tb.data)
        assert (ta.quant is None) == (tb.quant is None), name
        if ta.quant is not None:
            qa, qb = ta.quant, tb.quant
            assert (qa.bits, qa.signed, qa.axis, qa.narrow) == (qb.bits, qb.signed, qb.axis, qb.narrow)
            assert same_float32(qa.scale, qb.scale)
            np.testing.assert_array_equal(qa.zero_point, qb.zero_point)
            assert (qa.exponent is None) == (qb.exponent is None)
            if qa.exponent is not None:
                np.testing.assert_array_equal(qa.exponent, qb.exponent)


@pytest.mark.parametrize("profile", PROFILES)
def test_graph_json_round_trip(profile: str, quantized: dict[str, QuantizedModel],
                               bundles: dict[str, Path]) -> None:
    qm = quantized[profile]
    loaded = QuantGraph.load(bundles[profile])
    _assert_graph_equal(qm.graph, loaded)
    again = QuantizedModel(loaded, qm.float_graph, qm.profile, qm.targets, qm.rounding)
    np.testing.assert_array_equal(again.simulate(HELD).numpy(), qm.simulate(HELD).numpy())


# ------------------------------------------------------------ atomic bundle writes


def _leftovers(root: Path, name: str) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith(f".{name}."))


def test_failed_emit_leaves_nothing(quantized: dict[str, QuantizedModel], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self, graph, folder, *, quantized=True):
        (Path(folder) / "partial.onnx").write_bytes(b"half")
        raise RuntimeError("emit failed")

    monkeypatch.setattr(OnnxQdqTarget, "emit", boom)
    with pytest.raises(RuntimeError, match="emit failed"):
        eptq_deploy.export(quantized["int8-pot"], target=TARGET, out=tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert _leftovers(tmp_path, "b") == []
    assert list(tmp_path.iterdir()) == []


def test_failed_report_leaves_nothing(quantized: dict[str, QuantizedModel], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eptq_deploy.bundle, "write_report", boom)
    with pytest.raises(EptqError, match="No space left") as info:
        eptq_deploy.export(quantized["int8-pot"], target=TARGET, out=tmp_path / "b")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_needs_force(quantized: dict[str, QuantizedModel], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    qm = quantized["int8-pot"]
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.txt").write_text("keep me unless forced")
    with pytest.raises(UsageError, match="already exists") as info:
        eptq_deploy.export(qm, target=TARGET, out=out)
    assert "force" in str(info.value)
    assert (out / "old.txt").is_file()
    # a failing forced export keeps the old folder as it was
    def report_fails(*args, **kwargs):
        raise RuntimeError("report failed")

    monkeypatch.setattr(eptq_deploy.bundle, "write_report", report_fails)
    with pytest.raises(RuntimeError, match="report failed"):
        eptq_deploy.export(qm, target=TARGET, out=out, force=True)
    assert (out / "old.txt").is_file() and not (out / "manifest.json").exists()
    assert _leftovers(tmp_path, "b") == []
    monkeypatch.undo()
    got = eptq_deploy.export(qm, target=TARGET, out=out, force=True)
    assert got == out.resolve()
    assert not (out / "old.txt").exists()
    assert (out / "manifest.json").is_file() and (out / TARGET / "model.onnx").is_file()
    assert _leftovers(tmp_path, "b") == []
    assert json.loads((out / "manifest.json").read_text())["targets"][TARGET].get("checks") is None


# ----------------------------------------------------------------------- refusals


def test_export_to_other_target_refused(quantized: dict[str, QuantizedModel], tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        eptq_deploy.export(quantized["int8-pot"], target="tflite-int8", out=tmp_path / "b")
    assert "tflite-int8" in str(info.value) and "onnx-qdq" in str(info.value)
    assert not (tmp_path / "b").exists()
    with pytest.raises(UsageError):
        quantized["int8-pot"].simulate(HELD[:1], target="tflite-int8")


def test_unknown_target_refused() -> None:
    with pytest.raises(UsageError) as info:
        _quantize_target("nope")
    msg = str(info.value)
    assert "'nope'" in msg and "onnx-qdq" in msg and "\n" not in msg


def _quantize_target(targets: str) -> QuantizedModel:
    return eptq_deploy.quantize(MODEL, CALIB, profile="int8-pot", targets=targets, progress=False)


def test_unknown_method_and_option_refused() -> None:
    with pytest.raises(UsageError, match="unknown method 'eptq2'.*ptq"):
        eptq_deploy.quantize(MODEL, CALIB, profile="int8-pot", targets=TARGET, method="eptq2", progress=False)
    with pytest.raises(UsageError, match="unknown option"):
        eptq_deploy.quantize(MODEL, CALIB, profile="int8-pot", targets=TARGET, progress=False, rounding="up")


def test_unknown_profile_refused() -> None:
    with pytest.raises(ProfileError):
        eptq_deploy.quantize(MODEL, CALIB, profile="no-such-chip", targets=TARGET, progress=False)


def test_profile_object_accepted() -> None:
    prof = load_profile("int8-pot")
    qm = eptq_deploy.quantize(MODEL, CALIB, profile=prof, targets=[TARGET], progress=False)
    assert qm.profile == prof


# -------------------------------------------------------------------- determinism


def test_same_seed_same_graph() -> None:
    a = _quantize("imx500", seed=7)
    b = _quantize("imx500", seed=7)
    _assert_graph_equal(a.graph, b.graph)
    np.testing.assert_array_equal(a.simulate(HELD).numpy(), b.simulate(HELD).numpy())
    assert a.info["seed"] == 7 and a.info["samples"] == len(CALIB)


def test_executors_free_activations_after_their_last_reader(quantized: dict[str, QuantizedModel]) -> None:
    """Each activation is freed once, right after its last reader; graph outputs never; results unchanged."""
    g = quantized["int8-pot"].graph
    dead = g.dead_after()
    freed = [t for ts in dead for t in ts]
    assert sorted(freed) == sorted(t for t in g.activation_names() if t not in g.outputs)
    for i, ts in enumerate(dead):
        for t in ts:
            assert not any(t in n.inputs for n in g.nodes[i + 1:]), t
    residual = next(n for n in g.nodes if n.op == "add")  # the block input is read by the add, so lives until then
    assert residual.inputs[1] in dead[g.nodes.index(residual)] or residual.inputs[0] in dead[g.nodes.index(residual)]


def test_whole_network_batches_shrink_with_the_input(quantized: dict[str, QuantizedModel]) -> None:
    """The simulation batch keeps the largest activation near a fixed size: 224x224 inputs get small
    batches; the answer does not depend on the batch (simulation and per-layer SQNR)."""
    qm = quantized["int8-pot"]
    per = max(int(np.prod(qm.graph.tensors[t].shape[1:])) for t in qm.graph.activation_names())
    assert qm.graph.batch_size() == 256 and qm.graph.batch_size(elements=per * 3) == 3
    assert qm.graph.batch_size(elements=1) == 1
    np.testing.assert_array_equal(qm.simulate(HELD, batch_size=3).numpy(), qm.simulate(HELD).numpy())
    whole = qm.layer_errors(HELD)
    qm.graph.batch_size = lambda: 3  # type: ignore[method-assign]  # this object only
    try:
        split = qm.layer_errors(HELD)
    finally:
        del qm.graph.batch_size
    assert [r["layer"] for r in split] == [r["layer"] for r in whole]
    np.testing.assert_allclose([r["sqnr_db"] for r in split], [r["sqnr_db"] for r in whole], atol=0.011)
