"""Losses of client programs. A loss is ``loss(out, batch, consts) -> scalar``.

``out`` (:class:`Outputs`) holds what the phase's models produced on the batch: logits,
and features or activations where the phase asks for them, per model name, plus each
model's named parameters (for proximal terms) and ``out.head(model, z)`` to apply a
model's classifier head to other inputs (FedGen's generated latents). ``batch`` is the
:class:`Batch` (inputs, labels when the data has them, positions, per-sample targets);
``consts`` are the phase's per-client constants (FedProx's anchor weights, FD's global
per-label logits, ...).

Losses are frozen dataclasses: equal settings give equal (and hashable) loss values,
which is how an executor knows that two clients train the same function and can be
batched (the per-client tensors travel in ``consts`` and the data, never inside the
loss). A loss written as a plain function also works; it is then batched only with
clients that got the very same function object.

A loss that is not a batch mean of per-sample terms (FedKD's weight ``1/(L_T + L_S)`` of
the batch's losses) says so with a class attribute ``per_sample_mean = False``: the
vectorized executor then never pads its batches (it only stacks clients with equal batch
sizes) instead of relying on its numerical check, which near-uniform outputs at
initialisation can pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

MAIN = "model"  # the name of a single-model program's model


class Batch(NamedTuple):
    x: Tensor  # (B, *input_shape)
    y: Tensor | None  # (B,) labels, None on unlabeled (public) data
    idx: Tensor  # (B,) positions in the phase's data
    targets: Mapping[str, Tensor] = {}  # per-sample targets of the phase's data, (B, ...)


class Outputs:
    """The models' outputs on one batch, by model name.

    Args:
        values: model name -> {"logits": (B, C), "features": (B, D), "activations": [...]}.
        params: model name -> that model's named parameters.
        call: ``call(model, method, *args)`` runs a method of a model (``head``) with the
            model's current parameters (a functional call under the vectorized executor).
    """

    __slots__ = ("_values", "_params", "_call")

    def __init__(self, values: Mapping[str, Mapping[str, Any]], params: Mapping[str, Mapping[str, Tensor]],
                 call: Callable[..., Tensor]) -> None:
        self._values, self._params, self._call = values, params, call

    def logits(self, model: str = MAIN) -> Tensor:
        return self._values[model]["logits"]  # type: ignore[no-any-return]

    def features(self, model: str = MAIN) -> Tensor:
        """(B, feature_dim); the phase must list "features" in ``Phase.outputs``."""
        return self._values[model]["features"]  # type: ignore[no-any-return]

    def activations(self, model: str = MAIN) -> list[Tensor]:
        """Spatial activations of a convolutional model; needs "activations" in ``Phase.outputs``."""
        return self._values[model]["activations"]  # type: ignore[no-any-return]

    def params(self, model: str = MAIN) -> Mapping[str, Tensor]:
        return self._params[model]

    def head(self, model: str, z: Tensor) -> Tensor:
        """``model``'s classifier head applied to latents ``z`` (B', feature_dim)."""
        return self._call(model, "head", z)

    def apply(self, model: str, x: Tensor) -> Tensor:
        """``model`` run on ``x`` (its forward): an adapter of the phase (``Phase.adapters``),
        e.g. FedKD's learned projection of one model's features into another's."""
        return self._call(model, "forward", x)


class Loss(Protocol):
    def __call__(self, out: Outputs, batch: Batch, consts: Mapping[str, Any]) -> Tensor: ...


@dataclass(frozen=True)
class CrossEntropy:
    """Cross-entropy of ``model``'s logits on the batch labels."""

    model: str = MAIN

    def __call__(self, out: Outputs, batch: Batch, consts: Mapping[str, Any]) -> Tensor:
        assert batch.y is not None, "cross-entropy needs labelled data"
        return F.cross_entropy(out.logits(self.model), batch.y)


@dataclass(frozen=True)
class Proximal:
    """``(mu/2)·||w - anchor||²`` over ``model``'s parameters (FedProx's μ); the anchor
    weights are the constant named ``anchor``."""

    mu: float
    anchor: str = "anchor"
    model: str = MAIN

    def __call__(self, out: Outputs, batch: Batch, consts: Mapping[str, Any]) -> Tensor:
        anchor = consts[self.anchor]
        prox = sum(((p - anchor[k]) ** 2).sum() for k, p in out.params(self.model).items())
        return 0.5 * self.mu * prox  # type: ignore[return-value]


@dataclass(frozen=True)
class Sum:
    """The sum of loss terms, in order."""

    terms: tuple[Loss, ...]

    def __call__(self, out: Outputs, batch: Batch, consts: Mapping[str, Any]) -> Tensor:
        total = self.terms[0](out, batch, consts)
        for term in self.terms[1:]:
            total = total + term(out, batch, consts)
        return total


KL_REDUCTIONS = ("mean", "batchmean")


def mutual_kl(target_logits: Tensor, logits: Tensor, temperature: float = 1.0, reduction: str = "batchmean",
              detach_target: bool = True) -> Tensor:
    """``T²·KL(softmax(target/T) ‖ softmax(logits/T))`` between two models' logits, the
    mutual-distillation term of FML and FedKD. ``reduction``: ``"batchmean"``, the batch
    mean of the per-sample KL; ``"mean"``, ``nn.KLDivLoss()``'s default, the mean over the
    B·C elements (1/C of it, what PFLlib and the FedKD authors use). ``detach_target``
    stops gradients into the target (written out, so the vectorized executor's vmap
    batches it)."""
    t = temperature
    log_q = F.log_softmax((target_logits.detach() if detach_target else target_logits) / t, -1)
    log_p = F.log_softmax(logits / t, -1)
    per = log_q.exp() * (log_q - log_p)  # (B, C)
    return (per.mean() if reduction == "mean" else per.sum(-1).mean()) * (t * t)


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
