"""FedDistill and FedDistill+: the per-label logit baselines of FedGen.

Zhu, Hong, Zhou. Data-Free Knowledge Distillation for Heterogeneous Federated Learning.
ICML 2021. arXiv:2105.10056. Reference code: github.com/zhuangdizhu/FedGen
(``FLAlgorithms/users/userFedDistill.py``, ``FLAlgorithms/servers/serverFedDistill.py``;
"FedDistill-FL" there is the paper's FedDistill+).

Clients share label-wise average logits (FedDistill: of any architectures, each keeping
its own model), or those and their weights (FedDistill+, ``share_params = true``:
FedAvg plus the logit regulariser, one architecture).

Round t, as implemented:
  1. downlink: the global per-label logits G (C, C) once there are any (plus, for
     FedDistill+, the global weights).
  2. client: starts from its kept model (FedDistill; in its first round, the run's
     initial weights of its architecture: the reference deep-copies one model for every
     user) or from the global weights (FedDistill+). Local SGD on
     ``NLL(log_softmax f(x), y) + α·KL(softmax(G_y) ‖ softmax(f(x)))`` (``reg_alpha`` α = 1,
     no temperature, batch mean; the KL term only once G exists). A tracker adds every
     batch's train-mode logits to per-label sums and the labels to counts that start at
     1 (the reference's guard against division by zero).
  3. upload: the tracker's averages sums / counts (C, C) float32 (plus, for FedDistill+,
     the weight delta). With ``cumulative_tracker`` (the reference) the tracker is never
     reset: it is client state, and the averages are over all the client's rounds;
     otherwise it restarts (sums 0, counts 1) every round, as PFLlib's variant.
  4. server: G = the plain average of the uploads over the round's clients (the
     reference; rows of labels a client never saw are 0 in its upload and are averaged
     in), or any robust rule (``aggregator``); FedDistill+ also averages the weight
     deltas (weighted by examples, as the reference's parameter average) and applies them.
  5. evaluation: FedDistill+ has a global model (``params``); FedDistill has none
     (``params = {}``) and its clients' kept models are evaluated per client.

What follows the reference and what is ours: the tracker (counts from 1, never reset),
the loss, α = 1, the plain average and FedDistill+'s weight averaging follow the code.
Ours: the server sends G to every client it samples (the reference hands it to the next
round's selected users, so the same), the ``cumulative_tracker = false`` and
``aggregator`` options, and averaging BatchNorm buffers with the weights in FedDistill+
(the reference averages parameters only). The reference's optional pre-training rounds
("pretrain" in its algorithm name) are not implemented.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfl.algorithms.kit import label_logits as kit
from kdfl.algorithms.kit import weights
from kdfl.algorithms.kit.logits import aggregate_logits
from kdfl.algorithms.program import Delta, LabelLogits, LabelStats, Model, Phase, Program, Tracked, Upload
from kdfl.losses import MAIN, Batch, CrossEntropy, Outputs
from kdfl.train import LocalSGD
from kdfl.types import (
    Client,
    ClientInfo,
    ClientState,
    ClientUpdate,
    KdflError,
    Payload,
    RoundMetrics,
    ServerState,
    StateDict,
    Task,
)

TEACHER = "label_logits"
W = "w."  # downlink prefix of FedDistill+'s global weights


@dataclass(frozen=True)
class FedDistillLoss:
    """``CE(f(x), y) + α·KL(softmax(G_y) ‖ softmax(f(x)))``, batch mean, with the global
    per-label logits G (C, C) as the phase constant ``teacher`` (written out rather than
    ``F.kl_div``, so that the vectorized executor batches it)."""

    alpha: float = 1.0
    model: str = MAIN

    def __call__(self, out: Outputs, batch: Batch, consts: Mapping[str, Any]) -> Tensor:
        assert batch.y is not None, "FedDistill trains on labelled private data"
        z = out.logits(self.model)
        log_q = F.log_softmax(kit.label_onehot(batch.y, z.shape[-1], z.dtype) @ consts["teacher"], -1)  # (B, C)
        kl = (log_q.exp() * (log_q - F.log_softmax(z, -1))).sum(-1).mean()
        return F.cross_entropy(z, batch.y) + self.alpha * kl


@dataclass(frozen=True)
class FedDistillClientState(ClientState):
    """A client's kept model (FedDistill) and its cumulative tracker: per-label logit
    sums (C, C) float64 and counts (C,) int64 (from 1) over all its rounds."""

    tracker: LabelStats | None = None


def keep_tracker(start: LabelStats, models: Mapping[str, nn.Module], kept: ClientState) -> FedDistillClientState:
    """``Program.keep_state``: the kept models plus the tracker after this round."""
    return FedDistillClientState(kept.models, start + models.tracked["train"])  # type: ignore[attr-defined]


@dataclass(frozen=True)
class FedDistillState(ServerState):
    """``params``: FedDistill+'s global weights (empty for FedDistill); ``teacher``: the
    global per-label logits G (C, C) of the last round (None before the first)."""

    teacher: Tensor | None = None


@dataclass(frozen=True)
class FedDistill:
    """FedDistill / FedDistill+ (FedGen's baselines); see the module docstring.

    Args:
        local: local-training settings.
        share_params: FedDistill+: also FedAvg the weights (one architecture for all).
        reg_alpha: α, weight of the KL term towards the global per-label logits.
        cumulative_tracker: never reset the client's tracker (the reference); false:
            restart it every round.
        aggregator: rule for the per-label logits (and FedDistill+'s deltas) over the
            round's clients: "mean" (the reference), "median", "trimmed_mean:beta=0.1", ...
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    share_params: bool = False
    reg_alpha: float = 1.0
    cumulative_tracker: bool = True
    aggregator: str = "mean"

    def __post_init__(self) -> None:
        if self.reg_alpha < 0:
            raise KdflError(f"algorithm.reg_alpha must be >= 0, got {self.reg_alpha}")
        weights.check_aggregator(self.aggregator)

    # -- server: init and downlink ----------------------------------------------------
    def init(self, task: Task) -> FedDistillState:
        if not self.share_params:
            return FedDistillState({}, 0)
        weights.require_homogeneous("FedDistill+ (algorithm.share_params = true)", task)
        return FedDistillState(weights.init_params(task), 0)

    def configure(self, task: Task, state: ServerState, client: ClientInfo) -> Payload:
        assert isinstance(state, FedDistillState)
        down: Payload = {W + k: v for k, v in state.params.items()} if self.share_params else {}
        if state.teacher is not None:
            down[TEACHER] = state.teacher
        return down

    # -- client -----------------------------------------------------------------------
    def start_weights(self, task: Task, downlink: Payload, client: Client) -> StateDict:
        if self.share_params:
            return {k[len(W) :]: v for k, v in downlink.items() if k.startswith(W)}
        return client.kept(MAIN) or weights.init_params(task, client.arch)

    def client_model(self, task: Task, downlink: Payload, client: Client) -> Model | None:
        """The model a client uses for inference: the global one (FedDistill+) or its own."""
        if self.share_params:
            return Model(client.arch, self.start_weights(task, downlink, client))
        kept = client.kept(MAIN)
        return None if kept is None else Model(client.arch, kept)

    def tracker_start(self, task: Task, client: Client) -> LabelStats:
        """The tracker before this round: the kept one, or sums 0 and counts 1."""
        state = client.state
        if self.cumulative_tracker and isinstance(state, FedDistillClientState) and state.tracker is not None:
            return state.tracker
        c = task.num_classes
        return LabelStats(torch.zeros(c, c, dtype=torch.float64), torch.ones(c, dtype=torch.int64))

    def client_program(self, task: Task, downlink: Payload, client: Client) -> Program:
        start = self.start_weights(task, downlink, client)
        track = LabelLogits(task.num_classes)
        teacher = downlink.get(TEACHER)
        if teacher is None:  # round 1: no global logits yet
            phase = Phase(CrossEntropy(), self.local, track=track)
        else:
            phase = Phase(FedDistillLoss(self.reg_alpha), self.local, consts={"teacher": teacher}, track=track)
        tracker = self.tracker_start(task, client)
        upload: list[Upload] = [Tracked(phase.name, key=TEACHER, counts_key="", start=tracker)]
        if self.share_params:
            upload.insert(0, Delta(start))
        return Program(
            models={MAIN: Model(client.arch, start)}, phases=[phase], upload=upload,
            keep=() if self.share_params else (MAIN,),
            keep_state=functools.partial(keep_tracker, tracker) if self.cumulative_tracker else None,
        )

    # -- server: validate and update --------------------------------------------------
    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        kit.check_upload(update.payload, task.num_classes, TEACHER, counts_key="")
        if self.share_params:
            weights.check_delta(update, state.params)

    def server_update(self, task: Task, state: FedDistillState,  # type: ignore[override]
                      updates: Sequence[ClientUpdate]) -> tuple[FedDistillState, RoundMetrics]:
        x = torch.stack([u.payload[TEACHER].float() for u in updates])  # (K, C, C)
        teacher = aggregate_logits(x, self.aggregator, torch.ones(len(updates)))
        params = state.params
        if self.share_params:
            params = weights.apply_delta(params, weights.aggregate_deltas(updates, self.aggregator))
        return FedDistillState(params, state.round + 1, teacher), {}
