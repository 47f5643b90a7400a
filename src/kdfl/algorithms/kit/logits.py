"""Logit-space maps and robust logit rules, for every payload that is logit-like
(logits, soft labels, per-label logits): map the clients' uploads into an aggregation
space, aggregate coordinate-wise with any rule of :mod:`kdfl.aggregation` or with the
class-weighted mean / median / trimmed mean, and map the aggregate back to teacher
probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

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
