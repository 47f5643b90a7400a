"""State-dict maths: the few operations averaging algorithms need, on ``dict[str, Tensor]``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdfl.types import StateDict


def state_of(model: nn.Module) -> StateDict:
    """A detached copy of a model's state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def to_device(payload: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """``payload`` with every tensor on ``device`` (itself when all already are): what the wire
    decodes lands on the host, and lands once on the device that uses it."""
    if all(not isinstance(v, Tensor) or v.device == device for v in payload.values()):
        return payload
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in payload.items()}


def is_float(t: Tensor) -> bool:
    return t.is_floating_point()


def sub(a: StateDict, b: StateDict) -> StateDict:
    """``a - b`` for floating entries; integer buffers (BN counters) are taken from ``a``."""
    return {k: a[k] - b[k] if is_float(a[k]) else a[k].clone() for k in a}


def add(a: StateDict, b: StateDict, scale: float = 1.0) -> StateDict:
    """``a + scale * b`` for floating entries; integer buffers are taken from ``b``."""
    return {k: a[k] + scale * b[k] if is_float(a[k]) else b[k].clone() for k in a}


def scale(a: StateDict, s: float) -> StateDict:
    return {k: v * s if is_float(v) else v.clone() for k, v in a.items()}


def lerp(a: StateDict, b: StateDict, beta: float) -> StateDict:
    """``beta * a + (1 - beta) * b`` (EMA step); integer buffers are taken from ``b``."""
    return {k: beta * a[k] + (1.0 - beta) * b[k] if is_float(a[k]) else b[k].clone() for k in a}


def weighted_mean(states: Sequence[StateDict], weights: Sequence[float] | Tensor) -> StateDict:
    """Weighted mean of state dicts; weights are normalised. Integer buffers: the max."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.sum() <= 0:
        raise ValueError("weighted_mean needs a positive total weight")
    w = w / w.sum()
    out: StateDict = {}
    for k, v in states[0].items():
        stacked = torch.stack([s[k] for s in states])  # (clients, *shape)
        if is_float(v):
            ww = w.to(stacked.dtype).reshape(-1, *([1] * v.dim()))
            out[k] = (stacked * ww).sum(0)
        else:
            out[k] = stacked.max(0).values
    return out


def flatten(state: StateDict, keys: Sequence[str] | None = None) -> Tensor:
    """Concatenate the floating entries (or ``keys``) into one 1-D vector."""
    keys = [k for k in state if is_float(state[k])] if keys is None else keys
    return torch.cat([state[k].reshape(-1) for k in keys]) if keys else torch.zeros(0)


def unflatten(vec: Tensor, like: StateDict, keys: Sequence[str] | None = None) -> StateDict:
    """Inverse of :func:`flatten`; non-floating entries are copied from ``like``."""
    keys = [k for k in like if is_float(like[k])] if keys is None else keys
    out = {k: v.clone() for k, v in like.items()}
    pos = 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[pos : pos + n].reshape(like[k].shape).to(like[k].dtype)
        pos += n
    if pos != vec.numel():
        raise ValueError(f"vector has {vec.numel()} entries, state needs {pos}")
    return out


def num_values(state: StateDict) -> int:
    return sum(v.numel() for v in state.values())
