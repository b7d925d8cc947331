"""Label-free Hessian scores (EPTQ's sample-layer attention) and weight Hessian diagonals.

For sample n and layer l, EPTQ bounds the effect of a perturbation of the layer's
activation a_l on the network output f by the Gauss-Newton term J_l^T J_l, and
estimates its trace with Hutchinson's method: draw v over the output, backpropagate
<v, f(x_n)> to a_l, and average ||J_l^T v||^2 over the draws. No labels, no task loss.

Two choices make it cheap:
- one forward pass and one backward pass per draw serve *every* layer at once, for
  a whole batch (each sample's activation gradient depends only on its own v);
- when the output has no more entries than the requested draws, the draws are the
  output's basis vectors with random signs: the expectation is then computed
  exactly (E[(J^T v)^2] = sum_k (J^T e_k)^2), with no Monte Carlo noise.

The same backward passes give the weights' Gauss-Newton diagonal for the
Hessian-weighted threshold search: with independent signs per sample the cross
terms of a batch gradient vanish in expectation, so the squared batch gradient is
an unbiased estimate of the sum of per-sample squared gradients.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .float_exec import run_float, unpack
from .graph import WEIGHTED_OPS, QuantGraph

#: outputs of at most this many entries get the exact expectation (one signed basis vector each)
EXACT_OUTPUTS = 32
#: Rademacher probes per batch above that (an ImageNet classifier's 1,000 logits, a detector's heads):
#: each costs a backward pass of the whole network (32 would make EfficientNet-Lite0's pass ~15 minutes: 1.8 s per image, measured)
MONTE_CARLO_DRAWS = 8


#: the pass's work where only averages over the samples are used (HMSE's weight Hessians, a weight budget's
#: sensitivities), in samples x probes x activation values: every CIFAR ResNet's 1,024 images stay within it,
#: a 224x224 classifier's average is taken over ~160 of its images (the pass was a fifth of EfficientNet-Lite0's
#: EPTQ time over 500); at least ``AVERAGE_MIN_SAMPLES``
AVERAGE_VALUES = 2**33
AVERAGE_MIN_SAMPLES = 64


def averaged_samples(g: QuantGraph, n: int, n_draws: int | None = None) -> int:
    """How many of ``n`` samples the pass needs where only averages over them are used (not EPTQ's
    per-sample attention): all of them while the work stays within ``AVERAGE_VALUES``, else fewer."""
    layers = [nd.outputs[0] for nd in g.nodes if nd.op in WEIGHTED_OPS]
    probes = draw_count(g.values_per_sample(list(g.outputs)), n_draws)[0]
    return min(n, max(AVERAGE_MIN_SAMPLES, AVERAGE_VALUES // max(g.values_per_sample(layers) * probes, 1)))


def draw_count(outputs: int, n_draws: int | None) -> tuple[int, bool]:
    """(probes, exact) for an output of ``outputs`` entries: exact where it has no more entries than
    ``n_draws`` (default ``EXACT_OUTPUTS``), else ``n_draws`` (default ``MONTE_CARLO_DRAWS``) random probes."""
    if outputs <= (EXACT_OUTPUTS if n_draws is None else n_draws):
        return outputs, True
    return (MONTE_CARLO_DRAWS if n_draws is None else n_draws), False


def _draws(out: torch.Tensor, n_draws: int | None, gen: torch.Generator) -> list[torch.Tensor]:
    """Probe vectors over the output (B x K): signed basis vectors where ``draw_count`` says exact, else Rademacher."""
    b, k = out.shape[0], out[0].numel()
    count, exact = draw_count(k, n_draws)
    if exact:
        vs = []
        for j in range(k):
            v = torch.zeros(b, k)
            v[:, j] = torch.randint(0, 2, (b,), generator=gen).float() * 2 - 1
            vs.append(v.reshape(out.shape))
        return vs
    return [(torch.randint(0, 2, (b, k), generator=gen).float() * 2 - 1).reshape(out.shape) for _ in range(count)]


def hessian_scores(g: QuantGraph, batches: Iterable[torch.Tensor], *, n_draws: int | None = None, seed: int = 0,
                   weights: bool = True, progress: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-sample scores of every weighted layer's output, and weight Hessian diagonals.

    Returns ``(scores, weight_hessians)``: ``scores[layer_output]`` has one value per
    sample (the squared Jacobian-vector product averaged over the tensor's spatial
    positions, then its largest channel, as the reference implementation reduces it);
    ``weight_hessians[weight_name]`` has the weight's shape (empty if ``weights`` is False).
    """
    gen = torch.Generator().manual_seed(seed)
    layers = [n.outputs[0] for n in g.nodes if n.op in WEIGHTED_OPS]
    wnames = [n.inputs[1] for n in g.nodes if n.op in WEIGHTED_OPS]
    scores: dict[str, list[torch.Tensor]] = {t: [] for t in layers}
    whess = {w: torch.zeros(g.tensors[w].data.shape, dtype=torch.float64) for w in wnames} if weights else {}
    params = {w: torch.from_numpy(g.tensors[w].data).clone().requires_grad_(weights) for w in wnames}
    count = 0
    batches = list(batches)
    for x in tqdm(batches, desc="hessian", unit="batch", disable=not progress, leave=False):
        acts: dict[str, torch.Tensor] = {}

        def keep(name: str, y: torch.Tensor, acts: dict[str, torch.Tensor] = acts) -> None:
            if name in scores:
                acts[name] = y

        x = x.detach().clone().requires_grad_(True)  # gives every activation a grad_fn
        # several outputs (a detector's heads) are one output vector: the Hessian sees every head
        out = torch.cat([o.reshape(o.shape[0], -1) for o in unpack(run_float(g, x, weights=params, hook=keep))], 1)
        vs = _draws(out, n_draws, gen)
        acc = {t: torch.zeros(x.shape[0], *acts[t].shape[1:]) for t in layers}
        inputs = [acts[t] for t in layers] + ([params[w] for w in wnames] if weights else [])
        for i, v in enumerate(vs):
            grads = torch.autograd.grad((out * v).sum(), inputs, retain_graph=i < len(vs) - 1)
            for t, gr in zip(layers, grads[: len(layers)], strict=True):
                acc[t] += gr.detach() ** 2
            if weights:
                for w, gr in zip(wnames, grads[len(layers):], strict=True):
                    whess[w] += gr.detach().double() ** 2
        scale = 1.0 if draw_count(out[0].numel(), n_draws)[1] else 1.0 / len(vs)  # exact sum, or Monte Carlo mean
        for t in layers:
            a = acc[t] * scale
            red = a.mean(dim=tuple(range(2, a.dim()))) if a.dim() > 2 else a  # spatial mean
            scores[t].append(red.reshape(a.shape[0], -1).amax(1))  # largest channel
        count += x.shape[0]
    out_scores = {t: torch.cat(v).numpy() for t, v in scores.items()}
    out_w = {w: (h * scale / max(count, 1)).numpy() for w, h in whess.items()}
    return out_scores, out_w
