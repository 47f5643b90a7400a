"""kdfl runs on Flower's simulation engine, from Python.

Flower 1.41 deprecates ``flwr.simulation.run_simulation``; its supported entry point is
``flwr run`` against a SuperLink in simulation mode. :func:`simulate` does exactly that:
it writes a minimal Flower app (the kdfl ServerApp and ClientApp) into a temporary
directory, starts ``flower-superlink --simulation`` on a free 127.0.0.1 port (its own
``FLWR_HOME``, its own database, nothing shared with ``flwr run . local``), runs
``flwr run APP --stream`` with one simulated SuperNode per kdfl client (one Ray actor of
one CPU each), stops every process it started by process id, and reads the History back
from the run directory (``metrics.jsonl``, ``summary.json``, ``clients.json`` and the
checkpoint for the server state). :func:`simulate_clients` runs only the client updates
of some rounds the same way and times them (for ``benchmarks/speed.py``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kdfl.simulation.engine import History
from kdfl.types import Algorithm, ClientUpdate, KdflError, Payload, Task

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0  # the whole simulation, start-up included


def backend_config(num_cpus: int | None = None) -> dict[str, Any]:
    """Ray backend: one CPU per client, ``num_cpus`` (default: all cores) in total (the
    ``--federation-config`` of :func:`run_flower_simulation`, as a dict)."""
    total = num_cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": total, "include_dashboard": False, "logging_level": logging.WARNING},
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (``pgrep -P``, recursively; empty without pgrep)."""
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    kids = [int(x) for x in out.split()]
    return kids + [d for k in kids for d in descendants(k)]


def stop_tree(proc: subprocess.Popen[bytes]) -> None:
    """Stop ``proc`` and every process it started, by process id (SIGTERM, then SIGKILL):
    its descendants, and its process group (``proc`` was started in a session of its own,
    so the group holds only processes it started)."""
    pids = descendants(proc.pid) + [proc.pid]
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        pids = [p for p in pids if alive(p)]
        if not pids:
            return


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (exited, not reaped by its parent) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def write_flower_home(home: Path, federation: str, port: int, root_certificates: Path | None = None) -> Path:
    """``home/config.toml`` (the ``FLWR_HOME`` of ``flwr``) with one SuperLink connection,
    ``federation``, to 127.0.0.1:``port``: insecure, or TLS verified against ``root_certificates``."""
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{federation}"\n\n[superlink.{federation}]\n'
                                      f'address = "127.0.0.1:{port}"\n{security}\n')
    return home


def flower_env(home: Path, bin_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of Flower's processes: this one, with ``FLWR_HOME=home``, no update
    check, no dependency installation, ``bin_dir`` first on ``PATH``, and ``extra``."""
    return dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_UPDATE_CHECK="1",
                FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra)


class Processes:
    """Processes started from ``bin_dir``, each in a session of its own, in ``workdir``,
    with its output in ``workdir/NAME.log``. :meth:`close` (or the end of a ``with``
    block) stops every one of them and all they started, by process id (last started
    first), and closes the logs."""

    def __init__(self, workdir: Path, env: Mapping[str, str], bin_dir: Path | None = None) -> None:
        self.workdir, self.env = workdir, dict(env)
        self.bin_dir = bin_dir or Path(sys.executable).parent
        self.procs: list[subprocess.Popen[bytes]] = []
        self.named: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start ``bin_dir/args[0] args[1:]``; its output goes to ``NAME.log``."""
        f = open(self.workdir / f"{name}.log", "wb")
        self._logs.append(f)
        proc = subprocess.Popen([str(self.bin_dir / args[0]), *args[1:]], env=self.env, cwd=self.workdir,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.named[name] = proc
        return proc

    def tail(self, name: str, chars: int = 3000) -> str:
        """The last ``chars`` characters of ``NAME.log`` ("" when there is none)."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def wait_listening(self, name: str, port: int, deadline: float, what: str | None = None) -> None:
        """Wait until something listens on 127.0.0.1:``port``; KdflError if the process
        started as ``name`` (``what``, in messages) exits first, or at ``deadline`` (monotonic)."""
        proc, what = self.named[name], what or name
        while True:
            if proc.poll() is not None:
                raise KdflError(f"{what} exited with {proc.returncode}:\n{self.tail(name)}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise KdflError(f"{what} did not listen on 127.0.0.1:{port} in time")
            time.sleep(0.2)

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop_tree(proc)
        for f in self._logs:
            f.close()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def write_app(app_dir: Path, serverapp: str, clientapp: str, app_config: Mapping[str, Any]) -> Path:
    """A minimal Flower app in ``app_dir`` whose components are importable objects
    (``"package.module:attr"``) and whose ``[tool.flwr.app.config]`` is ``app_config``."""
    pkg = app_dir / "kdfl_simapp"
    pkg.mkdir(parents=True, exist_ok=True)
    for name, target in (("server_app", serverapp), ("client_app", clientapp)):
        module, attr = target.split(":")
        (pkg / f"{name}.py").write_text(f"import {module} as _m\n\napp = _m.{attr}\n")  # Flower checks `app =`
    (pkg / "__init__.py").write_text('"""kdfl on Flower\'s simulation engine (generated by kdfl.flower)."""\n')
    config = "\n".join(f"{k} = {_toml(v)}" for k, v in app_config.items())
    (app_dir / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "kdfl-simapp"
version = "0.1.0"
description = "kdfl on Flower's simulation engine (generated)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "kdfl"

[tool.flwr.app.components]
serverapp = "kdfl_simapp.server_app:app"
clientapp = "kdfl_simapp.client_app:app"

[tool.flwr.app.config]
{config}
""")
    return app_dir


def run_flower_simulation(
    workdir: Path, serverapp: str, clientapp: str, app_config: Mapping[str, Any], num_supernodes: int,
    num_cpus: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, done: Path | None = None,
) -> str:
    """``flwr run`` of a generated app on a simulation SuperLink started here; returns
    the log of ``flwr run``. Every process started here is stopped by process id before
    this returns. ``done``: a file whose appearance means the ServerApp finished (then
    this does not wait for ``flwr run``'s own exit any longer than 30 s)."""
    bin_dir = Path(sys.executable).parent
    port = free_port()
    home = write_flower_home(workdir / "flwr_home", "kdfl-sim", port)
    app = write_app(workdir / "app", serverapp, clientapp, app_config)
    env = flower_env(home, bin_dir)
    # Ray waits up to 60 s for its API server even without the dashboard; nothing here needs it
    env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "10")
    backend = backend_config(num_cpus)
    federation = (f"num-supernodes={num_supernodes} "
                  f"client-resources-num-cpus={backend['client_resources']['num_cpus']} "
                  f"init-args-num-cpus={backend['init_args']['num_cpus']}")
    deadline = time.monotonic() + timeout_s
    with Processes(workdir, env, bin_dir) as procs:
        procs.start("superlink", "flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
                    "--port", str(port), "--database", str(workdir / "state.db"))
        procs.wait_listening("superlink", port, deadline, "flower-superlink --simulation")
        run = procs.start("flwr_run", "flwr", "run", str(app), "kdfl-sim", "--stream",
                          "--federation-config", federation)
        finished_at = None
        while run.poll() is None:
            if done is not None and done.exists():
                finished_at = finished_at or time.monotonic()
                if time.monotonic() - finished_at > 30:
                    break  # the ServerApp is done; do not wait on log streaming
            if time.monotonic() > deadline:
                raise KdflError(f"the Flower simulation did not finish within {timeout_s:.0f} s; last output of "
                                f"flwr run:\n{procs.tail('flwr_run')}")
            time.sleep(0.5)
        return procs.tail("flwr_run")


def read_history(run_dir: Path) -> History:
    """The History of a Flower run from its run directory (the server state from the
    checkpoint; None when the run wrote none, ``run.checkpoint_every = 0``)."""
    from kdfl.simulation import checkpoint

    hist = History()
    hist.records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    hist.summary = json.loads((run_dir / "summary.json").read_text())
    if (run_dir / "clients.json").exists():
        hist.clients = json.loads((run_dir / "clients.json").read_text())
    if (run_dir / checkpoint.FILE).exists():
        hist.state = checkpoint.load(run_dir)["state"]
    return hist


def simulate(
    config: str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    num_cpus: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    secagg: bool = False,
) -> History:
    """Run a kdfl config on Flower's simulation engine through ``flwr run`` (see the
    module docstring); returns the History, with ``state`` (read from the checkpoint the
    ServerApp writes). ``out``: the run directory (default: a temporary one). ``secagg``:
    secure aggregation with SecAgg+ (run config ``kdfl-secagg = true``, default settings;
    see :mod:`kdfl.flower.secagg`)."""
    from kdfl import config as config_mod
    from kdfl.flower.federation import CONFIG_KEY, OUT_KEY, load_config

    cfg = load_config(config, overrides)
    with tempfile.TemporaryDirectory(prefix="kdfl-flower-sim-") as tmp:
        work = Path(tmp)
        run_dir = Path(out).resolve() if out else work / "run"
        (work / "kdfl.toml").write_text(config_mod.dumps(cfg))
        output = run_flower_simulation(
            work, "kdfl.flower.server_app:app", "kdfl.flower.client_app:app",
            {CONFIG_KEY: str(work / "kdfl.toml"), OUT_KEY: str(run_dir), "kdfl-wait-s": 120, "kdfl-secagg": secagg},
            cfg["data"]["num_clients"], num_cpus, timeout_s, done=run_dir / "summary.json")
        if not (run_dir / "summary.json").exists():
            raise KdflError("the Flower simulation ended without a kdfl summary; the end of its log:\n" + output)
        return read_history(run_dir)


@dataclass
class FlowerRounds:
    """What :func:`simulate_clients` measured on Flower's simulation engine.

    ``updates``: the client updates of the last round, in job order. ``round_s``: wall
    seconds of each round as the ServerApp saw it (building the messages, sending them to
    every SuperNode, training in the Ray actors, receiving and decoding the replies).
    ``startup_s``: from the call until the first round could start (Ray, the SuperNodes,
    the ServerApp); ``total_s``: the whole call, shutdown included.
    """

    updates: list[ClientUpdate]
    round_s: list[float]
    startup_s: float
    total_s: float


BENCH_DIR_KEY = "kdfl-bench-dir"  # run-config key of the benchmark apps: where jobs.pkl / result.pkl live
_BLOBS: dict[str, Any] = {}  # jobs.pkl path -> its content, unpickled once per actor process


def _jobs(bench_dir: str) -> Any:
    path = str(Path(bench_dir) / "jobs.pkl")
    if path not in _BLOBS:
        import torch

        torch.set_num_threads(1)  # one CPU per actor (client_resources)
        _BLOBS.clear()
        with open(path, "rb") as f:
            _BLOBS[path] = pickle.load(f)
    return _BLOBS[path]


def _bench_apps() -> tuple[Any, Any]:
    """The ServerApp and ClientApp of :func:`simulate_clients` (importable objects, as
    ``flwr run`` needs them): the jobs come from ``jobs.pkl`` in the run config's
    ``kdfl-bench-dir``; the ServerApp writes what it measured to ``result.pkl`` there."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    from kdfl.algorithms.program import run_client
    from kdfl.flower.records import payload_to_record, record_to_payload

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        job = _jobs(str(context.run_config[BENCH_DIR_KEY]))
        i = int(msg.content.config_records["config"]["job"])  # type: ignore[arg-type]
        u = run_client(job["algorithm"], job["task"], record_to_payload(msg.content.array_records["payload"]),
                       job["clients"][i])
        content = RecordDict({"payload": payload_to_record(u.payload),
                              "config": ConfigRecord({"job": i, "num-examples": u.num_examples})})
        return Message(content, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        bench_dir = Path(str(context.run_config[BENCH_DIR_KEY]))
        with open(bench_dir / "jobs.pkl", "rb") as f:
            job = pickle.load(f)
        downlinks, rounds, timeout = job["downlinks"], job["rounds"], job["timeout"]
        deadline = time.monotonic() + 120
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < len(downlinks) and time.monotonic() < deadline:  # nodes register asynchronously
            time.sleep(0.1)
            nodes = sorted(grid.get_node_ids())
        if not nodes:
            raise KdflError("Flower's simulation engine started no SuperNode")
        started = time.time()
        out: dict[int, tuple[int, Payload]] = {}
        round_s: list[float] = []
        for _ in range(rounds):
            t = time.perf_counter()
            out.clear()
            msgs = [Message(RecordDict({"payload": payload_to_record(d), "config": ConfigRecord({"job": i})}),
                            dst_node_id=nodes[i % len(nodes)], message_type=MessageType.TRAIN, ttl=timeout)
                    for i, d in enumerate(downlinks)]
            for r in grid.send_and_receive(msgs, timeout=timeout):
                if r.has_error():
                    raise KdflError(f"a Flower client failed: {r.error.reason}")
                conf = r.content.config_records["config"]
                out[int(conf["job"])] = (int(conf["num-examples"]),  # type: ignore[arg-type]
                                         record_to_payload(r.content.array_records["payload"]))
            round_s.append(time.perf_counter() - t)
        with open(bench_dir / "result.pkl.tmp", "wb") as f:
            pickle.dump({"updates": out, "round_s": round_s, "started": started}, f)
        os.replace(bench_dir / "result.pkl.tmp", bench_dir / "result.pkl")

    return server_app, client_app


def __getattr__(name: str) -> Any:  # bench_server_app / bench_client_app, built on first use (they import flwr)
    if name in ("bench_server_app", "bench_client_app"):
        server, client = _bench_apps()
        globals().update(bench_server_app=server, bench_client_app=client)
        return globals()[name]
    raise AttributeError(name)


def simulate_clients(
    algorithm: Algorithm, task: Task, jobs: Sequence[tuple[Any, Payload]], rounds: int = 1,
    num_cpus: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
) -> FlowerRounds:
    """Run the clients of ``algorithm`` (:func:`kdfl.algorithms.program.run_client`) for ``jobs`` (client,
    downlink) on Flower's simulation engine (through ``flwr run``, as :func:`simulate`) for
    ``rounds`` rounds: one SuperNode per job, one TRAIN message per SuperNode and round
    (the downlink as an ArrayRecord), the replies decoded into ClientUpdates.

    Each Ray actor unpickles the task and the clients once (as a Flower app would load its
    partition once per process), so the rounds measure Flower's per-message path and the
    training, not data loading. The SuperLink and Ray start anew on every call
    (``startup_s``).
    """
    if rounds < 1:
        raise KdflError(f"simulate_clients needs rounds >= 1; got {rounds}")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="kdfl-flower-bench-") as tmp:
        work = Path(tmp)
        with open(work / "jobs.pkl", "wb") as f:
            pickle.dump({"algorithm": algorithm, "task": task, "clients": [c for c, _ in jobs],
                         "downlinks": [d for _, d in jobs], "rounds": rounds,
                         "timeout": timeout_s}, f)
        output = run_flower_simulation(work, "kdfl.flower.simulation:bench_server_app",
                                       "kdfl.flower.simulation:bench_client_app", {BENCH_DIR_KEY: str(work)},
                                       len(jobs), num_cpus, timeout_s, done=work / "result.pkl")
        if not (work / "result.pkl").exists():
            raise KdflError("Flower's simulation returned no client updates; the end of its log:\n" + output)
        with open(work / "result.pkl", "rb") as f:
            res = pickle.load(f)
    out, round_s = res["updates"], res["round_s"]
    if len(out) != len(jobs) or len(round_s) != rounds:
        raise KdflError(f"Flower's simulation returned {len(out)} of {len(jobs)} client updates after "
                        f"{len(round_s)} of {rounds} rounds")
    updates = [ClientUpdate(jobs[i][0].id, out[i][0], out[i][1]) for i in range(len(jobs))]
    return FlowerRounds(updates, round_s, res["started"] - t0, time.time() - t0)
