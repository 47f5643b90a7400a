"""FedAvgM: FedAvg with server momentum.

Hsu, Qi, Brown. Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification. 2019. https://arxiv.org/abs/1909.06335
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kdfl import tree
from kdfl.algorithms.fedavg import FedAvg, aggregate_deltas, apply_delta
from kdfl.types import ClientUpdate, KdflError, ServerState, Task


@dataclass(frozen=True)
class FedAvgM(FedAvg):
    """Server keeps v ← momentum·v + Δ̄ and steps w ← w + server_lr·v.

    ``momentum=0, server_lr=1`` is FedAvg.

    Args:
        momentum: server momentum (β).
        server_lr: server learning rate (η).
    """

    momentum: float = 0.9
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.momentum < 1 or self.server_lr <= 0:
            raise KdflError(
                f"algorithm.momentum must be in [0, 1) and server_lr > 0 (got {self.momentum}, {self.server_lr})"
            )

    def server_update(self, task: Task, state: ServerState, updates: Sequence[ClientUpdate]) -> ServerState:
        delta = aggregate_deltas(updates, self.aggregator)
        v = state.extra.get("velocity")
        v = delta if v is None else tree.add(tree.scale(v, self.momentum), delta)
        params = apply_delta(state.params, v, self.server_lr)
        return ServerState(params, state.round + 1, {**state.extra, "velocity": v})
