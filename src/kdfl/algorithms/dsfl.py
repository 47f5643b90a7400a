"""DS-FL: distillation-based semi-supervised federated learning with entropy reduction
aggregation (ERA).

Itahara, Nishio, Koda, Morikura, Yamamoto. Distillation-Based Semi-Supervised Federated
Learning for Communication-Efficient Collaborative Training With Non-IID Private Data.
IEEE Transactions on Mobile Computing, 2023. arXiv:2008.06180.
Reference code: ``kitsuyaazuma/SCARLET`` (``algorithm/dsfl.py``, ``algorithm/common.py``)
and ``Koukyosyumei/AIJack`` (``collaborative/dsfl``).

Clients keep their own models (any architectures) and exchange only predictions on an
unlabeled open data set (kdfl's proxy). The server labels the open data with the
aggregated, sharpened predictions and trains a global model on them, which kdfl
evaluates (``state.params``, architecture ``task.server_arch``).

Round t, as implemented (as SCARLET's pipeline):
  1. downlink: the open-set indices I_t of this round (``open_size`` rows drawn from
     (seed, t), sorted) and, after round 1, the previous round's global soft labels
     Ŷ_{t-1} with their indices I_{t-1}.
  2. client *distil*: train its kept model on (x_j, Ŷ_{t-1,j}), j in I_{t-1}, with
     KL(Ŷ ‖ softmax(f(x))) averaged over the batch (``[algorithm.client_distill]``:
     SCARLET's kd_epochs / kd_batch_size / kd_lr).
  3. client *train*: cross-entropy on its private data (``[local]``).
  4. client *predict*: on I_t, upload softmax probabilities (``upload = "probs"``, as
     SCARLET) or raw logits (``upload = "logits"``, as AIJack's clients upload model
     outputs; the server applies the softmax to each client's logits, so both modes
     aggregate the same probabilities).
  5. server: per sample and class, aggregate the clients' probabilities with
     ``aggregator`` (uniform client weights, as both references), renormalise every row
     onto the simplex, then ``aggregation``: "era" Ŷ = softmax(p̄ / T) with
     ``era_temperature`` T (0.1 in both references; T < 1 sharpens, lowering the
     entropy of averages that non-IID clients made ambiguous) or "sa" Ŷ = p̄.
  6. server: train the global model on (x_j, Ŷ_j), j in I_t, with kit.distill
     (``[algorithm.distill]``: KL(Ŷ ‖ softmax(f)) at T = 1); keep Ŷ_t and I_t for the
     next downlink.

ERA with a robust rule: the mean of probabilities lies on the simplex, a coordinate-wise
median or trimmed mean need not. We aggregate, clip at 0 and renormalise each row (a
row that aggregates to all zeros becomes uniform), and only then sharpen, so that T acts
on a distribution exactly as it does after the mean (and "sa" still yields a
distribution).

Follows the references: per-round open subset (SCARLET: 1,000 rows of 10,000), client
distil -> train -> predict, KL batchmean with T = 1, uniform mean, ERA softmax(p̄/T) with
T = 0.1, global model trained on (x, Ŷ) each round, Ŷ broadcast with its indices. Our
choices: the server's SGD has momentum 0.9 and lr 0.05 (SCARLET: plain SGD lr 0.1; lr
0.01 with kit.distill's momentum would match it, 0.05 trained better global models in
our runs), a fixed number of server steps (``distill.steps``) instead of epochs, robust
rules, and a validation of the uploads (probabilities must be rows of the simplex).

Validation is a defence too: with ``upload = "probs"`` an upload whose rows are not
probability vectors (within ``simplex_tol``) is rejected, which already stops most
Byzantine upload attacks (sign flip, scaling, ALIE...; kdfl's threat model rewrites every
float payload entry). Use ``upload = "logits"`` to study robust aggregation against them,
and raise ``simplex_tol`` for lossy uplink codecs (int8 errs by up to max/254 per entry).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfl import tree
from kdfl.algorithms.kit import logits as logit_kit
from kdfl.algorithms.kit.distill import DistillSettings, distill
from kdfl.algorithms.program import Custom, Data, Logits, Model, Phase, Program, fresh_weights
from kdfl.losses import MAIN, Batch, CrossEntropy, Outputs
from kdfl.rng import generator
from kdfl.train import LocalSGD, predict
from kdfl.types import (
    Client,
    ClientInfo,
    ClientUpdate,
    KdflError,
    Payload,
    PayloadError,
    RoundMetrics,
    ServerState,
    Task,
)

UPLOADS = ("probs", "logits")
AGGREGATIONS = ("era", "sa")


@dataclass(frozen=True)
class SoftLabelKL:
    """``KL(Ŷ ‖ softmax(z))`` averaged over the batch (PyTorch's ``kl_div`` "batchmean"),
    with Ŷ the per-sample global soft labels (target ``key``)."""

    key: str = "soft_labels"
    model: str = MAIN

    def __call__(self, out: Outputs, batch: Batch, consts: Mapping[str, Any]) -> Tensor:
        return F.kl_div(F.log_softmax(out.logits(self.model), dim=-1), batch.targets[self.key],
                        reduction="batchmean")


@dataclass(frozen=True, eq=False)
class SoftmaxOn:
    """An upload function: ``{key: softmax(model(x))}`` in eval mode, (n, C) float32."""

    x: Tensor
    model: str = MAIN
    key: str = "soft_labels"

    def __call__(self, models: Mapping[str, nn.Module]) -> Payload:
        return {self.key: torch.softmax(predict(models[self.model], self.x), dim=-1)}


@dataclass(frozen=True)
class DSFLState(ServerState):
    """``params``: the global model. ``soft_labels``: Ŷ (n, C) of the last round on the
    open rows ``rows`` (n,); None before the first round."""

    soft_labels: Tensor | None = None
    rows: Tensor | None = None


def dsfl_client_distill() -> LocalSGD:
    """SCARLET's client distillation: 5 epochs, batch 100, plain SGD lr 0.1."""
    return LocalSGD(epochs=5, batch_size=100, lr=0.1)


def dsfl_server_distill() -> DistillSettings:
    """SCARLET's server loop (5 epochs of 1,000 rows at batch 100 = 50 steps, SGD, T = 1,
    no schedule, no clipping) as kit.distill runs it, whose SGD has momentum 0.9: lr 0.01
    would match SCARLET's plain lr 0.1; lr 0.05 trained a better global model on mnist1d
    (0.61 vs 0.52 after 30 rounds) and digits, so it is the default."""
    return DistillSettings(steps=50, batch_size=100, lr=0.05, optimizer="sgd", cosine=False, temperature=1.0,
                           t2=False, grad_clip=0.0)


@dataclass(frozen=True)
class DSFL:
    """DS-FL (see the module docstring).

    Args:
        local: private training (the ``[local]`` section).
        client_distill: the clients' distillation on the global soft labels
            (``[algorithm.client_distill]``).
        distill: the server's training of the global model on (x_open, Ŷ)
            (``[algorithm.distill]``; its temperature should stay 1: Ŷ is already sharpened).
        open_size: open (proxy) rows per round (SCARLET: 1,000); capped by the proxy.
        upload: "probs" (softmax probabilities, SCARLET) or "logits" (raw outputs).
        aggregator: per-sample, per-class rule over the clients' probabilities ("mean"
            as the paper, "median", "trimmed_mean:beta=0.2", ...).
        aggregation: "era" (entropy reduction: softmax(p̄/T)) or "sa" (simple: p̄).
        era_temperature: T of ERA (0.1 as both references).
        simplex_tol: how far an uploaded probability row may sum from 1 (``upload = "probs"``).
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    client_distill: LocalSGD = field(default_factory=dsfl_client_distill)
    distill: DistillSettings = field(default_factory=dsfl_server_distill)
    open_size: int = 1000
    upload: str = "probs"
    aggregator: str = "mean"
    aggregation: str = "era"
    era_temperature: float = 0.1
    simplex_tol: float = 1e-3

    def __post_init__(self) -> None:
        for key, allowed in (("upload", UPLOADS), ("aggregation", AGGREGATIONS)):
            if getattr(self, key) not in allowed:
                raise KdflError(f"algorithm.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        if self.open_size < 1:
            raise KdflError(f"algorithm.open_size must be >= 1, got {self.open_size}")
        if self.era_temperature <= 0:
            raise KdflError(f"algorithm.era_temperature must be > 0, got {self.era_temperature}")
        if self.simplex_tol <= 0:
            raise KdflError(f"algorithm.simplex_tol must be > 0, got {self.simplex_tol}")
        logit_kit.check_rule(self.aggregator, class_weighting=False)

    @property
    def key(self) -> str:
        return "soft_labels" if self.upload == "probs" else "logits"

    def rows(self, task: Task, round_num: int) -> Tensor:
        """The open rows I_t of ``round_num``: sorted proxy row indices (int64)."""
        return logit_kit.public_rows(task, self.open_size, "dsfl-open", round_num)

    # -- server: init and downlink -------------------------------------------------------
    def init(self, task: Task) -> DSFLState:
        if task.proxy is None or len(task.proxy) == 0:
            raise KdflError("DS-FL needs an unlabeled open data set: set data.proxy ('holdout', 'noise' or "
                            "'dataset:NAME') and data.proxy_size > 0")
        return DSFLState(tree.state_of(task.new_model(task.server_arch)), 0)

    def configure(self, task: Task, state: ServerState, client: ClientInfo) -> Payload:
        """I_t, plus I_{t-1} and Ŷ_{t-1} after round 1."""
        down: Payload = {"rows": self.rows(task, state.round + 1).int()}
        soft, rows = getattr(state, "soft_labels", None), getattr(state, "rows", None)
        if soft is not None and rows is not None:
            down.update(distill_rows=rows.int(), soft_labels=soft)
        return down

    # -- client -------------------------------------------------------------------------
    def client_program(self, task: Task, downlink: Payload, client: Client) -> Program:
        """[distil on Ŷ_{t-1} (after round 1)], train on private data, upload predictions
        on I_t; keep the model."""
        assert task.proxy is not None
        phases: list[Phase] = []
        if "soft_labels" in downlink:
            open_data = Data(task.proxy[downlink["distill_rows"].long().cpu()],  # the proxy lives on the host
                             targets={"soft_labels": downlink["soft_labels"].float()})
            phases.append(Phase(SoftLabelKL(), self.client_distill, data=open_data, name="distill"))
        phases.append(Phase(CrossEntropy(), self.local, name="train"))
        x = task.proxy[downlink["rows"].long().cpu()]
        upload: Any = Custom(SoftmaxOn(x)) if self.upload == "probs" else Logits(x)
        own = client.kept(MAIN)
        weights = own if own is not None else fresh_weights(task, client.id, client.arch)
        return Program(models={MAIN: Model(client.arch, weights)}, phases=phases, upload=[upload], keep=(MAIN,))

    # -- server: validate and update -----------------------------------------------------
    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        p = update.payload
        extra = sorted(set(p) - {self.key})
        if extra:
            raise PayloadError(f"DS-FL payload has unexpected entries {extra}; expected only {self.key!r}")
        y = p.get(self.key)
        if y is None:
            raise PayloadError(f"DS-FL payload has no {self.key!r} entry (upload = {self.upload!r})")
        if not y.is_floating_point():
            raise PayloadError(f"{self.key} must be a float tensor, got {y.dtype}")
        n = len(self.rows(task, state.round + 1))
        if tuple(y.shape) != (n, task.num_classes):
            raise PayloadError(f"{self.key} are {tuple(y.shape)}, expected ({n}, {task.num_classes}): one row per "
                               "open row of this round")
        if self.upload == "probs":
            if (y < 0).any():
                raise PayloadError("soft_labels must be probabilities, but some entries are negative")
            dev = float((y.double().sum(-1) - 1).abs().max())
            if dev > self.simplex_tol:
                raise PayloadError(f"soft_labels rows must sum to 1 (within simplex_tol = {self.simplex_tol}), but "
                                   f"one is off by {dev:.3g}")

    def probabilities(self, updates: Sequence[ClientUpdate]) -> Tensor:
        """The clients' probabilities (K, n, C)."""
        y = torch.stack([u.payload[self.key].float() for u in updates])
        return torch.softmax(y, dim=-1) if self.upload == "logits" else y

    def global_soft_labels(self, updates: Sequence[ClientUpdate]) -> Tensor:
        """Ŷ (n, C): the rule over clients, renormalised, then ERA or SA."""
        agg = logit_kit.aggregate_logits(self.probabilities(updates), self.aggregator, torch.ones(len(updates)))
        p_bar = logit_kit.to_probs(agg, "probs", 1.0)  # clip at 0, rows sum to 1 (a robust rule may leave it)
        return torch.softmax(p_bar / self.era_temperature, dim=-1) if self.aggregation == "era" else p_bar

    def server_update(self, task: Task, state: ServerState,
                      updates: Sequence[ClientUpdate]) -> tuple[DSFLState, RoundMetrics]:
        assert task.proxy is not None
        t = state.round + 1
        rows = self.rows(task, t)
        soft = self.global_soft_labels(updates)
        model = task.new_model(task.server_arch)
        model.load_state_dict(state.params)
        stats = distill(model, task.proxy[rows], soft, self.distill, generator(task.seed, "dsfl-server", t))
        entropy = -(soft * soft.clamp_min(1e-12).log()).sum(-1).mean()
        metrics = {**stats, "soft_label_entropy": float(entropy),
                   "soft_label_confidence": float(soft.max(-1).values.mean())}
        if task.proxy_labels is not None:  # a diagnostic only: the labels never reach the algorithm
            metrics["soft_label_accuracy"] = float((soft.argmax(-1) == task.proxy_labels[rows]).float().mean())
        return DSFLState(tree.state_of(model), t, soft, rows), metrics
