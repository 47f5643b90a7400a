"""The one training loop (``local_train``) and the one evaluation (``evaluate``)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdfl import metrics
from kdfl.losses import Batch, Loss
from kdfl.types import KdflError, TensorData


@dataclass(frozen=True)
class LocalSGD:
    """Local-training settings shared by every algorithm.

    Args:
        epochs: passes over the client's data (ignored when ``steps`` > 0).
        steps: exact number of optimizer steps (cycling over epochs); 0 = use epochs.
        batch_size: mini-batch size (the last batch of an epoch may be smaller).
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty applied by the optimizer.
        optimizer: "sgd" or "adam".
    """

    epochs: int = 1
    steps: int = 0
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise KdflError(f"local.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.epochs < 0 or self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise KdflError(
                "local: epochs and steps must be >= 0, batch_size >= 1 and lr > 0 "
                f"(got epochs={self.epochs}, steps={self.steps}, batch_size={self.batch_size}, lr={self.lr})"
            )

    def num_steps(self, n: int) -> int:
        """Optimizer steps for a client with ``n`` examples."""
        if self.steps:
            return self.steps
        return self.epochs * -(-n // self.batch_size) if n else 0


def batch_indices(n: int, cfg: LocalSGD, generator: torch.Generator) -> Iterator[Tensor]:
    """The mini-batch index sequence: a fresh permutation per epoch, exactly
    ``cfg.num_steps(n)`` batches. Executors share it, so their batch orders agree."""
    total = cfg.num_steps(n)
    done = 0
    while done < total:
        perm = torch.randperm(n, generator=generator)
        for s in range(0, n, cfg.batch_size):
            if done == total:
                return
            yield perm[s : s + cfg.batch_size]
            done += 1


def make_optimizer(params: list[Tensor], cfg: LocalSGD) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def local_train(
    model: nn.Module, data: TensorData, cfg: LocalSGD, loss_fn: Loss, generator: torch.Generator
) -> dict[str, float]:
    """Train ``model`` in place on ``data``; returns ``{"train_loss", "steps"}``.

    Raises:
        KdflError: when the loss becomes NaN or infinite (diverged: lower the lr).
    """
    model.train()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    opt = make_optimizer([params[k] for k in names], cfg)
    device = next(model.parameters()).device
    total, steps = 0.0, 0
    for idx in batch_indices(len(data), cfg, generator):
        batch = Batch(data.x[idx].to(device), data.y[idx].to(device), idx)
        loss = loss_fn(model(batch.x), batch, params)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise KdflError(f"local training diverged (loss={value} at step {steps}): lower local.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += value
        steps += 1
    return {"train_loss": total / max(steps, 1), "steps": float(steps)}


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 2048) -> Tensor:
    """Logits of ``model`` in eval mode on ``x``, on the CPU, float32. (n, C)."""
    model.eval()
    device = next(model.parameters()).device
    outs = [model(x[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate(model: nn.Module, data: TensorData, batch_size: int = 2048) -> dict[str, float]:
    """Accuracy, NLL and 15-bin ECE of ``model`` on ``data``."""
    logits = predict(model, data.x, batch_size)
    return {
        "accuracy": metrics.accuracy(logits, data.y),
        "nll": metrics.nll(logits, data.y),
        "ece": metrics.ece(logits, data.y),
    }
