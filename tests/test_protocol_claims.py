"""benchmarks/protocol/claims.py: the verdict rule and the ablation table, on hand-made
run results (no run is executed)."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest

from kdfl import sweep

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("claims", ROOT / "benchmarks" / "protocol" / "claims.py")
assert _spec is not None and _spec.loader is not None
claims = importlib.util.module_from_spec(_spec)
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
