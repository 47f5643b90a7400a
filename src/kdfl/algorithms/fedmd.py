"""FedMD: heterogeneous federated learning via model distillation.

Li and Wang. FedMD: Heterogenous Federated Learning via Model Distillation. NeurIPS 2019
Workshop on Federated Learning for Data Privacy and Confidentiality. arXiv:1910.03581.
Reference code: ``diogenes0319/FedMD_clean`` (``FedMD.py``, ``Neural_Networks.py``).

Every client owns a model of its own architecture (``model.client_archs``) and keeps it
across rounds; only class scores on public data cross the wire. There is no global
model: ``state.params`` is empty and kdfl reports the clients' own accuracy.

The paper's loop, per round r: draw a fresh alignment subset S_r of the public data;
*communicate* (every party's logits on S_r, averaged by the server into the consensus
C_r); *digest* (every party fits its logits on S_r to C_r); *revisit* (every party
trains on its private data). A kdfl round is one downlink -> client program -> upload ->
``server_update``, so the loop is cut as follows, which runs the same sequence:

  round 1: client: transfer learning (first participation, below) and revisit; upload
           its logits Z_k on S_1. Server: C_1 = rule(Z_1..Z_K).
  round t: downlink = (S_{t-1}, C_{t-1}) and S_t. Client: digest on (S_{t-1}, C_{t-1}),
           revisit, upload Z_k on S_t. Server: C_t = rule(Z_k on S_t).

so communicate(S_{t-1}) -> consensus -> digest -> revisit -> communicate(S_t) -> ...,
exactly the reference's ``collaborative_training`` loop, whose round r also digests the
consensus of the subset it was computed on. Round 1 plays the reference's initialisation
(public then private training before any collaboration); the consensus of the last round
is computed but never digested (the reference's loop also ends after a communicate).

Steps as implemented:

  0. *Transfer learning* (``transfer_epochs`` > 0): the first time a client takes part
     (no kept model), it trains with cross-entropy on the whole labelled public set
     (``task.proxy`` with ``task.proxy_labels``; the ``[local]`` settings with
     ``transfer_epochs`` epochs) before its private data. The reference trains on the
     public set up to 20 epochs (batch 128, early stopping) and then up to 25 epochs on
     the private data. We default to 5 epochs without early stopping: it runs once per
     client, and on mnist1d (2,000 public rows) 1 epoch left the round-1 consensus right
     on 35% of the public rows, 5 epochs on 85%. The private part is the ordinary revisit
     phase. With an unlabelled proxy (``noise``, ``dataset:NAME``) set it to 0.
  1. *Alignment subset*: S_t = the first ``alignment_size`` rows of a permutation of the
     public set drawn from (seed, t) (sorted); the whole set when it is smaller.
  2. *Communicate*: eval-mode logits (n, C) on S_t, plus C label counts when
     ``class_weighting``.
  3. *Consensus*: coordinate-wise ``aggregator`` over the clients (the reference: the
     plain uniform mean; any rule of ``kdfl list aggregators`` works, e.g. "median"),
     with uniform client weights as the reference; optionally class-count weighted
     (column c of client k weighs its share of class c, as FedEMA-Distill).
  4. *Digest*: ``[algorithm.digest]`` settings on (S_{t-1}, C_{t-1}) with
     ``digest_loss``: "l1" = mean absolute error between logits and consensus logits
     (the reference's Keras ``mean_absolute_error``: mean over classes and batch), or
     "kl" = T²·KL(softmax(C/T) ‖ softmax(z/T)).
  5. *Revisit*: cross-entropy on private data with ``[local]``.

Follows the reference: logits (no softmax) on a fresh public subset per round, uniform
mean consensus, L1 digest for 1 epoch at batch 256, digest then revisit, per-party
models kept across rounds, transfer learning on labelled public data. Our choices:
SGD instead of Adam (lr 1e-3) for the digest by default, so the vectorized executor
batches clients (set ``[algorithm.digest] optimizer = "adam"`` and ``lr = 0.001`` to
match); a fixed number of transfer epochs instead of training to convergence; the
alignment size is capped by the public set; robust / class-weighted consensus and the KL
digest are extensions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kdfl.algorithms.kit import logits as logit_kit
from kdfl.algorithms.program import Const, Data, Logits, Model, Phase, Program, fresh_weights
from kdfl.losses import MAIN, Batch, CrossEntropy, Outputs, kd_kl
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
)

DIGEST_LOSSES = ("l1", "kl")


@dataclass(frozen=True)
class L1Digest:
    """Mean absolute error between ``model``'s logits and the per-sample consensus logits
    (target ``key``): mean over classes and batch, as Keras' ``mean_absolute_error``."""

    key: str = "consensus"
    model: str = MAIN

    def __call__(self, out: Outputs, batch: Batch, consts: Mapping[str, Any]) -> Tensor:
        return (out.logits(self.model) - batch.targets[self.key]).abs().mean()


@dataclass(frozen=True)
class KLDigest:
    """``T²·KL(softmax(c/T) ‖ softmax(z/T))`` averaged over the batch, with c the
    per-sample consensus logits (target ``key``)."""

    temperature: float = 1.0
    key: str = "consensus"
    model: str = MAIN

    def __call__(self, out: Outputs, batch: Batch, consts: Mapping[str, Any]) -> Tensor:
        q = torch.softmax(batch.targets[self.key] / self.temperature, dim=-1)
        return kd_kl(out.logits(self.model), q, self.temperature, t2=True)


@dataclass(frozen=True)
class FedMDState(ServerState):
    """No global model (``params`` is ``{}``). ``consensus``: (n, C) aggregated logits of
    the last round on the public rows ``rows`` (n,), None before the first round."""

    consensus: Tensor | None = None
    rows: Tensor | None = None


def fedmd_digest() -> LocalSGD:
    """The paper's digest (1 epoch, batch 256) with SGD instead of Adam (lr 1e-3) so that
    the vectorized executor batches clients: lr 0.05 with momentum 0.9 (on mnist1d, lr
    0.5 wrecked the transfer-learned models and 0.02 to 0.1 did about as well as Adam)."""
    return LocalSGD(epochs=1, batch_size=256, lr=0.05, momentum=0.9)


@dataclass(frozen=True)
class FedMD:
    """FedMD (see the module docstring).

    Args:
        local: the revisit phase on private data (the ``[local]`` section); also the
            optimizer settings of the transfer-learning phase.
        digest: the digest phase (``[algorithm.digest]``).
        transfer_epochs: epochs of cross-entropy on the labelled public set the first time
            a client takes part (0 = off). Needs public labels (``data.proxy = "holdout"``).
        alignment_size: public rows drawn per round (the paper: 5000); capped by the
            public set.
        aggregator: the consensus rule ("mean" as the paper, "median",
            "trimmed_mean:beta=0.2", any rule of ``kdfl list aggregators``).
        class_weighting: weight client k's class-c logits by its share of class c
            (clients then upload their label counts); with "mean", "median",
            "trimmed_mean".
        digest_loss: "l1" (the paper: mean absolute error on logits) or "kl".
        digest_temperature: T of the "kl" digest.
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    digest: LocalSGD = field(default_factory=fedmd_digest)
    transfer_epochs: int = 5
    alignment_size: int = 5000
    aggregator: str = "mean"
    class_weighting: bool = False
    digest_loss: str = "l1"
    digest_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.digest_loss not in DIGEST_LOSSES:
            raise KdflError(f"algorithm.digest_loss must be one of {', '.join(DIGEST_LOSSES)}; "
                            f"got {self.digest_loss!r}")
        if self.transfer_epochs < 0:
            raise KdflError(f"algorithm.transfer_epochs must be >= 0 (0 = off), got {self.transfer_epochs}")
        if self.alignment_size < 1:
            raise KdflError(f"algorithm.alignment_size must be >= 1, got {self.alignment_size}")
        if self.digest_temperature <= 0:
            raise KdflError(f"algorithm.digest_temperature must be > 0, got {self.digest_temperature}")
        logit_kit.check_rule(self.aggregator, self.class_weighting)

    # -- helpers ----------------------------------------------------------------------
    def digest_objective(self) -> L1Digest | KLDigest:
        return L1Digest() if self.digest_loss == "l1" else KLDigest(self.digest_temperature)

    def rows(self, task: Task, round_num: int) -> Tensor:
        """The alignment subset S_t of ``round_num``: sorted public row indices (int64)."""
        return logit_kit.public_rows(task, self.alignment_size, "fedmd-alignment", round_num)

    # -- server: init and downlink -------------------------------------------------------
    def init(self, task: Task) -> FedMDState:
        if task.proxy is None or len(task.proxy) == 0:
            raise KdflError("FedMD needs a public data set: set data.proxy = 'holdout' (labelled, needed for "
                            "transfer learning) or 'dataset:NAME' and data.proxy_size > 0")
        if self.transfer_epochs and task.proxy_labels is None:
            raise KdflError(f"FedMD's transfer learning (algorithm.transfer_epochs = {self.transfer_epochs}) needs "
                            f"labels for the public data, but the proxy {tuple(task.proxy.shape)} has none: use "
                            "data.proxy = 'holdout', or set algorithm.transfer_epochs = 0")
        return FedMDState({}, 0)

    def configure(self, task: Task, state: ServerState, client: ClientInfo) -> Payload:
        """S_t's indices, plus S_{t-1} and its consensus C_{t-1} after round 1."""
        down: Payload = {"rows": self.rows(task, state.round + 1).int()}
        consensus, rows = getattr(state, "consensus", None), getattr(state, "rows", None)
        if consensus is not None and rows is not None:
            down.update(digest_rows=rows.int(), consensus=consensus)
        return down

    # -- client -------------------------------------------------------------------------
    def client_program(self, task: Task, downlink: Payload, client: Client) -> Program:
        """[transfer (first participation)], [digest (after round 1)], revisit; upload
        logits on S_t (and label counts); keep the model."""
        assert task.proxy is not None
        own = client.kept(MAIN)
        phases: list[Phase] = []
        if own is None and self.transfer_epochs:
            labels = task.proxy_labels
            if labels is None:
                raise KdflError("FedMD's transfer learning needs labelled public data (task.proxy_labels); "
                                "use data.proxy = 'holdout' or set algorithm.transfer_epochs = 0")
            settings = dataclasses.replace(self.local, epochs=self.transfer_epochs, steps=0)
            phases.append(Phase(CrossEntropy(), settings, data=Data(task.proxy, labels), name="transfer"))
        if "consensus" in downlink:
            public = Data(task.proxy[downlink["digest_rows"].long().cpu()],  # the proxy lives on the host
                          targets={"consensus": downlink["consensus"].float()})
            phases.append(Phase(self.digest_objective(), self.digest, data=public, name="digest"))
        phases.append(Phase(CrossEntropy(), self.local, name="revisit"))
        upload: list[Any] = [Logits(task.proxy[downlink["rows"].long().cpu()])]  # (n, C) float32
        if self.class_weighting:
            upload.append(Const({"label_counts": torch.bincount(client.data.y, minlength=task.num_classes)}))
        weights = own if own is not None else fresh_weights(task, client.id, client.arch)
        return Program(models={MAIN: Model(client.arch, weights)}, phases=phases, upload=upload, keep=(MAIN,))

    # -- server: validate and update -----------------------------------------------------
    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        p = update.payload
        expected = {"logits", "label_counts"} if self.class_weighting else {"logits"}
        extra = sorted(set(p) - expected)
        if extra:
            raise PayloadError(f"FedMD payload has unexpected entries {extra}; expected {sorted(expected)}")
        z = p.get("logits")
        if z is None:
            raise PayloadError("FedMD payload has no 'logits' entry")
        n = len(self.rows(task, state.round + 1))
        if not z.is_floating_point():
            raise PayloadError(f"logits must be a float tensor, got {z.dtype}")
        if tuple(z.shape) != (n, task.num_classes):
            raise PayloadError(f"logits are {tuple(z.shape)}, expected ({n}, {task.num_classes}): one row per "
                               "public row of this round's alignment subset")
        if self.class_weighting:
            check_label_counts(p.get("label_counts"), task.num_classes, update.num_examples)

    def server_update(self, task: Task, state: ServerState,
                      updates: Sequence[ClientUpdate]) -> tuple[FedMDState, RoundMetrics]:
        t = state.round + 1
        rows = self.rows(task, t)
        consensus = self.consensus(updates)
        metrics = {"consensus_confidence": float(torch.softmax(consensus, -1).max(-1).values.mean())}
        labels = task.proxy_labels
        if labels is not None:  # a diagnostic: how often the consensus is right on the public rows (which
            # the clients trained on in transfer learning, so it is optimistic)
            metrics["consensus_accuracy"] = float((consensus.argmax(-1) == labels[rows]).float().mean())
        return FedMDState({}, t, consensus, rows), metrics

    def consensus(self, updates: Sequence[ClientUpdate]) -> Tensor:
        """C = rule over clients of their logits (K, n, C) -> (n, C), uniform client weights
        (as the reference), class-weighted when ``class_weighting``."""
        z = torch.stack([u.payload["logits"].float() for u in updates])
        counts = torch.stack([u.payload["label_counts"] for u in updates]) if self.class_weighting else None
        return logit_kit.aggregate_logits(z, self.aggregator, torch.ones(len(updates)), counts)


def check_label_counts(c: Tensor | None, num_classes: int, num_examples: int) -> None:
    """Reject label counts that are missing, of the wrong shape or dtype, negative, or not
    summing to the client's number of examples."""
    if c is None:
        raise PayloadError("payload has no 'label_counts' entry (class_weighting is on)")
    if c.is_floating_point() or c.dtype == torch.bool or tuple(c.shape) != (num_classes,):
        raise PayloadError(f"label_counts must be ({num_classes},) non-negative integers, got {tuple(c.shape)} "
                           f"{c.dtype}")
    if (c < 0).any():
        raise PayloadError(f"label_counts must be ({num_classes},) non-negative integers, got negative counts")
    if int(c.sum()) != num_examples:
        raise PayloadError(f"label_counts sum to {int(c.sum())} but the client reports {num_examples} examples")
