"""Logit-space maps and robust logit rules, for every payload that is logit-like
(logits, soft labels, per-label logits): map the clients' uploads into an aggregation
space, aggregate coordinate-wise with any rule of :mod:`kdfl.aggregation` or with the
class-weighted mean / median / trimmed mean, and map the aggregate back to teacher
probabilities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from kdfl.aggregation import aggregate_tensors, make_aggregator
from kdfl.rng import generator
from kdfl.spec import parse_spec
from kdfl.types import KdflError, Task

SPACES = ("logits", "centered", "standardized", "logprobs", "probs")


def to_space(z: Tensor, space: str, temperature: float) -> Tensor:
    """Map client logits (K, n, C) into the space where they are aggregated."""
    if space == "logits":
        return z
    if space == "centered":
        return z - z.mean(-1, keepdim=True)
    if space == "standardized":
        c = z - z.mean(-1, keepdim=True)
        return c / c.std(-1, keepdim=True).clamp_min(1e-6)
    if space == "logprobs":
        return torch.log_softmax(z / temperature, -1)
    return torch.softmax(z / temperature, -1)


def to_probs(agg: Tensor, space: str, temperature: float) -> Tensor:
    """Teacher probabilities q (n, C) from an aggregate in ``space``."""
    if space == "logprobs":
        return torch.softmax(agg, -1)
    if space == "probs":
        p = agg.clamp_min(0)
        s = p.sum(-1, keepdim=True)
        uniform = torch.full_like(p, 1.0 / p.shape[-1])
        return torch.where(s > 0, p / s.clamp_min(1e-12), uniform)  # median of probs need not sum to 1
    return torch.softmax(agg / temperature, -1)


def class_shares(counts: Tensor) -> Tensor:
    """Each client's label distribution (K, C): counts normalised per client, so a client's
    total weight over all classes is 1 whatever it claims (bounded influence)."""
    c = counts.double().clamp_min(0)
    return c / c.sum(-1, keepdim=True).clamp_min(1.0)


def class_weighted_mean(x: Tensor, shares: Tensor) -> Tensor:
    """Per-class weighted mean: column c of client k weighs its share of class c
    (FedAD-style class-count weighting). x: (K, n, C), shares: (K, C) -> (n, C)."""
    w = (shares + 1e-6).to(x.dtype)  # a class nobody holds falls back to a uniform mean
    return (x * w[:, None, :]).sum(0) / w.sum(0)[None, :]


def class_weighted_median(x: Tensor, shares: Tensor) -> Tensor:
    """Per-class weighted median: for column c, the value where the cumulative weight of
    the sorted clients (weights = their share of class c) first reaches half.

    Under label skew only a few clients know class c; an unweighted median lets the
    majority that never saw c outvote them. x: (K, n, C), shares: (K, C) -> (n, C).
    """
    w = (shares + 1e-6).to(x.dtype)[:, None, :].expand_as(x)  # (K, n, C)
    xs, order = x.sort(0)
    cw = w.gather(0, order).cumsum(0)  # (K, n, C)
    k = (cw < 0.5 * cw[-1:]).sum(0, keepdim=True).clamp_max(x.shape[0] - 1)  # first index reaching half
    return xs.gather(0, k).squeeze(0)


def class_weighted_trimmed_mean(x: Tensor, shares: Tensor, beta: float = 0.1) -> Tensor:
    """Per-class weighted trimmed mean: per column, sort the clients, drop the lowest and
    the highest ``beta`` fraction of the column's *weight* (partially cutting the client
    on each boundary) and average the rest by weight. ``beta = 0`` is the weighted mean.
    x: (K, n, C), shares: (K, C) -> (n, C)."""
    w = (shares + 1e-6).to(x.dtype)[:, None, :].expand_as(x)
    xs, order = x.sort(0)
    ws = w.gather(0, order)
    hi = ws.cumsum(0) / ws.sum(0, keepdim=True)  # each client's weight interval [lo, hi] in (0, 1]
    lo = hi - ws / ws.sum(0, keepdim=True)
    keep = (torch.minimum(hi, torch.full_like(hi, 1 - beta)) - torch.maximum(lo, torch.full_like(lo, beta))).clamp_min(0)
    return (xs * keep).sum(0) / keep.sum(0).clamp_min(1e-12)


CLASS_WEIGHTED_RULES = ("mean", "median", "trimmed_mean")


def check_rule(aggregator: str, class_weighting: bool) -> None:
    """Fail at config time on an unknown rule, or a rule without a class-weighted form."""
    name, hyper = parse_spec(aggregator)
    make_aggregator(name, **hyper)
    if class_weighting and name not in CLASS_WEIGHTED_RULES:
        raise KdflError("algorithm.class_weighting works with the 'mean', 'median' and 'trimmed_mean' "
                        f"aggregators, not {name!r}; set class_weighting = false for other rules")


def aggregate_logits(x: Tensor, aggregator: str, weights: Sequence[float] | Tensor,
                     counts: Tensor | None = None) -> Tensor:
    """Aggregate per-client logit-like tensors x (K, n, C) coordinate-wise.

    Args:
        x: the clients' uploads, already in the aggregation space.
        aggregator: a rule spec ("median", "trimmed_mean:beta=0.2", "krum:f=2", ...).
        weights: per-client weights (K,) for the plain rules (e.g. examples).
        counts: per-client label counts (K, C): when given, column c of client k weighs
            its share of class c (mean, median and trimmed mean only).
    """
    name, hyper = parse_spec(aggregator)
    if counts is not None:
        shares = class_shares(counts)
        if name == "trimmed_mean":
            return class_weighted_trimmed_mean(x, shares, **{"beta": 0.1, **hyper})
        return (class_weighted_mean if name == "mean" else class_weighted_median)(x, shares)
    return aggregate_tensors(make_aggregator(name, **hyper), list(x), torch.as_tensor(weights))


def public_rows(task: Task, size: int, stream: str, round_num: int) -> Tensor:
    """The sorted rows of the public (proxy) set used in ``round_num``: ``size`` rows
    drawn from (run seed, ``stream``, round), or all of them when ``size`` is 0 or at
    least the set's size. Every algorithm that works on a fresh public subset per round
    (FedMD's alignment set, DS-FL's open subset, FedAD's, FedEMA-Distill's) uses it."""
    assert task.proxy is not None
    n = len(task.proxy)
    if not size or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator(task.seed, stream, round_num))[:size].sort().values


def same_architecture(models: Sequence[nn.Module]) -> bool:
    """Whether ``models`` share one architecture: the same class and the same names and
    shapes of their weights and buffers (what one vectorized pass needs)."""
    first = models[0].state_dict()
    shapes = [(k, tuple(v.shape), v.dtype) for k, v in first.items()]
    return all(type(m) is type(models[0])
               and [(k, tuple(v.shape), v.dtype) for k, v in m.state_dict().items()] == shapes for m in models[1:])


@torch.no_grad()
def stacked_logits(template: nn.Module, stacked: Mapping[str, Tensor], x: Tensor,
                   batch_size: int | None = None) -> Tensor:
    """Logits of K same-architecture models on the same inputs in one vectorized pass:
    ``torch.func.vmap`` of ``template`` over weights stacked along a leading client axis.

    For the clients of one round that upload logits on the same proxy rows (their
    executor holds their trained weights stacked already), and for a server's teachers
    (:func:`kdfl.algorithms.kit.distill.teacher_logits`). Eval mode, float32, on the CPU;
    equal to a loop of :func:`kdfl.train.predict` up to float rounding (vmap turns
    convolutions into grouped ones). On one CPU thread the loop was measured 2-3x faster
    (benchmarks/round_cost.py's notes), on an accelerator one pass is the point.

    Args:
        template: a module of the architecture (its own weights are not used).
        stacked: every entry of the architecture's state dict, (K, *shape).
        x: (N, *input_shape) inputs shared by all K models.
        batch_size: inputs per pass (None: :func:`kdfl.train.eval_batch_size` over K).

    Returns:
        (K, N, C) logits.
    """
    from torch.func import functional_call, vmap

    from kdfl.train import eval_batch_size

    k = len(next(iter(stacked.values())))
    device = next(iter(stacked.values())).device
    if batch_size is None:
        batch_size = 2048 if device.type == "cuda" else max(1, eval_batch_size(template, x) // k)
    names = dict(template.named_parameters())
    params = {n: v for n, v in stacked.items() if n in names}
    buffers = {n: v for n, v in stacked.items() if n not in names}
    was_training = template.training
    template.eval()
    try:
        def one(p: dict[str, Tensor], b: dict[str, Tensor], xb: Tensor) -> Tensor:
            return functional_call(template, (p, b), (xb,))  # type: ignore[no-any-return]

        run = vmap(one, in_dims=(0, 0, None))
        outs = [run(params, buffers, x[s : s + batch_size].to(device)).float().cpu()
                for s in range(0, len(x), batch_size)]
    finally:
        template.train(was_training)
    return torch.cat(outs, 1) if outs else torch.zeros(k, 0, 0)


def models_logits(models: Sequence[nn.Module], x: Tensor, vectorize: bool | None = None) -> Tensor:
    """Each model's logits on ``x``, (K, N, C): one vectorized pass
    (:func:`stacked_logits`) when ``vectorize`` and the models share an architecture, else
    a loop of :func:`kdfl.train.predict`. ``vectorize=None`` vectorizes on an accelerator
    only (on the CPU the loop is faster)."""
    from kdfl.train import predict

    if not models:
        return torch.zeros(0, len(x), 0)
    device = next(models[0].parameters()).device
    if vectorize is None:
        vectorize = device.type != "cpu"
    if vectorize and len(models) > 1 and same_architecture(models):
        states = [m.state_dict() for m in models]
        stacked = {k: torch.stack([sd[k] for sd in states]) for k in states[0]}
        return stacked_logits(models[0], stacked, x)
    return torch.stack([predict(m, x) for m in models])
