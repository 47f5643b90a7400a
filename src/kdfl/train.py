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
    # on an accelerator the losses are summed and checked on the device and read once at the
    # end (a read per step would wait for every step's kernels); on the CPU a read is free and
    # a diverged client stops at once. Both sum the same float64 values in the same order.
    on_host = device.type == "cpu"
    total_dev = torch.zeros((), dtype=torch.float64, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
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
        if on_host:
            value = float(loss.detach())
            if not math.isfinite(value):
                raise _diverged(value, steps, phase.name)
            total += value
        else:
            lv = loss.detach().double()
            total_dev += lv
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(lv), steps, first_bad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad_norm:
            for name in phase.train:  # each model's own norm, as PFLlib clips each model
                torch.nn.utils.clip_grad_norm_(params[name].values(), cfg.clip_grad_norm)
        opt.step()
        steps += 1
    if not on_host:
        bad = int(first_bad)  # the phase's one read of the device
        if bad >= 0:
            raise _diverged(float("nan"), bad, phase.name)
        total = float(total_dev)
    return {f"{phase.name}_loss": total / max(steps, 1), "steps": float(steps)}


def _diverged(value: float, step: int, phase: str) -> KdflError:
    return KdflError(f"local training diverged (loss={value} at step {step} of phase {phase!r}): lower local.lr")


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    return value


EVAL_BATCH_BYTES = 8 * 2**20  # activations of one inference batch (all layers together)
_EVAL_BATCH: dict[tuple[Any, ...], int] = {}
# batches of fewer rows take other CPU kernels (their logits differ in the last bits); batches
# of TINY_BATCH rows or more give every row the same logits whatever the batch size (tested)
TINY_BATCH = 8


def eval_batch_size(model: nn.Module, x: Tensor) -> int:
    """The inference batch for ``model`` on inputs like ``x``: the largest power of two
    (64 to 2,048) whose activations, summed over all layers, fit in ``EVAL_BATCH_BYTES``.

    Large batches of a convolutional model allocate activations of hundreds of MB that the
    allocator maps and unmaps every batch (page faults): on the 28x28 CNN batches of 2,048
    cost 1.6x what batches of 64-256 do, while the small 1-D CNN is fastest near 512 and an
    MLP at 2,048. With batches of at least ``TINY_BATCH`` rows (:func:`predict` merges a
    smaller remainder) each row's logits do not depend on the batch, so the choice changes
    no number (tested). Measured once per architecture and input shape (one probe forward
    of one sample in eval mode, counted with forward hooks)."""
    key = (type(model), tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()), tuple(x.shape[1:]),
           x.dtype)
    if key not in _EVAL_BATCH:
        total = 0

        def count(_: nn.Module, __: Any, out: Any) -> None:
            nonlocal total
            outs = out if isinstance(out, (tuple, list)) else out.values() if isinstance(out, dict) else (out,)
            total += sum(o.numel() * o.element_size() for o in outs if isinstance(o, Tensor))

        leaves = [m for m in model.modules() if not any(True for _ in m.children())]
        hooks = [m.register_forward_hook(count) for m in leaves]
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(x[:1].to(next(model.parameters()).device))
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        per_sample = max(total, 1)
        size = 64
        while size < 2048 and 2 * size * per_sample <= EVAL_BATCH_BYTES:
            size *= 2
        _EVAL_BATCH[key] = size
    return _EVAL_BATCH[key]


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int | None = None) -> Tensor:
    """Logits of ``model`` in eval mode on ``x``, on the CPU, float32. (n, C).

    ``batch_size``: samples per forward pass; None chooses it per model
    (:func:`eval_batch_size`; the logits are the same for any batch size). A last batch
    of fewer than ``TINY_BATCH`` rows is merged into the one before it."""
    if len(x) and batch_size is None:
        batch_size = eval_batch_size(model, x)
    bs = batch_size or 1
    starts = list(range(0, len(x), bs))
    if len(starts) > 1 and len(x) - starts[-1] < TINY_BATCH:
        starts.pop()  # a remainder of a few rows joins the batch before it (see TINY_BATCH)
    bounds = [*starts[1:], len(x)]
    model.eval()
    device = next(model.parameters()).device
    outs = [model(x[s:e].to(device)).float().cpu() for s, e in zip(starts, bounds, strict=True)]
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate(model: nn.Module, data: TensorData, batch_size: int | None = None) -> dict[str, float]:
    """Accuracy, NLL and 15-bin ECE of ``model`` on ``data`` (``batch_size`` as :func:`predict`)."""
    logits = predict(model, data.x, batch_size)
    return {
        "accuracy": metrics.accuracy(logits, data.y),
        "nll": metrics.nll(logits, data.y),
        "ece": metrics.ece(logits, data.y),
    }
