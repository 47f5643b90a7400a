"""A test-only algorithm that uses what the single-model algorithms do not: two models per
client (a kept personal model and a shared one from the downlink), a public phase before
a private phase, per-sample targets from the server, logits, a weight delta and a
constant in one upload, and a typed client state that keeps more than weights. Importable as ``toy_algorithms:ToyMutual`` (tests/core is on sys.path), which
also exercises user algorithms named by module path."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfl.algorithms.kit import weights
from kdfl.algorithms.program import Const, Data, Delta, Logits, Model, Phase, Program, fresh_weights
from kdfl.train import LocalSGD
from kdfl.types import ClientState, PayloadError, ServerState


@dataclass(frozen=True)
class L1ToTargets:
    """Mean absolute error between a model's logits and the per-sample targets ``q``."""

    model: str = "own"

    def __call__(self, out, batch, consts):
        return F.l1_loss(out.logits(self.model), batch.targets["q"])


def kl(target_logits, logits):
    """KL(softmax(target) || softmax(logits)), batch mean (written out: vmap batches it)."""
    log_q = F.log_softmax(target_logits, -1)
    return (log_q.exp() * (log_q - F.log_softmax(logits, -1))).sum(-1).mean()


@dataclass(frozen=True)
class Mutual:
    """Both models learn the labels and from each other (KL to the detached peer)."""

    weight: float = 0.5

    def __call__(self, out, batch, consts):
        a, b = out.logits("own"), out.logits("shared")
        kl_ab = kl(b.detach(), a)
        kl_ba = kl(a.detach(), b)
        return F.cross_entropy(a, batch.y) + F.cross_entropy(b, batch.y) + self.weight * (kl_ab + kl_ba)


@dataclass(frozen=True)
class ToyClientState(ClientState):
    """A typed client state that keeps more than weights."""

    rounds: int = 0  # rounds this client has trained in


def count_round(rounds, models, kept):
    return ToyClientState(kept.models, rounds)


@dataclass(frozen=True)
class ToyState(ServerState):
    consensus: Tensor | None = None  # (n, C) mean of last round's logits on the public rows


W = "w."


@dataclass(frozen=True)
class ToyMutual:
    """Digest the consensus on public rows with the personal model, then train both models
    on private data; upload the personal model's logits and the shared model's delta."""

    # two models learning from each other amplify BatchNorm's eval-mode error on 8x8 digits:
    # at lr 0.05 a ShuffleNet client's eval logits overflowed (rejected as non-finite)
    conformance_overrides = ("local.lr=0.01",)

    local: LocalSGD = field(default_factory=LocalSGD)
    public_rows: int = 16
    digest_steps: int = 2

    def init(self, task):
        return ToyState(weights.init_params(task), 0, None)

    def rows(self, task, round_num):
        return torch.arange(min(self.public_rows, len(task.proxy)))  # the same rows every round (a toy)

    def configure(self, task, state, client):
        idx = self.rows(task, state.round + 1)
        q = state.consensus if state.consensus is not None else torch.zeros(len(idx), task.num_classes)
        return {**{W + k: v for k, v in state.params.items()}, "consensus": q}

    def client_model(self, task, downlink, client):
        """Per-client metrics: the client's own (private) model."""
        return Model(client.arch, client.kept("own") or fresh_weights(task, client.id, client.arch))

    def client_program(self, task, downlink, client):
        shared = {k[len(W):]: v for k, v in downlink.items() if k.startswith(W)}
        rounds = 1 + (client.state.rounds if isinstance(client.state, ToyClientState) else 0)
        x = task.proxy[self.rows(task, client.round)]
        digest = LocalSGD(steps=self.digest_steps, batch_size=8, lr=self.local.lr)
        return Program(
            models={"own": Model(client.arch, client.kept("own") or fresh_weights(task, client.id, client.arch)),
                    "shared": Model(task.server_arch, shared)},
            phases=[Phase(L1ToTargets(), digest, train=("own",), data=Data(x, targets={"q": downlink["consensus"]}),
                          name="digest"),
                    Phase(Mutual(), self.local, train=("own", "shared"), name="private")],
            upload=[Logits(x, model="own"), Delta(shared, model="shared"),
                    Const({"client_rounds": torch.tensor([rounds])})],
            keep=("own",), keep_state=functools.partial(count_round, rounds),
        )

    def validate(self, task, state, update):
        z = update.payload.get("logits")
        n = len(self.rows(task, state.round + 1))
        if z is None or tuple(z.shape) != (n, task.num_classes):
            raise PayloadError(f"logits must be ({n}, {task.num_classes})")
        weights.check_delta(update, state.params)
        c = update.payload.get("client_rounds")
        if c is None or c.shape != (1,) or c.is_floating_point() or not 1 <= int(c) <= state.round + 1:
            raise PayloadError("client_rounds must be one integer in [1, round]")

    def server_update(self, task, state, updates: Sequence):
        consensus = torch.stack([u.payload["logits"].float() for u in updates]).mean(0)
        params = weights.apply_delta(state.params, weights.aggregate_deltas(updates))
        metrics = {"consensus_max": float(consensus.max()),
                   "client_rounds_max": float(max(int(u.payload["client_rounds"]) for u in updates))}
        return ToyState(params, state.round + 1, consensus), metrics
