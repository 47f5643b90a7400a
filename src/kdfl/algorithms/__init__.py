"""Algorithm registry: ``ALGORITHMS[name]`` is a frozen dataclass of hyperparameters.

An algorithm from user code is named in a config as ``"package.module:ClassName"``
(:func:`resolve` imports it), or registered under a short name with :func:`register`.
Nested dataclass fields (``distill: DistillSettings``) are configured as sub-tables
(``[algorithm.distill]``) whose keys override the algorithm's own defaults
(:func:`build_algorithm`).
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable, Mapping
from typing import Any

from kdfl.algorithms.dsfl import DSFL
from kdfl.algorithms.fd import FD
from kdfl.algorithms.fedad import FedAD
from kdfl.algorithms.fedavg import FedAvg
from kdfl.algorithms.fedavgm import FedAvgM
from kdfl.algorithms.feddf import FedDF
from kdfl.algorithms.feddistill import FedDistill
from kdfl.algorithms.fedema_distill import FedEMADistill
from kdfl.algorithms.fedgen import FedGen
from kdfl.algorithms.fedkd import FedKD
from kdfl.algorithms.fedmd import FedMD
from kdfl.algorithms.fedntd import FedNTD
from kdfl.algorithms.fedproto import FedProto
from kdfl.algorithms.fedprox import FedProx
from kdfl.algorithms.fedssd import FedSSD
from kdfl.algorithms.fml import FML
from kdfl.algorithms.local import Local
from kdfl.registry import Registry
from kdfl.train import LocalSGD
from kdfl.types import KdflError

ALGORITHMS: Registry[type[Any]] = Registry("algorithm", {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "feddf": FedDF,
    "fedema_distill": FedEMADistill,
    "local": Local,
    "fedad": FedAD,
    "fd": FD,
    "feddistill": FedDistill,
    "fedmd": FedMD,
    "dsfl": DSFL,
    "fedntd": FedNTD,
    "fedgen": FedGen,
    "fml": FML,
    "fedproto": FedProto,
    "fedkd": FedKD,
    "fedssd": FedSSD,
})

REQUIRED = ("init", "configure", "client_program", "validate", "server_update")


def check_algorithm(cls: Any, name: str) -> type[Any]:
    """``cls`` if it is a dataclass meeting the :class:`~kdfl.types.Algorithm` contract."""
    if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
        raise KdflError(f"algorithm {name!r} must be a dataclass of hyperparameters (decorate it with "
                        f"@dataclass(frozen=True)); got {cls!r}")
    missing = [m for m in REQUIRED if not callable(getattr(cls, m, None))]
    if missing:
        raise KdflError(f"algorithm {name!r} lacks {', '.join(missing)}: an algorithm defines "
                        f"{', '.join(REQUIRED)} (see docs/writing-an-algorithm.md)")
    if "local" not in {f.name for f in dataclasses.fields(cls)}:
        raise KdflError(f"algorithm {name!r} needs a field 'local: LocalSGD' (the [local] config section)")
    return cls


def register(name: str) -> Callable[[type[Any]], type[Any]]:
    """Class decorator: make an algorithm available as ``algorithm.name = name``."""

    def deco(cls: type[Any]) -> type[Any]:
        if name in ALGORITHMS and ALGORITHMS[name] is not cls:
            raise KdflError(f"algorithm name {name!r} is taken by {ALGORITHMS[name].__qualname__}")
        ALGORITHMS.add(name, check_algorithm(cls, name))
        return cls

    return deco


def resolve(name: str) -> type[Any]:
    """The algorithm class for a registry key or a ``"module:ClassName"`` path."""
    if ":" not in name:
        return ALGORITHMS.get(name)  # the standard "unknown algorithm ... Did you mean" error
    module, _, attr = name.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise KdflError(f"algorithm {name!r}: cannot import module {module!r} ({e}); make it importable "
                        "(install it, or run from the directory that holds it / set PYTHONPATH)") from None
    cls = getattr(mod, attr, None)
    if cls is None:
        raise KdflError(f"algorithm {name!r}: module {module!r} has no {attr!r}")
    return check_algorithm(cls, name)


def nested_fields(cls: type[Any]) -> dict[str, type[Any]]:
    """Fields of ``cls`` that are settings dataclasses themselves (besides ``local``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if f.name != "local" and dataclasses.is_dataclass(hints[f.name]) and isinstance(hints[f.name], type)}


def _default(cls: type[Any], name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def build_algorithm(name: str, local: LocalSGD, options: Mapping[str, Any]) -> Any:
    """An algorithm from its config options; a sub-table overrides the keys it names of
    the algorithm's own default for that nested field."""
    cls = resolve(name)
    kwargs = dict(options)
    for field_name in nested_fields(cls):
        if isinstance(kwargs.get(field_name), Mapping):
            base = _default(cls, field_name)
            kwargs[field_name] = dataclasses.replace(base, **kwargs[field_name])
    try:
        return cls(local=local, **kwargs)
    except TypeError as e:  # a hyperparameter without a default that the config does not give
        raise KdflError(f"algorithm {name!r}: {e}") from None


__all__ = ["ALGORITHMS", "DSFL", "FD", "FedAD", "FedAvg", "FedAvgM", "FedDF", "FedDistill", "FedEMADistill", "FedGen", "FedKD", "FedMD",
           "FedNTD", "FedProto", "FedProx", "FedSSD", "FML", "Local", "build_algorithm", "register", "resolve"]
