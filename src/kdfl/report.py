"""Plots and tables for run directories (``kdfl report``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdfl.errors import KdflError


def read_run(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per-round records, summary) of a run directory.

    Raises:
        KdflError: ``run_dir`` does not exist, is a file, is not a run directory, or holds a
            run that stopped before its first round ended (nothing to report yet).
    """
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.exists():
        raise KdflError(f"{run_dir} does not exist: pass the --out directory of a `kdfl run` (or a sweep's "
                        "runs/... directory)")
    if not run_dir.is_dir():
        inside = (f": pass the directory it is in, {run_dir.parent}" if (run_dir.parent / metrics.name).is_file()
                  else ": pass the --out directory of a `kdfl run`")
        raise KdflError(f"{run_dir} is a file, not a run directory{inside}")
    started = (run_dir / "config.toml").is_file()
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    if not records and started:
        why = (f"; {run_dir / 'error.txt'} says why (a sweep retries it when run again)" if (run_dir / "error.txt").is_file()
               else f"; run it again: kdfl run {run_dir / 'config.toml'} --out {run_dir} --resume")
        raise KdflError(f"{run_dir} holds a run that stopped before its first round ended (no rounds in "
                        f"{metrics.name}): nothing to report{why}")
    if not metrics.exists():
        raise KdflError(f"{run_dir} is not a kdfl run directory (no metrics.jsonl); pass the --out of `kdfl run`")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return records, summary


def labels(runs: list[Path]) -> dict[Path, str]:
    """A short, distinct name per run: its directory's name, with as many parent names as
    it takes to tell runs apart (a sweep's ``fedavg/base/base/seed0`` and ``fedprox/...``)."""
    parts = {run: run.resolve().parts for run in runs}
    for depth in range(1, max(len(p) for p in parts.values()) + 1):
        names = {run: "/".join(p[-depth:]) for run, p in parts.items()}
        if len(set(names.values())) == len(set(parts.values())):
            return names
    return {run: str(run) for run in runs}


def summary_table(runs: list[Path]) -> str:
    """A Markdown table: one row per run (named by :func:`labels`)."""
    names = labels(runs)
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
            f"| {names[run]} | {s.get('rounds', '-')} | {f('final_accuracy')} | {f('best_accuracy')} | "
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


def setting(run_dir: Path) -> str | None:
    """The data set, client count and partition of a run, from its ``config.toml``
    ("digits, 10 clients, dirichlet(alpha=0.5)"); None when it has none."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        cfg = tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, ValueError):
        return None
    data, part = cfg.get("data", {}), dict(cfg.get("partition", {}))
    name = part.pop("name", "?")
    opts = ", ".join(f"{k}={v}" for k, v in part.items() if not isinstance(v, (dict, list)))
    return f"{data.get('name', '?')}, {data.get('num_clients', '?')} clients, {name}{f'({opts})' if opts else ''}"


def _title(what: str, runs: list[Path]) -> str:
    """``what``, then the setting the runs share (when they share one)."""
    shared = {setting(r) for r in runs}
    return f"{what}: {shared.pop()}" if len(shared) == 1 and None not in shared else what


NO_GLOBAL_MODEL = "no global model (per-client accuracy: client_accuracy.png)"


def integer_rounds(ax: Any) -> None:
    """Round ticks on whole numbers only (a 3-round plot has no round 2.5)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def uplink_axis(ax: Any) -> None:
    """A log scale (symlog: 0 stays on the axis) for cumulative uplink MB when the plotted
    values span more than a decade; linear otherwise, where log ticks (whole decades) could
    leave the axis with no tick at all."""
    xs = [float(x) for line in ax.get_lines() for x in line.get_xdata() if float(x) > 0]
    if xs and max(xs) / min(xs) > 10:
        ax.set_xscale("symlog", linthresh=min(0.01, min(xs)))


def client_accuracy_figure(per_client: dict[str, tuple[str, list[float]]], title: str = "Per-client accuracy") -> Any:
    """A box per run and its clients as points over it (jittered sideways), side by side,
    so that no run hides another however close their accuracies are.

    Args:
        per_client: run label -> (split, per-client accuracies), as :func:`client_accuracies`.

    Returns:
        The matplotlib figure; each run's points are one collection whose ``gid`` is its label.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(per_client)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) + 2), 4))
    rng = np.random.default_rng(0)  # the same jitter on every call: reports are reproducible
    for i, name in enumerate(labels):
        split, accs = per_client[name]
        a = np.asarray(accs, dtype=float)
        color = f"C{i % 10}"
        box = ax.boxplot([a], positions=[i], widths=0.5, showfliers=False, patch_artist=True,
                         medianprops={"color": color})
        for patch in box["boxes"]:
            patch.set(facecolor=color, alpha=0.25, edgecolor=color, gid=name)
        pts = ax.scatter(i + rng.uniform(-0.18, 0.18, len(a)), a, s=14, color=color, alpha=0.8, zorder=3,
                         label=f"{name} ({split}, {len(a)} clients)")
        pts.set_gid(name)
        if len(a) > 1 and float(a.max() - a.min()) == 0.0:  # e.g. every client holds the same global model
            ax.annotate(f"all {len(a)} equal", (i, float(a[0])), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=7)
    ax.set_xticks(range(len(labels)), [f"{n}\n({per_client[n][0]})" for n in labels], fontsize=8,
                  rotation=20 if len(labels) > 4 else 0)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set(ylabel="client accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def _shared(texts: dict[str, str]) -> list[tuple[list[str], str]]:
    """Group run labels by identical text, in first-seen order: [(labels, text), ...]."""
    groups: dict[str, list[str]] = {}
    for name, text in texts.items():
        groups.setdefault(text, []).append(name)
    return [(names, text) for text, names in groups.items()]


def report(runs: list[Path], out: Path | None = None) -> list[Path]:
    """Write accuracy-vs-round and accuracy-vs-uplink plots, per-client accuracy (when the
    runs evaluated their clients) and ``summary.md``."""
    data = {run: read_run(run)[0] for run in runs}  # every run is checked before anything is written
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = out or runs[0]
    out.mkdir(parents=True, exist_ok=True)
    names = labels(runs)
    fig1, ax1 = plt.subplots(figsize=(6, 4))
    fig2, ax2 = plt.subplots(figsize=(6, 4))
    for i, run in enumerate(runs):
        records = data[run]
        cum, xs, rs, accs = 0.0, [], [], []
        for r in records:
            cum += r["uplink_bytes"] / 1e6
            if "accuracy" in r:
                xs.append(cum)
                rs.append(r["round"])
                accs.append(r["accuracy"])
        color = f"C{i % 10}"
        if not accs:  # FedProto, local training, ...: a legend note instead of a line that is not there
            for ax in (ax1, ax2):
                ax.plot([], [], ls="none", marker="x", color=color, label=f"{names[run]}: {NO_GLOBAL_MODEL}")
            continue
        ax1.plot(rs, accs, marker=".", color=color, label=names[run])
        ax2.plot(xs, accs, marker=".", color=color, label=names[run])
    ax1.set(xlabel="round", ylabel="test accuracy (global model)", title=_title("Accuracy vs round", runs))
    ax2.set(xlabel="cumulative uplink (MB, all clients)", ylabel="test accuracy (global model)",
            title=_title("Accuracy vs uplink", runs))
    integer_rounds(ax1)
    uplink_axis(ax2)
    paths = []
    for fig, ax, name in ((fig1, ax1, "accuracy_vs_round.png"), (fig2, ax2, "accuracy_vs_uplink.png")):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.title.set_fontsize(10)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    per_client = {run: client_accuracies(run, data[run]) for run in runs}
    shown = {names[run]: v for run, v in per_client.items() if v is not None}
    if shown:
        fig3 = client_accuracy_figure(shown, _title("Per-client accuracy", runs))
        fig3.savefig(out / "client_accuracy.png", dpi=120)
        plt.close(fig3)
        paths.append(out / "client_accuracy.png")
    text = summary_table(runs)
    scores = {name: json.dumps(v) for name, v in shown.items()}
    for same, _ in _shared(scores):  # runs whose clients scored the same: one histogram
        text += "\n" + distribution_text(", ".join(same), *shown[same[0]])
    parts = {names[run]: (run / "partition.txt").read_text().rstrip() for run in runs
             if (run / "partition.txt").exists()}
    for same, part in _shared(parts):  # the per-client label counts, once per distinct partition
        text += f"\n### Partition of {', '.join(same)} (label counts per client)\n\n```\n{part}\n```\n"
    (out / "summary.md").write_text(text)
    paths.append(out / "summary.md")
    return paths
