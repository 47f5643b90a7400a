"""Loss builders. A loss is ``loss(logits, batch, params) -> scalar``.

``batch`` is the :class:`Batch` being trained on (``idx`` lets a loss look up
precomputed per-sample targets, e.g. teacher logits); ``params`` are the model's named
parameters (a dict, so the same loss works with ``torch.func.functional_call``).
Algorithms compose these instead of writing training loops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfl.types import StateDict


class Batch(NamedTuple):
    x: Tensor  # (B, *input_shape)
    y: Tensor  # (B,)
    idx: Tensor  # (B,) positions in the client's data set


Loss = Callable[[Tensor, Batch, Mapping[str, Tensor]], Tensor]


def cross_entropy() -> Loss:
    """Plain cross-entropy on the batch labels."""

    def loss(logits: Tensor, batch: Batch, params: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(logits, batch.y)

    return loss


def proximal(base: Loss, anchor: StateDict, mu: float) -> Loss:
    """``base + (mu/2)·||w - anchor||²`` over the trainable parameters (FedProx, μ)."""
    if mu == 0:
        return base

    def loss(logits: Tensor, batch: Batch, params: Mapping[str, Tensor]) -> Tensor:
        prox = sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())
        return base(logits, batch, params) + 0.5 * mu * prox

    return loss


def kd_kl(student_logits: Tensor, teacher_probs: Tensor, temperature: float, t2: bool = True) -> Tensor:
    """``T²·KL(q ‖ softmax(s/T))`` averaged over the batch (Hinton et al., 2015).

    Args:
        student_logits: (B, C).
        teacher_probs: (B, C) target distribution q (already softened by T).
        temperature: T.
        t2: multiply by T² so gradient scale does not shrink with T (FedDF's code omits it).
    """
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    kl = F.kl_div(log_p, teacher_probs, reduction="batchmean")
    return kl * (temperature**2 if t2 else 1.0)


def soft_targets(teacher_logits: Tensor, temperature: float) -> Tensor:
    """softmax(z/T) for teacher logits (…, C)."""
    return torch.softmax(teacher_logits / temperature, dim=-1)
