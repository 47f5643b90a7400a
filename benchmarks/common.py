"""Shared helpers for the benchmark scripts: run many configs in worker processes and
summarise them over seeds. Every number printed comes from ``kdfl.experiment.run``."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

Job = tuple[str, str, int, list[str]]  # (dataset label, method label, seed, overrides)


def _run(job: Job) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # two single-threaded workers beat one two-threaded process here
    from kdfl import config, experiment

    data, method, seed, overrides = job
    cfg = config.load(None, [*overrides, f"run.seed={seed}"])
    t0 = time.perf_counter()
    hist = experiment.run(cfg)
    evals = [r for r in hist.records if "accuracy" in r]
    client_evals = [r for r in hist.records if "client_eval" in r]
    return {
        "data": data, "method": method, "seed": seed, "summary": hist.summary,
        "curve": [(r["round"], r["accuracy"]) for r in evals], "seconds": time.perf_counter() - t0,
        "overrides": list(overrides),
        # per-client metrics: the mean over clients per evaluated round, and the last evaluation
        "client_curve": [(r["round"], r.get("client_accuracy_mean", r.get("client_test_accuracy_mean")))
                         for r in client_evals],
        "client_eval": hist.clients.get("client_eval"),  # the final per-client evaluation
        "client_archs": list(cfg_archs(cfg)),
    }


def cfg_archs(cfg: dict[str, Any]) -> list[str]:
    """Each client's architecture, as the run assigned them."""
    from kdfl.experiment import assign_archs

    m = cfg["model"]
    return assign_archs(cfg["data"]["num_clients"], m["arch"], list(m["client_archs"]), m["assign"])


def run_jobs(jobs: Sequence[Job], workers: int, log_path: Path | None = None,
             runner: Callable[[Job], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run every job (in ``workers`` processes); results in job order, also appended as
    JSON lines to ``log_path`` as they finish. Jobs already in ``log_path`` (same data,
    method, seed and overrides) are not run again, so an interrupted benchmark continues.
    ``runner`` replaces the default :func:`_run` (a picklable, module-level function that
    returns at least ``_run``'s keys)."""
    results: list[dict[str, Any]] = []
    done: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    if log_path is not None and log_path.exists():
        for line in log_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["data"], r["method"], r["seed"], json.dumps(r.get("overrides")))] = r
    key = lambda j: (j[0], j[1], j[2], json.dumps(list(j[3])))  # noqa: E731
    results = [done[key(j)] for j in jobs if key(j) in done]
    if results:
        print(f"  reusing {len(results)} finished runs from {log_path}", file=sys.stderr, flush=True)
    jobs = [j for j in jobs if key(j) not in done]
    ctx = None
    if workers > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx) if workers > 1 else None
    fn = runner or _run
    it = pool.map(fn, jobs) if pool is not None else map(fn, jobs)
    for res in it:
        results.append(res)
        s = res["summary"]
        shown = (f"final {s['final_accuracy']:.4f}" if s.get("final_accuracy") is not None else
                 f"client mean {s.get('client_accuracy_mean') or s.get('client_test_accuracy_mean') or math.nan:.4f}")
        print(f"  done {res['data']:8s} {res['method']:28s} seed {res['seed']}: {shown} in {res['seconds']:.0f} s",
              file=sys.stderr, flush=True)
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(res) + "\n")
    if pool is not None:
        pool.shutdown()
    return results


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
