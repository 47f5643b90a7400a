"""Headline table: FedAvg vs FedDF vs FedEMA-Distill (mean / median / trimmed mean).

Same data, partition (Dirichlet 0.1), 20 clients (all sampled), rounds and local epochs
for every method; 3 seeds. Rounds to target: the first evaluated round whose test
accuracy reaches 95 % of FedAvg's mean final accuracy on that data set (evaluated every
round). Uplink/downlink are the measured encoded bytes per participating client per
round (MB = 10^6 bytes).

    python benchmarks/headline.py                 # full table (tens of minutes on 2 cores)
    python benchmarks/headline.py --quick         # 1 seed, few rounds: a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import command_line, first_round_reaching, mean_std, run_jobs  # noqa: E402

DATA = {
    "mnist1d": ["data.name=mnist1d", "data.num_samples=10000", "data.proxy=holdout", "data.proxy_size=2000",
                "model.arch=cnn"],
    "digits": ["data.name=digits", "data.proxy=holdout", "data.proxy_size=360", "model.arch=cnn"],
}
COMMON = ["data.num_clients=20", "partition.name=dirichlet", "partition.alpha=0.1", "local.batch_size=32",
          "local.lr=0.05", "local.momentum=0.9", "run.eval_every=1"]
# class weighting on: the registry default when these tables were made (the protocol's claim 3
# has since chosen it off); pinned so that the scripts keep measuring what their tables say
EMA = ["algorithm.name=fedema_distill", "algorithm.class_weighting=true"]
METHODS = {
    "FedAvg": ["algorithm.name=fedavg"],
    # pinned to the settings its table was made with (FedDF's defaults until they became the
    # released code's)
    "FedDF": ["algorithm.name=feddf", "algorithm.distill.steps=500", "algorithm.distill.patience=0",
              "algorithm.ensemble=probs", "algorithm.average=examples"],
    "FedEMA-Distill mean": [*EMA, "algorithm.aggregator=mean"],
    "FedEMA-Distill median": [*EMA, "algorithm.aggregator=median"],
    "FedEMA-Distill trimmed": [*EMA, "algorithm.aggregator=trimmed_mean:beta=0.2"],
    "FedEMA-Distill median int8": [*EMA, "algorithm.aggregator=median", "compression.uplink=int8"],
}
DEFAULT_METHODS = [m for m in METHODS if not m.endswith("int8")]  # int8: run with --methods (cost)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="mnist1d,digits")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--epochs", type=int, default=3, help="local epochs (all methods)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (1 thread each)")
    p.add_argument("--set", action="append", default=[], help="extra override for every run")
    p.add_argument("--log", type=Path, default=None, help="append per-run results (JSON lines) here")
    p.add_argument("--quick", action="store_true", help="1 seed, 3 rounds, mnist1d only")
    a = p.parse_args()
    if a.quick:
        a.seeds, a.rounds, a.datasets = 1, 3, "mnist1d"
    datasets, methods = a.datasets.split(","), a.methods.split(",")
    jobs = [
        (d, m, seed, [*COMMON, *DATA[d], *METHODS[m], f"run.rounds={a.rounds}", f"local.epochs={a.epochs}", *a.set])
        for d in datasets for m in methods for seed in range(a.seeds)
    ]
    print(f"# {len(jobs)} runs: {command_line()}", flush=True)
    results = run_jobs(jobs, a.workers, a.log)

    print(f"\nCommand: `{command_line()}`\n")
    print(f"Dirichlet 0.1, 20 clients (all per round), {a.rounds} rounds, {a.epochs} local epochs, "
          f"{a.seeds} seed(s). Target = 95 % of FedAvg's mean final accuracy.\n")
    print("| data | method | final acc | best acc | rounds to target | uplink MB/client/round "
          "| downlink MB/client/round | final ECE |")
    print("|---|---|---|---|---|---|---|---|")
    for d in datasets:
        rows = {m: [r for r in results if r["data"] == d and r["method"] == m] for m in methods}
        base = rows.get("FedAvg") or next((rs for rs in rows.values() if rs), [])
        if not base:  # every run failed (the note above lists them)
            print(f"| {d} | no finished run | | | | | | |")
            continue
        target = 0.95 * statistics.mean(r["summary"]["final_accuracy"] for r in base)
        for m, rs in rows.items():
            if not rs:
                print(f"| {d} | {m} | no finished run | | | | | |")
                continue
            reached = [first_round_reaching(r["curve"], target) for r in rs]
            rtt = ", ".join(str(x) if x is not None else f">{a.rounds}" for x in reached)
            s = [r["summary"] for r in rs]
            print(f"| {d} | {m} | {mean_std([x['final_accuracy'] for x in s])} | "
                  f"{mean_std([x['best_accuracy'] for x in s])} | {rtt} (target {target:.3f}) | "
                  f"{statistics.mean(x['uplink_bytes_per_client_round'] for x in s) / 1e6:.4f} | "
                  f"{statistics.mean(x['downlink_bytes_per_client_round'] for x in s) / 1e6:.4f} | "
                  f"{statistics.mean(x['final_ece'] for x in s):.4f} |")


if __name__ == "__main__":
    main()
