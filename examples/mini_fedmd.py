"""A FedMD-like algorithm written outside kdfl (docs/writing-an-algorithm.md walks through it).

Each round the clients (of any architectures, each keeping its own model) digest last
round's consensus on public rows, revisit their private data, and upload their logits on
this round's public rows; the server averages them into the new consensus and distils it
into a server model, which is what kdfl evaluates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kdfl import tree
from kdfl.algorithms import register
from kdfl.algorithms.kit.distill import DistillSettings, distill
from kdfl.algorithms.kit.logits import aggregate_logits, check_rule
from kdfl.algorithms.program import Data, Logits, Model, Phase, Program, fresh_weights
from kdfl.losses import CrossEntropy
from kdfl.rng import generator
from kdfl.train import LocalSGD
from kdfl.types import ClientUpdate, KdflError, PayloadError, ServerState, Task


@dataclass(frozen=True)
class L1ToConsensus:
    """The digest loss: L1 distance of the logits to the consensus logits of each row."""

    def __call__(self, out, batch, consts) -> Tensor:
        return (out.logits() - batch.targets["consensus"]).abs().sum(-1).mean()


@dataclass(frozen=True)
class MiniFedMDState(ServerState):
    consensus: Tensor | None = None  # (n, C): the clients' aggregated logits on `rows`
    rows: Tensor | None = None  # (n,): the public rows of the last round


@register("mini_fedmd")
@dataclass(frozen=True)
class MiniFedMD:
    """FedMD-like: digest the consensus, revisit private data, upload public logits.

    Args:
        local: the revisit phase (the ``[local]`` section).
        digest: the digest phase (``[algorithm.digest]``).
        public_rows: public rows drawn per round.
        aggregator: consensus rule ("mean", "median", "trimmed_mean:beta=0.1", ...).
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    digest: LocalSGD = field(default_factory=lambda: LocalSGD(epochs=1, batch_size=32, lr=0.01))
    public_rows: int = 200
    aggregator: str = "mean"

    def __post_init__(self) -> None:
        check_rule(self.aggregator, class_weighting=False)

    def init(self, task: Task) -> MiniFedMDState:
        if task.proxy is None:
            raise KdflError("MiniFedMD needs public data: set data.proxy and data.proxy_size")
        return MiniFedMDState(tree.state_of(task.new_model()))

    def rows(self, task: Task, round_num: int) -> Tensor:
        n = len(task.proxy)
        return torch.randperm(n, generator=generator(task.seed, "rows", round_num))[: self.public_rows]

    def configure(self, task, state, client):
        down = {"rows": self.rows(task, state.round + 1)}
        if state.consensus is not None:
            down.update(digest_rows=state.rows, consensus=state.consensus)
        return down

    def client_program(self, task, downlink, client) -> Program:
        phases = [Phase(CrossEntropy(), self.local, name="revisit")]
        if "consensus" in downlink:  # not in round 1
            public = Data(task.proxy[downlink["digest_rows"]], targets={"consensus": downlink["consensus"]})
            phases.insert(0, Phase(L1ToConsensus(), self.digest, data=public, name="digest"))
        own = client.kept("model") or fresh_weights(task, client.id, client.arch)
        return Program(models={"model": Model(client.arch, own)}, phases=phases,
                       upload=[Logits(task.proxy[downlink["rows"]])], keep=("model",))

    def validate(self, task, state, update: ClientUpdate) -> None:
        z = update.payload.get("logits")
        if z is None or tuple(z.shape) != (len(self.rows(task, state.round + 1)), task.num_classes):
            raise PayloadError(f"logits must be ({self.public_rows}, {task.num_classes}) on this round's rows")

    def server_update(self, task, state, updates: Sequence[ClientUpdate]):
        rows = self.rows(task, state.round + 1)
        z = torch.stack([u.payload["logits"].float() for u in updates])  # (K, n, C)
        consensus = aggregate_logits(z, self.aggregator, [float(u.num_examples) for u in updates])
        server = task.new_model()
        server.load_state_dict(state.params)
        stats = distill(server, task.proxy[rows], torch.softmax(consensus, -1), DistillSettings(steps=50),
                        generator(task.seed, "server", state.round + 1))
        return MiniFedMDState(tree.state_of(server), state.round + 1, consensus, rows), stats
