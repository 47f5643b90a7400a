"""FedProto: federated prototype learning across heterogeneous clients (no global model).

Tan, Long, Liu, Zhou, Lu, Jiang, Zhang. FedProto: Federated Prototype Learning across
Heterogeneous Clients. AAAI 2022. arXiv:2105.00243.

Every client keeps its own model (any architecture, as long as all share one feature
width D: ``model.feature_dim``; init refuses mixed widths). Instead of weights, clients
exchange class prototypes: per-class mean features, a (C, D) matrix per client and round.

Round t, as implemented:
  1. downlink (from round 2 on): the global prototypes (C, D) float32 and the number of
     clients behind each (C,) int64 (0: no prototype for that class).
  2. client: from its kept model (a fresh per-client initialisation in its first round),
     local SGD on ``CE(f(x), y) + λ·MSE(features(x), C̄_y)``, the second term only for
     samples whose class has a global prototype (the others contribute 0; the MSE is the
     mean over the batch's B·D elements, as ``nn.MSELoss`` in the reference code).
  3. upload: the client's prototypes (C, D) float32, the mean features of its training
     samples per class computed after training with the model in eval mode (rows of
     classes it lacks: 0), and its label counts (C,) int64.
  4. server: per class, the mean of the prototypes of the clients holding it, unweighted
     ("clients", default) or weighted by their counts ("counts").
  5. nothing to evaluate globally (``params = {}``): per-client metrics evaluate each
     client's kept model with its own head (local-head inference: ``accuracy``,
     ``test_accuracy``) and with the paper's nearest-prototype inference (the class of
     the nearest global prototype to the model's features, :func:`nearest_prototype`:
     ``proto_accuracy``, ``test_proto_accuracy``; from the first aggregate on), on the
     same held-out split and test set; the summary has both as ``client_accuracy_*`` and
     ``client_proto_accuracy_*`` (and the ``client_test_*`` ones).

What follows the references and what is ours:
  - Prototypes as class means of the embedding, the regulariser λ·‖f(x) − C̄_y‖² as an
    MSE against the global prototype of the label, masking labels without one, and the
    unweighted server mean over the holders follow the official code
    (yuetan031/FedProto, ``lib/utils.py`` ``proto_aggregation``) and PFLlib's
    ``clientproto.py`` / ``serverproto.py``; λ = 1 is the paper's best value on MNIST and
    FEMNIST (0.1 on CIFAR-10; research/algorithms.md §11).
  - The paper's equation weights each client's prototype by its share of the class's
    samples: ``weighting = "counts"`` gives Σ_i |D_ij|·C_ij / N_j.
  - Ours: the prototypes are computed after the local epochs in eval mode over all of the
    client's data (PFLlib does the same in ``collect_protos``; the official code averages
    the training forward passes of the last epoch). Both inferences are reported (the paper
    describes both); the nearest-prototype one uses the global prototypes the client would
    receive next round (those of the last aggregate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfl.algorithms.kit import label_logits as kit
from kdfl.algorithms.kit.features import arch_feature_dim, feature_dim
from kdfl.algorithms.program import Custom, Model, Phase, Program, fresh_weights
from kdfl.losses import MAIN, Batch, CrossEntropy, Outputs
from kdfl.train import LocalSGD
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
    TensorData,
)

PROTOS, HOLDERS, COUNTS = "protos", "proto_holders", "label_counts"
WEIGHTINGS = ("clients", "counts")


@dataclass(frozen=True)
class ProtoLoss:
    """``CE(f(x), y) + λ·Σ_i m_{y_i}·‖z_i − P_{y_i}‖² / (B·D)`` with the features z (B, D),
    the global prototypes P (C, D) and the mask m (C,) (1 where a class has a prototype)
    as the phase constants ``protos`` and ``present``."""

    lam: float
    model: str = MAIN

    def __call__(self, out: Outputs, batch: Batch, consts: Mapping[str, Any]) -> Tensor:
        assert batch.y is not None, "FedProto trains on labelled private data"
        z, logits = out.features(self.model), out.logits(self.model)
        protos = consts["protos"]
        onehot = kit.label_onehot(batch.y, protos.shape[0], z.dtype)  # (B, C)
        target = onehot @ protos  # (B, D)
        present = onehot @ consts["present"]  # (B,)
        mse = (((z - target) ** 2) * present.unsqueeze(-1)).sum() / z.numel()
        return F.cross_entropy(logits, batch.y) + self.lam * mse


def class_means(model: nn.Module, x: Tensor, y: Tensor, num_classes: int,
                batch_size: int = 2048) -> tuple[Tensor, Tensor]:
    """Per-class mean features of ``model`` (eval mode, no grad) over ``(x, y)``:
    (C, D) float32 (rows of absent classes: 0) and the label counts (C,) int64."""
    model.eval()
    device = next(model.parameters()).device
    dim = feature_dim(model, who="fedproto")
    sums = torch.zeros(num_classes, dim, dtype=torch.float64)
    counts = torch.bincount(y.cpu(), minlength=num_classes)[:num_classes].to(torch.int64)
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            z = model.features(x[s: s + batch_size].to(device)).to(torch.float64).cpu()  # type: ignore[operator]
            sums.index_add_(0, y[s: s + batch_size].cpu(), z)
    means = sums / counts.clamp_min(1).to(torch.float64).unsqueeze(-1)
    return means.float(), counts


def aggregate(protos: Tensor, counts: Tensor, weighting: str = "clients") -> tuple[Tensor, Tensor]:
    """Global prototypes from K uploads: ``protos`` (K, C, D), ``counts`` (K, C).

    Returns (C, D) float32 (rows of classes no client holds: 0) and the holders (C,) int64."""
    held = counts > 0
    w = (held.to(torch.float64) if weighting == "clients" else counts.to(torch.float64) * held)  # (K, C)
    total = w.sum(0)  # (C,)
    sums = (w.unsqueeze(-1) * protos.to(torch.float64)).sum(0)  # (C, D)
    out = torch.where(total.unsqueeze(-1) > 0, sums / total.clamp_min(1e-300).unsqueeze(-1), torch.zeros_like(sums))
    return out.float(), held.sum(0).to(torch.int64)


def nearest_prototype(features: Tensor, protos: Tensor, holders: Tensor) -> Tensor:
    """The paper's prototype inference: the class of the nearest (L2) global prototype
    among the classes that have one. ``features`` (n, D) -> (n,) int64."""
    d = torch.cdist(features.float(), protos.float())  # (n, C)
    d = d.masked_fill(~(holders > 0).unsqueeze(0), float("inf"))
    return d.argmin(-1)


def feature_dims(task: Task) -> dict[str, int]:
    """The feature width of every client architecture of the task."""
    return {arch: arch_feature_dim(task, arch, "fedproto") for arch in sorted(set(task.client_archs))}


@dataclass(frozen=True)
class FedProtoState(ServerState):
    """``params`` is empty (no global model). ``dim``: the shared feature width D;
    ``protos`` (C, D) float32 and ``holders`` (C,) int64: the last aggregate (None before
    the first accepted uploads)."""

    dim: int = 0
    protos: Tensor | None = None
    holders: Tensor | None = None


@dataclass(frozen=True)
class FedProto:
    """FedProto (Tan et al., AAAI 2022); see the module docstring.

    Args:
        local: local-training settings.
        lam: λ, weight of the prototype regulariser (1 on MNIST/FEMNIST in the paper,
            0.1 on CIFAR-10).
        weighting: server mean per class over the clients holding it: "clients"
            (unweighted, the official code) or "counts" (by label counts, the paper's
            equation).
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    lam: float = 1.0
    weighting: str = "clients"

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise KdflError(f"algorithm.lam must be >= 0 (got {self.lam})")
        if self.weighting not in WEIGHTINGS:
            raise KdflError(f"algorithm.weighting must be one of {WEIGHTINGS} (got {self.weighting!r})")

    # -- server: init and downlink ----------------------------------------------------
    def init(self, task: Task) -> FedProtoState:
        dims = feature_dims(task)
        if len(set(dims.values())) > 1:
            listed = ", ".join(f"{a} ({d})" for a, d in dims.items())
            raise KdflError(f"fedproto exchanges class prototypes, so every client architecture needs the same "
                            f"feature width (model.feature_dim); got {listed}. Give the architectures one width, "
                            "e.g. with their hidden= option (mlp:hidden=64, cnn:hidden=64).")
        return FedProtoState({}, 0, next(iter(dims.values())))

    def configure(self, task: Task, state: ServerState, client: ClientInfo) -> Payload:
        assert isinstance(state, FedProtoState)
        if state.protos is None or state.holders is None:
            return {}
        return {PROTOS: state.protos, HOLDERS: state.holders}

    # -- client -----------------------------------------------------------------------
    def client_program(self, task: Task, downlink: Payload, client: Client) -> Program:
        own = client.kept(MAIN) or fresh_weights(task, client.id, client.arch)
        protos = downlink.get(PROTOS)
        if protos is None:  # round 1: no global prototypes yet
            phase = Phase(CrossEntropy(), self.local)
        else:
            present = (downlink[HOLDERS] > 0).to(protos.dtype)
            phase = Phase(ProtoLoss(self.lam), self.local, consts={"protos": protos, "present": present},
                          outputs=frozenset({"features"}))
        x, y, c = client.data.x, client.data.y, task.num_classes

        def upload(models: Mapping[str, nn.Module]) -> Payload:
            means, counts = class_means(models[MAIN], x, y, c)
            return {PROTOS: means, COUNTS: counts}

        return Program(models={MAIN: Model(client.arch, own)}, phases=[phase], upload=[Custom(upload)], keep=(MAIN,))

    def client_model(self, task: Task, downlink: Payload, client: Client) -> Model | None:
        """The client's own model (local-head inference)."""
        own = client.kept(MAIN)
        return None if own is None else Model(client.arch, own)

    def client_eval_metrics(self, task: Task, downlink: Payload, client: Client, module: nn.Module,
                            data: TensorData) -> dict[str, float]:
        """Nearest-prototype inference for per-client metrics: ``proto_accuracy`` of the
        client's model (``module``, from :meth:`client_model`) with the global prototypes
        of the downlink on ``data``; nothing before the first aggregate."""
        protos, holders = downlink.get(PROTOS), downlink.get(HOLDERS)
        if protos is None or holders is None or not bool((holders > 0).any()) or not len(data):
            return {}
        module.eval()
        device = next(module.parameters()).device
        hits = 0
        with torch.no_grad():
            for s in range(0, len(data), 2048):
                z = module.features(data.x[s: s + 2048].to(device))  # type: ignore[operator]
                pred = nearest_prototype(z, protos.to(device), holders.to(device))
                hits += int((pred == data.y[s: s + 2048].to(device)).sum())
        return {"proto_accuracy": hits / len(data)}

    # -- server: validate and update --------------------------------------------------
    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        assert isinstance(state, FedProtoState)
        c, d, p = task.num_classes, state.dim, update.payload
        if set(p) != {PROTOS, COUNTS}:
            raise PayloadError(f"expected entries {sorted((PROTOS, COUNTS))}, got {sorted(p)}")
        z = p[PROTOS]
        if tuple(z.shape) != (c, d) or not z.is_floating_point():
            raise PayloadError(f"{PROTOS} is {tuple(z.shape)} {z.dtype}, expected ({c}, {d}) float class prototypes")
        if not torch.isfinite(z).all():
            raise PayloadError(f"{PROTOS} holds NaN or infinite values")
        kit.check_counts(p, COUNTS, c)

    def server_update(self, task: Task, state: FedProtoState,  # type: ignore[override]
                      updates: Sequence[ClientUpdate]) -> tuple[FedProtoState, RoundMetrics]:
        if not updates:
            return FedProtoState({}, state.round + 1, state.dim, state.protos, state.holders), {}
        protos = torch.stack([u.payload[PROTOS].float() for u in updates])  # (K, C, D)
        counts = torch.stack([u.payload[COUNTS].to(torch.int64) for u in updates])  # (K, C)
        glob, holders = aggregate(protos, counts, self.weighting)
        return (FedProtoState({}, state.round + 1, state.dim, glob, holders),
                {"classes_with_prototype": float((holders > 0).sum())})
