"""The benchmark scripts run through the sweep engine: ``kdfl.sweep.run_jobs`` fills run
directories (skipping finished ones), and ``benchmarks/common.run_jobs`` reads the results
back from them, equal to a direct ``kdfl.experiment.run``, reusing finished runs and
leaving a failed one out without raising."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from kdfl import config, experiment, sweep

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # as the scripts import it
import common  # noqa: E402

TINY = ["data.name=digits", "data.num_clients=4", "model.arch=mlp", "run.rounds=2", "run.checkpoint_every=1",
        "local.epochs=1", "local.lr=0.1", "partition.name=iid", "run.eval_every=1", "data.client_holdout=0.2",
        "run.client_eval_every=1"]


def test_sweep_run_jobs_runs_a_job_into_its_directory_then_skips_it(tmp_path: Path) -> None:
    job = sweep.Job("tiny | seed 0", None, (*TINY, "run.seed=0"), tmp_path / "run")
    lines: list[str] = []
    seen: list[tuple[sweep.Job, dict[str, Any]]] = []
    counts = sweep.run_jobs([job], say=lines.append, on_done=lambda j, r: seen.append((j, r)))
    assert counts == {"total": 1, "skipped": 0, "ok": 1, "failed": 0, "busy": 0}
    assert sweep.finished(job.out) and (job.out / "metrics.jsonl").is_file() and (job.out / "checkpoint.pt").is_file()
    assert len(seen) == 1 and seen[0][0] == job and "summary" in seen[0][1]
    assert lines and "tiny | seed 0: final accuracy" in lines[0]
    stamp = (job.out / "summary.json").stat().st_mtime_ns
    assert sweep.run_jobs([job], say=lines.append, on_done=lambda j, r: seen.append((j, r)))["skipped"] == 1
    assert len(seen) == 1 and (job.out / "summary.json").stat().st_mtime_ns == stamp


def test_bench_run_jobs_equals_experiment_run_and_reuses_finished_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    job: common.Job = ("digits", "FedAvg", 1, [*TINY, "algorithm.name=fedavg"])
    log = tmp_path / "log.jsonl"
    [res] = common.run_jobs([job], 1, log, runs_dir=tmp_path / "runs")
    cfg = config.load(None, [*job[3], "run.seed=1"])
    hist = experiment.run(cfg)
    strip = lambda s: {k: v for k, v in s.items() if k != "wall_seconds"}  # noqa: E731
    assert strip(res["summary"]) == strip(hist.summary)
    assert res["summary"]["final_accuracy"] == hist.summary["final_accuracy"]
    evals = [r for r in hist.records if "accuracy" in r]
    assert res["curve"] == [(r["round"], r["accuracy"]) for r in evals] and len(res["curve"]) == 2
    assert res["client_curve"] == [(r["round"], r["client_accuracy_mean"]) for r in hist.records if "client_eval" in r]
    assert res["client_eval"] == hist.clients["client_eval"]
    assert res["client_archs"] == common.cfg_archs(cfg) == ["mlp"] * 4
    assert (res["data"], res["method"], res["seed"], res["overrides"]) == ("digits", "FedAvg", 1, job[3])
    assert res["seconds"] > 0
    out = common.run_dir(job, tmp_path / "runs")
    assert out.parent.parent.name == "FedAvg" and out.name == "seed1" and sweep.finished(out)
    assert [json.loads(x)["summary"] for x in log.read_text().splitlines()] == [res["summary"]]

    # again: nothing runs, from the log and (without it) from the finished run directory
    stamp = (out / "summary.json").stat().st_mtime_ns

    def no_run(*a: Any, **k: Any) -> None:
        raise AssertionError("a finished run ran again")

    monkeypatch.setattr(sweep, "execute", no_run)
    again = common.run_jobs([job], 1, log, runs_dir=tmp_path / "runs")
    assert again[0]["summary"] == res["summary"] and len(log.read_text().splitlines()) == 1
    log.unlink()
    from_dir = common.run_jobs([job], 1, log, runs_dir=tmp_path / "runs")
    assert from_dir[0]["summary"] == res["summary"] and from_dir[0]["curve"] == res["curve"]
    assert len(log.read_text().splitlines()) == 1  # logged again
    assert (out / "summary.json").stat().st_mtime_ns == stamp
    assert "reading 1 finished runs" in capsys.readouterr().err

    # a script's own reader (kd_family: each round's bytes) reads the same run directory
    import kd_family

    with_bytes = kd_family.read_with_bytes(job, out)
    assert [r for r, _, _ in with_bytes["bytes_curve"]] == [1, 2]
    assert [u for _, u, _ in with_bytes["bytes_curve"]] == [r["uplink_bytes"] for r in hist.records]


def test_a_failed_job_is_reported_and_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common.FAILED.clear()
    good: common.Job = ("digits", "FedAvg", 0, [*TINY, "run.rounds=1"])
    bad: common.Job = ("digits", "broken", 0, [*TINY, "local.lrr=0.1"])  # not a config key
    results = common.run_jobs([bad, good], 1, tmp_path / "log.jsonl", runs_dir=tmp_path / "runs")
    assert [r["method"] for r in results] == ["FedAvg"]
    err = common.run_dir(bad, tmp_path / "runs") / "error.txt"
    assert "local.lrr" in err.read_text()
    out = capsys.readouterr()
    assert "FAILED digits | broken | seed 0" in out.err
    assert "1 run(s) failed and are left out" in out.out and "unknown config key 'local.lrr'" in out.out
    assert str(err) in out.out
    assert len(common.FAILED) == 1 and "broken" in common.failed_note()
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1  # only the finished run is logged
    common.FAILED.clear()
