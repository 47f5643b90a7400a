"""FedProx: FedAvg whose clients add a proximal term.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. Federated Optimization in Heterogeneous
Networks. MLSys 2020. https://arxiv.org/abs/1812.06127
"""

from __future__ import annotations

from dataclasses import dataclass

from kdfl.algorithms.fedavg import FedAvg
from kdfl.algorithms.program import Phase
from kdfl.losses import CrossEntropy, Loss, Proximal, Sum
from kdfl.types import KdflError, Payload


@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedAvg with loss + (mu/2)·‖w − w_global‖² on the client. ``mu=0`` is FedAvg.

    Args:
        mu: proximal weight (μ in the paper).
    """

    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mu < 0:
            raise KdflError(f"algorithm.mu must be >= 0, got {self.mu}")

    def loss(self) -> Loss:
        return Sum((CrossEntropy(), Proximal(self.mu))) if self.mu else CrossEntropy()

    def phase(self, downlink: Payload) -> Phase:
        if not self.mu:
            return super().phase(downlink)
        return Phase(self.loss(), self.local, consts={"anchor": downlink})  # the anchor: the global weights
