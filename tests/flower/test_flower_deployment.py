"""End to end on Flower's deployment engine: a real SuperLink and three SuperNodes on
127.0.0.1, ``flwr run`` of examples/flower_app (FedEMA-Distill, median, one sign-flipping
client, fp16 logits), two rounds. Every process started here is killed in a ``finally``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

APP = Path(__file__).resolve().parents[2] / "examples" / "flower_app"
BIN = Path(sys.executable).parent
TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (``pgrep -P``, recursively)."""
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    kids = [int(x) for x in out.split()]
    return kids + [d for k in kids for d in descendants(k)]


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and every process it started, by PID."""
    pids = descendants(proc.pid) + [proc.pid]
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):  # polite first, then certain
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def wait_port(port: int, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def test_two_rounds_on_superlink_and_three_supernodes(tmp_path):
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

    try:
        superlink = start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
                          "--database", str(tmp_path / "state.db"))
        wait_port(link, superlink, deadline)
        for i in range(3):
            start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions=3")
        run = start("flwr_run", "flwr", "run", str(APP), "kdfl-e2e", "--stream",
                    "--run-config", f"kdfl-out='{out}' kdfl-wait-s=120")
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
