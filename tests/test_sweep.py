"""``kdfl sweep``: parsing and its errors, selection on the validation slice, resumable
runs, failures that cost one run, and the aggregate tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdfl import cli, sweep
from kdfl.types import KdflError

TINY = """
seeds = [0, 1]
target_accuracy = 0.3

[set]
"data.name" = "digits"
"data.num_clients" = 4
"model.arch" = "mlp"
"run.rounds" = 2
"run.checkpoint_every" = 1
"local.epochs" = 1
"local.lr" = 0.1
"partition.name" = "iid"
"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_runs_grid_methods_and_seeds(tmp_path: Path) -> None:
    p = write(tmp_path, TINY + """
[methods.fedavg]
"algorithm.name" = "fedavg"
[methods.prox]
"algorithm.name" = "fedprox"
"algorithm.mu" = 0.1
[grid]
"local.epochs" = [1, 2]
""")
    sw = sweep.load(p, out=tmp_path / "out")
    runs = sw.runs()
    assert len(runs) == 2 * 2 * 2
    r = next(r for r in runs if r.method == "prox" and dict(r.cell)["local.epochs"] == 2 and r.seed == 1)
    # method keys over [set], grid over both, the seed last
    assert "algorithm.mu=0.1" in r.overrides and "local.epochs=2" in r.overrides
    assert r.overrides[-1] == "run.seed=1"
    assert r.out == tmp_path / "out" / "runs" / "prox" / "local.epochs=2" / "base" / "seed1"
    assert len({x.out for x in runs}) == len(runs)
    # cell by cell: a sweep stopped half-way has whole cells (every method) to compare
    assert [(dict(x.cell)["local.epochs"], x.method) for x in runs[:4]] == [(1, "fedavg")] * 2 + [(1, "prox")] * 2


def test_nested_tables_mean_dotted_keys(tmp_path: Path) -> None:
    p = write(tmp_path, TINY + """
[grid.local]
epochs = [1, 2]
""")
    assert sweep.load(p).grid == {"local.epochs": [1, 2]}


@pytest.mark.parametrize("extra, needle", [
    ("colour = 1\n", "unknown sweep key(s) colour"),
    ("[grid]\n\"local.lr\" = 0.1\n", "must be a non-empty list"),
    ("[grid]\nlr = [0.1]\n", "is not a config key"),
    ("[methods.a]\n\"algorithm.name\" = \"fedavgg\"\n", "run a: unknown algorithm 'fedavgg'"),
    ("[methods.a]\n\"local.lrr\" = 0.1\n", "unknown config key 'local.lrr'"),
    ("[tune]\nmetric = \"accuracy\"\n[tune.grid]\n\"local.lr\" = [0.1]\n", "measured on the test set"),
    ("[tune.grid]\n\"local.lr\" = [0.1, 0.2]\n", "needs a server validation slice"),
    ("[tune]\nkeys = 1\n", "unknown key(s) keys in sweep [tune]"),
    ("[grid]\n\"local.lr\" = [0.1]\n[tune.grid]\n\"local.lr\" = [0.2]\n", "both a grid axis and a tuning axis"),
])
def test_errors_name_the_problem(tmp_path: Path, extra: str, needle: str) -> None:
    p = write(tmp_path, TINY + extra if extra.startswith("[") else extra + TINY)  # top-level keys first
    with pytest.raises(KdflError) as e:
        sweep.load(p)
    assert needle in str(e.value)


def test_bad_seeds_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(KdflError, match="does not exist"):
        sweep.load(tmp_path / "nope.toml")
    with pytest.raises(KdflError, match="seeds"):
        sweep.load(write(tmp_path, TINY.replace("seeds = [0, 1]", "seeds = [0, 0]")))
    with pytest.raises(KdflError, match="base config"):
        sweep.load(write(tmp_path, 'base = "missing.toml"\n' + TINY))


def _result(method: str, lr: float, seed: int, val: float, test: float) -> sweep.RunResult:
    run = sweep.Run(method, (), (("local.lr", lr),), seed, (), Path("."))
    rec = {"round": 1, "uplink_bytes": 10, "accuracy": test, "val_accuracy": val}
    return sweep.RunResult(run, [rec], {"final_accuracy": test}, None)


def test_selection_uses_the_validation_mean_never_the_test_set(tmp_path: Path) -> None:
    p = write(tmp_path, TINY + '"data.val_size" = 100\n[tune.grid]\n"local.lr" = [0.01, 0.1]\n')
    sw = sweep.load(p)
    results = [
        # lr 0.01: val 0.6 and 0.8 (mean 0.7), test high; lr 0.1: val 0.75 twice, test low
        _result("base", 0.01, 0, 0.6, 0.99), _result("base", 0.01, 1, 0.8, 0.99),
        _result("base", 0.1, 0, 0.75, 0.1), _result("base", 0.1, 1, 0.75, 0.1),
    ]
    chosen, md = sweep.select(sw, results)
    assert chosen[("base", ())] == (("local.lr", 0.1),)
    assert "0.7000 ± 0.1414" in md and "0.7500 ± 0.0000" in md
    # a value that did not finish on every seed is never kept (no lucky subset of seeds)
    chosen, _ = sweep.select(sw, results[1:])
    assert chosen[("base", ())] == (("local.lr", 0.1),)
    chosen, _ = sweep.select(sw, [results[1], results[2]])
    assert ("base", ()) not in chosen
    table, _, _ = sweep.tables(sw, [results[1], results[2]])
    assert "no tuning value finished on every seed" in table



CANDIDATES = TINY + """
"data.val_size" = 100
[methods.fedavg]
"algorithm.name" = "fedavg"
[methods.ref]                      # the grid's values and its own reference optimizer
"algorithm.name" = "fedavg"
"tune.candidates" = [{"local.lr" = 0.01, "local.momentum" = 0.0, "local.lr_decay" = 0.99}]
[methods.tied]                     # only its own candidates: a weight tied to the lr
"algorithm.name" = "fedprox"
"tune.grid" = false
[[methods.tied.tune.candidates]]
"local.lr" = 0.01
"algorithm.mu" = 1.0
[[methods.tied.tune.candidates]]
"local.lr" = 0.1
"algorithm.mu" = 0.1
[methods.fixed]                    # not tuned
"algorithm.name" = "fedavg"
"tune.grid" = false
[tune.grid]
"local.lr" = [0.05, 0.1]
"""


def test_a_methods_own_tuning_candidates(tmp_path: Path) -> None:
    sw = sweep.load(write(tmp_path, CANDIDATES), out=tmp_path / "out")
    ref = (("local.lr", 0.01), ("local.momentum", 0.0), ("local.lr_decay", 0.99))
    assert sw.tunings("fedavg") == [(("local.lr", 0.05),), (("local.lr", 0.1),)]
    assert sw.tunings("ref") == [*sw.tunings("fedavg"), ref]
    assert sw.tunings("tied") == [(("local.lr", 0.01), ("algorithm.mu", 1.0)), (("local.lr", 0.1), ("algorithm.mu", 0.1))]
    assert sw.tunings("fixed") == [()] and not sw.tuned("fixed") and sw.tuned("tied")
    assert sw.tunings() == sw.tunings("fedavg")  # without a method: the grid's product
    assert sw.tune_keys() == ["local.lr", "local.momentum", "local.lr_decay", "algorithm.mu"]
    runs = sw.runs()
    assert len(runs) == (2 + 3 + 2 + 1) * 2 and len({r.out for r in runs}) == len(runs)
    r = next(r for r in runs if r.method == "ref" and r.tuning == ref and r.seed == 1)
    # a candidate's keys over the method's and [set]'s, as a grid tuning value's
    assert {"local.lr=0.01", "local.momentum=0.0", "local.lr_decay=0.99"} <= set(r.overrides)
    assert r.out == tmp_path / "out" / "runs" / "ref" / "base" / "local.lr=0.01,local.momentum=0.0,local.lr_decay=0.99" / "seed1"
    tied = next(r for r in runs if r.method == "tied" and dict(r.tuning)["local.lr"] == 0.1)
    assert "algorithm.mu=0.1" in tied.overrides and "tune" not in " ".join(tied.overrides)
    assert next(r for r in runs if r.method == "fixed").out.parent.name == "base"

    def res(method: str, tuning: sweep.Assignment, seed: int, val: float | None, test: float) -> sweep.RunResult:
        rec = {"round": 1, "accuracy": test} | ({} if val is None else {"val_accuracy": val})
        return sweep.RunResult(sweep.Run(method, (), tuning, seed, (), Path(".")), [rec], {"final_accuracy": test}, None)

    grid_lo, grid_hi = sw.tunings("ref")[:2]
    results = [res("ref", t, s, v, 0.5) for t, v in ((grid_lo, 0.6), (grid_hi, 0.7), (ref, 0.8)) for s in (0, 1)]
    results += [res("fixed", (), 0, None, 0.4)]
    chosen, md = sweep.select(sw, results)
    assert chosen[("ref", ())] == ref  # the reference optimizer validates best: kept like a grid value
    assert ("fixed", ()) not in chosen  # one seed of two finished
    results.append(res("fixed", (), 1, None, 0.6))
    chosen, md = sweep.select(sw, results)
    assert chosen[("fixed", ())] == ()  # nothing to select: kept once every seed finished, no metric needed
    assert "| ref | - | 0.01 | 0.0 | 0.99 | - | 2 | 0.8000 ± 0.0000 |" in md
    assert "| ref | - | 0.05 | - | - | - | 2 | 0.6000 ± 0.0000 |" in md
    assert "| fixed | - | - | - | - | - | 0 | - | 0.5000 ± 0.1414 | not tuned |" in md
    table, text_csv, _ = sweep.tables(sw, results)
    assert "| ref | 0.01 | 0.0 | 0.99 | - | 2 |" in table and "| fixed | - | - | - | - | 2 |" in table
    assert text_csv.splitlines()[0].startswith("method,local.lr,local.momentum,local.lr_decay,algorithm.mu,seeds")


@pytest.mark.parametrize("method, needle", [
    ('"tune.candidates" = {"local.lr" = 0.01}', "must be a list of non-empty tables"),
    ('"tune.candidates" = [{}]', "must be a list of non-empty tables"),
    ('"tune.candidates" = [{"local.lr" = 0.05}]', "repeats the tuning value local.lr=0.05"),
    ('"tune.candidates" = [{"local.lr" = 0.2}, {"local.lr" = 0.2}]', "repeats the tuning value local.lr=0.2"),
    ('"tune.candidates" = [{"local.epochs" = 2}]', "a [grid] axis"),
    ('"tune.candidates" = [{"local.lrr" = 0.2}]', "unknown config key 'local.lrr'"),
    ('"tune.candidates" = [{"lr" = 0.2}]', "is not a config key"),
    ('"tune.grid" = "no"', "tune.grid must be true"),
    ('"tune.metric" = "val_nll"', "unknown key(s) tune.metric"),
])
def test_method_tuning_errors_name_the_problem(tmp_path: Path, method: str, needle: str) -> None:
    text = TINY + '"data.val_size" = 100\n[grid]\n"local.epochs" = [1]\n[methods.m]\n"algorithm.name" = "fedavg"\n'
    p = write(tmp_path, text + method + '\n[tune.grid]\n"local.lr" = [0.05]\n')
    with pytest.raises(KdflError) as e:
        sweep.load(p)
    assert needle in str(e.value)
    assert "methods.m" in str(e.value) or "run m" in str(e.value)


def test_target_columns_by_hand() -> None:
    run = sweep.Run("m", (), (), 0, (), Path("."))
    recs = [{"round": 1, "uplink_bytes": 2_000_000, "accuracy": 0.2},
            {"round": 2, "uplink_bytes": 3_000_000},  # not evaluated: its bytes still count
            {"round": 3, "uplink_bytes": 1_000_000, "accuracy": 0.6}]
    r = sweep.RunResult(run, recs, {}, 0.5)
    assert r.to_target() == (3, 6.0)
    assert sweep.RunResult(run, recs, {}, 0.9).to_target() == (None, None)


def test_sweep_is_resumable_and_aggregates(tmp_path: Path) -> None:
    p = write(tmp_path, TINY + """
"data.val_size" = 100
[methods.fedavg]
"algorithm.name" = "fedavg"
[tune.grid]
"local.lr" = [0.05, 0.1]
""")
    sw = sweep.load(p, out=tmp_path / "out")
    lines: list[str] = []
    counts = sweep.run_sweep(sw, say=lines.append)
    assert counts == {"total": 4, "skipped": 0, "ok": 4, "failed": 0, "busy": 0}
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| fedavg |" in md and "± " in md
    assert (tmp_path / "out" / "tuning.md").read_text().count("**yes**") == 1
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("method,local.lr,seeds")
    assert list((tmp_path / "out" / "plots").glob("*.png"))
    # each value in the table is the mean over the run directories' summaries
    sel = [r for r in sweep.collect(sw) if r.run.tuning == sweep.select(sw, sweep.collect(sw))[0][("fedavg", ())]]
    mean = sum(r.summary["final_accuracy"] for r in sel) / 2
    assert f"{mean:.4f} ± " in md

    # again: nothing to run
    assert sweep.run_sweep(sw, say=lines.append)["skipped"] == 4
    # a run killed after its checkpoint (no summary yet) continues from it and ends equal
    victim = sw.runs()[1].out
    before = json.loads((victim / "summary.json").read_text())
    metrics_before = (victim / "metrics.jsonl").read_text().splitlines()
    (victim / "summary.json").unlink()
    assert sweep.run_status(sw.runs()[1]) == "partial"
    lines.clear()
    counts = sweep.run_sweep(sw, say=lines.append)
    assert counts == {"total": 4, "skipped": 3, "ok": 1, "failed": 0, "busy": 0}
    assert any("(resumed)" in line for line in lines)
    after = json.loads((victim / "summary.json").read_text())
    assert after["final_accuracy"] == before["final_accuracy"]
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "wall_seconds"} for x in lines]  # noqa: E731
    assert strip((victim / "metrics.jsonl").read_text().splitlines()) == strip(metrics_before)


def test_a_failed_run_costs_that_run_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdfl import experiment

    real = experiment.run

    def flaky(cfg, **kw):  # type: ignore[no-untyped-def]
        if cfg["run"]["seed"] == 1:
            raise RuntimeError("simulated crash")
        return real(cfg, **kw)

    monkeypatch.setattr(experiment, "run", flaky)
    sw = sweep.load(write(tmp_path, TINY), out=tmp_path / "out")
    lines: list[str] = []
    counts = sweep.run_sweep(sw, say=lines.append)
    assert counts["ok"] == 1 and counts["failed"] == 1
    failed = next(line for line in lines if "FAILED" in line)
    assert "seed 1" in failed and "RuntimeError: simulated crash" in failed and "error.txt" in failed
    assert "simulated crash" in (sw.runs()[1].out / "error.txt").read_text()
    assert "1 finished runs" in (tmp_path / "out" / "results.md").read_text()
    monkeypatch.setattr(experiment, "run", real)  # fixed: the rerun runs only the failed one
    assert sweep.run_sweep(sw, say=lines.append) == {"total": 2, "skipped": 1, "ok": 1, "failed": 0, "busy": 0}


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, TINY)
    assert cli.main(["sweep", str(p), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.startswith("todo") for line in out)
    assert cli.main(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert "sweep file" in capsys.readouterr().err
    assert cli.main(["sweep", str(p), "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
    # --set applies to every run, over the file's own values
    sw = sweep.load(p, ["run.rounds=1"])
    assert sw.runs()[0].overrides[-2:] == ("run.rounds=1", "run.seed=0")


def test_tensorboard_needs_its_package(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    with pytest.raises(KdflError, match="pip install tensorboard"):
        sweep.load(write(tmp_path, "tensorboard = true\n" + TINY))


def test_a_run_locked_by_another_process_is_left_to_it(tmp_path: Path) -> None:
    sw = sweep.load(write(tmp_path, TINY), out=tmp_path / "out")
    held = sw.runs()[0].out
    held.mkdir(parents=True)
    lock = sweep._lock(held)  # as another sweep process would hold it (flock is per open file)
    assert lock is not None
    try:
        lines: list[str] = []
        counts = sweep.run_sweep(sw, say=lines.append)
        assert counts["busy"] == 1 and counts["ok"] == 1
        assert sweep.run_status(sw.runs()[0]) == "todo"
        assert any("other sweep process" in line for line in lines)
    finally:
        lock.close()
    assert sweep.run_sweep(sw, say=lines.append)["ok"] == 1  # released: it runs now


def test_a_component_name_comes_before_its_options(tmp_path: Path) -> None:
    # attack.name resets [attack] (switching component drops the old options), so a grid that
    # lists the fraction first must still attack
    p = write(tmp_path, TINY + """
[grid]
"attack.fraction" = [0.25]
"attack.name" = ["sign_flip"]
""")
    sw = sweep.load(p)
    o = list(sw.runs()[0].overrides)
    assert o.index("attack.name=\"sign_flip\"") < o.index("attack.fraction=0.25")


def test_a_finished_run_of_another_config_is_stale_never_reused_nor_overwritten(tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Editing a [set] value (or a default changing) does not move the run directory; the
    finished run there is then of another config: reported as stale, left untouched, and
    kept out of the tables, instead of being passed off as the new config's result."""
    text = TINY.replace("seeds = [0, 1]", "seeds = [0]")
    p = write(tmp_path, text)
    sw = sweep.load(p, out=tmp_path / "out")
    assert sweep.run_sweep(sw, say=lambda _: None)["ok"] == 1
    run = sw.runs()[0]
    assert sweep.run_status(run, sw.base, check=True) == "done" and sweep.stale(sw.base, run.overrides, run.out) == []
    before = (run.out / "summary.json").read_bytes()

    p2 = write(tmp_path, text.replace('"local.lr" = 0.1', '"local.lr" = 0.05'))
    sw2 = sweep.load(p2, out=tmp_path / "out")
    run2 = sw2.runs()[0]
    assert run2.out == run.out  # the same directory: [set] values are not in the path
    assert sweep.stale(sw2.base, run2.overrides, run2.out) == ["local.lr: 0.1 -> 0.05"]
    assert sweep.run_status(run2, sw2.base, check=True) == "stale"
    assert sweep.run_status(run2) == "done"  # without the check: only whether it finished
    lines: list[str] = []
    counts = sweep.run_sweep(sw2, say=lines.append)
    assert counts["failed"] == 1 and counts["ok"] == 0 and counts["skipped"] == 0
    assert any("STALE" in line and "local.lr: 0.1 -> 0.05" in line and "move that directory away" in line
               for line in lines)
    assert (run.out / "summary.json").read_bytes() == before
    assert sweep.collect(sw2) == [] and len(sweep.collect(sw)) == 1
    assert "Left out: 1 stale run(s)" in (tmp_path / "out" / "results.md").read_text()
    assert cli.main(["sweep", str(p2), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("stale")


def test_plots_name_the_cell_note_methods_without_a_global_model_and_tick_whole_rounds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-cell sweep's figure is titled with the sweep and the runs' setting (never
    "Accuracy vs round: -"); FedProto (no test accuracy) is a legend note, not a missing line."""
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), real(self, *a, **k))[1])
    p = write(tmp_path, TINY + '[methods.fedavg]\n"algorithm.name" = "fedavg"\n'
                               '[methods.fedproto]\n"algorithm.name" = "fedproto"\n')
    sw = sweep.load(p, out=tmp_path / "out")
    results = []
    for run in sw.runs():
        run.out.mkdir(parents=True)
        (run.out / "config.toml").write_text('[data]\nname = "digits"\nnum_clients = 4\n[partition]\nname = "iid"\n')
        recs = [{"round": r, "uplink_bytes": 100, **({"accuracy": 0.2 * r} if run.method == "fedavg" else {})}
                for r in (1, 2, 3)]
        results.append(sweep.RunResult(run, recs, {}, None))
    (path,) = sweep.plot(sw, results, {(m, ()): () for m in sw.methods})
    fig = saved[-1]
    assert path.is_file() and fig._suptitle is not None
    assert fig._suptitle.get_text() == "s.toml: digits, 4 clients, iid"
    ax1 = fig.axes[0]
    assert ax1.get_title() == "Accuracy vs round" and "-" not in ax1.get_title()
    legend = [t.get_text() for t in ax1.get_legend().get_texts()]
    assert legend[0] == "fedavg, 2 seeds" and legend[1].startswith("fedproto: no global model")
    assert all(float(t).is_integer() for t in ax1.get_xticks())
