"""Shared helpers for the benchmark scripts: run many configs through the sweep engine
(:func:`kdfl.sweep.run_jobs`: worker processes, one run directory per run, resumable) and
summarise them over seeds. Every number printed comes from ``kdfl.experiment.run``, read
back from the run directory it wrote."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Job = tuple[str, str, int, list[str]]  # (dataset label, method label, seed, overrides)
RUNS_DIR = Path(__file__).resolve().parent.parent / "runs" / "bench"  # runs/ is gitignored
FAILED: list[str] = []  # every run :func:`run_jobs` left out in this process ("labels: reason"), for the reports


def failed_note() -> str:
    """A Markdown note listing the runs left out of the tables (empty when none)."""
    if not FAILED:
        return ""
    return ("\nLeft out (failed; rerun the same command to retry them):\n\n"
            + "\n".join(f"- {m}" for m in FAILED) + "\n")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "-", text)[:80] or "-"


def run_dir(job: Job, runs_dir: Path) -> Path:
    """``runs_dir/<data>/<method>/<hash of the overrides>/seed<k>``: the config is the
    overrides and the seed (no base file), so the same job always lands in the same
    directory and a finished one is reused."""
    data, method, seed, overrides = job
    digest = hashlib.sha1(json.dumps(list(overrides)).encode()).hexdigest()[:10]
    return runs_dir / _slug(data) / _slug(method) / digest / f"seed{seed}"


def read_result(job: Job, out: Path) -> dict[str, Any]:
    """A benchmark result from the finished run directory ``out``: the job's labels, the
    summary, the test-accuracy curve, the per-client curve and final per-client evaluation,
    and each client's architecture. ``seconds`` is the run's ``wall_seconds`` (the rounds;
    :func:`run_jobs` puts the whole run's time there when it ran it)."""
    from kdfl import config
    from kdfl.report import read_run

    data, method, seed, overrides = job
    records, summary = read_run(out)
    clients_path = out / "clients.json"
    clients = json.loads(clients_path.read_text()) if clients_path.is_file() else {}
    return {
        "data": data, "method": method, "seed": seed, "summary": summary,
        "curve": [(r["round"], r["accuracy"]) for r in records if "accuracy" in r],
        "seconds": float(summary.get("wall_seconds") or 0.0),
        "overrides": list(overrides),
        # per-client metrics: the mean over clients per evaluated round, and the last evaluation
        "client_curve": [(r["round"], r.get("client_accuracy_mean", r.get("client_test_accuracy_mean")))
                         for r in records if "client_eval" in r],
        "client_eval": (clients or {}).get("client_eval"),  # the final per-client evaluation
        "client_archs": list(cfg_archs(config.load(out / "config.toml"))),
    }


def cfg_archs(cfg: dict[str, Any]) -> list[str]:
    """Each client's architecture, as the run assigned them."""
    from kdfl.experiment import assign_archs

    m = cfg["model"]
    return assign_archs(cfg["data"]["num_clients"], m["arch"], list(m["client_archs"]), m["assign"])


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_jobs(jobs: Sequence[Job], workers: int, log_path: Path | None = None,
             reader: Callable[[Job, Path], dict[str, Any]] | None = None,
             runs_dir: Path | None = None) -> list[dict[str, Any]]:
    """Run every job through the sweep engine (:func:`kdfl.sweep.run_jobs`: ``workers``
    spawned processes of one torch thread each) into its own run directory under
    ``runs_dir`` (default ``RUNS_DIR/<script stem>``, see :func:`run_dir`); results in job
    order, as :func:`read_result` (or ``reader``, e.g. to add numbers of the run's records)
    reads them from the run directories, also appended as JSON lines to ``log_path`` as
    they finish.

    Resuming: jobs already in ``log_path`` (same data, method, seed and overrides) are
    taken from it; jobs whose run directory is finished are read back, not run again; a run
    killed mid-way continues from its checkpoint. A run that fails (or that another process
    still holds) is reported with its reason and ``error.txt`` and left out of the results,
    with a note on stdout, where the tables go; the benchmark goes on."""
    from kdfl import sweep

    read = reader or read_result
    root = runs_dir if runs_dir is not None else RUNS_DIR / Path(sys.argv[0]).stem
    done: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    if log_path is not None and log_path.exists():
        for line in log_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["data"], r["method"], r["seed"], json.dumps(r.get("overrides")))] = r
    key = lambda j: (j[0], j[1], j[2], json.dumps(list(j[3])))  # noqa: E731
    reused = sum(key(j) in done for j in jobs)
    if reused:
        _say(f"  reusing {reused} finished runs from {log_path}")

    def record(j: Job, res: dict[str, Any]) -> None:
        done[key(j)] = res
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(res) + "\n")

    todo: dict[Path, list[Job]] = {}  # by run directory (identical jobs share one)
    for j in jobs:
        if key(j) not in done:
            todo.setdefault(run_dir(j, root), []).append(j)
    from_dirs = [d for d in todo if sweep.finished(d)
                 and not sweep.stale(None, (*todo[d][0][3], f"run.seed={todo[d][0][2]}"), d)]
    if from_dirs:
        _say(f"  reading {len(from_dirs)} finished runs from their run directories under {root}")
    for d in from_dirs:
        for j in todo.pop(d):
            record(j, read(j, d))
    errors: dict[Path, str] = {}

    def finish(sj: sweep.Job, res: dict[str, Any]) -> None:
        if "error" in res:
            errors[sj.out] = res["error"]
        elif not res.get("busy"):
            for j in todo[sj.out]:
                out = read(j, sj.out)
                if not res.get("resumed"):
                    out["seconds"] = res["seconds"]  # the whole run (set-up and final evaluation too)
                record(j, out)

    sjobs = [sweep.Job(f"{js[0][0]} | {js[0][1]} | seed {js[0][2]}", None,
                       (*js[0][3], f"run.seed={js[0][2]}"), d) for d, js in todo.items()]
    if sjobs:
        _say(f"  running {len(sjobs)} runs with {workers} worker(s) into {root}")
        sweep.run_jobs(sjobs, workers, threads=1, say=_say, on_done=finish)
    missing = []
    for d, js in todo.items():
        for j in js:
            if key(j) in done:
                continue
            if sweep.finished(d):  # finished by another process meanwhile
                record(j, read(j, d))
                continue
            why = (f"{errors[d]} (details: {d / 'error.txt'})" if d in errors
                   else f"not finished: another process holds its run directory {d}")
            missing.append(f"{j[0]} | {j[1]} | seed {j[2]}: {why}")
    FAILED.extend(missing)
    if missing:
        print(f"\nnote: {len(missing)} run(s) failed and are left out of the tables below (rerun the same "
              "command to retry them; finished runs are kept):", flush=True)
        for m in missing:
            print(f"- {m}", flush=True)
        print(flush=True)
    return [done[key(j)] for j in jobs if key(j) in done]


def first_round_reaching(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    return next((r for r, a in curve if a >= target), None)


def mean_std(xs: Sequence[float]) -> str:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} ± {sd:.4f}"


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
