"""``kdfl report``: its errors, its plots and ``summary.md``.

Most tests read run directories written here by hand (the files a run writes: config.toml,
metrics.jsonl, summary.json, clients.json, partition.txt), so they need no training; the
figures are caught as they are saved and their drawn artists counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdfl.report import NO_GLOBAL_MODEL, client_accuracy_figure, labels, read_run, report
from kdfl.types import KdflError

PART_A = "client  n  0  1\n     0  3  2  1\n     1  2  0  2\n   all  5  2  3"
PART_B = "client  n  0  1\n     0  4  4  0\n     1  1  0  1\n   all  5  4  1"


def fake_run(d: Path, rounds: int = 3, accuracy: bool = True, clients: list[float] | None = None,
             partition: str = PART_A, alpha: float = 0.5) -> Path:
    """A finished run directory as ``kdfl run --out`` leaves it (the files report reads)."""
    d.mkdir(parents=True)
    (d / "config.toml").write_text(f'[data]\nname = "digits"\nnum_clients = 2\n\n[partition]\nname = "dirichlet"\n'
                                   f"alpha = {alpha}\n")
    recs = [{"round": r, "uplink_bytes": 1000 * r, **({"accuracy": 0.1 * r} if accuracy else {})}
            for r in range(1, rounds + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "summary.json").write_text(json.dumps({"rounds": rounds, "final_accuracy": 0.1 * rounds if accuracy else None}))
    if clients is not None:
        (d / "clients.json").write_text(json.dumps({"client_eval": {
            "clients": list(range(len(clients))), "malicious": [], "accuracy": clients}}))
    (d / "partition.txt").write_text(partition + "\n")
    return d


@pytest.fixture
def figures(monkeypatch) -> dict[str, object]:
    """file name -> the figure saved there (caught at savefig)."""
    from matplotlib.figure import Figure

    saved: dict[str, object] = {}
    real = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        saved[Path(fname).name] = self
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


# ---------------------------------------------------------------------------------- errors
def test_each_unreportable_path_has_its_own_message(tmp_path):
    with pytest.raises(KdflError, match=r"nope does not exist: pass the --out directory"):
        read_run(tmp_path / "nope")
    run = fake_run(tmp_path / "run")
    with pytest.raises(KdflError, match=r"is a file, not a run directory: pass the directory it is in, .*run$"):
        read_run(run / "metrics.jsonl")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(KdflError, match=r"notes.txt is a file, not a run directory: pass the --out directory"):
        read_run(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdflError, match=r"not a kdfl run directory \(no metrics.jsonl\)"):
        read_run(tmp_path / "empty")
    failed = tmp_path / "failed"  # started (config written), no round ended: an empty metrics.jsonl or none
    failed.mkdir()
    (failed / "config.toml").write_text((run / "config.toml").read_text())
    with pytest.raises(KdflError, match=r"stopped before its first round ended .* nothing to report; run it again: "
                                        r"kdfl run .*config.toml --out .*failed --resume"):
        read_run(failed)
    (failed / "metrics.jsonl").write_text("")
    (failed / "error.txt").write_text("Traceback ...")  # a sweep's run says why it failed
    with pytest.raises(KdflError, match=r"stopped before its first round ended .*error.txt says why"):
        read_run(failed)


def test_a_run_failed_before_its_first_round_reports_after_the_command_it_names(tmp_path, capsys):
    """The message's command (`kdfl run DIR/config.toml --out DIR --resume`) really runs it."""
    from kdfl import cli, config

    d = tmp_path / "run"
    d.mkdir()
    cfg = config.load(None, ["data.num_clients=2", "model.arch=mlp:hidden=8", "run.rounds=1"])
    (d / "config.toml").write_text(config.dumps(cfg))
    (d / "metrics.jsonl").write_text("")
    assert cli.main(["report", str(d)]) == 2
    err = capsys.readouterr().err
    command = err.split("run it again: ")[1].strip().split()
    assert command[:2] == ["kdfl", "run"]
    assert cli.main([*command[1:], "--quiet"]) == 0
    assert cli.main(["report", str(d)]) == 0 and (d / "summary.md").is_file()


# ----------------------------------------------------------------------------------- plots
def test_client_accuracy_shows_every_run_even_when_they_coincide():
    """Two runs with the same per-client accuracies (one histogram bar would hide the
    other): each run has its own box and its own points, one point per client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = {"fedavg": ("test", [0.5] * 4), "fedprox": ("test", [0.5] * 4),
           "fedproto": ("held-out", [0.2, 0.4, 0.9])}
    fig = client_accuracy_figure(per)
    ax = fig.axes[0]
    for name, (_, accs) in per.items():
        points = [c for c in ax.collections if c.get_gid() == name]
        assert len(points) == 1 and len(points[0].get_offsets()) == len(accs), name
        assert sorted(y for _, y in points[0].get_offsets()) == sorted(accs)
        assert len([p for p in ax.patches if p.get_gid() == name]) == 1, name  # its box
    xs = {name: {round(float(x)) for x, _ in c.get_offsets()} for c in ax.collections for name in [c.get_gid()]}
    assert xs == {"fedavg": {0}, "fedprox": {1}, "fedproto": {2}}  # side by side, never on top of each other
    assert sum("all 4 equal" in t.get_text() for t in ax.texts) == 2
    plt.close(fig)


def test_report_plots_note_no_global_model_integer_rounds_and_the_setting(tmp_path, figures):
    a = fake_run(tmp_path / "fedavg", clients=[0.5, 0.5])
    b = fake_run(tmp_path / "fedproto", accuracy=False, clients=[0.3, 0.8])
    report([a, b], tmp_path / "rep")
    ax = figures["accuracy_vs_round.png"].axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["fedavg", f"fedproto: {NO_GLOBAL_MODEL}"]
    assert all(float(t).is_integer() for t in ax.get_xticks()), ax.get_xticks()  # 3 rounds: no 2.5
    assert ax.get_title() == "Accuracy vs round: digits, 2 clients, dirichlet(alpha=0.5)"
    assert figures["accuracy_vs_uplink.png"].axes[0].get_title().startswith("Accuracy vs uplink: digits")
    clients_ax = figures["client_accuracy.png"].axes[0]
    assert {c.get_gid() for c in clients_ax.collections} == {"fedavg", "fedproto"}
    # runs in different settings: the titles name none
    c = fake_run(tmp_path / "other", alpha=0.1)
    report([a, c], tmp_path / "rep2")
    assert figures["accuracy_vs_round.png"].axes[0].get_title() == "Accuracy vs round"


def test_summary_prints_a_shared_partition_and_identical_histograms_once(tmp_path):
    a = fake_run(tmp_path / "a", clients=[0.5, 0.5])
    b = fake_run(tmp_path / "b", clients=[0.5, 0.5])
    c = fake_run(tmp_path / "c", clients=[0.2, 0.7], partition=PART_B)
    report([a, b, c], tmp_path / "rep")
    text = (tmp_path / "rep" / "summary.md").read_text()
    assert text.count("### Partition of") == 2 and "### Partition of a, b (label counts per client)" in text
    assert "### Partition of c (" in text and text.count(PART_A) == 1 and text.count(PART_B) == 1
    assert text.count("### Per-client accuracy of") == 2 and "### Per-client accuracy of a, b (2 clients" in text
    table = text.split("\n\n")[0].splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["a", "b", "c"]  # every run keeps its row


def test_runs_with_the_same_directory_name_keep_their_own_rows_points_and_lines(tmp_path, figures):
    """A sweep's runs all end in seed0: each is named with as many parents as tell it apart."""
    a = fake_run(tmp_path / "fedavg" / "base" / "seed0", clients=[0.5, 0.5])
    b = fake_run(tmp_path / "fedprox" / "base" / "seed0", clients=[0.5, 0.5])
    assert labels([a, b]) == {a: "fedavg/base/seed0", b: "fedprox/base/seed0"}
    assert labels([a, tmp_path / "x"]) == {a: "seed0", tmp_path / "x": "x"}
    report([a, b], tmp_path / "rep")
    assert {c.get_gid() for c in figures["client_accuracy.png"].axes[0].collections} == {
        "fedavg/base/seed0", "fedprox/base/seed0"}
    assert len(figures["accuracy_vs_round.png"].axes[0].get_lines()) == 2
    text = (tmp_path / "rep" / "summary.md").read_text()
    assert "| fedavg/base/seed0 |" in text and "| fedprox/base/seed0 |" in text


def test_uplink_axis_is_logarithmic_only_over_more_than_a_decade():
    """Log ticks fall on whole decades: 0.23-0.69 MB on a log axis had no tick at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdfl.report import uplink_axis

    fig, (narrow, wide) = plt.subplots(1, 2)
    narrow.plot([0.23, 0.46, 0.69], [0.1, 0.2, 0.3])
    wide.plot([0.0, 0.05, 5.0], [0.1, 0.2, 0.3])
    uplink_axis(narrow)
    uplink_axis(wide)
    fig.canvas.draw()
    assert narrow.get_xscale() == "linear" and wide.get_xscale() == "symlog"
    lo, hi = narrow.get_xlim()
    assert sum(lo <= t <= hi for t in narrow.get_xticks()) >= 2  # (a log axis there: none)
    plt.close(fig)
