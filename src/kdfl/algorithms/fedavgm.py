"""FedAvgM: FedAvg with server momentum.

Hsu, Qi, Brown. Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification. 2019. https://arxiv.org/abs/1909.06335
"""

from __future__ import annotations

from dataclasses import dataclass

from kdfl.algorithms.fedavg import FedAvg
from kdfl.algorithms.kit import server_opt
from kdfl.types import KdflError


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

    def server_opt(self) -> server_opt.Chain:
        return server_opt.chain(server_opt.Momentum(self.momentum), server_opt.Scale(self.server_lr))
