"""Server-side distillation: the nested settings table and the one ``distill`` loop.

Every algorithm that distils on the server nests :class:`DistillSettings` as its
``distill`` field (``[algorithm.distill]`` in a config) with its own defaults. Used by
FedDF (teachers are the received client models) and FedEMA-Distill (the teacher is the
robust aggregate of uploaded logits). Targets are always probabilities q (n, C);
the student minimises T²·KL(q ‖ softmax(f(x)/T)) (or without T², as FedDF's code).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdfl.losses import kd_kl
from kdfl.train import evaluate, predict
from kdfl.types import KdflError, TensorData


@dataclass(frozen=True)
class DistillSettings:
    """Settings of the server's distillation loop.

    Args:
        steps: optimizer steps (0 = no distillation).
        batch_size: proxy samples per step.
        lr: learning rate.
        optimizer: "adam" (FedDF) or "sgd".
        cosine: cosine-anneal the learning rate over ``steps`` (FedDF).
        temperature: T.
        t2: scale the KL by T² (Hinton); FedDF's released code does not.
        grad_clip: max gradient norm (FedDF: 5); 0 = off.
        eval_every: validation period in steps for early stopping.
        patience: stop after this many steps without a better validation accuracy and
            keep the best checkpoint (FedDF: 1000); 0 = no early stopping.
    """

    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    cosine: bool = True
    temperature: float = 1.0
    t2: bool = True
    grad_clip: float = 5.0
    eval_every: int = 100
    patience: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.temperature <= 0:
            raise KdflError("[algorithm.distill]: steps >= 0, batch_size >= 1, lr > 0 and temperature > 0 are "
                            f"required (got steps={self.steps}, batch_size={self.batch_size}, lr={self.lr}, "
                            f"temperature={self.temperature})")
        if self.optimizer not in ("adam", "sgd"):
            raise KdflError(f"algorithm.distill.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.grad_clip < 0 or self.eval_every < 1 or self.patience < 0:
            raise KdflError("[algorithm.distill]: grad_clip >= 0, eval_every >= 1 and patience >= 0 are required")


def teacher_logits(models: Sequence[nn.Module], x: Tensor, vectorize: bool | None = None) -> Tensor:
    """Each teacher's logits on ``x``: (models, N, C) (callers pick how to combine them),
    computed once per round: one vectorized pass over same-architecture teachers on an
    accelerator, a loop of cache-sized batches on the CPU (faster there; see
    :func:`kdfl.algorithms.kit.logits.models_logits`)."""
    from kdfl.algorithms.kit.logits import models_logits

    return models_logits(models, x, vectorize)


def distill(
    student: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    settings: DistillSettings,
    generator: torch.Generator,
    val: TensorData | None = None,
    extra_teacher: tuple[nn.Module, float] | None = None,
) -> dict[str, float]:
    """Train ``student`` in place towards ``targets`` on ``inputs``.

    Args:
        student: the model to train (train mode: BatchNorm statistics follow the proxy).
        inputs: (N, *input_shape) unlabeled distillation data.
        targets: (N, C) teacher probabilities (already softened by T).
        settings: loop settings.
        generator: batch-order randomness.
        val: labeled data for early stopping (used when ``settings.patience`` > 0).
        extra_teacher: optional (model, weight λ): adds λ·T²·KL(softmax(m(x)/T) ‖ ·),
            e.g. FedEMA-Distill's EMA model as a second teacher.

    Returns:
        ``{"distill_loss": mean loss, "distill_steps": steps run}``.
    """
    s = settings
    lam = extra_teacher[1] if extra_teacher is not None else 0.0
    # the extra teacher is fixed (eval mode): its probabilities on every row, in one pass
    q_extra = (torch.softmax(predict(extra_teacher[0], inputs) / s.temperature, dim=-1)
               if extra_teacher is not None and lam > 0 and s.steps > 0 else None)

    def kd_loss(model: nn.Module, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        device = next(model.parameters()).device
        x, q = inputs[idx].to(device), targets[idx].to(device)
        out = model(x)  # one forward: BatchNorm statistics move once per step
        loss = kd_kl(out, q, s.temperature, s.t2)
        if q_extra is not None:
            loss = loss + lam * kd_kl(out, q_extra[idx].to(device), s.temperature, s.t2)
        return loss, {}

    return distill_loop(student, len(inputs), kd_loss, s, generator, val)


BatchLoss = Callable[[nn.Module, Tensor], tuple[Tensor, dict[str, Tensor]]]


def batch_schedule(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[Tensor]:
    """The rows of each of ``steps`` batches, drawn before the loop starts: consecutive
    slices of a permutation of the ``n`` rows (the last slice may be shorter), a fresh
    permutation from ``generator`` when the rows run out. The same batches, in the same
    order, as drawing each permutation when it is needed (the permutations come from
    ``generator`` in the same sequence; ``distill_loop`` owns it, so drawing the ones an
    early stop leaves unused changes nothing)."""
    per = -(-n // batch_size)  # batches per permutation
    perms = [torch.randperm(n, generator=generator) for _ in range(-(-steps // per))]
    return [perms[i // per][(i % per) * batch_size : (i % per + 1) * batch_size] for i in range(steps)]


def distill_loop(student: nn.Module, n: int, batch_loss: BatchLoss, settings: DistillSettings,
                 generator: torch.Generator, val: TensorData | None = None) -> dict[str, float]:
    """The server's training loop, for any loss: ``batch_loss(student, idx) -> (loss,
    named terms)`` on the rows ``idx`` of the algorithm's data (n rows). Batch order from
    ``generator`` (a fresh permutation when the rows run out), Adam or SGD (momentum 0.9),
    optional cosine schedule, gradient clipping and early stopping on ``val``; the student
    is in train mode during each step. Returns the mean loss (``distill_loss``), the mean
    of each term and ``distill_steps``."""
    s = settings
    if s.steps == 0 or n == 0:
        return {"distill_loss": math.nan, "distill_steps": 0.0}
    params = [p for p in student.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=s.lr) if s.optimizer == "adam" else torch.optim.SGD(params, lr=s.lr, momentum=0.9)
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.steps) if s.cosine else None
    early = val is not None and s.patience > 0
    best_acc, best_step, best_state = -1.0, 0, None
    sums: dict[str, Tensor] = {}  # float64 on the student's device: no host sync per step
    done = 0
    for step, idx in enumerate(batch_schedule(n, s.batch_size, s.steps, generator), start=1):
        student.train()
        loss, terms = batch_loss(student, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        for k, v in {"distill_loss": loss, **terms}.items():
            d = v.detach().double()
            sums[k] = sums[k] + d if k in sums else d
        done = step
        if early and (step % s.eval_every == 0 or step == s.steps):
            assert val is not None
            acc = evaluate(student, val)["accuracy"]
            if acc > best_acc:
                best_acc, best_step, best_state = acc, step, copy.deepcopy(student.state_dict())
            elif step - best_step >= s.patience:
                break
    if best_state is not None:
        student.load_state_dict(best_state)
    return {**{k: float(v) / max(done, 1) for k, v in sums.items()}, "distill_steps": float(done)}
