"""The server half of any kdfl algorithm as a Flower ``ServerApp``.

The ServerApp reads the kdfl config named in the Flower run config (``kdfl-config``: a
TOML path, relative to the working directory or the app's directory, or the TOML text;
``kdfl-set``: overrides ``"section.key=value; ..."``; ``kdfl-out``: a directory for
``metrics.jsonl``, ``summary.json`` and ``params.pt``), builds the federation with
:func:`kdfl.experiment.build` and runs the simulator's round driver
(:func:`kdfl.simulation.rounds.run_round`) with a transport of Flower messages:

1. ``query.kdfl_partition`` to every node: kdfl client id = the node's ``partition-id``.
2. per round, the driver samples and drops clients and builds the downlinks exactly as
   in the simulator; :class:`FlowerTransport` packs each into an ``ArrayRecord`` (one
   ``train`` message per client) and unpacks the replies; the driver checks, aggregates,
   evaluates and writes the same per-round record as the simulator.

Byte accounting comes from the real message contents: ``uplink_bytes`` / ``downlink_bytes``
are the data bytes of the arrays in the ``ArrayRecord`` of each message, as Flower
delivered it (:func:`kdfl.flower.records.nbytes`: numel x itemsize summed over the arrays,
without the ``.npy`` headers; ``kdfl.wire`` counts a few header bytes more per entry).
``uplink_record_bytes`` adds Flower's own count (``ArrayRecord.count_bytes``, with headers).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log as flog
from flwr.serverapp import Grid, ServerApp

from kdfl.config import Config
from kdfl.flower.client_app import PARTITION_QUERY
from kdfl.flower.federation import (
    CONFIG_KEY,
    OUT_KEY,
    OVERRIDES_KEY,
    Prepared,
    load_config,
    prepare,
    split_overrides,
)
from kdfl.flower.records import nbytes, payload_to_record, record_to_payload
from kdfl.simulation.engine import History
from kdfl.simulation.rounds import Exchange, Reply, final_client_eval, summarize
from kdfl.simulation.rounds import run_round as drive_round
from kdfl.transport import pack, unpack
from kdfl.types import ClientInfo, KdflError, Payload, PayloadError, ServerState

log = logging.getLogger(__name__)


def discover(grid: Grid, p: Prepared, wait_s: float = 120.0) -> dict[int, int]:
    """kdfl client id -> Flower node id, asking every node for its ``partition-id``."""
    n, deadline = p.num_clients, time.monotonic() + wait_s
    nodes = list(grid.get_node_ids())
    while len(nodes) < n and time.monotonic() < deadline:
        time.sleep(0.5)  # in deployment, SuperNodes register one after the other
        nodes = list(grid.get_node_ids())
    if len(nodes) < n:
        raise KdflError(f"only {len(nodes)} SuperNodes connected within {wait_s:.0f} s, the kdfl config needs "
                        f"{n} (one per client, --node-config \"partition-id=i num-partitions={n}\")")
    msgs = [Message(RecordDict({}), dst_node_id=nid, message_type=PARTITION_QUERY) for nid in nodes]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=wait_s):
        src = reply.metadata.src_node_id
        if reply.has_error():
            raise KdflError(f"node {src} could not report its partition: {reply.error.reason}")
        m = reply.content.metric_records["metrics"]
        pid, k = int(m["partition-id"]), int(m["num-partitions"])  # type: ignore[arg-type]
        if k != n or not 0 <= pid < n:
            raise KdflError(f"node {src} has partition-id={pid} num-partitions={k}, but the kdfl config has "
                            f"data.num_clients={n}: partition ids must be 0..{n - 1}")
        if pid in mapping:
            raise KdflError(f"nodes {mapping[pid]} and {src} both claim partition-id={pid}")
        mapping[pid] = src
    missing = sorted(set(range(n)) - set(mapping))
    if missing:
        raise KdflError(f"no node answered for partition ids {missing}")
    return mapping


class FlowerTransport:
    """The round driver's transport over Flower messages: one TRAIN message per client
    (the packed downlink as an ``ArrayRecord`` plus the resolved config), the replies'
    ``ArrayRecord`` unpacked for the server. Bytes are the data bytes of the arrays of
    each message as Flower delivered them; ``uplink_record_bytes`` adds Flower's own count
    (with the ``.npy`` headers). Client state stays on the nodes."""

    def __init__(self, grid: Grid, p: Prepared, nodes: Mapping[int, int], timeout: float | None = None) -> None:
        self.grid, self.p, self.nodes, self.timeout = grid, p, nodes, timeout

    def exchange(self, round_num: int, jobs: Sequence[tuple[ClientInfo, Payload]]) -> Exchange:
        p = self.p
        msgs, down_bytes, cache = [], [], {}
        for info, payload in jobs:
            if id(payload) not in cache:
                cache[id(payload)] = (payload_to_record(pack(payload, p.downlink_codec)), payload)
            arrays, _ = cache[id(payload)]
            down_bytes.append(nbytes(arrays))
            conf = ConfigRecord({"round": round_num, "client-id": info.id, "kdfl-config": p.text})
            msgs.append(Message(RecordDict({"payload": arrays, "config": conf}), dst_node_id=self.nodes[info.id],
                                message_type=MessageType.TRAIN, group_id=str(round_num)))
        got = {r.metadata.src_node_id: r for r in self.grid.send_and_receive(msgs, timeout=self.timeout)}
        replies, record_bytes = [], []
        for info, _ in jobs:
            reply = got.get(self.nodes[info.id])
            if reply is None or reply.has_error():
                replies.append(Reply(info.id, error="no reply" if reply is None else reply.error.reason))
                continue
            arrays = reply.content.array_records["payload"]
            record_bytes.append(arrays.count_bytes())
            m = reply.content.metric_records["metrics"]
            metrics = {k[2:]: float(v) for k, v in m.items() if k.startswith("m.")}  # type: ignore[arg-type]
            received: Payload | None
            try:
                received, reject = unpack(record_to_payload(arrays), p.uplink_codec), None
            except PayloadError as e:
                received, reject = None, str(e)
            replies.append(Reply(info.id, int(m["num-examples"]), received, metrics, nbytes(arrays),  # type: ignore[arg-type]
                                 reject=reject))
        return Exchange(down_bytes, replies, {"uplink_record_bytes": int(sum(record_bytes))})

    def evaluate(self, round_num: int, jobs: Sequence[tuple[ClientInfo, Payload]]) -> list[dict[str, float]]:
        """Per-client metrics: one EVALUATE message per client (the downlink ``configure``
        gives it for the next round); each node evaluates its model on its held-out split
        and the test set. Not counted as training traffic. A node that does not answer
        reports nothing (logged)."""
        p = self.p
        msgs, cache = [], {}
        for info, payload in jobs:
            if id(payload) not in cache:
                cache[id(payload)] = (payload_to_record(pack(payload, p.downlink_codec)), payload)
            conf = ConfigRecord({"round": round_num + 1, "client-id": info.id, "kdfl-config": p.text})
            msgs.append(Message(RecordDict({"payload": cache[id(payload)][0], "config": conf}),
                                dst_node_id=self.nodes[info.id], message_type=MessageType.EVALUATE,
                                group_id=f"eval-{round_num}"))
        got = {r.metadata.src_node_id: r for r in self.grid.send_and_receive(msgs, timeout=self.timeout)}
        out: list[dict[str, float]] = []
        for info, _ in jobs:
            reply = got.get(self.nodes[info.id])
            if reply is None or reply.has_error():
                log.warning("round %d: client %d did not report its evaluation: %s", round_num, info.id,
                            "no reply" if reply is None else reply.error.reason)
                out.append({})
                continue
            m = reply.content.metric_records["metrics"]
            out.append({k[2:]: float(v) for k, v in m.items() if k.startswith("m.")})  # type: ignore[arg-type]
        return out


def run_round(
    grid: Grid, p: Prepared, nodes: Mapping[int, int], state: ServerState, round_num: int,
    timeout: float | None = None,
) -> tuple[ServerState, dict[str, Any]]:
    """One round through Flower: the simulator's round driver with :class:`FlowerTransport`."""
    return drive_round(p.fed.algorithm, p.fed.task, state, round_num, p.engine.settings, p.num_clients,
                       FlowerTransport(grid, p, nodes, timeout))


def run(grid: Grid, cfg: Config, out: str | Path | None = None, wait_s: float = 120.0,
        on_round: Callable[[dict[str, Any]], None] | None = None) -> History:
    """All rounds of ``cfg`` through ``grid``; writes ``out`` like ``kdfl run --out`` does."""
    if cfg["run"]["threads"]:
        torch.set_num_threads(cfg["run"]["threads"])
    p = prepare(cfg)
    run_dir = Path(out) if out else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(p.text)
        (run_dir / "metrics.jsonl").write_text("")
    nodes = discover(grid, p, wait_s)
    log.info("kdfl: %d clients on nodes %s", len(nodes), nodes)
    hist = History()
    state = p.fed.algorithm.init(p.fed.task)
    for r in range(1, p.engine.settings.rounds + 1):
        state, record = run_round(grid, p, nodes, state, r)
        hist.records.append(record)
        flog(logging.INFO, "kdfl round %d: %s", r, _brief(record))
        if run_dir is not None:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if on_round is not None:
            on_round(record)
    hist.state = state
    hist.clients = final_client_eval(p.fed.algorithm, p.fed.task, state, hist.records, p.num_clients,
                                     FlowerTransport(grid, p, nodes))
    hist.summary = summarize(hist.records, p.engine.settings.target_accuracy, hist.clients)
    if run_dir is not None:
        (run_dir / "summary.json").write_text(json.dumps(hist.summary, indent=2) + "\n")
        (run_dir / "clients.json").write_text(json.dumps(hist.clients) + "\n")
        torch.save(state.params, run_dir / "params.pt")
    return hist


def _brief(record: Mapping[str, Any]) -> str:
    keys = ("accuracy", "train_loss", "uplink_bytes_per_client", "downlink_bytes_per_client", "rejected", "failed")
    return " ".join(f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}"
                    for k in keys if k in record)


def make_server_app(
    config: str | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    base_dir: str | Path | None = None,
    on_finish: Callable[[History], None] | None = None,
) -> ServerApp:
    """A ServerApp for a kdfl config.

    Args:
        config: a TOML path, TOML text or config dict; None reads ``kdfl-config`` from the
            Flower run config (``flwr run`` fills it from ``[tool.flwr.app.config]``).
        overrides: ``section.key=value`` overrides, applied after those in ``kdfl-set``.
        out: run directory; None reads ``kdfl-out`` from the run config ("" = none).
        base_dir: where relative config paths are also looked up (the app's directory).
        on_finish: called with the run's History (in-process use: tests, benchmarks).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = context.run_config
        source = config if config is not None else rc.get(CONFIG_KEY)
        if source is None or source == "":
            raise KdflError(f"no kdfl config: set '{CONFIG_KEY}' in [tool.flwr.app.config] (a TOML path or text) "
                            f"or pass --run-config \"{CONFIG_KEY}='configs/x.toml'\"")
        sets = split_overrides(str(rc.get(OVERRIDES_KEY, ""))) + list(overrides)
        cfg = load_config(source if isinstance(source, Mapping) else str(source), sets,
                          [b for b in (base_dir,) if b is not None])
        run_dir = out if out is not None else (str(rc.get(OUT_KEY, "")) or None)
        wait_s = float(rc.get("kdfl-wait-s", 120.0))
        hist = run(grid, cfg, run_dir, wait_s)
        flog(logging.INFO, "kdfl summary: %s", json.dumps(hist.summary))
        if on_finish is not None:
            on_finish(hist)

    return app


app = make_server_app()

__all__ = ["app", "discover", "make_server_app", "run", "run_round"]
