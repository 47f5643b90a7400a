"""The component-spec parser (kdfl.spec) and the generic registry (kdfl.registry).

Property-style: specs are drawn from a seeded generator, so every run checks the same
few hundred cases, and each property is asserted on all of them.
"""

from __future__ import annotations

import random
import string
import sys
from typing import Literal

import pytest

from kdfl.registry import REQUIRED, Check, Option, Registry, default_options, signature_options
from kdfl.spec import POSITIONAL, format_spec, parse_spec, parse_value
from kdfl.types import KdflError

CASES = 300


def _word(rng: random.Random) -> str:
    """An option name: a Python identifier."""
    return rng.choice(string.ascii_lowercase + "_") + "".join(
        rng.choice(string.ascii_lowercase + string.digits + "_") for _ in range(rng.randrange(0, 8))
    )


def _name(rng: random.Random) -> str:
    """A component name: letters, digits, '_' and '-' ("resnet8", "auto-local")."""
    return rng.choice(string.ascii_lowercase) + "".join(
        rng.choice(string.ascii_lowercase + string.digits + "_-") for _ in range(rng.randrange(0, 10))
    )


def _value(rng: random.Random) -> object:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randrange(-10**6, 10**6)
    if kind == 1:
        return rng.uniform(-1e3, 1e3) * 10 ** rng.randrange(-8, 8)
    if kind == 2:
        return rng.random() < 0.5
    return rng.choice(["gn", "bn", "none", "sequential", "128-64", "a.b", "x y"])


def _options(rng: random.Random, positional: bool) -> dict[str, object]:
    options = {_word(rng): _value(rng) for _ in range(rng.randrange(0, 5))}
    options.pop(POSITIONAL, None)
    if positional:
        options = {POSITIONAL: _value(rng), **options}
    return options


def _specs(seed: int) -> list[tuple[str, dict[str, object]]]:
    rng = random.Random(seed)
    return [(_name(rng), _options(rng, rng.random() < 0.3)) for _ in range(CASES)]


# ------------------------------------------------------------------------------ parse_spec
def test_round_trip_of_name_and_options():
    for name, options in _specs(0):
        text = format_spec(name, options)
        assert parse_spec(text) == (name, options), text


def test_whitespace_around_names_keys_and_values_is_ignored():
    rng = random.Random(1)
    for name, options in _specs(1):
        items = [format_spec(name, {k: v}).partition(":")[2] for k, v in options.items()]  # "k=v" or "v"
        spaced = [" " * rng.randrange(3) + item.replace("=", " = ") + " " * rng.randrange(3) for item in items]
        text = f"  {name} :" + ",".join(spaced)
        assert parse_spec(text) == (name, options), text


def test_positional_shorthand_is_stored_under_its_key():
    assert POSITIONAL == "_"
    assert parse_spec("topk:3") == ("topk", {"_": 3})
    assert parse_spec("topk:3,fill_gap=20") == ("topk", {"_": 3, "fill_gap": 20})
    assert parse_spec("topk:fill_gap=0.5,3") == ("topk", {"fill_gap": 0.5, "_": 3})
    assert parse_spec("mean") == parse_spec("mean:") == ("mean", {})


def test_values_are_typed():
    assert [parse_value(t) for t in ("3", "-2", "0.5", "1e-3", "true", "FALSE", " gn ", "128-64")] == [
        3, -2, 0.5, 1e-3, True, False, "gn", "128-64"
    ]
    assert isinstance(parse_value("3"), int) and isinstance(parse_value("3.0"), float)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (":width=3", "has no component name"),
        ("  :3", "has no component name"),
        ("", "has no component name"),
        ("a:=3", "no option name before '='"),
        ("a: =3", "no option name before '='"),
        ("a:k=", "needs one value after '='"),
        ("a:k=1=2", "needs one value after '='"),
        ("a:k=1,,b=2", "empty item"),
        ("a:k=1,", "empty item"),
        ("a:,k=1", "empty item"),
        ("a:1,2", "more than one bare value"),
        ("a:k=1,k=2", "gives k twice"),
        ("a:1k=2", "'1k' is not a name"),
        ("a:k-1=2", "is not a name"),
    ],
)
def test_malformed_specs_are_rejected_clearly(text, needle):
    with pytest.raises(KdflError, match=needle) as info:
        parse_spec(text)
    assert repr(text) in str(info.value)  # the message quotes the whole spec


def test_bare_value_rejected_where_not_allowed_and_kind_named():
    with pytest.raises(KdflError, match=r"model spec 'resnet8:gn': 'gn' is not key=value"):
        parse_spec("resnet8:gn", kind="model", positional=False)
    with pytest.raises(KdflError, match="has no codec name"):
        parse_spec(":3", kind="codec")
    with pytest.raises(KdflError, match="must be a string"):
        parse_spec(3)  # type: ignore[arg-type]


def test_any_text_parses_or_raises_kdfl_error():
    rng = random.Random(2)
    alphabet = "ab_1.=,: -"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        try:
            name, options = parse_spec(text)
        except KdflError:
            continue
        assert name and name == name.strip() and ":" not in name
        assert all(k == POSITIONAL or k.isidentifier() for k in options)


def test_corrupting_a_valid_spec_is_an_error():
    rng = random.Random(3)
    corruptions = [lambda t: t + ",", lambda t: t + ",=1", lambda t: t + ",k=", lambda t: ":" + t.partition(":")[2]]
    for name, options in _specs(3):
        text = format_spec(name, {**options, "k": 1})
        with pytest.raises(KdflError):
            parse_spec(rng.choice(corruptions)(text))


# -------------------------------------------------------------------------------- Registry
def _shapes() -> Registry[str]:
    reg: Registry[str] = Registry("shape", word="parameter", positional=True)
    reg.add("square", "S", options={"side": Option(REQUIRED, Check(lambda v: v > 0, "a number > 0"))})
    reg.add("cube", "C", options=default_options({"side": 1, "hollow": False, "scale": 1.0, "sizes": (2,)}))
    reg.add("point", "P", options={})
    return reg


def test_registry_reads_like_a_mapping():
    reg = _shapes()
    assert "cube" in reg and "cone" not in reg and 3 not in reg  # type: ignore[operator]
    assert list(reg) == list(reg.keys()) == ["square", "cube", "point"]
    assert sorted(reg) == ["cube", "point", "square"] and len(reg) == 3
    assert reg["cube"] == reg.get("cube") == "C"
    assert {**reg} == dict(reg.items()) == {"square": "S", "cube": "C", "point": "P"}
    assert reg.values() == ["S", "C", "P"]


def test_unknown_name_suggests_close_matches():
    reg = _shapes()
    with pytest.raises(KdflError, match=r"^unknown shape 'sqare'\. Did you mean 'square'\? Available: cube, point, square\.$"):
        reg.get("sqare")
    with pytest.raises(KdflError, match=r"unknown shape 'zzz'\. Available:"):
        reg["zzz"]
    with pytest.raises(KdflError, match="unknown shape"):
        reg.bind("cone", {})


def test_unknown_option_names_the_allowed_ones_with_defaults():
    reg = _shapes()
    msg = r"shape 'cube' has no parameter 'sid'; allowed: side=1, hollow=False, scale=1.0, sizes=\(2,\) \(did you mean 'side'\?\)"
    with pytest.raises(KdflError, match=msg):
        reg.bind("cube", {"sid": 2})
    with pytest.raises(KdflError, match=r"shape 'square' has no parameter 'x'; allowed: side$"):
        reg.bind("square", {"side": 1, "x": 0})
    with pytest.raises(KdflError, match="allowed: none"):
        reg.bind("point", {"side": 1})


def test_wrong_type_or_range_names_component_option_and_allowed_values():
    reg = _shapes()
    with pytest.raises(KdflError, match=r"^shape 'cube': side must be an integer like 1, got 'big'$"):
        reg.bind("cube", {"side": "big"})
    with pytest.raises(KdflError, match=r"side must be an integer like 1, got True"):
        reg.bind("cube", {"side": True})  # a bool is not an integer
    with pytest.raises(KdflError, match=r"hollow must be true or false like False, got 1"):
        reg.bind("cube", {"hollow": 1})
    with pytest.raises(KdflError, match=r"scale must be a number like 1.0, got 'x'"):
        reg.bind("cube", {"scale": "x"})
    with pytest.raises(KdflError, match=r"shape 'square': side must be a number > 0, got -1"):
        reg.bind("square", {"side": -1})
    with pytest.raises(KdflError, match=r"shape 'square': side must be a number > 0"):
        reg.check("square", side=0)
    reg.check("square", side=2, other="ignored")  # direct calls check only what they know


def test_bind_converts_and_does_not_fill_defaults():
    reg = _shapes()
    bound = reg.bind("cube", {"scale": 2, "sizes": "4-4"})
    assert bound == {"scale": 2.0, "sizes": "4-4"} and isinstance(bound["scale"], float)
    assert reg.defaults("cube") == {"side": 1, "hollow": False, "scale": 1.0, "sizes": (2,)}
    assert reg.defaults("square") == {"side": REQUIRED}
    with pytest.raises(KdflError, match="shape 'square' needs parameter side$"):
        reg.bind("square", {})


def test_positional_shorthand_binds_the_first_option():
    reg = _shapes()
    assert reg.bind("square", {POSITIONAL: 3}) == {"side": 3}
    assert reg.resolve("cube:4,hollow=true") == ("C", {"side": 4, "hollow": True})
    with pytest.raises(KdflError, match="shape 'cube': side is given twice"):
        reg.bind("cube", {POSITIONAL: 3, "side": 4})
    with pytest.raises(KdflError, match="shape 'point' takes no parameters, got 3"):
        reg.resolve("point:3")
    strict: Registry[str] = Registry("model", {"m": "M"}, options_of=lambda _: default_options({"width": 8}))
    with pytest.raises(KdflError, match=r"model 'm': 3 is not key=value; write e.g. m:width=\.\.\."):
        strict.resolve("m:3")


def test_resolve_reports_malformed_specs_with_the_kind():
    with pytest.raises(KdflError, match="shape spec 'cube:=3'"):
        _shapes().resolve("cube:=3")


def _scaled(x: float, *, factor: float = 2.0, mode: Literal["up", "down"] = "up", label: str = "a") -> float:
    return x * factor


def test_signature_options_follow_annotations_and_named_checks():
    options = signature_options(_scaled, skip=("x",), checks={"label": Check(str.isalpha, "letters")})
    assert list(options) == ["factor", "mode", "label"]
    reg: Registry = Registry("op", {"scaled": _scaled}, options_of=lambda fn: signature_options(fn, skip=("x",)))
    assert reg.bind("scaled", {"factor": 3}) == {"factor": 3.0}
    with pytest.raises(KdflError, match=r"op 'scaled': mode must be up \| down, got 'sideways'"):
        reg.bind("scaled", {"mode": "sideways"})
    assert not options["label"].check.ok("a1") and options["label"].check.allowed == "letters"
    assert signature_options(_scaled)["x"].required


def test_random_values_are_accepted_or_rejected_by_type():
    reg = _shapes()
    rng = random.Random(4)
    for _ in range(CASES):
        value = _value(rng)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if is_int:
            assert reg.bind("cube", {"side": value}) == {"side": value}
        else:
            with pytest.raises(KdflError, match="side must be an integer"):
                reg.bind("cube", {"side": value})


def test_lazy_entries_are_imported_on_first_use(tmp_path, monkeypatch):
    module = "kdfl_test_lazy_entry"
    (tmp_path / f"{module}.py").write_text("class Thing:\n    def __init__(self, size: int = 3) -> None:\n"
                                           "        self.size = size\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    reg: Registry[type] = Registry("thing", options_of=signature_options)
    reg.add_lazy("thing", f"{module}:Thing")
    assert "thing" in reg and list(reg) == ["thing"]
    assert module not in sys.modules  # listing and `in` import nothing
    assert reg.defaults("thing") == {"size": 3}
    assert module in sys.modules
    cls, options = reg.resolve("thing:size=5")
    assert cls is sys.modules[module].Thing and cls(**options).size == 5
    with pytest.raises(KdflError, match="thing 'thing': size must be an integer like 3"):
        reg.resolve("thing:size=big")
    with pytest.raises(ValueError, match="module:attr"):
        reg.add_lazy("bad", "no_colon")
