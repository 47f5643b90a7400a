"""End to end on Flower's deployment engine: a real SuperLink and three SuperNodes on
127.0.0.1, ``flwr run`` of examples/flower_app (FedEMA-Distill, median, one sign-flipping
client, fp16 logits), two rounds. Every process started here is killed by process id
when the ``with`` block ends (tests/flower/deploy.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")

from deploy import APP, Deployment  # noqa: E402

TIMEOUT_S = 240.0


def test_two_rounds_on_superlink_and_three_supernodes(tmp_path):
    with Deployment(tmp_path, "kdfl-e2e", TIMEOUT_S) as d:
        d.superlink()
        d.supernodes(3)
        d.wait_summary(d.flwr_run(APP, "--run-config", f"kdfl-out='{d.out}' kdfl-wait-s=120"))
    out = d.out
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["malicious"] == [2] and not r["rejected"] and not r["failed"] for r in records)
    assert summary["final_accuracy"] > 0.2  # 10 classes: chance is 0.1
    # uplink = fp16 logits on the proxy as they are: rows x classes x 2 bytes, per client
    proxy_rows, classes = 200, 10
    for r in records:
        assert r["uplink_bytes_per_client"] == proxy_rows * classes * 2
        assert r["uplink_bytes"] == 3 * proxy_rows * classes * 2
        assert r["downlink_bytes_per_client"] > 0
