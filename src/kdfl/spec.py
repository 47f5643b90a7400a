"""Compact component specs: ``"name:key=value,key=value"`` -> ("name", {key: value}).

Used for aggregators ("trimmed_mean:beta=0.2"), codecs ("topk:k=3"), architectures
("resnet8:norm=gn") and executors ("parallel:workers=4") wherever a config holds one
string. The grammar::

    spec   := name [":" [item ("," item)*]]
    item   := key "=" value | value          (a bare value is the positional shorthand)

Values become int, float or bool (``true``/``false``, any case) where they parse, else
they stay strings. A bare value ("topk:3") is stored under :data:`POSITIONAL`; which
option it means is up to the component's :class:`~kdfl.registry.Registry`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from kdfl.types import KdflError

POSITIONAL = "_"
"""The key under which :func:`parse_spec` stores a bare value ("topk:3" -> {"_": 3})."""


def parse_value(text: str) -> Any:
    """"3" -> 3, "0.5" -> 0.5, "true" -> True, anything else stays a (stripped) string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_spec(text: str, *, kind: str = "component", positional: bool = True) -> tuple[str, dict[str, Any]]:
    """Split ``"name:k=v,k2=v2"`` into the name and its parsed options.

    Args:
        text: the spec string.
        kind: what the spec names ("codec", "model", ...), used in error messages.
        positional: whether a bare value is allowed; it is stored under
            :data:`POSITIONAL` ("topk:3" -> ``("topk", {"_": 3})``).

    Returns:
        The stripped name and the options in the order given.

    Raises:
        KdflError: a non-string spec, an empty name, an empty item ("a:k=1,,b=2"), an
            item without a key ("a:=3") or value ("a:k="), a key that is not a Python
            name, an option given twice, or a bare value where none is allowed.
    """
    if not isinstance(text, str):
        raise KdflError(f"a {kind} spec must be a string like 'name:key=value', got {text!r}")
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise KdflError(f"{kind} spec {text!r} has no {kind} name; expected e.g. 'name:key=value'")
    options: dict[str, Any] = {}
    if not rest.strip():  # "name" or "name:"
        return name, options
    for item in (s.strip() for s in rest.split(",")):
        key, value = _parse_item(text, kind, name, item, positional)
        if key in options:
            what = "more than one bare value" if key == POSITIONAL else f"{key} twice"
            raise KdflError(f"{kind} spec {text!r} gives {what}")
        options[key] = value
    return name, options


def _parse_item(text: str, kind: str, name: str, item: str, positional: bool) -> tuple[str, Any]:
    """One ``key=value`` (or bare ``value``) item of ``text`` as (key, parsed value)."""
    where = f"{kind} spec {text!r}"
    if not item:
        raise KdflError(f"{where} has an empty item; separate options with single commas, e.g. '{name}:a=1,b=2'")
    key, eq, value = (s.strip() for s in item.partition("="))
    if not eq:
        if not positional:
            raise KdflError(f"{where}: {item!r} is not key=value; expected e.g. '{name}:key=value'")
        return POSITIONAL, parse_value(item)
    if not key:
        raise KdflError(f"{where}: {item!r} has no option name before '='")
    if not key.isidentifier():
        raise KdflError(f"{where}: option name {key!r} is not a name (letters, digits and _)")
    if not value or "=" in value:
        # "k=" is a forgotten value; "k=a=b" a forgotten comma
        raise KdflError(f"{where}: option {key!r} needs one value after '=', got {value!r}")
    return key, parse_value(value)


def format_spec(name: str, options: Mapping[str, Any] | None = None) -> str:
    """The spec string :func:`parse_spec` turns back into ``(name, options)``.

    A :data:`POSITIONAL` value is written bare, right after the colon. String values
    must not contain ``,`` or ``=`` nor look like numbers or booleans.
    """
    items = [_format_value(v) for k, v in (options or {}).items() if k == POSITIONAL]
    items += [f"{k}={_format_value(v)}" for k, v in (options or {}).items() if k != POSITIONAL]
    return f"{name}:{','.join(items)}" if items else name


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def unknown(kind: str, name: str, choices: Iterable[str]) -> KdflError:
    """The standard 'unknown X' error with close matches and the full list."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KdflError(f"unknown {kind} {name!r}.{hint} Available: {', '.join(choices)}.")
