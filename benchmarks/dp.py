"""Accuracy against ε: FedEMA-Distill, DS-FL and DP-FedAvg under differential privacy
(the ``[privacy]`` section; see "Differential privacy" in docs/faults-and-privacy.md).

Protocol: mnist1d (10,000 samples, a 2,000-row held-out proxy for the distillation
methods), 20 clients under Dirichlet 0.1, 10 of them sampled per round (fixed size,
without replacement), 20 rounds of 3 local epochs (SGD lr 0.05, momentum 0.9, batch 32),
the CNN, 3 seeds, δ = 1e-5. For every method and target ε in {1, 4, 8} the noise
multiplier σ is the smallest that keeps the accountant's ε at the end of the run at most
the target (:func:`kdfl.privacy.noise_for_epsilon`, bisection): central mode accounts the
subsampling of 10 of 20 clients per round; local mode has no amplification (the server
knows who took part) and composes the rounds of the client sampled most often, known
per seed from the sampling schedule. Plus each method without DP.

Methods (key: label, mode, clip C):

- ``fedavg``: DP-FedAvg, central: a trusted server clips each delta to C, noise std σ·C
  on the sum (McMahan et al. 2018, with fixed-size sampling and uniform weights).
- ``fedema_local``: FedEMA-Distill as shipped (median of probabilities at T = 3) with
  ``class_weighting = false`` (label counts are integers noise does not protect) and 400
  proxy rows per round; local mode: every client noises its 400x10 logits.
- ``fedema_central``: FedEMA-Distill with the mean of raw logits (the rule central noise
  covers), 400 proxy rows per round; central mode.
- ``dsfl_central``: DS-FL (ERA), soft labels on 400 open rows per round, mean; central.
- ``dsfl_local``: DS-FL uploading logits (noisy soft labels leave the simplex); local.

C is about the median norm of a method's uploads in a run without noise (measured with
``--quick``: the ``dp_upload_norm`` of each record); choosing C from the private data is
itself a leak that this benchmark does not account, as is usual in DP benchmarks.

Finished runs are cached in ``benchmarks/results/dp.jsonl`` (an interrupted run
continues); the table goes to ``benchmarks/results/dp.md``. ``--quick`` (1 seed, 2 rounds,
2,000 samples, 1 local epoch, 20 distillation steps) writes both under /tmp.

Commands::

    python benchmarks/dp.py --workers 2                      # 5 methods x 4 levels x 3 seeds = 60 runs
    python benchmarks/dp.py --methods fedavg,fedema_local --epsilons 4,8
    python benchmarks/dp.py --quick --workers 1              # a smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import command_line, mean_std, run_jobs  # noqa: E402

DELTA = 1e-5
NUM_CLIENTS, PER_ROUND = 20, 10
COMMON = [f"data.num_clients={NUM_CLIENTS}", f"run.clients_per_round={PER_ROUND}", "data.name=mnist1d",
          "data.num_samples=10000", "data.proxy=holdout", "data.proxy_size=2000", "partition.name=dirichlet",
          "partition.alpha=0.1", "model.arch=cnn", "run.rounds=20", "local.epochs=3", "local.lr=0.05",
          "local.momentum=0.9", "local.batch_size=32", "run.threads=1", "run.checkpoint_every=0",
          f"privacy.delta={DELTA}"]
QUICK = ["run.rounds=2", "data.num_samples=2000", "data.proxy_size=400", "local.epochs=1"]
FEDEMA = ["algorithm.name=fedema_distill", "algorithm.class_weighting=false", "algorithm.proxy_subset=400"]
DSFL = ["algorithm.name=dsfl", "algorithm.open_size=400"]
# key -> (label, mode, clip, overrides)
METHODS: dict[str, tuple[str, str, float, list[str]]] = {
    "fedavg": ("DP-FedAvg", "central", 3.0, ["algorithm.name=fedavg"]),
    "fedema_local": ("FedEMA-Distill (median, local)", "local", 100.0, FEDEMA),
    "fedema_central": ("FedEMA-Distill (mean of logits, central)", "central", 100.0,
                       [*FEDEMA, "algorithm.aggregator=mean", "algorithm.space=logits"]),
    "dsfl_central": ("DS-FL (ERA, central)", "central", 15.0, DSFL),
    "dsfl_local": ("DS-FL (ERA, logits, local)", "local", 100.0, [*DSFL, "algorithm.upload=logits"]),
}
QUICK_DISTILL = {"fedema_local": ["algorithm.distill.steps=20"], "fedema_central": ["algorithm.distill.steps=20"],
                 "dsfl_central": ["algorithm.distill.steps=20"], "dsfl_local": ["algorithm.distill.steps=20"]}


def rounds_of(overrides: list[str]) -> int:
    return int(next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("run.rounds=")))


def max_participations(seed: int, rounds: int) -> int:
    """Rounds in which the most often sampled client takes part (no dropout here)."""
    from kdfl.simulation.sampling import sample_clients

    counts = [0] * NUM_CLIENTS
    for r in range(1, rounds + 1):
        for c in sample_clients(NUM_CLIENTS, PER_ROUND, seed, r):
            counts[c] += 1
    return max(counts)


def sigma_for(mode: str, target: float, seed: int, rounds: int) -> float:
    """The noise multiplier giving ε <= ``target`` at δ after ``rounds`` rounds."""
    from kdfl.privacy import noise_for_epsilon

    if mode == "central":
        return noise_for_epsilon(target, DELTA, rounds, NUM_CLIENTS, PER_ROUND)
    return noise_for_epsilon(target, DELTA, max_participations(seed, rounds))


def level_name(target: float | None) -> str:
    return "no DP" if target is None else f"ε ≤ {target:g}"


def jobs_for(keys: list[str], targets: list[float | None], seeds: list[int], extra: list[str],
             quick: bool) -> list[common.Job]:
    jobs: list[common.Job] = []
    for key in keys:
        label, mode, clip, over = METHODS[key]
        base = [*COMMON, *(QUICK if quick else []), *over, *(QUICK_DISTILL.get(key, []) if quick else []), *extra]
        rounds = rounds_of(base)
        for target in targets:
            for seed in seeds:
                dp = [] if target is None else [
                    f"privacy.mode={mode}", f"privacy.clip={clip}",
                    f"privacy.noise_multiplier={sigma_for(mode, target, seed, rounds):.6g}"]
                jobs.append((f"mnist1d/{level_name(target)}", label, seed, [*base, *dp]))
    return jobs


def table(results: list[dict[str, Any]], labels: list[str], targets: list[float | None]) -> str:
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by[(r["method"], r["data"].partition("/")[2])].append(r)
    levels = [level_name(t) for t in targets]
    lines = ["| method | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
    for label in labels:
        cells = []
        for level in levels:
            rs = by.get((label, level), [])
            if not rs:
                cells.append("—")
                continue
            acc = mean_std([r["summary"]["final_accuracy"] for r in rs])
            eps = [r["summary"].get("epsilon") for r in rs]
            if eps[0] is None:
                cells.append(acc)
                continue
            sig = statistics.mean(r["summary"]["noise_multiplier"] for r in rs)
            cells.append(f"{acc} (σ {sig:.3g}, ε {statistics.mean(e for e in eps if e is not None):.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--epsilons", default="1,4,8", help="target epsilons, comma-separated (no DP is always added)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None, help="override run.rounds (σ is calibrated to it)")
    p.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    p.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, tiny data; results under /tmp")
    a = p.parse_args()
    keys = a.methods.split(",")
    for k in keys:
        if k not in METHODS:
            p.error(f"unknown method {k!r}; choose from {', '.join(METHODS)}")
    targets: list[float | None] = [None, *sorted((float(x) for x in a.epsilons.split(",")), reverse=True)]
    seeds = [int(x) for x in a.seeds.split(",")][: 1 if a.quick else None]
    extra = [*a.set, *([f"run.rounds={a.rounds}"] if a.rounds else [])]
    out_dir = Path("/tmp") if a.quick else Path(__file__).parent / "results"
    stem = "dp_quick" if a.quick else "dp"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = run_jobs(jobs_for(keys, targets, seeds, extra, a.quick), a.workers, out_dir / f"{stem}.jsonl")
    labels = [METHODS[k][0] for k in keys]
    rounds = rounds_of([*COMMON, *(QUICK if a.quick else []), *extra])
    text = "\n".join([
        "# Accuracy vs ε (mnist1d, Dirichlet 0.1)", "", f"    {command_line()}", "",
        f"Final test accuracy of the global model, mean ± std over seeds {', '.join(map(str, seeds))}; "
        f"{NUM_CLIENTS} clients, {PER_ROUND} per round, {rounds} rounds; (ε, δ = {DELTA:g}) user-level DP, "
        "replace-one client; in brackets the noise multiplier σ and the accountant's ε at the end (mean over "
        "seeds). Central: subsampled Gaussian (sampling without replacement, RDP); local: no amplification, "
        "the most frequent client's rounds composed.", "",
        table(results, labels, targets), "",
        *[f"- {METHODS[k][0]}: mode {METHODS[k][1]}, clip {METHODS[k][2]:g}" for k in keys], "",
    ])
    if any(math.isnan(r["summary"]["final_accuracy"] or math.nan) for r in results):
        text += "\nSome runs ended with a NaN accuracy (no accepted update or a diverged model).\n"
    text += common.failed_note()
    md = out_dir / f"{stem}.md"
    md.write_text(text)
    print("\n" + text)
    print(f"(written to {md})", flush=True)


if __name__ == "__main__":
    main()
