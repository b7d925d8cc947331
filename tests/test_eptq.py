"""EPTQ pieces on tiny models: Hessian scores, soft rounding, the optimisation loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import eptq_deploy
from eptq_deploy.api import resolve_profile
from eptq_deploy.capture import capture
from eptq_deploy.eptq import (
    EptqConfig,
    FakeQuantNetwork,
    annealed_beta,
    cache_float_activations,
    init_rounding,
    layer_attention,
    rounding_regularizer,
    soft_rounding,
)
from eptq_deploy.hessian import hessian_scores
from eptq_deploy.ptq import collect_stats, ptq
from eptq_deploy.targets import get_target


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y) + y)
        return self.fc(y.mean((2, 3)))


def _data(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_hessian_scores_exact_for_small_outputs() -> None:
    """With outputs <= draws, the score equals sum_k (J^T e_k)^2 computed sample by sample."""
    m = Tiny().eval()
    x = _data(4)
    g = capture(m, x[:1], fusing=("conv+relu", "add+relu"))
    scores, _ = hessian_scores(g, [x], n_draws=32, weights=False, progress=False)
    layer = g.weighted_nodes()[0].outputs[0]
    # brute force: per sample, per output class, the gradient wrt the first conv's output
    for i in range(len(x)):
        acts = {}

        def keep(name, y, acts=acts):
            if name == layer:
                y.retain_grad()
                acts[name] = y

        from eptq_deploy.float_exec import run_float

        total = 0
        for k in range(5):
            acts.clear()
            xi = x[i:i + 1].clone().requires_grad_(True)
            out = run_float(g, xi, hook=keep)
            out[0, k].backward()
            total = total + acts[layer].grad[0] ** 2
        want = float(total.mean((1, 2)).max())
        assert scores[layer][i] == pytest.approx(want, rel=1e-4)


def test_weight_hessian_is_nonnegative_and_shaped() -> None:
    m = Tiny().eval()
    x = _data(8)
    g = capture(m, x[:1], fusing=("conv+relu", "add+relu"))
    _, wh = hessian_scores(g, [x], n_draws=4, weights=True, progress=False)
    for n in g.weighted_nodes():
        h = wh[n.inputs[1]]
        assert h.shape == g.tensors[n.inputs[1]].data.shape
        assert (h >= 0).all() and h.sum() > 0


def test_soft_rounding_starts_at_the_float_weight() -> None:
    w = torch.randn(4, 9)
    s = torch.full((4, 1), 0.1)
    h = soft_rounding(init_rounding(w, s))
    frac = (w / s - torch.floor(w / s)).clamp(0.01, 0.99)
    assert torch.allclose(h, frac, atol=1e-5)


def test_regularizer_and_beta_schedule() -> None:
    assert float(rounding_regularizer(torch.tensor([0.0, 1.0]), 2.0)) == 0.0
    assert float(rounding_regularizer(torch.tensor([0.5]), 2.0)) == 1.0
    cfg = EptqConfig(iters=100, warmup=0.2, beta=(20.0, 2.0))
    assert annealed_beta(10, cfg) is None
    assert annealed_beta(20, cfg) == pytest.approx(20.0)
    assert annealed_beta(100, cfg) == pytest.approx(2.0)


def test_eptq_runs_is_deterministic_and_exports(tmp_path) -> None:
    m = Tiny().eval()
    x = _data(32)
    kw = dict(profile="imx500", targets="onnx-qdq", weight_bits=4, method="eptq", progress=False, iters=20, batch_size=8)
    a = eptq_deploy.quantize(m, x, **kw)
    b = eptq_deploy.quantize(m, x, **kw)
    for name, t in a.graph.tensors.items():
        if t.data is not None:
            np.testing.assert_array_equal(t.data, b.graph.tensors[name].data)
    for n in a.graph.weighted_nodes():
        w = a.graph.tensors[n.inputs[1]]
        assert w.data.min() >= -8 and w.data.max() <= 7
    bundle = eptq_deploy.export(a, out=tmp_path / "b", data=x)
    y = eptq_deploy.load(bundle).run(x.numpy())
    np.testing.assert_allclose(y, a.simulate(x).numpy(), atol=float(a.graph.tensors[a.graph.outputs[0]].quant.scale[0]))


def test_eptq_option_validation() -> None:
    with pytest.raises(eptq_deploy.EptqError, match="allowed"):
        eptq_deploy.quantize(Tiny().eval(), _data(8), method="eptq", progress=False, iterz=3)
    with pytest.raises(eptq_deploy.EptqError, match="hessian"):
        eptq_deploy.quantize(Tiny().eval(), _data(8), method="eptq", progress=False, hessian="maybe")


def test_adaround_ablation_runs_and_respects_the_grid() -> None:
    m = Tiny().eval()
    x = _data(16)
    qm = eptq_deploy.quantize(m, x, profile="w4a8-pot", method="adaround", progress=False, iters=5, batch_size=8)
    assert len(qm.info["eptq_log"]["layers"]) == 3
    for n in qm.graph.weighted_nodes():
        w = qm.graph.tensors[n.inputs[1]]
        assert w.data.min() >= -8 and w.data.max() <= 7
        assert np.all(np.log2(w.quant.scale) == np.round(np.log2(w.quant.scale)))


def _graph_bytes(qm) -> bytes:
    g = qm.graph
    return b"".join(g.tensors[n.inputs[i]].data.tobytes() for n in g.weighted_nodes() for i in (1, 2))


def test_interrupt_and_resume_give_the_same_graph(tmp_path, monkeypatch) -> None:
    """Ctrl-C at step 13 saves the state; --resume finishes bit-identical to an uninterrupted run."""
    import os
    import signal

    from eptq_deploy import eptq as E
    from eptq_deploy.checkpoint import Interrupted

    m, x = Tiny().eval(), _data(32)
    kw = dict(profile="imx500", targets="onnx-qdq", weight_bits=4, method="eptq", progress=False, iters=30, batch_size=8)
    straight = eptq_deploy.quantize(m, x, **kw)

    real_beta = E.annealed_beta

    sent = []

    def ctrl_c_at_13(step, cfg, window=None):
        if step == 13 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, as Ctrl-C sends
        return real_beta(step, cfg, window)

    monkeypatch.setattr(E, "annealed_beta", ctrl_c_at_13)
    ck = tmp_path / "ck"
    with pytest.raises(Interrupted, match="step 14.*--resume") as err:
        eptq_deploy.quantize(m, x, checkpoint_dir=str(ck), checkpoint_every=5, **kw)
    assert err.value.exit_code == 130
    assert (ck / "eptq_state.pt").is_file()
    monkeypatch.setattr(E, "annealed_beta", real_beta)
    resumed = eptq_deploy.quantize(m, x, checkpoint_dir=str(ck), resume=True, **kw)
    assert resumed.info["eptq_log"]["resumed_from_step"] == 14
    assert _graph_bytes(resumed) == _graph_bytes(straight)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path) -> None:
    m, x = Tiny().eval(), _data(16)
    kw = dict(profile="imx500", targets="onnx-qdq", weight_bits=4, method="eptq", progress=False, batch_size=8)
    eptq_deploy.quantize(m, x, iters=6, checkpoint_dir=str(tmp_path), **kw)
    with pytest.raises(eptq_deploy.EptqError, match="made for another model, data or options"):
        eptq_deploy.quantize(m, x, iters=7, checkpoint_dir=str(tmp_path), resume=True, **kw)
    with pytest.raises(eptq_deploy.EptqError, match="no checkpoint"):
        eptq_deploy.quantize(m, x, iters=6, checkpoint_dir=str(tmp_path / "empty"), resume=True, **kw)
    (tmp_path / "eptq_state.pt").write_bytes(b"garbage")
    with pytest.raises(eptq_deploy.EptqError, match="cannot read the EPTQ checkpoint"):
        eptq_deploy.quantize(m, x, iters=6, checkpoint_dir=str(tmp_path), resume=True, **kw)


def test_float_activations_cached_in_part_or_streamed_when_the_cache_exceeds_the_budget() -> None:
    m, x = Tiny().eval(), _data(16)
    kw = dict(profile="imx500", targets="onnx-qdq", weight_bits=4, method="eptq", progress=False, iters=10, batch_size=8)
    cached = eptq_deploy.quantize(m, x, **kw)
    streamed = eptq_deploy.quantize(m, x, max_memory=1000, **kw)
    per_sample = cached.info["eptq_log"]["float_activation_bytes"] // 16
    partly = eptq_deploy.quantize(m, x, max_memory=5 * per_sample + 1, **kw)
    assert cached.info["eptq_log"]["float_activations"] == "cached"
    assert streamed.info["eptq_log"]["float_activations"] == "streamed"
    assert partly.info["eptq_log"]["float_activations"] == "5 of 16 samples cached, the rest streamed"
    assert streamed.info["eptq_log"]["float_activation_bytes"] > 1000
    # same float16 targets up to float summation order: the learned rounding agrees almost everywhere
    a = np.frombuffer(_graph_bytes(cached), np.int8)
    for other in (streamed, partly):
        assert np.mean(a == np.frombuffer(_graph_bytes(other), np.int8)) > 0.99


def test_eptq_is_the_shipped_default(monkeypatch) -> None:
    """A call that names no method runs EPTQ (the suite's conftest swaps it for PTQ elsewhere)."""
    from conftest import SHIPPED_DEFAULT_METHOD

    from eptq_deploy import api

    assert SHIPPED_DEFAULT_METHOD == "eptq"
    monkeypatch.setattr(api, "DEFAULT_METHOD", SHIPPED_DEFAULT_METHOD)
    qm = eptq_deploy.quantize(Tiny().eval(), _data(16), profile="imx500", targets="onnx-qdq", weight_bits=4, progress=False, iters=3,
                              batch_size=8)
    assert qm.info["method"] == "eptq" and "eptq_log" in qm.info


class TwoLayer(nn.Module):
    """conv+relu, then a linear layer with 200 outputs: enough for Rademacher probes to be needed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 200)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_hessian_scores_match_the_full_jacobian_and_hutchinson_is_within_5_percent() -> None:
    """Two-layer net, 200 outputs: the exact score (basis probes) equals the full-Jacobian computation
    to 1e-5; 128 Rademacher draws (the Hutchinson estimate) land within 5 % of it."""
    from eptq_deploy.float_exec import run_float

    m = TwoLayer().eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    g = capture(m, x[:1], fusing=("conv+relu",))
    layer = g.weighted_nodes()[0].outputs[0]
    exact, _ = hessian_scores(g, [x], n_draws=200, weights=False, progress=False)
    estimate, _ = hessian_scores(g, [x], n_draws=128, weights=False, progress=False)
    for i in range(len(x)):
        acts: dict[str, torch.Tensor] = {}

        def keep(name: str, y: torch.Tensor, acts: dict[str, torch.Tensor] = acts) -> None:
            if name == layer:
                acts[name] = y

        out = run_float(g, x[i:i + 1].clone().requires_grad_(True), hook=keep)
        rows = [torch.autograd.grad(out[0, k], acts[layer], retain_graph=True)[0][0] for k in range(out.shape[1])]
        jac = torch.stack(rows).double()  # (outputs, C, H, W): the full Jacobian
        want = float(jac.pow(2).sum(0).mean((1, 2)).max())
        assert exact[layer][i] == pytest.approx(want, rel=1e-5)
        assert estimate[layer][i] == pytest.approx(want, rel=0.05)


def test_eptq_beats_ptq_where_rounding_matters() -> None:
    """The network-wise optimisation does what it is for: at 2-bit weights the integer
    network's output on held-out inputs is closer to the float model's than PTQ's
    (bias-corrected; at 4 bits this near-linear model leaves nothing to gain over it),
    and the regulariser has decided most rounding variables (at the start about 90 % lie
    strictly between 0.05 and 0.95)."""
    m = Tiny().eval()
    x = torch.randn(160, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    calib, held = x[:128], x[128:]
    kw = dict(profile="imx500", targets="onnx-qdq", weight_bits=2, progress=False)
    eptq = eptq_deploy.quantize(m, calib, method="eptq", batch_size=16, **kw)
    ptq = eptq_deploy.quantize(m, calib, method="ptq", **kw)
    log = eptq.info["eptq_log"]
    assert len(log["curve"]) >= 2 and log["undecided_fraction"] < 0.25, log["undecided_fraction"]
    ref = ptq.forward_float(held)

    def err(qm: eptq_deploy.QuantizedModel) -> float:
        return float((qm.simulate(held) - ref).pow(2).mean())

    assert err(eptq) < err(ptq), (err(eptq), err(ptq))


def test_draw_count_exact_for_small_outputs_and_eight_probes_above() -> None:
    """Default probes: the exact basis up to 32 outputs (CIFAR's 10 logits), 8 Rademacher probes
    above (an ImageNet classifier's 1,000); an explicit n_draws keeps its meaning for both."""
    from eptq_deploy.hessian import EXACT_OUTPUTS, MONTE_CARLO_DRAWS, draw_count

    assert draw_count(10, None) == (10, True)
    assert draw_count(EXACT_OUTPUTS, None) == (EXACT_OUTPUTS, True)
    assert draw_count(1000, None) == (MONTE_CARLO_DRAWS, False)
    assert draw_count(200, 200) == (200, True) and draw_count(200, 128) == (128, False)


def test_step_batch_size_shrinks_with_the_activation_volume() -> None:
    """32 samples a step for a small network; fewer, never under 8, where one sample's activations are large."""
    from eptq_deploy.eptq import BATCH_RANGE, STEP_VALUES, step_batch_size

    small = capture(Tiny().eval(), _data(1), fusing=("conv+relu", "add+relu"))
    layers = [n.outputs[0] for n in small.weighted_nodes()]
    assert step_batch_size(small, layers) == BATCH_RANGE[1]

    class Wide(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(x)

    x = torch.zeros(1, 3, 64, 64)
    for channels, want in ((256, 32), (512, 16), (8192, 8)):
        g = capture(Wide(channels).eval(), x)
        assert step_batch_size(g, [g.weighted_nodes()[0].outputs[0]]) == want
    assert STEP_VALUES // (512 * 64 * 64) == 16 and BATCH_RANGE == (8, 32)


def test_the_log_states_the_batch_size_it_used() -> None:
    m = Tiny().eval()
    kw = dict(profile="imx500", targets="onnx-qdq", weight_bits=4, method="eptq", progress=False, iters=3)
    assert eptq_deploy.quantize(m, _data(16), **kw).info["eptq_log"]["batch_size"] == 32
    assert eptq_deploy.quantize(m, _data(16), batch_size=4, **kw).info["eptq_log"]["batch_size"] == 4


def test_learned_weight_scales_reach_the_integer_graph_and_never_touch_power_of_two_grids(tmp_path) -> None:
    """With ``learn_scales`` the free per-channel weight scales move and the exported model
    runs them; a power-of-two profile keeps its shifts (nothing there is learned)."""
    m = Tiny().eval()
    x = _data(32)
    kw = dict(targets="onnx-qdq", weight_bits=4, method="eptq", progress=False, iters=30, batch_size=8, scale_lr=0.01)
    ptq = eptq_deploy.quantize(m, x, profile="imx500", targets="onnx-qdq", weight_bits=4, method="ptq", progress=False)
    qm = eptq_deploy.quantize(m, x, profile="imx500", learn_scales=True, **kw)
    moved = [not np.array_equal(qm.graph.tensors[n.inputs[1]].quant.scale, ptq.graph.tensors[n.inputs[1]].quant.scale)
             for n in qm.graph.weighted_nodes()]
    assert all(moved)
    bundle = eptq_deploy.export(qm, out=tmp_path / "b", data=x)
    y = eptq_deploy.load(bundle).run(x.numpy())
    np.testing.assert_allclose(y, qm.simulate(x).numpy(), atol=float(qm.graph.tensors[qm.graph.outputs[0]].quant.scale[0]))
    layerwise = eptq_deploy.quantize(m, x, profile="imx500", learn_scales=True, **{**kw, "method": "adaround", "iters": 10})
    assert all(not np.array_equal(layerwise.graph.tensors[n.inputs[1]].quant.scale, ptq.graph.tensors[n.inputs[1]].quant.scale)
               for n in layerwise.graph.weighted_nodes())
    pot = eptq_deploy.quantize(m, x, profile="w4a8-pot", learn_scales=True, **kw)
    for n in pot.graph.weighted_nodes():
        s = pot.graph.tensors[n.inputs[1]].quant.scale
        assert np.all(np.log2(s) == np.round(np.log2(s)))


def test_attention_ranks_samples_within_a_layer_and_weighs_layers_equally() -> None:
    """Scores four orders of magnitude apart across layers give every layer mean weight 1;
    within a layer the samples keep their ratios; no scores (or all zero) is uniform."""
    scores = {"a": np.array([1e-4, 3e-4]), "b": np.array([2.0, 6.0]), "c": np.zeros(2)}
    att = layer_attention(scores, list(scores), 2)
    for t in ("a", "b"):
        assert float(att[t].mean()) == pytest.approx(1.0) and float(att[t][1] / att[t][0]) == pytest.approx(3.0)
    assert att["c"].tolist() == [1.0, 1.0]
    assert all(v.tolist() == [1.0, 1.0] for v in layer_attention(None, ["a", "b"], 2).values())


def test_half_precision_targets_keep_float32_where_values_exceed_its_range() -> None:
    m, x = Tiny().eval(), _data(4)
    g = capture(m, x[:1], fusing=("conv+relu", "add+relu"))
    layers = [n.outputs[0] for n in g.weighted_nodes()]
    full = cache_float_activations(g, x, layers)
    half = cache_float_activations(g, x, layers, half=True)
    for t in layers:
        assert half[t].dtype == torch.float16
        torch.testing.assert_close(half[t].float(), full[t], rtol=1e-3, atol=1e-4)
    huge = cache_float_activations(g, x * 1e6, layers, half=True)
    assert any(a.dtype == torch.float32 for a in huge.values())
    assert all(bool(torch.isfinite(a).all()) for a in huge.values())


def test_hessian_pass_takes_a_share_of_a_large_set_only_where_no_per_sample_attention_needs_them_all(monkeypatch) -> None:
    """Without the attention the pass feeds averages (HMSE): past its work budget a random share
    serves (at least AVERAGE_MIN_SAMPLES); the attention keeps a score for every sample."""
    from eptq_deploy import hessian

    m, x = Tiny().eval(), _data(100)
    g = capture(m, x[:1])
    assert hessian.averaged_samples(g, 100) == 100  # a tiny network's whole set is within the budget
    monkeypatch.setattr(hessian, "AVERAGE_VALUES", 1)
    assert hessian.averaged_samples(g, 100) == hessian.AVERAGE_MIN_SAMPLES
    assert hessian.averaged_samples(g, 10) == 10
    kw = dict(method="eptq", progress=False, iters=3, batch_size=8)
    assert eptq_deploy.quantize(m, x, hessian="none", **kw).info["hessian_samples"] == hessian.AVERAGE_MIN_SAMPLES
    assert eptq_deploy.quantize(m, x, hessian="eptq", **kw).info["hessian_samples"] == 100


def test_a_pass_that_stops_at_the_wanted_layer_gives_its_full_pass_value() -> None:
    m, x = Tiny().eval(), _data(8)
    g = capture(m, x[:1])
    qg = ptq(g, collect_stats(g, [x], progress=False), resolve_profile("imx500", 4), [get_target("onnx-qdq").rules])
    net = FakeQuantNetwork(qg, g)
    first_conv = qg.weighted_nodes()[0].outputs[0]
    with torch.no_grad():
        out, full = net(x, 1.0, None, {first_conv})
        stopped, early = net(x, 1.0, None, {first_conv}, only_layers=True)
    assert out is not None and stopped is None
    assert torch.equal(full[first_conv], early[first_conv])


def test_gradient_scope_cuts_where_it_says() -> None:
    """'network' lets a layer's loss reach every earlier layer; 'block' stops at inputs that are
    not a weighted layer's own output (here: the graph input, the pooled features); 'layer'
    leaves each loss on its own weights only."""
    from eptq_deploy.eptq import gradient_cuts

    m = Tiny().eval()
    x = _data(8)
    fg = capture(m, x[:1], fusing=("conv+relu", "add+relu"))
    qg = ptq(fg, collect_stats(fg, [x], progress=False), resolve_profile("imx500", 4), [get_target("onnx-qdq").rules])
    names = [n.name for n in qg.weighted_nodes()]
    assert gradient_cuts(qg, "network") == set()
    assert gradient_cuts(qg, "layer") == set(names)
    assert gradient_cuts(qg, "block") == {names[0], names[2]}  # c2 reads c1's (fused relu) output
    with pytest.raises(eptq_deploy.EptqError, match="scope"):
        gradient_cuts(qg, "stage")
    second = qg.weighted_nodes()[1].outputs[0]
    grads = {}
    for scope in ("network", "block", "layer"):
        net = FakeQuantNetwork(qg, fg, scope=scope)
        _, acts = net(x, layers={second})
        acts[second].pow(2).mean().backward()
        grads[scope] = [net.V[net.key[n]].grad for n in names[:2]]
    for scope in ("network", "block"):
        assert float(grads[scope][0].abs().sum()) > 0 and float(grads[scope][1].abs().sum()) > 0
    assert grads["layer"][0] is None and float(grads["layer"][1].abs().sum()) > 0
    with pytest.raises(eptq_deploy.EptqError, match="scope"):
        eptq_deploy.quantize(m, x, method="eptq", progress=False, scope="stage")


def test_in_order_hardening_settles_layers_front_to_back() -> None:
    """'together': one window after warm-up for all; 'in_order': equal windows shifted from the
    first layer's (starting at warm-up) to the last's (ending at the last step), and a settled
    layer's weights are its hard rounding."""
    from eptq_deploy.eptq import HARDEN_WINDOW, hardening_windows

    cfg = EptqConfig(iters=100, warmup=0.2)
    assert hardening_windows(3, cfg) == [(20.0, 100)] * 3
    w = hardening_windows(5, EptqConfig(iters=100, warmup=0.2, harden="in_order"))
    assert w[0][0] == pytest.approx(20) and w[-1][1] == pytest.approx(100)
    assert all(b - a == pytest.approx(HARDEN_WINDOW * 80) for a, b in w)
    assert all(w[i][0] < w[i + 1][0] for i in range(4))
    assert annealed_beta(10, cfg, w[1]) is None and annealed_beta(int(w[1][1]) + 5, cfg, w[1]) == pytest.approx(2.0)
    m, x = Tiny().eval(), _data(8)
    fg = capture(m, x[:1], fusing=("conv+relu", "add+relu"))
    qg = ptq(fg, collect_stats(fg, [x], progress=False), resolve_profile("imx500", 4), [get_target("onnx-qdq").rules])
    net = FakeQuantNetwork(qg, fg)
    n = qg.weighted_nodes()[0]
    k = net.key[n.name]
    net.settled = frozenset({k})
    torch.testing.assert_close(net.weight(k, n), net.weight(k, n, hard=True))
    qm = eptq_deploy.quantize(m, x, method="eptq", progress=False, iters=10, batch_size=4, harden="in_order",
                              profile="imx500", weight_bits=4)
    for node in qm.graph.weighted_nodes():
        wt = qm.graph.tensors[node.inputs[1]].data
        assert wt.min() >= -8 and wt.max() <= 7
    with pytest.raises(eptq_deploy.EptqError, match="harden"):
        eptq_deploy.quantize(m, x, method="eptq", progress=False, harden="later")
