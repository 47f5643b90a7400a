"""Sweeps: one base config, named methods, grid axes, a tuning grid and seeds, run as
many runs in worker processes and aggregated into one table (``kdfl sweep SWEEP.toml``).

A sweep file (TOML)::

    base = "../configs/fedavg_mnist1d.toml"   # optional, relative to this file
    seeds = [0, 1, 2]
    out = "runs/epochs"                       # optional (default runs/<file stem>), relative to cwd
    target_accuracy = 0.8                     # optional: rounds and uplink MB to this accuracy
    tensorboard = false                       # also write TensorBoard scalars per run

    [set]                                     # overrides for every run
    "run.rounds" = 30
    "data.val_size" = 1000

    [grid]                                    # axes: every combination is a cell
    "local.epochs" = [1, 5, 20]
    "partition.alpha" = [0.1, 1.0]

    [methods.fedavg]                          # named variants (default: one, "base")
    "algorithm.name" = "fedavg"
    [methods.feddf]
    "algorithm.name" = "feddf"
    "data.proxy" = "holdout"

    [tune]                                    # per method and cell, keep the best of these
    metric = "val_accuracy"                   # a record key; the final evaluation, mean over seeds
    [tune.grid]
    "local.lr" = [0.01, 0.03, 0.1]

    [methods.fedgen]                          # a method's own tuning values, beside the grid's
    "algorithm.name" = "fedgen"
    "tune.candidates" = [{"local.lr" = 0.01, "local.momentum" = 0.0, "local.lr_decay" = 0.99}]

Keys are config keys (``section.key``, as ``--set`` takes them); nested tables
(``[grid.local] epochs = [1, 5]``) mean the same as dotted keys. A method's own keys win
over ``[set]``, and grid and tuning values over both. The metric a tuning grid is
selected on must not be the test set's: it is ``val_accuracy`` (the server's labelled
validation slice, ``data.val_size`` > 0) unless the file says otherwise.

A method's ``tune.candidates`` (a list of tables of config keys) are tuning values of that
method only, selected with the grid's values on the same metric: a reference optimizer
(learning rate, momentum, decay together) as one candidate, or values tied to each other
(a weight scaled with the learning rate). ``"tune.grid" = false`` leaves the grid's values
out for that method, so its candidates are all it runs; a method whose only tuning value
is the empty one (``"tune.grid" = false`` and no candidates) is not tuned, and is kept
whenever every seed finished (also without the metric: FD has no server model to
validate).

Each run is an ordinary run directory under ``OUT/runs/<method>/<cell>/<tuning>/seed<k>``
(config, metrics, summary, checkpoints, ``run.log``). A finished run (its summary
written) is skipped when the sweep runs again, a run killed mid-way continues from its
checkpoint, so an interrupted sweep continues where it stopped. A run that fails is
reported with its reason (and the traceback in its ``error.txt``); the others go on. A
finished run whose config differs from what the sweep would run now (an edited ``[set]``
value, a changed default) is *stale* (:func:`stale`): reported, left out of the tables and
never overwritten.
This machinery is :func:`run_jobs`, public for other drivers (the benchmark scripts use
it): a list of :class:`Job` (a name, a base config file or None, overrides, a run
directory), of which it runs the unfinished ones.

The aggregate: ``OUT/results.md`` and ``OUT/results.csv`` (one row per method and cell,
at the selected tuning values: mean ± std over seeds of the final and best accuracy, ECE,
NLL, rounds and uplink MB to the target, bytes per client per round), ``OUT/tuning.md``
(every tuning value's metric) and ``OUT/plots/<cell>.png`` (accuracy vs round with a band
over seeds, accuracy vs cumulative uplink MB).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import itertools
import logging
import math
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdfl.config import NAMED_SECTIONS
from kdfl.errors import KdflError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

TOP_KEYS = {"base", "seeds", "out", "target_accuracy", "tensorboard", "set", "grid", "methods", "tune"}
TUNE_KEYS = {"metric", "grid", "mode"}
Assignment = tuple[tuple[str, Any], ...]  # ((config key, value), ...) in file order


def _flatten(table: dict[str, Any], where: str, leaf_lists: bool, prefix: str = "") -> dict[str, Any]:
    """Nested tables -> dotted keys. ``leaf_lists``: every leaf must be a non-empty list
    (a grid axis)."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, where, leaf_lists, key + "."))
            continue
        if "." not in key:
            raise KdflError(f"sweep [{where}] key {key!r} is not a config key: write 'section.key' "
                            f"(e.g. \"local.lr\")")
        if leaf_lists and (not isinstance(v, list) or not v):
            raise KdflError(f"sweep [{where}] {key!r} must be a non-empty list of values, got {v!r}")
        out[key] = v
    return out


def _fmt(v: Any) -> str:
    """A value as ``--set`` parses it back (TOML)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v)


def _slug(a: Assignment) -> str:
    if not a:
        return "base"
    text = ",".join(f"{k}={v}" for k, v in a)
    return re.sub(r"[^A-Za-z0-9._=,+-]", "-", text)[:120]


def label(a: Assignment) -> str:
    """``key=value, ...`` of an assignment (\"-\" when empty)."""
    return ", ".join(f"{k}={v}" for k, v in a) or "-"


@dataclass(frozen=True)
class Run:
    """One run of the sweep: its method, grid cell, tuning values and seed."""

    method: str
    cell: Assignment
    tuning: Assignment
    seed: int
    overrides: tuple[str, ...]
    out: Path

    @property
    def name(self) -> str:
        parts = [self.method, label(self.cell)]
        if self.tuning:
            parts.append(label(self.tuning))
        return " | ".join(parts) + f" | seed {self.seed}"


@dataclass
class Sweep:
    """A parsed sweep file."""

    path: Path
    base: Path | None
    seeds: list[int]
    out: Path
    target: float | None
    tensorboard: bool
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    methods: dict[str, dict[str, Any]]
    tune_grid: dict[str, list[Any]] = field(default_factory=dict)
    tune_metric: str = "val_accuracy"
    tune_mode: str = "max"
    extra: tuple[str, ...] = ()  # --set of the command line, over every value of the file
    # per method: its own tuning values (``tune.candidates``) and whether the grid's apply too
    candidates: dict[str, list[Assignment]] = field(default_factory=dict)
    use_grid: dict[str, bool] = field(default_factory=dict)

    def cells(self) -> list[Assignment]:
        keys = list(self.grid)
        return [tuple(zip(keys, combo, strict=True)) for combo in itertools.product(*self.grid.values())]

    def tunings(self, method: str | None = None) -> list[Assignment]:
        """The tuning values of ``method``: the grid's product (unless its ``"tune.grid" =
        false``) then its own candidates; without ``method``, the grid's product."""
        keys = list(self.tune_grid)
        grid = [tuple(zip(keys, combo, strict=True)) for combo in itertools.product(*self.tune_grid.values())]
        if method is None:
            return grid
        own = self.candidates.get(method, [])
        out = [*(grid if self.use_grid.get(method, True) else []), *own]
        return out or [()]

    def tune_keys(self) -> list[str]:
        """Every key some tuning value sets: the grid's, then the candidates' (file order)."""
        keys = list(self.tune_grid)
        for cands in self.candidates.values():
            keys += [k for c in cands for k, _ in c if k not in keys]
        return list(dict.fromkeys(keys))

    def tuned(self, method: str) -> bool:
        """Whether ``method`` has more than one tuning value to select from."""
        return len(self.tunings(method)) > 1

    def overrides(self, method: str, cell: Assignment, tuning: Assignment, seed: int | None) -> list[str]:
        values = {**self.fixed, **self.methods[method], **dict(cell), **dict(tuning)}
        # a component's name first: setting attack.name (or algorithm.name) resets its table,
        # so its options must come after it whatever the order in the file
        names = [k for k in values if k.endswith(".name") and k.split(".")[0] in NAMED_SECTIONS]
        ordered = [*names, *(k for k in values if k not in names)]
        out = [*(f"{k}={_fmt(values[k])}" for k in ordered), *self.extra]
        return out if seed is None else [*out, f"run.seed={seed}"]

    def runs(self) -> list[Run]:
        out = []  # cell by cell, so a sweep stopped half-way has whole cells to compare
        for cell in self.cells():
            for method in self.methods:
                for tuning in self.tunings(method):
                    for seed in self.seeds:
                        d = self.out / "runs" / method / _slug(cell) / _slug(tuning) / f"seed{seed}"
                        out.append(Run(method, cell, tuning, seed,
                                       tuple(self.overrides(method, cell, tuning, seed)), d))
        return out

    def target_of(self, cfg: dict[str, Any]) -> float | None:
        return self.target if self.target is not None else cfg["run"].get("target_accuracy")


def load(path: str | Path, extra: Sequence[str] = (), out: str | Path | None = None) -> Sweep:
    """Parse and check a sweep file (every run's config is validated before any runs)."""
    from kdfl import config

    p = Path(path)
    if not p.is_file():
        raise KdflError(f"sweep file {p} does not exist" if not p.exists() else f"sweep file {p} is not a file")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise KdflError(f"sweep file {p} is not valid TOML: {e}") from None
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise KdflError(f"unknown sweep key(s) {', '.join(unknown)} in {p}. Allowed: {', '.join(sorted(TOP_KEYS))} "
                        "(config keys go in [set], [grid], [methods.NAME] or [tune.grid])")
    base = None
    if raw.get("base"):
        if not isinstance(raw["base"], str):
            raise KdflError(f"sweep 'base' must be a path string, got {raw['base']!r}")
        base = (p.parent / raw["base"]).resolve() if not Path(raw["base"]).is_absolute() else Path(raw["base"])
        if not base.is_file():
            raise KdflError(f"sweep base config {raw['base']!r} (resolved to {base}) does not exist; "
                            "'base' is relative to the sweep file")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           and s >= 0 for s in seeds):
        raise KdflError(f"sweep 'seeds' must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise KdflError(f"sweep 'seeds' repeats a seed: {seeds}")
    target = raw.get("target_accuracy")
    if target is not None and (not isinstance(target, (int, float)) or not 0 <= target <= 1):
        raise KdflError(f"sweep 'target_accuracy' must be a number in [0, 1], got {target!r}")
    tb = raw.get("tensorboard", False)
    if not isinstance(tb, bool):
        raise KdflError(f"sweep 'tensorboard' must be true or false, got {tb!r}")
    if tb and importlib.util.find_spec("tensorboard") is None:
        raise KdflError("sweep 'tensorboard = true' needs the tensorboard package: pip install tensorboard "
                        "(or set tensorboard = false; the run directories hold every scalar in metrics.jsonl)")
    for section in ("set", "grid", "methods", "tune"):
        if section in raw and not isinstance(raw[section], dict):
            raise KdflError(f"sweep [{section}] must be a table, got {raw[section]!r}")
    fixed = _flatten(raw.get("set", {}), "set", False)
    grid = _flatten(raw.get("grid", {}), "grid", True)
    methods_raw = raw.get("methods") or {"base": {}}
    methods: dict[str, dict[str, Any]] = {}
    own_tunings: dict[str, tuple[list[Assignment], bool]] = {}
    for name, table in methods_raw.items():
        if not isinstance(table, dict):
            raise KdflError(f"sweep [methods.{name}] must be a table of config keys, got {table!r}")
        if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
            raise KdflError(f"sweep method name {name!r}: use letters, digits and . _ + - only")
        methods[name] = _flatten(table, f"methods.{name}", False)
        own_tunings[name] = _method_tunings(name, methods[name], grid)
    tune = raw.get("tune", {})
    unknown = sorted(set(tune) - TUNE_KEYS)
    if unknown:
        raise KdflError(f"unknown key(s) {', '.join(unknown)} in sweep [tune]: allowed metric, mode and a [tune.grid] "
                        "table of config keys, e.g. [tune.grid] \"local.lr\" = [0.01, 0.1]")
    tune_grid = _flatten(tune.get("grid", {}), "tune.grid", True)
    metric = tune.get("metric", "val_accuracy")
    mode = tune.get("mode", "min" if metric.endswith(("nll", "ece", "loss")) else "max")
    if mode not in ("max", "min"):
        raise KdflError(f"sweep tune.mode must be 'max' or 'min', got {mode!r}")
    if metric in ("accuracy", "nll", "ece"):
        raise KdflError(f"sweep tune.metric = {metric!r} is measured on the test set: select on the validation "
                        "slice instead (tune.metric = \"val_accuracy\" with data.val_size > 0)")
    clash = sorted(set(grid) & set(tune_grid))
    if clash:
        raise KdflError(f"sweep key(s) {', '.join(clash)} are both a grid axis and a tuning axis: keep one")
    if out is not None:
        out_dir = Path(out)
    elif raw.get("out"):
        out_dir = Path(str(raw["out"]))
    else:
        out_dir = Path("runs") / p.stem
    sw = Sweep(p, base, [int(s) for s in seeds], out_dir, target, tb, fixed, grid, methods, tune_grid, metric, mode,
               tuple(extra), {m: c for m, (c, _) in own_tunings.items() if c},
               {m: g for m, (_, g) in own_tunings.items() if not g})
    for method in sw.methods:
        grid_values = {frozenset(t) for t in sw.tunings()} if sw.use_grid.get(method, True) else set()
        seen: set[frozenset[tuple[str, Any]]] = set()
        for cand in sw.candidates.get(method, []):
            key = frozenset(cand)
            if key in grid_values or key in seen:
                raise KdflError(f"sweep [methods.{method}] tune.candidates repeats the tuning value {label(cand)} "
                                "(already a [tune.grid] value or another candidate): drop one")
            seen.add(key)
    # every run's config, checked now (a typo in one method must not surface after an hour)
    for method in sw.methods:
        for cell in sw.cells():
            for tuning in sw.tunings(method):
                try:
                    cfg = config.load(base, sw.overrides(method, cell, tuning, None))
                except KdflError as e:
                    where = " | ".join(x for x in (method, label(cell), label(tuning)) if x != "-")
                    raise KdflError(f"sweep {p}, run {where}: {e}") from None
                if sw.tuned(method) and metric.startswith("val_") and not cfg["data"]["val_size"]:
                    raise KdflError(f"sweep {p}: tune.metric = {metric!r} needs a server validation slice: "
                                    "set \"data.val_size\" (e.g. 1000) in [set]")
    dirs: dict[Path, str] = {}
    for run in sw.runs():  # long tuning values are cut in directory names: never two runs in one
        if run.out in dirs:
            raise KdflError(f"sweep {p}: runs '{dirs[run.out]}' and '{run.name}' would share the directory "
                            f"{run.out} (its name is cut at 120 characters): shorten a method name or a value")
        dirs[run.out] = run.name
    return sw


def _method_tunings(name: str, keys: dict[str, Any], grid: dict[str, list[Any]]) -> tuple[list[Assignment], bool]:
    """Pop a method's ``tune.candidates`` and ``tune.grid`` from its flattened keys:
    (its candidates as assignments, whether the sweep's [tune.grid] applies to it)."""
    where = f"sweep [methods.{name}]"
    cands_raw = keys.pop("tune.candidates", [])
    use_grid = keys.pop("tune.grid", True)
    nested = {k.split(".")[1] for k in keys if k.startswith(("tune.candidates.", "tune.grid."))}
    if "candidates" in nested:  # a table, not a list of tables
        cands_raw = "a table"
    if "grid" in nested:
        use_grid = "a table"
    unknown = sorted(k for k in keys if k.split(".")[0] == "tune" and k.split(".")[1] not in nested)
    if unknown:
        raise KdflError(f"{where}: unknown key(s) {', '.join(unknown)}; a method's tuning keys are "
                        "tune.candidates (a list of tables of config keys) and tune.grid (true or false)")
    if not isinstance(use_grid, bool):
        raise KdflError(f"{where} tune.grid must be true (the [tune.grid] values too) or false (only this method's "
                        f"tune.candidates), got {use_grid!r}")
    if not isinstance(cands_raw, list) or not all(isinstance(c, dict) and c for c in cands_raw):
        raise KdflError(f"{where} tune.candidates must be a list of non-empty tables of config keys, e.g. "
                        f"[{{\"local.lr\" = 0.01, \"local.momentum\" = 0.0}}], got {cands_raw!r}")
    cands = []
    for c in cands_raw:
        flat = _flatten(c, f"methods.{name}.tune.candidates", False)
        clash = sorted(set(flat) & set(grid))
        if clash:
            raise KdflError(f"{where} tune.candidates set {', '.join(clash)}, a [grid] axis: a value is either a "
                            "cell or a tuning value, not both")
        cands.append(tuple(flat.items()))
    return cands, use_grid


# -- running -------------------------------------------------------------------------------------------


# how a run is executed, not what it computes: a finished run is not stale for these
HOW_NOT_WHAT = {("run", "threads"), ("run", "checkpoint_every")}


def stale(base: Path | None, overrides: Sequence[str], out: Path) -> list[str]:
    """How the finished run in ``out`` differs from the config ``base`` + ``overrides``
    (``section.key: run's -> wanted``), or ``[]`` when it is that config. A finished run of
    another config (the sweep file or a default changed since) must not be reported as this
    one; a run directory whose config no longer loads counts as stale too. Torch threads and
    the checkpoint interval (:data:`HOW_NOT_WHAT`) may differ."""
    from kdfl import config, experiment

    try:
        have = config.load(out / "config.toml")
    except KdflError as e:
        return [f"its config.toml no longer loads ({e})"]
    return experiment.config_diffs(have, config.load(None if base is None else str(base), list(overrides)),
                                   ignore=HOW_NOT_WHAT)


def run_status(run: Run, base: Path | None = None, check: bool = False) -> str:
    """``done`` (summary written), ``partial`` (a checkpoint to resume) or ``todo``; with
    ``check``, ``stale`` for a finished run of another config than ``base`` + the run's
    overrides (see :func:`stale`)."""
    if finished(run.out):
        if check and stale(base, run.overrides, run.out):
            return "stale"
        return "done"
    if (run.out / "checkpoint.pt").is_file():
        return "partial"
    return "todo"


def _tensorboard(run_dir: Path, records: Iterable[dict[str, Any]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(run_dir / "tensorboard"))
    try:
        for r in records:
            for k, v in r.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round" and math.isfinite(v):
                    w.add_scalar(k, v, r["round"])
    finally:
        w.close()


def _lock(run_dir: Path) -> Any:
    """An exclusive lock on ``run_dir`` for this process (the open file; closing it, or the
    process dying, releases it), or None when another process holds it. Lets several
    ``kdfl sweep`` processes share one sweep directory."""
    f = open(run_dir / ".lock", "w")  # noqa: SIM115 (held until the run ends)
    try:
        import fcntl

        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover (no flock: one process per sweep directory)
        return f
    except OSError:
        f.close()
        return None
    return f


def execute(job: tuple[str | None, list[str], str, bool, int]) -> dict[str, Any]:
    """Run one sweep run in this process (a pool worker): its run directory is written,
    resumed when it holds a checkpoint. Never raises: a failure comes back as
    ``{"error": ...}`` and its traceback goes to ``error.txt`` in the run directory."""
    base, overrides, out, tensorboard, threads = job
    import torch

    from kdfl import config, experiment

    old_threads, kdfl_log = torch.get_num_threads(), logging.getLogger("kdfl")
    old_propagate = kdfl_log.propagate
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(out)
    t0 = time.perf_counter()
    handler: logging.Handler | None = None
    lock = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(run_dir)
        if lock is None:  # another sweep process (same file, other terminal or machine) runs it
            return {"busy": True, "seconds": 0.0}
        if (run_dir / "summary.json").is_file():  # finished by another process meanwhile
            return {"busy": True, "seconds": 0.0}
        cfg = config.load(base, overrides)
        resume = (run_dir / "checkpoint.pt").is_file()
        handler = logging.FileHandler(run_dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        kdfl_log.addHandler(handler)
        kdfl_log.propagate = False  # warnings go to run.log, not the sweep's terminal
        (run_dir / "error.txt").unlink(missing_ok=True)
        hist = experiment.run(cfg, out=run_dir, resume=resume, overwrite=not resume)
        if tensorboard:
            _tensorboard(run_dir, hist.records)
        return {"summary": hist.summary, "seconds": time.perf_counter() - t0, "resumed": resume}
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # one run's failure is reported; the sweep goes on
        msg = str(e) if isinstance(e, KdflError) else f"{type(e).__name__}: {e}"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(traceback.format_exc())
        except OSError:
            pass
        return {"error": msg, "seconds": time.perf_counter() - t0}
    finally:
        if lock is not None:
            lock.close()  # releases the lock
        if handler is not None:
            kdfl_log.removeHandler(handler)
            handler.close()
        kdfl_log.propagate = old_propagate
        torch.set_num_threads(old_threads)


@dataclass(frozen=True)
class Job:
    """One run directory to fill: the config ``base`` (a file, or None for the defaults)
    with ``overrides`` (``--set`` strings), run into ``out``; ``name`` is what messages call it."""

    name: str
    base: Path | None
    overrides: tuple[str, ...]
    out: Path


def finished(out: Path) -> bool:
    """Whether the run directory ``out`` holds a finished run (its summary written)."""
    return (out / "summary.json").is_file()


def run_jobs(jobs: Sequence[Job], workers: int = 1, threads: int = 1, tensorboard: bool = False,
             say: Callable[[str], None] = print,
             on_done: Callable[[Job, dict[str, Any]], None] | None = None) -> dict[str, int]:
    """Run every unfinished job (no ``summary.json`` in its directory yet) with the sweep's
    machinery: in ``workers`` spawned processes (``threads`` torch threads each; 0 = torch's
    default; one job or one worker: in this process), each run resumed from its checkpoint
    when it has one, under a lock on its directory (a run another process holds is left to
    it: ``busy``), a failure costing only that run (its reason said, the traceback in its
    ``error.txt``). ``say`` gets one line per run; ``on_done(job, result)`` is called in this
    process as each run ends, with :func:`execute`'s result (``summary``, ``seconds``,
    ``resumed``; or ``error``; or ``busy``). Ctrl-C cancels what has not started and
    re-raises. Returns counts by outcome: total, skipped (already finished), ok, failed, busy."""
    todo = [j for j in jobs if not finished(j.out)]
    old = [(j, stale(j.base, j.overrides, j.out)) for j in jobs if finished(j.out)]
    old = [(j, d) for j, d in old if d]
    counts = {"total": len(jobs), "skipped": len(jobs) - len(todo) - len(old), "ok": 0, "failed": len(old),
              "busy": 0}
    for j, d in old:  # never overwritten: moving a finished run away is the user's call
        say(f"  STALE {j.name}: {j.out} holds a finished run of another config ({'; '.join(d[:4])}"
            f"{'; ...' if len(d) > 4 else ''}); move that directory away (or give the sweep another --out) "
            "to run this one")
        if on_done is not None:
            on_done(j, {"error": f"stale run directory {j.out}: {'; '.join(d)}", "seconds": 0.0})
    args = [(None if j.base is None else str(j.base), list(j.overrides), str(j.out), tensorboard, threads)
            for j in todo]

    def done(job: Job, res: dict[str, Any]) -> None:
        n = counts["ok"] + counts["failed"] + counts["busy"] + 1
        if res.get("busy"):
            counts["busy"] += 1
            say(f"  [{n}/{len(todo)}] {job.name}: left to the other sweep process running it")
        elif "error" in res:
            counts["failed"] += 1
            say(f"  [{n}/{len(todo)}] FAILED {job.name}: {res['error']} (details: {job.out / 'error.txt'})")
        else:
            counts["ok"] += 1
            acc = res["summary"].get("final_accuracy")
            shown = f"final accuracy {acc:.4f}" if acc is not None else "no global model"
            say(f"  [{n}/{len(todo)}] {job.name}: {shown}{' (resumed)' if res['resumed'] else ''} "
                f"in {res['seconds']:.0f} s")
        if on_done is not None:
            on_done(job, res)

    if workers <= 1 or len(todo) <= 1:
        for job, arg in zip(todo, args, strict=True):
            done(job, execute(arg))
        return counts
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(execute, arg): job for job, arg in zip(todo, args, strict=True)}
        for fut in as_completed(futures):
            try:
                res = fut.result()
            except Exception as e:  # the worker process died (killed, out of memory)
                res = {"error": f"worker process died: {type(e).__name__}: {e}", "seconds": 0.0}
            done(futures[fut], res)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return counts


def run_sweep(sw: Sweep, workers: int = 1, threads: int = 1, say: Callable[[str], None] = print) -> dict[str, int]:
    """Run every unfinished run of ``sw`` in ``workers`` processes (``threads`` torch
    threads each; 0 = torch's default) and write the aggregate. Returns counts by outcome."""
    runs = sw.runs()
    todo = sum(not finished(r.out) for r in runs)
    sw.out.mkdir(parents=True, exist_ok=True)
    (sw.out / "sweep.toml").write_text(sw.path.read_text())  # what produced this directory
    n_tunings = sorted({len(sw.tunings(m)) for m in sw.methods})
    tunings = str(n_tunings[0]) if len(n_tunings) == 1 else f"{n_tunings[0]}-{n_tunings[-1]} per method"
    say(f"sweep {sw.path}: {len(runs)} runs (methods {len(sw.methods)} x cells {len(sw.cells())} x "
        f"tuning values {tunings} x seeds {len(sw.seeds)}), {len(runs) - todo} already finished, "
        f"{todo} to run with {workers} worker(s); out {sw.out}")
    counts = run_jobs([Job(r.name, sw.base, r.overrides, r.out) for r in runs], workers, threads, sw.tensorboard,
                      say)
    paths = write_report(sw, say)
    if counts["failed"]:
        say(f"{counts['failed']} run(s) failed (listed above; each run directory's error.txt has the traceback); "
            "rerun the same command to retry them (finished runs are kept)")
    say("wrote " + ", ".join(str(p) for p in paths))
    return counts


# -- aggregating ---------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run: Run
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    target: float | None

    def curve(self) -> list[tuple[int, float, float]]:
        """(round, cumulative uplink MB of all clients, test accuracy) at each evaluation."""
        out, cum = [], 0.0
        for r in self.records:
            cum += r.get("uplink_bytes", 0) / 1e6
            if "accuracy" in r:
                out.append((r["round"], cum, r["accuracy"]))
        return out

    def to_target(self) -> tuple[int | None, float | None]:
        """(first round, cumulative uplink MB) at which the test accuracy reaches the target."""
        if self.target is None:
            return None, None
        return next(((rnd, mb) for rnd, mb, a in self.curve() if a >= self.target), (None, None))

    def metric(self, key: str) -> float | None:
        """The last evaluation's ``key`` (None when no record has it)."""
        v = next((r[key] for r in reversed(self.records) if key in r), None)
        return float(v) if isinstance(v, (int, float)) else None


def collect(sw: Sweep) -> list[RunResult]:
    """The finished runs of ``sw`` (unfinished, failed and stale ones are left out: a run
    directory holding another config than the sweep's, see :func:`stale`)."""
    from kdfl import config
    from kdfl.report import read_run

    out = []
    for run in sw.runs():
        if run_status(run, sw.base, check=True) != "done":
            continue
        records, summary = read_run(run.out)
        cfg = config.load(run.out / "config.toml")
        out.append(RunResult(run, records, summary, sw.target_of(cfg)))
    return out


def _stats(xs: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not vals:
        return None, None, 0
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def _pm(xs: Sequence[float | None], fmt: str = ".4f", scale: float = 1.0) -> str:
    m, s, n = _stats(xs)
    if m is None or s is None:
        return "-"
    return f"{m / scale:{fmt}} ± {s / scale:{fmt}}"


def _tuning_cells(sw: Sweep, tuning: Assignment) -> list[str]:
    """One table cell per tuning key: the value this tuning sets, "-" for the method's own."""
    given = dict(tuning)
    return [str(given[k]) if k in given else "-" for k in sw.tune_keys()]


def select(sw: Sweep, results: list[RunResult]) -> tuple[dict[tuple[str, Assignment], Assignment], str]:
    """The tuning values kept per (method, cell): the best mean over seeds of the final
    ``tune.metric``; a method with one tuning value keeps it once every seed finished
    (nothing to select, no metric needed); and the tuning table (Markdown)."""
    chosen: dict[tuple[str, Assignment], Assignment] = {}
    keys = sw.tune_keys()
    if not keys:
        return {(m, c): () for m in sw.methods for c in sw.cells()}, ""
    lines = [f"Selected on the final `{sw.tune_metric}` ({sw.tune_mode}imum of the mean over seeds); "
             "the test set is not used. \"-\": the method's own value (a tuning value that does not set that key); "
             "a method with one tuning value is not tuned.", "",
             f"| method | cell | {' | '.join(keys)} | seeds | {sw.tune_metric} | test accuracy | kept |",
             "|" + "---|" * (len(keys) + 6)]
    for method in sw.methods:
        single = not sw.tuned(method)
        for cell in sw.cells():
            best, best_val = None, None
            rows = []
            for tuning in sw.tunings(method):
                rs = [r for r in results if r.run.method == method and r.run.cell == cell and r.run.tuning == tuning]
                vals = [r.metric(sw.tune_metric) for r in rs]
                m, _, n = _stats(vals)
                rows.append((tuning, rs, vals, m, n))
                if single:
                    if len({r.run.seed for r in rs}) == len(sw.seeds):
                        best = tuning
                # a value counts only when every seed finished with the metric (no lucky subset)
                elif m is not None and n == len(sw.seeds) and (
                        best_val is None or (m > best_val if sw.tune_mode == "max" else m < best_val)):
                    best, best_val = tuning, m
            if best is not None:
                chosen[(method, cell)] = best
            for tuning, rs, vals, _m, n in rows:
                lines.append(f"| {method} | {label(cell)} | {' | '.join(_tuning_cells(sw, tuning))} | {n} | "
                             f"{_pm(vals)} | {_pm([r.summary.get('final_accuracy') for r in rs])} | "
                             f"{('not tuned' if single else '**yes**') if tuning == best else ''} |")
    return chosen, "\n".join(lines) + "\n"


COLUMNS = [  # (csv name, markdown header, value of a run, markdown format, scale)
    ("final_accuracy", "final acc", lambda r: r.summary.get("final_accuracy"), ".4f", 1.0),
    ("best_accuracy", "best acc", lambda r: r.summary.get("best_accuracy"), ".4f", 1.0),
    ("final_ece", "ECE", lambda r: r.summary.get("final_ece"), ".4f", 1.0),
    ("final_nll", "NLL", lambda r: r.summary.get("final_nll"), ".3f", 1.0),
    ("rounds_to_target", "rounds to target", lambda r: r.to_target()[0], ".1f", 1.0),
    ("uplink_mb_to_target", "uplink MB to target (all clients)", lambda r: r.to_target()[1], ".2f", 1.0),
    ("uplink_bytes_per_client_round", "uplink KB/client/round",
     lambda r: r.summary.get("uplink_bytes_per_client_round"), ".1f", 1e3),
    ("downlink_bytes_per_client_round", "downlink KB/client/round",
     lambda r: r.summary.get("downlink_bytes_per_client_round"), ".1f", 1e3),
    ("client_accuracy_mean", "client acc mean",
     lambda r: r.summary.get("client_accuracy_mean", r.summary.get("client_test_accuracy_mean")), ".4f", 1.0),
    ("wall_seconds", "wall s", lambda r: r.summary.get("wall_seconds"), ".1f", 1.0),
]


def tables(sw: Sweep, results: list[RunResult]) -> tuple[str, str, str]:
    """(results Markdown, results CSV, tuning Markdown)."""
    chosen, tuning_md = select(sw, results)
    target = next((r.target for r in results if r.target is not None), None)
    head = ["method", *sw.grid, *sw.tune_keys(), "seeds"]
    md = [f"Mean ± std over seeds; rounds and MB to target over the seeds that reached it "
          f"(target accuracy {target if target is not None else 'not set'}).", "",
          "| " + " | ".join([*head, *(c[1] for c in COLUMNS)]) + " |", "|" + "---|" * (len(head) + len(COLUMNS))]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*head, "seeds_reaching_target",
                     *(f"{c[0]}_{s}" for c in COLUMNS for s in ("mean", "std"))])
    for method in sw.methods:
        for cell in sw.cells():
            if (method, cell) not in chosen:
                md.append("| " + " | ".join([method, *(str(v) for _, v in cell), *("?" for _ in sw.tune_keys()), "0"])
                          + " | no tuning value finished on every seed |" + " |" * (len(COLUMNS) - 1))
                continue
            tuning = chosen[(method, cell)]
            rs = [r for r in results if r.run.method == method and r.run.cell == cell and r.run.tuning == tuning]
            if not rs:
                md.append("| " + " | ".join([method, *(str(v) for _, v in cell), "0"]) + " | not run yet |"
                          + " |" * (len(COLUMNS) - 1))
                continue
            reached = sum(r.to_target()[0] is not None for r in rs)
            cells = [method, *(str(v) for _, v in cell), *_tuning_cells(sw, tuning), str(len(rs))]
            row = []
            for name, _, fn, fmt, scale in COLUMNS:
                text = _pm([fn(r) for r in rs], fmt, scale)
                if name in ("rounds_to_target", "uplink_mb_to_target") and target is not None:
                    text = f"{text} ({reached}/{len(rs)})" if reached else f"not reached (0/{len(rs)})"
                row.append(text)
            md.append("| " + " | ".join([*cells, *row]) + " |")
            values = []
            for _, _, fn, _, _ in COLUMNS:
                m, s, _ = _stats([fn(r) for r in rs])
                values += ["" if m is None else f"{m:.6g}", "" if s is None else f"{s:.6g}"]
            writer.writerow([*cells, reached, *values])
    return "\n".join(md) + "\n", buf.getvalue(), tuning_md


def plot(sw: Sweep, results: list[RunResult], chosen: dict[tuple[str, Assignment], Assignment]) -> list[Path]:
    """One figure per cell: accuracy vs round (mean, band min-max over seeds) and accuracy
    vs cumulative uplink MB (mean over seeds), one line per method at its kept tuning; a
    method without a global model (FedProto, ...) gets a note in the legend instead. The
    title names the sweep, the cell's setting (data set, clients, partition) and the cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from kdfl.report import NO_GLOBAL_MODEL, integer_rounds, setting, uplink_axis

    out = sw.out / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for cell in sw.cells():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        drawn = False
        where = next((w for r in results if r.run.cell == cell and (w := setting(r.run.out))), None)
        for method in sw.methods:
            tuning = chosen.get((method, cell))
            rs = [r for r in results if r.run.method == method and r.run.cell == cell and r.run.tuning == tuning]
            curves = [r.curve() for r in rs if r.curve()]
            if rs and not curves:  # finished runs, no test accuracy: no global model to evaluate
                for ax in (ax1, ax2):
                    ax.plot([], [], ls="none", marker="x", color="grey", label=f"{method}: {NO_GLOBAL_MODEL}")
            if not curves:
                continue
            n = min(len(c) for c in curves)
            rounds = [c[0] for c in curves[0][:n]]
            acc = np.array([[p[2] for p in c[:n]] for c in curves])
            mb = np.array([[p[1] for p in c[:n]] for c in curves]).mean(0)
            legend = method + (f" ({label(tuning)})" if tuning else "") + f", {len(curves)} seeds"
            (line,) = ax1.plot(rounds, acc.mean(0), label=legend)
            ax1.fill_between(rounds, acc.min(0), acc.max(0), alpha=0.2, color=line.get_color())
            ax2.plot(mb, acc.mean(0), color=line.get_color(), label=legend)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax1.set(xlabel="round", ylabel="test accuracy (global model)", title="Accuracy vs round")
        ax2.set(xlabel="cumulative uplink MB (all clients)", ylabel="test accuracy (global model)",
                title="Accuracy vs uplink")
        fig.suptitle(sw.path.name + (f": {where}" if where else "") + (f" (cell {label(cell)})" if cell else ""),
                     fontsize=10)
        integer_rounds(ax1)
        uplink_axis(ax2)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{_slug(cell)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(sw: Sweep, say: Callable[[str], None] = print) -> list[Path]:
    """Write results.md, results.csv, tuning.md (when tuning) and the plots."""
    results = collect(sw)
    md, text_csv, tuning_md = tables(sw, results)
    chosen, _ = select(sw, results)
    sw.out.mkdir(parents=True, exist_ok=True)
    kept = {r.run.out for r in results}
    old = [r for r in sw.runs() if finished(r.out) and r.out not in kept]  # collect left them out: stale
    title = f"# Sweep {sw.path.name}\n\nCommand: `kdfl sweep {sw.path}`; {len(results)} finished runs.\n\n"
    if old:
        title += (f"Left out: {len(old)} stale run(s), finished under another config than the sweep's "
                  f"(see `kdfl sweep {sw.path.name} --dry-run`): " + ", ".join(r.name for r in old[:10])
                  + (", ..." if len(old) > 10 else "") + ".\n\n")
        say(f"{len(old)} stale run(s) left out of the tables (finished under another config; --dry-run lists them)")
    paths = [sw.out / "results.md", sw.out / "results.csv"]
    paths[0].write_text(title + md)
    paths[1].write_text(text_csv)
    if tuning_md:
        (sw.out / "tuning.md").write_text(f"# Tuning of sweep {sw.path.name}\n\n" + tuning_md)
        paths.append(sw.out / "tuning.md")
    if results:
        paths += plot(sw, results, chosen)
    return paths
