"""The ``kdfl`` command: list, run (run directory, resume), report, and its error handling.

Most tests call ``kdfl.cli.main`` in-process (fast); two go through a real subprocess to
check the exit code and that the user never sees a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdfl import cli, config

TINY = ["--set", "data.num_clients=4", "--set", "model.arch=mlp", "--set", "local.batch_size=32"]
SUMMARY_KEYS = {
    "final_accuracy", "best_accuracy", "final_ece", "rounds", "rounds_to_target",
    "uplink_bytes_per_client_round", "downlink_bytes_per_client_round", "wall_seconds",
}



def kdfl(*args: str) -> int:
    return cli.main(list(args))


def kdfl_subprocess(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "kdfl"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kdfl.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, env=env)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def without_time(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in recs]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny finished runs (fedavg and fedprox, 2 rounds each)."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, extra in (("fedavg", []), ("fedprox", ["--set", "algorithm.name=fedprox", "--set", "algorithm.mu=0.1"])):
        d = base / name
        assert kdfl("run", *TINY, "--set", "run.rounds=2", "--set", "run.target_accuracy=0.5", *extra,
                    "--quiet", "--out", str(d)) == 0
        out[name] = d
    return out


# -------------------------------------------------------------------------------------- list
def test_list_prints_every_section(capsys):
    assert kdfl("list") == 0
    text = capsys.readouterr().out
    for head in ("algorithms:", "datasets:", "partitions:", "models (parameters", "aggregators:", "attacks:",
                 "codecs:", "executors ("):
        assert head in text
    for name in ("fedavg", "fedprox", "fedavgm", "digits", "mnist1d", "dirichlet", "shards", "median", "krum",
                 "sign_flip", "int8", "topk"):
        assert name in text
    partitions = text.split("partitions:")[1].split("models (")[0].split()
    assert "natural" in partitions and "file" in partitions  # the two that are not label functions too
    models = text.split("models (")[1].split("aggregators:")[0]
    mlp = next(line for line in models.splitlines() if line.split() and line.split()[0] == "mlp")
    assert int(mlp.split()[1]) == 8 * 8 * 128 + 128 + 128 * 10 + 10  # parameter count for (1, 8, 8) inputs


def test_list_executors_with_their_options(capsys):
    assert kdfl("list", "executors") == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(lines) == {"sequential", "vectorized", "batched", "parallel", "auto"}
    assert "workers=0" in lines["parallel"] and "inner='sequential'" in lines["parallel"]
    assert "min_round_s=0.1" in lines["auto"] and "(no options)" in lines["sequential"]


def test_list_one_section_with_input_shape(capsys):
    assert kdfl("list", "models", "--input-shape", "1,40") == 0
    text = capsys.readouterr().out
    assert "(1, 40)" in text and "cnn" in text and "algorithms:" not in text


def test_list_bad_input_shape_is_a_clear_error(capsys):
    assert kdfl("list", "models", "--input-shape", "3,x") == 2
    err = capsys.readouterr().err
    assert err.startswith("kdfl: error:") and "3,x" in err


# ------------------------------------------------------------------------------- run errors
def test_run_bad_key_subprocess_exit_2_no_traceback():
    p = kdfl_subprocess("run", "--set", "run.round=3", "--quiet")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("kdfl: error: ") and "'run.round'" in lines[0] and "'rounds'" in lines[0]
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_run_bad_config_in_process(capsys, tmp_path):
    assert kdfl("run", str(tmp_path / "missing.toml")) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdfl: error: config file") and "missing.toml" in err
    assert kdfl("run", "--set", "attack.name=sign_flip", "--set", "attack.fraction=0.7", "--quiet") == 2
    assert "[0, 0.5)" in capsys.readouterr().err
    assert kdfl("run", "--set", "rounds=3", "--quiet") == 2
    assert "section.key=value" in capsys.readouterr().err


def test_run_prints_summary_and_json(capsys):
    assert kdfl("run", *TINY, "--set", "run.rounds=1", "--quiet", "--json") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("final test accuracy")
    summary = json.loads(out[-1])
    assert SUMMARY_KEYS <= summary.keys() and summary["rounds"] == 1


# ---------------------------------------------------------------------------- run directory
def test_run_directory_contents(run_dirs):
    d = run_dirs["fedavg"]
    for name in ("config.toml", "metrics.jsonl", "summary.json", "checkpoint.pt", "partition.txt", "malicious.json"):
        assert (d / name).is_file(), name
    summary = json.loads((d / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["rounds"] == 2
    assert 0.0 <= summary["final_accuracy"] <= summary["best_accuracy"] <= 1.0
    assert summary["uplink_bytes_per_client_round"] > 0 and summary["downlink_bytes_per_client_round"] > 0
    assert [r["round"] for r in records(d)] == [1, 2]
    assert json.loads((d / "malicious.json").read_text()) == []


def test_written_config_reloads_to_the_same_config(run_dirs):
    d = run_dirs["fedprox"]
    expected = config.load(None, [a for a in TINY if a != "--set"] + [
        "run.rounds=2", "run.target_accuracy=0.5", "algorithm.name=fedprox", "algorithm.mu=0.1"])
    assert config.load(d / "config.toml") == expected


def test_resume_extends_rounds_and_equals_a_straight_run(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert kdfl("run", *TINY, "--set", "run.rounds=4", "--quiet", "--out", str(straight)) == 0
    assert kdfl("run", *TINY, "--set", "run.rounds=2", "--quiet", "--out", str(resumed)) == 0
    assert kdfl("run", *TINY, "--set", "run.rounds=4", "--quiet", "--resume", "--out", str(resumed)) == 0
    capsys.readouterr()
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((resumed / "summary.json").read_text())
    assert b["rounds"] == 4
    assert a["final_accuracy"] == b["final_accuracy"] and a["best_accuracy"] == b["best_accuracy"]
    assert a["final_ece"] == b["final_ece"]
    assert [r["round"] for r in records(resumed)] == [1, 2, 3, 4]
    assert without_time(records(straight)) == without_time(records(resumed))
    # the run directory now records the extended config
    assert config.load(resumed / "config.toml")["run"]["rounds"] == 4


def test_resume_refuses_other_changes(tmp_path, capsys):
    d = tmp_path / "run"
    assert kdfl("run", *TINY, "--set", "run.rounds=1", "--quiet", "--out", str(d)) == 0
    before = (d / "metrics.jsonl").read_text()
    assert kdfl("run", *TINY, "--set", "run.rounds=2", "--set", "run.seed=1", "--quiet", "--resume",
                "--out", str(d)) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "run.seed: 0 -> 1" in err and "Only run.rounds may change" in err
    assert "run.rounds:" not in err  # the rounds change is allowed, so not listed as a difference
    assert (d / "metrics.jsonl").read_text() == before  # nothing lost
    assert config.load(d / "config.toml")["run"]["seed"] == 0


def test_resume_refuses_fewer_rounds_than_done(tmp_path, capsys):
    d = tmp_path / "run"
    assert kdfl("run", *TINY, "--set", "run.rounds=2", "--quiet", "--out", str(d)) == 0
    assert kdfl("run", *TINY, "--set", "run.rounds=1", "--quiet", "--resume", "--out", str(d)) == 2
    err = capsys.readouterr().err
    assert "already at round 2" in err


def test_resume_without_checkpoint_starts_from_round_0(tmp_path, capsys):
    """--resume where there is no checkpoint yet (a directory that does not exist, an empty
    one) starts the run from round 0 there, and says so."""
    new = tmp_path / "new"
    assert kdfl("run", *TINY, "--set", "run.rounds=1", "--quiet", "--resume", "--out", str(new)) == 0
    assert "no checkpoint yet: starting the run from round 0" in capsys.readouterr().err
    assert [r["round"] for r in records(new)] == [1]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert kdfl("run", *TINY, "--set", "run.rounds=1", "--quiet", "--resume", "--out", str(empty)) == 0
    assert without_time(records(empty)) == without_time(records(new))


def summary_without_time(run_dir: Path) -> dict:
    return {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items() if "seconds" not in k}


def interrupt_at(monkeypatch, at_round: int) -> None:
    """A real SIGINT to this process as round ``at_round`` starts (once), as Ctrl-C would send."""
    import signal

    from kdfl.simulation.engine import Engine

    real = Engine.round

    def round_(self, state, round_num, client_states):
        if round_num == at_round:
            monkeypatch.setattr(Engine, "round", real)
            signal.raise_signal(signal.SIGINT)
        return real(self, state, round_num, client_states)

    monkeypatch.setattr(Engine, "round", round_)


@pytest.mark.parametrize(("every", "expect"), [(3, "before the first checkpoint"),
                                               (1, "holds a checkpoint after round 1")])
def test_interrupt_then_the_command_it_names_equals_a_straight_run(tmp_path, capsys, monkeypatch, every, expect):
    """Ctrl-C in round 2: before the first checkpoint (every 3 rounds) or after one (every
    round). The message names a command; running it ends where an uninterrupted run does."""
    import shlex

    sets = [*TINY, "--set", "run.rounds=3", "--set", f"run.checkpoint_every={every}", "--quiet"]
    assert kdfl("run", *sets, "--out", str(tmp_path / "straight")) == 0
    run = tmp_path / "run"
    interrupt_at(monkeypatch, 2)
    assert kdfl("run", *sets, "--out", str(run)) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kdfl: interrupted") and expect in err, err
    assert (run / "checkpoint.pt").exists() == (every == 1)
    # a plain rerun is refused, naming --resume (checked to work below), --out and --overwrite
    assert kdfl("run", *sets, "--out", str(run)) == 2
    refusal = capsys.readouterr().err
    assert "already holds an unfinished run" in refusal and "--resume" in refusal and "--overwrite" in refusal
    assert ("from round 0" in refusal) == (every == 3)
    command = shlex.split(err.split("`")[1])
    assert command[0] == "kdfl" and "--resume" in command
    assert kdfl(*command[1:]) == 0
    assert summary_without_time(run) == summary_without_time(tmp_path / "straight")
    assert without_time(records(run)) == without_time(records(tmp_path / "straight"))


def test_interrupt_messages_without_out_and_in_a_sweep():
    args = cli.parser().parse_args(["run", "--quiet"])
    assert "nothing was saved" in cli.interrupted(args, ["run", "--quiet"])
    args = cli.parser().parse_args(["sweep", "x.toml"])
    assert "run the same command again" in cli.interrupted(args, ["sweep", "x.toml"])
    args = cli.parser().parse_args(["run", "--out", "d", "--overwrite"])  # the named command drops --overwrite
    assert "`kdfl run --out d --resume`" in cli.interrupted(args, ["run", "--out", "d", "--overwrite"])


def test_every_refusal_names_a_remedy_that_works(tmp_path, capsys):
    """Each refusal of `kdfl run` on a run directory, then the remedy its message names."""
    run = tmp_path / "run"
    two = [*TINY, "--set", "run.rounds=2", "--quiet", "--out", str(run)]
    assert kdfl("run", *two) == 0
    capsys.readouterr()

    def refused(*args: str) -> str:
        assert kdfl(*args) == 2
        return capsys.readouterr().err

    # a finished run: extend it with --resume and a larger run.rounds
    err = refused("run", *two)
    assert "already holds a finished run" in err and "extend it with --resume and a larger run.rounds" in err
    err = refused("run", *two, "--resume", "--set", "run.rounds=1")
    assert "set run.rounds >= 2" in err
    assert kdfl("run", *two, "--resume", "--set", "run.rounds=2") == 0  # what it says: >= 2
    assert kdfl("run", *two, "--resume", "--set", "run.rounds=3") == 0
    assert [r["round"] for r in records(run)] == [1, 2, 3]
    # another config: resume with the same one, or choose a new --out
    err = refused("run", *two, "--resume", "--set", "run.seed=1")
    assert "resume with the same config and --set values, or choose a new --out" in err
    assert kdfl("run", *two, "--resume", "--set", "run.rounds=3") == 0
    assert kdfl("run", *TINY, "--set", "run.rounds=1", "--set", "run.seed=1", "--quiet",
                "--out", str(tmp_path / "new")) == 0
    # --resume without --out
    err = refused("run", *TINY, "--set", "run.rounds=1", "--quiet", "--resume")
    assert "--resume needs --out DIR" in err
    # a config.toml that no longer loads: --overwrite in place of --resume
    (run / "config.toml").write_text("[run]\nrounds = 'many'\n")
    err = refused("run", *two, "--resume")
    assert "no longer loads" in err and "with --overwrite in place of --resume" in err
    assert kdfl("run", *two, "--overwrite") == 0
    # the path is a file: choose another --out
    (tmp_path / "file").write_text("x")
    assert "choose another --out" in refused("run", *TINY, "--quiet", "--out", str(tmp_path / "file"))
    # contradicting flags: choose one
    assert "choose one" in refused("run", *two, "--resume", "--overwrite")
    capsys.readouterr()


def test_run_directory_errors_and_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert kdfl("run", *TINY, "--set", "run.rounds=1", "--quiet", "--out", str(run)) == 0
    capsys.readouterr()
    (run / "summary.md").write_text("old report")
    # a second run into it is refused, naming the ways out; nothing of the first run is touched
    before = (run / "metrics.jsonl").read_text()
    assert kdfl("run", *TINY, "--set", "run.rounds=2", "--quiet", "--out", str(run)) == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--resume" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == before
    # --overwrite replaces it: the old report goes, the new metrics have 2 rounds
    assert kdfl("run", *TINY, "--set", "run.rounds=2", "--quiet", "--out", str(run), "--overwrite") == 0
    assert not (run / "summary.md").exists() and len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert kdfl("run", *TINY, "--quiet", "--out", str(run), "--overwrite", "--resume") == 2
    assert "contradict" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert kdfl("run", *TINY, "--quiet", "--out", str(a_file)) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"\x80\x03garbage", None])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys, content):
    run = tmp_path / "run"
    assert kdfl("run", *TINY, "--set", "run.rounds=1", "--quiet", "--out", str(run)) == 0
    ck = run / "checkpoint.pt"
    ck.write_bytes(content if content is not None else ck.read_bytes()[: len(ck.read_bytes()) // 2])  # or truncated
    capsys.readouterr()
    assert kdfl("run", *TINY, "--set", "run.rounds=2", "--quiet", "--out", str(run), "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("kdfl: error: cannot resume") and "Traceback" not in err
    # the remedy it names (renaming a previous checkpoint, when there is one: tests/test_experiment.py)
    assert "start the run again with --overwrite in place of --resume" in err
    assert kdfl("run", *TINY, "--set", "run.rounds=2", "--quiet", "--out", str(run), "--overwrite") == 0


def test_config_directory_version_and_attack_without_fraction(tmp_path, capsys):
    (tmp_path / "a.toml").write_text("")
    assert kdfl("run", str(tmp_path), "--quiet") == 2
    assert "is a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        kdfl("--version")
    assert e.value.code == 0 and capsys.readouterr().out.startswith("kdfl ")
    assert kdfl("run", *TINY, "--set", "attack.name=sign_flip", "--quiet") == 2
    assert "attack.fraction" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ report
def test_report_writes_plots_and_table(run_dirs, tmp_path, capsys):
    out = tmp_path / "report"
    assert kdfl("report", str(run_dirs["fedavg"]), str(run_dirs["fedprox"]), "--out", str(out)) == 0
    assert "summary.md" in capsys.readouterr().out
    for name in ("accuracy_vs_round.png", "accuracy_vs_uplink.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    text = (out / "summary.md").read_text()
    table = text.split("\n\n")[0].strip().splitlines()  # the table, then one label table per run
    assert table[0].startswith("| run |") and len(table) == 2 + 2
    assert "### Partition of fedavg, fedprox" in text and text.count("### Partition of") == 1  # the same split
    assert table[2].startswith("| fedavg |") and table[3].startswith("| fedprox |")
    assert "| 2 |" in table[2]


def test_report_on_non_run_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert kdfl("report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep")) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdfl: error:") and "not a kdfl run directory" in err and "empty" in err
    assert not (tmp_path / "rep").exists()  # nothing written


def test_report_subprocess_missing_directory(tmp_path):
    p = kdfl_subprocess("report", str(tmp_path / "nope"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("kdfl: error:") and "nope" in p.stderr


def test_python_dash_m_kdfl_is_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kdfl", "list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fedmd" in out.stdout and "local" in out.stdout


def test_version_and_help_do_not_import_torch():
    """`kdfl --version`, `--help`, report's errors and a config or sweep file's errors
    (missing, bad --set) print before torch (or numpy) is imported: lazy imports.
    Their speed is measured in benchmarks/cli_startup.py, not asserted here."""
    code = ("import sys\nfrom kdfl.cli import main\n"
            "for argv in (['--version'], ['--help'], ['run', '--help'], ['report', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
            "assert main(['report', 'no-such-run']) == 2\n"
            "assert main(['run', 'no-such-config.toml']) == 2 and main(['run', '--set', 'rounds=3']) == 2\n"
            "assert main(['sweep', 'no-such-sweep.toml']) == 2\n"
            "print('heavy:', sorted(m for m in ('torch', 'numpy', 'kdfl.types') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("kdfl ") and "usage: kdfl run" in p.stdout
    assert p.stdout.strip().splitlines()[-1] == "heavy: []"


def test_run_without_a_config_uses_the_defaults(capsys):
    # no config file and no run.rounds: the engine's default number of rounds, not a KeyError
    from kdfl.simulation.rounds import RunSettings

    assert kdfl("run", "--quiet", "--set", "run.threads=1") == 0
    assert f"after {RunSettings.rounds} rounds" in capsys.readouterr().out
