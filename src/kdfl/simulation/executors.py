"""Executors decide how the sampled clients of a round run.

``sequential`` is the reference: one client after another, anything goes (different
architectures, stateful clients). Faster executors must return the same updates.
A client that raises becomes a :class:`ClientFailure`; the round goes on without it.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kdfl.types import Algorithm, Client, ClientUpdate, Payload, Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientFailure:
    """A client whose update raised: the error is logged and the client excluded."""

    client_id: int
    error: str
    traceback: str = ""


Job = tuple[Client, Payload]
Result = ClientUpdate | ClientFailure


class Executor(Protocol):
    name: str

    def run(self, algorithm: Algorithm, task: Task, jobs: Sequence[Job]) -> list[Result]: ...


def run_one(algorithm: Algorithm, task: Task, client: Client, downlink: Payload) -> Result:
    """Run one client's update, turning any exception into a ClientFailure."""
    try:
        return algorithm.client_update(task, downlink, client)
    except Exception as e:  # a crashed client must not end the run
        return ClientFailure(client.id, f"{type(e).__name__}: {e}", traceback.format_exc())


class Sequential:
    """Clients one after another in the calling process."""

    name = "sequential"

    def run(self, algorithm: Algorithm, task: Task, jobs: Sequence[Job]) -> list[Result]:
        return [run_one(algorithm, task, c, d) for c, d in jobs]


EXECUTORS: dict[str, type] = {"sequential": Sequential}


def _lazy(module: str, cls: str) -> type:
    """A registry entry imported on first use (the fast executors import this module)."""

    def make(*args: object, **kwargs: object) -> Executor:
        import importlib

        return getattr(importlib.import_module(module), cls)(*args, **kwargs)

    make.__name__ = make.__qualname__ = cls
    return make  # type: ignore[return-value]


EXECUTORS.update({
    "vectorized": _lazy("kdfl.simulation.vectorized", "Vectorized"),  # torch.func vmap over stacked clients
    "parallel": _lazy("kdfl.simulation.parallel", "Parallel"),  # a pool of single-threaded processes
    "auto": _lazy("kdfl.simulation.auto", "Auto"),  # picks per model and device
})


def make_executor(name: str) -> Executor:
    from kdfl.spec import unknown

    if name not in EXECUTORS:
        raise unknown("executor", name, EXECUTORS)
    return EXECUTORS[name]()
