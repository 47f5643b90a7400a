"""Evaluation metrics: accuracy, NLL, ECE (15 equal-width bins), rounds-to-target."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Top-1 accuracy. logits: (n, C), y: (n,)."""
    return float((logits.argmax(-1) == y).float().mean()) if len(y) else float("nan")


def nll(logits: Tensor, y: Tensor) -> float:
    """Mean negative log-likelihood of the true class."""
    return float(F.cross_entropy(logits.double(), y)) if len(y) else float("nan")


def ece(logits: Tensor, y: Tensor, bins: int = 15) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins.

    ECE = Σ_m (|B_m|/n)·|acc(B_m) − conf(B_m)|, confidence = max softmax probability,
    bin m = (m/bins, (m+1)/bins] (Guo et al., 2017; the widely used 15-bin convention).
    """
    if len(y) == 0:
        return float("nan")
    probs = torch.softmax(logits.double(), dim=-1)
    conf, pred = probs.max(-1)
    correct = (pred == y).double()
    # bin index b with conf in (b/bins, (b+1)/bins]; ceil(conf*bins)-1, conf==0 goes to bin 0
    idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, correct)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, conf)
    return float((acc_sum - conf_sum).abs().sum() / len(y))


def rounds_to_target(rounds: Sequence[int], accuracies: Sequence[float], target: float | None) -> int | None:
    """The first evaluated round whose accuracy is ≥ target, or None if never reached."""
    if target is None:
        return None
    for r, a in zip(rounds, accuracies, strict=True):
        if not math.isnan(a) and a >= target:
            return int(r)
    return None
