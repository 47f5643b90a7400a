"""Executors decide how the sampled clients of a round run.

``sequential`` is the reference: one client after another, anything goes (different
architectures, stateful clients). Faster executors must return the same updates.
``batched`` (:data:`DEFAULT_EXECUTOR`, what ``run.executor`` is when a config does not
set it) vectorizes the clients whose programs batch and whose models batch fast on the
device, chosen from structure alone (never by timing); ``auto`` may also move rounds to
a process pool, chosen by timing.
A client that raises becomes a :class:`ClientFailure`; the round goes on without it.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kdfl.registry import Registry, signature_options
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
    """Run one client's program with the reference runner, turning any exception into a
    ClientFailure."""
    from kdfl.algorithms.program import run_client  # the algorithms package imports executors' users

    try:
        return run_client(algorithm, task, downlink, client)
    except Exception as e:  # a crashed client must not end the run
        return ClientFailure(client.id, f"{type(e).__name__}: {e}", traceback.format_exc())


class Sequential:
    """Clients one after another in the calling process."""

    name = "sequential"

    def run(self, algorithm: Algorithm, task: Task, jobs: Sequence[Job]) -> list[Result]:
        return [run_one(algorithm, task, c, d) for c, d in jobs]


# options: the constructor's parameters, checked against their annotations
EXECUTORS: Registry[type] = Registry("executor", options_of=signature_options)
EXECUTORS.add("sequential", Sequential)
# lazy: the fast executors import this module
EXECUTORS.add_lazy("vectorized", "kdfl.simulation.vectorized:Vectorized")  # torch.func vmap over stacked clients
EXECUTORS.add_lazy("parallel", "kdfl.simulation.parallel:Parallel")  # a pool of single-threaded processes
EXECUTORS.add_lazy("batched", "kdfl.simulation.auto:Batched")  # vectorized where the structure says it pays
EXECUTORS.add_lazy("auto", "kdfl.simulation.auto:Auto")  # batched, plus a pool when a timed trial says it pays
DEFAULT_EXECUTOR = "batched"  # deterministic: the same config takes the same numerical path


def executor_options() -> dict[str, dict[str, Any]]:
    """Every executor with its options and their defaults (``kdfl list executors``)."""
    return {name: EXECUTORS.defaults(name) for name in EXECUTORS}


def make_executor(spec: str) -> Executor:
    """An executor from ``"name"`` or ``"name:option=value,..."``, e.g. ``"auto"``,
    ``"parallel:workers=4,inner=vectorized"``, ``"vectorized:max_memory_mb=512"``.

    Raises:
        KdflError: a malformed spec, an unknown executor (with close matches), an unknown
            option (naming the allowed ones) or an option value of the wrong type.
    """
    cls, options = EXECUTORS.resolve(spec)
    executor: Executor = cls(**options)
    return executor
