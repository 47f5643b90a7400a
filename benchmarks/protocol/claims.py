"""The protocol's claims, met or missed, from the finished runs of its sweeps
(benchmarks/PROTOCOL.md). Reads the run directories through ``kdfl.sweep`` (each method at
the learning rate its validation slice selected) and writes
``benchmarks/results/protocol_<sweep>.md``: the sweep's table, its tuning table and the
verdicts with their numbers.

    python benchmarks/protocol/claims.py feddf_epochs_mnist1d
    python benchmarks/protocol/claims.py fedema_clean_mnist1d [fedema_byzantine_mnist1d]

Verdict rule (PROTOCOL.md): *met* when the mean clears the bar and the lead holds on every
paired seed; *missed* when the mean does not clear it; *not separable from seed noise* when
the mean clears it but not on every seed.
"""

from __future__ import annotations

import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdfl import sweep

HERE = Path(__file__).parent
RESULTS = HERE.parent / "results"


def chosen_runs(sw: sweep.Sweep, results: list[sweep.RunResult], method: str,
                cell: sweep.Assignment) -> dict[int, sweep.RunResult]:
    """seed -> run of ``method`` in ``cell`` at its selected tuning values."""
    chosen, _ = sweep.select(sw, results)
    tuning = chosen.get((method, cell))
    return {r.run.seed: r for r in results
            if r.run.method == method and r.run.cell == cell and r.run.tuning == tuning}


def final(r: sweep.RunResult) -> float:
    return float(r.summary["final_accuracy"])


def verdict(diffs: list[float], bar: float = 0.0) -> str:
    """Verdict for "a - b >= bar" from the paired per-seed differences ``diffs``."""
    if not diffs:
        return "not measured"
    if statistics.mean(diffs) < bar:
        return "missed"
    return "met" if all(d >= bar for d in diffs) else "not separable from seed noise"


def pm(xs: list[float]) -> str:
    return f"{statistics.mean(xs):+.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def claim_feddf(sw: sweep.Sweep, results: list[sweep.RunResult]) -> str:
    """FedDF's Figure 2: FedDF >= FedAvg in every cell, the gap growing with local epochs."""
    lines = ["## Claim 1: FedDF at or above FedAvg at C = 0.4, the gap growing with local epochs", "",
             "Final test accuracy, FedDF minus FedAvg, each at its selected learning rate, paired by seed.", "",
             "| alpha | local epochs | FedAvg | FedDF | FedDF - FedAvg (mean ± std over seeds) | per seed | verdict |",
             "|---|---|---|---|---|---|---|"]
    gaps: dict[Any, list[tuple[int, float]]] = {}
    for cell in sw.cells():
        c = dict(cell)
        a, b = chosen_runs(sw, results, "fedavg", cell), chosen_runs(sw, results, "feddf", cell)
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        d = [final(b[s]) - final(a[s]) for s in seeds]
        gaps.setdefault(c["partition.alpha"], []).append((c["local.epochs"], statistics.mean(d)))
        fa, fb = [final(a[s]) for s in seeds], [final(b[s]) for s in seeds]
        lines.append(f"| {c['partition.alpha']} | {c['local.epochs']} | {statistics.mean(fa):.4f} | "
                     f"{statistics.mean(fb):.4f} | {pm(d)} | {', '.join(f'{x:+.3f}' for x in d)} | {verdict(d)} |")
    lines += ["", "Does the gap grow with local epochs?", ""]
    for alpha, g in gaps.items():
        g = sorted(g)
        grows = all(x[1] < y[1] for x, y in zip(g, g[1:], strict=False))
        lines.append(f"- alpha {alpha}: " + " → ".join(f"{e} epochs {m:+.4f}" for e, m in g)
                     + f": {'met (grows)' if grows else 'missed (does not grow)'}")
    return "\n".join(lines) + "\n"


CLAIMS = {"feddf_epochs_mnist1d": claim_feddf, "feddf_epochs_fmnist": claim_feddf}


def main(names: list[str]) -> None:
    if not names:
        sys.exit(__doc__)
    for name in names:
        path = HERE / f"{name}.toml"
        sw = sweep.load(path, out=Path("runs/protocol") / name)
        results = sweep.collect(sw)
        table, _, tuning = sweep.tables(sw, results)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = [f"# Protocol sweep {name}", "",
                f"Command: `kdfl sweep benchmarks/protocol/{name}.toml` then "
                f"`python benchmarks/protocol/claims.py {name}` ({stamp}; {len(results)} of {len(sw.runs())} runs "
                "finished; 2-core CPU machine, one torch thread per worker).", "", table, "", "## Tuning", "", tuning]
        chosen, _ = sweep.select(sw, results)
        edges = sorted({f"{m} ({sweep._label(c)}): {k} = {v}" for (m, c), t in chosen.items() for k, v in t
                        if len(sw.tune_grid[k]) > 1 and v in (min(sw.tune_grid[k]), max(sw.tune_grid[k]))})
        if edges:
            text += ["", f"Selected at an edge of the tuning grid ({len(edges)} of {len(chosen)}; a wider grid may "
                     "move them): " + "; ".join(edges) + "."]
        if name in CLAIMS:
            text += ["", CLAIMS[name](sw, results)]
        out = RESULTS / f"protocol_{name}.md"
        out.write_text("\n".join(text))
        print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
