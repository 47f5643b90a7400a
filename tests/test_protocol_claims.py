"""benchmarks/protocol/claims.py: the verdict rule and the ablation table, on hand-made
run results (no run is executed)."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

from kdfl import config, sweep

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("claims", ROOT / "benchmarks" / "protocol" / "claims.py")
assert _spec is not None and _spec.loader is not None
claims = importlib.util.module_from_spec(_spec)
sys.modules["claims"] = claims  # its dataclasses look their module up
_spec.loader.exec_module(claims)


def result(method: str, seed: int, acc: float, cell: sweep.Assignment = (), ece: float = 0.1) -> sweep.RunResult:
    run = sweep.Run(method, cell, (), seed, (), Path("unused"))
    return sweep.RunResult(run, [{"round": 1, "accuracy": acc}], {"final_accuracy": acc, "final_ece": ece}, None)


@pytest.mark.parametrize(("diffs", "want"), [
    ([0.01, 0.02, 0.03], "met"),
    ([0.0, 0.0, 0.0], "met"),                        # "at or above": a tie clears the bar
    ([0.10, -0.01, 0.02], "not separable from seed noise"),
    ([-0.05, 0.01, 0.01], "missed"),                 # mean -0.01
    ([], "not measured"),
])
def test_verdict_rule(diffs: list[float], want: str) -> None:
    assert claims.verdict(diffs) == want


def test_verdict_with_a_bar() -> None:
    # "loses at most 2 points" is written as verdict([2 - loss]): losses 1, 3, 1 -> mean 1.67 clears, seed 1 does not
    assert claims.verdict([2 - 1, 2 - 3, 2 - 1]) == "not separable from seed noise"
    assert claims.verdict([2 - 3, 2 - 3, 2 - 1]) == "missed"


def test_ablation_rows_are_paired_differences_to_the_base(tmp_path: Path) -> None:
    f = tmp_path / "abl.toml"
    f.write_text(textwrap.dedent("""
        seeds = [0, 1]
        [set]
        "algorithm.name" = "fedema_distill"
        [methods.base]
        [methods.worse]
        "algorithm.aggregator" = "median"
        [methods.mixed]
        "algorithm.aggregator" = "mean"
        [methods.same]
        "algorithm.ema_decay" = 0.99
    """))
    sw = sweep.load(f)
    res = [result("base", 0, 0.60), result("base", 1, 0.70),
           result("worse", 0, 0.50), result("worse", 1, 0.65),
           result("mixed", 0, 0.62),  # seed 1 missing: paired on seed 0 only
           result("same", 0, 0.60), result("same", 1, 0.70)]
    text = claims.claim_ablation(sw, res)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "0.6500" in rows["base"]  # mean of 0.60 and 0.70
    # worse: -10 and -5 points, mean -7.5
    assert "0.5750 (-7.5: -10.0, -5.0; worse on every seed)" in rows["worse"]
    assert "0.6200 (+2.0: +2.0; better on every seed)" in rows["mixed"]
    assert "0.6500 (+0.0: +0.0, +0.0; identical on every seed)" in rows["same"]


def test_feddf_gap_growth_needs_two_epoch_values(tmp_path: Path) -> None:
    f = tmp_path / "feddf.toml"
    f.write_text(textwrap.dedent("""
        seeds = [0]
        [grid]
        "partition.alpha" = [0.1]
        "local.epochs" = [1, 5]
        [methods.fedavg]
        "algorithm.name" = "fedavg"
        [methods.feddf]
        "algorithm.name" = "feddf"
    """))
    sw = sweep.load(f)
    c1, c5 = sw.cells()

    def res(method: str, cell: sweep.Assignment, acc: float) -> sweep.RunResult:
        r = result(method, 0, acc, cell)
        r.records[0]["val_accuracy"] = acc
        return r

    one = claims.claim_feddf(sw, [res("fedavg", c1, 0.5), res("feddf", c1, 0.6)])
    assert "1 epochs +0.1000: not measured (one local-epoch value finished)" in one
    assert "| 0.1 | 1 | 0.5000 | 0.6000 | +0.1000 ± 0.0000 | +0.100 | met |" in one
    both = claims.claim_feddf(sw, [res("fedavg", c1, 0.5), res("feddf", c1, 0.6),
                                   res("fedavg", c5, 0.5), res("feddf", c5, 0.55)])
    assert "1 epochs +0.1000 → 5 epochs +0.0500: missed (does not grow)" in both


def _run(method: str, seed: int, tuning: sweep.Assignment, val: float, **summary: float) -> sweep.RunResult:
    run = sweep.Run(method, (), tuning, seed, (), Path("unused"))
    full = {"uplink_bytes_per_client_round": 1000.0, "failed_clients": 0, **summary}
    return sweep.RunResult(run, [{"round": 1, "val_accuracy": val}], full, None)


def test_kd_misses_verdicts_on_each_papers_model_with_ablations_beside_their_base(tmp_path: Path) -> None:
    f = tmp_path / "misses.toml"
    f.write_text(textwrap.dedent("""
        seeds = [0, 1]
        [set]
        "data.val_size" = 100
        "data.proxy" = "holdout"
        "data.proxy_size" = 100
        [methods.fedavg]
        "algorithm.name" = "fedavg"
        [methods.fedkd]
        "algorithm.name" = "fedkd"
        "tune.candidates" = [{"local.optimizer" = "adam", "local.lr" = 0.001}]
        [methods.fedkd_weight_capped]
        "algorithm.name" = "fedkd"
        "algorithm.eps" = 1.0
        [methods.fd]
        "algorithm.name" = "fd"
        "tune.grid" = false
        [tune.grid]
        "local.lr" = [0.01, 0.05]
    """))
    sw = sweep.load(f)
    lo, hi = (("local.lr", 0.01),), (("local.lr", 0.05),)
    adam = (("local.optimizer", "adam"), ("local.lr", 0.001))
    res = [
        # FedAvg: lr 0.05 validates better; its global model on the clients' own splits 0.70 / 0.80
        _run("fedavg", 0, lo, 0.1, final_accuracy=0.9, client_accuracy_mean=0.9),
        _run("fedavg", 1, lo, 0.1, final_accuracy=0.9, client_accuracy_mean=0.9),
        _run("fedavg", 0, hi, 0.5, final_accuracy=0.60, client_accuracy_mean=0.70),
        _run("fedavg", 1, hi, 0.5, final_accuracy=0.62, client_accuracy_mean=0.80),
        # FedKD: its own candidate (Adam) validates best (the shared mentee's val accuracy); the mentors on their
        # splits 0.68 / 0.81: -2 and +1 points, both within the 3-point bar -> met
        _run("fedkd", 0, hi, 0.2, final_accuracy=0.3, client_accuracy_mean=0.99),
        _run("fedkd", 1, hi, 0.2, final_accuracy=0.3, client_accuracy_mean=0.99),
        _run("fedkd", 0, adam, 0.4, final_accuracy=0.35, client_accuracy_mean=0.68, client_mentee_accuracy_mean=0.3),
        _run("fedkd", 1, adam, 0.4, final_accuracy=0.45, client_accuracy_mean=0.81, client_mentee_accuracy_mean=0.4),
        # the capped weight, lr 0.01 only finished on one seed: not kept; lr 0.05 on both: -10 / -2 points to
        # FedAvg (mean -6: missed), and -12 / -3 points to FedKD
        _run("fedkd_weight_capped", 0, lo, 0.9, client_accuracy_mean=0.1),
        _run("fedkd_weight_capped", 0, hi, 0.3, final_accuracy=0.5, client_accuracy_mean=0.60),
        _run("fedkd_weight_capped", 1, hi, 0.3, final_accuracy=0.5, client_accuracy_mean=0.78),
        # FD: not tuned, no validation metric; client models on the test set vs 0.8 x FedAvg's test accuracy:
        # 0.50 - 0.48 = +2, 0.49 - 0.496 = -0.6 points -> not separable
        _run("fd", 0, (), float("nan"), client_test_accuracy_mean=0.50, client_accuracy_mean=0.9),
        _run("fd", 1, (), float("nan"), client_test_accuracy_mean=0.49, client_accuracy_mean=0.9),
    ]
    for r in res:
        if r.run.method == "fd":
            r.records[0].pop("val_accuracy")
    text = claims.claim_kd_misses(sw, res)
    rows = {line.split(" | ")[0].strip("| ").split(" ")[0]: line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert "FedAvg: selected local.lr=0.05; test accuracy 0.6100 ± 0.0141, on the clients' own held-out splits 0.7500 ± 0.0707; over 2 seeds" in text
    kd = rows["fedkd"]
    assert "| local.optimizer=adam, local.lr=0.001 |" in kd
    assert "0.7450 ± 0.0919" in kd and "0.7500 ± 0.0707" in kd  # mentors; FedAvg on the same splits
    assert "-0.5 (-2.0, +1.0)" in kd and "**met** (≥ FedAvg -3 points)" in kd
    # the shared mentee beside it, paired with FedAvg on the same measure: test set 0.35 / 0.45 vs 0.60 / 0.62,
    # own splits 0.3 / 0.4 vs 0.7 / 0.8
    assert "shared mentee, test set 0.4000 ± 0.0707 (vs FedAvg -21.0 (-25.0, -17.0))" in kd
    assert "shared mentee, own held-out splits 0.3500 ± 0.0707 (vs FedAvg -40.0 (-40.0, -40.0))" in kd
    cap = rows["fedkd_weight_capped"]
    assert "ablation of fedkd: algorithm.eps = 1.0" in cap and "| local.lr=0.05 |" in cap
    assert "-6.0 (-10.0, -2.0)" in cap and "**missed** (≥ FedAvg -3 points)" in cap
    assert "vs fedkd: -5.5 (-8.0, -3.0)" in cap
    fd = rows["fd"]
    assert "not tuned" in fd and "0.8 x 0.6100 ± 0.0141" in fd
    assert "+0.7 (+2.0, -0.6)" in fd and "**not separable from seed noise** (≥ 0.8 x FedAvg)" in fd
    assert "client models, own held-out splits 0.9000 ± 0.0000 (vs FedAvg +15.0 (+20.0, +10.0))" in fd
    # methods the sweep does not have (FedDF, FedGen, ...) get no row; a missing FedAvg says so
    assert "feddf" not in rows
    assert "Not measured: fedavg did not finish" in claims.claim_kd_misses(sw, res[4:])


SWEEP_FILES = sorted([*(Path(__file__).parents[1] / "benchmarks" / "protocol").glob("*.toml"),
                      *(Path(__file__).parents[1] / "benchmarks").glob("*.toml")])


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_every_shipped_sweep_file_loads(path):
    # valid TOML whose every run's config validates (a duplicated key once broke one silently)
    import tomllib

    raw = tomllib.loads(path.read_text())
    if "methods" not in raw and "seeds" not in raw:  # a base config, not a sweep
        config.load(path)
        return
    sw = sweep.load(path)
    assert sw.runs()
