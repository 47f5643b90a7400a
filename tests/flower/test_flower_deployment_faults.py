"""A SuperNode killed (SIGKILL) in the middle of a run on Flower's deployment engine: the
ServerApp waits at most ``kdfl-timeout-s`` for its reply, counts it as a failed client in
the later rounds and completes the run with the others. A real SuperLink and three
SuperNodes on 127.0.0.1; every process started here is stopped by process id."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("flwr")

from test_flower_deployment import APP, BIN, descendants, free_port, kill_tree, wait_port  # noqa: E402

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
    home, out = tmp_path / "flwr_home", tmp_path / "out"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "kdfl-e2e"\n\n[superlink.kdfl-e2e]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1")
    deadline = time.monotonic() + TIMEOUT_S
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")
        logs.append(log)
        p = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    started = time.monotonic()
    try:
        superlink = start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
                          "--database", str(tmp_path / "state.db"))
        wait_port(link, superlink, deadline)
        nodes = [start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                       "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions=3")
                 for i in range(3)]
        run = start("flwr_run", "flwr", "run", app_with_fault_keys(tmp_path), "kdfl-e2e", "--stream", "--run-config",
                    f"kdfl-out='{out}' kdfl-wait-s=120 kdfl-timeout-s={REPLY_TIMEOUT_S} kdfl-set=\"{SETS}\"")
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):  # round 1 is recorded
            if run.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("round 1 did not finish:\n" + (tmp_path / "flwr_run.log").read_text()[-4000:])
            time.sleep(0.5)
        victim = nodes[1]  # the machine of client 1 dies: the SuperNode and its ClientApp processes
        for pid in [victim.pid, *descendants(victim.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        victim.wait(timeout=10)
        while run.poll() is None and not (out / "summary.json").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Flower run did not finish within {TIMEOUT_S:.0f} s")
            time.sleep(0.5)
        if not (out / "summary.json").exists():
            raise AssertionError(f"flwr run exited with {run.returncode} before the ServerApp wrote its summary:\n"
                                 + (tmp_path / "flwr_run.log").read_text()[-4000:])
    except BaseException:
        for f in ("flwr_run", "superlink", "supernode0"):
            sys.stderr.write(f"--- {f}.log ---\n" + (tmp_path / f"{f}.log").read_text()[-3000:] + "\n")
        raise
    finally:
        for p in reversed(procs):
            kill_tree(p)
        for log in logs:
            log.close()
    sys.stderr.write(f"killed-SuperNode run took {time.monotonic() - started:.0f} s\n")

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in records] == [1, 2]
    assert records[0]["failed"] == [] and records[1]["failed"] == [1]
    assert records[1]["uplink_bytes"] == 2 * records[0]["uplink_bytes"] // 3  # the two live clients' logits
    assert summary["failed_clients"] == 1 and summary["final_accuracy"] > 0.1
    assert "failed=[1]" in (tmp_path / "flwr_run.log").read_text()  # logged by the ServerApp, streamed
