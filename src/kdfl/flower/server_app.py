"""The server half of any kdfl algorithm as a Flower ``ServerApp``.

The ServerApp reads the kdfl config named in the Flower run config (``kdfl-config``: a
TOML path, relative to the working directory or the app's directory, or the TOML text;
``kdfl-set``: overrides ``"section.key=value; ..."``; ``kdfl-out``: a directory for
``metrics.jsonl``, ``summary.json`` and ``params.pt``), builds the federation with
:func:`kdfl.experiment.build` and runs the simulator's round driver
(:func:`kdfl.simulation.rounds.run_round`) with a transport of Flower messages:

1. ``query.kdfl_partition`` to every node, the run's setup: it carries the resolved config
   text (once per node and run; its bytes are ``setup_downlink_bytes`` in the summary) and
   the node answers with its ``partition-id`` (= kdfl client id).
2. per round, the driver samples and drops clients and builds the downlinks exactly as
   in the simulator; :class:`FlowerTransport` packs each into an ``ArrayRecord`` (one
   ``train`` message per client) and unpacks the replies; the driver checks, aggregates,
   evaluates and writes the same per-round record as the simulator.

Byte accounting comes from the real message contents: ``uplink_bytes`` / ``downlink_bytes``
are the data bytes of the arrays in the ``ArrayRecord`` of each message, as Flower
delivered it (:func:`kdfl.flower.records.nbytes`: numel x itemsize summed over the arrays,
without the ``.npy`` headers; ``kdfl.wire`` counts a few header bytes more per entry).
``uplink_record_bytes`` / ``downlink_record_bytes`` add Flower's own count
(``ArrayRecord.count_bytes``, with headers). Besides the arrays, a TRAIN message carries only a small ``ConfigRecord`` (round, client
id, the config's SHA-256), not counted.

Privacy: the ``[privacy]`` section applies as in the simulator: mode "local" on the nodes
(:func:`kdfl.flower.client_app.privatize_local`), mode "central" in the server's round
(:func:`server_algorithm`); ``epsilon`` is in every record and the summary has the
simulator's ``epsilon``, ``delta``, ``privacy_mode``, ``noise_multiplier`` and ``clip``.

Secure aggregation: with ``kdfl-secagg = true`` (or ``run(..., secagg=SecAggSettings())``)
every round runs Flower's SecAgg+ instead (:func:`kdfl.flower.secagg.run_round`): the
server sees only the mean upload, so only mean-aggregated algorithms and rules are
accepted (:func:`kdfl.flower.secagg.check_secagg`).

Faults: every ``send_and_receive`` waits at most ``kdfl-timeout-s`` seconds (default
:data:`~kdfl.flower.federation.DEFAULT_REPLY_TIMEOUT_S`; the messages' TTL is the same);
a node that does not answer in time, or answers with an error (its ClientApp raised, the
SuperLink reports it unavailable), is a failed client of that round (logged, in the
record's ``failed``) and the round goes on with the others.

Checkpoints: with a run directory, the ServerApp writes the simulator's checkpoint (server
state, records, round; :mod:`kdfl.simulation.checkpoint`) every ``run.checkpoint_every``
rounds, and ``kdfl-resume = true`` continues from it. Client states live on the
SuperNodes, in the context of one Flower run, and are not in the checkpoint: a resumed
run (a new Flower run) starts stateful clients afresh (see :func:`run`).
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

from kdfl import privacy as dp
from kdfl import tree
from kdfl.config import Config
from kdfl.flower import secagg as secagg_mod
from kdfl.flower.client_app import CONFIG_SHA, CONFIG_TEXT, DP_NORM_KEY, PARTITION_QUERY
from kdfl.flower.federation import (
    CONFIG_KEY,
    OUT_KEY,
    OVERRIDES_KEY,
    RESUME_KEY,
    TIMEOUT_KEY,
    Prepared,
    load_config,
    prepare,
    reply_timeout,
    split_overrides,
)
from kdfl.flower.records import nbytes, payload_to_record, record_to_payload
from kdfl.flower.secagg import SECAGG_KEY, SecAggSettings
from kdfl.simulation import checkpoint
from kdfl.simulation.engine import History
from kdfl.simulation.rounds import Exchange, Reply, final_client_eval, summarize
from kdfl.simulation.rounds import run_round as drive_round
from kdfl.transport import pack, unpack
from kdfl.types import Algorithm, ClientInfo, KdflError, Payload, PayloadError, ServerState

log = logging.getLogger(__name__)


def discover(grid: Grid, p: Prepared, wait_s: float = 120.0) -> dict[int, int]:
    """kdfl client id -> Flower node id, asking every node for its ``partition-id``; the
    same query hands every node the run's config text (the run's setup, sent once)."""
    n, deadline = p.num_clients, time.monotonic() + wait_s
    nodes = list(grid.get_node_ids())
    while len(nodes) < n and time.monotonic() < deadline:
        time.sleep(0.5)  # in deployment, SuperNodes register one after the other
        nodes = list(grid.get_node_ids())
    if len(nodes) < n:
        raise KdflError(f"only {len(nodes)} SuperNodes connected within {wait_s:.0f} s, the kdfl config needs "
                        f"{n} (one per client, --node-config \"partition-id=i num-partitions={n}\")")
    setup = ConfigRecord({CONFIG_TEXT: p.text, CONFIG_SHA: p.digest})
    msgs = [Message(RecordDict({"config": setup}), dst_node_id=nid, message_type=PARTITION_QUERY, ttl=wait_s)
            for nid in nodes]
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
    (the packed downlink as an ``ArrayRecord`` plus round, client id and the config's
    digest), the replies' ``ArrayRecord`` unpacked for the server. Bytes are the data
    bytes of the arrays of each message as Flower delivered them; ``uplink_record_bytes``
    adds Flower's own count (with the ``.npy`` headers). Client state stays on the nodes.

    Every exchange waits at most ``timeout`` seconds (finite: None means
    :data:`~kdfl.flower.federation.DEFAULT_REPLY_TIMEOUT_S`); a client whose node sends no
    reply by then, or an error reply, is a failed client of the round."""

    def __init__(self, grid: Grid, p: Prepared, nodes: Mapping[int, int], timeout: Any = None) -> None:
        self.grid, self.p, self.nodes, self.timeout = grid, p, nodes, reply_timeout(timeout)

    def _send(self, round_num: int, jobs: Sequence[tuple[ClientInfo, Payload]], message_type: str,
              next_round: int, group: str) -> tuple[list[int], list[int], list[Message | None]]:
        """Send one message per job; (downlink data bytes per job, Flower's count of the
        same arrays with their headers, the reply per job or None)."""
        p = self.p
        msgs, down_bytes, record_bytes, cache = [], [], [], {}
        for info, payload in jobs:
            if id(payload) not in cache:
                cache[id(payload)] = (payload_to_record(pack(payload, p.downlink_codec)), payload)
            arrays, _ = cache[id(payload)]
            down_bytes.append(nbytes(arrays))
            record_bytes.append(arrays.count_bytes())
            conf = ConfigRecord({"round": next_round, "client-id": info.id, CONFIG_SHA: p.digest})
            msgs.append(Message(RecordDict({"payload": arrays, "config": conf}), dst_node_id=self.nodes[info.id],
                                message_type=message_type, group_id=group, ttl=self.timeout))
        replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
        # match replies to messages by message id (a SuperLink's own error replies, e.g. "node
        # unavailable", come from the SuperLink's node id), else by the sending node
        by_msg = {m.metadata.message_id: k for k, m in enumerate(msgs) if m.metadata.message_id}
        by_node = {self.nodes[info.id]: k for k, (info, _) in enumerate(jobs)}
        got: list[Message | None] = [None] * len(jobs)
        for r in replies:
            k = by_msg.get(r.metadata.reply_to_message_id, by_node.get(r.metadata.src_node_id))
            if k is not None:
                got[k] = r
        for k, missing in enumerate(got):
            if missing is None:
                flog(logging.WARNING, "kdfl round %d: client %d (node %d) sent no reply within %g s", round_num,
                     jobs[k][0].id, self.nodes[jobs[k][0].id], self.timeout)
        return down_bytes, record_bytes, got

    def _failure(self, reply: Message | None) -> str | None:
        if reply is None:
            return f"no reply within {self.timeout:g} s"
        if reply.has_error():
            return f"error reply: {reply.error.reason}"
        return None

    def exchange(self, round_num: int, jobs: Sequence[tuple[ClientInfo, Payload]]) -> Exchange:
        p = self.p
        down_bytes, down_record_bytes, got = self._send(round_num, jobs, MessageType.TRAIN, round_num,
                                                        str(round_num))
        replies, record_bytes, norms = [], [], []
        for (info, _), reply in zip(jobs, got, strict=True):
            error = self._failure(reply)
            if error is not None or reply is None:
                replies.append(Reply(info.id, error=error))
                continue
            try:
                arrays = reply.content.array_records["payload"]
                m = reply.content.metric_records["metrics"]
                num_examples = int(m["num-examples"])  # type: ignore[arg-type]
                metrics = {k[2:]: float(v) for k, v in m.items() if k.startswith("m.")}  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError) as e:  # a reply without kdfl's records
                replies.append(Reply(info.id, error=f"malformed reply ({type(e).__name__}: {e})"))
                continue
            record_bytes.append(arrays.count_bytes())
            if DP_NORM_KEY in m:
                norms.append(float(m[DP_NORM_KEY]))  # type: ignore[arg-type]
            received: Payload | None
            try:
                received = tree.to_device(unpack(record_to_payload(arrays), p.uplink_codec), p.fed.task.device)
                reject = None
            except PayloadError as e:
                received, reject = None, str(e)
            replies.append(Reply(info.id, num_examples, received, metrics, nbytes(arrays), reject=reject))
        record: dict[str, Any] = {}
        if p.engine.privacy is not None and p.engine.privacy.mode == "local":  # as the simulator's transport
            record.update(dp.diagnostics(norms, p.engine.privacy.clip))
        record.update(uplink_record_bytes=int(sum(record_bytes)), downlink_record_bytes=int(sum(down_record_bytes)))
        return Exchange(down_bytes, replies, record)

    def evaluate(self, round_num: int, jobs: Sequence[tuple[ClientInfo, Payload]]) -> list[dict[str, float]]:
        """Per-client metrics: one EVALUATE message per client (the downlink ``configure``
        gives it for the next round); each node evaluates its model on its held-out split
        and the test set. Not counted as training traffic. A node that does not answer in
        time reports nothing (logged)."""
        _, _, got = self._send(round_num, jobs, MessageType.EVALUATE, round_num + 1, f"eval-{round_num}")
        out: list[dict[str, float]] = []
        for (info, _), reply in zip(jobs, got, strict=True):
            error = self._failure(reply)
            if error is not None or reply is None:
                log.warning("round %d: client %d did not report its evaluation: %s", round_num, info.id, error)
                out.append({})
                continue
            m = reply.content.metric_records.get("metrics")
            if m is None:
                log.warning("round %d: client %d sent an evaluation without metrics", round_num, info.id)
                out.append({})
                continue
            out.append({k[2:]: float(v) for k, v in m.items() if k.startswith("m.")})  # type: ignore[arg-type]
        return out


def run_round(
    grid: Grid, p: Prepared, nodes: Mapping[int, int], state: ServerState, round_num: int,
    timeout: Any = None,
) -> tuple[ServerState, dict[str, Any]]:
    """One round through Flower: the simulator's round driver with :class:`FlowerTransport`
    (``timeout``: seconds to wait for the replies; None = the default). With ``[privacy]``
    mode "central" the server clips and noises the accepted uploads exactly as the
    simulator does (:class:`kdfl.privacy.CentralDP`); mode "local" happens on the nodes."""
    return drive_round(server_algorithm(p), p.fed.task, state, round_num, p.engine.settings, p.num_clients,
                       FlowerTransport(grid, p, nodes, timeout))


def server_algorithm(p: Prepared) -> Algorithm:
    """The algorithm whose server half the round driver runs: wrapped in
    :class:`~kdfl.privacy.CentralDP` under ``[privacy]`` mode "central" (as
    :meth:`kdfl.simulation.engine.Engine.round` does)."""
    s = p.engine.privacy
    return dp.CentralDP(p.fed.algorithm, s) if s is not None and s.mode == "central" else p.fed.algorithm  # type: ignore[return-value]


def privacy_summary(p: Prepared, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The simulator's privacy fields of ``summary.json`` (empty without ``[privacy]``)."""
    s = p.engine.privacy
    if s is None:
        return {}
    return {"epsilon": p.engine.epsilon(records), "delta": s.delta, "privacy_mode": s.mode,
            "noise_multiplier": s.noise_multiplier, "clip": s.clip}


def run(grid: Grid, cfg: Config, out: str | Path | None = None, wait_s: float = 120.0,
        on_round: Callable[[dict[str, Any]], None] | None = None, timeout: Any = None,
        resume: bool = False, secagg: SecAggSettings | None = None) -> History:
    """All rounds of ``cfg`` through ``grid``; writes ``out`` like ``kdfl run --out`` does.

    Args:
        wait_s: how long to wait for all SuperNodes to connect and answer the setup.
        timeout: seconds (a number, or its text) to wait for the replies of each round (None:
            :data:`~kdfl.flower.federation.DEFAULT_REPLY_TIMEOUT_S`); a node silent that long
            is a failed client of the round.
        resume: continue the run in ``out`` from its checkpoint (written every
            ``run.checkpoint_every`` rounds). Only ``run.rounds`` may differ from the config
            the run started with. The server state and records come back exactly; client
            states do not (they lived on the SuperNodes, in the earlier Flower run's
            context), so stateless algorithms (FedAvg, FedProx, FedDF, ...) continue as a
            straight run would, while stateful clients (FedMD, FD, FedProto, local, a
            heterogeneous FedEMA-Distill, ...) start the resumed rounds from a fresh state.
        secagg: run every round with Flower's SecAgg+ (:mod:`kdfl.flower.secagg`): the
            server sees only the mean upload; refused, with the reason, for algorithms and
            rules that need each upload.
    """
    from kdfl import experiment

    if cfg["run"]["threads"]:
        torch.set_num_threads(cfg["run"]["threads"])
    timeout = reply_timeout(timeout)
    p = prepare(cfg)
    if secagg is not None:
        secagg_mod.check_secagg(p)
    run_dir = Path(out) if out else None
    hist = History()
    start = 1
    state = None
    if resume:
        if run_dir is None:
            raise KdflError(f"resume needs the run directory of the run to continue: set {OUT_KEY} (or out=)")
        # no checkpoint there yet (stopped before the first one): the run starts from round 0 in place, as with
        # `kdfl run --resume`
        resume = experiment.check_run_dir(run_dir, resume=True, overwrite=False, cfg=cfg)
    if resume:
        assert run_dir is not None
        if (run_dir / "config.toml").exists():
            experiment._check_resume(run_dir, cfg)
        ck = checkpoint.load(run_dir)
        state, hist.records, start = ck["state"], list(ck["records"]), int(ck["round"]) + 1
        if ck.get("client_states"):
            log.warning("the checkpoint in %s holds client states (a simulator run); Flower nodes keep their own, "
                        "so they are not restored", run_dir)
        flog(logging.WARNING, "kdfl: resuming %s after round %d; client states are not restored (stateful "
             "clients start afresh)", run_dir, start - 1)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(p.text)
        with open(run_dir / "metrics.jsonl", "w") as f:  # rewritten so a resume leaves no duplicates
            for rec in hist.records:
                f.write(json.dumps(rec) + "\n")
    nodes = discover(grid, p, wait_s)
    setup_bytes = len(p.text.encode()) * len(nodes)
    log.info("kdfl: %d clients on nodes %s; config (%d bytes) sent to each", len(nodes), nodes, len(p.text.encode()))
    if state is None:
        state = p.fed.algorithm.init(p.fed.task)
    settings = p.engine.settings
    for r in range(start, settings.rounds + 1):
        if secagg is not None:
            state, record = secagg_mod.run_round(grid, p, nodes, state, r, timeout, secagg)
        else:
            state, record = run_round(grid, p, nodes, state, r, timeout)
        if p.engine.privacy is not None:
            record["epsilon"] = p.engine.epsilon([*hist.records, record])
        hist.records.append(record)
        flog(logging.INFO, "kdfl round %d: %s", r, _brief(record))
        if run_dir is not None:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            every = settings.checkpoint_every
            if every and (r % every == 0 or r == settings.rounds):
                checkpoint.save(run_dir, {"round": r, "state": state, "client_states": {},
                                          "records": hist.records, "runtime": "flower"})
        if on_round is not None:
            on_round(record)
    hist.state = state
    hist.clients = final_client_eval(p.fed.algorithm, p.fed.task, state, hist.records, p.num_clients,
                                     FlowerTransport(grid, p, nodes, timeout))
    hist.summary = summarize(hist.records, settings.target_accuracy, hist.clients)
    hist.summary.update(privacy_summary(p, hist.records))
    hist.summary["setup_downlink_bytes"] = setup_bytes  # the config text, once per node (this Flower run)
    if run_dir is not None:
        (run_dir / "summary.json").write_text(json.dumps(hist.summary, indent=2) + "\n")
        (run_dir / "clients.json").write_text(json.dumps(hist.clients) + "\n")
        torch.save(state.params, run_dir / "params.pt")
    return hist


def _flag(value: Any, key: str = RESUME_KEY) -> bool:
    """A run-config boolean (``true`` / ``false``, or the strings ``"true"`` / ``"1"`` ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise KdflError(f"{key} must be true or false, got {value!r}")


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
    timeout: float | None = None,
    resume: bool | None = None,
    secagg: SecAggSettings | bool | None = None,
) -> ServerApp:
    """A ServerApp for a kdfl config.

    Args:
        config: a TOML path, TOML text or config dict; None reads ``kdfl-config`` from the
            Flower run config (``flwr run`` fills it from ``[tool.flwr.app.config]``).
        overrides: ``section.key=value`` overrides, applied after those in ``kdfl-set``.
        out: run directory; None reads ``kdfl-out`` from the run config ("" = none).
        base_dir: where relative config paths are also looked up (the app's directory).
        on_finish: called with the run's History (in-process use: tests, benchmarks).
        timeout: seconds to wait for the replies of a round; None reads ``kdfl-timeout-s``
            from the run config (default 600).
        resume: continue the run in the run directory from its checkpoint; None reads
            ``kdfl-resume`` from the run config (default false).
        secagg: secure aggregation with SecAgg+ (True or its settings); None reads
            ``kdfl-secagg`` (default false) and ``kdfl-secagg-clip`` / ``-shares`` /
            ``-threshold`` from the run config (see :mod:`kdfl.flower.secagg`).
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
        sa = secagg if secagg is not None else _flag(rc.get(SECAGG_KEY, False), SECAGG_KEY)
        sa_settings = (sa if isinstance(sa, SecAggSettings) else SecAggSettings.from_run_config(rc)) if sa else None
        hist = run(grid, cfg, run_dir, wait_s, timeout=timeout if timeout is not None else rc.get(TIMEOUT_KEY),
                   resume=resume if resume is not None else _flag(rc.get(RESUME_KEY, False)), secagg=sa_settings)
        flog(logging.INFO, "kdfl summary: %s", json.dumps(hist.summary))
        if on_finish is not None:
            on_finish(hist)

    return app


app = make_server_app()

__all__ = ["app", "discover", "make_server_app", "run", "run_round"]
