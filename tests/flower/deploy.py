"""A Flower deployment on 127.0.0.1 for the end-to-end tests (needs flwr): a SuperLink,
SuperNodes and ``flwr run``, started from this interpreter's bin directory with their own
``FLWR_HOME``, each logging to ``NAME.log`` in the test's directory. Leaving the ``with``
block stops every process started here, and all they started, by process id
(:class:`kdfl.flower.simulation.Processes`); on an error it first prints the end of the logs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from kdfl.flower.simulation import Processes, flower_env, free_port, write_flower_home

APP = Path(__file__).resolve().parents[2] / "examples" / "flower_app"
BIN = Path(sys.executable).parent
LOGS = ("flwr_run", "superlink", "supernode0")  # printed when the test fails


class Deployment:
    """``with Deployment(tmp_path, "kdfl-e2e", 240.0) as d: d.superlink(); d.supernodes(3); ...``

    ``federation``: the SuperLink connection's name in ``flwr_home/config.toml``;
    ``timeout_s``: the time the test allows from here (``deadline``, monotonic);
    ``root_certificates``: TLS verified against this CA (else ``--insecure`` everywhere);
    ``logs``: the logs printed (their ends) when the ``with`` block raises."""

    def __init__(self, tmp_path: Path, federation: str, timeout_s: float, root_certificates: Path | None = None,
                 logs: tuple[str, ...] = LOGS) -> None:
        self.dir, self.federation, self.timeout_s, self.logs = tmp_path, federation, timeout_s, logs
        self.out = tmp_path / "out"
        self.link = free_port()
        self.root_certificates = root_certificates
        home = write_flower_home(tmp_path / "flwr_home", federation, self.link, root_certificates)
        self.env = flower_env(home, BIN, OMP_NUM_THREADS="1")
        self.deadline = time.monotonic() + timeout_s
        self.processes = Processes(tmp_path, self.env, BIN)

    def _security(self, *tls: str) -> tuple[str, ...]:
        return tls if self.root_certificates else ("--insecure",)

    def superlink(self, *args: str) -> subprocess.Popen[bytes]:
        """``flower-superlink`` on 127.0.0.1:``link`` with ``args``; returns once it listens."""
        proc = self.processes.start("superlink", "flower-superlink", *self._security(), "--host", "127.0.0.1",
                                    "--port", str(self.link), "--database", str(self.dir / "state.db"), *args)
        self.processes.wait_listening("superlink", self.link, self.deadline, "flower-superlink")
        return proc

    def supernode(self, name: str, partition: int, partitions: int, *args: str) -> subprocess.Popen[bytes]:
        """A ``flower-supernode`` of the SuperLink with ``partition-id`` / ``num-partitions`` and ``args``."""
        return self.processes.start(
            name, "flower-supernode", *self._security("--root-certificates", str(self.root_certificates)),
            "--superlink", f"127.0.0.1:{self.link}", "--port", str(free_port()),
            "--node-config", f"partition-id={partition} num-partitions={partitions}", *args)

    def supernodes(self, n: int) -> list[subprocess.Popen[bytes]]:
        """SuperNodes ``supernode0`` .. ``supernode{n-1}``, partition i of n each."""
        return [self.supernode(f"supernode{i}", i, n) for i in range(n)]

    def flwr_run(self, app: str | Path, *args: str) -> subprocess.Popen[bytes]:
        """``flwr run APP FEDERATION --stream ARGS`` (log: ``flwr_run.log``)."""
        return self.processes.start("flwr_run", "flwr", "run", str(app), self.federation, "--stream", *args)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``flwr ARGS`` to its end (output captured)."""
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.dir, capture_output=True,
                              text=True, timeout=timeout)

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text()

    def wait_summary(self, run: subprocess.Popen[bytes]) -> None:
        """Wait until the ServerApp wrote ``out/summary.json``; TimeoutError at the deadline,
        AssertionError (with the end of ``flwr_run.log``) if ``flwr run`` exits without it."""
        summary = self.out / "summary.json"
        while run.poll() is None and not summary.exists():
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"the Flower run did not finish within {self.timeout_s:.0f} s")
            time.sleep(0.5)
        if not summary.exists():
            raise AssertionError(f"flwr run exited with {run.returncode} before the ServerApp wrote its summary:\n"
                                 + self.log("flwr_run")[-4000:])

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is not None:
                for name in self.logs:
                    if (self.dir / f"{name}.log").exists():
                        sys.stderr.write(f"--- {name}.log ---\n" + self.log(name)[-3000:] + "\n")
        finally:
            self.processes.close()
