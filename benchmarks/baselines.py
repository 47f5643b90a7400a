"""Parameter-averaging baselines: FedAvg, FedProx and FedAvgM under Dirichlet label skew.

Every run goes through ``kdfl.config.load(None, overrides)`` and ``kdfl.experiment.run`` (the
code path of ``kdfl run``), so this also checks the real config validation and engine.

Grid: data sets (digits, mnist1d) x Dirichlet alpha (0.1, 0.5) x algorithm x seeds.
Same settings for every algorithm: 20 clients, all participating every round, the same
rounds and local epochs, the ``cnn`` model (2-D for digits, 1-D for mnist1d).

    python benchmarks/baselines.py                 # full grid, 3 seeds (about 10-15 min on 2 cores)
    python benchmarks/baselines.py --quick         # 1 seed, 3 rounds, digits only: a smoke test
    python benchmarks/baselines.py --seeds 0 1 --rounds 10 --datasets mnist1d

Prints a Markdown table (mean ± std over seeds) and the command line that produced it.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from typing import Any

import torch

from kdfl import config, experiment

# Shared by every algorithm (as in configs/quickstart.toml).
COMMON = [
    "data.num_clients=20",
    "run.clients_per_round=0",  # all clients every round
    "run.eval_every=1",
    "partition.name=dirichlet",
    "partition.min_size=10",
    "model.arch=cnn",
    "local.epochs=2",
    "local.batch_size=16",
    "local.lr=0.05",
    "local.momentum=0.9",
]
DATASETS: dict[str, list[str]] = {
    "digits": ["data.name=digits"],
    "mnist1d": ["data.name=mnist1d", "data.num_samples=4000"],
}
ALGORITHMS: dict[str, list[str]] = {
    "FedAvg": ["algorithm.name=fedavg"],
    "FedProx (mu=0.01)": ["algorithm.name=fedprox", "algorithm.mu=0.01"],
    # momentum 0.9 with server_lr 1.0 (Hsu et al. 2019's usual setting): checked not to diverge
    # here on top of local momentum 0.9; see benchmarks/README.md for the alternatives tried.
    "FedAvgM (beta=0.9, eta=1.0)": ["algorithm.name=fedavgm", "algorithm.momentum=0.9", "algorithm.server_lr=1.0"],
}
ALPHAS = (0.1, 0.5)


def run_one(dataset: str, alpha: float, algorithm: str, seed: int, rounds: int,
            algorithms: dict[str, list[str]]) -> dict[str, Any]:
    overrides = [*COMMON, *DATASETS[dataset], f"partition.alpha={alpha}", f"run.rounds={rounds}",
                 f"run.seed={seed}", *algorithms[algorithm]]
    cfg = config.load(None, overrides)
    t0 = time.perf_counter()
    hist = experiment.run(cfg)
    summary = dict(hist.summary)
    summary["wall_total"] = time.perf_counter() - t0  # including data loading and partitioning
    return summary


def _mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def table(rows: list[tuple[str, float, str, list[dict[str, Any]]]]) -> str:
    lines = [
        "| dataset | alpha | algorithm | final acc | best acc | final ECE | uplink MB/client/round | wall s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dataset, alpha, alg, runs in rows:
        final = [r["final_accuracy"] for r in runs]
        best = [r["best_accuracy"] for r in runs]
        ece = statistics.mean(r["final_ece"] for r in runs)
        up = statistics.mean(r["uplink_bytes_per_client_round"] for r in runs) / 1e6
        wall = statistics.mean(r["wall_total"] for r in runs)
        lines.append(f"| {dataset} | {alpha} | {alg} | {_mean_std(final)} | {_mean_std(best)} | {ece:.4f} | "
                     f"{up:.4f} | {wall:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (default: 0 1 2)")
    p.add_argument("--rounds", type=int, default=15, help="communication rounds (default: 15)")
    p.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS))
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="Dirichlet alphas")
    p.add_argument("--quick", action="store_true", help="smoke test: seed 0, 3 rounds, digits")
    p.add_argument("--fedavgm", default=None, metavar="MOMENTUM,SERVER_LR",
                   help="FedAvgM setting to run instead of the default 0.9,1.0 (e.g. 0.9,0.5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these models are tiny, and more threads than free "
                        "cores makes every step many times slower on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.rounds, args.datasets = [0], 3, ["digits"]
    algorithms = dict(ALGORITHMS)
    if args.fedavgm:
        beta, eta = (float(v) for v in args.fedavgm.split(","))
        del algorithms["FedAvgM (beta=0.9, eta=1.0)"]
        algorithms[f"FedAvgM (beta={beta:g}, eta={eta:g})"] = [
            "algorithm.name=fedavgm", f"algorithm.momentum={beta}", f"algorithm.server_lr={eta}"]

    rows = []
    start = time.perf_counter()
    for dataset in args.datasets:
        for alpha in args.alphas:
            for alg in algorithms:
                runs = []
                for seed in args.seeds:
                    s = run_one(dataset, alpha, alg, seed, args.rounds, algorithms)
                    runs.append(s)
                    print(f"  {dataset} alpha={alpha} {alg} seed={seed}: final {s['final_accuracy']:.4f} "
                          f"best {s['best_accuracy']:.4f} ({s['wall_total']:.1f} s)", file=sys.stderr, flush=True)
                rows.append((dataset, alpha, alg, runs))
    total = time.perf_counter() - start

    print(f"Settings: 20 clients (all every round), Dirichlet min_size 10, {args.rounds} rounds, cnn, "
          "local SGD 2 epochs, batch 16, lr 0.05, momentum 0.9; mnist1d with num_samples=4000. "
          f"Seeds {' '.join(map(str, args.seeds))}; mean ± std over seeds.\n")
    print(table(rows))
    print(f"\nTotal {total:.0f} s.")
    print("Command: " + " ".join(shlex.quote(a) for a in ["python", "benchmarks/baselines.py", *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
