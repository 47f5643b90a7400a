"""Compact component specs: ``"name:key=value,key=value"`` -> ("name", {key: value}).

Used for aggregators ("trimmed_mean:beta=0.2"), codecs ("topk:k=3") and architectures
("resnet8:norm=gn") wherever a config holds one string.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from kdfl.types import KdflError


def parse_value(text: str) -> Any:
    """"3" -> 3, "0.5" -> 0.5, "true" -> True, anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:k=v,k2=v2"``; a bare positional value ("topk:3") is stored under "_"."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            params["_"] = parse_value(key)
        else:
            params[key.strip()] = parse_value(value)
    return name.strip(), params


def unknown(kind: str, name: str, choices: Iterable[str]) -> KdflError:
    """The standard 'unknown X' error with close matches and the full list."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KdflError(f"unknown {kind} {name!r}.{hint} Available: {', '.join(choices)}.")
