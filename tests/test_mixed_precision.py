"""Weight widths per layer under a memory budget (``mixed_precision.py``): the integer program against
brute force, the budget never exceeded in the files written, bad budgets refused before any work."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_cli import _quantize, workdir  # noqa: F401  (fixture)
from test_tflite import _one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)
from torch import nn

import eptq_deploy
from eptq_deploy import api
from eptq_deploy.capture import capture
from eptq_deploy.errors import UsageError
from eptq_deploy.hw_profiles import load_profile
from eptq_deploy.mixed_precision import layer_costs, layer_widths, plan_widths, size_range, solve
from eptq_deploy.ptq import layer_packed_bytes
from eptq_deploy.sizes import parse_size
from eptq_deploy.targets import get_target, list_targets


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(), nn.Conv2d(32, 24, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()


def _data(n: int = 48) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(1))


# packed bytes of _model: weights at b bits (b/8 bytes each) plus 4-byte int32 biases
WEIGHTS = [3 * 16 * 9, 16 * 32 * 9, 32 * 9, 32 * 24, 24 * 10]
BIASES = 4 * (16 + 32 + 32 + 24 + 10)


@pytest.mark.parametrize(("text", "size"), [("300KB", 300_000), ("300KiB", 307_200), ("300K", 307_200),
                                            ("1.5MB", 1_500_000), ("4G", 4 * 2**30), ("4GB", 4 * 10**9),
                                            ("12345", 12345), (12345, 12345), (" 2 mb ", 2_000_000)])
def test_sizes_read_as_written(text: str | int, size: int) -> None:
    assert parse_size(text, "--weight-memory") == size


@pytest.mark.parametrize("text", ["lots", "3 parsecs", "-5KB", "0", "", "1e3"])
def test_bad_sizes_refused_in_one_line(text: str) -> None:
    with pytest.raises(UsageError, match="--weight-memory") as err:
        parse_size(text, "--weight-memory")
    assert "\n" not in str(err.value)


def test_solver_matches_hand_checked_choice() -> None:
    # two layers: a (sensitive, small) and b (insensitive, large); 8 bits everywhere does not fit
    costs = {"a": {2: 100.0, 4: 10.0, 8: 0.0}, "b": {2: 3.0, 4: 1.0, 8: 0.0}}
    sizes = {"a": {2: 25, 4: 50, 8: 100}, "b": {2: 250, 4: 500, 8: 1000}}
    assert solve(costs, sizes, 1100) == {"a": 8, "b": 8}
    assert solve(costs, sizes, 1099) == {"a": 8, "b": 4}  # b pays 1.0, not a 10.0
    assert solve(costs, sizes, 600) == {"a": 8, "b": 4}
    assert solve(costs, sizes, 599) == {"a": 8, "b": 2}  # 350 bytes: b at 2 bits (3.0) beats a at 4 (10.0 + ...)
    assert solve(costs, sizes, 300) == {"a": 4, "b": 2}
    assert solve(costs, sizes, 275) == {"a": 2, "b": 2}
    with pytest.raises(UsageError, match="no choice of weight widths fits 274 bytes"):
        solve(costs, sizes, 274)


def test_solver_matches_brute_force_on_a_real_graph() -> None:
    prof = load_profile("imx500")
    g = capture(_model(), _data(1), fusing=prof.fusing, profile_name=prof.name)
    rng = np.random.default_rng(0)  # uneven Hessian diagonals, as real layers have
    hess = {n.inputs[1]: rng.gamma(0.5, 1.0, g.tensors[n.inputs[1]].data.shape) * 10.0 ** rng.integers(-3, 3)
            for n in g.weighted_nodes()}
    costs = layer_costs(g, prof, hess)
    nodes = {n.name: n for n in g.weighted_nodes()}
    widths = layer_widths(g, prof)
    sizes = {k: {b: layer_packed_bytes(g, nodes[k], b, prof.bias_bits) for b in w} for k, w in widths.items()}
    assert [sizes[k][8] for k in nodes] == [w + 4 * b for w, b in zip(WEIGHTS, [16, 32, 32, 24, 10], strict=True)]
    lo, hi = size_range(g, prof)
    assert (lo, hi) == (sum(WEIGHTS) * 2 // 8 + BIASES, sum(WEIGHTS) + BIASES)
    names = list(nodes)
    combos = [dict(zip(names, c, strict=True)) for c in itertools.product(*(widths[k] for k in names))]
    for budget in np.linspace(lo, hi, 13).astype(int):
        fits = [c for c in combos if sum(sizes[k][b] for k, b in c.items()) <= budget]
        best = min(sum(costs[k][b] for k, b in c.items()) for c in fits)
        got = solve(costs, sizes, int(budget))
        assert sum(sizes[k][b] for k, b in got.items()) <= budget
        assert sum(costs[k][b] for k, b in got.items()) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_budget_kept_in_the_files_written_and_runtimes_exact(tmp_path: Path) -> None:
    budget = 6_000  # between all-2-bit (2,040 bytes) and all-8-bit (6,792)
    x = _data()
    targets = [name for name, _ in list_targets(compilers=False)]  # the compilers: test_imx500, test_ethos_u
    qm = eptq_deploy.quantize(_model(), x, profile="imx500", targets=targets, method="eptq",
                              weight_memory="6KB", iters=20, batch_size=16, progress=False)
    assert len(set(qm.weight_bits.values())) > 1 and qm.weight_bytes <= budget
    bundle = eptq_deploy.export(qm, out=tmp_path / "b", data=x[:16])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["mixed_precision"]["budget_bytes"] == budget
    assert manifest["memory"]["weight_bits"] == qm.weight_bits
    assert manifest["memory"]["packed_weight_bytes"] == qm.weight_bytes == manifest["mixed_precision"]["packed_bytes"]
    assert (bundle / "weight_bits.png").stat().st_size > 0 and "memory budget" in (bundle / "report.md").read_text()
    # the ONNX file: every weight (less its container's zero point) within its layer's width, the
    # packed count within the budget
    m = onnx.load(str(bundle / "onnx-qdq" / "model.onnx"))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    packed = 0
    for n in qm.graph.weighted_nodes():
        w, b = init[f"{n.inputs[1]}.int"], init[f"{n.inputs[2]}.int"]
        zp = init[f"{n.inputs[1]}.zero_point"].astype(np.int64)  # a uint8 container holds w + 128
        w = w.astype(np.int64) - zp.reshape(-1, *[1] * (w.ndim - 1))
        bits = qm.weight_bits[n.name]
        assert -(2 ** (bits - 1)) <= w.min() and w.max() <= 2 ** (bits - 1) - 1
        packed += w.size * bits // 8 + b.size * 4
    assert packed == qm.weight_bytes <= budget
    exact = [t for t in targets if get_target(t).exact_here(qm.graph)]
    assert {"onnx-qdq", "tflite-int8", "tflite-micro"} <= set(exact)
    for t in exact:  # the mixed widths change nothing in the runtimes' exactness
        assert manifest["targets"][t]["checks"]["max_abs_diff_lsb"] == 0, t


def test_a_budget_over_every_layer_at_8_bits_is_the_uniform_model_and_says_so() -> None:
    qm = eptq_deploy.quantize(_model(), _data(), profile="imx500", targets="onnx-qdq", method="ptq",
                              weight_memory="20KB", progress=False)
    assert set(qm.weight_bits.values()) == {8}
    assert "uniform 8-bit model" in qm.info["mixed_precision"]["note"]


def test_pinned_layers_stay_pinned() -> None:
    prof = load_profile("imx500")
    pinned = replace(prof, first_layer_weight_bits=8, last_layer_weight_bits=8)
    qm = eptq_deploy.quantize(_model(), _data(), profile=pinned, targets="onnx-qdq", method="ptq",
                              weight_memory=3_000, progress=False)
    bits = list(qm.weight_bits.values())
    assert bits[0] == bits[-1] == 8 and qm.weight_bytes <= 3_000


def test_bad_budgets_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "collect_stats", lambda *a, **k: pytest.fail("calibration ran"))
    lo = sum(WEIGHTS) * 2 // 8 + BIASES  # 2,040 bytes: every layer at 2 bits
    kw = dict(profile="imx500", targets="onnx-qdq", method="ptq", progress=False)
    with pytest.raises(UsageError, match=f"give at least {lo:,} bytes") as err:
        eptq_deploy.quantize(_model(), _data(), weight_memory=lo - 1, **kw)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="at most 8,388,480 bytes"):
        eptq_deploy.quantize(_model(), _data(), weight_memory="9MB", **kw)
    with pytest.raises(UsageError, match="give one of them"):
        eptq_deploy.quantize(_model(), _data(), weight_memory="5KB", weight_bits=4, **kw)
    with pytest.raises(UsageError, match="not a size"):
        eptq_deploy.quantize(_model(), _data(), weight_memory="five kilobytes", **kw)


def test_plan_on_its_own() -> None:
    prof = load_profile("imx500")
    g = capture(_model(), _data(1), fusing=prof.fusing, profile_name=prof.name)
    plan = plan_widths(g, prof, {}, 4_000)  # no Hessian: plain weight MSE
    assert plan.packed_bytes <= 4_000 and plan.to_dict()["solver"].startswith("scipy")


def test_cli_weight_memory(workdir: Path) -> None:  # noqa: F811
    # the CLI's net: 216 + 32 weights and 12 int32 biases; every layer at 2 bits packs to 62 + 48 = 110 bytes
    res = _quantize(workdir, "--profile", "imx500", "--target", "onnx-qdq", "--method", "ptq",
                    "--weight-memory", "100B")
    assert res.exit_code == 2 and "give at least 110 bytes" in res.output and not (workdir / "bundle").exists()
    res = _quantize(workdir, "--profile", "imx500", "--target", "onnx-qdq", "--method", "ptq",
                    "--weight-memory", "250")
    assert res.exit_code == 0, res.output
    assert "weight widths:" in res.output and "of 250 bytes" in res.output
    manifest = json.loads((workdir / "bundle" / "manifest.json").read_text())
    assert manifest["memory"]["packed_weight_bytes"] <= 250 and set(manifest["memory"]["weight_bits"].values()) != {8}
