"""FedAvg: clients run local SGD from the global weights; the server averages the deltas.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. Communication-Efficient Learning of
Deep Networks from Decentralized Data. AISTATS 2017. https://arxiv.org/abs/1602.05629

The shared weight steps live in :mod:`kdfl.algorithms.kit.weights`; server optimizers
(FedAvgM's momentum) in :mod:`kdfl.algorithms.kit.server_opt`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from kdfl.algorithms.kit import server_opt, weights
from kdfl.algorithms.program import Phase, Program
from kdfl.losses import CrossEntropy, Loss
from kdfl.train import LocalSGD
from kdfl.types import Client, ClientInfo, ClientUpdate, Payload, RoundMetrics, ServerState, Task


@dataclass(frozen=True)
class FedAvgState(ServerState):
    """The global weights and the state of the server optimizer (empty for FedAvg)."""

    opt_state: tuple = ()


@dataclass(frozen=True)
class FedAvg:
    """FedAvg, with an optional robust aggregation rule for the deltas.

    Args:
        local: local-training settings.
        aggregator: rule for the deltas, e.g. "mean" (FedAvg), "median",
            "trimmed_mean:beta=0.2", "krum:f=2" (see ``kdfl list aggregators``).
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    aggregator: str = "mean"

    def __post_init__(self) -> None:
        weights.check_aggregator(self.aggregator)

    def server_opt(self) -> server_opt.Chain:
        """The server optimizer applied to the aggregated delta (none for FedAvg)."""
        return server_opt.chain()

    def loss(self) -> Loss:
        """The client's loss (FedProx adds its proximal term)."""
        return CrossEntropy()

    @functools.cached_property
    def _phase(self) -> Phase:  # one Phase object for every client (executors group by it)
        return Phase(self.loss(), self.local)

    def phase(self, downlink: Payload) -> Phase:
        """The client's training phase (FedProx: with the anchor weights as a constant)."""
        return self._phase

    def init(self, task: Task) -> FedAvgState:
        weights.require_homogeneous(type(self).__name__, task)
        params = weights.init_params(task)
        return FedAvgState(params, 0, self.server_opt().init(params))

    def configure(self, task: Task, state: ServerState, client: ClientInfo) -> Payload:
        return state.params

    def client_program(self, task: Task, downlink: Payload, client: Client) -> Program:
        return weights.delta_program(client.arch, downlink, self.phase(downlink))

    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        weights.check_delta(update, state.params)

    def server_update(self, task: Task, state: FedAvgState,  # type: ignore[override]
                      updates: Sequence[ClientUpdate]) -> tuple[FedAvgState, RoundMetrics]:
        delta = weights.aggregate_deltas(updates, self.aggregator)
        step, opt_state = self.server_opt().update(delta, state.opt_state)
        return FedAvgState(server_opt.apply_step(state.params, step), state.round + 1, opt_state), {}
