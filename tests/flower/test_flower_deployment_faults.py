"""A SuperNode killed (SIGKILL) in the middle of a run on Flower's deployment engine: the
ServerApp waits at most ``kdfl-timeout-s`` for its reply, counts it as a failed client in
the later rounds and completes the run with the others. A real SuperLink and three
SuperNodes on 127.0.0.1; every process started here is stopped by process id."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

import pytest

pytest.importorskip("flwr")

from deploy import APP, Deployment  # noqa: E402

from kdfl.flower.simulation import descendants  # noqa: E402

TIMEOUT_S = 420.0
REPLY_TIMEOUT_S = 45  # well above a live node's phase on a busy 2-core machine (10-15 s)
SETS = "run.rounds=2; attack.name='none'; attack.fraction=0.0; local.epochs=1"


def app_with_fault_keys(tmp_path) -> str:
    """A copy of examples/flower_app whose run config also declares ``kdfl-timeout-s`` and
    ``kdfl-resume`` (``flwr run --run-config`` only overrides declared keys)."""
    app = tmp_path / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    text = (app / "pyproject.toml").read_text()
    for key, value in (("kdfl-timeout-s", "600"), ("kdfl-resume", "false")):
        if f"\n{key} " not in text and f"\n{key}=" not in text:
            text = text.rstrip("\n") + f"\n{key} = {value}\n"
    (app / "pyproject.toml").write_text(text)
    return str(app)


@pytest.mark.slow
def test_killed_supernode_is_a_failed_client_and_the_run_completes(tmp_path):
    started = time.monotonic()
    with Deployment(tmp_path, "kdfl-e2e", TIMEOUT_S) as d:
        d.superlink()
        nodes = d.supernodes(3)
        run = d.flwr_run(app_with_fault_keys(tmp_path), "--run-config",
                         f"kdfl-out='{d.out}' kdfl-wait-s=120 kdfl-timeout-s={REPLY_TIMEOUT_S} kdfl-set=\"{SETS}\"")
        metrics = d.out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):  # round 1 is recorded
            if run.poll() is not None or time.monotonic() > d.deadline:
                raise AssertionError("round 1 did not finish:\n" + d.log("flwr_run")[-4000:])
            time.sleep(0.5)
        victim = nodes[1]  # the machine of client 1 dies: the SuperNode and its ClientApp processes
        for pid in [victim.pid, *descendants(victim.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        victim.wait(timeout=10)
        d.wait_summary(run)
    sys.stderr.write(f"killed-SuperNode run took {time.monotonic() - started:.0f} s\n")

    out = d.out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in records] == [1, 2]
    assert records[0]["failed"] == [] and records[1]["failed"] == [1]
    assert records[1]["uplink_bytes"] == 2 * records[0]["uplink_bytes"] // 3  # the two live clients' logits
    assert summary["failed_clients"] == 1 and summary["final_accuracy"] > 0.1
    assert "failed=[1]" in (tmp_path / "flwr_run.log").read_text()  # logged by the ServerApp, streamed
