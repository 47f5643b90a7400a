"""The split client step that executors can batch.

Most algorithms' client half is "load weights, train with a loss, then turn the trained
model into a payload". Such algorithms implement ``prepare`` (what to train: a
:class:`LocalJob`) and ``finish`` (the payload from the trained model); their
``client_update`` is :func:`local_update`. The sequential executor just calls
``client_update``; a vectorized executor can run ``prepare`` for many clients, train them
together, and call ``finish`` for each, with the same result (or, when the algorithm has
it, ``finish_stacked`` once for all of them: see :mod:`kdfl.simulation.vectorized`).

``finish`` must not keep ``model``: :func:`local_update` reuses the instance for the next
client when nothing refers to it after ``finish`` (checked), so copy what you need.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import nn

from kdfl.losses import Loss
from kdfl.train import LocalSGD, local_train
from kdfl.types import Client, ClientUpdate, Payload, StateDict, Task


@dataclass
class LocalJob:
    """One client's local training: start from ``weights`` (architecture ``arch``) and
    minimise ``loss`` with ``local`` settings on the client's data."""

    arch: str
    weights: StateDict
    loss: Loss
    local: LocalSGD


@runtime_checkable
class LocalTraining(Protocol):
    def prepare(self, task: Task, downlink: Payload, client: Client) -> LocalJob: ...

    def finish(
        self, task: Task, downlink: Payload, client: Client, model: nn.Module, stats: dict[str, float]
    ) -> ClientUpdate: ...


def local_update(alg: LocalTraining, task: Task, downlink: Payload, client: Client) -> ClientUpdate:
    """The reference client step: prepare, train with :func:`local_train`, finish."""
    job = alg.prepare(task, downlink, client)
    model = task.borrow_model(job.arch)
    model.load_state_dict(job.weights)
    stats = local_train(model, client.data, job.local, job.loss, client.generator())
    before = sys.getrefcount(model)
    update = alg.finish(task, downlink, client, model, stats)
    if sys.getrefcount(model) == before:  # finish kept no reference: the model can be reused
        task.return_model(job.arch, model)
    return update
