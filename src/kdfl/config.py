"""Experiment configs: TOML files of values, validated on load.

Sections and their keys::

    [run]        seed, rounds, clients_per_round, eval_every, target_accuracy, dropout,
                 checkpoint_every, executor (default "batched": vectorized where the programs and
                 the model family batch, chosen by structure; "sequential" is the bit-exact
                 reference), device, threads (torch threads; 0 = torch's default),
                 deadline, speed_spread, examples_per_second, upload_bandwidth (stragglers),
                 max_upload_bytes (checked before an upload is decoded)
    [data]       name, data_dir, num_clients, proxy, proxy_size, val_size, client_holdout
                 (share of each client's data held out for per-client accuracy), pool_size and
                 test_size (random subsets of the clients' pool and of the test set; 0 = all),
                 + data set options (name = "npz": path, num_classes)
    [partition]  name, + partition parameters (alpha, min_size, classes_per_client, ...);
                 name = "file" with path = a .json / .npz partition file (``kdfl partition``)
    [model]      arch, client_archs, assign
    [local]      epochs, steps, batch_size, lr, momentum, weight_decay, optimizer
    [algorithm]  name (a registry key or "package.module:ClassName"), + the algorithm's
                 hyperparameters; nested settings as sub-tables, e.g. [algorithm.distill]
    [attack]     name, fraction, + the attack's parameters
    [compression] uplink, downlink (codecs: fp32, fp16, int8, topk:K)
    [privacy]    mode ("none", "local", "central"; "local" when only noise_multiplier > 0 is
                 set), clip, noise_multiplier, delta, allow_integer_entries (see kdfl.privacy)

An unknown key is an error that names the key and close matches; a wrong type or an
out-of-range value names the allowed values. ``--set section.key=value`` overrides a
value (parsed as a TOML value, falling back to a plain string).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any

from kdfl.errors import KdflError

# Reading a config file (and its errors: a missing file, bad TOML, a bad --set) imports no
# torch, so `kdfl run` says what is wrong at once: what validation needs is imported there.
# kdfl.simulation.executors.DEFAULT_EXECUTOR, not imported for that reason (tests/simulation/
# test_executors.py checks that the two agree)
DEFAULT_EXECUTOR = "batched"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Config = dict[str, dict[str, Any]]

DEFAULTS: Config = {
    "run": {"seed": 0, "executor": DEFAULT_EXECUTOR, "device": "cpu", "threads": 0},
    "data": {"name": "digits", "data_dir": "", "num_clients": 20, "proxy": "none", "proxy_size": 0, "val_size": 0,
             "client_holdout": 0.0, "pool_size": 0, "test_size": 0},
    "partition": {"name": "dirichlet", "alpha": 0.5},
    "model": {"arch": "mlp", "client_archs": [], "assign": "round_robin"},
    "local": {},
    "algorithm": {"name": "fedavg"},
    "attack": {"name": "none", "fraction": 0.0},
    "compression": {"uplink": "fp32", "downlink": "fp32"},
    "privacy": {"mode": "none", "clip": 1.0, "noise_multiplier": 0.0, "delta": 1e-5, "allow_integer_entries": False},
}
_RUN_EXTRA = {"seed": int, "executor": str, "device": str, "threads": int}
_DATA_FIXED = {"name": str, "data_dir": str, "num_clients": int, "proxy": str, "proxy_size": int, "val_size": int,
               "client_holdout": float, "pool_size": int, "test_size": int}
_MODEL = {"arch": str, "client_archs": list, "assign": str}
ATTACK_INPUTS = {"x", "malicious", "rng", "y", "num_classes"}  # supplied by the engine, not the config


def _close(key: str, allowed: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _unknown_key(section: str, key: str, allowed: typing.Iterable[str]) -> KdflError:
    allowed = sorted(allowed)
    return KdflError(
        f"unknown config key '{section}.{key}'.{_close(key, allowed)} Allowed keys in [{section}]: {', '.join(allowed)}."
    )


def _type_ok(value: Any, hint: Any) -> bool:
    """Is ``value`` (from TOML) acceptable for the annotation ``hint``?"""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check(section: str, key: str, value: Any, hint: Any) -> Any:
    if not _type_ok(value, hint):
        raise KdflError(
            f"config key '{section}.{key}' must be {_hint_name(hint)}, got {value!r} ({type(value).__name__})"
        )
    if hint is float and isinstance(value, int):
        return float(value)
    if isinstance(value, list) and typing.get_origin(hint) is tuple:
        return tuple(value)
    return value


def dataclass_hints(cls: type, skip: typing.Container[str] = ()) -> dict[str, Any]:
    """Field name -> type annotation of a dataclass (hyperparameters of a component)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in skip and f.init}


def function_hints(fn: Any, skip: typing.Container[str]) -> dict[str, Any]:
    """Parameter name -> annotation (Any when missing) of a function's keyword options."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    return {
        n: hints.get(n, Any)
        for n, p in sig.parameters.items()
        if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _validate_fixed(cfg: Config, section: str, schema: dict[str, Any]) -> None:
    for key, value in list(cfg[section].items()):
        if key not in schema:
            raise _unknown_key(section, key, schema)
        cfg[section][key] = _check(section, key, value, schema[key])


def _named(cfg: Config, section: str, registry: Any, kind: str, fixed: dict[str, Any],
           options_of: typing.Callable[[Any], dict[str, Any]]) -> None:
    """Validate a section whose ``name`` picks a registry entry that defines the other keys."""
    name = cfg[section].get("name")
    if not isinstance(name, str) or name not in registry:
        close = _close(str(name), registry)
        raise KdflError(f"unknown {kind} {name!r} ({section}.name).{close} Available: {', '.join(sorted(registry))}.")
    schema = {**fixed, **options_of(registry[name])}
    for key, value in list(cfg[section].items()):
        if key == "name":
            continue
        if key not in schema:
            owners = sorted(n for n, entry in registry.items() if n != name and key in options_of(entry))
            where = f" ('{key}' is an option of {', '.join(owners)})" if owners else ""
            raise KdflError(
                f"unknown config key '{section}.{key}' for {kind} {name!r}{where}.{_close(key, schema)} "
                f"Allowed keys: {', '.join(sorted(schema)) or 'none'}."
            )
        cfg[section][key] = _check(section, key, value, schema[key])


# keys that moved into [algorithm.distill] when distillation settings became one nested table
_MOVED_TO_DISTILL = {
    "distill_steps": "steps", "distill_batch_size": "batch_size", "distill_lr": "lr",
    "distill_optimizer": "optimizer", "temperature": "temperature", "t2": "t2", "cosine": "cosine",
    "grad_clip": "grad_clip", "eval_every": "eval_every", "patience": "patience",
}


def _validate_algorithm(cfg: Config) -> None:
    """[algorithm]: a known (or importable) algorithm, its hyperparameters, and its nested
    settings tables (``[algorithm.distill]``) checked key by key."""
    from kdfl.algorithms import ALGORITHMS, nested_fields, resolve

    section = cfg["algorithm"]
    name = section.get("name")
    if not isinstance(name, str):
        raise KdflError(f"algorithm.name must be a string, got {name!r}")
    if name not in ALGORITHMS and ":" not in name:
        raise KdflError(f"unknown algorithm {name!r} (algorithm.name).{_close(name, ALGORITHMS)} "
                        f"Available: {', '.join(sorted(ALGORITHMS))}, or a user algorithm as 'package.module:Class'.")
    cls = resolve(name)
    nested = nested_fields(cls)
    schema = dataclass_hints(cls, {"local"})
    for key, value in list(section.items()):
        if key == "name":
            continue
        if key in nested:
            if not isinstance(value, dict):
                raise KdflError(f"config key 'algorithm.{key}' is a table of settings: write [algorithm.{key}] "
                                f"with keys {', '.join(sorted(dataclass_hints(nested[key])))}")
            sub = dataclass_hints(nested[key])
            for k2, v2 in list(value.items()):
                if k2 not in sub:
                    raise _unknown_key(f"algorithm.{key}", k2, sub)
                value[k2] = _check(f"algorithm.{key}", k2, v2, sub[k2])
            continue
        if key not in schema:
            if key in _MOVED_TO_DISTILL and "distill" in nested:
                raise KdflError(f"config key 'algorithm.{key}' moved: write it as '{_MOVED_TO_DISTILL[key]}' in "
                                f"[algorithm.distill] (or --set algorithm.distill.{_MOVED_TO_DISTILL[key]}=...)")
            owners = sorted(n for n, c in ALGORITHMS.items() if n != name and key in dataclass_hints(c, {"local"}))
            where = f" ('{key}' is an option of {', '.join(owners)})" if owners else ""
            raise KdflError(
                f"unknown config key 'algorithm.{key}' for algorithm {name!r}{where}.{_close(key, schema)} "
                f"Allowed keys: {', '.join(sorted(schema)) or 'none'}."
            )
        section[key] = _check("algorithm", key, value, schema[key])


def validate(raw: dict[str, Any]) -> Config:
    """Merge ``raw`` over the defaults and check every key, type and range."""
    from kdfl.algorithms import build_algorithm
    from kdfl.attacks import ATTACKS
    from kdfl.data import DATASETS, PARTITIONS
    from kdfl.data.partition import FILE_PARAMS
    from kdfl.simulation.rounds import RunSettings
    from kdfl.train import LocalSGD

    for section, value in raw.items():
        if section not in DEFAULTS:
            raise KdflError(
                f"unknown config section [{section}].{_close(section, DEFAULTS)} "
                f"Sections: {', '.join('[' + s + ']' for s in DEFAULTS)}."
            )
        if not isinstance(value, dict):
            raise KdflError(f"config [{section}] must be a table of keys, got {value!r}")
    cfg: Config = copy.deepcopy(DEFAULTS)
    for section, values in raw.items():
        if section in NAMED_SECTIONS and "name" in values and values["name"] != cfg[section].get("name"):
            cfg[section] = {"name": values["name"], **({"fraction": 0.0} if section == "attack" else {})}
        cfg[section].update(copy.deepcopy(values))
    _validate_fixed(cfg, "run", {**dataclass_hints(RunSettings), **_RUN_EXTRA})
    _check_run(cfg["run"])
    _validate_fixed(cfg, "local", dataclass_hints(LocalSGD))
    local = LocalSGD(**cfg["local"])  # range errors (lr <= 0, ...) now, not after loading the data
    _validate_fixed(cfg, "model", _MODEL)
    _validate_fixed(cfg, "compression", {"uplink": str, "downlink": str})
    from kdfl.transport import codec_of

    for direction in ("uplink", "downlink"):
        codec_of(cfg["compression"][direction])  # unknown codec -> error naming the choices
    _named(cfg, "data", DATASETS, "data set", _DATA_FIXED, lambda spec: {k: Any for k in spec.options})
    _named(cfg, "partition", {**PARTITIONS, "natural": None, "file": FILE_PARAMS}, "partition", {},
           lambda fn: {} if fn is None else dict(fn) if isinstance(fn, dict)
           else function_hints(fn, {"labels", "num_clients", "rng"}))
    _check_paths(cfg)
    _validate_algorithm(cfg)
    # the algorithm checks its own hyperparameters' ranges (mu >= 0, momentum in [0, 1), ...)
    algorithm = build_algorithm(cfg["algorithm"]["name"], local,
                                {k: v for k, v in cfg["algorithm"].items() if k != "name"})
    _validate_privacy(cfg, raw.get("privacy", {}), algorithm)
    _named(cfg, "attack", {"none": None, **ATTACKS}, "attack", {"fraction": float},
           lambda spec: {} if spec is None else function_hints(spec.fn, ATTACK_INPUTS))
    attack = cfg["attack"]
    if attack["name"] != "none" and not attack.get("fraction", 0.0) > 0:
        raise KdflError(f"attack.name = {attack['name']!r} with attack.fraction = {attack.get('fraction', 0.0)} makes no "
                        "client malicious: set attack.fraction in (0, 0.5) (e.g. 0.2), or attack.name = \"none\"")
    if cfg["model"]["assign"] not in ("round_robin", "blocks"):
        raise KdflError(f"model.assign must be 'round_robin' or 'blocks', got {cfg['model']['assign']!r}")
    if not 0 <= cfg["data"]["client_holdout"] < 1:
        raise KdflError(f"data.client_holdout must be in [0, 1) (0 = no per-client held-out split), "
                        f"got {cfg['data']['client_holdout']}")
    if cfg["data"]["num_clients"] < 1:
        raise KdflError(f"data.num_clients must be >= 1, got {cfg['data']['num_clients']}")
    if not 0 <= cfg["attack"]["fraction"] < 0.5:
        raise KdflError(f"attack.fraction must be in [0, 0.5), got {cfg['attack']['fraction']}")
    return cfg


def _check_paths(cfg: Config) -> None:
    """The files a config names: ``partition.path`` (partition.name = "file") and
    ``data.path`` (data.name = "npz") are required and must exist (relative paths are read
    from the working directory); their content is checked when the run is built."""
    for section, owner, suffixes, what in (
        ("partition", "file", (".json", ".npz"), "a .json or .npz file of per-client row indices, e.g. written by "
                                                 "`kdfl partition CONFIG --out p.json`"),
        ("data", "npz", (), "an .npz file of arrays (x_train, y_train, x_test, y_test) or a PFLlib data set "
                           "directory (train/<i>.npz, test/<i>.npz)"),
    ):
        if cfg[section]["name"] != owner:
            continue
        path = cfg[section].get("path", "")
        if not isinstance(path, str):
            raise KdflError(f"config key '{section}.path' must be a string (a path), got {path!r}: {what}")
        if not path:
            raise KdflError(f"config key '{section}.path' is required with {section}.name = {owner!r}: {what}")
        p = Path(path).expanduser()
        if not p.exists():
            raise KdflError(f"config key '{section}.path': {path!r} does not exist (relative paths are read from the "
                            f"working directory); it must be {what}")
        if suffixes and p.suffix.lower() not in suffixes:
            raise KdflError(f"config key '{section}.path' must end in {' or '.join(suffixes)}, got {path!r}")


def _validate_privacy(cfg: Config, raw: dict[str, Any], algorithm: Any) -> None:
    """[privacy]: keys, ranges, the default mode ("local" when only noise_multiplier > 0
    is set) and whether the accountant covers the algorithm and its rule in that mode."""
    from kdfl.privacy import PrivacySettings, check_combination

    _validate_fixed(cfg, "privacy", dataclass_hints(PrivacySettings))
    section = cfg["privacy"]
    if "mode" not in raw and section["noise_multiplier"] > 0:
        section["mode"] = "local"
    check_combination(algorithm, PrivacySettings(**section))


_RUN_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "seed": (lambda v: v >= 0, "an integer >= 0"),
    "rounds": (lambda v: v >= 1, "an integer >= 1"),
    "clients_per_round": (lambda v: v >= 0, "an integer >= 0 (0 = all clients)"),
    "eval_every": (lambda v: v >= 1, "an integer >= 1"),
    "checkpoint_every": (lambda v: v >= 0, "an integer >= 0 (0 = never)"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "target_accuracy": (lambda v: v is None or 0 <= v <= 1, "in [0, 1]"),
}


def _check_run(run: dict[str, Any]) -> None:
    """Ranges of the [run] keys, the executor name and the device string."""
    for key, (ok, allowed) in _RUN_RANGES.items():
        if key in run and not ok(run[key]):
            raise KdflError(f"run.{key} must be {allowed}, got {run[key]!r}")
    from kdfl.simulation.executors import EXECUTORS, make_executor
    from kdfl.spec import parse_spec

    name, _ = parse_spec(run["executor"])
    if name not in EXECUTORS:
        raise KdflError(
            f"unknown run.executor {name!r}.{_close(name, EXECUTORS)} "
            f"Available: {', '.join(sorted(EXECUTORS))}."
        )
    try:
        executor = make_executor(run["executor"])  # options checked now, not in round 1
    except KdflError as e:
        raise KdflError(f"run.executor: {e}") from None
    close = getattr(executor, "close", None)
    if close is not None:
        close()
    import torch

    try:
        torch.device(run["device"])
    except (RuntimeError, ValueError):
        raise KdflError(f"run.device {run['device']!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:N'") from None
    from kdfl.simulation.rounds import RunSettings

    RunSettings(**{k: v for k, v in run.items() if k in RunSettings.__dataclass_fields__})


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` -> (section, key, value) with value parsed as TOML."""
    path, eq, value = text.partition("=")
    section, dot, key = path.strip().partition(".")
    if not eq or not dot or not key:
        raise KdflError(f"--set expects section.key=value (e.g. run.rounds=5), got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return section, key, parsed


NAMED_SECTIONS = ("partition", "algorithm", "attack")  # sections whose ``name`` picks a component


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config, in place, and return it.

    Switching a component (``algorithm.name``, ...) drops the old component's options;
    ``section.table.key=value`` sets a key of a nested table (``algorithm.distill.steps=100``).
    """
    for item in overrides:
        section, key, value = parse_override(item)
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise KdflError(f"config [{section}] must be a table of keys, got {table!r}")
        if key == "name" and section in NAMED_SECTIONS and table.get("name") != value:
            raw[section] = table = {}  # switching component drops the old component's options
        *path, last = key.split(".")
        for part in path:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise KdflError(f"--set {item!r}: {section}.{part} is not a table")
        table[last] = value
    return raw


def load(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config (or start from the defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise KdflError(f"config file {p} does not exist (see configs/ for examples)")
        if p.is_dir():
            files = sorted(q.name for q in p.glob("*.toml"))
            hint = f", e.g. {p / files[0]}" if files else ""
            raise KdflError(f"config {p} is a directory: name one config file in it{hint}")
        try:
            raw = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # TOML is UTF-8 text
            raise KdflError(f"config file {p} is not valid TOML: {e}") from None
    return validate(apply_overrides(raw, overrides))


def dumps(cfg: Config) -> str:
    """The resolved config as TOML (written to the run directory)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if v is None:
            return '""'
        return repr(v)

    lines = []

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in values.items() if v is not None and not isinstance(v, dict))
        lines.append("")
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for section, values in cfg.items():
        table(section, values)
    return "\n".join(lines)
