"""FedAvg: clients run local SGD from the global weights; the server averages the deltas.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. Communication-Efficient Learning of
Deep Networks from Decentralized Data. AISTATS 2017. https://arxiv.org/abs/1602.05629

The shared steps (``delta_update``, ``aggregate_deltas``, ``check_delta``) are used by
FedProx, FedAvgM, FedDF and any other weight-sharing algorithm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from kdfl import tree
from kdfl.aggregation import aggregate_tensors, make_aggregator
from kdfl.algorithms.base import LocalJob, local_update
from kdfl.losses import Loss, cross_entropy
from kdfl.spec import parse_spec
from kdfl.train import LocalSGD
from kdfl.types import (
    Client,
    ClientUpdate,
    KdflError,
    Payload,
    PayloadError,
    ServerState,
    StateDict,
    Task,
)

DELTA = "delta."  # payload key prefix of a weight delta


def init_params(task: Task, arch: str | None = None) -> StateDict:
    """Fresh weights of ``arch`` (default: server) drawn from the run seed."""
    return tree.state_of(task.new_model(arch))


def delta_update(client: Client, weights: StateDict, model: nn.Module, stats: dict[str, float]) -> ClientUpdate:
    """The update ``{"delta.<name>": w_trained - weights}`` of a trained model."""
    delta = tree.sub({k: v.detach() for k, v in model.state_dict().items()}, weights)  # sub makes new tensors
    return ClientUpdate(client.id, len(client.data), {DELTA + k: v for k, v in delta.items()}, stats)


def stacked_delta_updates(jobs: Sequence[tuple[Client, StateDict]], state: StateDict,
                          stats: Sequence[dict[str, float]]) -> list[ClientUpdate]:
    """:func:`delta_update` for many clients at once: ``state`` holds their trained
    states stacked on a leading client axis (row i: ``jobs[i]``); ``jobs`` pairs each
    client with the weights it started from. The same numbers as one ``delta_update``
    per client (one subtraction per tensor for all clients instead of one per client);
    the payload tensors are rows of the stacked deltas."""
    first = jobs[0][1]
    shared = all(w is first for _, w in jobs)
    delta: StateDict = {}
    for k, v in state.items():
        if not v.is_floating_point():
            delta[k] = v.clone()
        elif shared:
            delta[k] = v - first[k].to(v.device)
        else:
            delta[k] = v - torch.stack([w[k] for _, w in jobs]).to(v.device)
    rows = {k: v.unbind(0) for k, v in delta.items()}
    return [ClientUpdate(c.id, len(c.data), {DELTA + k: r[i] for k, r in rows.items()}, st)
            for i, ((c, _), st) in enumerate(zip(jobs, stats, strict=True))]


def deltas_of(updates: Sequence[ClientUpdate]) -> list[StateDict]:
    return [{k[len(DELTA) :]: v for k, v in u.payload.items() if k.startswith(DELTA)} for u in updates]


def check_delta(update: ClientUpdate, like: StateDict) -> None:
    """Raise PayloadError unless the payload holds exactly the deltas of ``like``."""
    delta = deltas_of([update])[0]
    missing, extra = like.keys() - delta.keys(), delta.keys() - like.keys()
    if missing or extra:
        raise PayloadError(f"delta keys differ from the model: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for k, v in like.items():
        if delta[k].shape != v.shape or delta[k].dtype != v.dtype:
            raise PayloadError(
                f"delta {k!r} is {tuple(delta[k].shape)} {delta[k].dtype}, expected {tuple(v.shape)} {v.dtype}"
            )


def aggregate_deltas(updates: Sequence[ClientUpdate], aggregator: str = "mean") -> StateDict:
    """Aggregate the clients' deltas with a rule from :mod:`kdfl.aggregation`, weighted
    by ``num_examples``. Integer buffers (BN batch counters) take the maximum."""
    deltas = deltas_of(updates)
    w = torch.tensor([float(u.num_examples) for u in updates])
    fkeys = [k for k, v in deltas[0].items() if v.is_floating_point()]
    name, hyper = parse_spec(aggregator)
    flat = aggregate_tensors(make_aggregator(name, **hyper), [tree.flatten(d, fkeys) for d in deltas], w)
    out = tree.unflatten(flat, deltas[0], fkeys)
    for k, v in deltas[0].items():
        if not v.is_floating_point():
            out[k] = torch.stack([d[k] for d in deltas]).max(0).values
    return out


def apply_delta(params: StateDict, delta: StateDict, lr: float = 1.0) -> StateDict:
    """``params + lr * delta``; integer buffers are replaced by the delta's (new) values."""
    return tree.add(params, delta, lr)


class DeltaClient:
    """The client half of weight-sharing algorithms after ``prepare``: the update is the
    delta of the trained weights from the downlink weights (FedAvg, FedProx, FedAvgM, FedDF)."""

    def finish(self, task: Task, downlink: Payload, client: Client, model: nn.Module,
               stats: dict[str, float]) -> ClientUpdate:
        return delta_update(client, downlink, model, stats)

    def finish_stacked(self, task: Task, jobs: Sequence[tuple[Client, Payload]], state: StateDict,
                       stats: Sequence[dict[str, float]]) -> list[ClientUpdate]:
        """``finish`` for many clients whose trained states are stacked (vectorized executor)."""
        return stacked_delta_updates(jobs, state, stats)

    def client_update(self, task: Task, downlink: Payload, client: Client) -> ClientUpdate:
        return local_update(self, task, downlink, client)  # type: ignore[arg-type]  # prepare comes with the subclass


@dataclass(frozen=True)
class FedAvg(DeltaClient):
    """FedAvg, with an optional robust aggregation rule for the deltas.

    Args:
        local: local-training settings.
        aggregator: rule for the deltas, e.g. "mean" (FedAvg), "median",
            "trimmed_mean:beta=0.2", "krum:f=2" (see ``kdfl list aggregators``).
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    aggregator: str = "mean"

    def __post_init__(self) -> None:
        name, hyper = parse_spec(self.aggregator)
        make_aggregator(name, **hyper)  # fail at config time, not in round 1

    def init(self, task: Task) -> ServerState:
        if len(set(task.client_archs) | {task.server_arch}) > 1:
            raise KdflError(
                f"{type(self).__name__} averages weights, so every client needs the server's architecture "
                f"({task.server_arch}); got {sorted(set(task.client_archs))}. Use a distillation algorithm "
                "(fedema_distill, feddf) for heterogeneous clients, or drop model.client_archs."
            )
        return ServerState(init_params(task))

    def configure(self, task: Task, state: ServerState, client: Client) -> Payload:
        return state.params

    def loss(self, downlink: Payload) -> Loss:
        return cross_entropy()

    def prepare(self, task: Task, downlink: Payload, client: Client) -> LocalJob:
        return LocalJob(client.arch, downlink, self.loss(downlink), self.local)

    def validate(self, task: Task, state: ServerState, update: ClientUpdate) -> None:
        check_delta(update, state.params)

    def server_update(self, task: Task, state: ServerState, updates: Sequence[ClientUpdate]) -> ServerState:
        delta = aggregate_deltas(updates, self.aggregator)
        return ServerState(apply_delta(state.params, delta), state.round + 1, state.extra)
