"""EPTQ: network-wise optimisation of the rounding, guided by label-free Hessian scores.

Gordon, Cohen, Habi, Netzer, "EPTQ: Enhanced Post-Training Quantization via
Hessian-guided Network-wise Optimization". Starting from the calibrated PTQ graph
(grids fixed), every quantized weight tensor's rounding is learned at once:

    w_q = s * clip(floor(w / s) + h(V), qmin, qmax),   h(V) = clip(1.2 sigmoid(V) - 0.1, 0, 1)

The loss compares the quantized network's activation at every quantized layer l
with the float network's, weighted per sample n by the attention w_{n,l}: the
sample's Hessian score at that layer (``hessian.py``) over the layer's mean score,
or 1 everywhere (``hessian="none"``), plus AdaRound's rounding regulariser that pushes
h(V) to 0 or 1 as beta anneals 20 -> 2 after a 20 % warm-up. Biases are learned
too; activation quantization is switched on gradually (a rising fraction of
elements, QDrop-style) and is complete for the last half. At the end the rounding
is hard (h >= 0.5) and the result is an ordinary quantized graph.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, interrupt_at_step_boundary, interrupted
from .errors import UsageError
from .float_exec import apply_activation, conv, float_op, pack, release, run_float
from .graph import WEIGHTED_OPS, QParams, QuantGraph, moves_codes
from .ptq import set_bias

#: iterations by default: chosen from the measured accuracy-vs-iterations curve (README)
DEFAULT_ITERS = 800


@dataclass
class EptqConfig:
    """Knobs of the optimisation; defaults are the measured sweet spot on a 2-core CPU."""

    iters: int = DEFAULT_ITERS
    batch_size: int | None = None  # samples per step; None: ``step_batch_size``
    lr: float = 0.1  # Adam, rounding variables
    bias_lr: float = 1e-3  # Adam, biases
    reg_weight: float = 3.0  # rounding regulariser per weight, against the task loss normalised to 1 at the start
    warmup: float = 0.2  # fraction of iterations without the regulariser
    beta: tuple[float, float] = (20.0, 2.0)
    act_ramp: float = 0.5  # fraction of iterations over which activation quantization reaches 100 %
    bias_tune: float = 0.1  # extra bias-only iterations after hard rounding, as a fraction of iters
    learn_scales: bool = False  # also learn each free per-channel weight scale (never a power-of-two one)
    harden: str = "together"  # "together": every layer's rounding hardens over the same steps; "in_order": front to back
    scope: str = "network"  # how far back a layer's loss reaches: "network", "block" or "layer" (``GRADIENT_SCOPES``)
    scale_lr: float = 1e-3  # Adam, log of the weight scales' gains
    device: str | None = None  # None: CUDA when available, else the CPU
    seed: int = 0
    max_memory: int | None = None  # bytes for the float-activation cache; None: a quarter of the RAM
    checkpoint_dir: str | None = None  # save the optimisation state here (survives Ctrl-C)
    checkpoint_every: int = 50  # iterations between checkpoints
    resume: bool = False  # continue from checkpoint_dir's state


#: where a layer's loss stops sending gradient upstream: "network" (the paper's: every
#: earlier layer), "block" (back to the last input that is not a weighted layer's own output:
#: a residual add, a pooling, a concat; the block of BRECQ's block reconstruction) or
#: "layer" (its own weights only: AdaRound's objective, every layer fitted at once on the
#: quantized network's inputs)
GRADIENT_SCOPES = ("network", "block", "layer")

#: options that drive a run without shaping its result (a checkpoint may be resumed across them)
RUN_CONTROL = ("checkpoint_dir", "checkpoint_every", "resume", "max_memory", "device")


# --------------------------------------------------------------- the pieces
def soft_rounding(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's rectified sigmoid h(V) in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * 1.2 - 0.1, 0.0, 1.0)


def init_rounding(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """V with h(V) equal to the fractional part of w / s (start at the float weight)."""
    frac = (w / s - torch.floor(w / s)).clamp(0.01, 0.99)
    p = (frac + 0.1) / 1.2
    return torch.log(p / (1 - p))


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean of 1 - |2h - 1|^beta: zero only when every h is exactly 0 or 1.

    The optimisation weighs the sum over all weights (mean times count), so the
    pull towards 0 or 1 on each weight does not depend on the network's size.
    """
    return (1 - (2 * h - 1).abs().pow(beta)).mean()


def annealed_beta(step: int, cfg: EptqConfig, window: tuple[float, float] | None = None) -> float | None:
    """None before the hardening window (by default: during warm-up), then beta falling
    linearly from cfg.beta[0] to cfg.beta[1] over the window."""
    start, end = window or (cfg.warmup * cfg.iters, cfg.iters)
    if step < start:
        return None
    t = min((step - start) / max(end - start, 1), 1.0)
    return cfg.beta[0] + (cfg.beta[1] - cfg.beta[0]) * t


#: when the layers' rounding hardens: all over the same steps, or front to back
HARDEN_ORDERS = ("together", "in_order")
#: ``harden="in_order"``: each layer's window, as a fraction of the steps after warm-up
HARDEN_WINDOW = 0.5


def hardening_windows(n_layers: int, cfg: EptqConfig) -> list[tuple[float, float]]:
    """Each layer's hardening steps, in graph order.

    "together": all layers over the steps after warm-up. "in_order": windows of
    ``HARDEN_WINDOW`` of those steps, shifted front to back, so every layer settles its
    rounding on inputs whose upstream rounding is already final (what layer-by-layer fitting
    gets, measured 1 point ahead of network-wise on EfficientNet-Lite0 W4), while the loss
    stays the whole network's. After its window a layer's rounding is hard and fixed.
    """
    start = cfg.warmup * cfg.iters
    span = cfg.iters - start
    if cfg.harden == "together" or n_layers < 2:
        return [(start, cfg.iters)] * n_layers
    width = HARDEN_WINDOW * span
    return [(start + i / (n_layers - 1) * (span - width), start + i / (n_layers - 1) * (span - width) + width)
            for i in range(n_layers)]


def eptq_loss(q_acts: dict[str, torch.Tensor], f_acts: dict[str, torch.Tensor],
              attention: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Sum over layers of the batch mean of w_{n,l} * ||a_q - a_f||^2 (per-element mean).

    ``attention`` None: w = 1 everywhere, where the sum is each layer's plain mean squared
    error (one fused pass forward and backward; a third of the elementwise work at 224x224).
    """
    total: torch.Tensor | float = 0.0
    for name, fa in f_acts.items():
        if attention is None:
            total = total + F.mse_loss(q_acts[name], fa)
            continue
        err = (q_acts[name] - fa).pow(2).reshape(fa.shape[0], -1).mean(1)
        total = total + (attention[name] * err).mean()
    return total


def fake_quant(x: torch.Tensor, qp: QParams, keep: float = 1.0, gen: torch.Generator | None = None) -> torch.Tensor:
    """Quantize-dequantize with a straight-through rounding gradient (fixed grid).

    ``keep`` < 1 quantizes only that random fraction of the elements (gradual
    activation quantization); the rest stay float.
    """
    if keep <= 0.0:
        return x
    s, z = float(qp.scale[0]), float(qp.zero_point[0])
    lo, hi = (qp.qmin - z) * s, (qp.qmax - z) * s
    return _FakeQuantSTE.apply(x, s, lo, hi, keep_mask(x, keep, gen) if keep < 1.0 else None)


class _FakeQuantSTE(torch.autograd.Function):
    """round(clamp(x, lo, hi) / s) * s where ``mask`` is set (everywhere if None), x elsewhere.

    The gradient is straight through, zero only where a quantized element is clamped.
    One fused function: a third of the elementwise passes of composing it from
    clamp, round and a detached residual, forward and backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: float, lo: float, hi: float, mask: torch.Tensor | None) -> torch.Tensor:
        xc = torch.clamp(x, lo, hi)
        passes = xc == x
        q = xc.div_(s).round_().mul_(s)
        if mask is not None:
            q = torch.where(mask, q, x)
            passes |= ~mask
        ctx.save_for_backward(passes)
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (passes,) = ctx.saved_tensors
        return torch.where(passes, grad, 0.0), None, None, None, None


def keep_mask(x: torch.Tensor, keep: float, gen: torch.Generator | None) -> torch.Tensor:
    """True on a random ``keep`` fraction of ``x``'s elements (in steps of 1/256).

    One random byte per element, eight drawn per int64: a quarter of ``torch.rand``'s cost.
    """
    words = torch.randint(-2**63, 2**63 - 1, ((x.numel() + 7) // 8,), generator=gen, device=x.device, dtype=torch.int64)
    return (words.view(torch.uint8)[: x.numel()] < round(keep * 256)).reshape(x.shape)


def gradient_cuts(qg: QuantGraph, scope: str) -> set[str]:
    """The weighted nodes whose input is detached under ``scope`` (``GRADIENT_SCOPES``)."""
    if scope not in GRADIENT_SCOPES:
        raise UsageError(f"unknown EPTQ scope {scope!r}: use one of {', '.join(GRADIENT_SCOPES)}")
    weighted = qg.weighted_nodes()
    if scope == "network":
        return set()
    if scope == "layer":
        return {n.name for n in weighted}
    producer = qg.producer()
    return {n.name for n in weighted if n.inputs[0] not in producer or producer[n.inputs[0]].op not in WEIGHTED_OPS}


class FakeQuantNetwork(torch.nn.Module):
    """The quantized graph with learnable rounding and biases, differentiable end to end."""

    def __init__(self, qg: QuantGraph, fg: QuantGraph, learn_scales: bool = False, scope: str = "network") -> None:
        super().__init__()
        self.qg = qg
        self.cut = gradient_cuts(qg, scope)  # weighted nodes whose input passes no gradient upstream
        self.dead = qg.dead_after()  # activations to free after each node (no-grad passes over big inputs)
        self.V = torch.nn.ParameterDict()
        self.bias = torch.nn.ParameterDict()
        self.log_gain = torch.nn.ParameterDict()  # learned weight scales: s * exp(log_gain), per channel
        self.base: dict[str, torch.Tensor] = {}  # floor(w / s)
        self.scale: dict[str, torch.Tensor] = {}
        self.key = {}
        for i, n in enumerate(qg.nodes):
            if n.op not in WEIGHTED_OPS:
                continue
            k = f"l{i}"
            self.key[n.name] = k
            wq = qg.tensors[n.inputs[1]].quant
            w = torch.from_numpy(fg.tensors[n.inputs[1]].data.astype(np.float32))
            shape = (-1,) + (1,) * (w.dim() - 1)
            s = torch.from_numpy(wq.scale.astype(np.float32)).reshape(shape)
            self.scale[k] = s
            self.base[k] = torch.floor(w / s)
            self.V[k] = torch.nn.Parameter(init_rounding(w, s))
            b = torch.from_numpy(fg.tensors[n.inputs[2]].data.astype(np.float32))
            self.bias[k] = torch.nn.Parameter(b.clone())
            if learn_scales and wq.exponent is None:
                self.log_gain[k] = torch.nn.Parameter(torch.zeros_like(s))

    def to_device(self, device: torch.device) -> FakeQuantNetwork:
        self.to(device)
        for d in (self.base, self.scale):
            for k in d:
                d[k] = d[k].to(device)
        return self

    def weight(self, k: str, n, hard: bool = False) -> torch.Tensor:
        wq = self.qg.tensors[n.inputs[1]].quant
        h = (self.V[k] >= 0).float() if hard or k in self.settled else soft_rounding(self.V[k])
        return self.weight_scale(k) * torch.clamp(self.base[k] + h, wq.qmin, wq.qmax)

    def weight_scale(self, k: str) -> torch.Tensor:
        """The layer's per-channel weight scale, with its learned gain where scales are learned."""
        return self.scale[k] * torch.exp(self.log_gain[k]) if k in self.log_gain else self.scale[k]

    hard = False  # evaluate with the final (hard) rounding instead of h(V)
    settled: frozenset[str] = frozenset()  # layers whose rounding is already hard and fixed

    def forward(self, x: torch.Tensor, keep: float = 1.0, gen: torch.Generator | None = None,
                layers: set[str] | None = None, only_layers: bool = False) -> tuple[Any, dict[str, torch.Tensor]]:
        """The network's outputs and the activations named in ``layers``; ``only_layers``: stop
        once those are computed (the outputs are then None)."""
        T = self.qg.tensors
        first = self.qg.inputs[0]
        env = {first: fake_quant(x, T[first].quant, 1.0)}
        acts: dict[str, torch.Tensor] = {first: env[first]} if layers is not None and first in layers else {}
        for n, dead in zip(self.qg.nodes, self.dead, strict=True):
            if only_layers and layers is not None and len(acts) == len(layers):
                return None, acts
            y = self.node_forward(n, [env[i] for i in n.inputs if i in env], keep, gen)
            env[n.outputs[0]] = y
            if layers is not None and n.outputs[0] in layers:
                acts[n.outputs[0]] = y
            release(env, dead)
        return pack([env[o] for o in self.qg.outputs]), acts

    def node_forward(self, n, xs: list[torch.Tensor], keep: float = 1.0, gen: torch.Generator | None = None) -> torch.Tensor:
        """One node on fake-quantized inputs, its output fake-quantized."""
        if n.op in WEIGHTED_OPS:
            k = self.key[n.name]
            w, b = self.weight(k, n, self.hard), self.bias[k]
            if n.name in self.cut:
                xs = [xs[0].detach()]
            y = F.linear(xs[0], w, b) if n.op == "linear" else conv(n, xs[0], w, b)
            y = apply_activation(y, n.attrs["activation"])
        else:
            y = float_op(n, xs)
        if not moves_codes(n):
            y = fake_quant(y, self.qg.tensors[n.outputs[0]].quant, keep, gen)
        return y

    def finalize(self, qg: QuantGraph, bias_bits: int) -> QuantGraph:
        """Hard rounding and integer biases written into a copy of ``qg``."""
        g = qg.copy()
        with torch.no_grad():
            for n in g.nodes:
                if n.op not in WEIGHTED_OPS:
                    continue
                k = self.key[n.name]
                wq = g.tensors[n.inputs[1]].quant
                ints = torch.clamp(self.base[k] + (self.V[k] >= 0).float(), wq.qmin, wq.qmax).cpu()
                g.tensors[n.inputs[1]].data = ints.numpy().astype(np.int8 if wq.bits <= 8 else np.int16)
                if k in self.log_gain:  # a new record: the grid of ``qg`` stays as it was
                    g.tensors[n.inputs[1]].quant = replace(wq, scale=self.weight_scale(k).reshape(-1).cpu().numpy())
                set_bias(g, n, self.bias[k].detach().cpu().numpy(), bias_bits)
        return g


@torch.no_grad()
def rounding_report(net: FakeQuantNetwork, x: torch.Tensor, f_acts: FloatActivations,
                    attention: dict[str, torch.Tensor] | None, layers: list[str], loss0: float,
                    gen: torch.Generator, mgen: torch.Generator, batch_size: int = 32) -> dict[str, float]:
    """How decided the rounding is, and the task loss with soft versus hard rounding, on eight
    steps' worth of samples (256 at 32 a step, 64 at 224x224's 8: a diagnostic, not worth a
    minute there).

    A batch at a time: at 224x224 one 256-sample pass (and its streamed float
    targets) would take tens of GiB.
    """
    n = 8 * batch_size
    h = torch.cat([soft_rounding(v).reshape(-1) for v in net.V.values()])
    idx = torch.randperm(len(x), generator=gen)[:n]
    out = {"undecided_fraction": round(float(((h > 0.05) & (h < 0.95)).float().mean()), 4)}
    for mode in (False, True):
        net.hard = mode
        total = 0.0
        for part in idx.split(batch_size):
            _, qa = net(x[part], 1.0, mgen, set(layers))
            total += float(eptq_loss(qa, f_acts(part), batch_attention(attention, part))) * len(part)
        out["hard_task_loss" if mode else "soft_task_loss"] = round(total / len(idx) / loss0, 5)
    net.hard = False
    return out


#: the float targets are held in half precision: 11 significant bits, 8x finer than an 8-bit
#: activation grid's step over the same range, at half the memory (a layer whose values
#: exceed float16's range keeps float32)
TARGET_DTYPE = torch.float16
HALF_MAX = float(torch.finfo(torch.float16).max)


def cache_float_activations(fg: QuantGraph, x: torch.Tensor, layers: list[str],
                            batch_size: int | None = None, half: bool = False) -> dict[str, torch.Tensor]:
    """The float network's activation at every quantized layer, for every sample, computed once
    (written into preallocated tensors: no second copy while concatenating); ``half``: stored
    as float16 targets (``TARGET_DTYPE``), float32 for a layer whose values exceed its range."""
    step = batch_size or fg.batch_size(most=128)
    store: dict[str, torch.Tensor] = {}
    wanted = set(layers)
    at = 0

    def keep(name: str, y: torch.Tensor) -> None:
        if name in wanted:
            if name not in store:
                store[name] = torch.empty((len(x), *y.shape[1:]), dtype=TARGET_DTYPE if half else y.dtype)
            if store[name].dtype != y.dtype and float(y.abs().max()) >= HALF_MAX:
                store[name] = store[name].to(y.dtype)
            store[name][at:at + len(y)] = y

    with torch.no_grad():
        for at in range(0, len(x), step):
            run_float(fg, x[at:at + step], hook=keep)
    return {t: store[t] for t in layers}


#: activation values per optimisation step (at the quantized layers, all samples): 32 samples of a CIFAR
#: ResNet are far below it, a 224x224 network reaches it at a few samples
STEP_VALUES = 2**25
BATCH_RANGE = (8, 32)


def step_batch_size(fg: QuantGraph, layers: list[str]) -> int:
    """Samples per optimisation step: 32, fewer where one sample's activations are large.

    A step's cost grows with the activation values it touches; a 224x224 network holds ~35x
    a CIFAR ResNet-20's per sample, and its loss already averages over 49x the spatial
    positions per sample. At least 8 samples keep each step's gradient from one image's content.
    """
    return max(BATCH_RANGE[0], min(BATCH_RANGE[1], STEP_VALUES // max(fg.values_per_sample(layers), 1)))


def cache_bytes(fg: QuantGraph, layers: list[str], n: int) -> int:
    """Bytes the float-activation cache takes for ``n`` samples (float16 targets)."""
    return TARGET_DTYPE.itemsize * n * fg.values_per_sample(layers)


def memory_budget(max_memory: int | None) -> int:
    """The cache budget: ``max_memory`` bytes, else a quarter of the machine's RAM (at most half of what is free).

    A quarter leaves room for the Hessian pass, the optimiser's own activations and
    whatever else the machine runs.
    """
    if max_memory is not None:
        return max_memory
    import psutil

    vm = psutil.virtual_memory()
    return min(vm.total // 4, vm.available // 2)


class FloatActivations:
    """The float targets of the loss: as many samples' as fit the budget cached once, the
    rest recomputed per batch.

    Recomputing costs one float forward pass over the batch's uncached samples; every
    target is rounded to float16 either way, so the result does not depend on the budget
    (up to float summation order).
    """

    def __init__(self, fg: QuantGraph, x: torch.Tensor, layers: list[str], budget: int, device: torch.device) -> None:
        self.fg, self.x, self.layers, self.device = fg, x.cpu(), layers, device
        self.bytes = cache_bytes(fg, layers, len(x))
        self.n_cached = min(len(x), budget // max(cache_bytes(fg, layers, 1), 1))
        self.cache = {t: a.to(device) for t, a in cache_float_activations(
            fg, self.x[:self.n_cached], layers, half=True).items()} if self.n_cached else {}

    def describe(self) -> str:
        if self.n_cached == len(self.x):
            return "cached"
        return "streamed" if not self.n_cached else f"{self.n_cached} of {len(self.x)} samples cached, the rest streamed"

    def __call__(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        cached = idx < self.n_cached
        if bool(cached.all()):
            return {t: self.cache[t][idx].float() for t in self.layers}
        fresh = {t: a.to(self.device) for t, a in cache_float_activations(
            self.fg, self.x[idx[~cached].cpu()], self.layers, batch_size=int((~cached).sum()), half=True).items()}
        out, where, some = {}, cached.to(self.device), bool(cached.any())
        for t in self.layers:
            y = torch.empty((len(idx), *fresh[t].shape[1:]), dtype=torch.float32, device=self.device)
            y[~where] = fresh[t].float()
            if some:
                y[where] = self.cache[t][idx[cached]].float()
            out[t] = y
        return out


def layer_attention(scores: dict[str, np.ndarray] | None, layers: list[str], n: int) -> dict[str, torch.Tensor]:
    """Per-sample weights, each layer's scaled to mean 1 (uniform if None).

    The scores rank the samples within a layer: a sample whose activation there moves the
    output more weighs more. They do not weigh layers against each other: across layers the
    scores span orders of magnitude (four on EfficientNet-Lite0), and weighting layers by them
    left most layers unfitted (measured, README: resnet20 W2 fell to 49 % on one seed).
    """
    if scores is None:
        return {t: torch.ones(n) for t in layers}
    out = {}
    for t in layers:
        s = scores[t].astype(np.float64)
        mean = float(s.mean())
        out[t] = torch.from_numpy((s / mean if mean > 0 else np.ones_like(s)).astype(np.float32))
    return out


def batch_attention(attention: dict[str, torch.Tensor] | None, idx: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The attention of the samples ``idx`` (None stays None: uniform)."""
    return None if attention is None else {t: a[idx] for t, a in attention.items()}


def optimize(qg: QuantGraph, fg: QuantGraph, x: torch.Tensor, scores: dict[str, np.ndarray] | None,
             cfg: EptqConfig, bias_bits: int = 32, progress: bool = True) -> tuple[QuantGraph, dict[str, Any]]:
    """Learn every layer's rounding and bias at once; returns the new graph and a log."""
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(cfg.seed)  # batches (CPU indices)
    mgen = torch.Generator(device=dev).manual_seed(cfg.seed)  # activation-quantization masks
    layers = [n.outputs[0] for n in qg.nodes if n.op in WEIGHTED_OPS]
    layer_set = set(layers)
    batch = cfg.batch_size or step_batch_size(fg, layers)
    t0 = time.perf_counter()
    shaping = {k: v for k, v in asdict(cfg).items() if k not in RUN_CONTROL}
    ckpt = Checkpoint(cfg.checkpoint_dir, qg, x, shaping) if cfg.checkpoint_dir else None
    if cfg.resume and ckpt is None:
        raise UsageError("--resume needs --checkpoint-dir (where the interrupted run saved its state)")
    float_acts = FloatActivations(fg, x, layers, memory_budget(cfg.max_memory), dev)
    attention = None if scores is None else {t: a.to(dev) for t, a in layer_attention(scores, layers, len(x)).items()}
    x = x.to(dev)
    net = FakeQuantNetwork(qg, fg, cfg.learn_scales, cfg.scope).to_device(dev)
    opt = torch.optim.Adam([
        {"params": list(net.V.values()), "lr": cfg.lr},
        {"params": list(net.bias.values()), "lr": cfg.bias_lr},
        {"params": list(net.log_gain.values()), "lr": cfg.scale_lr},
    ])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(cfg.iters, 1))))
    n_weights = sum(v.numel() for v in net.V.values())
    windows = dict(zip(net.V.keys(), hardening_windows(len(net.V), cfg), strict=True))

    def task_loss(idx: torch.Tensor, keep: float) -> torch.Tensor:
        """The EPTQ loss on one batch, relative to the loss at the start."""
        _, qa = net(x[idx], keep, mgen, layer_set)
        return eptq_loss(qa, float_acts(idx), batch_attention(attention, idx)) / loss0

    # the task loss at the start (all activations quantized) sets the regulariser's scale
    loss0 = 1.0
    with torch.no_grad():
        loss0 = float(task_loss(torch.randperm(len(x), generator=gen)[:batch], 1.0))
    loss0 = loss0 if loss0 > 0 and math.isfinite(loss0) else 1.0
    log: dict[str, Any] = {"iters": cfg.iters, "batch_size": batch, "initial_loss": loss0, "weights": n_weights, "device": str(dev),
                           "float_activations": float_acts.describe(),
                           "float_activation_bytes": float_acts.bytes, "curve": []}
    start = 0

    def state(step: int) -> dict[str, Any]:
        return {"step": step, "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
                "mgen": mgen.get_state().cpu(), "loss0": loss0, "curve": log["curve"]}

    if cfg.resume:
        st = ckpt.load()
        net.load_state_dict({k: v.to(dev) for k, v in st["net"].items()})
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        mgen.set_state(st["mgen"].to(mgen.get_state().device))
        loss0, start, log["curve"] = float(st["loss0"]), int(st["step"]), list(st["curve"])
        log["resumed_from_step"] = start
    bar = tqdm(range(start, cfg.iters), desc="eptq", unit="it", disable=not progress, leave=False,
               initial=start, total=cfg.iters)
    with interrupt_at_step_boundary() as stop:
        for step in bar:
            if stop["hit"]:
                raise interrupted(step, ckpt, state)
            if ckpt is not None and step > start and step % cfg.checkpoint_every == 0:
                ckpt.save(state(step))
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            task = task_loss(idx, min(1.0, (step + 1) / max(cfg.act_ramp * cfg.iters, 1)))
            net.settled = frozenset(k for k, (_, end) in windows.items() if step >= end)
            reg = torch.zeros((), device=dev)
            for k, v in net.V.items():
                beta = annealed_beta(step, cfg, windows[k])
                if beta is not None and k not in net.settled:
                    reg = reg + rounding_regularizer(soft_rounding(v), beta) * v.numel()
            loss = task + cfg.reg_weight * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 25 == 0 or step == cfg.iters - 1:
                reg_mean = float(reg.detach()) / n_weights
                log["curve"].append({"step": step, "task": round(float(task.detach()), 5), "reg": round(reg_mean, 5)})
                bar.set_postfix(task=f"{float(task.detach()):.4f}", reg=f"{reg_mean:.3f}")
        if ckpt is not None:
            ckpt.save(state(cfg.iters))
        # hard rounding, then a short bias-only phase absorbs the mean shift of the flips
        net.hard = True
        for v in net.V.values():
            v.requires_grad_(False)
        bias_opt = torch.optim.Adam(list(net.bias.values()), lr=cfg.bias_lr)
        for _ in range(int(cfg.bias_tune * cfg.iters)):
            if stop["hit"]:
                raise interrupted(cfg.iters, ckpt, None)
            task = task_loss(torch.randint(0, len(x), (batch,), generator=gen), 1.0)
            bias_opt.zero_grad(set_to_none=True)
            task.backward()
            bias_opt.step()
    net.hard = False
    log.update(rounding_report(net, x, float_acts, attention, layers, loss0, gen, mgen, batch_size=batch))
    g = net.finalize(qg, bias_bits)
    log["seconds"] = round(time.perf_counter() - t0, 2)
    return g, log


def fit_layer(net: FakeQuantNetwork, n, xin: torch.Tensor, target: torch.Tensor, cfg: EptqConfig, batch: int,
              gen: torch.Generator) -> dict[str, Any]:
    """AdaRound on one layer: its rounding and bias fitted to its float output from ``xin``,
    the quantized network's input to it; the layer is left hard-rounded."""
    k = net.key[n.name]
    with torch.no_grad():  # this layer's error with round-to-nearest sets the loss scale, as in optimize()
        loss0 = float((net.node_forward(n, [xin[:256]]) - target[:256].float()).pow(2).mean()) or 1.0
    opt = torch.optim.Adam([{"params": [net.V[k]], "lr": cfg.lr}, {"params": [net.bias[k]], "lr": cfg.bias_lr},
                            {"params": [net.log_gain[k]] if k in net.log_gain else [], "lr": cfg.scale_lr}])
    net.hard = False
    for step in range(cfg.iters):
        idx = torch.randint(0, len(xin), (batch,), generator=gen)
        y = net.node_forward(n, [xin[idx]])
        task = (y - target[idx].float()).pow(2).mean()
        beta = annealed_beta(step, cfg)
        reg = rounding_regularizer(soft_rounding(net.V[k]), beta) * net.V[k].numel() if beta is not None else 0.0
        loss = task / loss0 + cfg.reg_weight * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.hard = True
    with torch.no_grad():
        final = float((net.node_forward(n, [xin[:256]]) - target[:256].float()).pow(2).mean())
    return {"layer": n.name, "mse": final}


def optimize_layerwise(qg: QuantGraph, fg: QuantGraph, x: torch.Tensor, cfg: EptqConfig, bias_bits: int = 32,
                       progress: bool = True) -> tuple[QuantGraph, dict[str, Any]]:
    """The AdaRound-style ablation: one layer at a time, each fitted to its own float output.

    Same soft rounding, regulariser and per-layer iteration count as the network-wise
    run has in total; each layer sees the quantized network's input to it (earlier
    layers already hard-rounded), and its loss is its own output's squared error.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    nodes = [n for n in qg.nodes if n.op in WEIGHTED_OPS]
    layers = [n.outputs[0] for n in nodes]
    batch = cfg.batch_size or step_batch_size(fg, layers)
    f_acts = cache_float_activations(fg, x, layers, half=True)  # float16 targets, as optimize()'s
    net = FakeQuantNetwork(qg, fg, cfg.learn_scales)
    net.hard = True
    log: dict[str, Any] = {"iters_per_layer": cfg.iters, "layers": []}
    bar = tqdm(total=len(nodes), desc="adaround", unit="layer", disable=not progress, leave=False)
    # the quantized network's activations over the whole set, one node at a time: each layer is
    # fitted on its input with every earlier layer final, then its own output joins the set
    first = qg.inputs[0]
    env = {first: fake_quant(x, qg.tensors[first].quant, 1.0)}
    for n, dead in zip(qg.nodes, net.dead, strict=True):
        if n.op in WEIGHTED_OPS:
            log["layers"].append(fit_layer(net, n, env[n.inputs[0]], f_acts[n.outputs[0]], cfg, batch, gen))
            bar.update()
        with torch.no_grad():
            ins = [i for i in n.inputs if i in env]
            env[n.outputs[0]] = torch.cat([net.node_forward(n, [env[i][at:at + 128] for i in ins])
                                           for at in range(0, len(x), 128)])
        release(env, dead)
    bar.close()
    net.hard = False
    log["seconds"] = round(time.perf_counter() - t0, 2)
    return net.finalize(qg, bias_bits), log
