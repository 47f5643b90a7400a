"""FML: Federated Mutual Learning. Every client trains a shared *meme* model (the global
model's architecture, averaged by FedAvg) and its own *local* model (kept across rounds,
never shared, any architecture) together on its private data, each learning the labels
and from the other (deep mutual learning: a two-way KL).

Shen, Zhang, Jia, Zhang, Huang, Zhou, Kuang, Wu, Wu. Federated Mutual Learning.
arXiv 2006.16765 (2020). https://arxiv.org/abs/2006.16765

Per batch (PFLlib ``system/flcore/clients/clientfml.py``)::

    L_local = α · CE(local) + (1 − α) · KL(p_meme ‖ p_local)
    L_meme  = β · CE(meme)  + (1 − β) · KL(p_local ‖ p_meme)

Choices here (see :class:`FML`): the KL's target is detached (deep mutual learning; PFLlib
backpropagates both losses through both models); the KL is reduced as PFLlib's
``nn.KLDivLoss()`` by default (the mean over the B·C elements, the batch-mean KL / C;
``kl_reduction = "batchmean"`` for the per-sample KL), with an optional temperature T
(T²·KL of the softened distributions; T = 1, the paper's and PFLlib's form, is the
default); each model's gradient norm is clipped at 10 per step, as PFLlib
(``system/flcore/clients/clientfml.py`` @ d832e76).
Downlink: the global meme weights; upload: the meme's delta (FedAvg's payload).

Evaluated: the run's ``test_accuracy`` is the global meme's; per client, ``accuracy`` is
the client's personal (local) model on its own held-out split (PFLlib's personalised
evaluation, the model FML is for) and ``meme_accuracy`` the shared meme on that split.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from kdfl.algorithms.fedavg import FedAvgState
from kdfl.algorithms.kit import weights
from kdfl.algorithms.program import Delta, Model, Phase, Program, fresh_weights
from kdfl.losses import KL_REDUCTIONS, Batch, Outputs, mutual_kl
from kdfl.train import LocalSGD, evaluate
from kdfl.types import (
    Client,
    ClientInfo,
    ClientUpdate,
    KdflError,
    Payload,
    RoundMetrics,
    ServerState,
    Task,
    TensorData,
)

LOCAL = "local"  # the client's personal model (kept, any architecture)
MEME = "meme"  # the shared model (the server's architecture, averaged)


@dataclass(frozen=True)
class MutualLoss:
    """``L_local + L_meme`` (see the module docstring), each KL toward the detached peer.

    Because each KL's target is detached, ``L_local`` depends on the local model's
    parameters only and ``L_meme`` on the meme's only, so the gradient of the sum with
    respect to each model is exactly the gradient of that model's own loss: one optimizer
    over both models (``Phase(train=("local", "meme"))``, SGD or Adam, both per-parameter)
    takes the same steps as two optimizers, one per loss. A term whose weight is 0 is
    left out (α = β = 1 is plain cross-entropy for each model, exactly).
    """

    alpha: float = 0.5
    beta: float = 0.5
    temperature: float = 1.0
    kl_reduction: str = "mean"

    def __call__(self, out: Outputs, batch: Batch, consts: Mapping[str, Any]) -> Tensor:
        assert batch.y is not None, "FML trains on labelled (private) data"
        local, meme = out.logits(LOCAL), out.logits(MEME)
        terms: list[Tensor] = []
        if self.alpha:
            terms.append(self.alpha * F.cross_entropy(local, batch.y))
        if self.alpha != 1:
            terms.append((1 - self.alpha) * mutual_kl(meme, local, self.temperature, self.kl_reduction))
        if self.beta:
            terms.append(self.beta * F.cross_entropy(meme, batch.y))
        if self.beta != 1:
            terms.append((1 - self.beta) * mutual_kl(local, meme, self.temperature, self.kl_reduction))
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total


@dataclass(frozen=True)
class FML:
    """Federated Mutual Learning.

    Args:
        local: local-training settings (one optimizer over both models).
        alpha: α, the local model's weight on cross-entropy (1 − α on the KL to the meme).
        beta: β, the meme's weight on cross-entropy (1 − β on the KL to the local model).
            α = β = 0.5 by default (the research notes mark the paper's values unverified;
            PFLlib takes both as arguments). With α = β = 1 the meme's training and the
            server's update are FedAvg's.
        temperature: T of the mutual KL terms (T²·KL); 1 = the paper's plain KL.
        kl_reduction: "mean" (PFLlib's ``nn.KLDivLoss()``: the per-sample KL / C) or
            "batchmean" (the per-sample KL).
        clip_grad_norm: clip each model's gradient norm to this per step (PFLlib: 10);
            used when ``local.clip_grad_norm`` is 0; 0 = off.
        aggregator: rule for the meme deltas, as FedAvg's ("mean" = FedAvg).
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    alpha: float = 0.5
    beta: float = 0.5
    temperature: float = 1.0
    kl_reduction: str = "mean"
    clip_grad_norm: float = 10.0
    aggregator: str = "mean"

    def __post_init__(self) -> None:
        if not (0.0 <= self.alpha <= 1.0 and 0.0 <= self.beta <= 1.0):
            raise KdflError(f"fml: alpha and beta must be in [0, 1], got alpha={self.alpha}, beta={self.beta}")
        if self.temperature <= 0:
            raise KdflError(f"fml: temperature must be > 0, got {self.temperature}")
        if self.kl_reduction not in KL_REDUCTIONS or self.clip_grad_norm < 0:
            raise KdflError(f"fml: kl_reduction must be one of {KL_REDUCTIONS} and clip_grad_norm >= 0, got "
                            f"{self.kl_reduction!r}, {self.clip_grad_norm}")
        weights.check_aggregator(self.aggregator)

    @functools.cached_property
    def _phase(self) -> Phase:  # one Phase object for every client (executors group by it)
        local = self.local
        if not local.clip_grad_norm and self.clip_grad_norm:
            local = replace(local, clip_grad_norm=self.clip_grad_norm)
        return Phase(MutualLoss(self.alpha, self.beta, self.temperature, self.kl_reduction), local, train=(LOCAL, MEME))

    # -- server ------------------------------------------------------------------------
    def init(self, task: Task) -> FedAvgState:
        """The global meme (server architecture); clients' local models may differ."""
        return FedAvgState(weights.init_params(task), 0)

    def configure(self, task: Task, state: ServerState, client: ClientInfo) -> Payload:
        return state.params

    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        weights.check_delta(update, state.params)

    def server_update(self, task: Task, state: FedAvgState,  # type: ignore[override]
                      updates: Sequence[ClientUpdate]) -> tuple[FedAvgState, RoundMetrics]:
        delta = weights.aggregate_deltas(updates, self.aggregator)
        return FedAvgState(weights.apply_delta(state.params, delta), state.round + 1), {}

    # -- client ------------------------------------------------------------------------
    def local_model(self, task: Task, client: Client) -> Model:
        """The client's personal model: kept from its last round, or fresh."""
        return Model(client.arch, client.kept(LOCAL) or fresh_weights(task, client.id, client.arch))

    def client_model(self, task: Task, downlink: Payload, client: Client) -> Model:
        """Per-client metrics: the personal (local) model."""
        return self.local_model(task, client)

    def client_eval_metrics(self, task: Task, downlink: Payload, client: Client, module: nn.Module,
                            data: TensorData) -> dict[str, float]:
        """``meme_accuracy``: the shared global meme on the client's own held-out split,
        beside the personal model's ``accuracy`` (not on the global test set, where the
        meme is the server model: the run's ``test_accuracy``)."""
        if data is task.test or not len(data):
            return {}
        meme = task.borrow_model(task.server_arch)
        try:
            meme.load_state_dict(downlink)
            return {"meme_accuracy": evaluate(meme, data)["accuracy"]}
        finally:
            task.return_model(task.server_arch, meme)

    def client_program(self, task: Task, downlink: Payload, client: Client) -> Program:
        return Program(models={LOCAL: self.local_model(task, client), MEME: Model(task.server_arch, downlink)},
                       phases=(self._phase,), upload=(Delta(downlink, model=MEME),), keep=(LOCAL,))
