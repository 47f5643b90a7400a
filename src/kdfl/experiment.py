"""From a validated config to a running federation: data, partition, models, algorithm,
threat model, executor, engine. The CLI, the benchmarks and the examples all go through
:func:`run` so they share one code path."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdfl import config as config_mod
from kdfl.config import Config
from kdfl.train import LocalSGD
from kdfl.types import KdflError, Task

log = logging.getLogger(__name__)


@dataclass
class Federation:
    """Everything built from one config."""

    cfg: Config
    task: Task
    partitions: list[np.ndarray]
    algorithm: Any
    label_counts: np.ndarray  # (clients, C) of the training rows
    holdouts: list[np.ndarray] | None = None  # per-client held-out rows (data.client_holdout > 0)


def assign_archs(num_clients: int, arch: str, archs: list[str], assign: str) -> list[str]:
    """Client architectures: all ``arch`` when ``archs`` is empty; otherwise
    ``round_robin`` (client i gets archs[i % k]) or ``blocks`` (k contiguous groups)."""
    if not archs:
        return [arch] * num_clients
    if assign == "round_robin":
        return [archs[i % len(archs)] for i in range(num_clients)]
    return [archs[min(i * len(archs) // num_clients, len(archs) - 1)] for i in range(num_clients)]


def build(cfg: Config) -> Federation:
    """Build the task, partitions and algorithm described by ``cfg``."""
    from kdfl import models
    from kdfl.algorithms import build_algorithm
    from kdfl.attacks import choose_malicious
    from kdfl.data import label_counts, split_config

    run, data = cfg["run"], cfg["data"]
    seed = run["seed"]
    # data, server splits, partition (or a partition file) and held-out rows: shared with `kdfl partition`
    fed_data = split_config(cfg)
    bundle, splits, parts, holdouts = fed_data.bundle, fed_data.splits, fed_data.parts, fed_data.holdouts
    labels = splits.train.y.numpy()

    mcfg = cfg["model"]
    archs = assign_archs(data["num_clients"], mcfg["arch"], list(mcfg["client_archs"]), mcfg["assign"])
    shape, classes = tuple(bundle.input_shape), bundle.num_classes
    for a in sorted(set(archs) | {mcfg["arch"]}):
        models.build(a, shape, classes)  # fail now, with the model's own message, not in round 1

    malicious: frozenset[int] = frozenset()
    if cfg["attack"]["name"] != "none" and cfg["attack"]["fraction"] > 0:
        malicious = choose_malicious(data["num_clients"], cfg["attack"]["fraction"], seed)

    device = torch.device(run["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdflError("run.device = 'cuda' but no CUDA device is available: use run.device = 'cpu'")
    task = Task(
        train=splits.train, test=splits.test, proxy=splits.proxy, val=splits.val,
        num_classes=classes, input_shape=shape, server_arch=mcfg["arch"], client_archs=archs,
        build_model=functools.partial(models.build, input_shape=shape, num_classes=classes),
        seed=seed, device=device, malicious=malicious, proxy_labels=splits.proxy_labels,
    )
    acfg = {k: v for k, v in cfg["algorithm"].items() if k != "name"}
    algorithm = build_algorithm(cfg["algorithm"]["name"], LocalSGD(**cfg["local"]), acfg)
    return Federation(cfg, task, parts, algorithm, label_counts(labels, parts, classes), holdouts)


RESUMABLE_CHANGES = {("run", "rounds")}  # what a resume may change: extending (or ending) a run early


def config_diffs(old: Config, new: Config, ignore: Collection[tuple[str, str]] = ()) -> list[str]:
    """``"section.key: old -> new"`` for every key whose value differs between two loaded
    configs (a key set in one and not the other counts: a default may change between
    versions), except the (section, key) pairs in ``ignore``."""
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if (section, key) not in ignore and a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}")
    return diffs


def _check_resume(run_dir: Path, cfg: Config) -> None:
    """Refuse to resume ``run_dir`` with a config that differs from the one it was started
    with, except for ``run.rounds`` (extending a run is a normal need; every stream derives
    from (seed, round, client), so 2 rounds + resume to 4 equals 4 rounds straight)."""
    from kdfl.simulation import checkpoint

    path = run_dir / "config.toml"
    try:
        old = config_mod.load(path)
    except KdflError as e:
        raise KdflError(f"cannot resume {run_dir}: its {path.name} no longer loads ({e}); start the run again "
                        "with --overwrite in place of --resume, or choose a new --out") from None
    diffs = config_diffs(old, cfg, ignore=RESUMABLE_CHANGES)
    if diffs:
        raise KdflError(
            f"cannot resume {run_dir}: the config differs from the one it was started with ({path}): "
            f"{'; '.join(diffs)}. Only run.rounds may change on resume; resume with the same config and "
            "--set values, or choose a new --out"
        )
    if (run_dir / checkpoint.FILE).exists():
        from kdfl.simulation.rounds import RunSettings

        done = checkpoint.load(run_dir)["round"]
        rounds = cfg["run"].get("rounds", RunSettings.rounds)
        if rounds < done:
            raise KdflError(
                f"cannot resume {run_dir} with run.rounds={rounds}: its checkpoint is already "
                f"at round {done}; set run.rounds >= {done}"
            )


# what a run writes into its directory (and `kdfl report` beside it): replaced by overwrite=True
RUN_FILES = ("config.toml", "partition.txt", "malicious.json", "metrics.jsonl", "summary.json", "clients.json",
             "checkpoint.pt", "checkpoint.pt.tmp", "checkpoint.prev.pt", "checkpoint.prev.pt.tmp", "summary.md", "report.md")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, cfg: Config | None = None) -> bool:
    """Refuse, before anything is built or written, a run directory that cannot be used:
    a path that is a file; a directory that already holds a run when neither ``resume``
    nor ``overwrite`` is given (its metrics would be silently replaced and its old summary
    and plots left beside the new ones). With ``overwrite`` the previous run's files are
    deleted first.

    ``resume`` on a directory without a checkpoint (the run was stopped before its first
    one, or never started) starts the run from round 0 in place: its files are replaced
    as with ``overwrite``, after ``cfg`` (when given) is checked against the config the
    run was started with, as for any resume.

    Returns:
        Whether the run continues from a checkpoint (``resume`` and one is there).
    """
    from kdfl.simulation import checkpoint

    if run_dir.exists() and not run_dir.is_dir():
        raise KdflError(f"run directory {run_dir} is a file, not a directory: choose another --out")
    if resume:
        if (run_dir / checkpoint.PREV).is_file() and not (run_dir / checkpoint.FILE).exists():
            checkpoint.load(run_dir)  # an interrupted save: its message says which file to rename
        if (run_dir / checkpoint.FILE).is_file():
            return True
        if cfg is not None and (run_dir / "config.toml").is_file():
            _check_resume(run_dir, cfg)  # the same run, from round 0: the same config
        overwrite = True
    old = [f for f in RUN_FILES if (run_dir / f).exists()] + [p.name for p in run_dir.glob("*.png")]
    if (run_dir / "client_states").is_dir():
        old.append("client_states/")
    if not old:
        return False
    if not overwrite:
        if (run_dir / "summary.json").is_file():
            extend = (" or extend it with --resume and a larger run.rounds"
                      if (run_dir / checkpoint.FILE).is_file() else "")
            raise KdflError(f"{run_dir} already holds a finished run ({', '.join(old[:4])}"
                            f"{', ...' if len(old) > 4 else ''}): choose a new --out, pass --overwrite to replace "
                            f"it{extend}")
        where = ("from its checkpoint" if (run_dir / checkpoint.FILE).is_file()
                 else "from round 0 (it has no checkpoint yet)")
        raise KdflError(f"{run_dir} already holds an unfinished run ({', '.join(old[:4])}"
                        f"{', ...' if len(old) > 4 else ''}): continue it with --resume ({where}), choose a new "
                        "--out, or pass --overwrite to replace it")
    import shutil

    for name in old:
        target = run_dir / name.rstrip("/")
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    return False


def run(
    cfg: Config,
    out: str | Path | None = None,
    resume: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
) -> Any:
    """Build and run the federation; write the run directory when ``out`` is given.

    Args:
        resume: continue the run in ``out`` from its checkpoint (from round 0, in place,
            when it has none yet).
        overwrite: replace a run already in ``out`` (otherwise that is an error).

    Returns the engine's :class:`~kdfl.simulation.engine.History`.
    """
    from kdfl.data import format_label_table
    from kdfl.privacy import settings_of
    from kdfl.simulation.engine import Engine, RunSettings
    from kdfl.simulation.executors import make_executor
    from kdfl.threat import make_threat
    from kdfl.transport import codec_of

    if cfg["run"]["threads"] < 0:
        raise KdflError(f"run.threads must be >= 0 (0 = torch's default), got {cfg['run']['threads']}")
    if cfg["run"]["threads"]:
        # one thread avoids oversubscription collapse when other processes share the cores
        torch.set_num_threads(cfg["run"]["threads"])
    run_dir = Path(out) if out is not None else None
    if resume and run_dir is None:
        raise KdflError("resume needs a run directory: pass the --out of the run to continue")
    if run_dir is not None:
        resumes = check_run_dir(run_dir, resume, overwrite, cfg)
        if resume and not resumes:
            log.warning("%s has no checkpoint yet: starting the run from round 0 in place", run_dir)
        resume = resumes
    fed = build(cfg)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume and (run_dir / "config.toml").exists():
            _check_resume(run_dir, cfg)
        (run_dir / "config.toml").write_text(config_mod.dumps(cfg))
        (run_dir / "partition.txt").write_text(format_label_table(fed.label_counts) + "\n")
        (run_dir / "malicious.json").write_text(json.dumps(sorted(fed.task.malicious)) + "\n")
    settings_keys = {f for f in RunSettings.__dataclass_fields__}
    settings = RunSettings(**{k: v for k, v in cfg["run"].items() if k in settings_keys})
    executor = make_executor(cfg["run"]["executor"])
    engine = Engine(
        fed.algorithm, fed.task, fed.partitions, settings,
        executor=executor,
        threat=make_threat(cfg["attack"], fed.task.num_classes),
        run_dir=run_dir, on_round=on_round, holdouts=fed.holdouts,
        uplink_codec=codec_of(cfg["compression"]["uplink"]),
        downlink_codec=codec_of(cfg["compression"]["downlink"]),
        privacy=settings_of(cfg.get("privacy")),
    )
    try:
        return engine.run(resume=resume)
    finally:
        close = getattr(executor, "close", None)
        if close is not None:  # a process pool (parallel, auto) ends with its run
            close()
