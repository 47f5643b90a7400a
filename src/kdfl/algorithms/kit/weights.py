"""Weight-sharing steps: initial weights, client programs that upload deltas, delta
checks, robust aggregation and application. Used by FedAvg, FedProx, FedAvgM, FedDF and
any algorithm that moves weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kdfl import tree
from kdfl.aggregation import aggregate_tensors, make_aggregator
from kdfl.algorithms.program import DELTA, Delta, Model, Phase, Program
from kdfl.losses import MAIN
from kdfl.spec import parse_spec
from kdfl.types import ClientUpdate, KdflError, PayloadError, StateDict, Task


def init_params(task: Task, arch: str | None = None) -> StateDict:
    """Fresh weights of ``arch`` (default: server) drawn from the run seed."""
    return tree.state_of(task.new_model(arch))


def delta_program(arch: str, weights: StateDict, phase: Phase) -> Program:
    """Train one model from ``weights`` with ``phase`` (on the private data unless the
    phase says otherwise); upload its delta."""
    return Program(models={MAIN: Model(arch, weights)}, phases=(phase,), upload=(Delta(weights),))


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


def check_aggregator(spec: str) -> None:
    """Fail at config time, not in round 1, on an unknown rule or option."""
    name, hyper = parse_spec(spec)
    make_aggregator(name, **hyper)


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


def require_homogeneous(name: str, task: Task) -> None:
    """Weight averaging needs every client on the server's architecture."""
    if len(set(task.client_archs) | {task.server_arch}) > 1:
        raise KdflError(
            f"{name} averages weights, so every client needs the server's architecture "
            f"({task.server_arch}); got {sorted(set(task.client_archs))}. Use a distillation algorithm "
            "(fedema_distill, feddf) for heterogeneous clients, or drop model.client_archs."
        )
