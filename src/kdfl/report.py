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
    head = ("| run | rounds | final acc | best acc | final ECE | client acc mean | client acc worst 10 % "
            "| rounds to target | uplink MB/client/round | downlink MB/client/round | wall s |")
    lines = [head, "|" + "---|" * 11]
    for run in runs:
        _, s = read_run(run)

        def f(key: str, scale: float = 1.0, fmt: str = ".4f", s: dict[str, Any] = s) -> str:
            v = s.get(key)
            return "-" if v is None else format(v / scale, fmt)

        rtt = s.get("rounds_to_target")
        lines.append(
            f"| {_label(run)} | {s.get('rounds', '-')} | {f('final_accuracy')} | {f('best_accuracy')} | "
            f"{f('final_ece')} | {f('client_accuracy_mean')} | {f('client_accuracy_worst10')} | "
            f"{rtt if rtt is not None else ('not reached' if s.get('target_accuracy') else '-')} | "
            f"{f('uplink_bytes_per_client_round', 1e6)} | {f('downlink_bytes_per_client_round', 1e6)} | "
            f"{f('wall_seconds', 1, '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def client_accuracies(run_dir: Path, records: list[dict[str, Any]]) -> tuple[str, list[float]] | None:
    """(which split, per-client accuracies of the honest clients) of the final per-client
    evaluation (``clients.json``, else the last record that has one): the held-out split
    when there is one, else the test set."""
    path = run_dir / "clients.json"
    last = json.loads(path.read_text()) if path.exists() else None
    if last is None:
        last = next((r for r in reversed(records) if "client_eval" in r), None)
    if not last or "client_eval" not in last:
        return None
    ce = last["client_eval"]
    bad = set(ce.get("malicious", []))
    key = "accuracy" if "accuracy" in ce else "test_accuracy"
    if key not in ce:
        return None
    return ("held-out" if key == "accuracy" else "test"), [a for c, a in zip(ce["clients"], ce[key], strict=True)
                                                            if c not in bad]


def distribution_text(label: str, split: str, accs: list[float]) -> str:
    """Quantiles and a text histogram (10 bins over [0, 1]) of per-client accuracy."""
    import numpy as np

    a = np.asarray(accs)
    q = np.quantile(a, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    counts, _ = np.histogram(a, bins=10, range=(0.0, 1.0))
    lines = [f"### Per-client accuracy of {label} ({len(a)} clients, {split} split)", "",
             "min / p10 / p25 / median / p75 / p90 / max: " + " / ".join(f"{v:.3f}" for v in q), "", "```"]
    top = max(int(counts.max()), 1)
    for i, c in enumerate(counts):
        lines.append(f"{i / 10:.1f}-{(i + 1) / 10:.1f} | {'#' * round(30 * c / top)} {c}")
    return "\n".join([*lines, "```", ""])


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
    per_client = {run: client_accuracies(run, data[run]) for run in runs}
    if any(v is not None for v in per_client.values()):
        fig3, ax3 = plt.subplots(figsize=(6, 4))
        for run, v in per_client.items():
            if v is not None:
                ax3.hist(v[1], bins=20, range=(0.0, 1.0), alpha=0.5, label=f"{_label(run)} ({v[0]})")
        ax3.set(xlabel="client accuracy", ylabel="clients", title="Per-client accuracy")
        ax3.legend(fontsize=8)
        fig3.tight_layout()
        fig3.savefig(out / "client_accuracy.png", dpi=120)
        plt.close(fig3)
        paths.append(out / "client_accuracy.png")
    text = summary_table(runs)
    for run, v in per_client.items():
        if v is not None:
            text += "\n" + distribution_text(_label(run), *v)
    for run in runs:  # the per-client label counts, so skew is visible next to the results
        part = run / "partition.txt"
        if part.exists():
            text += f"\n### Partition of {_label(run)} (label counts per client)\n\n```\n{part.read_text().rstrip()}\n```\n"
    (out / "summary.md").write_text(text)
    paths.append(out / "summary.md")
    return paths
