"""The README's headline figure: final test accuracy against uplink bytes for the methods of
the benchmark protocol's claim 2 (benchmarks/PROTOCOL.md), on mnist1d and Fashion-MNIST.

Every number is read from the protocol's result files (the first table of
``benchmarks/results/protocol_fedema_clean_{mnist1d,fmnist}.md``, which
``benchmarks/protocol/claims.py`` writes from the sweeps' run directories); nothing is typed
in here. The script prints what it plotted and writes ``docs/img/headline.png``.

    python benchmarks/headline_figure.py              # reads benchmarks/results, writes docs/img/headline.png
    python benchmarks/headline_figure.py --out /tmp/headline.png
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
DEFAULT_OUT = HERE.parent / "docs" / "img" / "headline.png"

# (result file, panel title); the setting is stated in each file and in docs/results.md
PANELS = [
    ("protocol_fedema_clean_mnist1d.md", "mnist1d: Dirichlet 0.1, 8 of 20 clients, 5 epochs, 20 rounds"),
    ("protocol_fedema_clean_fmnist.md", "Fashion-MNIST (CPU size): Dirichlet 0.1, 8 of 20, 5 epochs, 10 rounds"),
]
# the sweeps' method keys -> legend labels (a key not listed keeps its own name)
LABELS = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedavgm": "FedAvgM",
    "feddf": "FedDF",
    "fedema": "FedEMA-Distill, class-weighted median (old default)",
    "fedema_tmean": "FedEMA-Distill, trimmed mean (default)",
}
ACC_COL, UPLINK_COL = "final acc", "uplink KB/client/round"


@dataclass(frozen=True)
class Point:
    """One method of one sweep: mean ± std over seeds of the final test accuracy, and its
    uplink per participating client per round in MB (10**6 bytes)."""

    method: str
    lr: str
    seeds: int
    acc_mean: float
    acc_std: float
    uplink_mb: float


def _mean_std(cell: str) -> tuple[float, float]:
    m = re.fullmatch(r"\s*([-+0-9.eE]+)\s*(?:±\s*([-+0-9.eE]+))?\s*", cell)
    if m is None:
        raise ValueError(f"not a 'mean ± std' cell: {cell!r}")
    return float(m.group(1)), float(m.group(2) or 0.0)


def read_table(text: str) -> list[Point]:
    """The first Markdown table of a protocol result file whose header has a method, the
    final accuracy and the uplink per client per round.

    Raises:
        ValueError: when no such table is in ``text``.
    """
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        header = [c.strip() for c in line.strip().strip("|").split("|")]
        if "method" not in header or ACC_COL not in header or UPLINK_COL not in header:
            continue
        lr_col = next((c for c in header if c.endswith(".lr")), None)
        points = []
        for row in lines[i + 2:]:  # skip the |---| line
            if not row.startswith("|"):
                break
            cells = dict(zip(header, (c.strip() for c in row.strip().strip("|").split("|")), strict=False))
            acc, std = _mean_std(cells[ACC_COL])
            kb, _ = _mean_std(cells[UPLINK_COL])
            points.append(Point(method=cells["method"], lr=cells.get(lr_col, "") if lr_col else "",
                                seeds=int(cells.get("seeds", "0") or 0), acc_mean=acc, acc_std=std,
                                uplink_mb=kb * 1e3 / 1e6))
        return points
    raise ValueError(f"no table with the columns 'method', {ACC_COL!r} and {UPLINK_COL!r}")


def plot(panels: list[tuple[str, list[Point]]], out: Path) -> None:
    """One panel per sweep: accuracy (error bars: std over seeds) against uplink MB, log x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    markers = "osD^vPX*"
    methods = list(dict.fromkeys(p.method for _, pts in panels for p in pts))
    for ax, (title, points) in zip(axes[0], panels, strict=True):
        # methods that send (about) the same bytes, such as every weight-averaging method, would
        # hide each other: spread them a little sideways, symmetrically around their true uplink
        groups: dict[int, list[Point]] = {}
        for p in points:
            groups.setdefault(round(math.log(p.uplink_mb) / math.log(1.1)), []).append(p)
        for group in groups.values():
            for j, p in enumerate(group):
                k = methods.index(p.method)
                x = p.uplink_mb * 1.06 ** (j - (len(group) - 1) / 2)
                ax.errorbar(x, p.acc_mean, yerr=p.acc_std, fmt=markers[k % len(markers)], color=f"C{k}",
                            capsize=3, label=LABELS.get(p.method, p.method))
        ax.set_xscale("log")
        lo, hi = min(p.uplink_mb for p in points), max(p.uplink_mb for p in points)
        ax.set_xlim(lo / 2.5, hi * 2.5)
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("uplink per client per round (MB, measured on the encoded payload)")
        ax.set_ylabel("final test accuracy (mean ± std, 3 seeds)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    for ax in axes[0][1:]:
        h, lab = ax.get_legend_handles_labels()
        seen.update(zip(lab, h, strict=True))
    fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Benchmark protocol, claim 2: each method at its validation-selected learning rate",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="directory of the protocol result files")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    panels = []
    for name, title in PANELS:
        points = read_table((args.results / name).read_text())
        panels.append((title, points))
        print(f"{name}:")
        for p in points:
            print(f"  {p.method:14s} lr {p.lr:5s} seeds {p.seeds}  final acc {p.acc_mean:.4f} ± {p.acc_std:.4f}  "
                  f"uplink {p.uplink_mb:.4f} MB/client/round")
    plot(panels, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
