"""SiLU channel equalisation (equalize.py): exact in float, only where it can be made exact, and it
must buy accuracy on a model whose SiLU channels differ in range by orders of magnitude."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_tflite import _one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)
from torch import nn

import eptq_deploy
from eptq_deploy.equalize import equalize, factors, sites
from eptq_deploy.float_exec import run_float
from eptq_deploy.readers import read_source


class Uneven(nn.Module):
    """SiLU stem whose channels span 0.01x..30x (as a conv folded with its batch norm gives) read by a
    depthwise layer; its SiLU read by two pointwise convs (equalisable, balanced with their weights); a
    SiLU read by an add (not equalisable); a conv head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.pw2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            gain = torch.logspace(-2, 1.5, 8)
            self.stem.weight.mul_(gain[:, None, None, None])
            self.stem.bias.mul_(gain)
            self.dw.weight.div_(gain[:, None, None, None])  # the next layer undoes the spread, as trained nets do

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.silu(self.stem(x))
        b = F.silu(self.dw(a))
        c = F.silu(self.pw(b))
        return self.head(c + self.pw2(b))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("uneven") / "uneven.onnx"
    torch.onnx.export(Uneven().eval(), (torch.randn(1, 3, 12, 12),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    return path


def _data(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_rewrite_is_exact_in_float_and_only_where_it_can_be(model_file: Path) -> None:
    g = read_source(model_file, None).graph
    x = _data(16, 1)
    before = run_float(g, x)
    found = sites(g)
    assert len(found) == 2  # stem -> depthwise, depthwise -> two pointwise convs; not the SiLU read by the add
    done = equalize(g, [x[:8], x[8:]], 8)
    assert done == [s.conv.name for s in found]
    g.validate()
    assert [n.op for n in g.nodes].count("depthwise_conv2d") == 3  # the model's own plus two rescales
    after = run_float(g, x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    assert sites(g) == []  # a rewritten site no longer matches: a second pass changes nothing


def test_factors_stay_within_the_grids_resolution(model_file: Path) -> None:
    g = read_source(model_file, None).graph
    first, _ = sites(g)
    r = np.logspace(-6, 2, 8)
    c = factors(g, first.readers, r, 8)
    assert c.max() == pytest.approx(1.0) and c.min() == pytest.approx(2.0**-7)  # a dead channel is not blown up
    assert np.all(np.diff(c) >= 0)  # depthwise reader: the factor follows the channel's range
    assert np.allclose(factors(g, first.readers, np.zeros(8), 8), 1.0)


def test_equalisation_buys_accuracy_on_uneven_silu_channels(model_file: Path) -> None:
    calib, held = _data(64, 2), _data(32, 3)

    def sqnr(equalize: bool) -> float:
        qm = eptq_deploy.quantize(model_file, calib, profile="int8-pot", targets=["onnx-qdq"], method="ptq",
                                  progress=False, equalize=equalize, outputs=[])
        assert bool(qm.info["equalized_silu"]) == equalize
        f, q = qm.forward_float(held).double(), qm.simulate(held).double()
        return float(10 * torch.log10(f.pow(2).sum() / (f - q).pow(2).sum()))

    plain, equalized = sqnr(False), sqnr(True)
    assert equalized > plain + 3.0, (plain, equalized)
