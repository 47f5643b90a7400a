"""The one training loop (``local_train``, one phase of a client program) and the one
evaluation (``evaluate``)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from kdfl import metrics
from kdfl.losses import Batch, Outputs
from kdfl.types import KdflError, TensorData

if TYPE_CHECKING:
    from kdfl.algorithms.program import Data, LabelStats, Phase


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
        lr_decay: γ of a per-round exponential decay: round t (0-based) trains at
            ``lr · γ^t`` (the references of FedNTD and FedGen decay 0.99 per round;
            1 = constant). Applied by the runners through :meth:`at_round`.
        clip_grad_norm: clip the gradient norm of each trained model of a phase to this
            before the step (PFLlib's FedKD and FML clip at 10); 0 = no clipping.
    """

    epochs: int = 1
    steps: int = 0
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    lr_decay: float = 1.0
    clip_grad_norm: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise KdflError(f"local.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.epochs < 0 or self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise KdflError(
                "local: epochs and steps must be >= 0, batch_size >= 1 and lr > 0 "
                f"(got epochs={self.epochs}, steps={self.steps}, batch_size={self.batch_size}, lr={self.lr})"
            )
        if not (0 < self.lr_decay <= 1) or self.clip_grad_norm < 0:
            raise KdflError(f"local: lr_decay must be in (0, 1] and clip_grad_norm >= 0 (0 = off), got "
                            f"lr_decay={self.lr_decay}, clip_grad_norm={self.clip_grad_norm}")

    def at_round(self, t: int) -> LocalSGD:
        """These settings for 0-based round ``t``: ``lr · lr_decay^t`` (itself when the
        decay is 1 or t = 0, so phases built once stay one object)."""
        if self.lr_decay == 1 or t <= 0:
            return self
        return replace(self, lr=self.lr * self.lr_decay**t, lr_decay=1.0)

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


def model_outputs(model: nn.Module, x: Tensor, outputs: frozenset[str]) -> dict[str, Any]:
    """``{"logits": ...}`` plus the requested "features" / "activations", one forward pass."""
    if not outputs:
        return {"logits": model(x)}
    return model(x, features="features" in outputs, activations="activations" in outputs)  # type: ignore[no-any-return]


def local_train(
    models: Mapping[str, nn.Module], phase: Phase, data: Data, generator: torch.Generator,
    tracked: LabelStats | None = None,
) -> dict[str, float]:
    """Run one phase of a client program: train ``phase.train`` of ``models`` in place on
    ``data``; returns ``{"<phase>_loss": mean loss, "steps": steps}``.

    The reference loop: executors that batch clients reproduce it (batch order from
    :func:`batch_indices`, the optimizer of :func:`make_optimizer`, the same divergence
    check, the same tracking).

    Args:
        tracked: when the phase declares ``track``, the statistics it accumulates into
            (in place): every batch adds the tracked model's logits of the forward pass
            that the loss sees (train mode, before the optimizer step).

    Raises:
        KdflError: when the loss becomes NaN or infinite (diverged: lower the lr).
    """
    cfg = phase.local
    for name in phase.train:
        models[name].train()
    for name in phase.frozen:
        models[name].eval()
    params = {name: dict(models[name].named_parameters()) for name in phase.forward}
    opt = make_optimizer([p for name in phase.train for p in params[name].values() if p.requires_grad], cfg)
    device = next(models[phase.train[0]].parameters()).device
    consts = {k: _to(v, device) for k, v in phase.consts.items()}

    def call(model: str, method: str, *args: Tensor) -> Tensor:
        return getattr(models[model], method)(*args)  # type: ignore[no-any-return]

    total, steps = 0.0, 0
    for idx in batch_indices(len(data), cfg, generator):
        x = data.x[idx].to(device)
        batch = Batch(x, None if data.y is None else data.y[idx].to(device), idx,
                      {k: v[idx].to(device) for k, v in data.targets.items()})
        values = {name: model_outputs(models[name], x, phase.outputs) for name in phase.train
                  if name not in phase.adapters}
        if phase.frozen:
            with torch.no_grad():
                values.update({name: model_outputs(models[name], x, phase.outputs) for name in phase.frozen
                               if name not in phase.adapters})
        loss = phase.loss(Outputs(values, params, call), batch, consts)
        if phase.track is not None and tracked is not None:
            assert batch.y is not None  # Program checks that tracking phases have labels
            phase.track.update(tracked, values[phase.track.model]["logits"], batch.y)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise KdflError(f"local training diverged (loss={value} at step {steps} of phase {phase.name!r}): "
                            "lower local.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad_norm:
            for name in phase.train:  # each model's own norm, as PFLlib clips each model
                torch.nn.utils.clip_grad_norm_(params[name].values(), cfg.clip_grad_norm)
        opt.step()
        total += value
        steps += 1
    return {f"{phase.name}_loss": total / max(steps, 1), "steps": float(steps)}


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    return value


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
