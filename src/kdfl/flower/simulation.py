"""kdfl runs on Flower's simulation engine, from Python (``flwr run`` needs none of this).

:func:`simulate` runs a whole kdfl config through ``flwr.simulation.run_simulation``: the
ServerApp in this process, every client in a Ray actor (one CPU each). :func:`simulate_clients`
runs only the client updates of some rounds and times them (for ``benchmarks/speed.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdfl.simulation.engine import History
from kdfl.types import Algorithm, ClientUpdate, KdflError, Payload, Task

log = logging.getLogger(__name__)


def backend_config(num_cpus: int | None = None) -> dict[str, Any]:
    """Ray backend: one CPU per client, ``num_cpus`` (default: all cores) in total.

    Ray starts its API server even without the dashboard and waits up to 60 s for it; on a
    busy 2-core machine that wait was the whole cost of a run, and nothing here needs the
    server, so the wait is capped (``RAY_DASHBOARD_STARTUP_TIMEOUT_S``, overridable).
    """
    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "10")
    total = num_cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": total, "include_dashboard": False, "logging_level": logging.WARNING},
    }


def simulate(
    config: str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    num_cpus: int | None = None,
) -> History:
    """Run a kdfl config on Flower's simulation engine; returns the History (with ``state``)."""
    from flwr.simulation import run_simulation

    from kdfl.flower.client_app import make_client_app
    from kdfl.flower.federation import load_config
    from kdfl.flower.server_app import make_server_app

    cfg = load_config(config, overrides)
    result: list[History] = []
    server = make_server_app(cfg, out=out or "", on_finish=result.append)
    run_simulation(server, make_client_app(), num_supernodes=cfg["data"]["num_clients"],
                   backend_config=backend_config(num_cpus))  # type: ignore[arg-type]
    if not result:
        raise KdflError("the Flower simulation ended without a result; see the Flower log above for the error")
    return result[0]


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


_BLOBS: dict[str, Any] = {}  # token -> (algorithm, task, clients), unpickled once per actor process


def _unpack(token: str, blob: bytes) -> Any:
    if token not in _BLOBS:
        import pickle

        import torch

        torch.set_num_threads(1)  # one CPU per actor (client_resources)
        _BLOBS.clear()
        _BLOBS[token] = pickle.loads(blob)
    return _BLOBS[token]


def simulate_clients(
    algorithm: Algorithm, task: Task, jobs: Sequence[tuple[Any, Payload]], rounds: int = 1,
    num_cpus: int | None = None,
) -> FlowerRounds:
    """Run the clients of ``algorithm`` (:func:`kdfl.algorithms.program.run_client`) for ``jobs`` (client, downlink) on Flower's simulation
    engine for ``rounds`` rounds: one SuperNode per job, one TRAIN message per SuperNode and
    round (the downlink as an ArrayRecord), the replies decoded into ClientUpdates.

    Each Ray actor unpickles the task and the clients once (as a Flower app would load its
    partition once per process), so the rounds measure Flower's per-message path and the
    training, not data loading. Ray starts anew on every call (``startup_s``).
    """
    import pickle
    import time
    import uuid

    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from kdfl.algorithms.program import run_client
    from kdfl.flower.records import payload_to_record, record_to_payload

    if rounds < 1:
        raise KdflError(f"simulate_clients needs rounds >= 1; got {rounds}")
    t0 = time.perf_counter()
    token, blob = uuid.uuid4().hex, pickle.dumps((algorithm, task, [c for c, _ in jobs]))
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        alg, t, clients = _unpack(token, blob)
        i = int(msg.content.config_records["config"]["job"])  # type: ignore[arg-type]
        u = run_client(alg, t, record_to_payload(msg.content.array_records["payload"]), clients[i])
        content = RecordDict({"payload": payload_to_record(u.payload),
                              "config": ConfigRecord({"job": i, "num-examples": u.num_examples})})
        return Message(content, reply_to=msg)

    server_app = ServerApp()
    out: dict[int, ClientUpdate] = {}
    round_s: list[float] = []
    started: list[float] = []

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 120
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < len(jobs) and time.monotonic() < deadline:  # nodes register asynchronously
            time.sleep(0.1)
            nodes = sorted(grid.get_node_ids())
        if not nodes:
            raise KdflError("Flower's simulation engine started no SuperNode")
        started.append(time.perf_counter())
        for _ in range(rounds):
            t = time.perf_counter()
            out.clear()
            msgs = [Message(RecordDict({"payload": payload_to_record(d), "config": ConfigRecord({"job": i})}),
                            dst_node_id=nodes[i % len(nodes)], message_type=MessageType.TRAIN)
                    for i, (_, d) in enumerate(jobs)]
            for r in grid.send_and_receive(msgs):
                if r.has_error():
                    raise KdflError(f"a Flower client failed: {r.error.reason}")
                conf = r.content.config_records["config"]
                i = int(conf["job"])  # type: ignore[arg-type]
                out[i] = ClientUpdate(jobs[i][0].id, int(conf["num-examples"]),  # type: ignore[arg-type]
                                      record_to_payload(r.content.array_records["payload"]))
            round_s.append(time.perf_counter() - t)

    run_simulation(server_app, client_app, num_supernodes=len(jobs), backend_config=backend_config(num_cpus))  # type: ignore[arg-type]
    if len(out) != len(jobs) or len(round_s) != rounds:
        raise KdflError(f"Flower's simulation returned {len(out)} of {len(jobs)} client updates after "
                        f"{len(round_s)} of {rounds} rounds; see the Flower log above for the error")
    return FlowerRounds([out[i] for i in range(len(jobs))], round_s, started[0] - t0, time.perf_counter() - t0)
