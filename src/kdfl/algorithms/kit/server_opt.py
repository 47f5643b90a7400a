"""Server optimizers as small composable transforms (after optax's ``chain``).

A transform turns the aggregated client delta into a server step and carries a typed
state: ``init(params) -> state``, ``update(delta, state) -> (step, state)``. FedAvg is
the empty chain (step = delta), FedAvgM is ``chain(momentum(β), scale(η))``, FedAdam and
FedYogi would be one more transform each. :class:`EMA` is the other server-side average
kdfl needs (FedEMA-Distill's θ_e).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kdfl import tree
from kdfl.types import StateDict


class Transform(Protocol):
    def init(self, params: StateDict) -> Any: ...

    def update(self, delta: StateDict, state: Any) -> tuple[StateDict, Any]: ...


@dataclass(frozen=True)
class MomentumState:
    velocity: StateDict | None = None  # None until the first round


@dataclass(frozen=True)
class Momentum:
    """Heavy-ball momentum: v ← β·v + Δ (v = Δ in the first round); the step is v."""

    beta: float

    def init(self, params: StateDict) -> MomentumState:
        return MomentumState()

    def update(self, delta: StateDict, state: MomentumState) -> tuple[StateDict, MomentumState]:
        v = delta if state.velocity is None else tree.add(tree.scale(state.velocity, self.beta), delta)
        return v, MomentumState(v)


@dataclass(frozen=True)
class Scale:
    """The step times a learning rate η (integer buffers pass unchanged)."""

    lr: float

    def init(self, params: StateDict) -> None:
        return None

    def update(self, delta: StateDict, state: None) -> tuple[StateDict, None]:
        return (delta if self.lr == 1.0 else tree.scale(delta, self.lr)), None


@dataclass(frozen=True)
class Chain:
    """Transforms applied in order; the state is the tuple of their states."""

    transforms: tuple[Transform, ...] = ()

    def init(self, params: StateDict) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in self.transforms)

    def update(self, delta: StateDict, state: Sequence[Any]) -> tuple[StateDict, tuple[Any, ...]]:
        new = []
        for t, s in zip(self.transforms, state, strict=True):
            delta, s = t.update(delta, s)
            new.append(s)
        return delta, tuple(new)


def chain(*transforms: Transform) -> Chain:
    return Chain(tuple(transforms))


def apply_step(params: StateDict, step: StateDict) -> StateDict:
    """``params + step``; integer buffers (BN counters) take the step's values."""
    return tree.add(params, step, 1.0)


@dataclass(frozen=True)
class EMA:
    """Exponential moving average θ_e ← β_t·θ_e + (1 − β_t)·θ with
    β_t = min(β, (1 + t)/(10 + t)) when ``warmup`` (the usual bias-free start).

    Args:
        decay: β.
        warmup: use the warm-up schedule.
        copy_buffers: take BatchNorm running statistics from θ instead of averaging them.
    """

    decay: float
    warmup: bool = True
    copy_buffers: bool = False

    def beta(self, round_num: int) -> float:
        return min(self.decay, (1 + round_num) / (10 + round_num)) if self.warmup else self.decay

    def update(self, average: StateDict, new: StateDict, round_num: int) -> StateDict:
        out = tree.lerp(average, new, self.beta(round_num))
        if self.copy_buffers:
            out.update({k: new[k].clone() for k in new if "running_" in k})
        return out
