"""Local training only: the reference every personalised method is compared with.

Each client trains its own model (any architecture; ``model.client_archs``) on its own
data every round it is sampled, keeps it, and sends nothing: no federation at all. There
is no global model (``state.params`` is empty), so a run reports per-client metrics only
(``client_accuracy_*`` in ``summary.json``, with ``data.client_holdout`` > 0). Run any
config with ``algorithm.name = "local"`` to get the no-collaboration baseline on the same
partition, architectures and local budget (PFLlib's and FL-bench's "Local").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from kdfl.algorithms.program import Model, Phase, Program, fresh_weights
from kdfl.losses import MAIN, CrossEntropy
from kdfl.train import LocalSGD
from kdfl.types import (
    Client,
    ClientInfo,
    ClientUpdate,
    Payload,
    PayloadError,
    RoundMetrics,
    ServerState,
    Task,
)


@dataclass(frozen=True)
class Local:
    """No federation: every client trains and keeps its own model; nothing is uploaded.

    Args:
        local: local-training settings per round.
    """

    local: LocalSGD = field(default_factory=LocalSGD)

    @functools.cached_property
    def _phase(self) -> Phase:  # one Phase object for every client (executors group by it)
        return Phase(CrossEntropy(), self.local)

    def init(self, task: Task) -> ServerState:
        return ServerState({}, 0)  # no global model

    def configure(self, task: Task, state: ServerState, client: ClientInfo) -> Payload:
        return {}

    def client_program(self, task: Task, downlink: Payload, client: Client) -> Program:
        weights = client.kept(MAIN) or fresh_weights(task, client.id, client.arch)
        return Program(models={MAIN: Model(client.arch, weights)}, phases=[self._phase], keep=(MAIN,))

    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        if update.payload:
            raise PayloadError(f"local training uploads nothing, got entries {sorted(update.payload)}")

    def server_update(self, task: Task, state: ServerState,
                      updates: Sequence[ClientUpdate]) -> tuple[ServerState, RoundMetrics]:
        return ServerState({}, state.round + 1), {}
