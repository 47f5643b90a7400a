"""Robustness table: 20 % Byzantine clients x attacks x aggregators.

FedEMA-Distill with mean / median / trimmed mean over uploaded logits, and FedAvg with
mean / median over weight deltas, each under sign-flip, Gaussian, scaled, label-flip and
ALIE attacks (a fixed malicious set drawn from the seed), against the clean run of the
same method. Accuracy and ECE of the final global model; mean over seeds.

    python benchmarks/robustness.py            # full table
    python benchmarks/robustness.py --quick    # 1 seed, 3 rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import command_line, run_jobs  # noqa: E402
from headline import COMMON, DATA  # noqa: E402

ATTACKS = {
    "clean": [],
    "sign_flip": ["attack.name=sign_flip"],
    "gaussian": ["attack.name=gaussian", "attack.sigma=10.0"],
    "scaled": ["attack.name=scaled", "attack.lam=10.0"],
    "label_flip": ["attack.name=label_flip"],
    "alie": ["attack.name=alie"],
}
EMA = ["algorithm.name=fedema_distill", "algorithm.class_weighting=true"]  # as in headline.py: pinned
METHODS = {
    "FedEMA-Distill mean": [*EMA, "algorithm.aggregator=mean"],
    "FedEMA-Distill median": [*EMA, "algorithm.aggregator=median"],
    "FedEMA-Distill trimmed": [*EMA, "algorithm.aggregator=trimmed_mean:beta=0.2"],
    "FedAvg mean": ["algorithm.name=fedavg", "algorithm.aggregator=mean"],
    "FedAvg median": ["algorithm.name=fedavg", "algorithm.aggregator=median"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=sorted(DATA))
    p.add_argument("--fraction", type=float, default=0.2, help="fraction of malicious clients")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--log", type=Path, default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.seeds, a.rounds = 1, 3
    methods, attacks = a.methods.split(","), a.attacks.split(",")
    jobs = []
    for m in methods:
        for atk in attacks:
            extra = [*ATTACKS[atk], f"attack.fraction={a.fraction}"] if atk != "clean" else []
            for seed in range(a.seeds):
                jobs.append((atk, m, seed, [*COMMON, *DATA[a.dataset], *METHODS[m], *extra,
                                            f"run.rounds={a.rounds}", f"local.epochs={a.epochs}", *a.set]))
    print(f"# {len(jobs)} runs: {command_line()}", flush=True)
    results = run_jobs(jobs, a.workers, a.log)

    def cell(m: str, atk: str, key: str) -> float:  # NaN when every run of the cell failed (see the note above)
        vals = [r["summary"][key] for r in results if r["method"] == m and r["data"] == atk]
        return statistics.mean(vals) if vals else float("nan")

    print(f"\nCommand: `{command_line()}`\n")
    print(f"{a.dataset}, Dirichlet 0.1, 20 clients, {int(round(a.fraction * 20))} malicious, {a.rounds} rounds, "
          f"{a.epochs} local epochs, {a.seeds} seed(s). Cells: final accuracy (difference to clean) / final ECE.\n")
    print("| method | " + " | ".join(attacks) + " |")
    print("|---|" + "---|" * len(attacks))
    for m in methods:
        clean = cell(m, "clean", "final_accuracy") if "clean" in attacks else float("nan")
        cells = []
        for atk in attacks:
            acc, ece = cell(m, atk, "final_accuracy"), cell(m, atk, "final_ece")
            diff = "" if atk == "clean" else f" ({100 * (acc - clean):+.1f})"
            cells.append(f"{acc:.3f}{diff} / {ece:.3f}")
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
