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
from typing import Any, Protocol

from kdfl.types import Algorithm, Client, ClientUpdate, KdflError, Payload, Task

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
    make.target = (module, cls)  # type: ignore[attr-defined]  # what make_executor inspects for options
    return make  # type: ignore[return-value]


EXECUTORS.update({
    "vectorized": _lazy("kdfl.simulation.vectorized", "Vectorized"),  # torch.func vmap over stacked clients
    "parallel": _lazy("kdfl.simulation.parallel", "Parallel"),  # a pool of single-threaded processes
    "auto": _lazy("kdfl.simulation.auto", "Auto"),  # picks per model and device
})


def _executor_class(name: str) -> type:
    import importlib

    entry = EXECUTORS[name]
    target = getattr(entry, "target", None)
    return getattr(importlib.import_module(target[0]), target[1]) if target else entry


def _options(cls: type) -> dict[str, Any]:
    import inspect

    return {k: p for k, p in inspect.signature(cls).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD}


def executor_options() -> dict[str, dict[str, Any]]:
    """Every executor with its options and their defaults (``kdfl list executors``)."""
    return {name: {k: p.default for k, p in _options(_executor_class(name)).items()} for name in EXECUTORS}


def make_executor(spec: str) -> Executor:
    """An executor from ``"name"`` or ``"name:option=value,..."``, e.g. ``"auto"``,
    ``"parallel:workers=4,inner=vectorized"``, ``"vectorized:max_memory_mb=512"``.

    Raises:
        KdflError: an unknown executor (with close matches), an unknown option (naming the
            allowed ones) or an option value of the wrong type.
    """
    from kdfl.spec import parse_spec, unknown

    name, options = parse_spec(spec)
    if name not in EXECUTORS:
        raise unknown("executor", name, EXECUTORS)
    cls = _executor_class(name)
    params = _options(cls)
    for key, value in options.items():
        if key not in params:
            allowed = ", ".join(f"{k} (default {p.default!r})" for k, p in params.items()) or "none"
            raise KdflError(f"executor {name!r} has no option {key!r}; allowed: {allowed}")
        default, kind = params[key].default, str(params[key].annotation)  # "int", "float", "str"
        if kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and
                                                                              not isinstance(value, int)):
                raise KdflError(f"executor option {name}:{key} must be {'an integer' if kind == 'int' else 'a number'}"
                                f" like {default!r}, got {value!r}")
        elif kind == "str" and not isinstance(value, str):
            raise KdflError(f"executor option {name}:{key} must be a name like {default!r}, got {value!r}")
    return cls(**options)  # type: ignore[no-any-return]
