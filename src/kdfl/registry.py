"""Registries of pluggable components: lookup by name, declared options, validation.

Every family of pluggable components (aggregators, attacks, codecs, partitions, models,
executors) is one :class:`Registry`: name -> entry. Each entry declares its options as
:class:`Option` objects (a default, or :data:`REQUIRED`, and a :class:`Check`), either
explicitly or derived from the entry (``options_of``, e.g. :func:`signature_options`).
The registry then gives every family the same behaviour and the same errors:

- ``get(name)``: ``unknown <kind> 'x'. Did you mean ...? Available: ...``;
- ``bind(name, options)``: a bare spec value ("topk:3") bound to the first option, then
  unknown options (naming the allowed ones with their defaults), missing required ones
  and values that fail their check (``<kind> 'name': <option> must be <allowed>, got
  <value>``);
- ``resolve(spec)``: :func:`~kdfl.spec.parse_spec` then ``get`` and ``bind``.

Entries can be lazy (``add_lazy(name, "module:attr")``): imported on first use, so a
module can list components whose modules import it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import typing
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

from kdfl.spec import POSITIONAL, parse_spec, unknown
from kdfl.types import KdflError

T = TypeVar("T")

REQUIRED: Any = inspect.Parameter.empty
"""The default of an option that has none (``inspect.Parameter.empty``, as in signatures)."""


def is_int(v: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """A finite real number (Python or numpy), not a bool."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


class Check(NamedTuple):
    """What values an option accepts.

    Attributes:
        ok: the test a value must pass.
        allowed: the accepted values in words ("an integer >= 1"), for error messages.
        convert: applied to a value that passed (e.g. ``float`` so that 1 becomes 1.0).
    """

    ok: Callable[[Any], bool]
    allowed: str
    convert: Callable[[Any], Any] | None = None


def one_of(*choices: Any) -> Check:
    """A check that the value is one of ``choices`` ("a | b | c")."""
    return Check(lambda v: v in choices, " | ".join(str(c) for c in choices))


def typed(hint: Any, default: Any = REQUIRED) -> Check | None:
    """A check that a value fits the type ``hint`` (None when the hint says nothing checkable).

    Ints pass for floats (and become floats); a tuple or list hint accepts one value or a
    sequence (e.g. an MLP's ``hidden=128`` or ``hidden="256-128"``); a ``Literal`` hint
    accepts its values.
    """
    like = "" if default is REQUIRED else f" like {default!r}"
    if typing.get_origin(hint) is typing.Literal:
        return one_of(*typing.get_args(hint))
    if hint is bool:
        return Check(lambda v: isinstance(v, bool), f"true or false{like}")
    if hint is int:
        return Check(is_int, f"an integer{like}")
    if hint is float:
        return Check(is_real, f"a number{like}", float)
    if hint is str:
        return Check(lambda v: isinstance(v, str), f"a name{like}")
    if hint in (tuple, list) or typing.get_origin(hint) in (tuple, list):
        return Check(lambda v: isinstance(v, (int, str, tuple, list)) and not isinstance(v, bool),
                     f"one value or a sequence{like}")
    return None


@dataclass(frozen=True)
class Option:
    """One declared option of a registry entry.

    Attributes:
        default: the value used when the option is not given, or :data:`REQUIRED`.
        check: what values it accepts; None accepts anything.
    """

    default: Any = REQUIRED
    check: Check | None = None

    @property
    def required(self) -> bool:
        """Whether the option has no default."""
        return self.default is REQUIRED


def default_options(defaults: Mapping[str, Any]) -> dict[str, Option]:
    """Options typed by their defaults: ``{"width": 16}`` accepts integers."""
    return {k: Option(v, typed(type(v), v)) for k, v in defaults.items()}


def signature_options(
    fn: Callable[..., Any], *, skip: Container[str] = (), checks: Mapping[str, Check] | None = None
) -> dict[str, Option]:
    """The options of a function or class: its keyword-capable parameters, in order.

    Args:
        fn: a function, or a class (its constructor's parameters).
        skip: parameters the caller supplies (data, generators), not options.
        checks: checks by option name; an option without one is checked against its
            type annotation (see :func:`typed`), if any.
    """
    hints = _hints(fn)
    checks = checks or {}
    return {
        name: Option(p.default, checks.get(name) or typed(hints.get(name), p.default))
        for name, p in inspect.signature(fn).parameters.items()
        if name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Resolved annotations of ``fn`` (a class: of its constructor); {} when they do not resolve."""
    target = typing.cast(Any, fn).__init__ if isinstance(fn, type) else fn
    try:
        return typing.get_type_hints(target)
    except NameError:  # an annotation naming a TYPE_CHECKING-only import: no type checks then
        return {}


@dataclass
class _Entry:
    """A registered value (or the ``"module:attr"`` to import it from) and its options.

    ``options`` is None until first asked for when the registry derives them.
    """

    value: Any
    target: str | None
    options: dict[str, Option] | None


class Registry(Generic[T]):
    """Name -> component, with each component's options declared and validated.

    Reads like a read-only mapping (``name in r``, ``r[name]``, ``sorted(r)``,
    ``r.items()``, ``{**r}``), except that looking up an unknown name raises the
    standard :class:`KdflError` with close matches, for ``r[name]`` as for ``r.get(name)``.

    Args:
        kind: what the entries are, for messages ("aggregator", "codec").
        entries: initial name -> value entries, in listing order.
        word: what an option is called in messages ("hyperparameter", "parameter").
        positional: whether a bare spec value ("krum:2" -> ``{"_": 2}``) binds an entry's
            first option; otherwise it is an error.
        options_of: derives the options of an entry added without ``options=``.
    """

    def __init__(
        self,
        kind: str,
        entries: Mapping[str, T] | None = None,
        *,
        word: str = "option",
        positional: bool = False,
        options_of: Callable[[T], Mapping[str, Option]] | None = None,
    ) -> None:
        self.kind, self.word, self.positional = kind, word, positional
        self._options_of = options_of
        self._entries: dict[str, _Entry] = {}
        for name, value in (entries or {}).items():
            self.add(name, value)

    # -- registering -------------------------------------------------------------------
    def add(self, name: str, value: T, *, options: Mapping[str, Option] | None = None) -> T:
        """Register ``value`` under ``name`` (with ``options``, else derived by ``options_of``)."""
        self._entries[name] = _Entry(value, None, None if options is None else dict(options))
        return value

    def add_lazy(self, name: str, target: str, *, options: Mapping[str, Option] | None = None) -> None:
        """Register ``"module:attr"``, imported on first use (so ``module`` may import this one)."""
        if ":" not in target:
            raise ValueError(f"lazy target must be 'module:attr', got {target!r}")
        self._entries[name] = _Entry(None, target, None if options is None else dict(options))

    # -- the mapping protocol ------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, [{', '.join(self._entries)}])"

    def keys(self) -> Iterable[str]:
        """The names, in registration order."""
        return self._entries.keys()

    def values(self) -> list[T]:
        """The entries (lazy ones are imported)."""
        return [self.get(name) for name in self._entries]

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs (lazy ones are imported)."""
        return [(name, self.get(name)) for name in self._entries]

    # -- lookup and validation -----------------------------------------------------------
    def get(self, name: str) -> T:
        """The entry ``name``, imported first if lazy.

        Raises:
            KdflError: ``unknown <kind> 'name'. Did you mean ...? Available: ...``.
        """
        entry = self._entry(name)
        if entry.target is not None:
            module, _, attr = entry.target.partition(":")
            entry.value, entry.target = getattr(importlib.import_module(module), attr), None
        return typing.cast(T, entry.value)

    def options(self, name: str) -> dict[str, Option]:
        """The declared options of ``name``, in order (derived once, then cached)."""
        entry = self._entry(name)
        if entry.options is None:
            value = self.get(name)
            entry.options = dict(self._options_of(value)) if self._options_of else {}
        return entry.options

    def defaults(self, name: str) -> dict[str, Any]:
        """Option name -> default (:data:`REQUIRED` for required options)."""
        return {k: o.default for k, o in self.options(name).items()}

    def check(self, name: str, **values: Any) -> None:
        """Check values against the checks of ``name``'s options (for direct calls).

        Raises:
            KdflError: ``<kind> 'name': <option> must be <allowed>, got <value>``.
        """
        options = self.options(name)
        for key, value in values.items():
            if key in options:
                self._checked(name, key, value, options[key].check)

    def bind(self, name: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Validate options given for ``name``; return them checked and converted.

        A :data:`~kdfl.spec.POSITIONAL` value binds the first option when the registry
        allows it. Defaults are not filled in (use :meth:`defaults`).

        Raises:
            KdflError: an unknown name, a bare value where none is allowed or for an
                entry without options, an option given twice, an unknown option (naming
                the allowed ones with defaults), a missing required one, or a value that
                fails its check.
        """
        options = self.options(name)
        out = self._bind_positional(name, options, dict(values))
        for key in out:
            if key not in options:
                raise self._no_option(name, key, options)
        missing = [k for k, o in options.items() if o.required and k not in out]
        if missing:
            plural = "s" if len(missing) > 1 else ""
            raise KdflError(f"{self.kind} {name!r} needs {self.word}{plural} {', '.join(missing)}")
        return {k: self._checked(name, k, v, options[k].check) for k, v in out.items()}

    def resolve(self, spec: str) -> tuple[T, dict[str, Any]]:
        """``"name:k=v,..."`` -> (the entry, its checked options); see :meth:`bind`."""
        name, values = parse_spec(spec, kind=self.kind)
        return self.get(name), self.bind(name, values)

    # -- helpers -------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name) if isinstance(name, str) else None
        if entry is None:
            raise unknown(self.kind, str(name), self._entries)
        return entry

    def _bind_positional(self, name: str, options: Mapping[str, Option], out: dict[str, Any]) -> dict[str, Any]:
        if POSITIONAL not in out:
            return out
        value = out.pop(POSITIONAL)
        if not options:
            raise KdflError(f"{self.kind} {name!r} takes no {self.word}s, got {value!r}")
        first = next(iter(options))
        if not self.positional:
            raise KdflError(f"{self.kind} {name!r}: {value!r} is not key=value; write e.g. {name}:{first}=...")
        if first in out:
            raise KdflError(f"{self.kind} {name!r}: {first} is given twice")
        return {first: value, **out}

    def _no_option(self, name: str, key: str, options: Mapping[str, Option]) -> KdflError:
        listed = ", ".join(k if o.required else f"{k}={o.default!r}" for k, o in options.items()) or "none"
        close = difflib.get_close_matches(key, list(options), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return KdflError(f"{self.kind} {name!r} has no {self.word} {key!r}; allowed: {listed}{hint}")

    def _checked(self, name: str, key: str, value: Any, check: Check | None) -> Any:
        if check is None:
            return value
        if not check.ok(value):
            raise KdflError(f"{self.kind} {name!r}: {key} must be {check.allowed}, got {value!r}")
        return check.convert(value) if check.convert else value
