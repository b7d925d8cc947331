"""Calibration: activation statistics and quantization-grid (threshold) search.

Every grid is chosen under the profile's constraints: bits, signed or unsigned,
symmetric (zero point 0) or asymmetric, power-of-two or free scales, narrow or full
weight range. The default criterion is the mean squared quantization error (MSE)
over the representative values; weights are searched per output channel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .graph import QParams

_ALPHAS = 64  # candidate clipping ratios per search
_LOW_ALPHAS = 16  # extra weight clipping ratios below 0.25 (``search_weight_grid``)


@dataclass
class ActStats:
    """Running min/max plus a bounded random sample of a tensor's values."""

    lo: float = math.inf
    hi: float = -math.inf
    sample: list[torch.Tensor] | None = None
    channel: list[torch.Tensor] | None = None  # each sampled value's channel (axis 1), where the rank gives one
    channel_sum: torch.Tensor | None = None  # exact per-channel (axis 1) sums over every value seen (float64)
    per_channel_count: int = 0  # values summed into each channel

    def update(self, x: torch.Tensor, per_batch: int, gen: torch.Generator) -> None:
        x = x.detach().float()
        shape = x.shape
        if len(shape) >= 2:
            sums = x.transpose(0, 1).reshape(shape[1], -1).sum(1, dtype=torch.float64)
            self.channel_sum = sums if self.channel_sum is None else self.channel_sum + sums
            self.per_channel_count += x.numel() // shape[1]
        x = x.reshape(-1)
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        if self.sample is None:
            self.sample, self.channel = [], []
        idx = torch.randint(0, x.numel(), (per_batch,), generator=gen) if x.numel() > per_batch else torch.arange(x.numel())
        self.sample.append(x[idx].clone())
        if len(shape) >= 2:
            inner = int(math.prod(shape[2:]))
            self.channel.append((idx // inner) % shape[1])

    def _subset(self, n: int, limit: int, seed: int) -> torch.Tensor | None:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit] if n > limit else None

    def values(self, limit: int = 1 << 15, seed: int = 0) -> torch.Tensor:
        """The sampled values, at most ``limit`` of them (a seeded random subset)."""
        v = torch.cat(self.sample) if self.sample else torch.zeros(1)
        pick = self._subset(v.numel(), limit, seed)
        return v if pick is None else v[pick]

    def channels(self, limit: int = 1 << 15, seed: int = 0) -> torch.Tensor | None:
        """The channel of each value ``values`` returns (same subset), or None where not recorded."""
        if not self.sample or not self.channel or len(self.channel) != len(self.sample):
            return None
        c = torch.cat(self.channel)
        pick = self._subset(c.numel(), limit, seed)
        return c if pick is None else c[pick]

    def channel_mean(self) -> np.ndarray | None:
        """Mean of every channel (axis 1) over all values seen, or None for a tensor without channels."""
        if self.channel_sum is None or not self.per_channel_count:
            return None
        return (self.channel_sum / self.per_channel_count).numpy()

    def merge(self, other: ActStats) -> ActStats:
        both = (self.channel or []) + (other.channel or [])
        whole = len(both) == len(self.sample or []) + len(other.sample or [])
        return ActStats(min(self.lo, other.lo), max(self.hi, other.hi), (self.sample or []) + (other.sample or []),
                        both if whole else None)


def _quant_error(v: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int,
                 then: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of quantizing v (K values) on each candidate grid (scale, zp of shape (A,)) -> (A,), measured
    after ``then`` where given (the function every consumer applies), each value's error times its
    ``weight`` where given."""
    out = []
    ref = v[None, :] if then is None else then(v[None, :])
    for i in range(0, len(scale), 32):  # chunks keep the (candidates x values) matrix small
        s, z = scale[i:i + 32, None], zp[i:i + 32, None]
        q = (torch.clamp(torch.round(v[None, :] / s) + z, qmin, qmax) - z) * s
        e = ((q if then is None else then(q)) - ref).pow(2)
        out.append((e if weight is None else e * weight[None, :]).mean(1))
    return torch.cat(out)


def pow2_exponent(x: float) -> int:
    """Smallest e with 2**e >= x."""
    return int(math.ceil(math.log2(max(x, 2.0**-126))))


def search_activation_grid(stats: ActStats, bits: int, *, symmetric: bool, power_of_two: bool,
                           signedness: str, then: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           importance: torch.Tensor | None = None, span: float | None = None) -> QParams:
    """Per-tensor activation grid minimising MSE over the sampled values.

    ``then``: the function every consumer of the tensor applies (a sigmoid, SiLU): the error is
    measured after it, so values it saturates may be clipped (a conv's long negative tail before a
    SiLU costs nothing once clipped, and would otherwise coarsen the grid of every other value).
    ``importance``: one weight per channel (axis 1), how much an error there moves the next layer's
    output (``ptq.channel_importance``): a channel of small values that the next layer multiplies by
    large weights then keeps its resolution instead of being rounded away for a channel of large
    values that the next layer nearly ignores.
    ``span``: the input magnitude beyond which ``then`` no longer changes (a sigmoid's): grids covering
    only +-span are candidates too, however far the values reach (a detector's no-object logits at
    -10^4 would otherwise leave only grids far coarser than the scores that matter).
    """
    lo, hi = min(stats.lo, 0.0), max(stats.hi, 0.0)
    ranges = [(lo, hi)] + ([(max(lo, -span), min(hi, span))] if span is not None and max(-lo, hi) > span else [])
    signed = {"signed": True, "unsigned": False}.get(signedness, lo < 0)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    v = stats.values().double()
    ch = stats.channels() if importance is not None else None
    weight = None if ch is None or int(ch.max()) >= len(importance) else importance.double()[ch]
    if hi - lo <= 0:
        e = 0
        return QParams(bits, signed, [1.0], [0 if symmetric else qmin], exponent=[e] if power_of_two else None)
    if symmetric:
        # real zero at code 0: the grid covers [qmin*s, qmax*s]; pick s. With "auto" signedness a tensor
        # whose negatives are few and small (a SiLU's, down to -0.28) is also tried unsigned: clipping them
        # can cost less than halving the resolution of everything else
        best: tuple[float, QParams] | None = None
        for sign in ([signed, False] if signed and hi > 0 and signedness not in ("signed", "unsigned") else [signed]):
            lo_q, hi_q = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sign else (0, 2**bits - 1)
            needs = [max(h / hi_q, -lw / -lo_q) if sign else h / hi_q for lw, h in ranges]
            if power_of_two:
                e0s = sorted({pow2_exponent(n) for n in needs})
                exps = torch.tensor(sorted({e for e0 in e0s for e in range(e0 - 4, e0 + 1)}), dtype=torch.float64)
                scales = torch.pow(2.0, exps)
            else:
                scales = torch.cat([n * torch.linspace(0.2, 1.0, _ALPHAS, dtype=torch.float64) for n in needs])
            err = _quant_error(v, scales, torch.zeros_like(scales), lo_q, hi_q, then, weight)
            i = int(torch.argmin(err))
            if best is None or float(err[i]) < best[0]:
                best = (float(err[i]), QParams(bits, sign, [float(scales[i])], [0],
                                               exponent=[int(exps[i])] if power_of_two else None))
        return best[1]
    # asymmetric: shrink both ends independently, zero point rounds real zero onto the grid
    k = 20
    a = torch.linspace(0.3, 1.0, k, dtype=torch.float64)
    his = torch.cat([(h * a)[:, None].expand(k, k).reshape(-1) for _, h in ranges])
    los = torch.cat([(lw * a)[None, :].expand(k, k).reshape(-1) for lw, _ in ranges])
    scales = ((his - los) / (qmax - qmin)).clamp_min(1e-12)
    scales = scales.float().double()  # the file stores float32 scales
    zps = torch.round(qmin - los / scales).clamp(qmin, qmax)
    err = _quant_error(v, scales, zps, qmin, qmax, then, weight)
    i = int(torch.argmin(err))
    return QParams(bits, signed, [float(scales[i])], [int(zps[i])])


def search_weight_grid(w: np.ndarray, bits: int, *, per_channel: bool, power_of_two: bool, narrow: bool,
                       hessian: np.ndarray | None = None) -> tuple[QParams, np.ndarray]:
    """Symmetric weight grid (zero point 0) and the rounded integers, per output channel.

    ``hessian`` (same shape as ``w``, optional) weights the squared error of each
    weight; without it every weight counts equally (plain MSE).
    """
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if narrow else -(2 ** (bits - 1))
    W = torch.from_numpy(w.astype(np.float64)).reshape(w.shape[0] if per_channel else 1, -1)
    H = torch.ones_like(W) if hessian is None else torch.from_numpy(hessian.astype(np.float64)).reshape(W.shape)
    m = W.abs().amax(1).clamp_min(1e-12)  # (C,)
    if power_of_two:
        e0 = torch.ceil(torch.log2(m / qmax))
        cand = torch.stack([e0 - k for k in range(4)], 0)  # (A, C)
        scales = torch.pow(2.0, cand)
    else:
        # below a quarter of the largest weight only 2- and 3-bit grids can gain (a heavy-tailed channel's
        # best 2-bit step is near its standard deviation); tried after the others, so a tie keeps the wider grid
        alphas = torch.cat([torch.linspace(0.25, 1.0, _ALPHAS, dtype=torch.float64),
                            torch.linspace(0.05, 0.25, _LOW_ALPHAS + 1, dtype=torch.float64)[:-1]])
        scales = alphas[:, None] * m[None, :] / qmax
        scales = scales.float().double()
    # one candidate at a time (a (channels x weights) array alive, not candidates times that: a large
    # layer's weights times 64 candidates would not fit in memory); ties keep the first, as argmin does
    best_err = torch.full((W.shape[0],), math.inf, dtype=torch.float64)
    best = torch.zeros(W.shape[0], dtype=torch.long)
    q_best = torch.zeros_like(W)
    for a in range(scales.shape[0]):
        q = torch.clamp(torch.round(W / scales[a, :, None]), qmin, qmax)
        err = ((q * scales[a, :, None] - W).pow(2) * H).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, a, best)
        q_best[better] = q[better]
    idx = torch.arange(W.shape[0])
    s = scales[best, idx]
    wq = q_best.reshape(w.shape).numpy().astype(np.int8 if bits <= 8 else np.int16)
    zeros = np.zeros(s.numel(), np.int64)
    exps = cand[best, idx].numpy().astype(np.int64) if power_of_two else None
    return (
        QParams(bits, True, s.numpy().astype(np.float32), zeros, axis=0 if per_channel else None, narrow=narrow, exponent=exps),
        wq,
    )


def quantize_bias(b: np.ndarray, s_in: float, s_w: np.ndarray, bits: int = 32) -> tuple[QParams, np.ndarray]:
    """Bias as integers at scale s_in * s_w[c], zero point 0, as integer kernels expect."""
    sb = np.float64(np.float32(s_in)) * s_w.astype(np.float64)
    lim = 2 ** (bits - 1) - 1
    bq = np.clip(np.round(b.astype(np.float64) / sb), -lim, lim).astype(np.int32)
    return QParams(bits, True, sb.astype(np.float32), np.zeros(len(sb), np.int64), axis=0), bq
