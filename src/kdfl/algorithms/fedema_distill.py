"""FedEMA-Distill: robust logit aggregation, server-side distillation, EMA of the global model.

Reguieg, El Kamili, Sabir. FedEMA-Distill: Exponential Moving Average Guided Knowledge
Distillation for Robust Federated Learning. arXiv:2603.04422, 2026.

**This module is a reconstruction.** Only the paper's abstract is available: clients run
standard local training and upload compressed logits on a small public proxy set; the
server aggregates them with a coordinate-wise median or trimmed mean, distils them into
the global model and keeps an exponential moving average (EMA) of it; clients may use
different architectures. Everything else (loss form, temperature, EMA decay and where it
is applied, proxy size, downlink, aggregation space) is unknown and is a switch here. The defaults
were chosen under kdfl's benchmark protocol across 3 seeds, one switch at a time, clean and
under 20 % Byzantine clients (benchmarks/PROTOCOL.md, claim 3;
benchmarks/results/protocol_fedema_ablation_mnist1d.md): a trimmed mean (beta 0.2) of
probabilities at T = 3 without class weighting, the EMA with decay 0.9 and its warm-up,
300 Adam steps per round, the whole proxy every round.

Round t, as implemented:
  1. downlink: ``ema_weights`` sends θ_e to clients whose architecture is the server's
     (they start local training from it); clients of other architectures (or with
     ``downlink = "none"``) keep their own model across rounds. Plus the proxy indices of
     the round when ``proxy_subset`` > 0.
  2. client: E epochs of plain cross-entropy, then logits Z_k on the proxy (n, C) in eval
     mode; the engine compresses them with the configured codec.
  3. server: optional clipping; map every Z_k into the aggregation ``space`` (raw logits,
     row-centred, row-standardised, log-probabilities or probabilities at T); aggregate
     coordinate-wise with the configured rule (median, trimmed mean, mean, ...); turn the
     aggregate into teacher probabilities q; optionally smooth q over rounds (γ).
  4. distil the student θ_s (initialised from θ_s or θ_e) with T²·KL(q ‖ softmax(f/T)) (``[algorithm.distill]``).
  5. θ_e ← β_t·θ_e + (1 − β_t)·θ_s with β_t = min(β, (1 + t)/(10 + t)) when warm-up is on.
  6. the engine evaluates θ_e (``state.params``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kdfl import tree
from kdfl.algorithms.kit import logits as logit_kit
from kdfl.algorithms.kit.distill import DistillSettings, distill
from kdfl.algorithms.kit.server_opt import EMA
from kdfl.algorithms.program import Const, Logits, Model, Phase, Program, fresh_weights
from kdfl.losses import MAIN, CrossEntropy
from kdfl.rng import generator
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
    StateDict,
    Task,
)

W = "w."  # downlink prefix of the EMA weights


@dataclass(frozen=True)
class FedEMAState(ServerState):
    """``params``: the EMA weights θ_e (evaluated and sent); ``student``: θ_s;
    ``teacher``: the last round's teacher probabilities q (for ``teacher_ema``)."""

    student: StateDict = field(default_factory=dict)
    teacher: Tensor | None = None


def fedema_distill() -> DistillSettings:
    """The server loop our measurements chose: 300 Adam steps at 3e-3, batch 128, T = 3
    with T², no cosine schedule."""
    return DistillSettings(steps=300, batch_size=128, lr=3e-3, optimizer="adam", cosine=False, temperature=3.0,
                           t2=True)


@dataclass(frozen=True)
class FedEMADistill:
    """FedEMA-Distill (reconstruction; see the module docstring).

    Args:
        local: client local-training settings (plain cross-entropy).
        distill: the server's distillation loop (``[algorithm.distill]``); its
            ``temperature`` (T) also maps the uploads into the aggregation space.
        downlink: "ema_weights" (same-architecture clients start from θ_e) or "none"
            (every client keeps its own model; only logits ever cross the wire).
        proxy_subset: proxy samples per round (0 = the whole proxy every round).
        space: aggregation space: "logits", "centered", "standardized", "logprobs", "probs".
        aggregator: coordinate-wise rule, e.g. "median", "trimmed_mean:beta=0.2", "mean".
        class_weighting: weight each client's column c by its share of class c (clients
            upload their C label counts); supported with "mean", "median" and "trimmed_mean".
            Label counts are claimed by the clients: a liar can move weight between
            classes, but each client's total weight stays 1.
        clip: clip uploaded logits to [-clip, clip] before aggregation (0 = off).
        teacher_ema: γ, smoothing of the teacher over rounds (0 = off; needs a fixed proxy).
        student_init: "student" (Polyak averaging of a continuing student) or "ema".
        ema_decay: β.
        ema_warmup: β_t = min(β, (1+t)/(10+t)).
        bn_buffers: "ema" (average BatchNorm statistics too) or "copy" (take the student's).
        ema_teacher_weight: λ_e, weight of an extra KD term towards θ_e (0 = off).
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    distill: DistillSettings = field(default_factory=fedema_distill)
    downlink: str = "ema_weights"
    proxy_subset: int = 0
    space: str = "probs"
    aggregator: str = "trimmed_mean:beta=0.2"
    class_weighting: bool = False
    clip: float = 0.0
    teacher_ema: float = 0.0
    student_init: str = "student"
    ema_decay: float = 0.9
    ema_warmup: bool = True
    bn_buffers: str = "ema"
    ema_teacher_weight: float = 0.0

    def __post_init__(self) -> None:
        choices = {
            "downlink": ("ema_weights", "none"), "space": logit_kit.SPACES, "student_init": ("student", "ema"),
            "bn_buffers": ("ema", "copy"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise KdflError(f"algorithm.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        if not 0 <= self.ema_decay < 1 or not 0 <= self.teacher_ema < 1:
            raise KdflError("algorithm.ema_decay and algorithm.teacher_ema must be in [0, 1)")
        if self.clip < 0 or self.proxy_subset < 0 or self.ema_teacher_weight < 0:
            raise KdflError("algorithm.clip, proxy_subset and ema_teacher_weight must be >= 0")
        logit_kit.check_rule(self.aggregator, self.class_weighting)

    @property
    def temperature(self) -> float:
        return self.distill.temperature

    def ema(self) -> EMA:
        return EMA(self.ema_decay, self.ema_warmup, copy_buffers=self.bn_buffers == "copy")

    # -- server: init and downlink --------------------------------------------------
    def init(self, task: Task) -> FedEMAState:
        if task.proxy is None or len(task.proxy) == 0:
            raise KdflError("FedEMA-Distill needs a public proxy set: set data.proxy ('holdout', 'noise' or "
                            "'dataset:NAME') and data.proxy_size > 0")
        params = tree.state_of(task.new_model(task.server_arch))
        return FedEMAState(params, 0, params)

    def proxy_indices(self, task: Task, round_num: int) -> Tensor:
        """The proxy rows used in ``round_num`` (all rows unless ``proxy_subset``)."""
        return logit_kit.public_rows(task, self.proxy_subset, "proxy", round_num)

    def configure(self, task: Task, state: ServerState, client: ClientInfo) -> Payload:
        payload: Payload = {}
        if self.proxy_subset:
            payload["proxy_idx"] = self.proxy_indices(task, state.round + 1)
        if self.downlink == "ema_weights" and client.arch == task.server_arch:
            payload.update({W + k: v for k, v in state.params.items()})
        return payload

    # -- client ---------------------------------------------------------------------
    def client_program(self, task: Task, downlink: Payload, client: Client) -> Program:
        """Train from θ_e (or, for a stateful client, its own kept model) with
        cross-entropy; upload logits on the round's proxy rows (and label counts)."""
        assert task.proxy is not None
        weights = {k[len(W) :]: v for k, v in downlink.items() if k.startswith(W)}
        stateful = not weights
        if stateful:  # its own model, kept across rounds
            weights = client.kept(MAIN) or fresh_weights(task, client.id, client.arch)
        idx = downlink.get("proxy_idx")
        upload: list = [Logits(task.proxy if idx is None else task.proxy[idx.cpu()])]  # (n, C) float32; proxy on the host
        if self.class_weighting:
            upload.append(Const({"label_counts": torch.bincount(client.data.y, minlength=task.num_classes)}))
        return Program(models={MAIN: Model(client.arch, weights)}, phases=[Phase(CrossEntropy(), self.local)],
                       upload=upload, keep=(MAIN,) if stateful else ())

    def client_model(self, task: Task, downlink: Payload, client: Client) -> Model:
        """The EMA weights for a client that receives them, else its own kept model."""
        weights = {k[len(W) :]: v for k, v in downlink.items() if k.startswith(W)}
        if weights:
            return Model(client.arch, weights)
        return Model(client.arch, client.kept(MAIN) or fresh_weights(task, client.id, client.arch))

    # -- server: validate and update -------------------------------------------------
    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        z = update.payload.get("logits")
        n = len(self.proxy_indices(task, state.round + 1))
        if z is None:
            raise PayloadError("FedEMA-Distill payload has no 'logits' entry")
        if tuple(z.shape) != (n, task.num_classes) or not z.is_floating_point():
            raise PayloadError(f"logits are {tuple(z.shape)} {z.dtype}, expected ({n}, {task.num_classes}) float")
        if self.class_weighting:
            c = update.payload.get("label_counts")
            if c is None or tuple(c.shape) != (task.num_classes,) or c.is_floating_point() or (c < 0).any():
                raise PayloadError(f"label_counts must be ({task.num_classes},) non-negative integers")

    def teacher(self, updates: Sequence[ClientUpdate]) -> Tensor:
        """The teacher probabilities q (n, C) from the clients' logits."""
        z = torch.stack([u.payload["logits"].float() for u in updates])  # (K, n, C)
        if self.clip:
            z = z.clamp(-self.clip, self.clip)
        x = logit_kit.to_space(z, self.space, self.temperature)
        counts = torch.stack([u.payload["label_counts"] for u in updates]) if self.class_weighting else None
        w = torch.tensor([float(u.num_examples) for u in updates])
        return logit_kit.to_probs(logit_kit.aggregate_logits(x, self.aggregator, w, counts), self.space,
                                  self.temperature)

    def server_update(self, task: Task, state: FedEMAState,  # type: ignore[override]
                      updates: Sequence[ClientUpdate]) -> tuple[FedEMAState, RoundMetrics]:
        assert task.proxy is not None
        t = state.round + 1
        idx = self.proxy_indices(task, t)
        q = self.teacher(updates)
        prev = state.teacher
        if self.teacher_ema and prev is not None and prev.shape == q.shape and not self.proxy_subset:
            q = self.teacher_ema * prev + (1 - self.teacher_ema) * q
        student = task.new_model(task.server_arch)
        student.load_state_dict(state.params if self.student_init == "ema" else state.student)
        ema_model = None
        if self.ema_teacher_weight:
            ema_model = task.new_model(task.server_arch)
            ema_model.load_state_dict(state.params)
        stats = distill(
            student, task.proxy[idx], q, self.distill, generator(task.seed, "distill", t),
            extra_teacher=(ema_model, self.ema_teacher_weight) if ema_model is not None else None,
        )
        theta_s = tree.state_of(student)
        theta_e = self.ema().update(state.params, theta_s, t)
        metrics = {**stats, "teacher_confidence": float(q.max(-1).values.mean())}
        return FedEMAState(theta_e, t, theta_s, q), metrics
