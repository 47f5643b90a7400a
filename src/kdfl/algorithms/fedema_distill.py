"""FedEMA-Distill: robust logit aggregation, server-side distillation, EMA of the global model.

Reguieg, El Kamili, Sabir. FedEMA-Distill: Exponential Moving Average Guided Knowledge
Distillation for Robust Federated Learning. arXiv:2603.04422, 2026.

**This module is a reconstruction.** Only the paper's abstract is available: clients run
standard local training and upload compressed logits on a small public proxy set; the
server aggregates them with a coordinate-wise median or trimmed mean, distils them into
the global model and keeps an exponential moving average (EMA) of it; clients may use
different architectures. Everything else (loss form, temperature, EMA decay and where it
is applied, proxy size, downlink, aggregation space) is unknown and is a switch here, with
defaults from kdfl's design notes (research/algorithms.md §2.4) and our own measurements.

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
  4. distil the student θ_s (initialised from θ_s or θ_e) with T²·KL(q ‖ softmax(f/T)).
  5. θ_e ← β_t·θ_e + (1 − β_t)·θ_s with β_t = min(β, (1 + t)/(10 + t)) when warm-up is on.
  6. the engine evaluates θ_e (``state.params``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kdfl import tree
from kdfl.aggregation import aggregate_tensors, make_aggregator
from kdfl.algorithms.base import LocalJob, local_update
from kdfl.distill import DistillSettings, distill
from kdfl.losses import cross_entropy
from kdfl.rng import derive, generator
from kdfl.spec import parse_spec
from kdfl.train import LocalSGD, predict
from kdfl.types import Client, ClientUpdate, KdflError, Payload, PayloadError, ServerState, StateDict, Task

W = "w."  # downlink prefix of the EMA weights
SPACES = ("logits", "centered", "standardized", "logprobs", "probs")


def to_space(z: Tensor, space: str, temperature: float) -> Tensor:
    """Map client logits (K, n, C) into the space where they are aggregated."""
    if space == "logits":
        return z
    if space == "centered":
        return z - z.mean(-1, keepdim=True)
    if space == "standardized":
        c = z - z.mean(-1, keepdim=True)
        return c / c.std(-1, keepdim=True).clamp_min(1e-6)
    if space == "logprobs":
        return torch.log_softmax(z / temperature, -1)
    return torch.softmax(z / temperature, -1)


def to_probs(agg: Tensor, space: str, temperature: float) -> Tensor:
    """Teacher probabilities q (n, C) from an aggregate in ``space``."""
    if space == "logprobs":
        return torch.softmax(agg, -1)
    if space == "probs":
        p = agg.clamp_min(0)
        s = p.sum(-1, keepdim=True)
        uniform = torch.full_like(p, 1.0 / p.shape[-1])
        return torch.where(s > 0, p / s.clamp_min(1e-12), uniform)  # median of probs need not sum to 1
    return torch.softmax(agg / temperature, -1)


def class_shares(counts: Tensor) -> Tensor:
    """Each client's label distribution (K, C): counts normalised per client, so a client's
    total weight over all classes is 1 whatever it claims (bounded influence)."""
    c = counts.double().clamp_min(0)
    return c / c.sum(-1, keepdim=True).clamp_min(1.0)


def class_weighted_mean(x: Tensor, shares: Tensor) -> Tensor:
    """Per-class weighted mean: column c of client k weighs its share of class c
    (FedAD-style class-count weighting). x: (K, n, C), shares: (K, C) -> (n, C)."""
    w = (shares + 1e-6).to(x.dtype)  # a class nobody holds falls back to a uniform mean
    return (x * w[:, None, :]).sum(0) / w.sum(0)[None, :]


def class_weighted_median(x: Tensor, shares: Tensor) -> Tensor:
    """Per-class weighted median: for column c, the value where the cumulative weight of
    the sorted clients (weights = their share of class c) first reaches half.

    Under label skew only a few clients know class c; an unweighted median lets the
    majority that never saw c outvote them. x: (K, n, C), shares: (K, C) -> (n, C).
    """
    w = (shares + 1e-6).to(x.dtype)[:, None, :].expand_as(x)  # (K, n, C)
    xs, order = x.sort(0)
    cw = w.gather(0, order).cumsum(0)  # (K, n, C)
    k = (cw < 0.5 * cw[-1:]).sum(0, keepdim=True).clamp_max(x.shape[0] - 1)  # first index reaching half
    return xs.gather(0, k).squeeze(0)


def class_weighted_trimmed_mean(x: Tensor, shares: Tensor, beta: float = 0.1) -> Tensor:
    """Per-class weighted trimmed mean: per column, sort the clients, drop the lowest and
    the highest ``beta`` fraction of the column's *weight* (partially cutting the client
    on each boundary) and average the rest by weight. ``beta = 0`` is the weighted mean.
    x: (K, n, C), shares: (K, C) -> (n, C)."""
    w = (shares + 1e-6).to(x.dtype)[:, None, :].expand_as(x)
    xs, order = x.sort(0)
    ws = w.gather(0, order)
    hi = ws.cumsum(0) / ws.sum(0, keepdim=True)  # each client's weight interval [lo, hi] in (0, 1]
    lo = hi - ws / ws.sum(0, keepdim=True)
    keep = (torch.minimum(hi, torch.full_like(hi, 1 - beta)) - torch.maximum(lo, torch.full_like(lo, beta))).clamp_min(0)
    return (xs * keep).sum(0) / keep.sum(0).clamp_min(1e-12)


@dataclass(frozen=True)
class FedEMADistill:
    """FedEMA-Distill (reconstruction; see the module docstring).

    Args:
        local: client local-training settings (plain cross-entropy).
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
        temperature: T for the teacher and the student.
        teacher_ema: γ, smoothing of the teacher over rounds (0 = off; needs a fixed proxy).
        distill_steps, distill_batch_size, distill_lr, distill_optimizer: the server loop.
        student_init: "student" (Polyak averaging of a continuing student) or "ema".
        ema_decay: β.
        ema_warmup: β_t = min(β, (1+t)/(10+t)).
        bn_buffers: "ema" (average BatchNorm statistics too) or "copy" (take the student's).
        ema_teacher_weight: λ_e, weight of an extra KD term towards θ_e (0 = off).
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    downlink: str = "ema_weights"
    proxy_subset: int = 0
    space: str = "probs"
    aggregator: str = "median"
    class_weighting: bool = True
    clip: float = 0.0
    temperature: float = 3.0
    teacher_ema: float = 0.0
    distill_steps: int = 300
    distill_batch_size: int = 128
    distill_lr: float = 3e-3
    distill_optimizer: str = "adam"
    student_init: str = "student"
    ema_decay: float = 0.9
    ema_warmup: bool = True
    bn_buffers: str = "ema"
    ema_teacher_weight: float = 0.0

    def __post_init__(self) -> None:
        choices = {
            "downlink": ("ema_weights", "none"), "space": SPACES, "student_init": ("student", "ema"),
            "bn_buffers": ("ema", "copy"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise KdflError(f"algorithm.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        if not 0 <= self.ema_decay < 1 or not 0 <= self.teacher_ema < 1:
            raise KdflError("algorithm.ema_decay and algorithm.teacher_ema must be in [0, 1)")
        if self.clip < 0 or self.proxy_subset < 0 or self.ema_teacher_weight < 0:
            raise KdflError("algorithm.clip, proxy_subset and ema_teacher_weight must be >= 0")
        name, hyper = parse_spec(self.aggregator)
        make_aggregator(name, **hyper)
        if self.class_weighting and name not in ("mean", "median", "trimmed_mean"):
            raise KdflError("algorithm.class_weighting works with the 'mean', 'median' and 'trimmed_mean' "
                            f"aggregators, not {name!r}; set class_weighting = false for other rules")
        self.settings()

    def settings(self) -> DistillSettings:
        return DistillSettings(
            steps=self.distill_steps, batch_size=self.distill_batch_size, lr=self.distill_lr,
            optimizer=self.distill_optimizer, cosine=False, temperature=self.temperature, t2=True,
        )

    # -- server: init and downlink --------------------------------------------------
    def init(self, task: Task) -> ServerState:
        if task.proxy is None or len(task.proxy) == 0:
            raise KdflError("FedEMA-Distill needs a public proxy set: set data.proxy ('holdout', 'noise' or "
                            "'dataset:NAME') and data.proxy_size > 0")
        params = tree.state_of(task.new_model(task.server_arch))
        return ServerState(params, 0, {"student": params})

    def proxy_indices(self, task: Task, round_num: int) -> Tensor:
        """The proxy rows used in ``round_num`` (all rows unless ``proxy_subset``)."""
        assert task.proxy is not None
        n = len(task.proxy)
        if not self.proxy_subset or self.proxy_subset >= n:
            return torch.arange(n)
        return torch.randperm(n, generator=generator(task.seed, "proxy", round_num))[: self.proxy_subset].sort().values

    def configure(self, task: Task, state: ServerState, client: Client) -> Payload:
        payload: Payload = {}
        if self.proxy_subset:
            payload["proxy_idx"] = self.proxy_indices(task, state.round + 1)
        if self.downlink == "ema_weights" and client.arch == task.server_arch:
            payload.update({W + k: v for k, v in state.params.items()})
        return payload

    # -- client ---------------------------------------------------------------------
    def prepare(self, task: Task, downlink: Payload, client: Client) -> LocalJob:
        weights = {k[len(W) :]: v for k, v in downlink.items() if k.startswith(W)}
        if not weights:  # a stateful client: its own model, kept across rounds
            if client.state is not None:
                weights = client.state["params"]
            else:
                weights = tree.state_of(task.new_model(client.arch, seed=derive(task.seed, "client-init", client.id)))
        return LocalJob(client.arch, weights, cross_entropy(), self.local)

    def finish(self, task: Task, downlink: Payload, client: Client, model: nn.Module,
               stats: dict[str, float]) -> ClientUpdate:
        assert task.proxy is not None
        idx = downlink.get("proxy_idx")
        x = task.proxy if idx is None else task.proxy[idx]
        payload: Payload = {"logits": predict(model, x)}  # (n, C) float32
        if self.class_weighting:
            payload["label_counts"] = torch.bincount(client.data.y, minlength=task.num_classes)
        stateful = not any(k.startswith(W) for k in downlink)
        state = {"params": tree.state_of(model)} if stateful else None
        return ClientUpdate(client.id, len(client.data), payload, stats, state)

    def client_update(self, task: Task, downlink: Payload, client: Client) -> ClientUpdate:
        return local_update(self, task, downlink, client)

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
        x = to_space(z, self.space, self.temperature)
        name, hyper = parse_spec(self.aggregator)
        if self.class_weighting:
            shares = class_shares(torch.stack([u.payload["label_counts"] for u in updates]))
            if name == "trimmed_mean":
                agg = class_weighted_trimmed_mean(x, shares, **{"beta": 0.1, **hyper})
            else:
                agg = (class_weighted_mean if name == "mean" else class_weighted_median)(x, shares)
        else:
            w = torch.tensor([float(u.num_examples) for u in updates])
            agg = aggregate_tensors(make_aggregator(name, **hyper), list(x), w)
        return to_probs(agg, self.space, self.temperature)

    def ema(self, ema: StateDict, student: StateDict, round_num: int) -> StateDict:
        """θ_e ← β_t·θ_e + (1 − β_t)·θ_s."""
        beta = min(self.ema_decay, (1 + round_num) / (10 + round_num)) if self.ema_warmup else self.ema_decay
        out = tree.lerp(ema, student, beta)
        if self.bn_buffers == "copy":
            out.update({k: student[k].clone() for k in student if "running_" in k})
        return out

    def server_update(self, task: Task, state: ServerState, updates: Sequence[ClientUpdate]) -> ServerState:
        assert task.proxy is not None
        t = state.round + 1
        idx = self.proxy_indices(task, t)
        q = self.teacher(updates)
        prev = state.extra.get("teacher")
        if self.teacher_ema and prev is not None and prev.shape == q.shape and not self.proxy_subset:
            q = self.teacher_ema * prev + (1 - self.teacher_ema) * q
        student = task.new_model(task.server_arch)
        student.load_state_dict(state.params if self.student_init == "ema" else state.extra["student"])
        ema_model = None
        if self.ema_teacher_weight:
            ema_model = task.new_model(task.server_arch)
            ema_model.load_state_dict(state.params)
        stats = distill(
            student, task.proxy[idx], q, self.settings(), generator(task.seed, "distill", t),
            extra_teacher=(ema_model, self.ema_teacher_weight) if ema_model is not None else None,
        )
        theta_s = tree.state_of(student)
        theta_e = self.ema(state.params, theta_s, t)
        metrics = {**stats, "teacher_confidence": float(q.max(-1).values.mean())}
        return ServerState(theta_e, t, {"student": theta_s, "teacher": q, "metrics": metrics})
