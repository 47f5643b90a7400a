"""Algorithm registry: ``ALGORITHMS[name]`` is a frozen dataclass of hyperparameters."""

from __future__ import annotations

from typing import Any

from kdfl.algorithms.fedavg import FedAvg
from kdfl.algorithms.fedavgm import FedAvgM
from kdfl.algorithms.feddf import FedDF
from kdfl.algorithms.fedema_distill import FedEMADistill
from kdfl.algorithms.fedprox import FedProx

ALGORITHMS: dict[str, type[Any]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "feddf": FedDF,
    "fedema_distill": FedEMADistill,
}

__all__ = ["ALGORITHMS", "FedAvg", "FedAvgM", "FedDF", "FedEMADistill", "FedProx"]
