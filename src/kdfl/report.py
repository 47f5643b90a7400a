"""Plots and tables for run directories (``kdfl report``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdfl.types import KdflError


def read_run(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per-round records, summary) of a run directory."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise KdflError(f"{run_dir} is not a kdfl run directory (no metrics.jsonl); pass the --out of `kdfl run`")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return records, summary


def _label(run_dir: Path) -> str:
    return run_dir.resolve().name


def summary_table(runs: list[Path]) -> str:
    """A Markdown table: one row per run."""
    head = ("| run | rounds | final acc | best acc | final ECE | rounds to target | uplink MB/client/round "
            "| downlink MB/client/round | wall s |")
    lines = [head, "|" + "---|" * 9]
    for run in runs:
        _, s = read_run(run)

        def f(key: str, scale: float = 1.0, fmt: str = ".4f", s: dict[str, Any] = s) -> str:
            v = s.get(key)
            return "-" if v is None else format(v / scale, fmt)

        rtt = s.get("rounds_to_target")
        lines.append(
            f"| {_label(run)} | {s.get('rounds', '-')} | {f('final_accuracy')} | {f('best_accuracy')} | "
            f"{f('final_ece')} | {rtt if rtt is not None else ('not reached' if s.get('target_accuracy') else '-')} | "
            f"{f('uplink_bytes_per_client_round', 1e6)} | {f('downlink_bytes_per_client_round', 1e6)} | "
            f"{f('wall_seconds', 1, '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def report(runs: list[Path], out: Path | None = None) -> list[Path]:
    """Write accuracy-vs-round and accuracy-vs-uplink plots and ``summary.md``."""
    data = {run: read_run(run)[0] for run in runs}  # every run is checked before anything is written
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = out or runs[0]
    out.mkdir(parents=True, exist_ok=True)
    fig1, ax1 = plt.subplots(figsize=(6, 4))
    fig2, ax2 = plt.subplots(figsize=(6, 4))
    for run in runs:
        records = data[run]
        cum, xs, rs, accs = 0.0, [], [], []
        for r in records:
            cum += r["uplink_bytes"] / 1e6
            if "accuracy" in r:
                xs.append(cum)
                rs.append(r["round"])
                accs.append(r["accuracy"])
        ax1.plot(rs, accs, marker=".", label=_label(run))
        ax2.plot(xs, accs, marker=".", label=_label(run))
    ax1.set(xlabel="round", ylabel="test accuracy", title="Accuracy vs round")
    ax2.set(xlabel="cumulative uplink (MB, all clients)", ylabel="test accuracy", title="Accuracy vs uplink")
    ax2.set_xscale("symlog", linthresh=0.01)
    paths = []
    for fig, ax, name in ((fig1, ax1, "accuracy_vs_round.png"), (fig2, ax2, "accuracy_vs_uplink.png")):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    text = summary_table(runs)
    for run in runs:  # the per-client label counts, so skew is visible next to the results
        part = run / "partition.txt"
        if part.exists():
            text += f"\n### Partition of {_label(run)} (label counts per client)\n\n```\n{part.read_text().rstrip()}\n```\n"
    (out / "summary.md").write_text(text)
    paths.append(out / "summary.md")
    return paths
