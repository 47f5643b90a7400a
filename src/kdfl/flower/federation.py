"""What both Flower apps build from one kdfl config: the federation, the engine that
makes clients exactly like the simulator does, the threat and the codecs."""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdfl import config as config_mod
from kdfl.attacks import ATTACKS
from kdfl.compression import Codec
from kdfl.config import Config
from kdfl.experiment import Federation, build
from kdfl.privacy import settings_of
from kdfl.simulation.engine import Engine, RunSettings
from kdfl.threat import Threat, make_threat
from kdfl.transport import codec_of
from kdfl.types import KdflError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_KEY = "kdfl-config"  # run-config key: a TOML path (or TOML text)
OVERRIDES_KEY = "kdfl-set"  # run-config key: "section.key=value" overrides separated by ';'
OUT_KEY = "kdfl-out"  # run-config key: directory for metrics.jsonl / summary.json
TIMEOUT_KEY = "kdfl-timeout-s"  # run-config key: seconds the ServerApp waits for the replies of one phase
RESUME_KEY = "kdfl-resume"  # run-config key: continue the run in kdfl-out from its checkpoint
DEFAULT_REPLY_TIMEOUT_S = 600.0  # a node silent this long in a round is a failed client of that round


def reply_timeout(value: Any) -> float:
    """A finite, positive reply timeout in seconds (None: :data:`DEFAULT_REPLY_TIMEOUT_S`).

    Every ``send_and_receive`` of the ServerApp waits at most this long, so a dead or
    stalled SuperNode becomes a failed client of the round instead of stalling the run."""
    if value is None or value == "":
        return DEFAULT_REPLY_TIMEOUT_S
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = math.nan
    if not math.isfinite(t) or t <= 0:
        raise KdflError(
            f"{TIMEOUT_KEY} must be a finite number of seconds > 0, got {value!r}: it bounds how long the ServerApp "
            f"waits for the replies of a round (default {DEFAULT_REPLY_TIMEOUT_S:.0f}); set e.g. "
            f"--run-config \"{TIMEOUT_KEY}=120\""
        )
    return t


def load_config(
    source: str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    base_dirs: Sequence[str | Path] = (),
) -> Config:
    """A validated kdfl config from a TOML path, TOML text or a config dict.

    A relative path is looked up in the working directory, then in each of ``base_dirs``
    (the app's directory). Text with a newline or a ``[section]`` header is read as TOML.
    """
    if isinstance(source, Mapping):
        raw: dict[str, Any] = {s: dict(v) for s, v in source.items()}
    elif isinstance(source, Path):
        return load_config(str(source), overrides, base_dirs)
    elif "\n" in source or source.lstrip().startswith("["):
        try:
            raw = tomllib.loads(source)
        except tomllib.TOMLDecodeError as e:
            raise KdflError(f"the kdfl config text passed to Flower is not valid TOML: {e}") from None
    else:
        p = Path(source).expanduser()
        candidates = [p] if p.is_absolute() else [Path.cwd() / p, *(Path(b) / p for b in base_dirs)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise KdflError(
                f"kdfl config file {source!r} not found (looked in: {', '.join(str(c) for c in candidates)}); "
                f"set '{CONFIG_KEY}' in the Flower run config to an existing TOML path or to the TOML text"
            )
        return config_mod.load(found, overrides)
    return config_mod.validate(config_mod.apply_overrides(raw, overrides))


def split_overrides(text: str) -> list[str]:
    """``"run.rounds=2; local.epochs=1"`` -> ``["run.rounds=2", "local.epochs=1"]``."""
    return [s.strip() for s in str(text).replace("\n", ";").split(";") if s.strip()]


@dataclass
class Prepared:
    """One config, built once per process."""

    cfg: Config
    text: str  # the resolved config as TOML (sent to every node once per run, in the setup query)
    fed: Federation
    engine: Engine  # its settings, privacy, and ``client`` (the same Client as the simulator builds)
    threat: Threat | None
    uplink_codec: Codec | None
    downlink_codec: Codec | None

    @property
    def num_clients(self) -> int:
        return len(self.fed.partitions)

    @property
    def digest(self) -> str:
        """SHA-256 of :attr:`text`: what TRAIN / EVALUATE messages carry instead of the text."""
        return config_digest(self.text)


def config_digest(text: str) -> str:
    """SHA-256 (hex) of a resolved config text."""
    return hashlib.sha256(text.encode()).hexdigest()


_CACHE: dict[str, Prepared] = {}


def prepare(cfg: Config) -> Prepared:
    """Build (or take from this process's cache) everything a Flower app needs."""
    text = config_mod.dumps(cfg)
    key = config_digest(text)
    if key in _CACHE:
        return _CACHE[key]
    threat = make_threat(cfg["attack"], 0)
    if threat is not None and ATTACKS[threat.name].omniscient:
        raise KdflError(
            f"attack {threat.name!r} is omniscient (it reads the honest clients' uploads of the round), which a "
            "malicious Flower node cannot see; in Flower runs use a non-omniscient attack (sign_flip, scaled, "
            "gaussian, label_flip) or run it in the simulator (kdfl run)"
        )
    fed = build(cfg)
    threat = make_threat(cfg["attack"], fed.task.num_classes)
    keys = set(RunSettings.__dataclass_fields__)
    settings = RunSettings(**{k: v for k, v in cfg["run"].items() if k in keys})
    up, down = codec_of(cfg["compression"]["uplink"]), codec_of(cfg["compression"]["downlink"])
    engine = Engine(fed.algorithm, fed.task, fed.partitions, settings, threat=threat, holdouts=fed.holdouts,
                    uplink_codec=up, downlink_codec=down, privacy=settings_of(cfg.get("privacy")))
    p = Prepared(cfg, text, fed, engine, threat, up, down)
    _CACHE.clear()  # one config per process is the normal case; do not keep old data sets alive
    _CACHE[key] = p
    return p


def prepare_text(text: str) -> Prepared:
    """:func:`prepare` from the resolved TOML text the ServerApp sends."""
    key = config_digest(text)
    if key in _CACHE:
        return _CACHE[key]
    p = prepare(load_config(text))
    _CACHE[key] = p
    return p
