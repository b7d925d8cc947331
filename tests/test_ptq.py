"""PTQ's weight side: bias correction and the low-bit threshold search, on tiny layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eptq_deploy.api import resolve_profile
from eptq_deploy.calibrate import search_weight_grid
from eptq_deploy.capture import capture
from eptq_deploy.graph import Node
from eptq_deploy.ptq import collect_stats, ptq, rounding_shift
from eptq_deploy.simulate import get_rule, simulate
from eptq_deploy.targets import get_target


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_rounding_shift_is_the_output_change_on_a_constant_input(groups: int) -> None:
    """For an input constant per channel (no padding), the conv's output moves by exactly rounding_shift."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 6 // groups, 3, 3, generator=gen, dtype=torch.float64)
    wq = torch.round(w * 2) / 2
    mean = torch.randn(6, generator=gen, dtype=torch.float64)
    x = mean.view(1, 6, 1, 1).expand(1, 6, 5, 5)
    want = (F.conv2d(x, wq, groups=groups) - F.conv2d(x, w, groups=groups))[0, :, 0, 0].numpy()
    n = Node("c", "conv2d", ["x", "w", "b"], ["y"], {"groups": groups})
    np.testing.assert_allclose(rounding_shift(n, w.numpy(), wq.numpy(), mean.numpy()), want, rtol=1e-12, atol=1e-12)


def test_rounding_shift_linear_and_unknown_layouts() -> None:
    w = np.arange(6.0).reshape(2, 3)
    wq = w + np.array([[0.5, 0.0, -0.5], [0.25, 0.25, 0.0]])
    lin = Node("l", "linear", ["x", "w", "b"], ["y"], {})
    np.testing.assert_allclose(rounding_shift(lin, w, wq, np.array([1.0, 2.0, 3.0])), [-1.0, 0.75])
    assert rounding_shift(lin, w, wq, np.ones(4)) is None  # the mean is not over the layer's features


class ShiftedConv(nn.Module):
    """One conv reading a strongly non-zero-mean input: 3-bit rounding errors then move every output's mean."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.c = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x)


def test_bias_correction_removes_the_mean_shift_of_rounded_weights() -> None:
    m = ShiftedConv().eval()
    x = torch.rand(64, 8, 12, 12, generator=torch.Generator().manual_seed(4)) * 2 + 1  # channel means near 2
    g = capture(m, x[:1])
    prof = resolve_profile("imx500", 4)
    rules = [get_target("onnx-qdq").rules]
    stats = collect_stats(g, [x[:32], x[32:]], progress=False)
    rule = get_rule(get_target("onnx-qdq").rules.rounding)
    with torch.no_grad():
        ref = m(x)
    err = {}
    for bc in (False, True):
        q = ptq(g, stats, prof, rules, bias_correction=bc)
        # the interior (no padding) is where the correction is exact in expectation
        d = (simulate(q, x, rule) - ref)[:, :, 1:-1, 1:-1]
        err[bc] = float(d.mean((0, 2, 3)).abs().mean())
    assert err[True] < 0.25 * err[False]


def test_low_bit_search_reaches_below_a_quarter_of_the_largest_weight() -> None:
    """A heavy-tailed channel at 2 bits: its best step is far below max|w| / 4, and the search finds
    a lower error there than anywhere in the old [0.25, 1] range of clipping ratios."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1, 4096, generator=gen, dtype=torch.float64)
    w[0, 0] = 12.0  # one outlier: max|w| is 12 standard deviations
    qp, q = search_weight_grid(w.numpy(), 2, per_channel=True, power_of_two=False, narrow=False)
    s = float(qp.scale[0])
    assert s < 0.25 * 12.0
    err = float(((torch.from_numpy(q.astype(np.float64)) * s - w) ** 2).sum())
    old = min(float(((torch.clamp(torch.round(w / (a * 12.0)), -2, 1) * a * 12.0 - w) ** 2).sum())
              for a in np.linspace(0.25, 1.0, 64))
    assert err < old
    # at 8 bits the wide ratios still win
    qp8, _ = search_weight_grid(w.numpy(), 8, per_channel=True, power_of_two=False, narrow=False)
    assert float(qp8.scale[0]) * 127 > 0.25 * 12.0
