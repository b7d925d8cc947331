"""Conformance: every target (built-in and plugin, ``list_targets()``) on the same small graphs.

For each target, graph and profile the target accepts: quantize for that target, emit its
files, read the integers and grids back from the file (where the target can), run the file
on each kernel set the runtime offers, and compare with the simulation of the rule those
kernels follow: bit for bit where the target says its runtime is exact on this machine
(``Target.exact_here``), else within 20 dB SQNR of it (the error power at most 1 % of the
output's: the same function, computed with the CPU's documented deviations). The float twin must
compute the source model. Single-op property tests (test_sim_fuzz.py) and real architectures
(test_torchvision_targets.py) run over the same target list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_tflite import _one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)
from torch import nn

import eptq_deploy
from eptq_deploy.api import check_pair, resolve_profile
from eptq_deploy.errors import UsageError
from eptq_deploy.host import has_vnni
from eptq_deploy.targets import get_target, list_targets

TARGETS = [name for name, _ in list_targets(compilers=False)]  # ethos-u: test_ethos_u.py
#: (profile, weight bits): power-of-two symmetric, free-scale asymmetric, 4-bit weights
PROFILES = [("int8-pot", None), ("tflite-int8", None), ("imx500", 4)]
#: where a runtime is not exact here: the least SQNR (dB) of its output against the simulation
SQNR_WHEN_INEXACT = 20.0


class Residual(nn.Module):
    """Conv, ReLU, an identity shortcut, global average pool, fully connected."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        return self.fc(torch.relu(self.b(y) + y).mean((2, 3)))


class Mobile(nn.Module):
    """Strided stem with HardSwish, depthwise with ReLU6, squeeze-excitation (mean, 1x1 convs,
    HardSigmoid, multiply), average pool, flatten, fully connected."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se1, self.se2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self.dw(nn.functional.hardswish(self.stem(x))))
        s = nn.functional.hardsigmoid(self.se2(torch.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        return self.fc(torch.flatten(nn.functional.avg_pool2d(y * s, 4), 1))


class Branches(nn.Module):
    """Max pool, two branches concatenated on channels, sigmoid, fully connected."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.l, self.r = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.max_pool2d(torch.relu(self.a(x)), 2)
        y = torch.cat([torch.relu(self.l(y)), torch.sigmoid(self.r(y))], 1)
        return self.fc(y.mean((2, 3)))


GRAPHS = {"residual": Residual, "mobile": Mobile, "branches": Branches}
#: (target, graph, profile) -> a deviation measured on CPUs without VNNI and not yet explained
KNOWN_DEVIATIONS = {
    ("openvino-ir", "branches", "tflite-int8"): "OpenVINO's CPU plugin without VNNI, asymmetric grids: 30 LSB "
    "(SQNR 15.5 dB) from the openvino rule; the same graph under int8-pot is exact (README, known deviations)",
}


def _case(graph: str, profile: str, bits: int | None, target: str) -> tuple[nn.Module, eptq_deploy.QuantizedModel,
                                                                            torch.Tensor]:
    try:
        check_pair(resolve_profile(profile, bits), get_target(target))
    except UsageError as e:
        pytest.skip(f"{target} refuses {profile}: {e}")
    torch.manual_seed(0)
    model = GRAPHS[graph]().eval()
    gen = torch.Generator().manual_seed(1)
    calib, x = torch.randn(48, 3, 16, 16, generator=gen), torch.randn(24, 3, 16, 16, generator=gen)
    qm = eptq_deploy.quantize(model, calib, profile=profile, weight_bits=bits, targets=[target], method="ptq",
                              progress=False)
    return model, qm, x


@pytest.mark.parametrize(("profile", "bits"), PROFILES)
@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("target", TARGETS)
def test_emit_read_back_run(target: str, graph: str, profile: str, bits: int | None, tmp_path: Path,
                            request: pytest.FixtureRequest) -> None:
    reason = KNOWN_DEVIATIONS.get((target, graph, profile))
    if reason and not has_vnni():
        request.applymarker(pytest.mark.xfail(reason=reason, strict=False))
    model, qm, x = _case(graph, profile, bits, target)
    t = get_target(target)
    written = t.emit(qm.graph, tmp_path)
    assert (tmp_path / t.model_file) in written
    mismatches = t.read_back_mismatches(tmp_path, qm.graph)
    assert not mismatches, f"{target}'s file does not hold the graph: {mismatches[:5]}"
    lsb = float(qm.graph.tensors[qm.graph.outputs[0]].quant.scale[0])
    exact = t.exact_here(qm.graph)
    for kwargs in t.kernel_variants:
        runner = t.load(tmp_path, **kwargs)
        got = runner.run(x.numpy())
        sim = qm.simulate(x, target, rounding=runner.rounding).numpy()
        assert got.shape == sim.shape
        where = f"{target} {kwargs or ''} ({runner.kernels or 'default kernels'}, rule {runner.rounding or 'declared'})"
        if exact:
            diff = np.abs(got.astype(np.float64) - sim) / lsb
            assert diff.max() == 0, f"{where}: {np.count_nonzero(diff)} outputs differ, up to {diff.max():.0f} LSB"
        else:
            err = float(((got.astype(np.float64) - sim) ** 2).sum())
            sqnr = 10 * np.log10(float(((sim - sim.mean()) ** 2).sum()) / err) if err else np.inf
            assert sqnr >= SQNR_WHEN_INEXACT, f"{where}: SQNR {sqnr:.1f} dB against the simulation"


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("target", TARGETS)
def test_float_twin_computes_the_model(target: str, graph: str, tmp_path: Path) -> None:
    model, qm, x = _case(graph, "int8-pot", None, target)
    t = get_target(target)
    t.emit(qm.float_graph, tmp_path, quantized=False)
    got = t.load(tmp_path, float_model=True).run(x.numpy())
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.parametrize("target", TARGETS)
def test_target_declares_what_conformance_uses(target: str) -> None:
    t = get_target(target)
    assert t.rules.rounding in t.rounding_rules
    assert t.kernel_variants and all(isinstance(k, dict) for k in t.kernel_variants)
    assert t.model_file and t.float_model_file and t.model_file != t.float_model_file
