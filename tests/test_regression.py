"""Refactorings keep the numbers: the quick cases of benchmarks/regression.py against the
numbers recorded before the algorithm-layer redesign (accuracy, ECE, NLL to 1e-6)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import regression  # noqa: E402


def test_quick_cases_equal_the_recorded_numbers():
    recorded = json.loads((ROOT / "benchmarks" / "results" / "regression_quick.json").read_text())
    got = {name: regression.run_case(config, overrides)
           for name, (config, overrides) in regression.cases(quick=True).items() if name in recorded}
    assert got.keys() == recorded.keys()
    bad, moved = regression.compare(recorded, got, tol=1e-6, bytes_rtol=1e-3)
    assert not bad, bad
    # logit payloads have no model keys in them: their bytes did not move at all
    assert got["quick/fedema_distill"]["uplink_bytes_per_client_round"] == \
        recorded["quick/fedema_distill"]["uplink_bytes_per_client_round"]
