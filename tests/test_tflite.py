"""tflite-int8: a flatbuffer written from the quantized graph, run on ai-edge-litert.

XNNPACK (the default kernels) must reproduce the simulation (rule ``xnnpack``) bit for bit,
and so must the reference kernels (BUILTIN_REF) the ``tflite`` rule; the two rules differ
by at most 1 LSB per op. The file must hold the
graph's integers and grids exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ai_edge_litert import schema_py_generated as S
from torch import nn

import eptq_deploy
from eptq_deploy.errors import TargetError, UnsupportedOpError
from eptq_deploy.graph import QuantGraph
from eptq_deploy.quantized import QuantizedModel
from eptq_deploy.targets import get_target, list_targets
from eptq_deploy.targets.tflite_int8 import (
    WEIGHT_LAYOUT,
    TfliteInt8Target,
    i8_grid,
    interpreter,
    quantize_multiplier,
    read_back_mismatches,
)
from eptq_deploy.zoo import CifarResNet

TARGET = "tflite-int8"
PROFILES = ("tflite-int8", "int8-pot")
T = TfliteInt8Target()
GEN = torch.Generator().manual_seed(0)
CALIB = 2 * torch.randn(16, 4, 8, 8, generator=GEN)
X = 2 * torch.randn(8, 4, 8, 8, generator=GEN)


class OneOp(nn.Module):
    """One canonical op on a (N, 4, 8, 8) input; two-operand ops take slices (code moves) of it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.conv_s2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return CASES[self.kind][0](self, x)


# kind -> (forward, TFLite ops the file must hold)
CASES: dict[str, tuple[Callable[[OneOp, torch.Tensor], torch.Tensor], set[str]]] = {
    "conv3x3": (lambda m, x: m.conv(x), {"CONV_2D"}),
    "conv3x3_stride2": (lambda m, x: m.conv_s2(x), {"CONV_2D", "PAD"}),  # SAME would pad bottom/right only
    "conv_relu6": (lambda m, x: F.relu6(m.conv(x)), {"CONV_2D"}),
    "depthwise": (lambda m, x: m.dw(x), {"DEPTHWISE_CONV_2D"}),
    "linear": (lambda m, x: m.fc(x.flatten(1)), {"TRANSPOSE", "RESHAPE", "FULLY_CONNECTED"}),
    "add": (lambda m, x: x[:, :2] + x[:, 2:], {"ADD"}),
    "add_relu": (lambda m, x: F.relu(x[:, :2] + x[:, 2:]), {"ADD"}),
    "mul": (lambda m, x: x[:, :2] * x[:, 2:], {"MUL"}),
    "concat": (lambda m, x: torch.cat([x[:, 2:], x[:, :2]], 1), {"CONCATENATION"}),
    "max_pool": (lambda m, x: F.max_pool2d(x, 3, 2, 1), {"PADV2", "MAX_POOL_2D"}),
    "avg_pool": (lambda m, x: F.avg_pool2d(x, 2), {"AVERAGE_POOL_2D"}),
    "avg_pool_padded": (lambda m, x: F.avg_pool2d(x, 3, 1, 1), {"PAD", "AVERAGE_POOL_2D"}),
    "avg_pool_same": (lambda m, x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), {"AVERAGE_POOL_2D"}),
    "mean": (lambda m, x: x.mean((2, 3)), {"MEAN"}),
    "reshape": (lambda m, x: x.reshape(len(x), 8, 4, 8), {"TRANSPOSE", "RESHAPE"}),
    "slice": (lambda m, x: x[:, 1:, ::2, 1::2], {"STRIDED_SLICE"}),
    "chunk": (lambda m, x: torch.cat(x.chunk(2, 1)[::-1], 1), {"STRIDED_SLICE", "CONCATENATION"}),
    "split": (lambda m, x: (lambda p: torch.cat([p[2], p[0]], 2))(torch.split(x, [3, 4, 1], 2)),  # p[1] unread
              {"STRIDED_SLICE", "CONCATENATION"}),
    "transpose": (lambda m, x: x[:, :, :, :6].transpose(2, 3), {"TRANSPOSE"}),
    "permute": (lambda m, x: x.permute(0, 2, 3, 1), {"TRANSPOSE"}),
    "channel_shuffle": (lambda m, x: x.reshape(len(x), 2, 2, 8, 8).transpose(1, 2).reshape(len(x), 4, 8, 8),
                        {"TRANSPOSE", "RESHAPE"}),
    "pad": (lambda m, x: F.pad(x, (1, 2, 0, 1, 2, 2)), {"PAD"}),
    "hardswish": (lambda m, x: F.hardswish(x), {"HARD_SWISH"}),
    "sigmoid": (lambda m, x: torch.sigmoid(x), {"LOGISTIC"}),
    "hardsigmoid": (lambda m, x: F.hardsigmoid(x), {"DEPTHWISE_CONV_2D"}),
    "relu": (lambda m, x: F.relu(x), {"RELU"}),
    "relu6": (lambda m, x: F.relu6(x), {"RELU6"}),
}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Small tensors: a second intra-op thread only spins against the other processes on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quantize(model: nn.Module, profile: str, calib: torch.Tensor, targets: list[str] | None = None) -> QuantizedModel:
    # outputs=[]: the last op stays in the integer model (a trailing sigmoid or concat is what these tests run)
    return eptq_deploy.quantize(model, calib, profile=profile, targets=targets or [TARGET], progress=False, outputs=[])


def _emit(qm: QuantizedModel, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    T.emit(qm.graph, folder)
    T.emit(qm.float_graph, folder, quantized=False)
    return folder


def _lsb_diff(got: np.ndarray, sim: np.ndarray, g: QuantGraph) -> np.ndarray:
    """|runtime - simulation| in whole steps of the output grid (both lie on it)."""
    lsb = float(g.tensors[g.outputs[0]].quant.scale[0])
    return np.rint(np.abs(got.astype(np.float64) - sim.astype(np.float64)) / lsb)


@pytest.fixture(scope="module")
def one_op(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], tuple[QuantizedModel, Path]]:
    root = tmp_path_factory.mktemp("one_op")
    cache: dict[tuple[str, str], tuple[QuantizedModel, Path]] = {}

    def get(kind: str, profile: str) -> tuple[QuantizedModel, Path]:
        if (kind, profile) not in cache:
            torch.manual_seed(1)
            qm = _quantize(OneOp(kind).eval(), profile, CALIB)
            cache[kind, profile] = qm, _emit(qm, root / f"{kind}-{profile}")
        return cache[kind, profile]

    return get


# ---------------------------------------------------------------- single ops


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("kind", list(CASES))
def test_single_op_matches_simulation(kind: str, profile: str, one_op) -> None:
    qm, folder = one_op(kind, profile)
    assert CASES[kind][1] <= set(T.inspect(folder)["runtime_ops"])
    sim = qm.simulate(X, target=TARGET).numpy()
    xnn = T.load(folder)
    assert (xnn.kernels, xnn.rounding) == ("auto", "xnnpack")
    np.testing.assert_array_equal(xnn.run(X.numpy()), sim)  # bit for bit, after the same dequantization
    sim_ref = qm.simulate(X, target=TARGET, rounding="tflite").numpy()
    ref = T.load(folder, kernels="reference").run(X.numpy())
    assert ref.shape == sim_ref.shape
    np.testing.assert_array_equal(ref, sim_ref)
    assert _lsb_diff(sim_ref, sim, qm.graph).max() <= 1  # the two rules: ties and float32 products only
    flt = T.load(folder, float_model=True).run(X.numpy())
    np.testing.assert_allclose(flt, qm.forward_float(X).numpy(), rtol=1e-5, atol=1e-5)


def test_fixed_output_grids(one_op) -> None:
    """LOGISTIC's int8 grid (1/256, -128): signed for tflite-int8, the same reals as uint8 zero point 0 for int8-pot."""
    for profile, signed, zp, exponent in (("tflite-int8", True, -128, None), ("int8-pot", False, 0, [-8])):
        qm, _ = one_op("sigmoid", profile)
        qp = qm.graph.tensors[qm.graph.outputs[0]].quant
        assert (qp.signed, int(qp.zero_point[0]), float(qp.scale[0])) == (signed, zp, 1 / 256)
        assert (None if qp.exponent is None else qp.exponent.tolist()) == exponent
        assert i8_grid(qp) == (1 / 256, -128)


def test_quantize_multiplier_edges() -> None:
    q, s = quantize_multiplier(np.array([0.0, 0.5, 1 - 2.0**-40, 2.0**-40, 0.75, 3.0]))
    assert q.tolist() == [0, 2**30, 2**30, 0, 3 * 2**29, 3 * 2**29]
    assert s.tolist() == [0, 0, 1, 0, 0, 2]


# ------------------------------------------------------------- small networks


class SeNet(nn.Module):
    """MobileNetV3-style: conv, depthwise + hardswish, squeeze-excite (hardsigmoid, broadcast mul), residual, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.stem(x)))
        z = F.hardswish(self.dw(y))
        s = F.hardsigmoid(self.se2(F.relu(self.se1(z.mean((2, 3), keepdim=True)))))
        z = self.pw(z * s) + y
        return self.fc(F.adaptive_avg_pool2d(torch.sigmoid(z), 1).flatten(1))


def _resnet8() -> nn.Module:
    """CIFAR ResNet-8: option-A shortcuts (strided slice + channel pad), stride-2 convs with explicit PAD."""
    torch.manual_seed(0)
    m = CifarResNet(1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
            c = bn.num_features
            bn.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            bn.weight.copy_(0.5 + torch.rand(c, generator=gen))
            bn.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return m.eval()


def _se_net() -> nn.Module:
    torch.manual_seed(0)
    return SeNet().eval()


NETS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet8": (_resnet8, (3, 8, 8)),
    "se_net": (_se_net, (4, 12, 12)),
}


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[QuantizedModel, Path, torch.Tensor]]:
    root = tmp_path_factory.mktemp("nets")
    out = {}
    for name, (factory, shape) in NETS.items():
        gen = torch.Generator().manual_seed(2)
        calib, x = torch.randn(4, *shape, generator=gen), torch.randn(16, *shape, generator=gen)  # few: fast grid search
        model = factory()
        for profile in PROFILES:
            qm = _quantize(model, profile, calib)
            out[name, profile] = qm, _emit(qm, root / f"{name}-{profile}"), x
    return out


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", list(NETS))
def test_network_matches_simulation(name: str, profile: str, nets) -> None:
    qm, folder, x = nets[name, profile]
    sim = qm.simulate(x, target=TARGET).numpy()
    np.testing.assert_array_equal(T.load(folder).run(x.numpy()), sim)  # XNNPACK
    sim_ref = qm.simulate(x, target=TARGET, rounding="tflite").numpy()
    np.testing.assert_array_equal(T.load(folder, kernels="reference").run(x.numpy()), sim_ref)
    np.testing.assert_array_equal(T.load(folder, kernels="builtin").run(x.numpy()).argmax(1), sim_ref.argmax(1))
    flt = T.load(folder, float_model=True).run(x.numpy())
    np.testing.assert_allclose(flt, qm.forward_float(x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", list(NETS))
def test_file_holds_the_graph_integers(name: str, profile: str, nets) -> None:
    """Read back through the interpreter: int8 weights, int32 biases and every grid, bit for bit."""
    qm, folder, _ = nets[name, profile]
    assert_tflite_holds_graph(folder / T.model_file, qm.graph)


def assert_tflite_holds_graph(path: Path, g: QuantGraph) -> None:
    """The flatbuffer holds the graph's integers and grids bit for bit (the target's read-back), and
    the interpreter reads the same weights back."""
    assert read_back_mismatches(S.ModelT.InitFromPackedBuf(path.read_bytes(), 0), g) == []
    it = interpreter(path, kernels="builtin")
    det = {d["name"]: d for d in it.get_tensor_details()}
    for n in g.weighted_nodes():
        layout, _ = WEIGHT_LAYOUT[n.op]
        wt = g.tensors[n.inputs[1]]
        np.testing.assert_array_equal(it.get_tensor(det[wt.name]["index"]),
                                      np.transpose(wt.data, layout) if layout else wt.data)


def test_bundle_on_ai_edge_litert(nets, tmp_path: Path) -> None:
    qm, _, x = nets["resnet8", "tflite-int8"]
    b = eptq_deploy.export(qm, target=TARGET, out=tmp_path / "b", data=x)
    entry = json.loads((b / "manifest.json").read_text())["targets"][TARGET]
    assert entry["runtime"] == "ai-edge-litert" and entry["rounding"] == "xnnpack"
    assert entry["runtime_versions"]["ai-edge-litert"]
    assert entry["checks"]["argmax_agreement_vs_simulation"] == 1.0
    assert entry["checks"]["max_abs_diff_lsb"] == 0  # XNNPACK, against its own rule
    ins = entry["inspect"]
    assert {"CONV_2D", "ADD", "PAD", "STRIDED_SLICE", "MEAN", "FULLY_CONNECTED"} <= set(ins["runtime_ops"])
    assert ins["op_versions"]["CONV_2D"] == 3 and ins["tensors"] > 0 and ins["xnnpack_partitions"] >= 1
    assert (b / TARGET / "model.tflite").is_file() and (b / TARGET / "model_float.tflite").is_file()
    ref = T.load(b / TARGET, kernels="reference").run(x.numpy())
    np.testing.assert_array_equal(ref, qm.simulate(x, target=TARGET, rounding="tflite").numpy())
    assert eptq_deploy.load(b).run(x[:3].numpy()).shape == (3, 10)


# --------------------------------------------------------------- registry, refusals


def test_registered() -> None:
    assert TARGET in dict(list_targets())
    t = get_target(TARGET)
    assert isinstance(t, TfliteInt8Target) and t.rules.rounding == "xnnpack"
    assert set(t.runtime_versions()) >= {"ai-edge-litert"}


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            self.b.weight.mul_(5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


def test_grids_from_other_rules_refused(tmp_path: Path) -> None:
    """A graph quantized without tflite-int8's rules has a concat over two grids: refused with the fix."""
    torch.manual_seed(0)
    qm = _quantize(TwoBranches().eval(), "tflite-int8", CALIB, targets=["onnx-qdq"])
    with pytest.raises(TargetError, match="targets including tflite-int8") as info:
        T.emit(qm.graph, tmp_path)
    assert "\n" not in str(info.value)


class StridedAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)


def test_unexpressible_average_pool_refused(tmp_path: Path) -> None:
    """count_include_pad=False where SAME would place the windows elsewhere: no TFLite equivalent,
    refused by quantize right after capture (``Target.validate``), before calibration."""
    with pytest.raises(UnsupportedOpError, match="count_include_pad"):
        _quantize(StridedAvgPool(), "tflite-int8", CALIB)
