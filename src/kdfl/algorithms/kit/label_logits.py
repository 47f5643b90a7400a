"""Per-label logits: the (C, C) payloads of FD and FedGen's FedDistill.

Row l of a client's upload is the average logit vector of its training samples of label
l (tracked during local training: ``Phase(track=LabelLogits(C))`` and the ``Tracked``
upload of :mod:`kdfl.algorithms.program`). This module holds what the algorithms share on
both sides: the teacher lookup inside a loss (:func:`label_onehot`), the checks of an
upload, and the per-label aggregation over the clients that hold each label (any weights:
presence or label counts; mean, median or trimmed mean).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfl.aggregation import make_aggregator
from kdfl.algorithms.kit.logits import aggregate_logits
from kdfl.spec import parse_spec
from kdfl.types import KdflError, Payload, PayloadError

WEIGHTINGS = ("clients", "counts")
RULES = ("mean", "median", "trimmed_mean")


def label_onehot(y: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(..., B, C) one-hot rows of the labels ``y`` (..., B). ``onehot @ table`` picks row
    ``y_i`` of a per-label table (C, ...) for every sample: a matmul, so the lookup is the
    same under the vectorized executor's ``vmap`` as in the reference loop."""
    return (y.unsqueeze(-1) == torch.arange(num_classes, device=y.device)).to(dtype)


def check_rule(aggregator: str) -> None:
    """Fail at config time unless ``aggregator`` is a per-coordinate rule this module
    applies label by label over the holders (mean, median, trimmed mean)."""
    name, hyper = parse_spec(aggregator)
    make_aggregator(name, **hyper)
    if name not in RULES:
        raise KdflError(f"algorithm.aggregator {aggregator!r}: per-label logits are aggregated over the clients "
                        f"that hold each label with {', '.join(RULES)}; pick one of these")


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise KdflError(f"algorithm.weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")


def check_upload(payload: Payload, num_classes: int, key: str = "label_logits",
                 counts_key: str = "label_counts") -> None:
    """Raise :class:`PayloadError` unless ``payload`` holds (C, C) float per-label logits
    under ``key`` and, when ``counts_key`` is not "", (C,) non-negative integer counts."""
    c = num_classes
    z = payload.get(key)
    if z is None:
        raise PayloadError(f"payload has no {key!r} entry (the ({c}, {c}) per-label average logits)")
    if tuple(z.shape) != (c, c) or not z.is_floating_point():
        raise PayloadError(f"{key} is {tuple(z.shape)} {z.dtype}, expected ({c}, {c}) float per-label logits")
    if counts_key:
        check_counts(payload, counts_key, c)


def check_counts(payload: Payload, key: str, num_classes: int) -> None:
    """``payload[key]`` must be (C,) non-negative integer label counts (PayloadError otherwise)."""
    c = num_classes
    n = payload.get(key)
    if n is None:
        raise PayloadError(f"payload has no {key!r} entry (the ({c},) label counts)")
    if tuple(n.shape) != (c,) or n.is_floating_point() or n.is_complex() or n.dtype == torch.bool:
        raise PayloadError(f"{key} is {tuple(n.shape)} {n.dtype}, expected ({c},) integer label counts")
    if bool((n < 0).any()):
        raise PayloadError(f"{key} holds negative counts: {n.tolist()}")


def label_weights(counts: Tensor, weighting: str) -> Tensor:
    """Per-client, per-label weights (K, C) float64 from label counts (K, C): presence
    (1 where the client holds the label, "clients") or the counts themselves ("counts").
    A weight of 0 means the client's row of that label is not averaged in."""
    check_weighting(weighting)
    c = counts.to(torch.float64).clamp_min(0)
    return (c > 0).to(torch.float64) if weighting == "clients" else c


def weighted_sums(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``(S, W)``: S (C, C) float64 = Σ_k w_kl·x_kl (row by row) and W (C,) = Σ_k w_kl, for
    uploads x (K, C, C) and weights w (K, C). A client's part can be subtracted again."""
    return (w.unsqueeze(-1) * x.to(torch.float64)).sum(0), w.sum(0)


def mean_from_sums(s: Tensor, w: Tensor) -> Tensor:
    """The weighted per-label mean S/W (C, C) float32; rows of labels nobody holds are 0."""
    ok = (w > 0).unsqueeze(-1)
    return torch.where(ok, s / w.clamp_min(1e-300).unsqueeze(-1), torch.zeros_like(s)).float()


def aggregate_label_logits(x: Tensor, w: Tensor, aggregator: str = "mean") -> tuple[Tensor, Tensor]:
    """Aggregate per-label logits label by label over the clients that hold the label.

    Args:
        x: (K, C, C) the clients' per-label average logits (row l: label l).
        w: (K, C) their per-label weights (:func:`label_weights`); 0 = does not hold it.
        aggregator: "mean" (weighted by w), "median" (of the holders; ignores w, the mean
            of the two middle values for an even number), "trimmed_mean[:beta=...]"
            (weighted by w), with :func:`kdfl.algorithms.kit.logits.aggregate_logits`.

    Returns:
        ``(teacher, holders)``: (C, C) float32, rows of labels nobody holds are 0; (C,)
        int64, the number of clients that hold each label.
    """
    holders = (w > 0).sum(0)
    name, _ = parse_spec(aggregator)
    if name == "mean":
        return mean_from_sums(*weighted_sums(x, w)), holders
    teacher = torch.zeros(x.shape[1:], dtype=torch.float32)
    for label in range(x.shape[1]):
        who = w[:, label] > 0
        if bool(who.any()):
            rows = x[who, label].float().unsqueeze(1)  # (holders, 1, C)
            teacher[label] = aggregate_logits(rows, aggregator, w[who, label].float())[0]
    return teacher, holders
