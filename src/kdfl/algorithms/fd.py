"""FD: federated distillation by per-label average logits (no public data, no global model).

Jeong, Oh, Kim, Park, Bennis, Kim. Communication-Efficient On-Device Machine Learning:
Federated Distillation and Augmentation under Non-IID Private Data. NeurIPS 2018
workshop (MLPCD). arXiv:1811.11479.

Every client keeps its own model (any architecture). Instead of weights, clients exchange
per-label average logit vectors: a (C, C) matrix per client and round (row l: the mean
logits of its training samples of label l), a few hundred bytes.

Round t, as implemented:
  1. downlink (from round 2 on): the teacher F̂ (C, C) of this client and the number of
     clients behind each row (C,) int64 (0: no teacher for that label). With
     ``exclude_own`` (the paper's F̂^(i): the other devices' average) the server removes
     the client's own last upload: mean rule, S − w_i·F_i over W − w_i from the sums it
     keeps; median / trimmed mean, the rule over the other holders. A client without an
     upload in the last round gets the aggregate of all last-round uploads (they are all
     "others" to it).
  2. client: from its kept model (a fresh per-client initialisation in its first round),
     local SGD on ``CE(f(x), y) + γ·CE(softmax(F̂_y / T), softmax(f(x) / T))`` (the second
     term only once a teacher exists, and only for samples whose label has a teacher row:
     it is the batch mean with 0 for the others). During training the phase tracks the
     per-label sums of its train-mode logits and the label counts (``Phase.track``).
  3. upload: the per-label averages F_i (C, C) float32 (rows of labels it did not train
     on: 0) and the counts (C,) int64 (samples seen per label: epochs × label histogram).
  4. server: weights w_il = 1 where client i holds label l ("clients", unweighted over
     the holders, as PFLlib's FD server) or its count ("counts"); per label, the rule
     over the holders (mean, median, trimmed mean; median ignores weights; with
     ``kit.logits.aggregate_logits``). It keeps the round's uploads, weights and
     weighted sums in its typed state for step 1.
  5. nothing to evaluate globally (``params = {}``): the clients' own models are what
     per-client metrics evaluate.

What follows the references and what is ours:
  - The per-label average logits, their exchange instead of weights and the teacher of
    device i formed from the other devices' averages follow the paper (the exclusion
    formula is from its notation; the authors released no code).
  - The distillation term is the form of FedML's FD/FAug trainer (``FDFAugModelTrainer``:
    cross-entropy with soft targets softmax(F̂_y) per sample; tracked logits are the
    training forward's, summed over all local epochs). That trainer mixes
    ``(1 − γ)·CE + γ·KD`` with ``kd_gamma = 1`` by default (no label term at all once a
    teacher exists); we use the additive ``CE + γ·KD`` of our notes on the paper
    (research/algorithms.md §6), as PFLlib's FD does (CE + λ·MSE, λ = 1 by default),
    with γ = 1 by default: label and teacher weigh the same, as in FedDistill (α = 1).
  - Ours: the temperature T (FedML has none: T = 1 is theirs; no T² factor), masking
    samples whose label has no teacher (PFLlib leaves their output unchanged, which is
    also zero loss), the weighting option, the robust rules, and what a client without a
    last-round upload receives.
  - FAug (the conditional GAN that oversamples missing labels) is not implemented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfl.algorithms.kit import label_logits as kit
from kdfl.algorithms.program import LabelLogits, Model, Phase, Program, Tracked, fresh_weights
from kdfl.losses import MAIN, Batch, CrossEntropy, Outputs
from kdfl.spec import parse_spec
from kdfl.train import LocalSGD
from kdfl.types import (
    Client,
    ClientInfo,
    ClientUpdate,
    KdflError,
    Payload,
    RoundMetrics,
    ServerState,
    Task,
)

TEACHER, HOLDERS, COUNTS = "label_logits", "label_holders", "label_counts"


@dataclass(frozen=True)
class FDLoss:
    """``CE(f(x), y) + γ·mean_i m_i·CE(softmax(F̂_{y_i}/T), softmax(f(x_i)/T))`` with the
    teacher table F̂ (C, C) and the mask m (C,) (1 where label y_i has a teacher row) as
    the phase constants ``teacher`` and ``present``. Cross-entropy with soft targets (as
    FedML) has the gradients of KL(q ‖ p); its value, the reported ``train_loss``, also
    holds the teacher's entropy H(q)."""

    gamma: float
    temperature: float = 1.0
    model: str = MAIN

    def __call__(self, out: Outputs, batch: Batch, consts: Mapping[str, Any]) -> Tensor:
        assert batch.y is not None, "FD trains on labelled private data"
        z = out.logits(self.model)
        onehot = kit.label_onehot(batch.y, z.shape[-1], z.dtype)  # (B, C)
        target = onehot @ consts["teacher"]  # (B, C): the teacher row of each sample's label
        present = onehot @ consts["present"]  # (B,)
        q = torch.softmax(target / self.temperature, -1)
        kd = -(q * F.log_softmax(z / self.temperature, -1)).sum(-1)  # (B,)
        return F.cross_entropy(z, batch.y) + self.gamma * (kd * present).sum() / z.shape[0]


@dataclass(frozen=True)
class FDState(ServerState):
    """``params`` is empty (no global model). The last round's accepted uploads:

    - ``ids``: their clients, in order; ``uploads`` (K, C, C) float32; ``weights`` (K, C)
      float64 (presence or counts, per ``weighting``);
    - ``teacher`` (C, C) and ``holders`` (C,) int64: the aggregate of all of them;
    - ``sums`` (C, C) float64: Σ_k w_kl·F_kl (the mean rule subtracts one client's part).
    """

    ids: tuple[int, ...] = ()
    uploads: Tensor | None = None
    weights: Tensor | None = None
    teacher: Tensor | None = None
    holders: Tensor | None = None
    sums: Tensor | None = None


@dataclass(frozen=True)
class FD:
    """FD (Jeong et al., 2018); see the module docstring.

    Args:
        local: local-training settings.
        gamma: γ, weight of the distillation term.
        temperature: T of the teacher and student softmax in the distillation term.
        weighting: per-label weights of the server's average: "clients" (each client
            holding the label counts once) or "counts" (its label count).
        exclude_own: client i's teacher leaves out its own last upload (the paper's F̂^(i)).
        aggregator: per-label rule over the holders: "mean", "median",
            "trimmed_mean:beta=0.1". Label counts are claimed by the clients: with
            Byzantine clients prefer "clients" weighting.
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    gamma: float = 1.0
    temperature: float = 1.0
    weighting: str = "clients"
    exclude_own: bool = True
    aggregator: str = "mean"

    def __post_init__(self) -> None:
        if self.gamma < 0 or self.temperature <= 0:
            raise KdflError(f"algorithm.gamma must be >= 0 and algorithm.temperature > 0 (got gamma={self.gamma}, "
                            f"temperature={self.temperature})")
        kit.check_weighting(self.weighting)
        kit.check_rule(self.aggregator)

    # -- server: init and downlink ----------------------------------------------------
    def init(self, task: Task) -> FDState:
        return FDState({}, 0)

    def teacher_for(self, state: FDState, client_id: int) -> tuple[Tensor, Tensor] | None:
        """Client ``client_id``'s teacher (C, C) float32 and holders (C,) int64, or None
        before the first accepted uploads."""
        if state.uploads is None or state.weights is None or state.teacher is None or state.holders is None:
            return None
        if not self.exclude_own or client_id not in state.ids:
            return state.teacher, state.holders
        k = state.ids.index(client_id)
        w = state.weights
        if parse_spec(self.aggregator)[0] == "mean" and state.sums is not None:
            own = w[k].unsqueeze(-1) * state.uploads[k].to(torch.float64)
            return kit.mean_from_sums(state.sums - own, w.sum(0) - w[k]), state.holders - (w[k] > 0).long()
        others = w.clone()
        others[k] = 0
        return kit.aggregate_label_logits(state.uploads, others, self.aggregator)

    def configure(self, task: Task, state: ServerState, client: ClientInfo) -> Payload:
        assert isinstance(state, FDState)
        got = self.teacher_for(state, client.id)
        return {} if got is None else {TEACHER: got[0], HOLDERS: got[1]}

    # -- client -----------------------------------------------------------------------
    def client_program(self, task: Task, downlink: Payload, client: Client) -> Program:
        own = client.kept(MAIN) or fresh_weights(task, client.id, client.arch)
        track = LabelLogits(task.num_classes)
        teacher = downlink.get(TEACHER)
        if teacher is None:  # round 1: no per-label logits yet
            phase = Phase(CrossEntropy(), self.local, track=track)
        else:
            present = (downlink[HOLDERS] > 0).to(teacher.dtype)
            phase = Phase(FDLoss(self.gamma, self.temperature), self.local,
                          consts={"teacher": teacher, "present": present}, track=track)
        return Program(models={MAIN: Model(client.arch, own)}, phases=[phase],
                       upload=[Tracked(phase.name, key=TEACHER, counts_key=COUNTS)], keep=(MAIN,))

    # -- server: validate and update --------------------------------------------------
    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        kit.check_upload(update.payload, task.num_classes, TEACHER, COUNTS)

    def server_update(self, task: Task, state: FDState,  # type: ignore[override]
                      updates: Sequence[ClientUpdate]) -> tuple[FDState, RoundMetrics]:
        x = torch.stack([u.payload[TEACHER].float() for u in updates])  # (K, C, C)
        w = kit.label_weights(torch.stack([u.payload[COUNTS] for u in updates]), self.weighting)  # (K, C)
        teacher, holders = kit.aggregate_label_logits(x, w, self.aggregator)
        sums = kit.weighted_sums(x, w)[0] if parse_spec(self.aggregator)[0] == "mean" else None
        new = FDState({}, state.round + 1, tuple(u.client_id for u in updates), x, w, teacher, holders, sums)
        return new, {"labels_with_teacher": float((holders > 0).sum())}
